"""Monte-Carlo simulation of decoy-state BB84, vectorised with numpy.

One call of :func:`simulate_bb84` runs the whole protocol on ``pulses`` laser
pulses and returns the final keys of both ends:

1. **Source** (Alice). Every pulse gets a random bit, a random basis (Z or X,
   probability 1/2 each) and a random intensity: signal ``mu``, decoy ``nu`` or
   vacuum, with probabilities ``p_signal``, ``p_decoy`` and the rest (decoy-state
   BB84: Hwang, PRL 91, 057901 (2003); Lo, Ma, Chen, PRL 94, 230504 (2005)).
   The photon number of a pulse is Poisson with the pulse's mean.
2. **Channel and detection** (Bob). The transmittance is
   ``eta = eta_det * 10**(-alpha * L / 10)`` (fiber loss ``alpha`` dB/km times
   the detector efficiency: the same meaning as the analytic GLLP model, after
   Gottesman, Lo, Lütkenhaus, Preskill, QIC 4, 325 (2004) and the parameters of
   Gobby, Yuan, Shields, APL 84, 3762 (2004)). Every photon is detected
   independently, so an ``n``-photon pulse gives a *signal detection* with
   probability ``1 - (1 - eta)**n``; independently, a dark count fires with
   probability ``Y0`` per pulse. Bob picks a random basis. A signal detection in
   the basis of the arriving state gives the state's bit, flipped with
   probability ``e_d`` (misalignment); in the other basis, or when only a dark
   count fired, Bob's bit is uniformly random.

   *Intercept-resend Eve* attacks each pulse with probability ``eve_fraction``:
   she measures it in a random basis (she gets Alice's bit when the bases agree,
   a random bit otherwise) and resends the state she found, with the pulse's
   photon number, so detection statistics do not change. On the sifted key an
   attacked pulse is wrong with probability ``1/4 + e_d/2``, so the QBER is
   ``(1 - p) e_d + p (1/4 + e_d/2)`` (plus dark counts): Eve raises it by about
   ``p/4`` (exactly ``p (1/4 - e_d/2)``), 25% (26.65% with ``e_d = 0.033``) at
   ``p = 1``. :func:`expected_qber` gives this value.
3. **Sifting**. Bob announces which pulses clicked and both announce bases and
   intensities; pulses with different bases are dropped. Signal pulses form the
   sifted key; decoy and vacuum pulses are only used for estimation (their
   gains and error rates are reported in ``BB84Result.decoy``).
4. **Parameter estimation**. A random ``sample_fraction`` of the sifted key is
   disclosed and compared; its error rate is the estimated QBER ``e``. The
   protocol aborts when ``e > qber_threshold`` (11% by default, about where the
   one-way BB84 key rate of Shor & Preskill, PRL 85, 441 (2000) vanishes). The
   sampled bits are discarded.
5. **Error correction**: Cascade (Brassard & Salvail, EUROCRYPT '93, LNCS 765,
   410), see :func:`cascade_correct`. Every parity bit disclosed is counted in
   ``leaked_bits``. Then a verification tag of ``t = ceil(log2(1/eps_cor))``
   bits (64 by default; a random Toeplitz hash, a 2-universal family:
   collision probability 2^-t for any two different strings, so the keys
   differ with probability <= eps_cor) is compared; its bits are counted as
   leaked too, and a mismatch aborts.
6. **Privacy amplification** with a random Toeplitz matrix (shared seed) down
   to the secure length. By default that is the **finite-key** length of Lim,
   Curty, Walenta, Xu, Zbinden, PRA 89, 022307 (2014), computed from this run's
   own counts by :func:`qfl.quantum.qkd.keyrate.finite_key_from_counts`::

       l = floor(s0 + s1 (1 - H2(phi)) - lambda_EC - 6 log2(21/eps_sec) - log2(2/eps_cor))

   ``s0``, ``s1``: lower bounds on the vacuum and single-photon detections in
   the key (the sifted signal bits left after sampling), from Hoeffding bounds
   on every intensity's sifted detections and the three-intensity decoy
   bounds; ``phi``: upper bound on their phase error, the single-photon error
   bound from the decoy and vacuum errors plus the finite-size
   random-sampling term; ``lambda_EC``: the Cascade parities; the verification
   tag is the ``log2(2/eps_cor)`` term. The counts: sifted detections of every
   intensity; errors of the decoy and vacuum pulses (all disclosed) and of the
   signal pulses (the sample's errors plus the bits Cascade corrected, known
   once the tag matches). A block too small for any finite-key secure key
   aborts with the block size that would give some. With ``asymptotic=True``
   the length is instead GLLP with asymptotic decoy estimates
   (:func:`gllp_secure_length`; Ma, Qi, Zhao, Lo 2005; GLLP 2004)::

       l = floor(n * s1 * (1 - H2(e1)) - leaked_bits - 2 * log2(1 / eps_pa))

   with ``n`` the sifted signal bits left after sampling, ``s1 = Q1^L / Q_mu``
   and ``e1`` from the vacuum + weak decoy estimates of this run's gains taken
   as exact -- not finite-size secure, and labelled so in the output.
   Multi-photon bits are assumed known to Eve (photon-number splitting) in
   both. Without decoy statistics (no decoy or vacuum pulses) no key is
   certified. The simpler ``secure_length`` (all sifted bits at the estimated
   QBER, no photon-number split) is kept for comparison only.

Randomness: one seed gives two independent streams, a *private* one (Alice's and
Bob's choices, the channel, Eve) and a *public* one (the sampled positions, the
Cascade permutations, the hash and Toeplitz seeds: values both ends know).

Speed: steps 1-4 process pulses in chunks of 2^20 with uint8/uint32 arrays
(photon number and intensity come from one uint32 draw through the inverse CDF
of their joint distribution); Cascade computes the parities of all blocks of a
pass at once and runs the binary searches of all odd blocks of a pass in
parallel; Toeplitz hashing is an FFT convolution, O((n + m) log(n + m)).
:func:`bench_bb84` measures the three.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qfl.quantum.qkd.keyrate import (
    DEFAULT_EPS_SEC,
    DecoyCounts,
    LinkParams,
    finite_key_from_counts,
    h2,
    min_block_pulses,
)

__all__ = [
    "ASYMPTOTIC_LABEL",
    "DEFAULT_EPS_COR",
    "DEFAULT_EPS_SEC",
    "DEFAULT_PULSES",
    "BB84Result",
    "CascadeResult",
    "bench_bb84",
    "cascade_correct",
    "expected_qber",
    "format_result",
    "result_json",
    "secure_length",
    "simulate_bb84",
    "toeplitz_hash",
    "toeplitz_seed",
]

#: pulses generated per chunk in steps 1-2 (memory stays O(chunk + clicks))
CHUNK_PULSES = 1 << 20
_TWO32 = float(1 << 32)
INTENSITY_NAMES = ("signal", "decoy", "vacuum")
#: Default block of the CLI's `qkd simulate`: gives finite-key secure key at 10 km with the defaults.
DEFAULT_PULSES = 10**8
#: Correctness parameter: a 64-bit verification tag, so the keys differ with probability <= 2^-64.
DEFAULT_EPS_COR = 2.0**-64
#: ``BB84Result.pa_bound`` of a run whose privacy amplification used the asymptotic bound.
ASYMPTOTIC_LABEL = "ASYMPTOTIC (not finite-size secure)"


# --------------------------------------------------------------------------- helpers


def expected_qber(e_d: float, eve_fraction: float = 0.0) -> float:
    """QBER of the sifted key without dark counts: ``(1-p) e_d + p (1/4 + e_d/2)``.

    An intercepted pulse is resent in Eve's basis: when it equals Alice's (and
    so Bob's, on the sifted key) Bob sees the misalignment rate ``e_d``,
    otherwise a random bit.
    """
    p = float(eve_fraction)
    return (1.0 - p) * e_d + p * (0.25 + 0.5 * e_d)


def _make_rngs(seed) -> tuple[np.random.Generator, np.random.Generator]:
    """(private, public) generators from an int, SeedSequence, Generator or None."""
    if isinstance(seed, np.random.Generator):
        private, public = seed.spawn(2)
        return private, public
    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    private_ss, public_ss = ss.spawn(2)
    return np.random.default_rng(private_ss), np.random.default_rng(public_ss)


def _as_rng(seed) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _random_bits(rng: np.random.Generator, n: int) -> np.ndarray:
    """n uniform bits as uint8 0/1 (8 bits per random byte)."""
    return np.unpackbits(rng.integers(0, 256, (n + 7) // 8, dtype=np.uint8), count=n)


def _u32(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 1 << 32, n, dtype=np.uint32)


def _threshold(p: float) -> np.uint32:
    """uint32 t with P(u < t) = p for u uniform on [0, 2^32), to 2^-32."""
    return np.uint32(min(max(round(p * _TWO32), 0), (1 << 32) - 1))


# --------------------------------------------------------------------------- Toeplitz


def toeplitz_seed(rng, n_in: int, n_out: int) -> np.ndarray:
    """The n_in + n_out - 1 random bits that define an n_out x n_in Toeplitz matrix."""
    return _random_bits(_as_rng(rng), max(n_in + n_out - 1, 0))


def _fast_len(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n (sizes pocketfft handles fastest)."""
    best = 1 << max(n - 1, 0).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def toeplitz_hash(bits: np.ndarray, n_out: int, seed_bits: np.ndarray) -> np.ndarray:
    """``T @ bits mod 2`` for the n_out x n Toeplitz matrix ``T[i, j] = seed[i - j + n - 1]``.

    ``bits`` is a uint8 0/1 array of length n, ``seed_bits`` has n + n_out - 1
    bits (:func:`toeplitz_seed`). Output: uint8 0/1 array of length n_out.
    Random Toeplitz matrices form a 2-universal hash family (Mansour, Nisan,
    Tiwari, STOC 1990; Krawczyk, CRYPTO '94), which is what the leftover hash
    lemma needs for privacy amplification.

    Output bit i is entry ``n - 1 + i`` of the linear convolution of seed and
    bits. It is computed as a real FFT convolution of length ``L >= n + n_out
    - 1`` (no wrap-around reaches the entries used), rounded to integers and
    reduced mod 2: O(L log L) time, O(L) memory. The exact sums are integers
    <= n; float64 FFT round-off stays far below 1/2 for the sizes this module
    uses (it grows like eps * n * log L), and the rounding margin is checked:
    a result more than 0.25 away from an integer raises ``ArithmeticError``.
    """
    x = np.asarray(bits, dtype=np.uint8).ravel()
    s = np.asarray(seed_bits, dtype=np.uint8).ravel()
    n, m = x.size, int(n_out)
    if m < 0:
        raise ValueError(f"n_out must be >= 0, got {n_out}")
    if s.size != n + m - 1 and not (m == 0 or n == 0):
        raise ValueError(f"seed_bits must hold n + n_out - 1 = {n + m - 1} bits, got {s.size}; use toeplitz_seed(rng, {n}, {m})")
    if m == 0 or n == 0:
        return np.zeros(m, dtype=np.uint8)
    L = _fast_len(n + m - 1)
    conv = np.fft.irfft(np.fft.rfft(s, L) * np.fft.rfft(x, L), L)[n - 1 : n - 1 + m]
    rounded = np.rint(conv)
    if m and float(np.max(np.abs(conv - rounded))) > 0.25:
        raise ArithmeticError("Toeplitz FFT round-off too large for an exact result; hash shorter blocks")
    return (rounded.astype(np.int64) & 1).astype(np.uint8)


# --------------------------------------------------------------------------- Cascade


@dataclass
class CascadeResult:
    """Bob's string after Cascade and what it cost.

    ``leaked_bits`` counts every parity Alice disclosed: one per block of every
    pass plus one per bisection step. ``corrected_errors`` counts the bits Bob
    flipped (he cannot know whether errors remain: that is what the
    verification hash is for).
    """

    corrected: np.ndarray
    leaked_bits: int
    corrected_errors: int
    block_sizes: tuple[int, ...]
    passes: int


def _bisect(a: np.ndarray, b: np.ndarray, idx: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, int]:
    """Binary search, in parallel, for one error in each row of ``idx``.

    Every row is a block (positions into ``a``/``b``, padded with the index of a
    zero sentinel) whose parities differ. At each step Alice discloses the
    parity of the first half of the current range (1 bit); Bob keeps the half
    whose parities differ. Prefix parities (cumsum mod 256 keeps the low bit)
    give every range parity in O(1); the blocks of one pass are disjoint, so a
    correction in one row never changes another row's bits.
    """
    m, k = idx.shape
    pa = np.zeros((m, k + 1), dtype=np.uint8)
    pb = np.zeros((m, k + 1), dtype=np.uint8)
    np.cumsum(a[idx], axis=1, dtype=np.uint8, out=pa[:, 1:])
    np.cumsum(b[idx], axis=1, dtype=np.uint8, out=pb[:, 1:])
    rows = np.arange(m)
    lo = np.zeros(m, dtype=np.intp)
    hi = sizes.astype(np.intp, copy=True)
    leaked = 0
    while True:
        active = hi - lo > 1
        n_active = int(np.count_nonzero(active))
        if n_active == 0:
            break
        leaked += n_active
        mid = (lo + hi) >> 1
        first_half_differs = ((pa[rows, mid] ^ pa[rows, lo] ^ pb[rows, mid] ^ pb[rows, lo]) & 1).astype(bool)
        go_left = active & first_half_differs
        go_right = active & ~first_half_differs
        hi = np.where(go_left, mid, hi)
        lo = np.where(go_right, mid, lo)
    return idx[rows, lo], leaked


def cascade_correct(
    alice: np.ndarray,
    bob: np.ndarray,
    qber: float,
    *,
    passes: int = 4,
    seed=None,
    k1: int | None = None,
) -> CascadeResult:
    """Reconcile Bob's bits with Alice's by Cascade (Brassard & Salvail 1993).

    Pass i (i = 0, 1, ...) shuffles the positions by a fresh permutation from
    the public ``seed`` and cuts them into blocks of ``k_i = k1 * 2**i`` bits
    (``k1 = ceil(0.73 / qber)`` by default, capped at n). Alice discloses the
    parity of every block (vectorised over all blocks of the pass); each block
    whose parity differs from Bob's holds an odd number of errors and one of
    them is found by binary search (``ceil(log2 k_i)`` more parities, see
    :func:`_bisect`). Correcting a bit flips the parity match of the blocks
    holding it in every earlier pass, which were all even: those blocks now
    have an odd number of errors and are bisected too (the cascade effect),
    always the pass with the smallest blocks first, until every block of
    passes 0..i matches. Bob tracks each block's parity match from Alice's
    disclosed parities, so this costs no extra disclosure. All odd blocks of one
    pass are bisected in parallel.

    ``alice`` and ``bob``: uint8 0/1 arrays of equal length. Returns a
    :class:`CascadeResult` with Bob's corrected copy (``bob`` is not modified).
    """
    a0 = np.asarray(alice, dtype=np.uint8).ravel()
    b0 = np.asarray(bob, dtype=np.uint8).ravel()
    if a0.size != b0.size:
        raise ValueError(f"alice and bob must have the same length, got {a0.size} and {b0.size}")
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    n = a0.size
    if n == 0:
        return CascadeResult(b0.copy(), 0, 0, (), passes)
    rng = _as_rng(seed)
    if k1 is None:
        k1 = math.ceil(0.73 / max(float(qber), 1e-4))
    k1 = int(min(max(k1, 2), n))
    # a zero sentinel at index n pads the last block of each pass
    a = np.zeros(n + 1, dtype=np.uint8)
    a[:n] = a0
    b = np.zeros(n + 1, dtype=np.uint8)
    b[:n] = b0
    index_dtype = np.int32 if n < 2**31 - 1 else np.int64

    blocks: list[np.ndarray] = []  # (nb, k) positions of each block, padded with n
    block_of: list[np.ndarray] = []  # block number of each position
    sizes: list[np.ndarray] = []
    odd: list[np.ndarray] = []  # parity mismatch of each block
    block_sizes: list[int] = []
    leaked = 0
    fixed = 0
    for i in range(passes):
        k = min(k1 << i, n)
        nb = -(-n // k)
        perm = rng.permutation(n).astype(index_dtype)
        padded = np.full(nb * k, n, dtype=index_dtype)
        padded[:n] = perm
        blk_pos = padded.reshape(nb, k)
        of = np.empty(n, dtype=index_dtype)
        of[perm] = np.arange(n, dtype=index_dtype) // k
        sz = np.full(nb, k, dtype=np.intp)
        sz[-1] = n - (nb - 1) * k
        parity_a = np.bitwise_xor.reduce(a[blk_pos], axis=1)
        parity_b = np.bitwise_xor.reduce(b[blk_pos], axis=1)
        leaked += nb  # Alice's parity of every block
        blocks.append(blk_pos)
        block_of.append(of)
        sizes.append(sz)
        odd.append(parity_a != parity_b)
        block_sizes.append(k)
        while True:
            pending = next((j for j in range(i + 1) if odd[j].any()), None)
            if pending is None:
                break
            bad = np.flatnonzero(odd[pending])
            pos, cost = _bisect(a, b, blocks[pending][bad], sizes[pending][bad])
            leaked += cost
            b[pos] ^= 1
            fixed += pos.size
            odd[pending][bad] = False
            for j in range(i + 1):
                if j != pending:
                    np.logical_xor.at(odd[j], block_of[j][pos], True)
        if k == n:  # one block holds everything: further passes add nothing
            break
    return CascadeResult(b[:n].copy(), int(leaked), int(fixed), tuple(block_sizes), len(block_sizes))


# --------------------------------------------------------------------------- result


@dataclass
class BB84Result:
    """Outcome of :func:`simulate_bb84`.

    ``sifted_bits``: sifted signal bits (bases matched) before sampling;
    ``sampled_bits`` of them were disclosed for estimation and dropped.
    ``qber``: the estimate from the sample (None without a sample);
    ``qber_true``: the error rate of the whole sifted key (simulation only).
    ``leaked_bits``: Cascade parities plus the verification tag.
    ``key_bits``: length of the final key (0 when aborted).
    ``alice_key``/``bob_key``: the final keys as uint8 arrays of 0/1 bits, one
    bit per element (``np.packbits`` gives bytes); equal unless aborted.
    ``timings``: seconds per stage (source_channel, sifting, estimation,
    cascade, verification, privacy_amplification, total).
    ``decoy``: gains, error rates and the decoy-state estimates (see
    :func:`_decoy_stats`).
    ``pa_bound``: which bound sized privacy amplification, ``"finite-key,
    eps_sec=1e-10"`` or ``"ASYMPTOTIC (not finite-size secure)"``;
    ``eps_sec``: the security parameter (None when asymptotic);
    ``finite_key``: the finite-key terms of this run (s0, s1, phase_error,
    e1_upper, lambda_ec, security_bits, length_bits), None when not computed;
    ``asymptotic_key_bits``: the GLLP length with asymptotic decoy estimates,
    for comparison (None without decoy statistics).
    """

    pulses: int
    distance_km: float
    eve_fraction: float
    sifted_bits: int
    sampled_bits: int
    qber: float | None
    qber_true: float | None
    leaked_bits: int
    key_bits: int
    aborted: bool
    abort_reason: str | None
    alice_key: np.ndarray
    bob_key: np.ndarray
    corrected_errors: int = 0
    cascade_block_sizes: tuple[int, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)
    decoy: dict[str, Any] = field(default_factory=dict)
    pa_bound: str = ""
    eps_sec: float | None = None
    finite_key: dict[str, float] | None = None
    asymptotic_key_bits: int | None = None

    @property
    def key_bytes(self) -> bytes:
        """Alice's key packed into bytes (big-endian bit order, zero-padded)."""
        return np.packbits(self.alice_key).tobytes()


def gllp_secure_length(n: int, single_fraction: float, e1: float, leaked_bits: int, eps_pa: float) -> int:
    """``floor(n s1 (1 - H2(e1)) - leaked_bits - 2 log2(1/eps_pa))``, at least 0 (GLLP)."""
    value = n * min(max(single_fraction, 0.0), 1.0) * (1.0 - h2(min(e1, 0.5)))
    value -= leaked_bits + 2.0 * math.log2(1.0 / eps_pa)
    return max(int(math.floor(value)), 0)


def secure_length(n: int, qber: float, leaked_bits: int, eps_pa: float) -> int:
    """``floor(n (1 - H2(qber)) - leaked_bits - 2 log2(1/eps_pa))``, at least 0.

    No photon-number split: not secure against PNS attacks; for comparison only.
    """
    value = n * (1.0 - h2(qber)) - leaked_bits - 2.0 * math.log2(1.0 / eps_pa)
    return max(int(math.floor(value)), 0)


# --------------------------------------------------------------------------- validation


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _is_finite_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))


def _validate(pulses, distance_km, eve_fraction, p) -> None:
    _check(
        isinstance(pulses, numbers.Integral) and not isinstance(pulses, bool) and int(pulses) > 0,
        f"pulses must be a positive integer, got {pulses!r}; pass the number of laser pulses, e.g. pulses=1_000_000",
    )
    _check(
        _is_finite_number(distance_km) and distance_km >= 0,
        f"distance_km must be a finite number >= 0, got {distance_km!r}; pass the fiber length in km (0 for back-to-back)",
    )
    _check(
        _is_finite_number(eve_fraction) and 0.0 <= eve_fraction <= 1.0,
        f"eve_fraction must be in [0, 1], got {eve_fraction!r}; it is the fraction of pulses Eve intercepts (0: no Eve)",
    )
    for name in ("mu", "nu", "p_signal", "p_decoy", "alpha_db_per_km", "eta_det", "dark_count", "e_detector",
                 "sample_fraction", "qber_threshold", "eps_pa", "eps_sec", "eps_cor"):
        _check(_is_finite_number(p[name]), f"{name} must be a finite number, got {p[name]!r}")
    _check(p["mu"] > 0, f"mu must be > 0, got {p['mu']}; the signal intensity is a mean photon number such as 0.5")
    _check(0 <= p["nu"] < p["mu"], f"nu must satisfy 0 <= nu < mu, got nu={p['nu']}, mu={p['mu']}; the decoy is the weaker intensity")
    _check(p["mu"] <= 30, f"mu must be <= 30, got {p['mu']}; use a mean photon number below 1 as in practice")
    _check(0 < p["p_signal"] <= 1 and 0 <= p["p_decoy"] and p["p_signal"] + p["p_decoy"] <= 1 + 1e-12,
           f"need 0 < p_signal <= 1, p_decoy >= 0 and p_signal + p_decoy <= 1 (the rest is vacuum), got p_signal={p['p_signal']}, p_decoy={p['p_decoy']}")
    _check(p["alpha_db_per_km"] >= 0, f"alpha_db_per_km must be >= 0, got {p['alpha_db_per_km']}")
    _check(0 < p["eta_det"] <= 1, f"eta_det must be in (0, 1], got {p['eta_det']}; it is the detector efficiency")
    _check(0 <= p["dark_count"] < 1, f"dark_count must be in [0, 1), got {p['dark_count']}; it is the dark-count probability per pulse")
    _check(0 <= p["e_detector"] <= 0.5, f"e_detector must be in [0, 0.5], got {p['e_detector']}; it is the misalignment error probability")
    _check(0 < p["sample_fraction"] < 1, f"sample_fraction must be in (0, 1), got {p['sample_fraction']}; e.g. 0.1 discloses 10% of the sifted key")
    _check(0 < p["qber_threshold"] <= 0.5, f"qber_threshold must be in (0, 0.5], got {p['qber_threshold']}")
    _check(0 < p["eps_pa"] < 1, f"eps_pa must be in (0, 1), got {p['eps_pa']}; e.g. 1e-10")
    _check(0 < p["eps_sec"] < 1, f"eps_sec must be in (0, 1), got {p['eps_sec']}; the finite-key security parameter, e.g. 1e-10")
    _check(2.0**-1024 < p["eps_cor"] < 1,
           f"eps_cor must be in (0, 1), got {p['eps_cor']}; the chance the keys differ, e.g. 2**-64 (a 64-bit tag)")
    _check(isinstance(p["cascade_passes"], numbers.Integral) and int(p["cascade_passes"]) >= 1,
           f"cascade_passes must be an integer >= 1, got {p['cascade_passes']!r}")


# --------------------------------------------------------------------------- steps 1-2


def _source_tables(mu, nu, p_signal, p_decoy, eta):
    """Joint (intensity, photon number) categories with uint32 inverse-CDF thresholds.

    Photon numbers whose probability is below 2^-34 are folded into the top
    category of their intensity (the uint32 draw cannot resolve them anyway).
    Returns (thresholds, intensity_of, photons_of, detect_threshold).
    """
    probs, kinds, photons = [], [], []
    for kind, (mean, weight) in enumerate(((mu, p_signal), (nu, p_decoy), (0.0, max(1.0 - p_signal - p_decoy, 0.0)))):
        if weight <= 0:
            continue
        pmf, n, tail = [], 0, 1.0
        while True:
            q = math.exp(-mean) * mean**n / math.factorial(n)
            tail -= q
            if tail * weight < 2.0**-34 or n >= 60:
                pmf.append(q + max(tail, 0.0))
                break
            pmf.append(q)
            n += 1
        probs += [weight * q for q in pmf]
        kinds += [kind] * len(pmf)
        photons += list(range(len(pmf)))
    if len(probs) > 255:
        raise ValueError("too many photon-number categories; lower mu")
    cdf = np.cumsum(probs)[:-1] / sum(probs)
    thresholds = np.array([_threshold(c) for c in cdf], dtype=np.uint32)
    detect = np.array([_threshold(1.0 - (1.0 - eta) ** n) for n in photons], dtype=np.uint32)
    return thresholds, np.array(kinds, dtype=np.uint8), np.array(photons, dtype=np.uint8), detect


def _run_chunk(rng, size, tables, dark_count, eve_fraction, ed_threshold):
    """Steps 1-2 for ``size`` pulses; returns per-category pulse counts and the clicked pulses."""
    thresholds, kind_of, photons_of, detect = tables
    # 1. Alice: intensity and photon number from one uint32 (inverse CDF), bit and basis
    u = _u32(rng, size)
    cat = np.zeros(size, dtype=np.uint8)
    for t in thresholds:
        np.add(cat, u >= t, out=cat, casting="unsafe")
    counts = np.bincount(cat, minlength=kind_of.size)
    bits = _random_bits(rng, 3 * size)
    a_bit, a_basis, b_basis = bits[:size], bits[size : 2 * size], bits[2 * size :]
    # 2. channel: each photon detected independently; dark counts Y0 per pulse
    signal = _u32(rng, size) < detect[cat]
    n_dark = int(rng.binomial(size, dark_count)) if dark_count > 0 else 0
    click = signal
    if n_dark:
        click = signal.copy()
        click[rng.choice(size, n_dark, replace=False)] = True
    ci = np.flatnonzero(click)
    # the state that reaches Bob: Alice's, or what Eve resends
    ch_bit, ch_basis = a_bit[ci], a_basis[ci]
    eve = np.zeros(ci.size, dtype=bool)
    if eve_fraction > 0:
        if eve_fraction >= 1:
            attacked = np.ones(size, dtype=bool)
        else:
            attacked = _u32(rng, size) < _threshold(eve_fraction)
        eve_bits = _random_bits(rng, 2 * size)
        eve = attacked[ci]
        e_basis, e_guess = eve_bits[:size][ci], eve_bits[size:][ci]
        e_bit = np.where(e_basis == ch_basis, ch_bit, e_guess)
        ch_bit = np.where(eve, e_bit, ch_bit)
        ch_basis = np.where(eve, e_basis, ch_basis)
    # Bob measures in his basis
    bb = b_basis[ci]
    sig = signal[ci]
    flip = (_u32(rng, ci.size) < ed_threshold).view(np.uint8)
    coin = _random_bits(rng, ci.size)
    bob = np.where(sig & (bb == ch_basis), ch_bit ^ flip, coin).astype(np.uint8)
    clicked = {
        "kind": kind_of[cat[ci]],
        "photons": photons_of[cat[ci]],
        "a_bit": a_bit[ci],
        "a_basis": a_basis[ci],
        "b_basis": bb,
        "bob": bob,
        "eve": eve,
    }
    return counts, clicked


def _decoy_stats(pulses_by_kind, clicks_by_kind, sifted_by_kind, errors_by_kind, p, single, leak_ratio):
    """Pulses, sifted detections and their errors per intensity, gains Q_k, error rates E_k and
    the vacuum + weak decoy estimates.

    Y0 from the vacuum gain; Y1^L and e1^U as in Ma, Qi, Zhao, Lo, PRA 72,
    012326 (2005) (vacuum + weak decoy)::

        Y1^L = mu / (mu nu - nu^2) (Q_nu e^nu - Q_mu e^mu nu^2/mu^2 - (mu^2 - nu^2)/mu^2 Y0)
        e1^U = (E_nu Q_nu e^nu - Y0 / 2) / (Y1^L nu)

    and the GLLP key bits ``pulses * q * (Q1 (1 - H2(e1)) - f Q_mu H2(E_mu))``
    with ``Q1 = Y1 mu e^-mu``, ``q = p_signal / 2`` and ``f`` the measured
    Cascade leakage ratio (1.16 when there was no Cascade). Also the true
    single-photon yield and error rate, which only a simulation knows.
    """
    mu, nu = p["mu"], p["nu"]
    out: dict[str, Any] = {}
    gains, qbers = {}, {}
    for k, name in enumerate(INTENSITY_NAMES):
        gains[name] = float(clicks_by_kind[k] / pulses_by_kind[k]) if pulses_by_kind[k] else None
        qbers[name] = float(errors_by_kind[k] / sifted_by_kind[k]) if sifted_by_kind[k] else None
    out["pulses"] = {n: int(c) for n, c in zip(INTENSITY_NAMES, pulses_by_kind)}
    out["sifted"] = {n: int(c) for n, c in zip(INTENSITY_NAMES, sifted_by_kind)}
    out["errors"] = {n: int(c) for n, c in zip(INTENSITY_NAMES, errors_by_kind)}
    out["gain"] = gains
    out["qber"] = qbers
    out["Y1_true"], out["e1_true"] = single
    Q_mu, Q_nu, Y0 = gains["signal"], gains["decoy"], gains["vacuum"]
    E_mu, E_nu = qbers["signal"], qbers["decoy"]
    y1 = e1 = q1 = bits = None
    if Q_mu is not None and Q_nu is not None and Y0 is not None and E_nu is not None and nu > 0:
        y1 = float(mu / (mu * nu - nu * nu) * (
            Q_nu * math.exp(nu) - Q_mu * math.exp(mu) * nu * nu / (mu * mu) - (mu * mu - nu * nu) / (mu * mu) * Y0
        ))
        if y1 > 0:
            e1 = min(max((E_nu * Q_nu * math.exp(nu) - 0.5 * Y0) / (y1 * nu), 0.0), 0.5)
            q1 = y1 * mu * math.exp(-mu)
            if E_mu is not None:
                f = leak_ratio if leak_ratio else 1.16
                rate = 0.5 * p["p_signal"] * (q1 * (1 - h2(e1)) - f * Q_mu * h2(E_mu))
                bits = max(int(math.floor(rate * sum(pulses_by_kind))), 0)
    out.update({"Y0": Y0, "Y1_lower": y1, "e1_upper": e1, "Q1_lower": q1, "gllp_key_bits": bits})
    return out


# --------------------------------------------------------------------------- protocol


def simulate_bb84(
    pulses: int,
    distance_km: float,
    *,
    eve_fraction: float = 0.0,
    seed=None,
    mu: float = 0.5,
    nu: float = 0.15,
    p_signal: float = 0.5,
    p_decoy: float = 0.25,
    alpha_db_per_km: float = 0.21,
    eta_det: float = 0.045,
    dark_count: float = 1.7e-6,
    e_detector: float = 0.033,
    sample_fraction: float = 0.1,
    qber_threshold: float = 0.11,
    cascade_passes: int = 4,
    eps_pa: float = 1e-10,
    eps_sec: float = DEFAULT_EPS_SEC,
    eps_cor: float = DEFAULT_EPS_COR,
    asymptotic: bool = False,
) -> BB84Result:
    """Run decoy-state BB84 on ``pulses`` pulses over ``distance_km`` of fiber.

    See the module docstring for the model of each stage. Parameters: ``mu``,
    ``nu`` signal and decoy mean photon numbers (vacuum is the third
    intensity); ``p_signal``, ``p_decoy`` their probabilities (vacuum gets the
    rest); ``alpha_db_per_km`` fiber loss; ``eta_det`` detector efficiency;
    ``dark_count`` Y0 per pulse; ``e_detector`` misalignment error e_d;
    ``sample_fraction`` share of the sifted key disclosed for estimation;
    ``qber_threshold`` abort level; ``cascade_passes``; ``eps_sec`` the
    finite-key security parameter and ``eps_cor`` the correctness parameter
    (it sets the verification tag to ``ceil(log2(1/eps_cor))`` bits, 64 by
    default). ``asymptotic=True`` sizes privacy amplification with the
    asymptotic GLLP bound instead (not finite-size secure), ``eps_pa`` being
    its leftover-hash margin. ``seed``: int, SeedSequence, Generator or None.
    Raises ``ValueError`` on bad input.

    Finite-key privacy amplification needs large blocks, and the decoy
    defaults are chosen for it: with ``nu = 0.15`` and half of the pulses
    decoy or vacuum (``p_signal = 0.5``, ``p_decoy = 0.25``, vacuum 0.25) the
    first key is certified from about 6e7 pulses at 10 km (``DEFAULT_PULSES``
    = 1e8 give ~1.3e4 bits), where ``nu = 0.1`` with ``p_signal = 0.8``,
    ``p_decoy = 0.1`` (tuned for the asymptotic rate) would need about 6.5e8:
    the count deviations of the rarely sent intensities, amplified by 1/p_k in
    the decoy bounds, dominate small blocks. A block too small for any
    key aborts and says how many pulses would do
    (``qfl.quantum.qkd.keyrate.min_block_pulses``).
    """
    params = dict(mu=mu, nu=nu, p_signal=p_signal, p_decoy=p_decoy, alpha_db_per_km=alpha_db_per_km,
                  eta_det=eta_det, dark_count=dark_count, e_detector=e_detector, sample_fraction=sample_fraction,
                  qber_threshold=qber_threshold, eps_pa=eps_pa, eps_sec=eps_sec, eps_cor=eps_cor,
                  cascade_passes=cascade_passes)
    _validate(pulses, distance_km, eve_fraction, params)
    pulses, distance_km, eve_fraction = int(pulses), float(distance_km), float(eve_fraction)
    asymptotic = bool(asymptotic)
    pa_bound = ASYMPTOTIC_LABEL if asymptotic else f"finite-key, eps_sec={eps_sec:g}"
    tag_bits = max(1, math.ceil(-math.log2(eps_cor) - 1e-9))
    private, public = _make_rngs(seed)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    # ---- steps 1-2: source, channel, detection
    eta = eta_det * 10.0 ** (-alpha_db_per_km * distance_km / 10.0)
    tables = _source_tables(mu, nu, p_signal, p_decoy, eta)
    kind_of, photons_of = tables[1], tables[2]
    counts = np.zeros(kind_of.size, dtype=np.int64)
    parts: list[dict[str, np.ndarray]] = []
    ed_threshold = _threshold(e_detector)
    for start in range(0, pulses, CHUNK_PULSES):
        c, clicked = _run_chunk(private, min(CHUNK_PULSES, pulses - start), tables, dark_count, eve_fraction, ed_threshold)
        counts += c
        parts.append(clicked)
    det = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    del parts
    t1 = time.perf_counter()
    timings["source_channel"] = t1 - t_start

    # ---- step 3: sifting
    sift = det["a_basis"] == det["b_basis"]
    error = det["a_bit"] != det["bob"]
    kind = det["kind"]
    key_mask = sift & (kind == 0)
    alice_sifted = det["a_bit"][key_mask]
    bob_sifted = det["bob"][key_mask]
    n_sift = int(alice_sifted.size)
    qber_true = float(np.count_nonzero(alice_sifted != bob_sifted)) / n_sift if n_sift else None
    pulses_by_kind = np.bincount(kind_of, weights=counts, minlength=3)[:3].astype(np.int64)
    clicks_by_kind = np.bincount(kind, minlength=3)[:3]
    sifted_by_kind = np.bincount(kind[sift], minlength=3)[:3]
    errors_by_kind = np.bincount(kind[sift & error], minlength=3)[:3]
    one = det["photons"] == 1
    pulses_one = int(counts[photons_of == 1].sum())
    single = (
        float(np.count_nonzero(one)) / pulses_one if pulses_one else None,
        float(np.count_nonzero(one & sift & error) / np.count_nonzero(one & sift)) if np.any(one & sift) else None,
    )
    t2 = time.perf_counter()
    timings["sifting"] = t2 - t1

    # ---- step 4: parameter estimation on a random sample
    n_sample = min(max(int(round(sample_fraction * n_sift)), 1), n_sift) if n_sift else 0
    order = public.permutation(n_sift)
    sampled = np.zeros(n_sift, dtype=bool)
    sampled[order[:n_sample]] = True
    qber = float(np.count_nonzero(alice_sifted[sampled] != bob_sifted[sampled])) / n_sample if n_sample else None
    alice_rest = alice_sifted[~sampled]
    bob_rest = bob_sifted[~sampled]
    n_rest = int(alice_rest.size)
    t3 = time.perf_counter()
    timings["estimation"] = t3 - t2

    empty = np.zeros(0, dtype=np.uint8)

    def finish(reason, leaked=0, fixed=0, sizes=(), key_a=empty, key_b=empty, leak_ratio=None, fk=None, gllp=None):
        timings.setdefault("cascade", 0.0)
        timings.setdefault("verification", 0.0)
        timings.setdefault("privacy_amplification", 0.0)
        timings["total"] = time.perf_counter() - t_start
        return BB84Result(
            pulses=pulses, distance_km=distance_km, eve_fraction=eve_fraction, sifted_bits=n_sift,
            sampled_bits=n_sample, qber=qber, qber_true=qber_true, leaked_bits=int(leaked), key_bits=int(key_a.size),
            aborted=reason is not None, abort_reason=reason, alice_key=key_a, bob_key=key_b, corrected_errors=fixed,
            cascade_block_sizes=tuple(sizes), timings=timings,
            decoy=_decoy_stats(pulses_by_kind, clicks_by_kind, sifted_by_kind, errors_by_kind, params, single, leak_ratio),
            pa_bound=pa_bound, eps_sec=None if asymptotic else float(eps_sec), finite_key=fk, asymptotic_key_bits=gllp,
        )

    if n_sift < 2 or n_rest == 0:
        return finish(f"too few sifted bits ({n_sift}) for estimation and a key; send more pulses or shorten the fiber")
    assert qber is not None  # n_sift >= 2, so n_sample >= 1
    if qber > qber_threshold:
        return finish(f"estimated QBER {qber:.4f} > threshold {qber_threshold:g}: possible eavesdropping, key discarded")

    # ---- step 5: Cascade, then verification
    ec = cascade_correct(alice_rest, bob_rest, qber, passes=cascade_passes, seed=public)
    t4 = time.perf_counter()
    timings["cascade"] = t4 - t3
    tag_seed = toeplitz_seed(public, n_rest, tag_bits)
    verified = np.array_equal(toeplitz_hash(alice_rest, tag_bits, tag_seed), toeplitz_hash(ec.corrected, tag_bits, tag_seed))
    leaked = ec.leaked_bits + tag_bits
    h = h2(qber)
    leak_ratio = ec.leaked_bits / (n_rest * h) if h > 0 else None
    t5 = time.perf_counter()
    timings["verification"] = t5 - t4
    if not verified:
        return finish("verification hash differs after Cascade: residual errors, key discarded",
                      leaked, ec.corrected_errors, ec.block_sizes, leak_ratio=leak_ratio)

    # ---- step 6: privacy amplification
    decoy = _decoy_stats(pulses_by_kind, clicks_by_kind, sifted_by_kind, errors_by_kind, params, single, leak_ratio)
    q_mu, q1, e1 = decoy["gain"]["signal"], decoy["Q1_lower"], decoy["e1_upper"]
    gllp = gllp_secure_length(n_rest, q1 / q_mu, e1, leaked, eps_pa) if q_mu and q1 is not None and e1 is not None else None
    done = dict(leaked=leaked, fixed=ec.corrected_errors, sizes=ec.block_sizes, leak_ratio=leak_ratio, gllp=gllp)
    if asymptotic:
        if gllp is None:
            return finish("decoy statistics too thin to bound the single-photon yield; send more pulses", **done)
        length = gllp
        if length <= 0:
            return finish(f"no secret key: {n_rest} bits minus {leaked} leaked and Eve's share leave nothing; "
                          "send more pulses or shorten the fiber", **done)
    else:
        p_vacuum = 1.0 - p_signal - p_decoy
        if not (nu > 0 and p_decoy > 0 and p_vacuum > 1e-12):
            return finish("finite-key analysis needs weak-decoy and vacuum pulses (nu > 0, p_decoy > 0, "
                          f"p_signal + p_decoy < 1), got nu={nu}, p_decoy={p_decoy}, vacuum {p_vacuum:.3g}", **done)
        errors_signal = int(np.count_nonzero(alice_sifted[sampled] != bob_sifted[sampled])) + ec.corrected_errors
        observed = DecoyCounts(
            n_pulses=pulses, mu=mu, nu1=nu, nu2=0.0, p_mu=p_signal, p_nu1=p_decoy, p_nu2=p_vacuum,
            n_mu=float(n_sift), n_nu1=float(sifted_by_kind[1]), n_nu2=float(sifted_by_kind[2]),
            m_mu=float(errors_signal), m_nu1=float(errors_by_kind[1]), m_nu2=float(errors_by_kind[2]),
        )
        fk = finite_key_from_counts(observed, ec.leaked_bits, key_bits=n_rest, eps_sec=eps_sec, eps_cor=2.0**-tag_bits)
        done["fk"] = {
            "s0": fk.s0, "s1": fk.s1, "phase_error": fk.phase_error, "e1_upper": fk.e1_upper,
            "lambda_ec": fk.lambda_ec, "security_bits": fk.security_bits, "length_bits": fk.length_bits,
        }
        length = fk.length_bits
        if length <= 0:
            hint = _block_hint(pulses, distance_km, params, leak_ratio, 2.0**-tag_bits)
            return finish(
                f"no finite-key secure key in this block of {pulses:,} pulses (eps_sec={eps_sec:g}): "
                f"{fk.s1:,.0f} certified single-photon bits with phase error <= {fk.phase_error:.3f} do not cover "
                f"{ec.leaked_bits:,} Cascade bits and {fk.security_bits:.0f} bits of security margin; {hint}", **done)
    pa_seed = toeplitz_seed(public, n_rest, length)
    key_a = toeplitz_hash(alice_rest, length, pa_seed)
    key_b = toeplitz_hash(ec.corrected, length, pa_seed)
    timings["privacy_amplification"] = time.perf_counter() - t5
    return finish(None, key_a=key_a, key_b=key_b, **done)


def _block_hint(pulses: int, distance_km: float, p: dict, leak_ratio: float | None, eps_cor: float) -> str:
    """The fix for a block too small for finite-key key: the block size the planning model
    (:func:`qfl.quantum.qkd.keyrate.min_block_pulses`, expected counts, this run's Cascade
    efficiency and QBER sample) says gives some key on this link, without Eve."""
    try:
        link = LinkParams(
            distance_km=distance_km, fiber_loss_db_per_km=p["alpha_db_per_km"], detector_efficiency=p["eta_det"],
            dark_count_yield=p["dark_count"], misalignment=p["e_detector"],
            ec_efficiency=max(leak_ratio or 1.22, 1.0), mu=p["mu"], nu1=p["nu"], nu2=0.0, sifting=0.5,
        )
        least = min_block_pulses(
            link, eps_sec=p["eps_sec"], eps_cor=eps_cor, p_mu=p["p_signal"], p_nu1=p["p_decoy"],
            p_nu2=1.0 - p["p_signal"] - p["p_decoy"], key_fraction=1.0 - p["sample_fraction"],
        )
    except ValueError:
        return "send more pulses or shorten the fiber"
    if least is None:
        return "no block size gives finite-key secure key on this link; shorten the fiber"
    if least <= pulses:  # this run was unlucky or Eve is present; the model says the size is enough
        return "send more pulses (the expected key at this size is positive: statistical bad luck, or an eavesdropper)"
    return f"send more pulses: about {least:.2g} or more at {distance_km:g} km (keyrate.min_block_pulses for this link)"


# --------------------------------------------------------------------------- reporting


def result_json(result: BB84Result) -> dict:
    """The CLI's JSON record: pulses, sifted_bits, qber, leaked_bits, key_bits, aborted,
    abort_reason, pa_bound (which bound sized privacy amplification), eps_sec (None when
    asymptotic) and asymptotic_key_bits (the GLLP length, for comparison; None without decoy
    statistics)."""
    return {
        "pulses": int(result.pulses),
        "sifted_bits": int(result.sifted_bits),
        "qber": None if result.qber is None else float(result.qber),
        "leaked_bits": int(result.leaked_bits),
        "key_bits": int(result.key_bits),
        "aborted": bool(result.aborted),
        "abort_reason": result.abort_reason,
        "pa_bound": result.pa_bound,
        "eps_sec": result.eps_sec,
        "asymptotic_key_bits": result.asymptotic_key_bits,
    }


def format_result(result: BB84Result) -> str:
    """A few human-readable lines."""
    pct = lambda x: "n/a" if x is None else f"{100 * x:.2f}%"  # noqa: E731
    lines = [
        f"BB84 over {result.distance_km:g} km, {result.pulses:,} pulses"
        + (f", Eve on {100 * result.eve_fraction:g}% of pulses" if result.eve_fraction else ""),
        f"  sifted bits   {result.sifted_bits:,} ({result.sampled_bits:,} sampled for estimation)",
        f"  QBER          {pct(result.qber)} estimated, {pct(result.qber_true)} true",
        f"  leaked bits   {result.leaked_bits:,} (Cascade + verification tag)",
        f"  key bits      {result.key_bits:,}",
        f"  PA sized by   {result.pa_bound}",
    ]
    if result.asymptotic_key_bits is not None and result.pa_bound != ASYMPTOTIC_LABEL:
        lines.append(f"  (asymptotic GLLP bound would give {result.asymptotic_key_bits:,} bits: not finite-size secure)")
    if result.aborted:
        lines.append(f"  ABORTED: {result.abort_reason}")
    total = result.timings.get("total")
    if total:
        lines.append(f"  time          {total:.3f} s")
    return "\n".join(lines)


# --------------------------------------------------------------------------- benchmark


def bench_bb84(
    pulses: int = 10**7,
    *,
    distance_km: float = 10.0,
    cascade_bits: int = 1 << 20,
    cascade_qber: float = 0.033,
    toeplitz_bits: int = 1 << 20,
    seed: int = 0,
) -> dict:
    """Throughput of the three costly parts, single-threaded numpy.

    ``pulses_per_s``: pulses through steps 1-4 (source, channel, sifting,
    estimation) of a full :func:`simulate_bb84` run at ``distance_km``.
    ``cascade_bits_per_s``: bits reconciled per second by :func:`cascade_correct`
    on a random string of ``cascade_bits`` bits with QBER ``cascade_qber``.
    ``toeplitz_bits_per_s``: input bits per second of :func:`toeplitz_hash`
    compressing ``toeplitz_bits`` bits to half.
    """
    run = simulate_bb84(pulses, distance_km, seed=seed)
    t = run.timings
    before = t["source_channel"] + t["sifting"] + t["estimation"]
    rng = np.random.default_rng(seed)
    alice = _random_bits(rng, cascade_bits)
    bob = alice ^ (rng.random(cascade_bits) < cascade_qber).astype(np.uint8)
    t0 = time.perf_counter()
    ec = cascade_correct(alice, bob, cascade_qber, seed=rng)
    t_cascade = time.perf_counter() - t0
    x = _random_bits(rng, toeplitz_bits)
    s = toeplitz_seed(rng, toeplitz_bits, toeplitz_bits // 2)
    t0 = time.perf_counter()
    toeplitz_hash(x, toeplitz_bits // 2, s)
    t_toeplitz = time.perf_counter() - t0
    n_err = int(np.count_nonzero(alice != bob))
    return {
        "pulses": pulses,
        "distance_km": distance_km,
        "pulses_per_s": pulses / before,
        "cascade_bits_per_s": cascade_bits / t_cascade,
        "cascade_residual_errors": int(np.count_nonzero(ec.corrected != alice)),
        "cascade_leak_ratio": ec.leaked_bits / (cascade_bits * h2(n_err / cascade_bits)),
        "toeplitz_bits_per_s": toeplitz_bits / t_toeplitz,
        "run": result_json(run),
        "timings": dict(t),
    }
