"""How one round's aggregation scales with the number of clients: ``qfl bench scale``.

For each ``n`` and each arm — ``none`` (every client encodes its update with
the codec, the server decodes and sums), ``full`` and ``sparse`` masked-sum
(double masking over the full or the sparse masking graph,
:mod:`qfl.security.graph`) — one round runs in this process, single-threaded,
through the same code a real round runs: the server's :class:`KeyBudget` over
a lazy QKD mesh and its SQLite store, every client's pair-key takes and
fetches, masked uploads with sealed self-mask shares, a ``dropout`` share of
clients that took keys and never uploaded, the unmask requests and answers,
and the decoded sum. Local training is left out: it is the same in every arm.

Reported per arm: the round's wall time, the peak of traced allocations
(Python and numpy, :mod:`tracemalloc`), key bits per client (pair keys at both
ends plus the client~server MAC keys; the ledger's figure), uplink bytes per
client (upload plus shares) and the mean number of masking peers, each also as
a ratio to the ``none`` arm of the same ``n`` measured in the same run. An arm
whose pair keys would exceed ``max_key_gb`` is not run; its key and uplink
figures are computed from the plan instead (``measured: false``).
"""

from __future__ import annotations

import tempfile
import time
import tracemalloc
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from qfl.compression import decode_update, encode_update, make_codec
from qfl.config import resolve_config
from qfl.security import secagg as sa
from qfl.server.key_budget import KeyBudget

ARMS = ("none", "full", "sparse")


def _deltas(n: int, shapes: dict[str, tuple[int, ...]]) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{k: rng.normal(0, 0.05, s).astype(np.float32) for k, s in shapes.items()} for _ in range(n)]


def _none_round(n: int, shapes: dict[str, tuple[int, ...]], codec_name: str) -> dict[str, Any]:
    codec = make_codec(codec_name)
    total = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    uplink = 0
    for delta in _deltas(n, shapes):
        record = encode_update(delta, codec, round_seed=1)
        uplink += sum(len(a.data) for a in record.values())
        for k, v in decode_update(record, codec, shapes).items():
            total[k] += v
    return {"uplink_bytes_per_client": uplink / n, "key_bits_per_client": 0.0, "mask_degree": 0.0}


def _masked_round(n: int, shapes: dict[str, tuple[int, ...]], cfg: Any, dropout: float, tmp: Path) -> dict[str, Any]:
    participants = list(range(n))
    plan = sa.make_plan(cfg, 1, participants, shapes, {k: 0.25 for k in shapes}, round_seed=1)
    budget = KeyBudget(cfg, tmp)
    needs: dict[tuple[str, str], int] = {}
    for i in participants:
        for j in plan.peers(i):
            if i < j:
                needs[(sa.client_sae(i), sa.client_sae(j))] = 8 * plan.pair_key_bytes()
    budget.admit(participants, {pair: bits for pair, bits in needs.items() if bits})
    store = budget.store
    assert store is not None
    taken = {i: sa.take_pair_keys(store, plan, i) for i in participants}
    gone = set(np.random.default_rng(1).choice(n, int(round(dropout * n)), replace=False).tolist())
    survivors = [i for i in participants if i not in gone]
    keys: dict[int, dict[int, bytes]] = {}
    uploads, shares, uplink = {}, {}, 0
    for j, delta in enumerate(_deltas(n, shapes)):
        keys[j] = {peer: c.key for peer, c in taken[j].items()}
        keys[j].update(sa.fetch_pair_keys(store, j, {i: taken[i][j].key_id for i in plan.peers(j) if i < j}))
        if j in gone:
            continue
        upload = sa.masked_upload(plan, j, delta, keys[j], np.random.default_rng(j))
        ciphers, tags = upload.share_wire()
        uplink += len(upload.blob) + len(ciphers) + len(tags)
        uploads[j] = upload.blob
        shares[j] = sa.shares_from_wire(plan, j, ciphers, tags)
    dropped = sorted(gone)
    replies = {}
    for j, request in sa.unmask_requests(plan, shares, dropped).items():
        answer = sa.answer_unmask(plan, j, keys[j], request)
        replies[j] = sa.UnmaskReply.decode(plan, j, answer.body(), survivors, dropped)
    sa.unmask_sum(plan, uploads, replies, dropped)
    used = sum(store.status(*name.split("~")).used_bits for name in store.links())
    budget.close()
    return {"uplink_bytes_per_client": uplink / len(survivors), "key_bits_per_client": 2 * used / n,
            "mask_degree": plan.mask_degree()}


def _planned(n: int, shapes: dict[str, tuple[int, ...]], cfg: Any, dropout: float) -> dict[str, Any]:
    """Key and uplink of a round from its plan alone (an arm too large to run)."""
    plan = sa.make_plan(cfg, 1, list(range(n)), shapes, {k: 0.25 for k in shapes}, round_seed=1)
    k = plan.mask_degree()
    share_wire = (plan.share_bytes() + sa.TAG_BYTES) * k
    return {"uplink_bytes_per_client": plan.upload_bytes() + share_wire,
            "key_bits_per_client": 8 * plan.pair_key_bytes() * k, "mask_degree": k}


def bench_scale(
    ns: Iterable[int] = (10, 100, 1000), params: int = 2_000, codec: str = "qsgd", dropout: float = 0.05,
    max_key_gb: float = 1.0, degree: int = 0, corrupt: float = 0.05,
) -> list[dict[str, Any]]:
    """One row per (n, arm); see the module docstring. ``params`` floats per update, in two tensors;
    ``degree`` fixes the sparse graph's (0: chosen from the bound, as in a run); ``corrupt`` is
    ``secure_corrupt``, the colluding share the thresholds and the degree are sized for."""
    shapes: dict[str, tuple[int, ...]] = {"w": (params - params // 10,), "b": (params // 10,)}
    rows: list[dict[str, Any]] = []
    for n in ns:
        base: dict[str, Any] = {}
        for arm in ARMS:
            cfg = resolve_config({
                "clients": max(n, 2), "security": "masked-sum", "codec": codec, "key_policy": "wait",
                "qkd_rate": 1e12, "qkd_round_s": 0.0, "secure_graph": "full" if arm == "full" else "sparse",
                "secure_dropout": max(dropout, 0.05), "secure_degree": degree,
                "secure_corrupt": corrupt,
            })
            row: dict[str, Any] = {"n": n, "arm": arm, "params": params, "codec": codec, "measured": True}
            if arm != "none":
                planned = _planned(n, shapes, cfg, dropout)
                if planned["key_bits_per_client"] * n / 2 / 8 / 1e9 > max_key_gb:
                    rows.append({**row, **planned, "measured": False, "round_s": None, "peak_mb": None})
                    continue
            tracemalloc.start()
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                figures = _none_round(n, shapes, codec) if arm == "none" else _masked_round(n, shapes, cfg, dropout, Path(tmp))
            row["round_s"] = time.perf_counter() - t0
            row["peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
            row.update(figures)
            if arm == "none":
                base = row
            rows.append(row)
        for row in rows:
            if row["n"] == n and row["arm"] != "none":
                for key in ("round_s", "peak_mb", "uplink_bytes_per_client"):
                    row[f"{key}_ratio"] = row[key] / base[key] if row.get(key) is not None else None
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of :func:`bench_scale`'s rows."""
    def fmt(value: Any, spec: str) -> str:
        return "–" if value is None else format(value, spec)

    lines = ["| n | arm | peers | round s | × none | peak MB | × none | key bits/client | uplink B/client | × none |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['n']} | {r['arm']}{'' if r['measured'] else ' (planned, not run)'} | {r['mask_degree']:.0f} | "
            f"{fmt(r.get('round_s'), '.2f')} | {fmt(r.get('round_s_ratio'), '.1f')} | {fmt(r.get('peak_mb'), '.0f')} | "
            f"{fmt(r.get('peak_mb_ratio'), '.1f')} | {r['key_bits_per_client']:,.0f} | "
            f"{r['uplink_bytes_per_client']:,.0f} | {fmt(r.get('uplink_bytes_per_client_ratio'), '.1f')} |"
        )
    return "\n".join(lines)


def plot_rows(rows: list[dict[str, Any]], path: Path) -> Path:
    """Key bits and uplink bytes per client against n, log–log, one line per arm."""
    from qfl.simulations.report import pyplot, save_png

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for colour, arm in zip(("C0", "C1", "C2"), ARMS):  # one colour per arm in both panels
        mine = [r for r in rows if r["arm"] == arm]
        ns = [r["n"] for r in mine]
        planned = [r for r in mine if not r["measured"]]
        for ax, key in ((axes[0], "key_bits_per_client"), (axes[1], "uplink_bytes_per_client")):
            if ax is axes[0] and arm == "none":
                continue
            ax.plot(ns, [r[key] for r in mine], marker="o", color=colour, label=arm)
            ax.plot([r["n"] for r in planned], [r[key] for r in planned], marker="o", linestyle="none",
                    markerfacecolor="white", color=colour, label=f"{arm} (planned, not run)" if planned else None)
    for ax, title in zip(axes, ("key bits per client", "uplink bytes per client")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("clients n")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    return save_png(fig, path)
