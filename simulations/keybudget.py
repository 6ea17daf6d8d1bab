"""`qfl experiment key-budget`: how far compression stretches QKD key under masked sums.

Digits, Dirichlet α = 0.5, ``security=masked-sum`` over a simulated QKD mesh
(every link ``distance_km`` long unless ``links`` says otherwise), once with 4
clients and once with 20. Each arm is a codec that commutes with sum; fp32
(32-bit fixed point) is the baseline. Per arm it records the accuracy (mean of
the last three rounds, to damp round-to-round noise), the key bits the pools
actually gave out (the store's ledger), the ring size B, and the rounds per
hour the network's key rate sustains: for every round, the slowest link's
``bits used / bits per second`` is the simulated time that round's key took to
make; rounds/hour = 3600 / its mean.

Writes ``key-budget.md`` (table), ``key-budget.json`` (rows) and
``key-budget.png`` (accuracy against key bits; rounds/hour per arm) into the
output directory, plus every run's own directory. Arms already finished in
the output directory are read back rather than run again, so an interrupted
experiment continues where it stopped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qfl.config import resolve_config
from qfl.files import atomic_write_bytes, atomic_write_json
from qfl.quantum.qkd.network import parse_link_spec, resolve_rate
from qfl.security.secagg import network_nodes

from .report import pyplot, save_png
from .runner import run_simulation_job

# (label, codec, codec params)
KEY_BUDGET_ARMS: list[tuple[str, str, dict[str, Any]]] = [
    ("fp32", "fp32", {}),
    ("qsgd-8bit", "qsgd", {"bits": 8}),
    ("qsgd-4bit", "qsgd", {"bits": 4}),
    ("qsgd-2bit", "qsgd", {"bits": 2}),
    ("ternary", "ternary", {}),
    ("randk-50%-8bit", "randk", {"ratio": 0.5, "bits": 8}),
    ("randk-25%-8bit", "randk", {"ratio": 0.25, "bits": 8}),
    ("randk-25%-4bit", "randk", {"ratio": 0.25, "bits": 4}),
    ("randk-10%-8bit", "randk", {"ratio": 0.1, "bits": 8}),
]
LAST_ROUNDS = 3


def _link_rates(cfg) -> dict[str, float]:
    nodes = network_nodes(cfg.clients)
    overrides = parse_link_spec(cfg.qkd_links, nodes)
    rates = {}
    for i, a in enumerate(nodes):
        for b in nodes[i + 1 :]:
            lo, hi = sorted((a, b))
            km = overrides.get((lo, hi), cfg.qkd_distance_km)
            rates[f"{lo}~{hi}"] = resolve_rate(cfg.qkd_rate or None, km)
    return rates


def run_key_budget_experiment(
    out: Path, rounds: int = 20, client_counts: tuple[int, ...] = (4, 20), distance_km: float = 10.0,
    links: str = "", arms: list[str] | None = None, seed: int = 0,
) -> list[dict[str, Any]]:
    out = Path(out)
    rows: list[dict[str, Any]] = []
    for clients in client_counts:
        group = []
        for label, codec, params in KEY_BUDGET_ARMS:
            if arms and label not in arms:
                continue
            values: dict[str, Any] = {
                "clients": clients, "alpha": 0.5, "rounds": rounds, "codec": codec, "seed": seed,
                "security": "masked-sum", "qkd_distance_km": distance_km, "qkd_links": links, "key_policy": "wait",
            }
            values.update({f"codec.{k}": v for k, v in params.items()})
            cfg = resolve_config(values)
            run_dir = out / f"{clients}-clients" / label
            # a finished arm is read back, not run again (a partial one resumes)
            summary = run_simulation_job(cfg, run_dir, resume=(run_dir / "config.toml").exists())
            history = json.loads((run_dir / "metrics.json").read_text())
            rates = _link_rates(cfg)
            seconds = [
                max((bits / rates[link] for link, bits in r["key_bits_by_link"].items() if rates.get(link)), default=0)
                for r in history
            ]
            tail = history[-LAST_ROUNDS:]
            group.append({
                "clients": clients,
                "arm": label,
                "accuracy": sum(r["accuracy"] for r in tail) / len(tail),
                "final_accuracy": summary["final_accuracy"],
                "key_bits_total": summary["total_key_bits_used"],
                "key_bits_per_round": summary["total_key_bits_used"] / len(history),
                "uplink_bytes_total": summary["total_uplink_bytes"],
                "rounds_per_hour": 3600 * len(seconds) / sum(seconds) if sum(seconds) else None,
                "dropped": summary["total_dropped"],
            })
        base = next((r for r in group if r["arm"] == "fp32"), None)
        for r in group:
            r["key_reduction"] = base["key_bits_total"] / r["key_bits_total"] if base else None
            r["accuracy_delta_pts"] = 100 * (r["accuracy"] - base["accuracy"]) if base else None
        rows += group
    atomic_write_json(out / "key-budget.json", rows)
    atomic_write_bytes(out / "key-budget.md", (format_key_rows(rows) + "\n").encode())
    _plot(out, rows)
    return rows


def format_key_rows(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| clients | codec | accuracy (last 3) | Δ acc (pts) | key bits / round | key reduction vs fp32 | rounds/hour |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        red = "-" if r["key_reduction"] is None else f"{r['key_reduction']:.1f}×"
        delta = "-" if r["accuracy_delta_pts"] is None else f"{r['accuracy_delta_pts']:+.1f}"
        rph = "-" if r["rounds_per_hour"] is None else f"{r['rounds_per_hour']:,.0f}"
        lines.append(
            f"| {r['clients']} | {r['arm']} | {r['accuracy']:.4f} | {delta} | {r['key_bits_per_round']:,.0f} "
            f"| {red} | {rph} |"
        )
    return "\n".join(lines)


def _plot(out: Path, rows: list[dict[str, Any]]) -> None:
    plt = pyplot()
    counts = sorted({r["clients"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for clients, style in zip(counts, ("-", "--", ":")):
        for r in (r for r in rows if r["clients"] == clients):
            metrics = json.loads((out / f"{clients}-clients" / r["arm"] / "metrics.json").read_text())
            xs, total = [], 0
            for m in metrics:
                total += m["key_bits_used"]
                xs.append(total)
            axes[0].plot(xs, [m["accuracy"] for m in metrics], style, marker=".", label=f"{r['arm']} (n={clients})")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("cumulative key bits (all links)")
    axes[0].set_ylabel("test accuracy")
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    labels = [f"{r['arm']}\nn={r['clients']}" for r in rows]
    axes[1].bar(range(len(rows)), [r["rounds_per_hour"] or 0 for r in rows])
    axes[1].set_xticks(range(len(rows)), labels, fontsize=5, rotation=90)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("rounds per hour the key rate sustains")
    axes[1].grid(alpha=0.3, axis="y")
    fig.tight_layout()
    save_png(fig, out / "key-budget.png")
