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

The topology table (:func:`topology_rows`, also written as
``key-budget-topology.md`` / ``.json``) asks what each QKD topology sustains
at n = 10, 100 and 1,000 clients a round: the digits CNN's masked round
(qsgd 4-bit, double masking over the default masking graph) is laid onto a
``mesh`` (a fibre per pair that masks together), a ``star`` (the server
relays) and ``trusted`` relays (``relays`` switches on a backbone mesh); every
pair key and client~server MAC key is charged to each hop of its path, and
the busiest link at the finite-key rate of ``distance_km`` sets the round's
key time: rounds/hour = 3600 / (busiest link's bits / rate). It also counts
the physical links the round uses and says who can read the pair keys.

Writes ``key-budget.md`` (table), ``key-budget.json`` (rows) and
``key-budget.png`` (accuracy against key bits; rounds/hour per arm) into the
output directory, plus every run's own directory. Arms already finished in
the output directory are read back rather than run again, so an interrupted
experiment continues where it stopped.
"""

from __future__ import annotations

import itertools
import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from qfl.config import resolve_config
from qfl.files import atomic_write_bytes, atomic_write_json
from qfl.quantum.qkd.network import QuantumNetwork, parse_link_spec, resolve_rate
from qfl.security.keys.store import KeyStore
from qfl.security.secagg import MAC_KEY_BYTES, SERVER_SAE, client_sae, make_plan, network_nodes

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
    topology = topology_rows(distance_km=distance_km)
    atomic_write_json(out / "key-budget-topology.json", topology)
    atomic_write_bytes(out / "key-budget-topology.md", (format_topology_rows(topology) + "\n").encode())
    atomic_write_json(out / "key-budget.json", rows)
    atomic_write_bytes(out / "key-budget.md", (format_key_rows(rows) + "\n").encode())
    _plot(out, rows)
    return rows


TOPOLOGY_TRUST = {
    "mesh": "the two clients only",
    "star": "the server too (it relays): masks not hidden from it",
    "trusted": "every relay on the path: hidden from the server unless one colludes",
}


def topology_rows(
    ns: tuple[int, ...] = (10, 100, 1000), relays: int = 4, distance_km: float = 10.0, bits: int = 4,
) -> list[dict[str, Any]]:
    """Rounds per hour each QKD topology sustains for one masked round of ``n`` clients (module docstring)."""
    from qfl.clients.models import build_model, get_weights

    shapes = {k: tuple(v.shape) for k, v in get_weights(build_model("cnn", (1, 8, 8), 10, seed=0)).items()}
    rate = resolve_rate(None, distance_km)
    rows = []
    for n in ns:
        cfg = resolve_config({"clients": n, "security": "masked-sum", "codec": "qsgd", "codec.bits": bits})
        plan = make_plan(cfg, 1, list(range(n)), shapes, {k: 0.25 for k in shapes}, round_seed=1)
        pair_bits, server_bits = 8 * plan.pair_key_bytes(), 2 * 8 * MAC_KEY_BYTES
        demands = [(client_sae(i), SERVER_SAE, server_bits) for i in range(n)]
        demands += [(client_sae(i), client_sae(j), pair_bits) for i in range(n) for j in plan.peers(i) if i < j]
        for topology in ("mesh", "star", "trusted"):
            with tempfile.TemporaryDirectory() as tmp:
                net = QuantumNetwork.build(
                    KeyStore(Path(tmp) / "keys.db"), network_nodes(n), topology, lazy=True,
                    hub=SERVER_SAE if topology == "star" else None, relays=relays if topology == "trusted" else 0,
                )
                load: Counter[frozenset[str]] = Counter()
                for a, b, need in demands:
                    for hop in itertools.pairwise(net.path(a, b)):
                        load[frozenset(hop)] += need
            busiest = max(load.values())
            rows.append({
                "clients": n, "topology": topology, "relays": relays if topology == "trusted" else 0,
                "mask_degree": plan.mask_degree(), "pair_key_bits": pair_bits, "physical_links": len(load),
                "busiest_link_bits": busiest, "key_s_per_round": busiest / rate,
                "rounds_per_hour": 3600 * rate / busiest, "pair_keys_readable_by": TOPOLOGY_TRUST[topology],
            })
    return rows


def format_topology_rows(rows: list[dict[str, Any]]) -> str:
    lines = ["| clients | topology | peers | physical links | busiest link (bits/round) | rounds/hour | pair keys readable by |",
             "|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        name = r["topology"] + (f" ({r['relays']} relays)" if r["relays"] else "")
        lines.append(f"| {r['clients']:,} | {name} | {r['mask_degree']:.0f} | {r['physical_links']:,} | "
                     f"{r['busiest_link_bits']:,.0f} | {r['rounds_per_hour']:,.2f} | {r['pair_keys_readable_by']} |")
    return "\n".join(lines)


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
