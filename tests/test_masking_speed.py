"""The masking benchmark reports its fields (the figures themselves come from ``qfl bench secagg``).

``qfl bench secagg --rounds 0`` reports the client's ``masked_pack`` and the
server's ``add_packed`` as ratios to a numpy copy of ``2^24`` float32; speed
is measured there, not asserted here.
"""

import pytest

from qfl.benchmarks.secagg import bench_masking


def test_bench_masking_reports_its_fields():
    rows = bench_masking(d=1 << 12, ring_bits=(9, 37), repeat=1)
    assert [r["ring_bits"] for r in rows] == [9, 37]
    for r in rows:
        assert r["elements"] == 1 << 12
        for field in ("mask_ratio", "unmask_ratio", "mask_plus_unmask_ratio", "mask_gbps", "unmask_gbps",
                      "bytes_ratio"):
            assert r[field] > 0
        assert r["mask_plus_unmask_ratio"] == pytest.approx(r["mask_ratio"] + r["unmask_ratio"])
