"""Checkpoints, written atomically (``qfl.files``): a kill -9 at any instant
leaves the previous checkpoint or the new one.

A checkpoint (``checkpoint.npz``) holds the global weights (``w/NAME``), the
server optimizer state (``opt/SLOT/NAME``), the downlink's replica state under
``downlink_mode = "delta"`` (``down/...``, ``DownlinkReplica.state_arrays``) and a
JSON ``meta`` blob with the round number and the metrics history up to that round.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qfl.files import atomic_write_bytes

CHECKPOINT_NAME = "checkpoint.npz"


@dataclass
class Checkpoint:
    round: int
    weights: dict[str, np.ndarray]
    optimizer_state: dict[str, np.ndarray]
    history: list[dict[str, Any]]
    downlink_state: dict[str, np.ndarray] = field(default_factory=dict)


def save_checkpoint(run_dir: Path, ckpt: Checkpoint) -> None:
    arrays = {f"w/{k}": v for k, v in ckpt.weights.items()}
    arrays.update({f"opt/{k}": v for k, v in ckpt.optimizer_state.items()})
    arrays.update({f"down/{k}": v for k, v in ckpt.downlink_state.items()})
    meta = json.dumps({"round": ckpt.round, "history": ckpt.history, "weight_names": list(ckpt.weights)})
    arrays["meta"] = np.frombuffer(meta.encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    # the checker sees that a str-keyed dict could hold allow_pickle=; these keys are array names
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
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
        down = {k[len("down/") :]: f[k] for k in f.files if k.startswith("down/")}
    return Checkpoint(meta["round"], weights, opt, meta["history"], down)
