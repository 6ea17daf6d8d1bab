"""`qfl experiment quantum-mixed`: does one quantum client lift a federation of classical-summary clients?

After QuNetQFL (Liu et al., arXiv:2501.12709): on a quantum dataset, clients
without quantum memory keep only classical information about each state; adding
one client that feeds the states themselves to the circuit should raise the
global model's accuracy on the (true) test states.

Arms, all with the same clients, shards, rounds and seed (FedAvg by function
calls, :func:`fedavg_by_calls`; no Flower needed):

* ``classical``: every client is ``classical`` — it sees each state only through
  its few-shot single-qubit Pauli summary (16 shots per basis and qubit) and
  trains the shared circuit on the closest product state;
* ``mixed``: the same federation with client 0 ``quantum`` (it feeds the states);
* ``quantum``: every client quantum (the reference of what the circuit can learn).

The global model is evaluated centrally on the true test states. Reported per
seed: final accuracy and the mean over the last ``tail`` rounds (the federated
curve is noisy with small shards).
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

ARMS: dict[str, str] = {"classical": "classical:{n}", "mixed": "quantum:1,classical:{m}", "quantum": "quantum:{n}"}

DEFAULTS: dict[str, Any] = {
    "model": "vqc",
    "dataset": "ntangled",
    "qubits": 4,
    "layers": 2,
    "embedding": "state",
    "backend": "default",
    "clients": 4,
    "rounds": 15,
    "local_epochs": 1,
    "batch_size": 16,
    "lr": 0.1,
    "quantum_samples": 400,
}


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
    for rnd in range(1, cfg.rounds + 1):
        updates = [task.local_update(weights, pid, cfg.clients, rnd) for pid in range(cfg.clients)]
        kinds = kinds_of(cfg)
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
    return history


def mixed_federation_experiment(
    seeds: Iterable[int] = (0, 1, 2),
    arms: Iterable[str] = ("classical", "mixed", "quantum"),
    overrides: Mapping[str, Any] | None = None,
    tail: int = 3,
    out: Path | str | None = None,
) -> list[dict[str, Any]]:
    """Run every arm for every seed; return one row per (seed, arm).

    Row keys: ``seed``, ``arm``, ``client_kinds``, ``final_accuracy``,
    ``tail_accuracy`` (mean of the last ``tail`` rounds), ``best_accuracy``,
    ``final_loss`` (central cross-entropy), ``accuracy`` (the curve, round 0 first). ``overrides`` replace
    :data:`DEFAULTS` (any RunConfig key). With ``out`` the rows are written to
    ``out/quantum_mixed.json`` and the table to ``out/quantum_mixed.md``.
    """
    values = {**DEFAULTS, **(overrides or {})}
    n = int(values["clients"])
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        for arm in arms:
            if arm not in ARMS:
                raise ValueError(f"unknown arm {arm!r}; choose among {', '.join(ARMS)}")
            kinds = ARMS[arm].format(n=n, m=n - 1)
            cfg = resolve_config({**values, "seed": int(seed), "client_kinds": kinds})
            history = fedavg_by_calls(cfg)
            curve = [r["accuracy"] for r in history]
            rows.append(
                {
                    "seed": int(seed),
                    "arm": arm,
                    "client_kinds": kinds,
                    "final_accuracy": curve[-1],
                    "tail_accuracy": float(np.mean(curve[-tail:])),
                    "best_accuracy": max(curve),
                    "final_loss": history[-1]["loss"],
                    "accuracy": curve,
                }
            )
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "quantum_mixed.json").write_text(json.dumps({"config": values, "rows": rows}, indent=2))
        (out / "quantum_mixed.md").write_text(format_rows(rows) + "\n")
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """Markdown table: per seed and arm, then the mean over seeds."""
    keys = ("final_accuracy", "tail_accuracy", "best_accuracy", "final_loss")
    lines = [
        "| seed | arm | client kinds | final acc | mean acc, last rounds | best acc | final loss |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['arm']} | `{r['client_kinds']}` | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |")
    for arm in dict.fromkeys(r["arm"] for r in rows):
        sel = [r for r in rows if r["arm"] == arm]
        lines.append(f"| mean | {arm} | | " + " | ".join(f"{np.mean([r[k] for r in sel]):.3f}" for k in keys) + " |")
    return "\n".join(lines)
