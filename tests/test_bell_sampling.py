"""Bell sampling (qfl.quantum.ml.bell): what a client with a two-copy quantum memory measures."""

import itertools

import numpy as np
import pytest

from qfl.quantum.ml import qdata
from qfl.quantum.ml.bell import all_subset_purities, bell_features, num_features


def _bell_outcome_probabilities(states: np.ndarray) -> np.ndarray:
    """Born probabilities of measuring ψ⊗ψ's qubit pairs (i, n+i) in the Bell basis: CNOT(i→n+i), H(i), then Z."""
    b, n = len(states), int(np.log2(states.shape[1]))
    two = (states.reshape((b,) + (2,) * n + (1,) * n) * states.reshape((b,) + (1,) * n + (2,) * n))
    h = np.array([[1, 1], [1, -1]]) / np.sqrt(2)
    cnot = np.eye(4)[[0, 1, 3, 2]].reshape(2, 2, 2, 2)
    for i in range(n):
        two = np.moveaxis(two, [1 + i, 1 + n + i], [-2, -1])
        two = np.einsum("cdab,...ab->...cd", cnot, two)
        two = np.einsum("ca,...ab->...cb", h, two)
        two = np.moveaxis(two, [-2, -1], [1 + i, 1 + n + i])
    return (np.abs(two) ** 2).reshape(b, -1)


def _states(n=4, count=6):
    return qdata.load_quantum_dataset("ntangled", n, 40, seed=0).x_train[:count]


def test_the_features_are_the_swap_test_of_a_simulated_bell_measurement():
    states = _states()
    n = 4
    probs = _bell_outcome_probabilities(states)
    bits = np.array(list(itertools.product([0, 1], repeat=2 * n)))
    singlet = (bits[:, :n] == 1) & (bits[:, n:] == 1)  # the singlet lands on |11>: SWAP eigenvalue −1
    signs = np.stack([np.prod(np.where(singlet[:, [i for i in range(n) if a >> i & 1]], -1.0, 1.0), axis=1)
                      for a in range(1, 2**n)], axis=1)
    assert np.allclose(probs @ signs, bell_features(states, 0, seed=0), atol=1e-12)


def test_exact_features_are_the_subsystem_purities_and_give_the_concentratable_entanglement():
    states = _states()
    purities = all_subset_purities(states)
    assert purities.shape == (6, 16) and np.allclose(purities[:, 0], 1) and np.allclose(purities[:, -1], 1)
    for subset, value in qdata.subset_purities(states).items():
        assert np.allclose(purities[:, sum(1 << q for q in subset)], value)
    ce = 1 - purities.sum(axis=1) / 16
    assert np.allclose(ce, qdata.concentratable_entanglement(states))
    assert bell_features(states, 0, seed=0).shape == (6, num_features(4)) == (6, 15)


def test_sampled_features_are_unbiased_with_variance_at_most_two_over_m():
    state = _states(count=1)
    exact = bell_features(state, 0, seed=0)[0]
    copies, draws = 200, 400
    samples = bell_features(np.repeat(state, draws, axis=0), copies, seed=5)
    assert np.all(np.abs(samples) <= 1)
    se = np.sqrt((1 - exact**2) / (copies // 2) / draws)
    assert np.all(np.abs(samples.mean(axis=0) - exact) <= 5 * se + 1e-12)
    assert np.all(samples.var(axis=0) <= 1.3 * 2 / copies + 1e-12)
    assert np.array_equal(samples, bell_features(np.repeat(state, draws, axis=0), copies, seed=5))  # seeded


def test_one_copy_cannot_be_bell_sampled():
    with pytest.raises(ValueError):
        bell_features(_states(count=1), 1, seed=0)
