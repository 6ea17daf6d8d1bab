"""`qfl bench quantum`: circuit and gradient throughput of the VQC backends, and one client round.

Every backend runs the same circuit (:mod:`qfl.quantum.ml.vqc`): a state-vector
input (``embedding = "state"``, random Haar states), ``layers`` hardware-efficient
layers, ⟨Z_i⟩ of every qubit. Per backend and width:

* ``circuits_per_s``: inputs evaluated per second by a batched forward pass
  (``batch`` inputs, no gradient);
* ``gradients_per_s``: inputs per second of a training step — forward and
  backward of a scalar loss over ``batch`` inputs, giving ∂loss/∂w for all
  weights (adjoint on lightning, backprop on default, parameter shift on qiskit).

With ``shots = M > 0`` every expectation is estimated from M shots
(PennyLane ``default.qubit`` samples them, one broadcast tape per
parameter-shift circuit; Aer's batched ``EstimatorV2`` adds Gaussian noise of
standard deviation 1/√M, all shifted circuits in one call) and gradients come
from the parameter-shift rule on those estimates (2P + 1 circuits per input).

Each figure is the best of ``repeats`` timed runs after one warm-up.
:func:`bench_client_round` times one quantum client's ``local_update`` on an
NTangled shard (dataset generation excluded; it is cached per process).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from qfl.benchmarks.timing import best_of
from qfl.quantum.ml import vqc


def _haar_states(batch: int, qubits: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(batch, 2**qubits)) + 1j * rng.normal(size=(batch, 2**qubits))
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def bench_quantum(
    qubits: Iterable[int] = (4, 6, 8),
    backends: Iterable[str] = vqc.BACKENDS,
    batch: int = 32,
    layers: int = 2,
    repeats: int = 3,
    seed: int = 0,
    shots: int = 0,
) -> list[dict[str, Any]]:
    """One row per (backend, qubits): ``backend, qubits, shots, circuits_per_s, gradients_per_s``."""
    torch.set_num_threads(1)
    rows = []
    for backend in backends:
        vqc.check_backend(backend)
        for n in qubits:
            spec = vqc.CircuitSpec(n, layers, "hardware-efficient", "state", shots=shots, seed=seed)
            layer = vqc.quantum_layer(spec, backend)
            rng = np.random.default_rng(seed)
            with torch.no_grad():
                weights = layer.get_parameter("weights")
                weights.copy_(torch.as_tensor(rng.normal(0, 1, tuple(weights.shape))))
            x = torch.as_tensor(vqc.pack_states(_haar_states(batch, n, seed)))

            def forward() -> None:
                with torch.no_grad():
                    layer(x)

            def gradient() -> None:
                layer.zero_grad()
                layer(x).sum().backward()

            rows.append(
                {
                    "backend": backend,
                    "qubits": n,
                    "shots": shots,
                    "circuits_per_s": batch / best_of(forward, repeats, warmup=True)[0],
                    "gradients_per_s": batch / best_of(gradient, repeats, warmup=True)[0],
                }
            )
    return rows


def bench_client_round(
    qubits: int = 8,
    train_states: int = 200,
    backend: str = "default",
    layers: int = 2,
    local_epochs: int = 1,
    batch_size: int = 32,
    copies: int = 0,
) -> dict[str, Any]:
    """Wall time of one quantum client's round (``local_update``) on ``train_states`` NTangled states.

    One client holds the whole training split (``local_val_fraction = 0``), so it
    trains on exactly ``train_states`` states for ``local_epochs`` epochs.
    ``first_round_s`` is the process's first round (simulator start-up
    included), ``round_s`` the next one; ``dataset_s`` the one-off generation
    of the dataset (states, CE labels, summaries), cached afterwards. ``copies = M``
    estimates every circuit from M shots (0: exact).
    """
    from qfl.clients.quantum import QuantumTask
    from qfl.config import resolve_config

    torch.set_num_threads(1)
    samples = int(round(train_states / 0.8))
    cfg = resolve_config(
        {
            "model": "vqc",
            "dataset": "ntangled",
            "embedding": "state",
            "qubits": qubits,
            "layers": layers,
            "backend": backend,
            "clients": 1,
            "quantum_samples": samples,
            "test_fraction": 0.2,
            "local_val_fraction": 0.0,
            "local_epochs": local_epochs,
            "batch_size": batch_size,
            "lr": 0.05,
            "copies": copies,
        }
    )
    task = QuantumTask(cfg)
    t0 = time.perf_counter()
    weights = task.initial_weights()
    task.check_partition(1)  # generates (and caches) the dataset
    data_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    delta, examples, loss = task.local_update(weights, 0, 1, 1)
    first_s = time.perf_counter() - t0
    weights = {k: weights[k] + delta[k] for k in weights}
    t0 = time.perf_counter()
    task.local_update(weights, 0, 1, 2)
    warm_s = time.perf_counter() - t0
    return {
        "backend": backend,
        "qubits": qubits,
        "copies": copies,
        "train_states": examples,
        "local_epochs": local_epochs,
        "first_round_s": first_s,
        "round_s": warm_s,
        "dataset_s": data_s,
        "loss": loss,
    }


def format_rows(rows: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`bench_quantum` rows."""
    lines = ["| backend | qubits | shots | circuits/s | gradients/s |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        shots = f"{r['shots']:,}" if r["shots"] else "exact"
        lines.append(f"| {r['backend']} | {r['qubits']} | {shots} | {r['circuits_per_s']:,.0f} | {r['gradients_per_s']:,.0f} |")
    return "\n".join(lines)
