"""`qfl experiment streamsplit`: the negatives arms and the report's paired intervals (tiny budgets)."""

import numpy as np
import pytest

from qfl.simulations.stats import mean_ci95
from qfl.simulations.streamsplit import format_report, format_rows, negatives_comparison


def test_negatives_arms_see_fresh_windows_and_pair_with_in_batch_8():
    rows = negatives_comparison([0, 1], quick=True, steps=2)
    virtual, in_batch, large, shuffled = rows
    assert [r["batch"] for r in rows] == [8, 8, 256, 256]
    assert [r["shuffled"] for r in rows] == [False, False, False, True]
    assert [r["windows"] for r in rows] == [16, 16, 512, 512]  # every step its own windows: 2 × batch
    assert virtual["seeds"] == in_batch["seeds"] == [0, 1]
    assert large["seeds"] == shuffled["seeds"] == [0]  # quick: batch 256 on seed 0
    assert in_batch["delta_vs_in_batch_8_pts"] == 0.0
    paired = [100 * (a - b) for a, b in zip(virtual["accuracy_by_seed"], in_batch["accuracy_by_seed"])]
    assert virtual["delta_vs_in_batch_8_pts"] == pytest.approx(np.mean(paired))
    assert virtual["delta_vs_in_batch_8_ci95"] == pytest.approx(mean_ci95(paired)[1])
    assert all(0.0 <= a <= 1.0 for r in rows for a in r["accuracy_by_seed"])


def _method(name: str, acc: list[float], delta: list[float], bytes_per_hour: float) -> dict:
    mean, ci = mean_ci95(delta)
    return {
        "method": name, "seeds": [0, 1, 2], "linear_probe_accuracy": float(np.mean(acc)),
        "linear_probe_accuracy_ci95": mean_ci95(acc)[1], "accuracy_by_seed": acc, "accuracy_delta_pts": mean,
        "accuracy_delta_ci95": ci, "uplink_bytes_per_hour": bytes_per_hour, "uplink_reduction_pct": 0.0,
        "model_uplink_bytes_per_hour": 1.0, "latency_ms_per_window": 1.0, "energy_mj_per_window": 1.0,
        "split_hist": [1, 0],
    }


def test_report_states_the_paired_intervals_and_the_baseline_payload():
    base = _method("server-centric", [0.8, 0.9, 0.85], [0.0, 0.0, 0.0], 100.0)
    other = _method("edge-only", [0.78, 0.86, 0.85], [-2.0, -4.0, 0.0], 5.0)
    table = format_rows([base, other])
    assert "| +0.00 [+0.00, +0.00] |" in table  # the baseline against itself
    low, high = mean_ci95([-2.0, -4.0, 0.0])[1]
    assert f"| -2.00 [{low:+.2f}, {high:+.2f}] |" in table
    negatives = [{"negatives": "virtual, batch 8", "windows": 16, "steps": 2, "linear_probe_accuracy": 0.9,
                  "linear_probe_accuracy_ci95": [0.85, 0.95], "delta_vs_in_batch_8_pts": 1.0,
                  "delta_vs_in_batch_8_ci95": [-1.0, 3.0], "accuracy_by_seed": [0.9]}]
    ablations = [{"server_loss": "task only", "steps": 2, "linear_probe_accuracy": 0.8,
                  "linear_probe_accuracy_ci95": [0.8, 0.8], "accuracy_by_seed": [0.8]}]
    splitter = {"policies": {}, "cost_by_k": []}

    class Cfg:
        clients, rounds, edge_windows, edge_window_s, edge_codec, edge_codec_params = 3, 3, 64, 1.0, "qsgd", {"bits": 4}

    report = format_report([base, other], splitter, negatives, ablations, Cfg(), True, 1.0)
    assert "once per window" in report and "+1.00 [-1.00, +3.00]" in report and "2 steps" in report
