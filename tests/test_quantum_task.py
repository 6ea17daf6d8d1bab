"""QuantumTask: config checks, the ClientTask protocol, local training, and FedAvg over quantum clients."""

import importlib

import numpy as np
import pytest

from qfl.clients.quantum import (
    QuantumModel,
    QuantumTask,
    _inputs,
    local_split,
    parse_client_kinds,
)
from qfl.clients.tasks import task_for
from qfl.clients.training import evaluate
from qfl.config import ConfigError, resolve_config
from qfl.server.preflight import check_components
from qfl.simulations.quantum_experiment import fedavg_by_calls

NTANGLED = {
    "model": "vqc",
    "dataset": "ntangled",
    "qubits": 4,
    "embedding": "state",
    "backend": "default",
    "clients": 4,
    "quantum_samples": 300,
    "local_epochs": 1,
    "batch_size": 16,
    "lr": 0.1,
}


def cfg_of(**changes):
    return check_components(resolve_config({**NTANGLED, **changes}))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"qubits": 9}, "supports 4 to 8 qubits, got qubits=9"),
        ({"qubits": 2}, "supports 4 to 8 qubits, got qubits=2"),
        ({"qubits": 11}, "outside the supported range 2..10"),
        ({"data_qubits": 9, "qubits": 10}, "supports 4 to 8 qubits, got data_qubits=9"),
        ({"data_qubits": 6}, "data_qubits=6 qubits but the circuit has qubits=4"),
        ({"backend": "cirq"}, "unknown quantum backend 'cirq'"),
        ({"ansatz": "brickwork"}, "unknown ansatz"),
        ({"embedding": "angle"}, "set embedding='state'"),
        ({"model": "cnn"}, "set model='vqc'"),
        ({"model": "hybrid"}, "model 'hybrid' is for classical data"),
        ({"client_kinds": "quantum:1,classical:2"}, "lists 3 clients but there are 4"),
        ({"client_kinds": "quantum:1,oracle:3"}, "unknown client kind 'oracle'"),
        ({"noise": 0.1, "backend": "lightning"}, "mixed-state simulator"),
        ({"noise": 0.9}, "noise is a depolarizing probability"),
        ({"quantum_samples": 8}, "quantum_samples=8 is too few"),
        ({"dataset": "digits", "embedding": "angle"}, "one feature per qubit, but digits has 64 features"),
        ({"dataset": "digits", "embedding": "amplitude"}, "needs qubits >= 6"),
        ({"dataset": "digits", "embedding": "amplitude", "qubits": 6, "client_kinds": "classical:4"}, "need a quantum dataset"),
    ],
)
def test_bad_quantum_configs_fail_before_training(changes, message):
    with pytest.raises(ConfigError, match=message):
        cfg_of(**changes)


def test_missing_optional_backend_is_named(monkeypatch):
    real = importlib.import_module

    def fake(name, *args, **kwargs):
        if name == "pennylane_lightning":
            raise ImportError("No module named 'pennylane_lightning'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(ConfigError, match="pip install pennylane-lightning"):
        cfg_of(backend="lightning")


def test_client_kinds_parse_in_partition_order():
    assert parse_client_kinds("quantum:1, classical:2,hybrid:1", 4) == ["quantum", "classical", "classical", "hybrid"]
    assert parse_client_kinds("", 3, "hybrid") == ["hybrid"] * 3


def test_task_protocol_shapes_and_weights():
    cfg = cfg_of(client_kinds="quantum:1,hybrid:1,classical:2")
    task = task_for(cfg)
    assert isinstance(task, QuantumTask)
    shapes = task.shapes()
    assert shapes["q.weights"] == (2, 4, 2) and shapes["head.weight"] == (2, 4) and shapes["pre.0.weight"] == (16, 12)
    w = task.initial_weights()
    assert {k: v.shape for k, v in w.items()} == shapes and all(v.dtype == np.float32 for v in w.values())
    assert all(np.array_equal(w[k], task.initial_weights()[k]) for k in w)
    assert task.train_size() == 240
    task.check_partition(4)
    # Every kind trains the tensors it uses and sends zeros for the others.
    for pid, unused in [(0, ["pre.0.weight"]), (1, []), (2, ["pre.0.weight"])]:
        delta, n, loss = task.local_update(w, pid, 4, 1)
        assert set(delta) == set(shapes) and n > 0 and np.isfinite(loss)
        assert np.abs(delta["q.weights"]).max() > 0
        for k in unused:
            assert not delta[k].any()
    loss, acc, n = task.local_evaluate(w, 2, 4)
    assert n == len(local_split(cfg, 2, 4)[1]) and 0 <= acc <= 1
    assert 0 <= task.central_evaluate(w)[1] <= 1


def test_classical_clients_see_product_states_only():
    cfg = cfg_of(client_kinds="quantum:1,classical:3")
    quantum_x, y = _inputs(cfg, "quantum", "train")
    classical_x, y2 = _inputs(cfg, "classical", "train")
    assert np.array_equal(y, y2) and quantum_x.shape == classical_x.shape == (240, 32)
    from qfl.quantum.ml import qdata

    states = classical_x[:, :16] + 1j * classical_x[:, 16:]
    assert qdata.concentratable_entanglement(states) == pytest.approx(np.zeros(240), abs=1e-10)
    assert not np.allclose(quantum_x, classical_x)


def test_local_update_lowers_the_loss_on_the_shard():
    cfg = cfg_of(clients=2, local_epochs=3)
    task = QuantumTask(cfg)
    w = task.initial_weights()
    idx, _ = local_split(cfg, 0, 2)
    x, y = _inputs(cfg, "quantum", "train")
    model = QuantumModel(cfg, "quantum", 0)
    model.load(w)
    before = evaluate(model, x[idx], y[idx])
    delta, n, _ = task.local_update(w, 0, 2, 1)
    model.load({k: w[k] + delta[k] for k in w})
    after = evaluate(model, x[idx], y[idx])
    assert n == len(idx)
    assert after[0] < before[0] - 0.02
    assert after[1] > before[1]


def test_wider_circuit_pads_states_with_ancillas():
    cfg = cfg_of(qubits=5, data_qubits=4, quantum_samples=60, clients=2)
    task = QuantumTask(cfg)
    delta, n, loss = task.local_update(task.initial_weights(), 1, 2, 1)
    assert delta["q.weights"].shape == (2, 5, 2) and np.isfinite(loss)


def test_vqc_federation_stays_at_chance_on_twirled_ntangled():
    """The VQC's logits are linear in ρ; the local twirl gives every fixed observable the same class mean, so no round beats chance by much."""
    history = fedavg_by_calls(cfg_of(rounds=4, seed=0))
    assert [r["round"] for r in history] == [0, 1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in history)
    assert max(r["accuracy"] for r in history) <= 0.65


def test_hybrid_model_on_digits_trains():
    cfg = resolve_config(
        {"model": "hybrid", "dataset": "digits", "qubits": 4, "backend": "default", "clients": 10, "local_epochs": 2, "lr": 0.05}
    )
    task = QuantumTask(cfg)
    w = task.initial_weights()
    assert task.shapes()["pre.0.weight"] == (16, 64) and task.shapes()["head.weight"] == (10, 4)
    idx, _ = local_split(cfg, 0, 10)
    x, y = _inputs(cfg, "hybrid", "train")
    model = QuantumModel(cfg, "hybrid", 0)
    model.load(w)
    before = evaluate(model, x[idx], y[idx])[0]
    delta, n, _ = task.local_update(w, 0, 10, 1)
    model.load({k: w[k] + delta[k] for k in w})
    assert evaluate(model, x[idx], y[idx])[0] < before - 0.05


def test_qiskit_backend_trains_through_the_task():
    cfg = cfg_of(qubits=4, backend="qiskit", quantum_samples=40, clients=2, batch_size=8)
    task = QuantumTask(cfg)
    delta, n, loss = task.local_update(task.initial_weights(), 0, 2, 1)
    assert np.abs(delta["q.weights"]).max() > 0 and np.isfinite(loss)


def test_mixed_federation_experiment_runs():
    from qfl.simulations.quantum_experiment import format_rows, mixed_federation_experiment

    rows = mixed_federation_experiment(seeds=(0,), overrides={"qubits": 4, "rounds": 2, "quantum_samples": 80})
    assert [r["arm"] for r in rows] == ["classical", "mixed", "quantum"]
    assert rows[1]["client_kinds"] == "quantum:1,classical:3"
    assert all(len(r["accuracy"]) == 3 and 0 <= r["final_accuracy"] <= 1 for r in rows)
    assert "| mean | mixed |" in format_rows(rows)


def test_bench_quantum_rows():
    from qfl.benchmarks.quantum import bench_quantum, format_rows

    rows = bench_quantum(qubits=(3,), backends=("default", "qiskit"), batch=4, repeats=1)
    assert [(r["backend"], r["qubits"]) for r in rows] == [("default", 3), ("qiskit", 3)]
    assert all(r["circuits_per_s"] > 0 and r["gradients_per_s"] > 0 for r in rows)
    assert "| qiskit | 3 |" in format_rows(rows)


@pytest.mark.slow
def test_eight_qubit_client_round_under_30_s():
    from qfl.benchmarks.quantum import bench_client_round

    result = bench_client_round(qubits=8, train_states=200, backend="default")
    assert result["train_states"] == 200
    assert result["first_round_s"] < 30 and result["round_s"] < 30


def test_quantum_clients_learn_under_masked_sum_in_flower_rounds(tmp_path):
    """The shipped ntangled config (4 VQC clients, masked-sum over the QKD mesh) through `qfl run`."""
    import json

    from helpers import run_qfl

    out = tmp_path / "run"
    result = run_qfl(["run", "--config", "simulations/configs/quantum-ntangled.toml", "--out", str(out),
                      "--set", "rounds=5"])
    assert result.returncode == 0, result.stdout[-4000:]
    history = json.loads((out / "metrics.json").read_text())
    assert all(r["clients"] == 4 and r["key_bits_used"] > 0 for r in history)
    assert max(r["accuracy"] for r in history[1:]) > history[0]["accuracy"]
