"""Circuit-level BB84 on Qiskit Aer: a cross-check of the Monte-Carlo in :mod:`.bb84`.

Every BB84 round is one qubit. A batch of ``batch`` independent qubits forms
one circuit (Clifford gates only, so Aer's stabilizer method simulates it
cheaply); all batches of a stage run as one Aer job with one shot each. Per
qubit:

* **Alice** prepares |0>, |1>, |+> or |->: ``x`` when her bit is 1, then ``h``
  when her basis is X (random bit and basis, classical randomness).
* **Eve** (with probability ``eve_fraction`` per qubit, intercept-resend): the
  tapped qubits go through a first circuit where she measures them in her
  random basis (``h`` then a Z measurement for X); she then *resends*: a fresh
  qubit prepared in the state she found (her result in her basis) replaces
  Alice's in the second circuit. (Two stages instead of a mid-circuit
  measure + reset + classically controlled ``x``: Aer gives the same
  statistics but runs the ``if_test`` version about ten times slower; it is
  kept as ``eve_mode="mid-circuit"``.)
* **Channel / detector noise** from :mod:`qiskit_aer.noise`, attached by a
  :class:`~qiskit_aer.noise.NoiseModel` to ``id`` gates placed in the circuit:

  - ``"depolarizing"``: a depolarizing channel of parameter ``2 e_d`` on the
    channel, after Eve and before Bob's basis change. It flips the outcome of a
    measurement in any basis with probability ``e_d``;
  - ``"bitflip"``: an X error with probability ``e_d`` after Bob's basis change,
    just before his measurement, i.e. a detector flip of whatever he measured:
    the misalignment model of :mod:`.bb84`.
* **Bob** measures in his random basis (``h`` then a Z measurement for X).

No loss, photon statistics or dark counts: this checks the quantum part, i.e.
that the sifted QBER is ``e_d`` without Eve and ``(1-p) e_d + p (1/4 + e_d/2)``
with intercept-resend on a fraction ``p`` (:func:`.bb84.expected_qber`), the
same statistics the vectorised Monte-Carlo draws classically.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qfl.quantum.qkd.bb84 import expected_qber

__all__ = [
    "CircuitBB84Result",
    "bb84_noise_model",
    "bob_circuit",
    "eve_circuit",
    "mid_circuit_eve_circuit",
    "simulate_bb84_circuits",
]

NOISE_KINDS = ("depolarizing", "bitflip")


@dataclass
class CircuitBB84Result:
    """Outcome of :func:`simulate_bb84_circuits`.

    ``qber``: errors / sifted bits (None when nothing was sifted);
    ``expected_qber``: the model value for ``e_d`` and ``eve_fraction``;
    ``eve_agreement``: on intercepted sifted qubits, the fraction where Eve's
    result equals Alice's bit (3/4 for intercept-resend: right in her basis,
    a coin otherwise); ``alice_sifted``/``bob_sifted``: uint8 0/1 arrays.
    """

    qubits: int
    sifted_bits: int
    errors: int
    qber: float | None
    expected_qber: float
    e_d: float
    noise: str | None
    eve_fraction: float
    intercepted: int
    eve_agreement: float | None
    alice_sifted: np.ndarray
    bob_sifted: np.ndarray
    seconds: float = 0.0


def bb84_noise_model(noise: str | None, e_d: float):
    """A NoiseModel putting the chosen channel on every ``id`` gate (None: no noise)."""
    if noise is None or e_d == 0:
        return None
    from qiskit_aer.noise import NoiseModel, depolarizing_error, pauli_error

    if noise == "depolarizing":
        error = depolarizing_error(2.0 * e_d, 1)
    elif noise == "bitflip":
        error = pauli_error([("X", e_d), ("I", 1.0 - e_d)])
    else:
        raise ValueError(f"noise must be one of {NOISE_KINDS} or None, got {noise!r}")
    model = NoiseModel(basis_gates=["id", "x", "h", "measure", "reset"])
    model.add_all_qubit_quantum_error(error, ["id"])
    return model


def _prepare(qc, bits: np.ndarray, bases: np.ndarray) -> None:
    """|0>, |1>, |+>, |->: ``x`` where the bit is 1, then ``h`` where the basis is X (1)."""
    if bits.any():
        qc.x([int(q) for q in np.flatnonzero(bits)])
    if bases.any():
        qc.h([int(q) for q in np.flatnonzero(bases)])


def eve_circuit(alice_bits: np.ndarray, alice_bases: np.ndarray, eve_bases: np.ndarray):
    """Alice's states measured by Eve in her bases (0 = Z, 1 = X); clbit q is qubit q's result."""
    from qiskit import QuantumCircuit

    w = len(alice_bits)
    qc = QuantumCircuit(w, w)
    _prepare(qc, alice_bits, alice_bases)
    if eve_bases.any():
        qc.h([int(q) for q in np.flatnonzero(eve_bases)])
    qc.measure(range(w), range(w))
    return qc


def _channel_and_bob(qc, w: int, bob_bases: np.ndarray, noise: str | None) -> None:
    """The channel's noise slot (an identity the noise model attaches to), Bob's bases, his measurement."""
    if noise == "depolarizing":
        qc.id(range(w))
    if bob_bases.any():
        qc.h([int(q) for q in np.flatnonzero(bob_bases)])
    if noise == "bitflip":
        qc.id(range(w))
    qc.measure(range(w), range(w))


def bob_circuit(bits: np.ndarray, bases: np.ndarray, bob_bases: np.ndarray, noise: str | None):
    """States (bits, bases) sent through the noisy channel and measured by Bob in ``bob_bases``.

    The ``id`` gates carry the noise channel: before Bob's basis change for
    "depolarizing" (the channel), after it for "bitflip" (the detector).
    """
    from qiskit import QuantumCircuit

    w = len(bits)
    qc = QuantumCircuit(w, w)
    _prepare(qc, bits, bases)
    _channel_and_bob(qc, w, bob_bases, noise)
    return qc


def mid_circuit_eve_circuit(
    alice_bits: np.ndarray,
    alice_bases: np.ndarray,
    eve_mask: np.ndarray,
    eve_bases: np.ndarray,
    bob_bases: np.ndarray,
    noise: str | None,
):
    """One circuit for the whole round, Eve acting mid-circuit on the qubits of ``eve_mask``.

    She rotates to her basis, measures into clbit ``w + q``, resets the qubit
    and re-prepares what she found (``x`` under ``if_test`` on her clbit, ``h``
    back for X). Clbit ``q`` holds Bob's result, clbit ``w + q`` Eve's.
    """
    from qiskit import QuantumCircuit

    w = len(alice_bits)
    qc = QuantumCircuit(w, 2 * w)
    _prepare(qc, alice_bits, alice_bases)
    tapped = [int(q) for q in np.flatnonzero(eve_mask)]
    if tapped:
        eve_x = [int(q) for q in np.flatnonzero(eve_mask & (eve_bases == 1))]
        if eve_x:
            qc.h(eve_x)
        qc.measure(tapped, [w + q for q in tapped])
        qc.reset(tapped)
        for q in tapped:
            with qc.if_test((qc.clbits[w + q], 1)):
                qc.x(q)
        if eve_x:
            qc.h(eve_x)
    _channel_and_bob(qc, w, bob_bases, noise)
    return qc


def _run_batches(sim, builder, columns, batch: int, seed: int) -> np.ndarray:
    """Run ``builder`` on batches of the column arrays (one shot each); the measured bits in order."""
    n = len(columns[0])
    if n == 0:
        return np.zeros(0, dtype=np.uint8)
    starts = range(0, n, batch)
    circuits = [builder(*(c[s : s + batch] for c in columns)) for s in starts]
    result = sim.run(circuits, shots=1, memory=True, seed_simulator=seed).result()
    # memory strings list clbit 0 last
    return np.concatenate(
        [np.frombuffer(result.get_memory(i)[0][::-1].encode(), dtype=np.uint8) - ord("0") for i in range(len(circuits))]
    )


def simulate_bb84_circuits(
    qubits: int = 2000,
    *,
    e_d: float = 0.0,
    noise: str | None = "depolarizing",
    eve_fraction: float = 0.0,
    seed=None,
    batch: int = 100,
    eve_mode: str = "two-stage",
) -> CircuitBB84Result:
    """BB84 on ``qubits`` qubits simulated by Aer (stabilizer method), sifted and scored.

    ``e_d``: error probability of the noise channel ``noise`` ("depolarizing",
    "bitflip" or None); ``eve_fraction``: probability that Eve intercepts a
    qubit; ``batch``: qubits per circuit; ``eve_mode``: "two-stage" (Eve's
    measurement circuit, then a fresh circuit from her resent states) or
    "mid-circuit" (measure, reset and classically controlled re-preparation
    inside one circuit; same statistics, slower). Deterministic for a given
    ``seed``.
    """
    import time

    from qiskit_aer import AerSimulator

    if not isinstance(qubits, (int, np.integer)) or isinstance(qubits, bool) or qubits <= 0:
        raise ValueError(f"qubits must be a positive integer, got {qubits!r}; e.g. qubits=2000")
    if not 0.0 <= eve_fraction <= 1.0:
        raise ValueError(f"eve_fraction must be in [0, 1], got {eve_fraction!r}")
    if not 0.0 <= e_d <= 0.5:
        raise ValueError(f"e_d must be in [0, 0.5], got {e_d!r}")
    if noise is not None and noise not in NOISE_KINDS:
        raise ValueError(f"noise must be one of {NOISE_KINDS} or None, got {noise!r}")
    if eve_mode not in ("two-stage", "mid-circuit"):
        raise ValueError(f"eve_mode must be 'two-stage' or 'mid-circuit', got {eve_mode!r}")
    if not isinstance(batch, (int, np.integer)) or batch <= 0:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    a_bits, a_bases, b_bases, e_bases = (rng.integers(0, 2, qubits, dtype=np.uint8) for _ in range(4))
    eve_mask = rng.random(qubits) < eve_fraction
    sim = AerSimulator(method="stabilizer", noise_model=bb84_noise_model(noise, e_d))
    sim_seeds = [int(x) for x in rng.integers(2**31, size=2)]
    if eve_mode == "mid-circuit":
        w_of = [min(batch, qubits - s) for s in range(0, qubits, batch)]
        both = _run_batches(sim, lambda a, ab, m, eb, bb: mid_circuit_eve_circuit(a, ab, m, eb, bb, noise),
                            (a_bits, a_bases, eve_mask, e_bases, b_bases), batch, sim_seeds[1])
        bob = np.concatenate([both[2 * s : 2 * s + w] for s, w in zip(np.cumsum([0] + w_of[:-1]), w_of)])
        eve = np.concatenate([both[2 * s + w : 2 * s + 2 * w] for s, w in zip(np.cumsum([0] + w_of[:-1]), w_of)])
    else:
        # Eve measures the tapped qubits, then resends fresh qubits in the states she found
        tapped_idx = np.flatnonzero(eve_mask)
        eve = np.zeros(qubits, dtype=np.uint8)
        eve[tapped_idx] = _run_batches(sim, eve_circuit,
                                       (a_bits[tapped_idx], a_bases[tapped_idx], e_bases[tapped_idx]),
                                       batch, sim_seeds[0])
        sent_bits = np.where(eve_mask, eve, a_bits).astype(np.uint8)
        sent_bases = np.where(eve_mask, e_bases, a_bases).astype(np.uint8)
        bob = _run_batches(sim, lambda b, s, bb: bob_circuit(b, s, bb, noise), (sent_bits, sent_bases, b_bases),
                           batch, sim_seeds[1])
    sifted = a_bases == b_bases
    alice_s, bob_s = a_bits[sifted], bob[sifted]
    n = int(alice_s.size)
    errors = int(np.count_nonzero(alice_s != bob_s))
    tapped = sifted & eve_mask
    agreement = float(np.mean(eve[tapped] == a_bits[tapped])) if tapped.any() else None
    return CircuitBB84Result(
        qubits=int(qubits), sifted_bits=n, errors=errors, qber=errors / n if n else None,
        expected_qber=expected_qber(e_d if noise else 0.0, eve_fraction), e_d=float(e_d), noise=noise,
        eve_fraction=float(eve_fraction), intercepted=int(np.count_nonzero(eve_mask)), eve_agreement=agreement,
        alice_sifted=alice_s, bob_sifted=bob_s, seconds=time.perf_counter() - t0,
    )
