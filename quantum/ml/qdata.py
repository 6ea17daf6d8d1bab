"""Quantum datasets generated locally (NTangled-style and stabilizer vs magic) and their measures.

Everything here is plain numpy state-vector code. A batch of ``B`` pure states
on ``n`` qubits is a complex128 array ``(B, 2**n)``; qubit (wire) 0 is the most
significant bit of the index, PennyLane's convention.

Measures
--------
* **Concentratable entanglement** (Beckey et al., PRL 127, 140501, 2021)::

      CE(ψ) = 1 − 2^{−n} Σ_{α ⊆ {1..n}} Tr ρ_α²

  with ρ_∅ = 1 (purity 1). CE = 0 exactly for product states; GHZ_n has
  1/2 − 2^{−n}. For a pure state Tr ρ_α² = Tr ρ_ᾱ², so half the subsets suffice.
* **Stabilizer Rényi entropy** of order 2 (Leone, Oliviero, Hamma, PRL 128,
  050402, 2022)::

      M₂(ψ) = −log₂( 2^{−n} Σ_{P ∈ {I,X,Y,Z}^{⊗n}} ⟨ψ|P|ψ⟩⁴ )

  M₂ = 0 exactly for stabilizer states (2^n Paulis with ⟨P⟩ = ±1, the rest 0)
  and M₂ > 0 for every non-stabilizer pure state. All 4^n expectations come
  from one Walsh–Hadamard transform per shift ``a``:
  ``⟨X^a Z^b⟩ = Σ_x ψ*(x⊕a) ψ(x) (−1)^{b·x}`` (|⟨P⟩| does not depend on the
  phase i^{a·b} that makes X^a Z^b Hermitian).

Datasets
--------
Neither dataset has a local shortcut: every state is projected into the code
of :func:`marginal_code` (commuting Paulis such as X^{⊗n}, Z^{⊗n}), where every
qubit's reduced state is exactly I/2, and then gets an independent random gate
on every qubit (:func:`local_twirl`). So the exact single-qubit expectations are
0 for every state of both classes and no classifier on them beats chance
(:func:`qfl.quantum.ml.baselines.single_qubit_accuracy`, checked in the tests).
At 3 qubits CE is a function of the single-qubit purities alone, so the
datasets start at :data:`MIN_QUBITS` = 4.

* **ntangled** (after NTangled, Schatzki et al., arXiv:2109.03400): each state
  walks the path ψ(t) = Π·HEA(t·θ₀)|0…0⟩ from GHZ_n (t = 0) to a projected
  random hardware-efficient-ansatz state (θ₀ ~ U(−π, π), ``n`` layers);
  bisection finds the t where CE reaches the level exactly (draws whose end
  point stays below it are redrawn). Then Haar-random single-qubit unitaries
  (CE unchanged). Label = index of the CE level (:func:`ntangled_levels`).
* **magic**: random Clifford circuits on |0…0⟩ — per layer every qubit gets
  one of I, H, S, HS, SH, then a brickwork of CNOTs with random direction
  (:data:`MAGIC_LAYERS` layers); label 1 adds ``t_gates`` (default n) T gates
  after random single-qubit gates. Then Π (a stabilizer state stays one) and
  random single-qubit Cliffords (M₂ unchanged). Label 0 has M₂ = 0; a label-1
  draw with M₂ ≤ :data:`MAGIC_MIN_M2` is redrawn, so every label is checked by M₂.

Both are deterministic in ``seed`` and cached per process.

Classical summaries
-------------------
:func:`classical_summary` (the ``hybrid`` client's input): ⟨X_i⟩, ⟨Y_i⟩, ⟨Z_i⟩
estimated from ``shots`` measurements per basis and qubit. On these datasets it
is pure shot noise (the exact values are 0); classical clients use classical
shadows instead (:mod:`qfl.quantum.ml.shadows`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from itertools import combinations

import numpy as np

MIN_QUBITS = 4  # at 3 qubits CE is a function of the single-qubit purities: no dataset without a local shortcut
MAX_QUBITS = 8
QUANTUM_DATASETS = ("ntangled", "magic")
MAGIC_LAYERS = 1  # brickwork layers of the random Clifford circuits (why one: module docstring)
MAGIC_MIN_M2 = 0.05  # a T-doped state with smaller M₂ is redrawn (its T gates nearly cancelled)
SUMMARY_SHOTS = 16  # shots per Pauli basis and qubit of a classical summary

_H = np.array([[1, 1], [1, -1]], dtype=np.complex128) / np.sqrt(2)
_S = np.diag([1, 1j]).astype(np.complex128)
_T = np.diag([1, np.exp(1j * np.pi / 4)]).astype(np.complex128)
_I = np.eye(2, dtype=np.complex128)
_CLIFFORD_1Q = (_I, _H, _S, _H @ _S, _S @ _H)  # matrices; "HS" = apply S then H


# ----------------------------------------------------------------------------- state-vector kernels


def zero_states(batch: int, qubits: int) -> np.ndarray:
    """``batch`` copies of |0…0⟩ as ``(batch, 2**qubits)`` complex128."""
    psi = np.zeros((batch, 2**qubits), dtype=np.complex128)
    psi[:, 0] = 1.0
    return psi


def apply_1q(psi: np.ndarray, gate: np.ndarray, wire: int, qubits: int) -> np.ndarray:
    """Apply a single-qubit gate (``(2, 2)`` or per state ``(B, 2, 2)``) to ``wire``."""
    b = psi.shape[0]
    view = psi.reshape(b, 2**wire, 2, 2 ** (qubits - wire - 1))
    g = gate.reshape(-1, 2, 2)[:, :, :, None, None]  # (1 or B, 2, 2, 1, 1)
    v0, v1 = view[:, :, 0], view[:, :, 1]
    out = np.stack([g[:, 0, 0] * v0 + g[:, 0, 1] * v1, g[:, 1, 0] * v0 + g[:, 1, 1] * v1], axis=2)
    return out.reshape(b, -1)


def apply_cnot(psi: np.ndarray, control: int, target: int, qubits: int) -> np.ndarray:
    """Apply CNOT(control → target)."""
    b = psi.shape[0]
    out = psi.reshape((b,) + (2,) * qubits).copy()
    sel: list[slice | int] = [slice(None)] * (qubits + 1)
    sel[1 + control] = 1
    sub = out[tuple(sel)]  # the control = 1 half; the target axis shifts left if target > control
    axis = 1 + target - (1 if target > control else 0)
    out[tuple(sel)] = np.flip(sub, axis=axis)
    return out.reshape(b, -1)


def ry(theta: np.ndarray) -> np.ndarray:
    """RY(θ) = exp(−iθY/2) for a vector of angles: ``(B, 2, 2)``."""
    c, s = np.cos(theta / 2), np.sin(theta / 2)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2).astype(np.complex128)


def rz(theta: np.ndarray) -> np.ndarray:
    """RZ(θ) = exp(−iθZ/2) for a vector of angles: ``(B, 2, 2)``."""
    m = np.zeros(theta.shape + (2, 2), dtype=np.complex128)
    m[..., 0, 0] = np.exp(-0.5j * theta)
    m[..., 1, 1] = np.exp(0.5j * theta)
    return m


def ring(qubits: int) -> list[tuple[int, int]]:
    """The CNOT ring of the hardware-efficient ansatz: (0,1), (1,2), …, (n−1,0)."""
    return [(i, (i + 1) % qubits) for i in range(qubits)] if qubits > 2 else [(0, 1)]


def hea_states(params: np.ndarray, qubits: int) -> np.ndarray:
    """States of the hardware-efficient ansatz on |0…0⟩; ``params`` is ``(B, layers, qubits, 2)``.

    Each layer: RY(θ[l, i, 0]) then RZ(θ[l, i, 1]) on every qubit i, then the CNOT ring.
    The same circuit as :mod:`qfl.quantum.ml.vqc` builds for ``ansatz="hardware-efficient"``.
    """
    psi = zero_states(params.shape[0], qubits)
    for layer in range(params.shape[1]):
        for i in range(qubits):
            psi = apply_1q(psi, rz(params[:, layer, i, 1]) @ ry(params[:, layer, i, 0]), i, qubits)
        for c, t in ring(qubits):
            psi = apply_cnot(psi, c, t, qubits)
    return psi


# ----------------------------------------------------------------------------- local symmetries


def marginal_code(qubits: int) -> list[tuple[int, int]]:
    """Commuting Pauli generators ``(x_mask, z_mask)`` whose joint +1 eigenspace holds only locally maximally mixed states.

    Every single-qubit Pauli P_i anticommutes with some generator g, so a state
    with g|ψ⟩ = |ψ⟩ has ⟨P_i⟩ = ⟨ψ|P_i g|ψ⟩ = −⟨ψ|g P_i|ψ⟩ = 0: each qubit's
    reduced state is I/2. Even n: X^{⊗n}, Z^{⊗n} (code dimension 2^{n−2}).
    Odd n: X^{⊗n}, Z^{⊗(n−1)}⊗I, I^{⊗(n−2)}⊗Z⊗Z (dimension 2^{n−3}; at n = 3 the
    code holds GHZ alone, which is why the datasets start at 4 qubits).
    Masks use wire i ↦ bit n−1−i (wire 0 is the most significant bit).
    """
    full = 2**qubits - 1
    if qubits % 2 == 0:
        return [(full, 0), (0, full)]
    return [(full, 0), (0, full & ~1), (0, 0b11)]


def apply_pauli(psi: np.ndarray, x_mask: int, z_mask: int) -> np.ndarray:
    """X^a Z^b |ψ⟩ for bit masks a, b on a batch ``(B, 2**n)`` (Z first, then X)."""
    idx = np.arange(psi.shape[-1])
    parity = np.array([bin(v).count("1") & 1 for v in (idx & z_mask)])
    phased = psi * (1 - 2 * parity)
    return phased[:, idx ^ x_mask]


def project_marginal_code(psi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Π|ψ⟩/‖Π|ψ⟩‖ with Π = ∏_g (I + g)/2 over :func:`marginal_code`; returns (states, ‖Π|ψ⟩‖²).

    Π maps a stabilizer state to a stabilizer state (or to 0, when −g is in its group).
    """
    n = _qubits_of(psi)
    out = np.array(psi, dtype=np.complex128)
    for a, b in marginal_code(n):
        out = (out + apply_pauli(out, a, b)) / 2
    weight = np.sum(np.abs(out) ** 2, axis=1)
    return out / np.sqrt(np.where(weight > 0, weight, 1.0))[:, None], weight


def haar_unitaries_1q(rng: np.random.Generator, count: int) -> np.ndarray:
    """``count`` Haar-random 2×2 unitaries ``(count, 2, 2)`` (QR of a complex Gaussian, phases fixed)."""
    z = (rng.normal(size=(count, 2, 2)) + 1j * rng.normal(size=(count, 2, 2))) / np.sqrt(2)
    q, r = np.linalg.qr(z)
    d = np.diagonal(r, axis1=1, axis2=2)
    return q * (d / np.abs(d))[:, None, :]


def _clifford_group_1q() -> np.ndarray:
    """The 24 single-qubit Cliffords modulo phase, as words in H and S: ``(24, 2, 2)``."""
    found: list[np.ndarray] = [_I]
    frontier = [_I]
    while frontier:
        nxt = []
        for g in frontier:
            for h in (_H, _S):
                m = h @ g
                k = np.flatnonzero(np.abs(m.reshape(-1)) > 1e-9)[0]
                m = m * (abs(m.reshape(-1)[k]) / m.reshape(-1)[k])  # fix the global phase
                if not any(np.allclose(m, f) for f in found):
                    found.append(m)
                    nxt.append(m)
        frontier = nxt
    return np.stack(found)


CLIFFORD_1Q_GROUP = _clifford_group_1q()


def local_twirl(states: np.ndarray, rng: np.random.Generator, clifford: bool = False) -> np.ndarray:
    """Each state gets its own independent random single-qubit gate on every qubit.

    ``clifford = False``: Haar-random U(2) (leaves every entanglement measure,
    CE included, unchanged); ``True``: uniform over the 24 Cliffords (leaves M₂
    unchanged and maps stabilizer states to stabilizer states).
    """
    states = np.atleast_2d(states)
    n = _qubits_of(states)
    b = states.shape[0]
    out = states
    for wire in range(n):
        gates = CLIFFORD_1Q_GROUP[rng.integers(24, size=b)] if clifford else haar_unitaries_1q(rng, b)
        out = apply_1q(out, gates, wire, n)
    return out


# ----------------------------------------------------------------------------- measures


def _qubits_of(states: np.ndarray) -> int:
    n = int(round(np.log2(states.shape[-1])))
    if 2**n != states.shape[-1]:
        raise ValueError(f"a state vector needs 2**n amplitudes, got {states.shape[-1]}")
    return n


def subset_purities(states: np.ndarray) -> dict[tuple[int, ...], np.ndarray]:
    """Tr ρ_α² of every subset α with |α| <= n/2 that contains its own smaller half (one per {α, ᾱ} pair)."""
    states = np.atleast_2d(states)
    n = _qubits_of(states)
    b = states.shape[0]
    psi = states.reshape((b,) + (2,) * n)
    out: dict[tuple[int, ...], np.ndarray] = {}
    for size in range(1, n // 2 + 1):
        for alpha in combinations(range(n), size):
            if 2 * size == n and 0 not in alpha:
                continue  # its complement (which holds qubit 0) was counted
            rest = [q for q in range(n) if q not in alpha]
            m = psi.transpose([0] + [1 + q for q in alpha] + [1 + q for q in rest]).reshape(b, 2**size, -1)
            rho = m @ np.conj(np.swapaxes(m, 1, 2))
            out[alpha] = np.sum(np.abs(rho) ** 2, axis=(1, 2))
    return out


def concentratable_entanglement(states: np.ndarray) -> np.ndarray:
    """CE(ψ) = 1 − 2^{−n} Σ_α Tr ρ_α² for each pure state (rows of ``states``)."""
    states = np.atleast_2d(states)
    n = _qubits_of(states)
    total = np.full(states.shape[0], 2.0)  # α = ∅ and α = all qubits: purity 1
    for purity in subset_purities(states).values():
        total += 2 * purity  # α and its complement ᾱ have the same purity
    return 1.0 - total / 2**n


def _walsh_hadamard(x: np.ndarray, qubits: int) -> np.ndarray:
    """Unnormalised Walsh–Hadamard transform along the last axis (length 2**qubits)."""
    shape = x.shape
    y = x.reshape(-1, *(2,) * qubits)
    for axis in range(1, qubits + 1):
        a = np.take(y, 0, axis=axis)
        c = np.take(y, 1, axis=axis)
        y = np.stack([a + c, a - c], axis=axis)
    return y.reshape(shape)


def pauli_expectations(states: np.ndarray) -> np.ndarray:
    """|⟨ψ|X^a Z^b|ψ⟩| for all a, b: ``(B, 2**n, 2**n)`` (rows a = X part, columns b = Z part)."""
    states = np.atleast_2d(states)
    n = _qubits_of(states)
    d = 2**n
    idx = np.arange(d)
    shifted = states[:, idx[:, None] ^ idx[None, :]]  # ψ(x ⊕ a): (B, a, x)
    v = np.conj(shifted) * states[:, None, :]
    return np.abs(_walsh_hadamard(v, n))


def stabilizer_renyi_entropy(states: np.ndarray, chunk: int = 16) -> np.ndarray:
    """M₂(ψ) = −log₂(2^{−n} Σ_P ⟨P⟩⁴) for each pure state (0 for stabilizer states)."""
    states = np.atleast_2d(states)
    n = _qubits_of(states)
    out = np.empty(states.shape[0])
    for start in range(0, states.shape[0], chunk):
        e = pauli_expectations(states[start : start + chunk])
        out[start : start + chunk] = -np.log2(np.sum(e**4, axis=(1, 2)) / 2**n)
    return np.maximum(out, 0.0)  # round-off can give −1e-16


def bloch_vectors(states: np.ndarray) -> np.ndarray:
    """Exact single-qubit Pauli expectations (⟨X_i⟩, ⟨Y_i⟩, ⟨Z_i⟩): ``(B, n, 3)``."""
    states = np.atleast_2d(states)
    n = _qubits_of(states)
    b = states.shape[0]
    out = np.empty((b, n, 3))
    for i in range(n):
        v = states.reshape(b, 2**i, 2, -1)
        a0, a1 = v[:, :, 0, :], v[:, :, 1, :]
        cross = np.sum(np.conj(a0) * a1, axis=(1, 2))  # ρ_01 of qubit i
        out[:, i, 0] = 2 * cross.real
        out[:, i, 1] = 2 * cross.imag
        out[:, i, 2] = np.sum(np.abs(a0) ** 2 - np.abs(a1) ** 2, axis=(1, 2))
    return out


def classical_summary(states: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """Few-shot estimates of ⟨X_i⟩, ⟨Y_i⟩, ⟨Z_i⟩ (``shots`` per basis and qubit): ``(B, n, 3)``.

    Each estimate is ``2k/shots − 1`` with ``k ~ Binomial(shots, (1 + ⟨P⟩)/2)``;
    ``shots = 0`` returns the exact expectations.
    """
    exact = bloch_vectors(states)
    if shots <= 0:
        return exact
    p = np.clip((1.0 + exact) / 2.0, 0.0, 1.0)
    k = np.random.default_rng(seed).binomial(shots, p)
    return 2.0 * k / shots - 1.0


# ----------------------------------------------------------------------------- generators


def haar_ce(qubits: int) -> float:
    """Average CE of Haar-random states: 1 − 2^{−n} Σ_k C(n,k)(2^k + 2^{n−k})/(2^n + 1) = 1 − 2·3^n / (2^n (2^n + 1))."""
    d = 2**qubits
    return 1.0 - 2.0 * 3**qubits / (d * (d + 1))


def ghz_ce(qubits: int) -> float:
    """CE of GHZ_n, 1/2 − 2^{−n}: the start of every ntangled path (Π|0…0⟩ = GHZ)."""
    return 0.5 - 2.0**-qubits


@lru_cache(maxsize=None)
def code_ce(qubits: int) -> float:
    """Mean CE of projected random ansatz states Π·HEA(θ₀)|0…0⟩ (64 draws, fixed seed): the top of the ntangled paths."""
    rng = np.random.default_rng([qubits, 0xCE])
    theta = rng.uniform(-np.pi, np.pi, (64, qubits, qubits, 2))
    states, _ = project_marginal_code(hea_states(theta, qubits))
    return float(np.mean(concentratable_entanglement(states)))


def ntangled_levels(qubits: int) -> tuple[float, float]:
    """Default CE levels: 0.2 and 0.8 of the way from CE(GHZ_n) to :func:`code_ce` (0.445 / 0.468 at 4 qubits)."""
    lo, hi = ghz_ce(qubits), code_ce(qubits)
    return (round(lo + 0.2 * (hi - lo), 4), round(lo + 0.8 * (hi - lo), 4))


def _ntangled_path(theta0: np.ndarray, t: np.ndarray, qubits: int) -> np.ndarray:
    """Π·HEA(t·θ₀)|0…0⟩, normalised (Π of :func:`project_marginal_code`)."""
    return project_marginal_code(hea_states(t[:, None, None, None] * theta0, qubits))[0]


def make_ntangled(
    qubits: int, samples: int, seed: int, levels: tuple[float, ...] | None = None, layers: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NTangled-style states with no single-qubit signal: ``(states, labels, CE)``; label k has CE = ``levels[k]`` (to 1e-6).

    Each state lies on the path ψ(t) = Π·HEA(t·θ₀)|0…0⟩ (normalised), θ₀ ~ U(−π, π),
    projected by Π into the code of :func:`marginal_code`, so every qubit's
    reduced state is exactly I/2 in both classes; t = 0 is GHZ_n. Bisection
    finds the t where CE reaches the level (end points below it are redrawn).
    Last, every qubit gets an independent Haar-random unitary (:func:`local_twirl`),
    which leaves CE unchanged and removes any fixed local frame, so the classes
    differ only in their multipartite structure. Classes are balanced
    (round-robin). ``layers`` defaults to ``qubits``.
    """
    check_qubits(qubits)
    levels = tuple(levels) if levels is not None else ntangled_levels(qubits)
    layers = layers or qubits
    rng = np.random.default_rng([seed, 0x4E7])
    labels = np.arange(samples) % len(levels)
    targets = np.asarray(levels)[labels]
    if min(levels) <= ghz_ce(qubits):
        raise ValueError(f"CE levels {levels} must lie above CE(GHZ_{qubits}) = {ghz_ce(qubits):.4f}, where every path starts")
    theta0 = np.empty((samples, layers, qubits, 2))
    todo = np.arange(samples)
    for _ in range(100):  # redraw end points whose CE stays below their level
        theta0[todo] = rng.uniform(-np.pi, np.pi, (len(todo), layers, qubits, 2))
        ce_end = concentratable_entanglement(_ntangled_path(theta0[todo], np.ones(len(todo)), qubits))
        todo = todo[ce_end <= targets[todo] + 1e-3]
        if len(todo) == 0:
            break
    else:
        raise RuntimeError(f"CE levels {levels} are out of reach of {layers}-layer ansatz states on {qubits} qubits")
    lo, hi = np.zeros(samples), np.ones(samples)
    for _ in range(26):  # CE(0) < level < CE(1): keep a crossing bracketed
        mid = (lo + hi) / 2
        below = concentratable_entanglement(_ntangled_path(theta0, mid, qubits)) < targets
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    states = local_twirl(_ntangled_path(theta0, hi, qubits), rng)
    return states, labels.astype(np.int64), concentratable_entanglement(states)


def _clifford_circuit(rng: np.random.Generator, qubits: int, layers: int, t_slots: set[tuple[int, int]]) -> np.ndarray:
    """One random brickwork Clifford circuit on |0…0⟩, with T after the 1-qubit gate at each (layer, qubit) in ``t_slots``."""
    psi = zero_states(1, qubits)
    for layer in range(layers):
        for q in range(qubits):
            gate = _CLIFFORD_1Q[rng.integers(len(_CLIFFORD_1Q))]
            if (layer, q) in t_slots:
                gate = _T @ gate
            psi = apply_1q(psi, gate, q, qubits)
        for c in range(layer % 2, qubits - 1, 2):
            pair = (c, c + 1) if rng.integers(2) == 0 else (c + 1, c)
            psi = apply_cnot(psi, pair[0], pair[1], qubits)
    return psi[0]


def make_magic(
    qubits: int, samples: int, seed: int, t_gates: int | None = None, layers: int = MAGIC_LAYERS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stabilizer (label 0) vs T-doped (label 1) states with no single-qubit signal: ``(states, labels, M₂)``.

    Classes alternate. A magic state's circuit gets ``t_gates`` (default:
    ``qubits``) T gates in random (layer, qubit) slots, right after that slot's
    single-qubit Clifford. Every circuit's state is then projected by Π into the
    code of :func:`marginal_code` (every qubit's reduced state I/2; Π keeps a
    stabilizer state a stabilizer state) and every qubit gets an independent
    random single-qubit Clifford (:func:`local_twirl`, which leaves M₂ unchanged).
    A draw that Π annihilates, or a T-doped draw with M₂ ≤ :data:`MAGIC_MIN_M2`, is redrawn.
    """
    check_qubits(qubits)
    t_gates = qubits if t_gates is None else t_gates
    rng = np.random.default_rng([seed, 0x3A6])
    labels = np.arange(samples) % 2
    states = np.empty((samples, 2**qubits), dtype=np.complex128)
    slots_all = [(layer, q) for layer in range(layers) for q in range(qubits)]
    for k, label in enumerate(labels):
        for _ in range(1000):
            slots: set[tuple[int, int]] = set()
            if label == 1:
                pick = rng.choice(len(slots_all), size=min(t_gates, len(slots_all)), replace=False)
                slots = {slots_all[i] for i in pick}
            psi, weight = project_marginal_code(_clifford_circuit(rng, qubits, layers, slots)[None])
            if weight[0] > 1e-9 and (label == 0 or stabilizer_renyi_entropy(psi)[0] > MAGIC_MIN_M2):
                states[k] = psi[0]
                break
        else:
            raise RuntimeError("could not draw a magic state; raise t_gates")
    states = local_twirl(states, rng, clifford=True)
    return states, labels.astype(np.int64), stabilizer_renyi_entropy(states)


# ----------------------------------------------------------------------------- datasets


def check_qubits(qubits: int) -> None:
    """Raise ValueError unless MIN_QUBITS <= qubits <= MAX_QUBITS."""
    if not MIN_QUBITS <= qubits <= MAX_QUBITS:
        raise ValueError(
            f"quantum datasets support {MIN_QUBITS} to {MAX_QUBITS} qubits, got qubits={qubits}; "
            f"set qubits between {MIN_QUBITS} and {MAX_QUBITS}"
        )


@dataclass(frozen=True)
class QuantumDataset:
    """A labelled quantum dataset, split into train and test.

    ``x_*`` are state vectors ``(N, 2**qubits)`` complex128; ``measure_*`` the
    CE (ntangled) or M₂ (magic) of each state; ``summary_*`` its few-shot
    classical summary ``(N, qubits, 3)`` (see :func:`classical_summary`).
    """

    name: str
    qubits: int
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    measure_train: np.ndarray
    measure_test: np.ndarray
    summary_train: np.ndarray
    summary_test: np.ndarray


def load_quantum_dataset(
    name: str, qubits: int, samples: int, test_fraction: float = 0.2, seed: int = 0, summary_shots: int = SUMMARY_SHOTS
) -> QuantumDataset:
    """Generate (or take from the per-process cache) ``samples`` states of ``name``, split stratified."""
    return _load_cached(name, int(qubits), int(samples), float(test_fraction), int(seed), int(summary_shots))


@lru_cache(maxsize=8)
def _load_cached(name: str, qubits: int, samples: int, test_fraction: float, seed: int, summary_shots: int) -> QuantumDataset:
    if name == "ntangled":
        states, labels, measure = make_ntangled(qubits, samples, seed)
    elif name == "magic":
        states, labels, measure = make_magic(qubits, samples, seed)
    else:
        raise ValueError(f"unknown quantum dataset {name!r}; choose one of {', '.join(QUANTUM_DATASETS)}")
    rng = np.random.default_rng([seed, 0x5917])
    test = np.zeros(samples, dtype=bool)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test[idx[: int(round(len(idx) * test_fraction))]] = True
    summary = classical_summary(states, summary_shots, seed=int(np.random.SeedSequence([seed, 0x5A]).generate_state(1)[0]))
    for arr in (states, labels, measure, summary):
        arr.setflags(write=False)
    return QuantumDataset(
        name,
        qubits,
        states[~test],
        labels[~test],
        states[test],
        labels[test],
        int(labels.max()) + 1,
        measure[~test],
        measure[test],
        summary[~test],
        summary[test],
    )
