"""The VQC circuit: PennyLane (lightning, default) and Qiskit Aer give the same expectations and gradients."""

import importlib

import numpy as np
import pytest
import torch

from qfl.quantum.ml import qdata, vqc


def _inputs(spec, batch, seed):
    rng = np.random.default_rng(seed)
    if spec.input_mode == "angle":
        return rng.uniform(-np.pi, np.pi, (batch, spec.qubits))
    z = rng.normal(size=(batch, 2**spec.qubits)) + 1j * rng.normal(size=(batch, 2**spec.qubits))
    return vqc.pack_states(z / np.linalg.norm(z, axis=1, keepdims=True))  # random states of any width


def _weights(spec, seed):
    return np.random.default_rng(seed).uniform(-np.pi, np.pi, vqc.weight_shape(spec.qubits, spec.layers, spec.ansatz))


@pytest.mark.parametrize("ansatz", vqc.ANSATZE)
@pytest.mark.parametrize("embedding", ["angle", "state"])
def test_backends_agree_exactly(ansatz, embedding):
    spec = vqc.CircuitSpec(4, 2, ansatz, embedding)
    x, w = _inputs(spec, 6, 1), _weights(spec, 2)
    ref = vqc.expectations(spec, "default", x, w)
    assert ref.shape == (6, 4)
    for backend in ("lightning", "qiskit"):
        assert vqc.expectations(spec, backend, x, w) == pytest.approx(ref, abs=1e-6)


def test_amplitude_embedding_is_a_state():
    feats = np.random.default_rng(0).uniform(0, 1, (5, 12))
    states = vqc.amplitude_states(feats, 4)
    assert np.linalg.norm(states, axis=1) == pytest.approx(np.ones(5))
    assert states[:, 12:] == pytest.approx(np.zeros((5, 4)))
    spec = vqc.CircuitSpec(4, 1, "hardware-efficient", "amplitude")
    w = _weights(spec, 0)
    x = vqc.pack_states(states)
    assert vqc.expectations(spec, "qiskit", x, w) == pytest.approx(vqc.expectations(spec, "default", x, w), abs=1e-6)
    with pytest.raises(ValueError):  # 12 amplitudes need >= 4 qubits
        vqc.amplitude_states(np.ones((1, 12)), 3)


def test_circuit_matches_the_dataset_ansatz():
    """The hardware-efficient layers on |0...0> are qdata.hea_states: same gate order and wires."""
    n = 3
    spec = vqc.CircuitSpec(n, 2, "hardware-efficient", "state")
    w = _weights(spec, 5)
    zero = vqc.pack_states(qdata.zero_states(1, n))
    z_expect = qdata.bloch_vectors(qdata.hea_states(w[None], n))[0, :, 2]
    for backend in vqc.BACKENDS:
        assert vqc.expectations(spec, backend, zero, w)[0] == pytest.approx(z_expect, abs=1e-6)


def test_noisy_backends_agree():
    spec = vqc.CircuitSpec(3, 2, "hardware-efficient", "state", noise=0.1)
    x, w = _inputs(spec, 4, 3), _weights(spec, 4)
    noisy = vqc.expectations(spec, "default", x, w)
    assert vqc.expectations(spec, "qiskit", x, w) == pytest.approx(noisy, abs=1e-6)
    clean = vqc.expectations(vqc.CircuitSpec(3, 2, "hardware-efficient", "state"), "default", x, w)
    assert np.abs(noisy).sum() < np.abs(clean).sum()  # depolarizing shrinks expectations
    with pytest.raises(ValueError):  # noise needs a mixed-state simulator
        vqc.quantum_layer(spec, "lightning")


@pytest.mark.parametrize("embedding", ["angle", "state"])
def test_gradients_agree(embedding):
    spec = vqc.CircuitSpec(3, 2, "strongly-entangling", embedding)
    x, w = _inputs(spec, 5, 6), _weights(spec, 7)
    target = torch.as_tensor(np.random.default_rng(8).normal(size=(5, 3)))
    grads = {}
    for backend in vqc.BACKENDS:
        layer = vqc.quantum_layer(spec, backend)
        with torch.no_grad():
            layer.weights.copy_(torch.as_tensor(w))
        xt = torch.as_tensor(x).requires_grad_(embedding == "angle")
        ((layer(xt) - target) ** 2).sum().backward()
        grads[backend] = (layer.weights.grad.numpy().copy(), None if xt.grad is None else xt.grad.numpy().copy())
    for backend in ("lightning", "qiskit"):
        assert grads[backend][0] == pytest.approx(grads["default"][0], abs=1e-6)
    if embedding == "angle":  # the hybrid model backpropagates into its classical layers through the inputs
        assert grads["qiskit"][1] == pytest.approx(grads["default"][1], abs=1e-6)


def test_shots_sample_around_the_exact_value():
    exact_spec = vqc.CircuitSpec(3, 1, "hardware-efficient", "angle")
    x, w = _inputs(exact_spec, 8, 9), _weights(exact_spec, 10)
    exact = vqc.expectations(exact_spec, "default", x, w)
    for backend in ("default", "qiskit"):
        sampled = vqc.expectations(vqc.CircuitSpec(3, 1, "hardware-efficient", "angle", shots=4000, seed=1), backend, x, w)
        err = np.abs(sampled - exact)
        assert 0 < err.max() < 0.1  # sampled, so not exact, but within ~6 standard errors


def test_unknown_and_missing_backends(monkeypatch):
    with pytest.raises(ValueError):
        vqc.check_backend("cirq")
    real = importlib.import_module

    def fake(name, *args, **kwargs):
        if name == "qiskit_aer":
            raise ImportError("No module named 'qiskit_aer'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(ValueError) as err:
        vqc.check_backend("qiskit")
    assert "qiskit-aer" in str(err.value)  # the message names the package to install
    vqc.check_backend("default")
