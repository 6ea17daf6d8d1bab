"""Classical shadows are unbiased; M-shot circuit estimates converge to the exact expectations."""

import numpy as np
import pytest
import torch

from qfl.quantum.ml import qdata, shadows, vqc


def _known_states():
    ghz = np.zeros((1, 16), complex)
    ghz[0, 0] = ghz[0, -1] = 2**-0.5
    product = qdata.zero_states(1, 4)
    product = qdata.apply_1q(product, qdata.ry(np.array([0.7])), 1, 4)  # ⟨Z_1⟩ = cos 0.7, ⟨X_1⟩ = sin 0.7
    rng = np.random.default_rng(11)
    z = rng.normal(size=(1, 16)) + 1j * rng.normal(size=(1, 16))
    return np.concatenate([ghz, product, z / np.linalg.norm(z)])


def test_exact_estimates_of_known_states():
    one, two = shadows.exact_estimates(_known_states()[:2])
    pair = shadows.pair_list(4).index((0, 3))
    assert two[0, pair] == pytest.approx(np.diag([0.0, 0.0, 1.0]))  # GHZ_4: ⟨Z_0 Z_3⟩ = 1; X_0 X_3 flips two bits: 0
    assert np.abs(one[0]).max() < 1e-12
    assert one[1, 1] == pytest.approx([np.sin(0.7), 0.0, np.cos(0.7)])
    assert one[1, 0] == pytest.approx([0.0, 0.0, 1.0])
    assert shadows.num_features(4) == 2 * (12 + 54)


def test_shadow_estimates_are_unbiased():
    """Every 1- and 2-body estimate lies within 5 standard deviations (√(3^k/M)) of the exact value, fixed seed."""
    states = _known_states()
    copies = 20_000
    rng = np.random.default_rng(0)
    bases, outcomes = shadows.sample_snapshots(states, copies, rng)
    assert set(np.unique(bases)) == {0, 1, 2} and set(np.unique(outcomes)) == {-1, 1}
    one, two = shadows.snapshot_estimates(bases, outcomes)
    exact_one, exact_two = shadows.exact_estimates(states)
    assert np.abs(one - exact_one).max() < 5 * np.sqrt(3 / copies)
    assert np.abs(two - exact_two).max() < 5 * np.sqrt(9 / copies)
    # The mean error over all 3·(12 + 54) estimates is centred on 0 (no bias), not merely small.
    errors = np.concatenate([(one - exact_one).ravel(), (two - exact_two).ravel()])
    assert abs(errors.mean()) < 4 * np.sqrt(9 / copies) / np.sqrt(errors.size)


def test_squared_features_are_unbiased_and_exact_at_unlimited_copies():
    states = _known_states()
    exact = shadows.shadow_features(states, 0, seed=0)
    k = exact.shape[1] // 2
    assert exact[:, k:] == pytest.approx(exact[:, :k] ** 2)
    # Averaged over 40 independent 400-copy shadows the half-product estimates match ⟨P⟩², while
    # squaring one estimate is biased upwards by its variance (≈ 3^k / M).
    runs = np.stack([shadows.shadow_features(states, 400, seed=s) for s in range(40)])
    standard_error = runs[:, :, k:].std(axis=0) / np.sqrt(len(runs))
    assert np.all(np.abs(runs[:, :, k:].mean(axis=0) - exact[:, k:]) <= 5 * standard_error + 1e-12)
    naive_bias = (runs[:, :, :k] ** 2).mean(axis=0) - exact[:, k:]
    assert naive_bias[:, 12:].mean() > 0.01  # 2-body terms: 9/400 ≈ 0.02 upward bias
    assert np.array_equal(shadows.shadow_features(states, 400, seed=3), shadows.shadow_features(states, 400, seed=3))


def test_shadow_features_need_two_copies():
    with pytest.raises(ValueError):
        shadows.shadow_features(_known_states(), 1, seed=0)


@pytest.mark.parametrize("backend", ["default", "qiskit"])
def test_shot_estimates_converge_to_exact(backend):
    """The RMS error of M-shot ⟨Z_i⟩ estimates falls like 1/√M (within a factor 2 of √(Var/M) ≤ 1/√M)."""
    states = _known_states()
    x = vqc.pack_states(states)
    weights = np.random.default_rng(1).normal(0, 1, (2, 4, 2))
    exact = vqc.expectations(vqc.CircuitSpec(4, 2, embedding="state"), "default", x, weights)
    errors = {}
    for shots in (100, 10_000):
        spec = vqc.CircuitSpec(4, 2, embedding="state", shots=shots, seed=5)
        est = np.stack([vqc.expectations(spec.__class__(**{**spec.__dict__, "seed": s}), backend, x, weights) for s in range(8)])
        assert np.all(np.abs(est) <= 1 + 1e-9)
        errors[shots] = float(np.sqrt(np.mean((est - exact) ** 2)))
        bound = float(np.sqrt(np.mean(1 - exact**2) / shots))  # binomial: Var = (1 − ⟨Z⟩²)/M
        assert 0.5 * bound < errors[shots] < 2 * bound
    assert errors[10_000] < errors[100] / 5


def test_shot_gradients_are_sampled():
    """With shots the circuit's gradient comes from sampled parameter-shift circuits: finite, and not the exact gradient."""
    x = torch.as_tensor(vqc.pack_states(_known_states()))
    grads = []
    for shots in (0, 200):
        layer = vqc.quantum_layer(vqc.CircuitSpec(4, 1, embedding="state", shots=shots, seed=2), "default")
        with torch.no_grad():
            layer.get_parameter("weights").copy_(torch.full((1, 4, 2), 0.3, dtype=torch.float64))
        layer(x).sum().backward()
        grads.append(layer.get_parameter("weights").grad.numpy().copy())
    assert np.all(np.isfinite(grads[1]))
    assert not np.allclose(grads[0], grads[1])
    assert np.abs(grads[0] - grads[1]).max() < 1.0
