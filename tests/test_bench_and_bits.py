"""Bits are counted from real bytes; the codec benchmark reports every codec."""

import numpy as np
import pytest

from qfl.benchmarks.codecs import BENCH_CODECS, bench_codecs, format_table
from qfl.clients.models import build_model, get_weights
from qfl.compression import encode_update, make_codec, payload_bytes


def _cnn_weights():
    return get_weights(build_model("cnn", (1, 8, 8), 10, seed=0))


@pytest.mark.parametrize(
    "name, params, limit",
    [
        ("sign", {}, 1.1),
        ("qsgd", {"bits": 1}, 1.1),
        ("ternary", {}, 2.1),
        ("qsgd", {"bits": 4}, 4.1),
        ("topk", {"ratio": 0.01}, 0.5),
        ("fp32", {}, 32.1),
    ],
)
def test_bits_per_param_on_the_digits_cnn_include_headers(name, params, limit):
    weights = _cnn_weights()
    d = sum(v.size for v in weights.values())
    record = encode_update(weights, make_codec(name, params, seed=0), round_seed=1, states={})
    bits = 8 * payload_bytes(record) / d
    assert bits <= limit, f"{name}: {bits:.3f} bits/param"


def test_bench_reports_every_codec_with_the_documented_fields():
    rows = bench_codecs(size=4096 * 4, repeats=1)
    assert [r["codec"] for r in rows] == [label for label, _, _ in BENCH_CODECS]
    for r in rows:
        assert {"codec", "bits_per_param", "encode_ratio", "decode_ratio", "encode_gbps", "decode_gbps"} <= set(r)
        assert r["encode_ratio"] > 0 and r["decode_gbps"] > 0 and np.isfinite(r["bits_per_param"])
        assert r["threads"] == 1  # too small to split: every codec on the calling thread
    assert "| sign |" in format_table(rows) and "numpy.copyto on one thread" in format_table(rows)
    with pytest.raises(ValueError):  # sizes are multiples of 4096
        bench_codecs(size=1000)


def test_bench_cli_json(capsys):
    import json

    from qfl.cli import main

    assert main(["bench", "codecs", "--size", "8192", "--repeats", "1", "--codec", "sign", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["codec"] for r in rows] == ["sign", "sign+ef"]


def test_bench_reports_threads_and_single_thread_figures():
    rows = bench_codecs(size=1 << 20, repeats=1, only=["qsgd-1bit", "sign"], threads=2)
    by = {r["codec"]: r for r in rows}
    assert by["qsgd-1bit"]["threads"] == 2 and by["qsgd-1bit"]["encode_ratio_1thread"] > 0
    assert by["sign"]["threads"] == 1 and "encode_ratio_1thread" not in by["sign"]
    lines = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in format_table(rows).splitlines()[2:-1]}
    assert lines["qsgd-1bit"][1].strip() == "2" and lines["qsgd-1bit"][-1].strip() != "="
    assert lines["sign"][1].strip() == "1" and lines["sign"][-1].strip() == "="


def test_scale_bench_measures_each_arm_and_plans_what_is_too_large(capsys):
    """A tiny run of `qfl bench scale`: none, full and sparse at n = 12 (degree 4 forced); full at
    n = 12 is measured, and with a key cap of zero the masked arms are planned from the plan instead."""
    import json

    from qfl.benchmarks.scale import bench_scale
    from qfl.cli import main

    rows = bench_scale(ns=(12,), params=200, dropout=0.1, degree=4, corrupt=0.0)
    by_arm = {r["arm"]: r for r in rows}
    assert set(by_arm) == {"none", "full", "sparse"} and all(r["measured"] for r in rows)
    assert by_arm["full"]["mask_degree"] == 11 and by_arm["sparse"]["mask_degree"] == 4
    assert by_arm["sparse"]["key_bits_per_client"] < by_arm["full"]["key_bits_per_client"]
    assert by_arm["sparse"]["round_s_ratio"] > 0 and by_arm["full"]["uplink_bytes_per_client_ratio"] > 1
    # the ledger's key per client is what the plan says it costs
    planned = bench_scale(ns=(12,), params=200, dropout=0.1, degree=4, corrupt=0.0, max_key_gb=0.0)
    for arm in ("full", "sparse"):
        (row,) = [r for r in planned if r["arm"] == arm]
        assert not row["measured"] and row["round_s"] is None
        assert row["key_bits_per_client"] == pytest.approx(by_arm[arm]["key_bits_per_client"])
    assert main(["bench", "scale", "--n", "6", "--params", "100", "--json"]) == 0
    assert {r["arm"] for r in json.loads(capsys.readouterr().out)} == {"none", "full", "sparse"}
