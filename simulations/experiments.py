"""`qfl experiment compression`: accuracy against uplink bytes, one run per codec.

Digits, 20 clients, Dirichlet α = 0.5, the same rounds and seed for every
codec; fp32 is the baseline. Writes ``compression.md`` (table),
``compression.json`` (rows) and ``compression.png`` (final accuracy against
total uplink bytes, log scale) into the output directory, plus each codec's
own run directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qfl.config import resolve_config
from qfl.files import atomic_write_bytes, atomic_write_json

from .runner import run_simulation_job

# (label, codec, codec params)
COMPRESSION_ARMS: list[tuple[str, str, dict[str, Any]]] = [
    ("fp32", "fp32", {}),
    ("fp16", "fp16", {}),
    ("qsgd-4bit", "qsgd", {"bits": 4}),
    ("qsgd-2bit", "qsgd", {"bits": 2}),
    ("qsgd-1bit", "qsgd", {"bits": 1}),
    ("ternary", "ternary", {}),
    ("sign+ef", "sign", {}),
    ("topk-3%+ef", "topk", {"ratio": 0.03}),
    ("topk-1%+ef", "topk", {"ratio": 0.01}),
    ("randk-10%", "randk", {"ratio": 0.1}),
    ("powersgd-r2+ef", "powersgd", {"rank": 2}),
]


def run_compression_experiment(out: Path, rounds: int = 30, arms: list[str] | None = None) -> list[dict[str, Any]]:
    out = Path(out)
    rows = []
    for label, codec, params in COMPRESSION_ARMS:
        if arms and label not in arms:
            continue
        # Plaintext aggregation: this experiment measures the codecs alone, and most
        # of them (topk, sign, powersgd, fp16) do not commute with a masked sum.
        values: dict[str, Any] = {
            "clients": 20, "alpha": 0.5, "rounds": rounds, "codec": codec, "seed": 0, "security": "none"
        }
        values.update({f"codec.{k}": v for k, v in params.items()})
        summary = run_simulation_job(resolve_config(values), out / label)
        rows.append(
            {
                "arm": label,
                "final_accuracy": summary["final_accuracy"],
                "best_accuracy": summary["best_accuracy"],
                "total_uplink_bytes": summary["total_uplink_bytes"],
                "bits_per_param_up": 8 * summary["total_uplink_bytes"] / (summary["num_params"] * 20 * rounds),
            }
        )
    base = next((r for r in rows if r["arm"] == "fp32"), None)
    for r in rows:
        r["uplink_reduction"] = base["total_uplink_bytes"] / r["total_uplink_bytes"] if base else None
        r["accuracy_delta_pts"] = 100 * (r["final_accuracy"] - base["final_accuracy"]) if base else None
    atomic_write_json(out / "compression.json", rows)
    atomic_write_bytes(out / "compression.md", (format_rows(rows) + "\n").encode())
    _plot(out / "compression.png", rows)
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| codec | final acc | best acc | uplink bytes | bits/param | reduction vs fp32 | Δ acc (pts) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        red = "-" if r["uplink_reduction"] is None else f"{r['uplink_reduction']:.1f}×"
        delta = "-" if r["accuracy_delta_pts"] is None else f"{r['accuracy_delta_pts']:+.1f}"
        lines.append(
            f"| {r['arm']} | {r['final_accuracy']:.4f} | {r['best_accuracy']:.4f} | {r['total_uplink_bytes']:,} "
            f"| {r['bits_per_param_up']:.3f} | {red} | {delta} |"
        )
    return "\n".join(lines)


def _plot(path: Path, rows: list[dict[str, Any]]) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    histories = {}
    for r in rows:
        metrics = json.loads((path.parent / r["arm"] / "metrics.json").read_text())
        cumulative, total = [], 0
        for m in metrics:
            total += m["uplink_bytes"]
            cumulative.append(total)
        histories[r["arm"]] = (cumulative, [m["accuracy"] for m in metrics])
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    for arm, (xs, ys) in histories.items():
        ax.plot(xs, ys, marker=".", label=arm)
    ax.set_xscale("log")
    ax.set_xlabel("cumulative uplink bytes (all clients)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
