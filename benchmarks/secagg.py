"""Secure-aggregation benchmarks: masking throughput and the round-time overhead.

``bench_masking``: one upload of ``d`` ring elements of ``B`` bits.
*mask* = read the mask from key bytes (``mask_from_key``), add it
(``apply_masks``) and pack at B bits (``pack_ring``); *unmask* = unpack the
upload and add it into the running sum (``aggregate``). Each is reported as a
ratio to ``numpy.copyto`` of a float32 array of ``d`` elements, timed in the
same run (best of ``repeat``), so the figure holds on a noisy machine.

``bench_round_overhead``: the same short federation (digits, fp32 or another
codec) with ``security=none`` and with ``security=masked-sum``; the mean wall
time of rounds 2.. (round 1 includes starting Ray) and their ratio.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from qfl.security.masking import aggregate, apply_masks, key_bytes_needed, mask_from_key, pack_ring, unpack_ring


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_masking(d: int = 1 << 24, ring_bits: tuple[int, ...] = (8, 16, 34, 37), repeat: int = 3) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    src = rng.standard_normal(d).astype(np.float32)
    dst = np.empty_like(src)
    copy = _best(lambda: np.copyto(dst, src), repeat)
    rows = []
    for B in ring_bits:
        q = rng.integers(0, 1 << B, d, dtype=np.uint64)
        key = os.urandom(key_bytes_needed(d, B))
        packed = {}

        def mask() -> None:
            packed["y"] = pack_ring(apply_masks(q, 0, {1: mask_from_key(key, d, B)}, B), B)

        total = {}

        def unmask() -> None:
            y = unpack_ring(packed["y"], B, d)
            total["s"] = aggregate([q, y], B)

        t_mask = _best(mask, repeat)
        t_unmask = _best(unmask, repeat)
        rows.append({
            "ring_bits": B, "elements": d, "mask_ratio": t_mask / copy, "unmask_ratio": t_unmask / copy,
            "mask_plus_unmask_ratio": (t_mask + t_unmask) / copy,
            "mask_gbps": d * B / 8 / t_mask / 1e9, "unmask_gbps": d * B / 8 / t_unmask / 1e9,
        })
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
