"""`qfl experiment compression`: accuracy against uplink bytes, one run per codec and seed.

Digits, 20 clients, Dirichlet α = 0.5, the same rounds and seeds for every
codec; fp32 is the baseline. Aggregation is plaintext (``security=none``):
this measures the codecs alone. With several seeds, an arm's accuracy is the
mean over seeds and its Δ is the mean of the paired differences to fp32 (a
seed fixes the partition, the initial model and the data order, so pairing
removes most of the seed-to-seed spread); ``delta_by_seed_pts`` keeps them.
One seed's accuracy on the 360-image test split moves by about a point.

Writes ``compression.md`` (table), ``compression.json`` (rows) and
``compression.png`` (accuracy against cumulative uplink bytes, seed-mean,
log scale) into the output directory, plus each run's own directory
``<arm>/seed-<s>``. Runs already finished there are read back rather than run
again, so an interrupted experiment continues where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qfl.config import resolve_config
from qfl.files import atomic_write_bytes, atomic_write_json

from .report import pyplot, save_png
from .runner import run_simulation_job

CLIENTS = 20

# (label, codec, codec params)
COMPRESSION_ARMS: list[tuple[str, str, dict[str, Any]]] = [
    ("fp32", "fp32", {}),
    ("fp16", "fp16", {}),
    ("qsgd-4bit", "qsgd", {"bits": 4}),
    ("qsgd-2bit", "qsgd", {"bits": 2}),
    ("qsgd-1bit", "qsgd", {"bits": 1}),
    ("ternary", "ternary", {}),
    ("ternary+zstd", "ternary", {"entropy": "zstd"}),
    ("sign+ef", "sign", {}),
    ("topk-10%+ef", "topk", {"ratio": 0.1}),
    ("topk-3%+ef", "topk", {"ratio": 0.03}),
    ("topk-1%+ef", "topk", {"ratio": 0.01}),
    ("randk-10%", "randk", {"ratio": 0.1}),
    ("powersgd-r2+ef", "powersgd", {"rank": 2}),
]


def _run(out: Path, label: str, codec: str, params: dict[str, Any], rounds: int, seed: int) -> Path:
    values: dict[str, Any] = {
        "clients": CLIENTS, "alpha": 0.5, "rounds": rounds, "codec": codec, "seed": seed, "security": "none",
    }
    values.update({f"codec.{k}": v for k, v in params.items()})
    run_dir = out / label / f"seed-{seed}"
    # a finished run is read back, not run again (a partial one resumes)
    run_simulation_job(resolve_config(values), run_dir, resume=(run_dir / "config.toml").exists())
    return run_dir


def run_compression_experiment(
    out: Path, rounds: int = 30, arms: list[str] | None = None, seeds: Sequence[int] = (0,)
) -> list[dict[str, Any]]:
    out = Path(out)
    seeds = list(seeds)
    if not seeds:
        raise ValueError("the compression experiment needs at least one seed")
    rows = []
    for label, codec, params in COMPRESSION_ARMS:
        if arms and label not in arms:
            continue
        summaries = [
            json.loads((_run(out, label, codec, params, rounds, seed) / "summary.json").read_text()) for seed in seeds
        ]
        uplink = sum(s["total_uplink_bytes"] for s in summaries) / len(seeds)
        rows.append(
            {
                "arm": label,
                "seeds": seeds,
                "accuracy_by_seed": [s["final_accuracy"] for s in summaries],
                "final_accuracy": sum(s["final_accuracy"] for s in summaries) / len(seeds),
                "best_accuracy": sum(s["best_accuracy"] for s in summaries) / len(seeds),
                "total_uplink_bytes": uplink,
                "bits_per_param_up": 8 * uplink / (summaries[0]["num_params"] * CLIENTS * rounds),
            }
        )
    base = next((r for r in rows if r["arm"] == "fp32"), None)
    for r in rows:
        r["uplink_reduction"] = base["total_uplink_bytes"] / r["total_uplink_bytes"] if base else None
        paired = [100 * (a - b) for a, b in zip(r["accuracy_by_seed"], base["accuracy_by_seed"])] if base else None
        r["delta_by_seed_pts"] = paired
        r["accuracy_delta_pts"] = sum(paired) / len(paired) if paired else None
    atomic_write_json(out / "compression.json", rows)
    atomic_write_bytes(out / "compression.md", (format_rows(rows) + "\n").encode())
    _plot(out, rows)
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    several = any(len(r["seeds"]) > 1 for r in rows)
    by_seed = " | Δ by seed (pts)" if several else ""
    lines = [
        "| codec | final acc | best acc | uplink bytes | bits/param | reduction vs fp32 | Δ acc (pts)" + by_seed + " |",
        "|---|---:|---:|---:|---:|---:|---:" + ("|---:" if several else "") + "|",
    ]
    for r in rows:
        red = "-" if r["uplink_reduction"] is None else f"{r['uplink_reduction']:.1f}×"
        delta = "-" if r["accuracy_delta_pts"] is None else f"{r['accuracy_delta_pts']:+.1f}"
        spread = ""
        if several:
            spread = " | " + ("-" if r["delta_by_seed_pts"] is None else " ".join(f"{d:+.1f}" for d in r["delta_by_seed_pts"]))
        lines.append(
            f"| {r['arm']} | {r['final_accuracy']:.4f} | {r['best_accuracy']:.4f} | {r['total_uplink_bytes']:,.0f} "
            f"| {r['bits_per_param_up']:.3f} | {red} | {delta}{spread} |"
        )
    return "\n".join(lines)


def _plot(out: Path, rows: list[dict[str, Any]]) -> None:
    plt = pyplot()
    histories = {}
    for r in rows:  # seed-mean accuracy and cumulative uplink bytes, round by round
        runs = [json.loads((out / r["arm"] / f"seed-{s}" / "metrics.json").read_text()) for s in r["seeds"]]
        cumulative, total, accuracy = [], 0.0, []
        for per_seed in zip(*runs):
            total += sum(m["uplink_bytes"] for m in per_seed) / len(per_seed)
            cumulative.append(total)
            accuracy.append(sum(m["accuracy"] for m in per_seed) / len(per_seed))
        histories[r["arm"]] = (cumulative, accuracy)
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    for arm, (xs, ys) in histories.items():
        ax.plot(xs, ys, marker=".", label=arm)
    ax.set_xscale("log")
    ax.set_xlabel("cumulative uplink bytes (all clients)")
    ax.set_ylabel("test accuracy" + (f" (mean of {len(rows[0]['seeds'])} seeds)" if len(rows[0]["seeds"]) > 1 else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, out / "compression.png")
