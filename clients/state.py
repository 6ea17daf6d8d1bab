"""A client's codec state (error-feedback residuals, PowerSGD's warm start) between the rounds it trains.

Where it lives, first match wins:

1. a ``qfl edge`` daemon's node (node config ``qfl-state``): Flower's
   ``context.state``, which the daemon commits to its own state database with
   the round it belongs to (:func:`qfl.clients.daemon.edge_state_mod`);
2. ``client_state_dir`` in the run config (the simulation runner sets it to
   ``<run dir>/client-state``): files, so 1,000 simulated clients do not keep
   1,000 residuals in memory while they are not sampled, and a resumed run
   finds them;
3. otherwise Flower's ``context.state`` (memory), as for any ClientApp.

On disk, partition ``p``'s state after round ``r`` is ``DIR/p/r.npz``,
written atomically. Training round ``r`` loads the newest file of a round
``< r``; a file of round ``>= r`` was left by an interrupted attempt at that
round and is ignored (then replaced). After saving round ``r`` the files older
than the one loaded are deleted, so at most three files exist per client and
the state a resume from round ``r − 1``'s checkpoint needs is always there,
bit for bit.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context

from qfl.files import atomic_write_bytes

CODEC_STATE = "codec-state"  # the context.state record, when the state stays in memory
NODE_STATE_DIR = "qfl-state"  # node config key of a `qfl edge` daemon's state directory (clients.daemon.STATE_KEY)

CodecStates = dict[str, dict[str, np.ndarray]]  # tensor -> slot -> array (compression.encode_update's states)


def _flat(states: CodecStates) -> dict[str, np.ndarray]:
    return {f"{tensor}/{slot}": np.ascontiguousarray(arr) for tensor, slots in states.items() for slot, arr in slots.items()}


def _nested(flat: dict[str, np.ndarray]) -> CodecStates:
    states: CodecStates = {}
    for key, arr in flat.items():
        tensor, _, slot = key.rpartition("/")
        states.setdefault(tensor, {})[slot] = arr
    return states


class CodecStateFiles:
    """One client's codec state as round-numbered ``.npz`` files in ``root/<partition>/``."""

    def __init__(self, root: str | os.PathLike, partition: int) -> None:
        self.dir = Path(root) / str(int(partition))

    def _rounds(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(p.stem) for p in self.dir.glob("*.npz") if p.stem.isdigit())

    def load(self, server_round: int) -> tuple[CodecStates, int | None]:
        """The state saved by the newest round before ``server_round`` (empty if none) and that round."""
        earlier = [r for r in self._rounds() if r < server_round]
        if not earlier:
            return {}, None
        with np.load(self.dir / f"{earlier[-1]}.npz", allow_pickle=False) as npz:
            return _nested({key: npz[key] for key in npz.files}), earlier[-1]

    def save(self, server_round: int, states: CodecStates) -> None:
        """Write round ``server_round``'s state, then delete the files older than the one ``load`` returned."""
        self.dir.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, **_flat(states))  # type: ignore[arg-type]  # numpy types **kwds as allow_pickle
        atomic_write_bytes(self.dir / f"{server_round}.npz", buffer.getvalue())
        earlier = [r for r in self._rounds() if r < server_round]
        for old in earlier[:-1]:
            (self.dir / f"{old}.npz").unlink(missing_ok=True)


def state_files(context: Context, client_state_dir: str, partition: int) -> CodecStateFiles | None:
    """The files holding this client's codec state, or None when it stays in ``context.state``."""
    if context.node_config.get(NODE_STATE_DIR):
        return None  # an edge daemon keeps context.state in its own durable state
    if client_state_dir:
        return CodecStateFiles(client_state_dir, partition)
    return None


def load_in_memory(context: Context) -> CodecStates:
    record = context.state.array_records.get(CODEC_STATE)
    return _nested({key: array.numpy() for key, array in (record or {}).items()})


def save_in_memory(context: Context, states: CodecStates) -> None:
    context.state[CODEC_STATE] = ArrayRecord({key: Array(arr) for key, arr in _flat(states).items()})
