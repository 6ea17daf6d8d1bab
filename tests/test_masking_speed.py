"""Speed guards for the fused masking steps (generous: the figures come from ``qfl bench secagg``).

``qfl bench secagg --rounds 0`` reports the client's ``masked_pack`` and the
server's ``add_packed`` as ratios to a numpy copy of ``2^24`` float32; these
tests only check that the benchmark reports its fields and that the fused
steps stay well ahead of the separate functions they replace.
"""

import os

import numpy as np
import pytest

from qfl.benchmarks.secagg import bench_masking
from qfl.benchmarks.timing import best_of
from qfl.security.primitives.masking import (
    add_packed,
    aggregate,
    apply_masks,
    key_bytes_needed,
    mask_from_key,
    masked_pack,
    pack_ring,
    unpack_ring,
)


def _best(fn):
    return best_of(fn, 5)[0]


def test_bench_masking_reports_its_fields():
    rows = bench_masking(d=1 << 12, ring_bits=(9, 37), repeat=1)
    assert [r["ring_bits"] for r in rows] == [9, 37]
    for r in rows:
        assert r["elements"] == 1 << 12
        for field in ("mask_ratio", "unmask_ratio", "mask_plus_unmask_ratio", "mask_gbps", "unmask_gbps",
                      "bytes_ratio", "composed_mask_ratio", "composed_unmask_ratio"):
            assert r[field] > 0
        assert r["mask_plus_unmask_ratio"] == pytest.approx(r["mask_ratio"] + r["unmask_ratio"])


@pytest.mark.parametrize("B", [12, 37])
def test_fused_steps_beat_the_separate_functions(B):
    d = 1 << 21
    rng = np.random.default_rng(B)
    q = rng.integers(0, 1 << B, d, dtype=np.uint64)
    key = os.urandom(key_bytes_needed(d, B))
    upload = masked_pack(q, 0, {1: key}, B)
    total = q.copy()
    fused = _best(lambda: masked_pack(q, 0, {1: key}, B)) + _best(lambda: add_packed(total, upload, B))
    separate = _best(lambda: pack_ring(apply_masks(q, 0, {1: mask_from_key(key, d, B)}, B), B)) + _best(
        lambda: aggregate([q, unpack_ring(upload, B, d)], B)
    )
    assert fused < separate  # about 2x to 3x ahead where measured
