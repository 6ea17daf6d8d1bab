"""`qfl experiment compression`: accuracy against bytes, one run per codec and seed.

Digits, 20 clients, Dirichlet α = 0.5, the same rounds and seeds for every
codec; fp32 is the baseline. Aggregation is plaintext (``security=none``):
this measures the codecs alone. With several seeds, an arm's accuracy is the
mean over seeds and its Δ is the mean of the paired differences to fp32 (a
seed fixes the partition, the initial model and the data order, so pairing
removes most of the seed-to-seed spread); ``delta_by_seed_pts`` keeps them.
One seed's accuracy on the 360-image test split moves by about a point.

Each arm names the uplink codec and, for the two-way arms, a downlink: by
default the server sends the fp32 model; ``downlink_mode = "delta"`` arms send
the compressed change against the clients' replica (``qfl.compression.downlink``).
Reductions are fp32's bytes over the arm's, per direction and in total (uplink
plus downlink, train messages; the fp32 arm's downlink is the fp32 model to
every sampled client, as its uplink is an fp32 Δ from each).

Writes ``compression.md`` (table), ``compression.json`` (rows) and
``compression.png`` (the frontier: final accuracy against total bytes, one
point per arm, and accuracy against cumulative total bytes round by round;
seed means, log scale) into the output directory, plus each run's own
directory ``<arm>/seed-<s>``. Runs already finished there are read back rather
than run again, so an interrupted experiment continues where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qfl.config import resolve_config
from qfl.files import atomic_write_bytes, atomic_write_json

from .report import pyplot, save_png
from .runner import run_simulation_job
from .stats import mean_ci95

CLIENTS = 20


@dataclass(frozen=True)
class Arm:
    """One arm: the uplink codec and its parameters, and config values for the downlink (default: fp32 model).

    Two-way labels read ``<uplink>+down-<downlink>``."""

    label: str
    codec: str
    params: dict[str, Any] = field(default_factory=dict)
    downlink: dict[str, Any] = field(default_factory=dict)


def _delta_down(codec: str, **params: Any) -> dict[str, Any]:
    """Config values of a compressed downlink: the model's change against the clients' replica."""
    return {"downlink_mode": "delta", "downlink_codec": codec, **{f"downlink_codec.{k}": v for k, v in params.items()}}


# DGC's techniques on top of error feedback (qfl.compression.feedback.DgcOptions)
DGC = {"momentum": 0.5, "momentum_masking": True, "warmup_rounds": 4, "warmup_start": 0.1}

COMPRESSION_ARMS: list[Arm] = [
    Arm("fp32", "fp32"),
    Arm("fp16", "fp16"),
    Arm("qsgd-4bit", "qsgd", {"bits": 4}),
    Arm("qsgd-2bit", "qsgd", {"bits": 2}),
    Arm("qsgd-1bit", "qsgd", {"bits": 1}),
    Arm("ternary", "ternary"),
    Arm("ternary+zstd", "ternary", {"entropy": "zstd"}),
    Arm("sign+ef", "sign"),
    Arm("topk-10%+ef", "topk", {"ratio": 0.1}),
    Arm("topk-3%+ef", "topk", {"ratio": 0.03}),
    Arm("topk-1%+ef", "topk", {"ratio": 0.01}),
    Arm("randk-10%", "randk", {"ratio": 0.1}),
    Arm("powersgd-r2+ef", "powersgd", {"rank": 2}),
    # two-way arms: STC (Sattler et al. 2019) up, and a compressed model delta down
    Arm("stc-3%+ef", "stc", {"ratio": 0.03}),
    Arm("stc-3%+down-stc-3%", "stc", {"ratio": 0.03}, _delta_down("stc", ratio=0.03)),
    Arm("stc-1%+down-stc-1%", "stc", {"ratio": 0.01}, _delta_down("stc", ratio=0.01)),
    Arm("stc-3%+dgc+down-stc-3%", "stc", {"ratio": 0.03, **DGC}, _delta_down("stc", ratio=0.03)),
    Arm("topk-3%+dgc+down-stc-3%", "topk", {"ratio": 0.03, **DGC}, _delta_down("stc", ratio=0.03)),
    Arm("stc-5%+down-stc-5%", "stc", {"ratio": 0.05}, _delta_down("stc", ratio=0.05)),
    # toward the uplink-alone stretch (≥ 300×): a sparser uplink under the shipped STC-3% downlink
    Arm("stc-1%+down-stc-3%", "stc", {"ratio": 0.01}, _delta_down("stc", ratio=0.03)),
    Arm("stc-2%+down-stc-3%", "stc", {"ratio": 0.02}, _delta_down("stc", ratio=0.03)),
    # asymmetric splits, denser up and sparser down: all below stc-3%+down-stc-3% over 3 seeds (README)
    Arm("stc-4%+down-stc-2%", "stc", {"ratio": 0.04}, _delta_down("stc", ratio=0.02)),
    Arm("stc-5%+down-stc-2%", "stc", {"ratio": 0.05}, _delta_down("stc", ratio=0.02)),
    Arm("stc-5%+down-stc-1.5%", "stc", {"ratio": 0.05}, _delta_down("stc", ratio=0.015)),
]


def _run(out: Path, arm: Arm, rounds: int, seed: int) -> Path:
    values: dict[str, Any] = {
        "clients": CLIENTS, "alpha": 0.5, "rounds": rounds, "codec": arm.codec, "seed": seed, "security": "none",
    }
    values.update({f"codec.{k}": v for k, v in arm.params.items()})
    values.update(arm.downlink)
    run_dir = out / arm.label / f"seed-{seed}"
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
    for arm in COMPRESSION_ARMS:
        if arms and arm.label not in arms:
            continue
        summaries = [json.loads((_run(out, arm, rounds, seed) / "summary.json").read_text()) for seed in seeds]
        uplink = sum(s["total_uplink_bytes"] for s in summaries) / len(seeds)
        downlink = sum(s["total_downlink_bytes"] for s in summaries) / len(seeds)
        rows.append(
            {
                "arm": arm.label,
                "two_way": bool(arm.downlink),
                "seeds": seeds,
                "accuracy_by_seed": [s["final_accuracy"] for s in summaries],
                "final_accuracy": sum(s["final_accuracy"] for s in summaries) / len(seeds),
                "best_accuracy": sum(s["best_accuracy"] for s in summaries) / len(seeds),
                "total_uplink_bytes": uplink,
                "total_downlink_bytes": downlink,
                "total_bytes": uplink + downlink,
                "bits_per_param_up": 8 * uplink / (summaries[0]["num_params"] * CLIENTS * rounds),
                "bits_per_param_down": 8 * downlink / (summaries[0]["num_params"] * CLIENTS * rounds),
            }
        )
    base = next((r for r in rows if r["arm"] == "fp32"), None)
    for r in rows:
        r["uplink_reduction"] = base["total_uplink_bytes"] / r["total_uplink_bytes"] if base else None
        r["downlink_reduction"] = base["total_downlink_bytes"] / r["total_downlink_bytes"] if base else None
        r["total_reduction"] = base["total_bytes"] / r["total_bytes"] if base else None
        paired = [100 * (a - b) for a, b in zip(r["accuracy_by_seed"], base["accuracy_by_seed"])] if base else None
        r["delta_by_seed_pts"] = paired
        r["accuracy_delta_pts"] = sum(paired) / len(paired) if paired else None
        r["accuracy_delta_ci95"] = mean_ci95(paired)[1] if paired else None
    atomic_write_json(out / "compression.json", rows)
    atomic_write_bytes(out / "compression.md", (format_rows(rows) + "\n").encode())
    _plot(out, rows)
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    several = any(len(r["seeds"]) > 1 for r in rows)
    by_seed = " | 95% CI (pts, paired) | Δ by seed (pts)" if several else ""

    def times(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}×"

    lines = [
        "| codec (up/down) | final acc | best acc | uplink bytes | downlink bytes | bits/param up | bits/param down "
        "| up × | down × | total × | Δ acc (pts)" + by_seed + " |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:" + ("|---:|---:" if several else "") + "|",
    ]
    for r in rows:
        delta = "-" if r["accuracy_delta_pts"] is None else f"{r['accuracy_delta_pts']:+.1f}"
        spread = ""
        if several:
            ci = r.get("accuracy_delta_ci95")
            spread = " | " + ("-" if ci is None else f"[{ci[0]:+.1f}, {ci[1]:+.1f}]")
            spread += " | " + ("-" if r["delta_by_seed_pts"] is None else " ".join(f"{d:+.1f}" for d in r["delta_by_seed_pts"]))
        lines.append(
            f"| {r['arm']} | {r['final_accuracy']:.4f} | {r['best_accuracy']:.4f} | {r['total_uplink_bytes']:,.0f} "
            f"| {r['total_downlink_bytes']:,.0f} | {r['bits_per_param_up']:.3f} | {r['bits_per_param_down']:.3f} "
            f"| {times(r['uplink_reduction'])} | {times(r['downlink_reduction'])} | {times(r['total_reduction'])} "
            f"| {delta}{spread} |"
        )
    return "\n".join(lines)


def _plot(out: Path, rows: list[dict[str, Any]]) -> None:
    """Left: the frontier (seed-mean final accuracy against total bytes, one point per arm).
    Right: seed-mean accuracy against cumulative total bytes, round by round."""
    plt = pyplot()
    fig, (front, curves) = plt.subplots(1, 2, figsize=(13, 5), dpi=110)
    markers = "os^vD<>pXh*P"
    for i, r in enumerate(rows):
        runs = [json.loads((out / r["arm"] / f"seed-{s}" / "metrics.json").read_text()) for s in r["seeds"]]
        cumulative, total, accuracy = [], 0.0, []
        for per_seed in zip(*runs):
            total += sum(m["uplink_bytes"] + m["downlink_bytes"] for m in per_seed) / len(per_seed)
            cumulative.append(total)
            accuracy.append(sum(m["accuracy"] for m in per_seed) / len(per_seed))
        two_way = r["two_way"]
        marker = markers[i % len(markers)]
        front.scatter(r["total_bytes"], r["final_accuracy"], marker=marker, s=60 if two_way else 40,
                      edgecolors="black" if two_way else "none", label=r["arm"])
        front.annotate(r["arm"], (r["total_bytes"], r["final_accuracy"]), fontsize=6, xytext=(4, 3),
                       textcoords="offset points")
        curves.plot(cumulative, accuracy, marker=marker, markersize=3, label=r["arm"], linestyle="-" if two_way else ":")
    base = next((r for r in rows if r["arm"] == "fp32"), None)
    if base is not None:
        front.axhline(base["final_accuracy"] - 0.01, color="grey", linestyle="--", linewidth=0.8)
        front.axvline(base["total_bytes"] / 100, color="grey", linestyle=":", linewidth=0.8)
        front.text(0.01, base["final_accuracy"] - 0.01, "fp32 − 1 pt", fontsize=7, color="grey", va="bottom",
                   transform=front.get_yaxis_transform())
        front.text(base["total_bytes"] / 100, 0.01, "100× less than fp32", fontsize=7, color="grey", rotation=90,
                   va="bottom", transform=front.get_xaxis_transform())
    seeds = len(rows[0]["seeds"])
    suffix = f" (mean of {seeds} seeds)" if seeds > 1 else ""
    for ax in (front, curves):
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    front.set_xlabel("total bytes, uplink + downlink (all clients, all rounds)")
    front.set_ylabel("final test accuracy" + suffix)
    front.set_title("frontier: accuracy against total bytes (ringed: compressed downlink)", fontsize=9)
    curves.set_xlabel("cumulative bytes, uplink + downlink")
    curves.set_ylabel("test accuracy" + suffix)
    curves.set_title("round by round (dotted: fp32 downlink)", fontsize=9)
    curves.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    save_png(fig, out / "compression.png")
