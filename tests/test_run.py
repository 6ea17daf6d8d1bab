"""`qfl run` end to end on the simulation engine, and its bad-input paths."""

import csv
import json

import numpy as np
from helpers import run_qfl

FIELDS = {
    "round", "accuracy", "loss", "uplink_bytes", "downlink_bytes", "bits_per_param_up",
    "key_bits_used", "clients", "dropped", "wall_s",
}


def test_qfl_run_writes_the_run_directory(tmp_path):
    out = tmp_path / "run"
    result = run_qfl(["run", "--out", str(out), "--set", "rounds=3", "--set", "clients=4", "--set", "codec=fp32",
                      "--set", "security=none", "--set", "alpha=0.5", "--set", "server_opt=fedavgm",
                      "--set", "server_lr=0.5"])
    assert result.returncode == 0, result.stdout[-4000:]
    for name in ("config.toml", "metrics.json", "summary.json", "checkpoint.npz", "run.log", "report.md", "metrics.csv",
                 "accuracy.png", "loss.png", "traffic.png", "key.png"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert all(f"({name})" in report for name in ("accuracy.png", "loss.png", "traffic.png", "key.png"))
    assert "qfl.server: round 3:" in (out / "run.log").read_text()
    history = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in history] == [1, 2, 3]
    num_params = json.loads((out / "summary.json").read_text())["num_params"]
    for r in history:
        assert FIELDS <= set(r)
        assert r["clients"] == 4 and r["dropped"] == 0 and r["key_bits_used"] == 0
        # fp32: 32 bits per parameter plus the wire header of each tensor
        assert 32.0 < r["bits_per_param_up"] < 32.1
        assert r["uplink_bytes"] == r["bits_per_param_up"] * num_params * 4 / 8
        assert np.isfinite(r["accuracy"]) and 0 <= r["accuracy"] <= 1
    assert history[-1]["accuracy"] > history[0]["accuracy"] or history[-1]["loss"] < history[0]["loss"]
    assert 'alpha = 0.5' in (out / "config.toml").read_text()
    assert "per-round results" in result.stdout
    assert [line for line in result.stdout.splitlines() if line.startswith("round=")][2].startswith("round=3 ")
    with (out / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["round"]) for r in rows] == [1, 2, 3]
    assert [float(r["accuracy"]) for r in rows] == [r["accuracy"] for r in history]


def test_unknown_key_fails_before_any_round(tmp_path):
    result = run_qfl(["run", "--out", str(tmp_path / "x"), "--set", "clinets=3"])
    assert result.returncode == 2
    assert "unknown config key 'clinets'" in result.stdout and "did you mean 'clients'" in result.stdout
    assert not (tmp_path / "x").exists()


def test_more_clients_than_samples_fails_before_any_round(tmp_path):
    result = run_qfl(["run", "--out", str(tmp_path / "x"), "--set", "clients=5000"])
    assert result.returncode == 2
    assert "clients=5000 exceeds the 1437 training samples" in result.stdout


def test_missing_dataset_names_the_path(tmp_path):
    result = run_qfl(["run", "--set", "dataset=mnist", "--set", f"data_dir='{tmp_path}'"])
    assert result.returncode == 2
    assert "MNIST not found" in result.stdout and str(tmp_path) in result.stdout


def test_topk_with_error_feedback_runs_end_to_end(tmp_path):
    out = tmp_path / "topk"
    result = run_qfl(["run", "--out", str(out), "--set", "rounds=3", "--set", "clients=4",
                      "--set", "codec=topk", "--set", "codec.ratio=0.02", "--set", "downlink_codec=fp16",
                      "--set", "security=none"])
    assert result.returncode == 0, result.stdout[-4000:]
    history = json.loads((out / "metrics.json").read_text())
    assert all(r["bits_per_param_up"] < 1.0 and r["dropped"] == 0 for r in history)
    fp16_model = history[0]["downlink_bytes"] / 4
    assert 2 * 38282 < fp16_model < 2 * 38282 + 200  # 16 bits per parameter plus headers
    assert history[-1]["accuracy"] > history[0]["accuracy"] or history[-1]["loss"] < history[0]["loss"]
