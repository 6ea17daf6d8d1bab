"""Analytic model of a decoy-state BB84 fibre link: gain, QBER, secret-key rate.

This is the closed-form ("analytic") link model used to size the key supply of
a QKD link; it simulates no photons. It follows the standard channel and
key-rate model of

* [MQZL05] X. Ma, B. Qi, Y. Zhao, H.-K. Lo, "Practical decoy state for quantum
  key distribution", Phys. Rev. A 72, 012326 (2005), arXiv:quant-ph/0503005;
* [GLLP04] D. Gottesman, H.-K. Lo, N. Lütkenhaus, J. Preskill, Quantum Inf.
  Comput. 4, 325 (2004) -- the key-rate formula for imperfect sources;
* [LCWXZ14] C. C. W. Lim, M. Curty, N. Walenta, F. Xu, H. Zbinden, "Concise
  security bounds for practical decoy-state quantum key distribution",
  Phys. Rev. A 89, 022307 (2014) -- the finite-key length, Eqs. (1)-(5);
* [GYS04] C. Gobby, Z. L. Yuan, A. J. Shields, Appl. Phys. Lett. 84, 3762
  (2004) -- the 122 km experiment whose parameters are the defaults here
  (alpha = 0.21 dB/km, eta_Bob = 4.5 %, Y0 = 1.7e-6, e_d = 3.3 %), as tabulated
  in [MQZL05].

Channel ([MQZL05], Sec. II)
---------------------------
With fibre loss ``alpha`` (dB/km), length ``L`` and Bob's detection efficiency
``eta_Bob`` the overall transmittance is::

    eta = eta_Bob * 10 ** (-alpha * L / 10)

For a phase-randomised weak coherent pulse of mean photon number ``x`` the gain
(probability of a detection per pulse) and the error gain are::

    Q_x       = Y0 + 1 - exp(-eta x)
    E_x * Q_x = e0 Y0 + e_d (1 - exp(-eta x)),        e0 = 1/2

(dark counts are random, hence error probability 1/2; ``e_d`` is the
probability that a photon hits the wrong detector). These are [MQZL05]'s
expressions, which drop the O(Y0 * eta) cross terms.

Key rate ([MQZL05], Eq. (1), from [GLLP04])
-------------------------------------------
Per pulse sent::

    R = q * ( -Q_mu f H2(E_mu) + Q_1 [1 - H2(e_1)] ),     Q_1 = Y_1 mu exp(-mu)

``q`` is the sifting factor: 1/2 for standard BB84 (Alice and Bob pick the
same basis half of the time), close to 1 for efficient (biased-basis) BB84.
``f >= 1`` is the error-correction inefficiency, ``H2`` the binary entropy.
``Y_1`` and ``e_1`` are the yield and error rate of single-photon pulses, which
the decoy method bounds:

* ``method="infinite"`` -- infinitely many decoys pin them down exactly::

      Y_1 = Y0 + eta,   e_1 = (e0 Y0 + e_d eta) / Y_1

* ``method="vacuum_weak"`` -- one vacuum (``nu2 = 0``) and one weak decoy
  ``nu1 < mu`` give the bounds of [MQZL05], Sec. V ("vacuum + weak decoy
  state"); written for a general second decoy ``0 <= nu2 < nu1`` with
  ``nu1 + nu2 < mu`` they read::

      Y0^L  = max(0, (nu1 Q_nu2 e^nu2 - nu2 Q_nu1 e^nu1) / (nu1 - nu2))
      Y_1^L = mu / (mu nu1 - mu nu2 - nu1^2 + nu2^2)
              * [Q_nu1 e^nu1 - Q_nu2 e^nu2 - (nu1^2 - nu2^2)/mu^2 (Q_mu e^mu - Y0^L)]
      e_1^U = (E_nu1 Q_nu1 e^nu1 - E_nu2 Q_nu2 e^nu2) / ((nu1 - nu2) Y_1^L)

  With ``nu2 = 0`` these are the vacuum+weak formulas,
  ``Y_1^L = mu/(mu nu - nu^2) [Q_nu e^nu - Q_mu e^mu nu^2/mu^2 - (mu^2 - nu^2)/mu^2 Y0]``
  and ``e_1^U = (E_nu Q_nu e^nu - e0 Y0) / (nu Y_1^L)``. (Derivation: expand
  ``Q_x e^x = sum_n Y_n x^n / n!`` and bound the ``n >= 2`` tail using
  ``nu1^n - nu2^n <= (nu1^2 - nu2^2) mu^(n-2)`` for ``nu1 + nu2 <= mu``.)

``e_1`` is capped at 1/2 (``1 - H2`` is not meaningful above it), and a
non-positive ``Y_1^L`` means the single-photon term is zero.

When ``LinkParams.mu`` is ``None`` the signal intensity is chosen to maximise
``R`` at the given distance (coarse grid, then bounded Brent refinement). With
the GYS parameters and infinite decoys the optimum is mu ~ 0.48, the value
[MQZL05] report for GYS; the infinite-decoy cutoff is ~142 km, again as in
[MQZL05]; see ``tests/test_keyrate.py`` for the figures asserted.

Finite key
----------
:func:`finite_key_from_counts` gives the secret-key length of one block from its
decoy statistics (sifted detections and errors per intensity) after [LCWXZ14]:
Hoeffding deviations on the counts, the decoy bounds on the vacuum and
single-photon detections and on the single-photon errors, the random-sampling
correction to the phase error, and the eps_sec / eps_cor terms of Eq. (1). Its
docstring spells out the bounds and the simplifications. The Monte-Carlo
(:mod:`qfl.quantum.qkd.bb84`) sizes privacy amplification with it from a run's own
counts; :func:`finite_key` feeds it expected counts (a planning estimate for a
link), :func:`finite_key_bits_per_s` turns that into bits/s for blocks of
``DEFAULT_BLOCK_PULSES`` = 10^10 pulses (10 s at 1 GHz) at eps_sec = 1e-10 --
the rate the simulated network's links make key at -- and
:func:`min_block_pulses` finds the smallest block that gives any key.

Check against the literature: with the GYS parameters the model needs about
5e8 pulses (2.6e6 sifted signal detections) at 10 km before any key is certified,
and 1e10 pulses give 8.4e6 bits (844 kbit/s at 1 GHz, 60 % of the asymptotic
1.40 Mbit/s). On a low-noise link of the kind [LCWXZ14] analyse (e_d = 0.5 %,
Y0 = 6e-7, eta_Bob = 10 %, f = 1.16, biased bases) with their freedom to choose
the decoy settings, positive key starts from about 10^5 detections (a few 10^6
pulses), the order of block size they report; ``tests/test_keyrate.py`` asserts
both. The GYS link needs larger blocks because of its 3.3 % misalignment, its
4.5 % detector efficiency and the fixed 0.8 / 0.1 / 0.1 intensity
probabilities (tuned for the asymptotic rate: decoy-heavier settings, as the
Monte-Carlo's defaults, give key from ~6e7 pulses at 10 km), not because the
bounds are wrong; the model is kept as it was.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

from scipy.optimize import minimize_scalar

__all__ = [
    "DEFAULT_BLOCK_PULSES",
    "DEFAULT_EPS_COR",
    "DEFAULT_EPS_SEC",
    "E0",
    "METHODS",
    "DecoyCounts",
    "FiniteKeyResult",
    "KeyRateResult",
    "LinkParams",
    "SinglePhoton",
    "cutoff_distance",
    "error_gain",
    "evaluate",
    "expected_counts",
    "finite_key",
    "finite_key_bits_per_s",
    "finite_key_from_counts",
    "finite_key_length",
    "format_report",
    "gain",
    "h2",
    "key_rate",
    "link_report",
    "min_block_pulses",
    "optimal_mu",
    "qber",
    "secret_key_rate",
    "single_photon_bounds",
    "transmittance",
]

#: Error probability of a dark count (a random click): 1/2.
E0 = 0.5

#: Decoy-estimation methods understood by the functions below.
METHODS = ("infinite", "vacuum_weak")

#: Search range for the optimal signal intensity (mean photon number).
_MU_MIN = 1e-4
_MU_MAX = 1.5
_MU_GRID = 121

#: Beyond this distance a positive rate is reported as an unbounded cutoff.
_MAX_CUTOFF_KM = 10_000.0


# --------------------------------------------------------------------------- #
# Parameters
# --------------------------------------------------------------------------- #


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"LinkParams.{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"LinkParams.{name} must be finite, got {value!r}")
    return value


@dataclass(frozen=True)
class LinkParams:
    """One QKD fibre link. Defaults are the GYS experiment [GYS04] as used in [MQZL05].

    distance_km: fibre length ``L`` (>= 0).
    fiber_loss_db_per_km: attenuation ``alpha``; 0.21 dB/km as in GYS.
    detector_efficiency: ``eta_Bob`` in (0, 1], Bob's total detection
        efficiency (optics and detector); 4.5 % in GYS.
    dark_count_yield: ``Y0`` in [0, 1), detections per pulse with no signal
        (dark counts and stray light); 1.7e-6 in GYS.
    misalignment: ``e_d`` in [0, 0.5), probability a photon hits the wrong
        detector; 3.3 % in GYS.
    ec_efficiency: ``f >= 1``, error-correction leakage relative to the Shannon
        limit; 1.22 as in [MQZL05].
    pulse_rate_hz: source repetition rate, used only to turn bits/pulse into
        bits/s. 1 GHz is a present-day clock (GYS itself ran at 2 MHz).
    mu: signal mean photon number; ``None`` optimises it for each distance.
    nu1: weak decoy intensity (0.1 by default); needs ``nu2 < nu1`` and
        ``nu1 + nu2 < mu``.
    nu2: second decoy intensity, 0 = vacuum (the default).
    sifting: ``q``, fraction of detections kept after basis reconciliation;
        1/2 for standard BB84, up to ~1 for efficient BB84 with biased bases.
    """

    distance_km: float
    fiber_loss_db_per_km: float = 0.21
    detector_efficiency: float = 0.045
    dark_count_yield: float = 1.7e-6
    misalignment: float = 0.033
    ec_efficiency: float = 1.22
    pulse_rate_hz: float = 1e9
    mu: float | None = None
    nu1: float = 0.1
    nu2: float = 0.0
    sifting: float = 0.5

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "mu" and value is None:
                continue
            object.__setattr__(self, f.name, _real(f.name, value))

        if self.distance_km < 0:
            raise ValueError(
                f"LinkParams.distance_km must be >= 0 (a fibre length), got {self.distance_km}; "
                "pass the link length in km"
            )
        if self.fiber_loss_db_per_km < 0:
            raise ValueError(
                f"LinkParams.fiber_loss_db_per_km must be >= 0, got {self.fiber_loss_db_per_km}; "
                "telecom fibre is about 0.2 dB/km"
            )
        if not 0 < self.detector_efficiency <= 1:
            raise ValueError(
                f"LinkParams.detector_efficiency must lie in (0, 1], got {self.detector_efficiency}; "
                "give a probability such as 0.045 (not a percentage)"
            )
        if not 0 <= self.dark_count_yield < 1:
            raise ValueError(
                f"LinkParams.dark_count_yield (Y0) must lie in [0, 1), got {self.dark_count_yield}; "
                "it is a probability per pulse, e.g. 1.7e-6"
            )
        if not 0 <= self.misalignment < 0.5:
            raise ValueError(
                f"LinkParams.misalignment (e_d) must lie in [0, 0.5), got {self.misalignment}; "
                "give a probability such as 0.033 (not a percentage)"
            )
        if self.ec_efficiency < 1:
            raise ValueError(
                f"LinkParams.ec_efficiency (f) must be >= 1 (no code beats the Shannon limit), "
                f"got {self.ec_efficiency}; typical values are 1.05-1.22"
            )
        if self.pulse_rate_hz <= 0:
            raise ValueError(f"LinkParams.pulse_rate_hz must be > 0, got {self.pulse_rate_hz}")
        if not 0 < self.sifting <= 1:
            raise ValueError(
                f"LinkParams.sifting (q) must lie in (0, 1], got {self.sifting}; "
                "use 0.5 for standard BB84"
            )
        if self.nu2 < 0:
            raise ValueError(f"LinkParams.nu2 must be >= 0 (0 = vacuum decoy), got {self.nu2}")
        if self.nu1 <= self.nu2:
            raise ValueError(
                f"LinkParams.nu1 must exceed nu2 (weak decoy above the vacuum/second decoy), "
                f"got nu1={self.nu1}, nu2={self.nu2}"
            )
        if self.nu1 + self.nu2 >= _MU_MAX:
            raise ValueError(
                f"LinkParams.nu1 + nu2 must be below {_MU_MAX} (the signal intensity must exceed "
                f"both decoys together), got {self.nu1 + self.nu2}"
            )
        if self.mu is not None:
            if self.mu <= 0:
                raise ValueError(
                    f"LinkParams.mu must be > 0 (mean photon number of the signal), got {self.mu}; "
                    "pass mu=None to optimise it"
                )
            if self.mu <= self.nu1 + self.nu2:
                raise ValueError(
                    f"LinkParams.mu must exceed nu1 + nu2 (decoys weaker than the signal), got "
                    f"mu={self.mu}, nu1={self.nu1}, nu2={self.nu2}; raise mu or lower nu1"
                )

    def with_distance(self, distance_km: float) -> LinkParams:
        """The same link at another length."""
        return dataclasses.replace(self, distance_km=distance_km)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


# --------------------------------------------------------------------------- #
# Channel
# --------------------------------------------------------------------------- #


def h2(x: float) -> float:
    """Binary entropy in bits; 0 at x <= 0 or x >= 1."""
    if x <= 0.0 or x >= 1.0:
        return 0.0
    return -x * math.log2(x) - (1.0 - x) * math.log2(1.0 - x)


def transmittance(p: LinkParams) -> float:
    """eta = eta_Bob * 10^(-alpha L / 10): the probability a sent photon is detected."""
    return p.detector_efficiency * 10.0 ** (-p.fiber_loss_db_per_km * p.distance_km / 10.0)


def gain(p: LinkParams, intensity: float) -> float:
    """Q_x = Y0 + 1 - exp(-eta x), detections per pulse of mean photon number x."""
    return p.dark_count_yield + -math.expm1(-transmittance(p) * intensity)


def error_gain(p: LinkParams, intensity: float) -> float:
    """E_x Q_x = e0 Y0 + e_d (1 - exp(-eta x)), erroneous detections per pulse."""
    return E0 * p.dark_count_yield + p.misalignment * -math.expm1(-transmittance(p) * intensity)


def qber(p: LinkParams, intensity: float) -> float:
    """E_x, the quantum bit error rate of pulses of intensity x (1/2 if nothing arrives)."""
    q = gain(p, intensity)
    return error_gain(p, intensity) / q if q > 0 else E0


@dataclass(frozen=True)
class SinglePhoton:
    """Single-photon estimates: vacuum yield (lower bound), Y_1 (lower), e_1 (upper)."""

    y0: float
    y1: float
    e1: float


def single_photon_bounds(p: LinkParams, mu: float, method: str = "vacuum_weak") -> SinglePhoton:
    """Y_1 and e_1 for signal intensity ``mu`` (exact for infinite decoys, else bounds)."""
    _check_method(method)
    y0 = p.dark_count_yield
    if method == "infinite":
        eta = transmittance(p)
        y1 = y0 + eta
        e1 = (E0 * y0 + p.misalignment * eta) / y1 if y1 > 0 else E0
        return SinglePhoton(y0=y0, y1=y1, e1=min(e1, E0))

    n1, n2 = p.nu1, p.nu2
    if not mu > n1 + n2:
        raise ValueError(f"vacuum_weak bounds need mu > nu1 + nu2, got mu={mu}, nu1={n1}, nu2={n2}")
    a1 = gain(p, n1) * math.exp(n1)  # Q_nu1 e^nu1
    a2 = gain(p, n2) * math.exp(n2)  # Q_nu2 e^nu2
    am = gain(p, mu) * math.exp(mu)  # Q_mu e^mu
    y0_l = max(0.0, (n1 * a2 - n2 * a1) / (n1 - n2))
    y1_l = mu / (mu * n1 - mu * n2 - n1**2 + n2**2) * (a1 - a2 - (n1**2 - n2**2) / mu**2 * (am - y0_l))
    if y1_l <= 0:
        return SinglePhoton(y0=y0_l, y1=0.0, e1=E0)
    b1 = error_gain(p, n1) * math.exp(n1)  # E_nu1 Q_nu1 e^nu1
    b2 = error_gain(p, n2) * math.exp(n2)  # E_nu2 Q_nu2 e^nu2
    e1_u = (b1 - b2) / ((n1 - n2) * y1_l)
    return SinglePhoton(y0=y0_l, y1=y1_l, e1=min(max(e1_u, 0.0), E0))


def _raw_rate(p: LinkParams, mu: float, method: str) -> float:
    """R(mu) per pulse, before clipping at 0 (negative = no key)."""
    sp = single_photon_bounds(p, mu, method)
    q_mu = gain(p, mu)
    e_mu = qber(p, mu)
    q1 = sp.y1 * mu * math.exp(-mu)
    return p.sifting * (-q_mu * p.ec_efficiency * h2(e_mu) + q1 * (1.0 - h2(sp.e1)))


def key_rate(p: LinkParams, mu: float, method: str = "vacuum_weak") -> float:
    """R per pulse at a given signal intensity, clipped at 0."""
    _check_method(method)
    return max(0.0, _raw_rate(p, mu, method))


def _mu_bounds(p: LinkParams, method: str) -> tuple[float, float]:
    if method == "infinite":
        return _MU_MIN, _MU_MAX
    floor = p.nu1 + p.nu2
    return floor + max(1e-6, 1e-4 * floor), _MU_MAX


def optimal_mu(p: LinkParams, method: str = "vacuum_weak") -> tuple[float, float]:
    """(mu*, R(mu*)) maximising the raw rate over mu; R may be <= 0 past the cutoff."""
    _check_method(method)
    lo, hi = _mu_bounds(p, method)
    step = (hi - lo) / (_MU_GRID - 1)
    grid = [lo + i * step for i in range(_MU_GRID)]
    values = [_raw_rate(p, m, method) for m in grid]
    i = max(range(_MU_GRID), key=values.__getitem__)
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, _MU_GRID - 1)]
    res = minimize_scalar(
        lambda m: -_raw_rate(p, m, method), bounds=(a, b), method="bounded", options={"xatol": 1e-9}
    )
    if res.success and -res.fun >= values[i]:
        return float(res.x), float(-res.fun)
    return grid[i], values[i]


def _chosen_mu(p: LinkParams, method: str) -> tuple[float, float, bool]:
    """(mu, raw R, optimised?) with mu from the params or optimised."""
    if p.mu is not None:
        return p.mu, _raw_rate(p, p.mu, method), False
    mu, r = optimal_mu(p, method)
    return mu, r, True


def secret_key_rate(p: LinkParams, method: str = "vacuum_weak") -> float:
    """Asymptotic secret bits per pulse at ``p.mu`` (or the optimal mu), >= 0."""
    _check_method(method)
    return max(0.0, _chosen_mu(p, method)[1])


@dataclass(frozen=True)
class KeyRateResult:
    """Everything the asymptotic model says about one link at one distance."""

    distance_km: float
    method: str
    mu: float
    mu_optimised: bool
    transmittance: float
    gain: float
    qber: float
    y0: float
    y1: float
    e1: float
    q1: float
    rate_per_pulse: float
    bits_per_s: float


def evaluate(p: LinkParams, method: str = "vacuum_weak") -> KeyRateResult:
    """Gain, QBER, single-photon estimates and key rate at ``p.distance_km``."""
    _check_method(method)
    mu, raw, optimised = _chosen_mu(p, method)
    sp = single_photon_bounds(p, mu, method)
    rate = max(0.0, raw)
    return KeyRateResult(
        distance_km=p.distance_km,
        method=method,
        mu=mu,
        mu_optimised=optimised,
        transmittance=transmittance(p),
        gain=gain(p, mu),
        qber=qber(p, mu),
        y0=sp.y0,
        y1=sp.y1,
        e1=sp.e1,
        q1=sp.y1 * mu * math.exp(-mu),
        rate_per_pulse=rate,
        bits_per_s=rate * p.pulse_rate_hz,
    )


def cutoff_distance(p: LinkParams, method: str = "vacuum_weak", tol_km: float = 1e-6) -> float:
    """Largest L (km) with R > 0, by bisection; mu fixed or optimised per L as in ``p``.

    Returns 0.0 when no key is possible even at 0 km, and ``math.inf`` when the
    rate is still positive at 10 000 km (e.g. no dark counts and no errors).
    """
    _check_method(method)

    def positive(length: float) -> bool:
        return _chosen_mu(p.with_distance(length), method)[1] > 0

    if not positive(0.0):
        return 0.0
    lo, hi = 0.0, 100.0
    while positive(hi):
        lo, hi = hi, 2 * hi
        if lo >= _MAX_CUTOFF_KM:
            return math.inf
    while hi - lo > tol_km:
        mid = 0.5 * (lo + hi)
        if positive(mid):
            lo = mid
        else:
            hi = mid
    return lo


# --------------------------------------------------------------------------- #
# Finite key
# --------------------------------------------------------------------------- #

#: Security parameter of the finite-key length: the key is eps_sec-secret ([LCWXZ14], Eq. (1)).
DEFAULT_EPS_SEC = 1e-10
#: Correctness parameter: Alice's and Bob's keys differ with probability <= eps_cor.
DEFAULT_EPS_COR = 1e-15
#: Block (pulses) the finite-key *rate* of a link is quoted for: 10^10 pulses, 10 s at 1 GHz.
#: The simulated network's key clock (:mod:`qfl.quantum.qkd.network`) makes key at this rate.
DEFAULT_BLOCK_PULSES = 10**10
#: Largest block :func:`min_block_pulses` looks at.
_MAX_BLOCK_PULSES = 10**16


@dataclass(frozen=True)
class FiniteKeyResult:
    """Finite-key length for one block of ``n_pulses`` (see :func:`finite_key_from_counts`).

    Counts are in detections (observed, expected, or their bounds); ``length_bits``
    is the key length ``l`` (>= 0), ``asymptotic_rate_per_pulse`` the limit of
    ``l / N`` with every statistical deviation set to zero (same counts, same
    ``lambda_ec``). ``s0`` and ``s1`` are the vacuum and single-photon detections
    certified *in the key*; ``phase_error`` is their phase-error bound.
    """

    n_pulses: int
    mu: float
    length_bits: int
    rate_per_pulse: float
    asymptotic_rate_per_pulse: float
    s0: float
    s1: float
    phase_error: float
    e1_upper: float
    lambda_ec: float
    security_bits: float
    delta_counts: float
    delta_errors: float
    key_bits: float = 0.0
    eps_sec: float = DEFAULT_EPS_SEC
    eps_cor: float = DEFAULT_EPS_COR


def _gamma(a: float, b: float, c: float, d: float) -> float:
    """[LCWXZ14] Eq. (5) random-sampling term gamma(a, b, c, d); inf when c or d is 0."""
    if c <= 0 or d <= 0:
        return math.inf
    if b <= 0 or b >= 1:
        return 0.0
    arg = (c + d) / (c * d * (1 - b) * b) * 21.0**2 / a**2
    if arg <= 1:
        return 0.0
    return math.sqrt((c + d) * (1 - b) * b / (c * d * math.log(2)) * math.log2(arg))


def _check_probability(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < 1:
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {value!r}")
    return float(value)


def _check_pulses(n_pulses: Any) -> int:
    if isinstance(n_pulses, bool) or not isinstance(n_pulses, numbers.Real):
        raise ValueError(f"n_pulses must be a positive whole number of pulses, got {n_pulses!r}")
    if not math.isfinite(n_pulses) or n_pulses < 1 or n_pulses != math.floor(n_pulses):
        raise ValueError(
            f"n_pulses must be a positive whole number of pulses (>= 1), got {n_pulses!r}; "
            "a block of e.g. 1e10 pulses is 10 s at 1 GHz"
        )
    return int(n_pulses)  # type: ignore[call-overload]  # a whole int, float or numpy number


@dataclass(frozen=True)
class DecoyCounts:
    """One block's decoy statistics: per intensity k, the sifted detections ``n_k`` and the bit
    errors ``m_k`` among them -- counted in a run (:mod:`qfl.quantum.qkd.bb84`) or expected values
    (:func:`expected_counts`).

    Each of the ``n_pulses`` pulses gets intensity ``mu`` (signal), ``nu1`` (weak decoy) or
    ``nu2`` (second decoy, 0 = vacuum) with probability ``p_mu``, ``p_nu1``, ``p_nu2``; the
    decoy bounds need ``mu > nu1 > nu2 >= 0`` and ``nu1 + nu2 < mu``.
    """

    n_pulses: int
    mu: float
    nu1: float
    nu2: float
    p_mu: float
    p_nu1: float
    p_nu2: float
    n_mu: float
    n_nu1: float
    n_nu2: float
    m_mu: float
    m_nu1: float
    m_nu2: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "n_pulses", _check_pulses(self.n_pulses))
        probs = {k: _check_probability(k, getattr(self, k)) for k in ("p_mu", "p_nu1", "p_nu2")}
        if abs(sum(probs.values()) - 1.0) > 1e-9:
            raise ValueError(f"p_mu + p_nu1 + p_nu2 must equal 1, got {sum(probs.values())!r} from {probs}")
        if not (self.mu > self.nu1 > self.nu2 >= 0 and self.nu1 + self.nu2 < self.mu):
            raise ValueError(
                f"the decoy bounds need mu > nu1 > nu2 >= 0 and nu1 + nu2 < mu, got mu={self.mu}, "
                f"nu1={self.nu1}, nu2={self.nu2}; use a weak decoy and a vacuum (nu2 = 0) below the signal"
            )
        for k in ("mu", "nu1", "nu2"):
            n, m = getattr(self, f"n_{k}"), getattr(self, f"m_{k}")
            if not (math.isfinite(n) and math.isfinite(m) and 0 <= m <= n):
                raise ValueError(f"counts of intensity {k} must satisfy 0 <= m_{k} <= n_{k}, got n={n!r}, m={m!r}")


def expected_counts(
    p: LinkParams, n_pulses: float, *, p_mu: float = 0.8, p_nu1: float = 0.1, p_nu2: float = 0.1
) -> DecoyCounts:
    """Expected sifted detections and errors of a block of ``n_pulses`` on link ``p``::

        n_k = N p_k q Q_k,   m_k = N p_k q E_k Q_k

    with ``mu = p.mu`` or, if None, the asymptotic optimum of the vacuum+weak rate.
    """
    big_n = _check_pulses(n_pulses)
    mu = p.mu if p.mu is not None else optimal_mu(p, "vacuum_weak")[0]
    q = p.sifting
    n = {x: big_n * pk * q * gain(p, x) for x, pk in ((mu, p_mu), (p.nu1, p_nu1), (p.nu2, p_nu2))}
    m = {x: big_n * pk * q * error_gain(p, x) for x, pk in ((mu, p_mu), (p.nu1, p_nu1), (p.nu2, p_nu2))}
    return DecoyCounts(
        n_pulses=big_n, mu=mu, nu1=p.nu1, nu2=p.nu2, p_mu=p_mu, p_nu1=p_nu1, p_nu2=p_nu2,
        n_mu=n[mu], n_nu1=n[p.nu1], n_nu2=n[p.nu2], m_mu=m[mu], m_nu1=m[p.nu1], m_nu2=m[p.nu2],
    )


def finite_key_from_counts(
    c: DecoyCounts,
    lambda_ec: float,
    *,
    key_bits: float | None = None,
    eps_sec: float = DEFAULT_EPS_SEC,
    eps_cor: float = DEFAULT_EPS_COR,
) -> FiniteKeyResult:
    """Secret-key length of one block from its decoy statistics, after [LCWXZ14].

    The key is made from ``key_bits`` of the ``n_mu`` sifted *signal* detections
    (all of them by default; fewer when a random sample of them was disclosed to
    estimate the QBER); decoy detections serve only for estimation, as in
    [MQZL05]/[GLLP04]. ``lambda_ec`` is the error-correction leakage in bits.

    Deviation terms (Hoeffding, as in [LCWXZ14] below Eq. (2))::

        delta_n = sqrt(n/2 ln(21/eps_sec)),   delta_m = sqrt(m/2 ln(21/eps_sec))
        n_k^(+-) = e^k / p_k (n_k +- delta_n),   m_k^(+-) = e^k / p_k (m_k +- delta_m)

    with ``n = sum n_k``, ``m = sum m_k``. Decoy estimates over all intensities,
    [LCWXZ14] Eqs. (2)-(4) with mu1 = mu, mu2 = nu1, mu3 = nu2 and
    tau_j = sum_k p_k e^-k k^j / j!::

        S0 >= tau0 (nu1 n_nu2^- - nu2 n_nu1^+) / (nu1 - nu2)
        S1 >= tau1 mu [n_nu1^- - n_nu2^+ - (nu1^2 - nu2^2)/mu^2 (n_mu^+ - S0/tau0)]
              / (mu (nu1 - nu2) - nu1^2 + nu2^2)
        V1 <= tau1 (m_nu1^+ - m_nu2^-) / (nu1 - nu2),   e1^U = V1 / S1

    Simplifications beyond [LCWXZ14] (which keys on all intensities in one
    basis and estimates the phase error from the other):

    * Share of the key in S0 and S1: a j-photon detection came from intensity k
      with probability p_k e^-k k^j/j! / tau_j, so the signal pulses hold at
      least ``w_j S_j - sqrt(S_j/2 ln(21/eps_sec))`` of them, with
      ``w_j = p_mu e^-mu mu^j/j! / tau_j`` (expected share less one more
      Hoeffding deviation). A uniformly random sample of ``n_mu - key_bits`` of
      the signal detections is disclosed; it holds at most its proportional
      share plus ``sqrt((n_mu - key_bits)/2 ln(21/eps_sec))`` of them (Hoeffding
      for sampling without replacement), so the key keeps::

          s_j = (key_bits / n_mu) (w_j S_j - sqrt(S_j/2 ln(21/eps_sec)))
                - sqrt((n_mu - key_bits)/2 ln(21/eps_sec))

    * Phase error of the key's single-photon events: the bit-error bound e1^U
      (basis-symmetric source) moved from the other single-photon events
      (``c = (1 - w_1) S1``) to the key's (``d = s_1``) with the random-sampling
      term of [LCWXZ14] Eq. (5): ``phi = e1^U + gamma(eps_sec, e1^U, c, d)``.
    * The two share deviations are charged at the same per-event failure
      probability eps_sec/21 as [LCWXZ14]'s own terms; the ``21`` is kept.

    Length, [LCWXZ14] Eq. (1), floored and clipped at 0::

        l = s_0 + s_1 (1 - H2(phi)) - lambda_EC - 6 log2(21/eps_sec) - log2(2/eps_cor)
    """
    eps_sec = _check_probability("eps_sec", eps_sec)
    eps_cor = _check_probability("eps_cor", eps_cor)
    lambda_ec = float(lambda_ec)
    if not (math.isfinite(lambda_ec) and lambda_ec >= 0):
        raise ValueError(f"lambda_ec must be a finite number of leaked bits >= 0, got {lambda_ec!r}")
    kept = c.n_mu if key_bits is None else float(key_bits)
    if not 0 <= kept <= c.n_mu:
        raise ValueError(f"key_bits must lie in [0, n_mu = {c.n_mu}], got {key_bits!r}")
    keep = kept / c.n_mu if c.n_mu > 0 else 0.0
    disclosed = c.n_mu - kept

    mu, n1, n2 = c.mu, c.nu1, c.nu2
    intensities = {"mu": (mu, c.p_mu), "nu1": (n1, c.p_nu1), "nu2": (n2, c.p_nu2)}
    n = {"mu": c.n_mu, "nu1": c.n_nu1, "nu2": c.n_nu2}
    m = {"mu": c.m_mu, "nu1": c.m_nu1, "nu2": c.m_nu2}
    ln_term = math.log(21.0 / eps_sec)
    delta_n = math.sqrt(sum(n.values()) / 2 * ln_term)
    delta_m = math.sqrt(sum(m.values()) / 2 * ln_term)
    big_n = float(c.n_pulses)

    def scaled(counts: dict[str, float], k: str, delta: float) -> float:
        x, pk = intensities[k]
        return math.exp(x) / pk * (counts[k] + delta)

    def tau(j: int) -> float:
        return sum(pk * math.exp(-x) * x**j / math.factorial(j) for x, pk in intensities.values())

    tau0, tau1 = tau(0), tau(1)
    w0 = c.p_mu * math.exp(-mu) / tau0
    w1 = c.p_mu * math.exp(-mu) * mu / tau1
    security_bits = 6 * math.log2(21.0 / eps_sec) + math.log2(2.0 / eps_cor)

    def estimate(dn: float, dm: float, extra: float) -> tuple[float, float, float, float]:
        """(s0, s1, e1^U, phi) for count deviations dn, dm; ``extra`` = 0 drops the share and
        sampling deviations too (the N -> oo limit), 1 keeps them."""
        big_s0 = tau0 * (n1 * scaled(n, "nu2", -dn) - n2 * scaled(n, "nu1", dn)) / (n1 - n2)
        big_s0 = max(0.0, big_s0)
        big_s1 = (
            tau1 * mu
            * (scaled(n, "nu1", -dn) - scaled(n, "nu2", dn)
               - (n1**2 - n2**2) / mu**2 * (scaled(n, "mu", dn) - big_s0 / tau0))
            / (mu * (n1 - n2) - n1**2 + n2**2)
        )
        big_s1 = max(0.0, big_s1)
        v1 = tau1 * (scaled(m, "nu1", dm) - scaled(m, "nu2", -dm)) / (n1 - n2)
        sample_dev = extra * math.sqrt(disclosed / 2 * ln_term)
        s0 = max(0.0, keep * (w0 * big_s0 - extra * math.sqrt(big_s0 / 2 * ln_term)) - sample_dev)
        s1 = max(0.0, keep * (w1 * big_s1 - extra * math.sqrt(big_s1 / 2 * ln_term)) - sample_dev)
        if big_s1 <= 0 or s1 <= 0:
            return s0, 0.0, E0, E0
        e1_u = min(max(v1 / big_s1, 0.0), E0)
        phi = e1_u + _gamma(eps_sec, e1_u, (1 - w1) * big_s1, s1) if extra else e1_u
        return s0, s1, e1_u, min(phi, E0)

    s0, s1, e1_u, phi = estimate(delta_n, delta_m, 1.0)
    raw = s0 + s1 * (1 - h2(phi)) - lambda_ec - security_bits
    length = max(0, math.floor(raw))

    a0, a1, _, a_phi = estimate(0.0, 0.0, 0.0)
    asymptotic = max(0.0, (a0 + a1 * (1 - h2(a_phi)) - lambda_ec) / big_n)

    return FiniteKeyResult(
        n_pulses=c.n_pulses,
        mu=mu,
        length_bits=length,
        rate_per_pulse=length / big_n,
        asymptotic_rate_per_pulse=asymptotic,
        s0=s0,
        s1=s1,
        phase_error=phi,
        e1_upper=e1_u,
        lambda_ec=lambda_ec,
        security_bits=security_bits,
        delta_counts=delta_n,
        delta_errors=delta_m,
        key_bits=kept,
        eps_sec=eps_sec,
        eps_cor=eps_cor,
    )


def finite_key(
    p: LinkParams,
    n_pulses: float,
    *,
    eps_sec: float = DEFAULT_EPS_SEC,
    eps_cor: float = DEFAULT_EPS_COR,
    p_mu: float = 0.8,
    p_nu1: float = 0.1,
    p_nu2: float = 0.1,
    key_fraction: float = 1.0,
) -> FiniteKeyResult:
    """Secret-key length for a block of ``n_pulses`` pulses on link ``p``, after [LCWXZ14].

    Protocol modelled: each pulse gets intensity k in {mu, nu1, nu2} with
    probability p_k (default 0.8 / 0.1 / 0.1) and a basis; a fraction
    ``q = p.sifting`` of the detections survive sifting. The key is made from the
    sifted signal detections, less a disclosed QBER sample when ``key_fraction``
    < 1. ``mu`` is ``p.mu`` or, if None, the asymptotic optimum of the
    vacuum+weak rate at this distance.

    Observed counts are replaced by their expected values (:func:`expected_counts`;
    a planning model, not the analysis of a run) and the error-correction leakage
    by ``lambda_EC = f key_bits H2(E_mu)``; the length is then
    :func:`finite_key_from_counts`, whose docstring has the bounds.

    With all deviations set to zero ``l / N`` tends to
    ``p_mu (R_vw + q e^-mu Y0^L)`` (for ``key_fraction = 1``): the vacuum+weak
    rate ``R_vw`` of [MQZL05] on the signal fraction of the pulses, plus the
    vacuum events that Eq. (1) counts and the GLLP formula leaves out.
    ``asymptotic_rate_per_pulse`` is that limit; ``l / N`` rises towards it as N
    grows.
    """
    _check_pulses(n_pulses)
    eps_sec = _check_probability("eps_sec", eps_sec)
    eps_cor = _check_probability("eps_cor", eps_cor)
    probs = {
        "p_mu": _check_probability("p_mu", p_mu),
        "p_nu1": _check_probability("p_nu1", p_nu1),
        "p_nu2": _check_probability("p_nu2", p_nu2),
    }
    if abs(sum(probs.values()) - 1.0) > 1e-9:
        raise ValueError(f"p_mu + p_nu1 + p_nu2 must equal 1, got {sum(probs.values())!r} from {probs}")
    if isinstance(key_fraction, bool) or not isinstance(key_fraction, numbers.Real) or not 0 < key_fraction <= 1:
        raise ValueError(f"key_fraction must lie in (0, 1] (share of the sifted signal bits kept as key), got {key_fraction!r}")
    counts = expected_counts(p, n_pulses, p_mu=p_mu, p_nu1=p_nu1, p_nu2=p_nu2)
    key_bits = key_fraction * counts.n_mu
    lambda_ec = p.ec_efficiency * key_bits * h2(qber(p, counts.mu))
    return finite_key_from_counts(counts, lambda_ec, key_bits=key_bits, eps_sec=eps_sec, eps_cor=eps_cor)


def finite_key_length(p: LinkParams, n_pulses: float, **kwargs: Any) -> int:
    """The key length ``l`` (bits, >= 0) of :func:`finite_key`."""
    return finite_key(p, n_pulses, **kwargs).length_bits


def finite_key_bits_per_s(
    p: LinkParams, block_pulses: float = DEFAULT_BLOCK_PULSES, *, eps_sec: float = DEFAULT_EPS_SEC, **kwargs: Any
) -> float:
    """Finite-key secret bits per second: ``l(N) * pulse_rate_hz / N`` for blocks of N = ``block_pulses``.

    Every block of N pulses (N / pulse_rate_hz seconds) yields the finite-key
    length ``l(N)`` of :func:`finite_key`, so over whole blocks a key clock at
    this rate never hands out more than the finite-key secure length.
    """
    n = _check_pulses(block_pulses)
    return finite_key(p, n, eps_sec=eps_sec, **kwargs).length_bits * p.pulse_rate_hz / n


def min_block_pulses(p: LinkParams, **kwargs: Any) -> int | None:
    """Smallest block (pulses, 2 significant digits, rounded up) with a positive :func:`finite_key`
    length on link ``p``; ``None`` if even 10^16 pulses give no key. ``kwargs`` go to :func:`finite_key`.

    Found by bisection on log N (the length grows with N).
    """
    if p.mu is None:
        p = dataclasses.replace(p, mu=optimal_mu(p, "vacuum_weak")[0])

    def positive(n: float) -> bool:
        return finite_key_length(p, int(math.ceil(n)), **kwargs) > 0

    if not positive(_MAX_BLOCK_PULSES):
        return None
    lo, hi = 1.0, float(_MAX_BLOCK_PULSES)
    if positive(lo):
        return 1
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        if positive(mid):
            hi = mid
        else:
            lo = mid
    scale = 10.0 ** (math.floor(math.log10(hi)) - 1)
    return math.ceil(math.ceil(hi / scale) * scale)


# --------------------------------------------------------------------------- #
# Report (for `qfl qkd rate`)
# --------------------------------------------------------------------------- #


def link_report(
    p: LinkParams,
    method: str = "vacuum_weak",
    *,
    block_pulses: float = DEFAULT_BLOCK_PULSES,
    eps_sec: float = DEFAULT_EPS_SEC,
) -> dict[str, Any]:
    """JSON-ready summary of one link: the keys the CLI prints.

    distance_km, method, mu, mu_optimised, transmittance, gain (Q_mu), qber
    (E_mu), y1, e1, rate_per_pulse, bits_per_s (asymptotic, ``method``),
    pulse_rate_hz, sifting, cutoff_km; and the finite-key figures for blocks of
    ``block_pulses`` at ``eps_sec`` (vacuum + weak decoy, :func:`finite_key`):
    block_pulses, eps_sec, finite_key_bits (per block), finite_key_rate_per_pulse,
    finite_key_bits_per_s (what the simulated network's links make), and
    min_block_pulses (the smallest block with any key; ``None`` if none).
    ``cutoff_km`` is ``None`` when the rate stays positive at every distance
    (no dark counts and no misalignment), so the dict stays valid JSON.
    """
    r = evaluate(p, method)
    cutoff = cutoff_distance(p, method)
    fk = finite_key(p, block_pulses, eps_sec=eps_sec)
    return {
        "distance_km": float(p.distance_km),
        "method": method,
        "mu": float(r.mu),
        "mu_optimised": bool(r.mu_optimised),
        "transmittance": float(r.transmittance),
        "gain": float(r.gain),
        "qber": float(r.qber),
        "y1": float(r.y1),
        "e1": float(r.e1),
        "rate_per_pulse": float(r.rate_per_pulse),
        "bits_per_s": float(r.bits_per_s),
        "pulse_rate_hz": float(p.pulse_rate_hz),
        "sifting": float(p.sifting),
        "cutoff_km": None if math.isinf(cutoff) else float(cutoff),
        "block_pulses": int(fk.n_pulses),
        "eps_sec": float(fk.eps_sec),
        "finite_key_bits": int(fk.length_bits),
        "finite_key_rate_per_pulse": float(fk.rate_per_pulse),
        "finite_key_bits_per_s": float(fk.rate_per_pulse * p.pulse_rate_hz),
        "min_block_pulses": min_block_pulses(p, eps_sec=eps_sec),
    }


_METHOD_LABEL = {"infinite": "infinite decoys", "vacuum_weak": "vacuum + weak decoy"}


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def format_report(report: dict[str, Any]) -> str:
    """Human-readable lines for a :func:`link_report` dict."""
    method = report.get("method")
    title = "Decoy-state BB84 link, asymptotic and finite-key rate"
    if method:
        title += f" ({_METHOD_LABEL.get(method, method)})"
    mu_note = " (optimised)" if report.get("mu_optimised") else ""
    lines = [
        title,
        f"  distance            {report['distance_km']:.3f} km",
        f"  signal intensity    mu = {report['mu']:.4f}{mu_note}",
        f"  gain Q_mu           {report['gain']:.4e} detections/pulse",
        f"  QBER E_mu           {100 * report['qber']:.3f} %",
    ]
    if "e1" in report and "y1" in report:
        lines.append(f"  single photons      Y1 = {report['y1']:.4e}, e1 = {100 * report['e1']:.3f} %")
    lines.append(f"  secret key rate     {report['rate_per_pulse']:.4e} bits/pulse (asymptotic)")
    rate_hz = report.get("pulse_rate_hz")
    at = f" at {_si(rate_hz, 'Hz')}" if rate_hz else ""
    lines.append(f"  throughput          {_si(report['bits_per_s'], 'bit/s')}{at} (asymptotic)")
    if "finite_key_bits_per_s" in report:
        lines.append(
            f"  finite-key rate     {report['finite_key_rate_per_pulse']:.4e} bits/pulse, "
            f"{_si(report['finite_key_bits_per_s'], 'bit/s')} in blocks of {report['block_pulses']:.3g} pulses, "
            f"eps_sec={report['eps_sec']:g} (Lim et al. 2014; the network's key clock)"
        )
        least = report.get("min_block_pulses")
        lines.append(
            "  smallest block      "
            + ("no finite-key secure key at any block size" if least is None else f"{least:.2g} pulses for any key")
        )
    cutoff = report.get("cutoff_km")
    lines.append(
        "  cutoff distance     "
        + ("none (rate positive at every distance)" if cutoff is None else f"{cutoff:.2f} km")
    )
    if report["rate_per_pulse"] <= 0:
        lines.append("  no secret key at this distance")
    elif report.get("finite_key_bits") == 0:
        lines.append(
            f"  no finite-key secure key in blocks of {report['block_pulses']:.3g} pulses; "
            "use longer blocks (--block-pulses) or a shorter link"
        )
    return "\n".join(lines)
