"""`qfl experiment compression` runs every kind of codec, the ones a masked sum refuses included."""

import json

from qfl.simulations.experiments import COMPRESSION_ARMS, run_compression_experiment


def test_compression_experiment_writes_table_json_and_plot(tmp_path):
    # topk + error feedback does not commute with a sum: the experiment must run it in plaintext
    rows = run_compression_experiment(tmp_path, rounds=1, arms=["fp32", "topk-1%+ef"], seeds=[0])
    assert [r["arm"] for r in rows] == ["fp32", "topk-1%+ef"]
    fp32, topk = rows
    assert fp32["uplink_reduction"] == 1.0 and fp32["delta_by_seed_pts"] == [0.0]
    assert topk["seeds"] == [0] and len(topk["accuracy_by_seed"]) == 1
    assert topk["final_accuracy"] == topk["accuracy_by_seed"][0]
    paired = [100 * (topk["accuracy_by_seed"][0] - fp32["accuracy_by_seed"][0])]
    assert topk["delta_by_seed_pts"] == paired and topk["accuracy_delta_pts"] == paired[0]
    assert 31.9 < fp32["bits_per_param_up"] < 32.1
    assert topk["uplink_reduction"] > 50 and topk["bits_per_param_up"] < 0.5
    assert json.loads((tmp_path / "compression.json").read_text()) == rows
    assert "| topk-1%+ef |" in (tmp_path / "compression.md").read_text()
    assert (tmp_path / "compression.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tmp_path / "topk-1%+ef" / "seed-0" / "summary.json").read_text())
    assert summary["security"] == "none"
    # finished runs are read back, not run again
    mtime = (tmp_path / "fp32" / "seed-0" / "metrics.json").stat().st_mtime_ns
    assert run_compression_experiment(tmp_path, rounds=1, arms=["fp32", "topk-1%+ef"], seeds=[0]) == rows
    assert (tmp_path / "fp32" / "seed-0" / "metrics.json").stat().st_mtime_ns == mtime


def test_every_arm_label_is_unique():
    labels = [arm.label for arm in COMPRESSION_ARMS]
    assert len(labels) == len(set(labels))


def test_the_shipped_100x_config_is_the_experiment_arm_at_60_rounds():
    from qfl.config import load_config_file, resolve_config
    from qfl.simulations.experiments import CLIENTS

    shipped = resolve_config(load_config_file("simulations/configs/compression-100x.toml"))
    (arm,) = [a for a in COMPRESSION_ARMS if a.label == "stc-3%+dgc+down-stc-3%"]
    values = {"clients": CLIENTS, "alpha": 0.5, "rounds": 60, "codec": arm.codec, "seed": 0, "security": "none",
              **{f"codec.{k}": v for k, v in arm.params.items()}, **arm.downlink}
    assert resolve_config(values) == shipped


def test_the_table_shows_each_seeds_paired_delta_when_there_are_several():
    from qfl.simulations.experiments import format_rows

    row = {"arm": "stc-3%", "seeds": [0, 1], "final_accuracy": 0.9, "best_accuracy": 0.92, "total_uplink_bytes": 10.0,
           "total_downlink_bytes": 20.0, "bits_per_param_up": 0.2, "bits_per_param_down": 0.3,
           "uplink_reduction": 100.0, "downlink_reduction": 50.0, "total_reduction": 66.7,
           "accuracy_delta_pts": -1.5, "accuracy_delta_ci95": [-7.85, 4.85], "delta_by_seed_pts": [-1.0, -2.0]}
    table = format_rows([row]).splitlines()
    assert table[0].endswith("| Δ acc (pts) | 95% CI (pts, paired) | Δ by seed (pts) |")
    assert table[2].endswith("| 100.0× | 50.0× | 66.7× | -1.5 | [-7.8, +4.8] | -1.0 -2.0 |")
    assert "by seed" not in format_rows([{**row, "seeds": [0]}])
