"""Edge clients: StreamSplit split contrastive learning on streaming audio (see ``task.py`` for the overview)."""
