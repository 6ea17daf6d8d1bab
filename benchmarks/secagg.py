"""Secure-aggregation benchmarks: masking throughput and the round-time overhead.

``bench_masking``: one upload of ``d`` ring elements of ``B`` bits, what the
two ends really do. *mask* = the client's ``masked_pack`` (the mask read from
the key bytes, added and packed at B bits in one pass; the upload comes back
as a fresh ``bytes``, and the previous one is freed first, as a client holds
one upload at a time); *unmask* = the server's ``add_packed`` (unpack the
upload and add it into the running sum, in place). Each is reported as a
ratio to ``numpy.copyto`` of a float32 array of ``d`` elements, timed in the
same run (best of ``repeat``), so the figure holds on a noisy machine. All of
it is single-threaded. Also reported: ``bytes_ratio``, the cost of only
materialising an upload-sized ``bytes`` (allocation, page faults, copy; a
floor under *mask*).

``bench_round_overhead``: the same short federation (digits, fp32 or another
codec) with ``security=none`` and with ``security=masked-sum``; the mean wall
time of rounds 2.. (round 1 includes starting Ray) and their ratio.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from qfl.benchmarks.timing import best_of
from qfl.security.primitives.masking import (
    add_packed,
    key_bytes_needed,
    masked_pack,
)


def bench_masking(
    d: int = 1 << 24, ring_bits: tuple[int, ...] = (8, 16, 34, 37), repeat: int = 3
) -> list[dict[str, Any]]:
    """One row per ring size ``B``: the mask and unmask times as ratios to a numpy copy (module docstring)."""
    rng = np.random.default_rng(0)
    src = rng.standard_normal(d).astype(np.float32)
    dst = np.empty_like(src)
    copy = best_of(lambda: np.copyto(dst, src), repeat)[0]
    rows = []
    for B in ring_bits:
        q = rng.integers(0, 1 << B, d, dtype=np.uint64)
        key = os.urandom(key_bytes_needed(d, B))
        packed: dict[str, bytes] = {}

        def mask() -> None:
            packed.pop("y", None)
            packed["y"] = masked_pack(q, 0, {1: key}, B)

        t_mask = best_of(mask, repeat)[0]
        total = q.copy()  # the running sum the upload is added into
        t_unmask = best_of(lambda: add_packed(total, packed["y"], B), repeat)[0]
        sized = np.empty(len(packed["y"]), np.uint8)
        t_bytes = best_of(lambda: sized.tobytes(), repeat)[0]
        row = {
            "ring_bits": B, "elements": d, "mask_ratio": t_mask / copy, "unmask_ratio": t_unmask / copy,
            "mask_plus_unmask_ratio": (t_mask + t_unmask) / copy,
            "mask_gbps": d * B / 8 / t_mask / 1e9, "unmask_gbps": d * B / 8 / t_unmask / 1e9,
            "bytes_ratio": t_bytes / copy,
        }
        rows.append(row)
    return rows


def bench_round_overhead(codec: str = "fp32", clients: int = 4, rounds: int = 4, **params: Any) -> dict[str, Any]:
    import json

    from qfl.config import resolve_config
    from qfl.simulations.runner import run_simulation_job

    class Silent:
        def start(self, *args: Any) -> None: ...
        def round(self, *args: Any) -> None: ...
        def finish(self, *args: Any) -> None: ...

    out: dict[str, Any] = {"codec": codec, "clients": clients, "rounds": rounds}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("none", "masked-sum"):
            values = {"clients": clients, "rounds": rounds, "codec": codec, "security": mode, "fed_eval": False}
            values.update({f"codec.{k}": v for k, v in params.items()})
            run_dir = Path(tmp) / mode
            run_simulation_job(resolve_config(values), run_dir, reporter=Silent())
            walls = [r["wall_s"] for r in json.loads((run_dir / "metrics.json").read_text())[1:]]
            out[f"{mode}_round_s"] = sum(walls) / len(walls)
    out["overhead_ratio"] = out["masked-sum_round_s"] / out["none_round_s"]
    return out
