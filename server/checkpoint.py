"""Atomic files: checkpoints and JSON, written whole or not at all.

Each write goes to a temporary file in the same folder, is flushed and
fsync'd, then renamed over the target (``os.replace`` is atomic on POSIX), so
a kill -9 at any instant leaves either the old file or the new one.

A checkpoint (``checkpoint.npz``) holds the global weights (``w/NAME``), the
server optimizer state (``opt/SLOT/NAME``) and a JSON ``meta`` blob with the
round number and the metrics history up to that round.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CHECKPOINT_NAME = "checkpoint.npz"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


@dataclass
class Checkpoint:
    round: int
    weights: dict[str, np.ndarray]
    optimizer_state: dict[str, np.ndarray]
    history: list[dict[str, Any]]


def save_checkpoint(run_dir: Path, ckpt: Checkpoint) -> None:
    arrays = {f"w/{k}": v for k, v in ckpt.weights.items()}
    arrays.update({f"opt/{k}": v for k, v in ckpt.optimizer_state.items()})
    meta = json.dumps({"round": ckpt.round, "history": ckpt.history, "weight_names": list(ckpt.weights)})
    arrays["meta"] = np.frombuffer(meta.encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(Path(run_dir) / CHECKPOINT_NAME, buffer.getvalue())


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The last complete round's checkpoint, or None if no round completed."""
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as f:
        meta = json.loads(bytes(f["meta"]).decode())
        weights = {k: f[f"w/{k}"] for k in meta["weight_names"]}
        opt = {k[len("opt/") :]: f[k] for k in f.files if k.startswith("opt/")}
    return Checkpoint(meta["round"], weights, opt, meta["history"])
