"""Classical shadows from randomized Pauli measurements (Huang, Kueng & Preskill, Nat. Phys. 16, 1050, 2020).

A client without quantum memory measures each of its M copies of a state once:
every qubit in a basis X, Y or Z drawn uniformly at random, outcome b_i = ±1.
Snapshot m of Pauli P (support S, P_i ∈ {X, Y, Z}) is

    p̂_m(P) = ∏_{i ∈ S} 3·b_i·[basis_i = P_i]      (0 unless every qubit of S was measured in P_i's basis)

and E[p̂_m(P)] = ⟨P⟩ exactly: each factor has E = ⟨P_i⟩-conditional, 1/3 chance
of the right basis times 3. Var p̂_m ≤ 3^{|S|}, so the mean over M snapshots has
standard deviation ≤ √(3^{|S|}/M): ≤ 1.73/√M for 1-body, 3/√M for 2-body terms.

:func:`shadow_features` keeps, for every 1- and 2-body Pauli (3n + 9·n(n−1)/2
terms; 66 at n = 4), the shadow estimate ⟨P⟩^ and an unbiased estimate of
⟨P⟩²: the product of the estimates from the two halves of the snapshots
(independent, so E[⟨P⟩^_A ⟨P⟩^_B] = ⟨P⟩²; the square of one estimate would
carry a bias Var ≈ 3^{|S|}/M). Squares matter: a local unitary rotates the signed
⟨P⟩ but leaves e.g. Σ_{a,b} ⟨σ_a^i σ_b^j⟩² (a two-qubit purity) unchanged.

Sampling is exact (inverse CDF on the rotated state's Born probabilities), in
chunks of states so that at most ``max_amplitudes`` complex amplitudes are live.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np

from . import qdata

# Basis-change gates U with U·P·U† = Z: X → H, Y → H·S†, Z → I.
_SDG = np.diag([1, -1j]).astype(np.complex128)
_TO_Z = np.stack([qdata._H, qdata._H @ _SDG, qdata._I])
_PAULI = np.stack([np.array([[0, 1], [1, 0]]), np.array([[0, -1j], [1j, 0]]), np.diag([1, -1])]).astype(np.complex128)


def pair_list(qubits: int) -> list[tuple[int, int]]:
    """Qubit pairs (i < j) in the order the 2-body features use."""
    return list(combinations(range(qubits), 2))


def num_features(qubits: int) -> int:
    """Length of a :func:`shadow_features` row: 2·(3n + 9·n(n−1)/2)."""
    return 2 * (3 * qubits + 9 * len(pair_list(qubits)))


def sample_snapshots(states: np.ndarray, copies: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Measure ``copies`` copies of each state in random Pauli bases: (bases ``(B, M, n)`` in {0: X, 1: Y, 2: Z}, outcomes ±1)."""
    states = np.atleast_2d(states)
    n = qdata._qubits_of(states)
    b = states.shape[0]
    bases = rng.integers(3, size=(b, copies, n)).astype(np.int8)
    psi = np.repeat(states, copies, axis=0)  # (B·M, 2^n): one row per copy
    for wire in range(n):
        psi = qdata.apply_1q(psi, _TO_Z[bases[:, :, wire].reshape(-1)], wire, n)
    cdf = np.cumsum(np.abs(psi) ** 2, axis=1)
    u = rng.random((len(psi), 1)) * cdf[:, -1:]
    index = np.minimum(np.sum(cdf < u, axis=1), psi.shape[1] - 1)
    bits = (index[:, None] >> (n - 1 - np.arange(n))[None, :]) & 1  # wire i = bit n−1−i
    return bases, (1 - 2 * bits).reshape(b, copies, n).astype(np.int8)


def snapshot_estimates(bases: np.ndarray, outcomes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shadow estimates of every 1-body ``(B, n, 3)`` and 2-body ``(B, pairs, 3, 3)`` Pauli expectation."""
    b, m, n = bases.shape
    hat = np.zeros((b, m, n, 3))
    np.put_along_axis(hat, bases[..., None].astype(np.int64), 3.0 * outcomes[..., None], axis=-1)
    one = hat.mean(axis=1)
    two = np.stack([np.einsum("bma,bmc->bac", hat[:, :, i], hat[:, :, j]) / m for i, j in pair_list(n)], axis=1)
    return one, two


def exact_estimates(states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact 1-body ``(B, n, 3)`` and 2-body ``(B, pairs, 3, 3)`` Pauli expectations (what shadows estimate)."""
    states = np.atleast_2d(states)
    n = qdata._qubits_of(states)
    b = states.shape[0]
    psi = states.reshape((b,) + (2,) * n)
    two = []
    for i, j in pair_list(n):
        rest = [1 + q for q in range(n) if q not in (i, j)]
        m = psi.transpose([0, 1 + i, 1 + j] + rest).reshape(b, 4, -1)
        rho = m @ np.conj(np.swapaxes(m, 1, 2))  # (B, 4, 4)
        ops = np.einsum("aij,ckl->acikjl", _PAULI, _PAULI).reshape(3, 3, 4, 4)
        two.append(np.real(np.einsum("acij,bji->bac", ops, rho)))
    return qdata.bloch_vectors(states), np.stack(two, axis=1)


def features_from_estimates(one: np.ndarray, two: np.ndarray) -> np.ndarray:
    """Flatten 1- and 2-body estimates into rows ``(B, 3n + 9·pairs)``."""
    return np.concatenate([one.reshape(len(one), -1), two.reshape(len(two), -1)], axis=1)


def shadow_features(states: np.ndarray, copies: int, seed: int, max_amplitudes: int = 2**22) -> np.ndarray:
    """Rows of [⟨P⟩^ for all 1-, 2-body P | unbiased ⟨P⟩² estimates] from ``copies`` (≥ 2) random Pauli snapshots per state.

    ``copies = 0``: the exact expectations and their squares (unlimited copies).

    Deterministic in ``seed``. Cost: O(B·M·2^n·n) to sample; memory ≤ ``max_amplitudes`` complex amplitudes.
    """
    states = np.atleast_2d(states)
    if copies == 0:  # unlimited copies: the exact expectations and their squares
        exact = features_from_estimates(*exact_estimates(states))
        return np.concatenate([exact, exact**2], axis=1)
    if copies < 2:
        raise ValueError(f"classical shadows need copies >= 2 (two halves for the squared estimates) or 0 (exact), got {copies}")
    n = qdata._qubits_of(states)
    rng = np.random.default_rng([seed, 0x5AD])
    chunk = max(1, max_amplitudes // (copies * 2**n))
    half = copies // 2
    rows = []
    for start in range(0, len(states), chunk):
        bases, outcomes = sample_snapshots(states[start : start + chunk], copies, rng)
        mean = features_from_estimates(*snapshot_estimates(bases, outcomes))
        first = features_from_estimates(*snapshot_estimates(bases[:, :half], outcomes[:, :half]))
        second = features_from_estimates(*snapshot_estimates(bases[:, half:], outcomes[:, half:]))
        rows.append(np.concatenate([mean, first * second], axis=1))
    return np.concatenate(rows, axis=0)
