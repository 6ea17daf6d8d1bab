"""BB84 Monte-Carlo (qfl.quantum.qkd.bb84) and its Qiskit Aer cross-check (qfl.quantum.qkd.bb84_circuits)."""

import json
import math

import numpy as np
import pytest

from qfl.quantum.qkd import keyrate
from qfl.quantum.qkd.bb84 import (
    ASYMPTOTIC_LABEL,
    DEFAULT_PULSES,
    bench_bb84,
    cascade_correct,
    expected_qber,
    format_result,
    gllp_secure_length,
    result_json,
    secure_length,
    simulate_bb84,
    toeplitz_hash,
    toeplitz_seed,
)

E_D = 0.033


def _sigma(p, n):
    return math.sqrt(p * (1 - p) / n)


@pytest.fixture(scope="module")
def run_10km():
    """A small block sized by the asymptotic bound: exercises the protocol's mechanics cheaply."""
    return simulate_bb84(2_000_000, 10.0, seed=11, asymptotic=True)


@pytest.fixture(scope="module")
def run_default():
    """The defaults: finite-key privacy amplification on a DEFAULT_PULSES block at 10 km (a few s)."""
    return simulate_bb84(DEFAULT_PULSES, 10.0, seed=31)


@pytest.fixture(scope="module")
def run_0km():
    return simulate_bb84(1_000_000, 0.0, seed=12, asymptotic=True)


# ----------------------------------------------------------------- the protocol


def test_both_ends_get_the_same_key(run_10km):
    r = run_10km
    assert not r.aborted, r.abort_reason
    assert r.key_bits > 1000
    assert r.alice_key.dtype == np.uint8 and r.alice_key.size == r.key_bits
    assert set(np.unique(r.alice_key)) <= {0, 1}
    assert np.array_equal(r.alice_key, r.bob_key)
    assert r.corrected_errors > 0  # the raw keys did differ before Cascade


def test_key_length_respects_sampling_and_leakage(run_10km):
    r = run_10km
    remaining = r.sifted_bits - r.sampled_bits
    assert r.sampled_bits == round(0.1 * r.sifted_bits)
    assert r.leaked_bits > 64
    assert r.key_bits <= remaining - r.leaked_bits
    d = r.decoy
    s1 = d["Q1_lower"] / d["gain"]["signal"]
    assert 0 < s1 < 1 and d["e1_upper"] >= 0
    assert r.key_bits == gllp_secure_length(remaining, s1, d["e1_upper"], r.leaked_bits, 1e-10)
    assert r.key_bits == math.floor(
        remaining * s1 * (1 - keyrate.h2(d["e1_upper"])) - r.leaked_bits - 2 * math.log2(1e10)
    )
    # the photon-number split makes the key strictly shorter than the PNS-blind formula
    assert r.key_bits < secure_length(remaining, r.qber, r.leaked_bits, 1e-10)


def test_same_seed_same_run():
    a = simulate_bb84(300_000, 5.0, seed=3)
    b = simulate_bb84(300_000, 5.0, seed=3)
    assert result_json(a) == result_json(b) and np.array_equal(a.alice_key, b.alice_key)


def test_qber_without_eve_is_the_misalignment(run_0km):
    r = run_0km
    assert not r.aborted
    # dark counts add ~Y0/(2 Q) ~ 4e-5 at 0 km
    assert abs(r.qber_true - E_D) < 4 * _sigma(E_D, r.sifted_bits)
    assert abs(r.qber - E_D) < 4 * _sigma(E_D, r.sampled_bits)


def test_full_intercept_resend_gives_a_quarter_and_aborts():
    r = simulate_bb84(1_000_000, 0.0, eve_fraction=1.0, seed=13)
    expected = expected_qber(E_D, 1.0)  # 1/4 + e_d/2
    assert abs(r.qber_true - expected) < 4 * _sigma(expected, r.sifted_bits)
    assert abs(r.qber_true - 0.25) < 0.03
    assert r.aborted and "QBER" in r.abort_reason
    assert r.key_bits == 0 and r.alice_key.size == 0 and r.leaked_bits == 0


def test_partial_intercept_resend_raises_the_qber_by_about_p_over_4():
    r = simulate_bb84(2_000_000, 0.0, eve_fraction=0.4, seed=14)
    expected = expected_qber(E_D, 0.4)  # e_d + 0.4 (1/4 - e_d/2) = 0.126
    assert abs(r.qber_true - expected) < 4 * _sigma(expected, r.sifted_bits)
    assert abs(r.qber_true - (E_D + 0.1)) < 0.015


def test_decoy_estimates_bound_the_single_photon_yield():
    r = simulate_bb84(5_000_000, 10.0, seed=15)
    d = r.decoy
    eta = 0.045 * 10 ** (-0.21)
    assert d["Y1_true"] == pytest.approx(eta, rel=0.03)
    assert d["Y1_lower"] == pytest.approx(d["Y1_true"], rel=0.2)  # ~9 sigma: 5k decoy clicks
    assert d["gain"]["signal"] == pytest.approx(1 - (1 - 1.7e-6) * math.exp(-eta * 0.5), rel=0.02)
    assert sum(d["sifted"].values()) == r.sifted_bits + d["sifted"]["decoy"] + d["sifted"]["vacuum"]
    # the whole-run GLLP rate and the asymptotic key cut agree in sign; 5e6 pulses certify no finite key
    assert d["gllp_key_bits"] > 0 and r.asymptotic_key_bits > 0
    assert r.aborted and r.key_bits == 0 and "no finite-key secure key" in r.abort_reason
    json.dumps(d)


def test_long_fiber_aborts_cleanly():
    r = simulate_bb84(20_000, 150.0, seed=16)
    assert r.aborted and r.key_bits == 0
    assert json.loads(json.dumps(result_json(r)))["aborted"] is True


def test_json_and_text_report(run_10km):
    out = result_json(run_10km)
    assert list(out) == ["pulses", "sifted_bits", "qber", "leaked_bits", "key_bits", "aborted", "abort_reason",
                         "pa_bound", "eps_sec", "asymptotic_key_bits"]
    assert out["pulses"] == 2_000_000 and out["aborted"] is False
    assert out["pa_bound"] == ASYMPTOTIC_LABEL and out["eps_sec"] is None
    json.dumps(out)
    text = format_result(run_10km)
    assert "key bits" in text and "ABORTED" not in text
    assert "PA sized by   ASYMPTOTIC (not finite-size secure)" in text
    assert "ABORTED" in format_result(simulate_bb84(200_000, 0.0, eve_fraction=1.0, seed=1))


# ----------------------------------------------------------------- finite-key privacy amplification


def _counts(r, pulses, mu=0.5, nu=0.15, p_signal=0.5, p_decoy=0.25):
    """The run's decoy counts, rebuilt from its report (what keyrate needs)."""
    d = r.decoy
    return keyrate.DecoyCounts(
        n_pulses=pulses, mu=mu, nu1=nu, nu2=0.0, p_mu=p_signal, p_nu1=p_decoy, p_nu2=1 - p_signal - p_decoy,
        n_mu=d["sifted"]["signal"], n_nu1=d["sifted"]["decoy"], n_nu2=d["sifted"]["vacuum"],
        m_mu=d["errors"]["signal"], m_nu1=d["errors"]["decoy"], m_nu2=d["errors"]["vacuum"],
    )


def test_default_pa_is_the_finite_key_length_of_the_run(run_default):
    r = run_default
    assert not r.aborted, r.abort_reason
    assert r.pa_bound == "finite-key, eps_sec=1e-10" and r.eps_sec == 1e-10
    assert r.key_bits > 5_000 and np.array_equal(r.alice_key, r.bob_key)
    # recomputed independently by keyrate from the run's counts: Cascade parities are lambda_EC,
    # the 64-bit tag is the log2(2/eps_cor) term, the QBER sample is not key
    cascade = r.leaked_bits - 64
    fk = keyrate.finite_key_from_counts(
        _counts(r, DEFAULT_PULSES), cascade, key_bits=r.sifted_bits - r.sampled_bits, eps_sec=1e-10, eps_cor=2.0**-64
    )
    assert r.key_bits == fk.length_bits == r.finite_key["length_bits"]
    assert fk.security_bits == pytest.approx(6 * math.log2(21e10) + 65)
    # at most the planning model's length for this block, even granting it an error correction at the
    # Shannon limit and no QBER sample
    link = keyrate.LinkParams(distance_km=10.0, mu=0.5, nu1=0.15, nu2=0.0, ec_efficiency=1.0)
    planned = keyrate.finite_key_length(link, DEFAULT_PULSES, p_mu=0.5, p_nu1=0.25, p_nu2=0.25, eps_cor=2.0**-64)
    assert 0 < r.key_bits <= planned
    # and well below what the asymptotic bound would have emitted (the old default)
    assert r.key_bits < 0.5 * r.asymptotic_key_bits
    assert "finite-key, eps_sec=1e-10" in format_result(r) and "not finite-size secure" in format_result(r)


def test_eps_cor_sets_the_tag_and_eps_sec_prices_the_key(run_default):
    a = simulate_bb84(300_000, 5.0, seed=3, asymptotic=True)  # 64-bit tag
    b = simulate_bb84(300_000, 5.0, seed=3, eps_cor=2.0**-32, asymptotic=True)
    assert a.leaked_bits - b.leaked_bits == 32  # same Cascade, a 32-bit tag
    r = run_default
    counts, cascade = _counts(r, DEFAULT_PULSES), r.leaked_bits - 64
    lengths = [
        keyrate.finite_key_from_counts(counts, cascade, key_bits=r.sifted_bits - r.sampled_bits, eps_sec=e,
                                       eps_cor=2.0**-64).length_bits
        for e in (1e-4, 1e-10, 1e-16)
    ]
    assert lengths[0] > lengths[1] == r.key_bits > lengths[2]


def test_a_small_block_emits_no_key_and_names_the_fix():
    r = simulate_bb84(10**7, 10.0, seed=5)
    assert r.aborted and r.key_bits == 0 and r.alice_key.size == 0
    assert "no finite-key secure key" in r.abort_reason and "send more pulses: about" in r.abort_reason
    assert "QBER" not in r.abort_reason  # server/key_budget.py kills a link only on a QBER abort
    assert r.asymptotic_key_bits > 1000  # what the asymptotic bound would have emitted
    assert r.finite_key is not None and r.finite_key["length_bits"] == 0
    # the named block size is where the planning model first gives key on this link
    size = float(r.abort_reason.split("about ")[1].split(" ")[0])
    assert 3e7 < size < 3e8


def test_asymptotic_opt_out_is_labelled():
    r = simulate_bb84(10**7, 10.0, seed=5, asymptotic=True)
    assert not r.aborted and r.key_bits == r.asymptotic_key_bits > 1000
    assert r.pa_bound == ASYMPTOTIC_LABEL == "ASYMPTOTIC (not finite-size secure)" and r.eps_sec is None
    assert "ASYMPTOTIC (not finite-size secure)" in format_result(r)


def test_finite_key_needs_decoy_and_vacuum_pulses():
    r = simulate_bb84(300_000, 0.0, seed=4, p_signal=0.75, p_decoy=0.25)  # no vacuum pulses
    assert r.aborted and "vacuum" in r.abort_reason and r.key_bits == 0


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"pulses": 0}, "pulses"),
        ({"pulses": -10}, "pulses"),
        ({"pulses": 1.5}, "pulses"),
        ({"distance_km": -1.0}, "distance_km"),
        ({"distance_km": float("nan")}, "distance_km"),
        ({"eve_fraction": -0.1}, "eve_fraction"),
        ({"eve_fraction": 1.5}, "eve_fraction"),
        ({"nu": 0.6}, "nu"),
        ({"sample_fraction": 1.0}, "sample_fraction"),
        ({"eps_sec": 0.0}, "eps_sec"),
        ({"eps_cor": 1.0}, "eps_cor"),
    ],
)
def test_bad_input_is_rejected_with_the_fix(kwargs, word):
    args = {"pulses": 1000, "distance_km": 1.0} | kwargs
    with pytest.raises(ValueError) as err:
        simulate_bb84(args.pop("pulses"), args.pop("distance_km"), **args)
    assert word in str(err.value)  # the message names the parameter to fix (its wording is free)


# ----------------------------------------------------------------- Cascade


@pytest.mark.parametrize("e", [0.01, 0.02, 0.04, 0.08])
def test_cascade_corrects_everything_near_the_shannon_limit(e):
    rng = np.random.default_rng(int(e * 1000))
    n = 50_000
    alice = rng.integers(0, 2, n, dtype=np.uint8)
    bob = alice ^ (rng.random(n) < e).astype(np.uint8)
    errors = int(np.count_nonzero(alice != bob))
    res = cascade_correct(alice, bob, errors / n, seed=1)
    assert np.array_equal(res.corrected, alice)
    assert res.corrected_errors == errors  # every bisection ends on a real error
    ratio = res.leaked_bits / (n * keyrate.h2(errors / n))
    # measured: 1.13 (1%), 1.15 (2%), 1.18 (4%), 1.21 (8%)
    assert 1.05 < ratio < 1.35, ratio
    assert res.block_sizes[0] == math.ceil(0.73 / (errors / n))
    assert not np.array_equal(bob, alice)  # the input was not modified


def test_cascade_on_identical_strings_only_discloses_block_parities():
    a = np.random.default_rng(0).integers(0, 2, 1000, dtype=np.uint8)
    res = cascade_correct(a, a.copy(), 0.05, seed=0)
    assert res.corrected_errors == 0
    assert res.leaked_bits == sum(-(-1000 // k) for k in res.block_sizes)


# ----------------------------------------------------------------- Toeplitz


def _toeplitz_matrix(seed_bits, n, m):
    return np.array([[seed_bits[i - j + n - 1] for j in range(n)] for i in range(m)], dtype=np.int64)


@pytest.mark.parametrize("n, m", [(1, 1), (9, 4), (64, 64), (257, 100), (1000, 1)])
def test_toeplitz_matches_the_matrix_product(n, m):
    rng = np.random.default_rng(n * 1000 + m)
    x = rng.integers(0, 2, n, dtype=np.uint8)
    s = toeplitz_seed(rng, n, m)
    assert s.size == n + m - 1
    out = toeplitz_hash(x, m, s)
    assert out.dtype == np.uint8 and out.size == m
    assert np.array_equal(out, (_toeplitz_matrix(s, n, m) @ x) % 2)


def test_toeplitz_is_linear_and_deterministic():
    rng = np.random.default_rng(5)
    n, m = 200_000, 120_000
    s = toeplitz_seed(rng, n, m)
    a = rng.integers(0, 2, n, dtype=np.uint8)
    b = rng.integers(0, 2, n, dtype=np.uint8)
    ta, tb = toeplitz_hash(a, m, s), toeplitz_hash(b, m, s)
    assert ta.size == m
    assert np.array_equal(toeplitz_hash(a ^ b, m, s), ta ^ tb)
    assert np.array_equal(toeplitz_hash(a.copy(), m, s), ta)
    assert not np.array_equal(toeplitz_hash(a, m, toeplitz_seed(rng, n, m)), ta)
    with pytest.raises(ValueError):  # a seed of the wrong length
        toeplitz_hash(a, m, s[:-1])


def test_throughput_targets():
    b = bench_bb84(2_000_000, cascade_bits=1 << 18, toeplitz_bits=1 << 18)
    assert b["pulses_per_s"] > 1e6, b
    assert b["cascade_bits_per_s"] > 1e5, b
    assert b["cascade_residual_errors"] == 0
    assert b["toeplitz_bits_per_s"] > 1e5, b


# ----------------------------------------------------------------- Qiskit Aer cross-check


def test_aer_qber_with_misalignment_noise_agrees_with_the_monte_carlo(run_0km):
    from qfl.quantum.qkd.bb84_circuits import simulate_bb84_circuits

    mc = run_0km
    for noise in ("depolarizing", "bitflip"):
        aer = simulate_bb84_circuits(4000, e_d=E_D, noise=noise, seed=21)
        assert aer.sifted_bits > 1800
        tol = 4 * math.hypot(_sigma(E_D, aer.sifted_bits), _sigma(E_D, mc.sifted_bits))
        assert abs(aer.qber - mc.qber_true) < tol, (noise, aer.qber, mc.qber_true)
    clean = simulate_bb84_circuits(500, noise=None, seed=22)
    assert clean.errors == 0


def test_aer_intercept_resend_agrees_with_the_monte_carlo():
    from qfl.quantum.qkd.bb84_circuits import simulate_bb84_circuits

    mc = simulate_bb84(1_000_000, 0.0, eve_fraction=1.0, seed=23)
    aer = simulate_bb84_circuits(4000, e_d=E_D, eve_fraction=1.0, seed=24)
    p = expected_qber(E_D, 1.0)
    assert abs(aer.qber - mc.qber_true) < 4 * math.hypot(_sigma(p, aer.sifted_bits), _sigma(p, mc.sifted_bits))
    assert abs(aer.eve_agreement - 0.75) < 4 * _sigma(0.75, aer.sifted_bits)
    # the mid-circuit measure + reset + if_test re-preparation gives the same statistics
    mid = simulate_bb84_circuits(600, e_d=E_D, eve_fraction=1.0, seed=25, eve_mode="mid-circuit")
    assert abs(mid.qber - p) < 4 * _sigma(p, mid.sifted_bits)


def test_aer_bad_input():
    from qfl.quantum.qkd.bb84_circuits import simulate_bb84_circuits

    with pytest.raises(ValueError):
        simulate_bb84_circuits(0)
    with pytest.raises(ValueError):
        simulate_bb84_circuits(10, eve_fraction=2.0)
    with pytest.raises(ValueError):  # an unknown noise model
        simulate_bb84_circuits(10, e_d=0.1, noise="amplitude")
