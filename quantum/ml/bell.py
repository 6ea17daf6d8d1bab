"""Bell sampling: what a client with a two-copy quantum memory measures (the ``bell`` client kind).

A client that can hold two copies of a state at once measures each qubit pair
(qubit i of copy 1, qubit i of copy 2) in the Bell basis. The pair's SWAP
operator is +1 on the three triplets and −1 on the singlet, so each pair
yields s_i = ±1, and for every subset A of the qubits at once

    E[∏_{i∈A} s_i] = Tr(SWAP_A · ρ⊗ρ) = Tr ρ_A²        (the swap trick)

One measurement of two copies is therefore an unbiased ±1 estimate of all
2^n − 1 subsystem purities together; from M copies (M/2 pairs) each estimate
has variance (1 − (Tr ρ_A²)²)/(M/2) ≤ 2/M, whatever |A| is. The concentratable
entanglement CE = 1 − 2^{−n} Σ_A Tr ρ_A² (Beckey et al., PRL 127, 140501,
2021), which labels ``ntangled``, is linear in these features.

A client without quantum memory (:mod:`.shadows`) needs products of Pauli
estimates for the same purities, with variance growing as 3^{|A|}: Bell
sampling's advantage is the well-known gap between learning with and without
quantum memory (Huang, Kueng & Preskill, PRL 126, 190505, 2021). Whether it
helps a federation is what ``qfl experiment quantum-mixed --quantum-kind
bell`` measures.

Sampling is exact: the sign pattern s ∈ {±1}^n has the distribution whose
Fourier coefficients are the purities, P(s) = 2^{−n} Σ_A (∏_{i∈A} s_i) Tr ρ_A²,
computed with one Walsh–Hadamard transform per state; the Bell outcomes beyond
their signs carry nothing these features use.
"""

from __future__ import annotations

import numpy as np

from . import qdata


def num_features(qubits: int) -> int:
    """Length of a :func:`bell_features` row: one purity per non-empty subset of the qubits, 2^n − 1."""
    return 2**qubits - 1


def all_subset_purities(states: np.ndarray) -> np.ndarray:
    """``(B, 2^n)``: column ``a`` is Tr ρ_A² of the subset A = {qubit i : bit i of a set} (1 for ∅ and for all).

    Pure states only: Tr ρ_A² = Tr ρ_Ā², so half the subsets are computed (:func:`qdata.subset_purities`).
    """
    states = np.atleast_2d(states)
    n = qdata._qubits_of(states)
    full = (1 << n) - 1
    out = np.ones((len(states), 1 << n))
    for subset, purity in qdata.subset_purities(states).items():
        mask = sum(1 << q for q in subset)
        out[:, mask] = purity
        out[:, full ^ mask] = purity
    return out


def bell_features(states: np.ndarray, copies: int, seed: int) -> np.ndarray:
    """Rows of Bell-sampling estimates of Tr ρ_A² for every non-empty subset A, from ``copies`` copies per state.

    ``copies = 0``: the exact purities (unlimited copies). Otherwise ``copies // 2`` Bell measurements of
    two copies each (``copies >= 2``); an odd copy is left unused. Deterministic in ``seed``.
    """
    purities = all_subset_purities(states)
    if copies == 0:
        return purities[:, 1:]
    if copies < 2:
        raise ValueError(f"Bell sampling measures two copies at a time: copies must be >= 2 or 0 (exact), got {copies}")
    n = qdata._qubits_of(np.atleast_2d(states))
    pairs = copies // 2
    pattern = qdata._walsh_hadamard(purities, n) / 2**n  # P(s), s as a bit mask of the singlet outcomes
    pattern = np.clip(pattern, 0.0, None)
    pattern /= pattern.sum(axis=1, keepdims=True)
    rng = np.random.default_rng([seed, 0xBE11])
    counts = np.stack([rng.multinomial(pairs, p) for p in pattern]).astype(np.float64)
    return (qdata._walsh_hadamard(counts, n) / pairs)[:, 1:]
