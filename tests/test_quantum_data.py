"""The generated quantum datasets: labels checked by concentratable entanglement and stabilizer Rényi entropy."""

import itertools
from functools import reduce

import numpy as np
import pytest

from qfl.quantum.ml import qdata

_PAULIS = [np.eye(2), np.array([[0, 1], [1, 0]]), np.array([[0, -1j], [1j, 0]]), np.diag([1.0, -1.0])]


def _ghz(n):
    psi = np.zeros((1, 2**n), complex)
    psi[0, 0] = psi[0, -1] = 2**-0.5
    return psi


def _random_states(b, n, seed):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(b, 2**n)) + 1j * rng.normal(size=(b, 2**n))
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def _ce_brute(psi, n):
    """CE from explicit reduced density matrices of every subset."""
    t = psi.reshape((2,) * n)
    total = 0.0
    for size in range(n + 1):
        for alpha in itertools.combinations(range(n), size):
            rest = [q for q in range(n) if q not in alpha]
            m = t.transpose(list(alpha) + rest).reshape(2**size, -1)
            rho = m @ m.conj().T
            total += np.real(np.trace(rho @ rho))
    return 1 - total / 2**n


def _m2_brute(psi, n):
    s = 0.0
    for idx in itertools.product(range(4), repeat=n):
        p = reduce(np.kron, [_PAULIS[i] for i in idx])
        s += np.real(psi.conj() @ p @ psi) ** 4
    return -np.log2(s / 2**n)


def test_ce_of_known_states():
    for n in (3, 4, 6):
        assert qdata.concentratable_entanglement(_ghz(n))[0] == pytest.approx(0.5 - 2.0**-n)
        assert qdata.concentratable_entanglement(qdata.zero_states(2, n)) == pytest.approx([0.0, 0.0], abs=1e-12)
    bell_0 = np.zeros(8, complex)
    bell_0[[0b000, 0b110]] = 2**-0.5  # Bell pair on qubits 0, 1 and |0> on qubit 2
    assert qdata.concentratable_entanglement(bell_0)[0] == pytest.approx(0.25)
    states = _random_states(3, 5, 0)
    assert qdata.concentratable_entanglement(states) == pytest.approx([_ce_brute(s, 5) for s in states], abs=1e-12)
    assert qdata.concentratable_entanglement(_random_states(200, 4, 1)).mean() == pytest.approx(qdata.haar_ce(4), abs=0.01)


def test_m2_of_known_states():
    t_state = np.array([[1, np.exp(1j * np.pi / 4)]]) / 2**0.5
    assert qdata.stabilizer_renyi_entropy(t_state)[0] == pytest.approx(np.log2(4 / 3))
    assert qdata.stabilizer_renyi_entropy(_ghz(5))[0] == pytest.approx(0.0, abs=1e-12)
    states = _random_states(2, 3, 2)
    assert qdata.stabilizer_renyi_entropy(states) == pytest.approx([_m2_brute(s, 3) for s in states], abs=1e-10)


def test_hea_states_match_explicit_matrices():
    n, rng = 3, np.random.default_rng(3)
    params = rng.uniform(-np.pi, np.pi, (1, 2, n, 2))
    cnot = lambda c, t: sum(  # noqa: E731
        reduce(np.kron, [np.outer(np.eye(2)[b], np.eye(2)[b]) if q == c else (_PAULIS[1] if (q == t and b) else np.eye(2)) for q in range(n)])
        for b in (0, 1)
    )
    psi = np.eye(2**n)[0].astype(complex)
    for layer in range(2):
        for i in range(n):
            g = qdata.rz(params[0, layer, i, 1 : 2])[0] @ qdata.ry(params[0, layer, i, 0:1])[0]
            psi = reduce(np.kron, [g if q == i else np.eye(2) for q in range(n)]) @ psi
        for c, t in qdata.ring(n):
            psi = cnot(c, t) @ psi
    assert qdata.hea_states(params, n)[0] == pytest.approx(psi, abs=1e-12)


@pytest.mark.parametrize("n", [4, 5])
def test_ntangled_labels_are_ce_levels(n):
    states, labels, ce = qdata.make_ntangled(n, 60, seed=1)
    assert states.shape == (60, 2**n)
    assert np.linalg.norm(states, axis=1) == pytest.approx(np.ones(60))
    assert np.bincount(labels).tolist() == [30, 30]
    recomputed = qdata.concentratable_entanglement(states)  # an independent check of the stored measure
    levels = qdata.ntangled_levels(n)
    for k, level in enumerate(levels):
        assert recomputed[labels == k] == pytest.approx(np.full(30, level), abs=1e-5)
    assert recomputed[labels == 0].max() < recomputed[labels == 1].min()
    assert ce == pytest.approx(recomputed)


def test_ntangled_more_levels_and_reproducible():
    a = qdata.make_ntangled(4, 30, seed=7, levels=(0.445, 0.455, 0.465))
    b = qdata.make_ntangled(4, 30, seed=7, levels=(0.445, 0.455, 0.465))
    c = qdata.make_ntangled(4, 30, seed=8, levels=(0.445, 0.455, 0.465))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.allclose(a[0], c[0])
    for k, level in enumerate((0.445, 0.455, 0.465)):
        assert a[2][a[1] == k] == pytest.approx(np.full(10, level), abs=1e-5)


@pytest.mark.parametrize("n", [4, 5])
def test_magic_labels_checked_by_m2(n):
    states, labels, m2 = qdata.make_magic(n, 40, seed=2)
    recomputed = qdata.stabilizer_renyi_entropy(states)
    assert recomputed[labels == 0] == pytest.approx(np.zeros(20), abs=1e-9)  # stabilizer states: M2 = 0
    assert recomputed[labels == 1].min() > qdata.MAGIC_MIN_M2  # T-doped: M2 > 0
    assert m2 == pytest.approx(recomputed)
    again = qdata.make_magic(n, 40, seed=2)
    assert np.array_equal(states, again[0])


def test_qubit_range_is_enforced():
    for bad in (3, 9):
        with pytest.raises(ValueError):  # 4 to 8 qubits
            qdata.make_ntangled(bad, 10, 0)
        with pytest.raises(ValueError):
            qdata.make_magic(bad, 10, 0)


def test_summaries_are_shot_estimates():
    states = qdata.make_ntangled(4, 20, seed=3)[0]
    exact = qdata.classical_summary(states, shots=0, seed=0)
    assert np.abs(exact).max() < 1e-12  # no single-qubit signal
    few = qdata.classical_summary(states, shots=16, seed=0)
    assert np.all(np.isin(np.round((few + 1) * 8), np.arange(17)))  # k/16 estimates


def test_loader_splits_stratified_and_caches():
    data = qdata.load_quantum_dataset("ntangled", 4, 50, test_fraction=0.2, seed=0)
    assert len(data.y_train) == 40 and len(data.y_test) == 10
    assert np.bincount(data.y_test).tolist() == [5, 5]
    assert data.summary_train.shape == (40, 4, 3)
    assert qdata.load_quantum_dataset("ntangled", 4, 50, test_fraction=0.2, seed=0) is data
    with pytest.raises(ValueError):  # an unknown dataset
        qdata.load_quantum_dataset("nope", 3, 50)


@pytest.mark.parametrize("n", [4, 5, 6])
def test_code_states_have_maximally_mixed_qubits(n):
    states = _random_states(20, n, 4)
    projected, weight = qdata.project_marginal_code(states)
    assert np.all(weight > 0)
    assert np.abs(qdata.bloch_vectors(projected)).max() < 1e-12
    for a, b in qdata.marginal_code(n):  # the code's generators commute and stabilise the projected states
        assert qdata.apply_pauli(projected, a, b) == pytest.approx(projected, abs=1e-12)
    assert qdata.concentratable_entanglement(qdata.project_marginal_code(qdata.zero_states(1, n))[0])[0] == pytest.approx(qdata.ghz_ce(n))


def test_local_twirl_keeps_ce_and_m2():
    rng = np.random.default_rng(5)
    states = _random_states(6, 4, 5)
    assert qdata.concentratable_entanglement(qdata.local_twirl(states, rng)) == pytest.approx(qdata.concentratable_entanglement(states))
    assert qdata.stabilizer_renyi_entropy(qdata.local_twirl(states, rng, clifford=True)) == pytest.approx(
        qdata.stabilizer_renyi_entropy(states)
    )
    assert len(qdata.CLIFFORD_1Q_GROUP) == 24
    twirled = qdata.local_twirl(states, rng)
    assert not np.allclose(np.abs(twirled), np.abs(states))  # the local frame changed


@pytest.mark.parametrize("name", qdata.QUANTUM_DATASETS)
@pytest.mark.parametrize("n", [4, 5])
def test_no_single_qubit_shortcut(name, n):
    """The best classifier on exact single-qubit expectations stays near chance on balanced classes."""
    from qfl.quantum.ml.baselines import single_qubit_accuracy

    data = qdata.load_quantum_dataset(name, n, 200, seed=1)
    assert np.bincount(data.y_test).tolist() == [20, 20]
    assert single_qubit_accuracy(data, seed=0)["best"] <= 0.60
