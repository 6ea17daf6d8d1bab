"""`qfl experiment quantum-mixed`: does quantum access help a federation, at equal copy budgets?

After QuNetQFL (Liu et al., arXiv:2501.12709), tested honestly (issue 17):

* **Data without local shortcuts** (:mod:`qfl.quantum.ml.qdata`): every qubit
  of every state is maximally mixed, and each state carries its own random
  local frame, so the classes differ only in multipartite structure.
* **Equal copy budgets**: every client gets M = ``copies`` copies of each of
  its states. A ``quantum`` client estimates its circuit (VQC) from M shots
  per evaluation; a ``classical`` client measures its M copies in random Pauli
  bases (classical shadows) and trains a small MLP (or a logistic regression)
  on the estimates of every 1- and 2-body Pauli expectation and their squares.
* **Arms**: K clients (``clients``), q = 0 … K of them quantum and the rest
  classical; and q = 1 … K ``bell`` clients (a two-copy quantum memory:
  Bell sampling of M/2 pairs of copies, which estimates every subsystem purity,
  :mod:`qfl.quantum.ml.bell`) and the rest classical; the same shards, rounds and seeds (FedAvg by function calls,
  :func:`fedavg_by_calls`; no Flower needed). The global model is the kinds'
  mixture (:meth:`qfl.clients.quantum.QuantumTask.central_evaluate`), scored on
  the held-out test states.

Per arm and M, over seeds: the final-round accuracy and the mean of the last 3
rounds, each as mean and 95% interval (Student t), and the paired per-seed
differences against the all-classical arm (same seed, same shards, same M).
Centralised baselines on each dataset: a logistic regression on the *exact*
single-qubit expectations (the shortcut check), and the shadow and Bell-sample
logistic regression / MLP at each M.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from qfl.clients.quantum import QuantumTask, kinds_of, tensors_of_kind
from qfl.config import RunConfig, resolve_config
from qfl.server.optimizers import make_server_optimizer, weighted_mean
from qfl.simulations.stats import mean_ci95

DEFAULTS: dict[str, Any] = {
    "model": "vqc",
    "dataset": "ntangled",
    "qubits": 4,
    "layers": 2,
    "embedding": "state",
    "backend": "default",
    "clients": 4,
    "rounds": 10,
    "local_epochs": 1,
    "batch_size": 16,
    "lr": 0.1,
    "quantum_samples": 400,
    "copies": 1000,
}
FULL: dict[str, Any] = {"seeds": 8, "sweep": (32, 128, 1000, 8192), "sweep_seeds": 8, "rounds": 10}
QUICK: dict[str, Any] = {"seeds": 2, "sweep": (32, 1000), "sweep_seeds": 2, "rounds": 5}
BASELINE_DATASETS = ("ntangled", "magic")
TAIL = 3
BASELINE_SEEDS = 3  # centralised baselines: mean over at most this many dataset draws
QUANTUM_KINDS = ("quantum", "bell")  # the single-copy circuit (VQC) and the two-copy Bell sampler


def fedavg_by_calls(cfg: RunConfig) -> list[dict[str, Any]]:
    """``cfg.rounds`` rounds of FedAvg over every client by function calls: one row per round, row 0 the initial model.

    No Flower, no compression, no security: each round every client runs
    :meth:`~qfl.clients.quantum.QuantumTask.local_update`, and the server step is
    the federation's own (:func:`qfl.server.optimizers.weighted_mean` of the
    updates, then ``cfg.server_opt``'s step). Each tensor is averaged over the
    clients whose kind trains it (:func:`~qfl.clients.quantum.tensors_of_kind`),
    so one quantum client's circuit update is not diluted by the zeros of the
    classical clients. Deterministic in ``cfg.seed``.
    """
    task = QuantumTask(cfg)
    optimizer = make_server_optimizer(cfg)
    weights = task.initial_weights()
    loss, acc = task.central_evaluate(weights)
    history: list[dict[str, Any]] = [{"round": 0, "loss": loss, "accuracy": acc, "train_loss": float("nan")}]
    kinds = kinds_of(cfg)
    for rnd in range(1, cfg.rounds + 1):
        updates = [task.local_update(weights, pid, cfg.clients, rnd) for pid in range(cfg.clients)]
        mean: dict[str, np.ndarray] = {}
        for kind in dict.fromkeys(kinds):  # each tensor: the weighted mean over the clients that train it
            weighted = [(n, delta) for (delta, n, _), k in zip(updates, kinds) if k == kind and n > 0]
            if weighted:
                mean |= weighted_mean(weighted, tensors_of_kind(cfg, kind))
        if mean:
            weights = optimizer.step(weights, {k: mean.get(k, np.zeros_like(w)) for k, w in weights.items()})
        loss, acc = task.central_evaluate(weights)
        train_loss = float(np.mean([train_loss for _, _, train_loss in updates]))
        history.append({"round": rnd, "loss": loss, "accuracy": acc, "train_loss": train_loss})
    history[-1]["accuracy_by_kind"] = task.kind_accuracies(weights)
    return history


def arm_name(quantum: int, clients: int, kind: str = "quantum") -> str:
    """``"q quantum + c classical"`` (``"q bell + c classical"`` for Bell-sampling clients)."""
    return f"{quantum} {kind if quantum else 'quantum'} + {clients - quantum} classical"


# ----------------------------------------------------------------------------- runs


Job = tuple[dict[str, Any], int, int, int, str]  # config values, seed, quantum clients, M, their kind


def _one_run(job: Job) -> dict[str, Any]:
    """One federation: (config values, seed, quantum clients, M, their kind) → its accuracy curve."""
    import torch

    torch.set_num_threads(1)
    values, seed, quantum, copies, kind = job
    n = int(values["clients"])
    kinds = ",".join(item for item in (f"{kind}:{quantum}" if quantum else "", f"classical:{n - quantum}" if quantum < n else "") if item)
    cfg = resolve_config({**values, "seed": seed, "copies": copies, "client_kinds": kinds})
    history = fedavg_by_calls(cfg)
    return {
        "seed": seed,
        "quantum_clients": quantum,
        "quantum_kind": kind if quantum else "quantum",
        "copies": copies,
        "client_kinds": kinds,
        "accuracy": [r["accuracy"] for r in history],
        "final_accuracy_by_kind": history[-1]["accuracy_by_kind"],
    }


def _run_all(jobs: list[Job], processes: int) -> list[dict[str, Any]]:
    """Every job's run, in job order; one progress line per finished run on stderr."""
    import sys

    def report(i: int, run: dict[str, Any]) -> dict[str, Any]:
        print(f"[{i}/{len(jobs)}] M={run['copies']} seed={run['seed']} {run['client_kinds']}: "
              f"final accuracy {run['accuracy'][-1]:.3f}", file=sys.stderr, flush=True)
        return run

    if processes <= 1:
        return [report(i + 1, _one_run(job)) for i, job in enumerate(jobs)]
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        return [report(i + 1, run) for i, run in enumerate(pool.imap(_one_run, jobs, chunksize=1))]


def summarise(runs: list[dict[str, Any]], clients: int) -> list[dict[str, Any]]:
    """One object per (arm, M): means, 95% intervals and paired differences against the all-classical arm."""
    arms = []
    for copies in sorted({r["copies"] for r in runs}):
        at_m = [r for r in runs if r["copies"] == copies]
        base = {r["seed"]: r["accuracy"] for r in at_m if r["quantum_clients"] == 0}
        for kind, quantum in sorted({(r["quantum_kind"], r["quantum_clients"]) for r in at_m},
                                    key=lambda kq: (kq[1] > 0, QUANTUM_KINDS.index(kq[0]), kq[1])):
            sel = sorted((r for r in at_m if r["quantum_clients"] == quantum and r["quantum_kind"] == kind),
                         key=lambda r: r["seed"])
            final = [r["accuracy"][-1] for r in sel]
            last3 = [float(np.mean(r["accuracy"][-TAIL:])) for r in sel]
            arm: dict[str, Any] = {"arm": arm_name(quantum, clients, kind), "quantum_clients": quantum,
                                   "quantum_kind": kind, "copies": copies}
            arm["final_accuracy_mean"], arm["final_accuracy_ci95"] = mean_ci95(final)
            arm["last3_accuracy_mean"], arm["last3_accuracy_ci95"] = mean_ci95(last3)
            arm["seeds"] = [r["seed"] for r in sel]
            arm["final_accuracy"], arm["last3_accuracy"] = final, last3
            paired = [r for r in sel if r["seed"] in base]
            if quantum > 0 and paired:
                d_final = [r["accuracy"][-1] - base[r["seed"]][-1] for r in paired]
                d_last3 = [float(np.mean(r["accuracy"][-TAIL:]) - np.mean(base[r["seed"]][-TAIL:])) for r in paired]
                arm["paired_final_diff"], arm["paired_last3_diff"] = d_final, d_last3
                arm["paired_final_diff_mean"], arm["paired_final_diff_ci95"] = mean_ci95(d_final)
                arm["paired_last3_diff_mean"], arm["paired_last3_diff_ci95"] = mean_ci95(d_last3)
                arm["seeds_better_last3"] = int(sum(d > 0 for d in d_last3))
            arm["mean_curve"] = [float(v) for v in np.mean([r["accuracy"] for r in sel], axis=0)]
            for alone_kind in ("quantum", "classical", "bell"):  # each kind's model alone, final round
                alone = [r["final_accuracy_by_kind"][alone_kind] for r in sel if alone_kind in r["final_accuracy_by_kind"]]
                if alone:
                    arm[f"final_accuracy_{alone_kind}_model_alone_mean"] = float(np.mean(alone))
            arms.append(arm)
    return arms


def baselines(values: Mapping[str, Any], copies_list: Iterable[int], seeds: Iterable[int]) -> dict[str, Any]:
    """Centralised baselines per dataset, mean over ``seeds`` (each seed: its own dataset draw and split)."""
    from qfl.quantum.ml import qdata
    from qfl.quantum.ml.baselines import bell_accuracy, shadow_accuracy, single_qubit_accuracy

    out: dict[str, Any] = {}
    seeds = list(seeds)
    for name in BASELINE_DATASETS:
        per_m: dict[str, dict[str, float]] = {}
        single = []
        for seed in seeds:
            data = qdata.load_quantum_dataset(name, int(values["qubits"]), int(values["quantum_samples"]), seed=seed)
            single.append(single_qubit_accuracy(data, seed=seed))
            for m in copies_list:
                acc = shadow_accuracy(data, m, seed=seed)
                acc |= {f"bell_{key}": v for key, v in bell_accuracy(data, m, seed=seed).items()}
                for key, v in acc.items():
                    per_m.setdefault(str(m), {}).setdefault(key, 0.0)
                    per_m[str(m)][key] += v / len(seeds)
        main = str(int(values["copies"]))
        out[name] = {
            "single_qubit_exact_logreg": float(np.mean([s["logreg"] for s in single])),
            "single_qubit_exact_best": float(np.mean([s["best"] for s in single])),
            "shadow_logreg": per_m[main]["logreg"],
            "shadow_mlp": per_m[main]["mlp"],
            "bell_logreg": per_m[main]["bell_logreg"],
            "bell_mlp": per_m[main]["bell_mlp"],
            "copies": int(values["copies"]),
            "by_copies": per_m,
        }
    return out


def mixed_federation_experiment(
    out: Path | str | None = None,
    seeds: int | None = None,
    quick: bool = False,
    overrides: Mapping[str, Any] | None = None,
    sweep: Iterable[int] | None = None,
    sweep_seeds: int | None = None,
    processes: int = 1,
    quantum_kinds: Iterable[str] = QUANTUM_KINDS,
) -> dict[str, Any]:
    """Run every arm (q = 0 … clients quantum clients, then q = 1 … clients bell clients; the rest classical)
    at M = ``copies`` for ``seeds`` seeds and at every M of ``sweep`` for ``sweep_seeds`` seeds; return (and
    with ``out``, write) the result object.

    ``quick`` takes :data:`QUICK` (2 seeds, 5 rounds, M ∈ {32, 1000}) instead of
    :data:`FULL` (8 seeds, 10 rounds, M ∈ {32, 128, 1000, 8192}). ``quantum_kinds`` picks the arm families
    (the all-classical arm always runs). ``overrides`` replace
    :data:`DEFAULTS` (any RunConfig key). Files: ``quantum_mixed.json``,
    ``quantum_mixed.md``, ``accuracy_vs_copies.png``, ``accuracy_per_round.png``.
    """
    kinds = set(quantum_kinds)
    if not kinds or not kinds <= set(QUANTUM_KINDS):
        raise ValueError(f"quantum_kinds must name some of {', '.join(QUANTUM_KINDS)}, got {sorted(kinds)}")
    plan = QUICK if quick else FULL
    values = {**DEFAULTS, "rounds": plan["rounds"], **(overrides or {})}
    clients, main = int(values["clients"]), int(values["copies"])
    n_seeds = int(seeds if seeds is not None else plan["seeds"])
    n_sweep = min(int(sweep_seeds if sweep_seeds is not None else plan["sweep_seeds"]), n_seeds)
    copies_list = sorted({main, *(sweep if sweep is not None else plan["sweep"])})
    jobs = []
    for m in copies_list:
        for seed in range(n_seeds if m == main else n_sweep):
            jobs.append((values, seed, 0, m, QUANTUM_KINDS[0]))
            jobs += [(values, seed, q, m, kind) for kind in QUANTUM_KINDS if kind in kinds for q in range(1, clients + 1)]
    runs = _run_all(jobs, processes)
    result = {
        "config": values,
        "quick": quick,
        "copies": main,
        "arms": summarise(runs, clients),
        "baselines": baselines(values, copies_list, range(min(n_sweep, BASELINE_SEEDS))),
        "runs": runs,
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "quantum_mixed.json").write_text(json.dumps(result, indent=2))
        (out / "quantum_mixed.md").write_text(format_result(result) + "\n")
        plot(out, result)
    return result


# ----------------------------------------------------------------------------- report


def _ci(v: list[float]) -> str:
    return f"[{v[0]:.3f}, {v[1]:.3f}]"


def format_result(result: Mapping[str, Any]) -> str:
    """Markdown: the arms at the main M, the paired differences, the sweep over M, the baselines."""
    main = result["copies"]
    cfg = result["config"]
    lines = [
        f"Dataset {cfg['dataset']}, {cfg['qubits']} qubits, {cfg['clients']} clients, {cfg['rounds']} rounds, "
        f"M = {main:,} copies per state; mean over seeds with 95% intervals (Student t).",
        "",
        "| arm | seeds | final acc | 95% CI | last-3 acc | 95% CI | Δ last-3 vs all-classical (paired) | 95% CI | seeds better "
        "| final acc, VQC alone | final acc, shadow learner alone | final acc, Bell learner alone |",
        "|---|---:|---:|---|---:|---|---:|---|---:|---:|---:|---:|",
    ]
    for a in (a for a in result["arms"] if a["copies"] == main):
        diff = (
            f"{a['paired_last3_diff_mean']:+.3f} | {_ci(a['paired_last3_diff_ci95'])} | {a['seeds_better_last3']}/{len(a['paired_last3_diff'])}"
            if "paired_last3_diff_mean" in a
            else "— | — | —"
        )
        lines.append(
            f"| {a['arm']} | {len(a['seeds'])} | {a['final_accuracy_mean']:.3f} | {_ci(a['final_accuracy_ci95'])} | "
            f"{a['last3_accuracy_mean']:.3f} | {_ci(a['last3_accuracy_ci95'])} | {diff} | "
            + " | ".join(f"{a[k]:.3f}" if k in a else "—" for k in (
                "final_accuracy_quantum_model_alone_mean", "final_accuracy_classical_model_alone_mean",
                "final_accuracy_bell_model_alone_mean")) + " |"
        )
    ms = sorted({a["copies"] for a in result["arms"]})
    lines += ["", "Last-3 accuracy against M (mean over the seeds run at that M):", ""]
    lines.append("| arm | " + " | ".join(f"M = {m:,}" for m in ms) + " |")
    lines.append("|---|" + "---:|" * len(ms))
    for name in dict.fromkeys(a["arm"] for a in result["arms"]):
        cells = []
        for m in ms:
            a = next((a for a in result["arms"] if a["copies"] == m and a["arm"] == name), None)
            cells.append(f"{a['last3_accuracy_mean']:.3f} ({len(a['seeds'])})" if a else "—")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Centralised baselines (held-out accuracy):", ""]
    lines.append("| dataset | learner | exact single-qubit | " + " | ".join(f"M={m:,}" for m in ms) + " |")
    lines.append("|---|---|---:|" + "---:|" * len(ms))
    for name, b in result["baselines"].items():
        lines.append(f"| {name} | best on exact single-qubit expectations | {b['single_qubit_exact_best']:.3f} |"
                     + " |" * len(ms))
        for key, label in (("logreg", "shadow logreg"), ("mlp", "shadow MLP"), ("bell_logreg", "Bell logreg"),
                           ("bell_mlp", "Bell MLP")):
            lines.append(f"| {name} | {label} | — | " + " | ".join(f"{b['by_copies'][str(m)][key]:.3f}" for m in ms) + " |")
    return "\n".join(lines)


def plot(out: Path, result: Mapping[str, Any]) -> None:
    """accuracy_vs_copies.png (last-3 accuracy against M, log axis, per arm, with the centralised shadow
    baselines) and accuracy_per_round.png (seed-mean curves at the main M)."""
    from qfl.simulations.report import pyplot, save_png

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=110)
    names = list(dict.fromkeys(a["arm"] for a in result["arms"]))
    for i, name in enumerate(names):
        sel = sorted((a for a in result["arms"] if a["arm"] == name), key=lambda a: a["copies"])
        ms = [a["copies"] * 1.04 ** (i - len(names) / 2) for a in sel]  # side by side, not on top of each other
        mean = np.array([a["last3_accuracy_mean"] for a in sel])
        lo = mean - np.array([a["last3_accuracy_ci95"][0] for a in sel])
        hi = np.array([a["last3_accuracy_ci95"][1] for a in sel]) - mean
        bell_arm = sel[0].get("quantum_kind") == "bell" and sel[0]["quantum_clients"] > 0
        ax.errorbar(ms, mean, yerr=[lo, hi], marker="s" if bell_arm else "o", ls="--" if bell_arm else "-", capsize=3,
                    label=f"federated: {name}")
    b = result["baselines"][result["config"]["dataset"]]
    ms = sorted(int(m) for m in b["by_copies"])
    for key, style, label in (("logreg", "k--", "shadow logreg"), ("mlp", "k:", "shadow MLP"),
                              ("bell_logreg", "m--", "Bell logreg"), ("bell_mlp", "m:", "Bell MLP")):
        ax.plot(ms, [b["by_copies"][str(m)][key] for m in ms], style, lw=1, label=f"centralised {label}")
    ax.axhline(0.5, color="grey", lw=0.8)
    ax.set_ylim(0.3, 1.02)  # intervals of 2–3 seeds can reach past [0, 1]; the axis shows where the means are
    ax.set_xscale("log")
    ax.set_xlabel("copies per state M (shots / shadow snapshots / 2 × Bell samples)")
    ax.set_ylabel("test accuracy (last-3 rounds)")
    ax.set_title(f"{result['config']['dataset']}: VQC, Bell-sampling and classical-shadow clients at equal M", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    save_png(fig, out / "accuracy_vs_copies.png")

    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    for a in (a for a in result["arms"] if a["copies"] == result["copies"]):
        ax.plot(range(len(a["mean_curve"])), a["mean_curve"], marker=".", label=a["arm"])
    ax.axhline(0.5, color="grey", lw=0.8)
    ax.set_xlabel("round")
    ax.set_ylabel(f"test accuracy (mean of {len(result['arms'][0]['seeds'])}+ seeds)")
    ax.set_title(f"M = {result['copies']:,}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, out / "accuracy_per_round.png")

