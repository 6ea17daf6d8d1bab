"""Flower ServerApp, the QflFedAvg strategy, server optimizers and checkpoints."""
