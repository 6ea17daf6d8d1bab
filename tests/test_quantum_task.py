"""QuantumTask: config checks, the ClientTask protocol, local training, and FedAvg over quantum clients."""

import importlib

import numpy as np
import pytest
import torch

from qfl.clients.quantum import (
    QuantumModel,
    QuantumTask,
    _inputs,
    _shadow_seed,
    effective_shots,
    local_split,
    model_of_kind,
    parse_client_kinds,
    quantum_dataset,
    tensors_of_kind,
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
    "changes, key",
    [
        ({"qubits": 9}, "qubits"),  # the datasets support 4 to 8 qubits
        ({"qubits": 2}, "qubits"),
        ({"qubits": 11}, "qubits"),  # the circuits 2 to 10
        ({"data_qubits": 9, "qubits": 10}, "data_qubits"),
        ({"data_qubits": 6}, "qubits"),  # wider states than the circuit
        ({"backend": "cirq"}, "backend"),
        ({"ansatz": "brickwork"}, "ansatz"),
        ({"embedding": "angle"}, "embedding"),  # quantum data needs embedding='state'
        ({"model": "cnn"}, "model"),
        ({"model": "hybrid"}, "model"),  # hybrid is for classical data
        ({"client_kinds": "quantum:1,classical:2"}, "client_kinds"),  # 3 clients listed, 4 in the run
        ({"client_kinds": "quantum:1,oracle:3"}, "client_kinds"),
        ({"noise": 0.1, "backend": "lightning"}, "backend"),  # noise needs a mixed-state simulator
        ({"noise": 0.9}, "noise"),
        ({"quantum_samples": 8}, "quantum_samples"),
        ({"dataset": "digits", "embedding": "angle"}, "embedding"),  # 64 features, 4 qubits
        ({"dataset": "digits", "embedding": "amplitude"}, "qubits"),  # 64 amplitudes need 6 qubits
        ({"dataset": "digits", "embedding": "amplitude", "qubits": 6, "client_kinds": "classical:4"}, "client_kinds"),
    ],
)
def test_bad_quantum_configs_fail_before_training(changes, key):
    with pytest.raises(ConfigError) as err:
        cfg_of(**changes)
    assert err.value.key == key


def test_missing_optional_backend_is_named(monkeypatch):
    real = importlib.import_module

    def fake(name, *args, **kwargs):
        if name == "pennylane_lightning":
            raise ImportError("No module named 'pennylane_lightning'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(ConfigError) as err:
        cfg_of(backend="lightning")
    assert err.value.key == "backend" and "pennylane-lightning" in str(err.value)  # names the package to install


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
    assert shapes["shadow.0.weight"] == (32, 132) and shapes["shadow.2.weight"] == (2, 32)
    # Every kind trains the tensors it uses and sends zeros for the others.
    for pid, kind in [(0, "quantum"), (1, "hybrid"), (2, "classical")]:
        delta, n, loss = task.local_update(w, pid, 4, 1)
        assert set(delta) == set(shapes) and n > 0 and np.isfinite(loss)
        trained = set(tensors_of_kind(cfg, kind))
        assert all(np.abs(delta[k]).max() > 0 for k in trained)
        assert not any(delta[k].any() for k in set(shapes) - trained)
    loss, acc, n = task.local_evaluate(w, 2, 4)
    assert n == len(local_split(cfg, 2, 4)[1]) and 0 <= acc <= 1
    assert 0 <= task.central_evaluate(w)[1] <= 1


def test_classical_clients_see_shadows_of_m_copies():
    from qfl.quantum.ml import shadows

    cfg = cfg_of(client_kinds="quantum:1,classical:3", copies=100)
    quantum_x, y = _inputs(cfg, "quantum", "train")
    classical_x, y2 = _inputs(cfg, "classical", "train")
    assert np.array_equal(y, y2) and quantum_x.shape == (240, 32) and classical_x.shape == (240, 132)
    data = quantum_dataset(cfg)
    assert np.array_equal(classical_x, shadows.shadow_features(data.x_train, 100, seed=_shadow_seed(cfg.seed, "train")))
    assert not np.array_equal(_inputs(cfg, "classical", "test")[0], shadows.shadow_features(data.x_test, 100, seed=_shadow_seed(cfg.seed, "train")))
    exact = _inputs(cfg_of(client_kinds="quantum:1,classical:3", copies=0), "classical", "train")[0]
    assert np.array_equal(exact, shadows.shadow_features(data.x_train, 0, seed=0))
    assert QuantumModel(cfg, "quantum", 0).q.weights.shape == (2, 4, 2)


def test_copies_set_the_quantum_clients_shots():
    assert effective_shots(cfg_of(copies=500, shots=20)) == 500
    assert effective_shots(cfg_of(shots=20)) == 20
    with pytest.raises(ConfigError) as err:
        cfg_of(copies=1)
    assert err.value.key == "copies"


def test_classical_shadow_federation_learns_ntangled():
    """FedAvg over classical-shadow clients (exact features, copies = 0) lifts the mixture model well above chance."""
    history = fedavg_by_calls(cfg_of(client_kinds="classical:4", rounds=6, seed=0, quantum_samples=400))
    acc = [r["accuracy"] for r in history]
    assert acc[-1] > acc[0] + 0.2 and acc[-1] >= 0.75


def test_mixed_central_evaluation_is_the_kinds_mixture():
    cfg = cfg_of(client_kinds="quantum:1,classical:3", copies=0)
    task = QuantumTask(cfg)
    w = task.initial_weights()
    loss, acc = task.central_evaluate(w)
    probs = {}
    for kind in ("quantum", "classical"):
        model = model_of_kind(cfg, kind, cfg.seed)
        model.load(w)
        x, y = _inputs(cfg, kind, "test")
        probs[kind] = torch.softmax(model(torch.from_numpy(np.array(x))), dim=1).detach().numpy()
    mixture = 0.25 * probs["quantum"] + 0.75 * probs["classical"]
    assert acc == pytest.approx(np.mean(mixture.argmax(1) == y))
    assert loss == pytest.approx(-np.mean(np.log(mixture[np.arange(len(y)), y])))


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


def test_bell_clients_train_only_their_own_learner():
    cfg = cfg_of(client_kinds="bell:1,classical:1", clients=2, copies=64, quantum_samples=80)
    task = QuantumTask(cfg)
    shapes = task.shapes()
    assert shapes["bell.0.weight"] == (32, 15) and "shadow.0.weight" in shapes  # 2^4 − 1 purities, one hidden layer
    weights = task.initial_weights()
    delta, n, loss = task.local_update(weights, 0, 2, 1)  # partition 0 is the bell client
    assert n > 0 and np.isfinite(loss)
    assert all(np.abs(delta[k]).max() > 0 for k in shapes if k.startswith("bell."))
    assert all(not np.any(delta[k]) for k in shapes if not k.startswith("bell."))
    assert set(task.kind_accuracies(weights)) == {"bell", "classical"}


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


def test_mixed_federation_experiment_writes_the_issue_17_outputs(tmp_path):
    import json

    from qfl.simulations.quantum_experiment import mixed_federation_experiment

    result = mixed_federation_experiment(
        tmp_path, seeds=2, overrides={"rounds": 3, "quantum_samples": 80, "clients": 2, "copies": 32}, sweep=(8,), sweep_seeds=1
    )
    saved = json.loads((tmp_path / "quantum_mixed.json").read_text())
    assert saved["arms"] == json.loads(json.dumps(result["arms"]))
    main = [a for a in saved["arms"] if a["copies"] == 32]
    assert [(a["quantum_kind"], a["quantum_clients"]) for a in main] == [
        ("quantum", 0), ("quantum", 1), ("quantum", 2), ("bell", 1), ("bell", 2)]
    for a in saved["arms"]:
        for key in ("arm", "quantum_clients", "copies", "final_accuracy_mean", "final_accuracy_ci95",
                    "last3_accuracy_mean", "last3_accuracy_ci95", "seeds"):
            assert key in a
        lo, hi = a["last3_accuracy_ci95"]
        assert lo <= a["last3_accuracy_mean"] <= hi
    assert main[0]["seeds"] == [0, 1] and [a["seeds"] for a in saved["arms"] if a["copies"] == 8][0] == [0]
    # Paired differences: same seed, arm minus all-classical, final round.
    runs = {(r["seed"], r["quantum_kind"], r["quantum_clients"], r["copies"]): r["accuracy"] for r in saved["runs"]}
    for arm in (main[1], main[3]):
        kind = arm["quantum_kind"]
        assert arm["paired_final_diff"] == pytest.approx(
            [runs[(s, kind, 1, 32)][-1] - runs[(s, "quantum", 0, 32)][-1] for s in (0, 1)])
    for name in ("ntangled", "magic"):
        b = saved["baselines"][name]
        assert {"single_qubit_exact_logreg", "shadow_logreg", "shadow_mlp", "bell_logreg", "bell_mlp"} <= set(b)
        assert b["single_qubit_exact_logreg"] <= 0.6
    md = (tmp_path / "quantum_mixed.md").read_text()
    assert "| 1 quantum + 1 classical | 2 |" in md and "| 1 bell + 1 classical | 2 |" in md
    assert (tmp_path / "accuracy_vs_copies.png").stat().st_size > 0 and (tmp_path / "accuracy_per_round.png").stat().st_size > 0


def test_mean_ci95_matches_student_t():
    from qfl.simulations.stats import mean_ci95

    mean, (lo, hi) = mean_ci95([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6) and hi - mean == pytest.approx(4.302653 * 0.1 / np.sqrt(3), rel=1e-5)
    assert mean_ci95([0.4]) == (0.4, [0.4, 0.4])


def test_bench_quantum_rows():
    from qfl.benchmarks.quantum import bench_quantum, format_rows

    rows = bench_quantum(qubits=(3,), backends=("default", "qiskit"), batch=4, repeats=1)
    rows += bench_quantum(qubits=(3,), backends=("default", "qiskit"), batch=4, repeats=1, shots=100)
    assert [(r["backend"], r["qubits"], r["shots"]) for r in rows] == [
        ("default", 3, 0), ("qiskit", 3, 0), ("default", 3, 100), ("qiskit", 3, 100)
    ]
    assert all(r["circuits_per_s"] > 0 and r["gradients_per_s"] > 0 for r in rows)
    assert "| qiskit | 3 | 100 |" in format_rows(rows) and "| default | 3 | exact |" in format_rows(rows)


@pytest.mark.slow
def test_eight_qubit_client_round_under_30_s():
    from qfl.benchmarks.quantum import bench_client_round

    result = bench_client_round(qubits=8, train_states=200, backend="default")
    assert result["train_states"] == 200
    assert result["first_round_s"] < 30 and result["round_s"] < 30


def test_quantum_clients_learn_under_masked_sum_in_flower_rounds(tmp_path):
    """The shipped ntangled config through `qfl run` (masked-sum over the QKD mesh), its 4 clients classical-shadow
    learners: the VQC itself cannot read the twirled labels (test_vqc_federation_stays_at_chance_on_twirled_ntangled)."""
    import json

    from helpers import run_qfl

    out = tmp_path / "run"
    result = run_qfl(["run", "--config", "simulations/configs/quantum-ntangled.toml", "--out", str(out),
                      "--set", "rounds=5", "--set", "client_kinds=classical:4", "--set", "copies=0"])
    assert result.returncode == 0, result.stdout[-4000:]
    history = json.loads((out / "metrics.json").read_text())
    assert all(r["clients"] == 4 and r["key_bits_used"] > 0 for r in history)
    assert history[-1]["accuracy"] > history[0]["accuracy"] + 0.1
