"""`qfl qkd ...` on the command line."""

import json

import pytest

from qfl.cli import main


def test_qkd_rate_json_has_the_documented_fields(capsys):
    assert main(["qkd", "rate", "--distance-km", "50", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"distance_km", "mu", "gain", "qber", "rate_per_pulse", "bits_per_s", "cutoff_km"} <= set(report)
    assert report["distance_km"] == 50 and 0 < report["rate_per_pulse"] < 1e-3 and 130 < report["cutoff_km"] < 150
    # the finite-key rate is the one the simulated network's links make key at
    from qfl.quantum.qkd.network import resolve_rate

    assert report["finite_key_bits_per_s"] == pytest.approx(resolve_rate(None, 50.0))
    assert report["block_pulses"] == 10**10 and report["eps_sec"] == 1e-10
    assert main(["qkd", "rate", "--distance-km", "50", "--block-pulses", "1e11", "--eps-sec", "1e-6", "--json"]) == 0
    bigger = json.loads(capsys.readouterr().out)
    assert bigger["block_pulses"] == 10**11 and bigger["finite_key_rate_per_pulse"] > report["finite_key_rate_per_pulse"]


@pytest.mark.parametrize("args, name", [(["--distance-km", "-1"], "distance_km"),
                                        (["--distance-km", "5", "--mu", "0"], "mu")])
def test_qkd_rate_bad_input(args, name):
    with pytest.raises(SystemExit) as exc:
        main(["qkd", "rate", *args])
    assert isinstance(exc.value.code, str) and f"{name} must" in exc.value.code  # exit 1, naming the parameter


def test_qkd_simulate_json_and_eve_abort(capsys):
    args = ["qkd", "simulate", "--distance-km", "10", "--pulses", "2000000", "--seed", "1", "--json"]
    assert main([*args, "--asymptotic"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == ["pulses", "sifted_bits", "qber", "leaked_bits", "key_bits", "aborted", "abort_reason",
                         "pa_bound", "eps_sec", "asymptotic_key_bits"]
    assert out["aborted"] is False and out["key_bits"] > 0 and out["key_bits"] < out["sifted_bits"] - out["leaked_bits"]
    assert out["pa_bound"] == "ASYMPTOTIC (not finite-size secure)" and out["eps_sec"] is None
    # 2·10⁶ pulses: the QBER sample (~1,100 bits) puts Eve's 25% five standard deviations above 0.2
    assert main(["qkd", "simulate", "--distance-km", "0", "--pulses", "2000000", "--eve", "1", "--seed", "0",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["aborted"] is True and out["key_bits"] == 0 and out["qber"] > 0.2


def test_qkd_simulate_at_1e7_pulses_emits_no_asymptotic_sized_key(capsys):
    assert main(["qkd", "simulate", "--pulses", "1e7", "--seed", "2", "--json"]) == 0  # 10 km by default
    out = json.loads(capsys.readouterr().out)
    assert out["pulses"] == 10**7 and out["pa_bound"] == "finite-key, eps_sec=1e-10" and out["eps_sec"] == 1e-10
    assert out["asymptotic_key_bits"] > 1000  # what the asymptotic bound would have emitted
    assert out["key_bits"] == 0 and out["aborted"] is True
    assert "no finite-key secure key" in out["abort_reason"] and "send more pulses" in out["abort_reason"]
    assert main(["qkd", "simulate", "--pulses", "1e7", "--seed", "2"]) == 0
    text = capsys.readouterr().out
    assert "PA sized by   finite-key, eps_sec=1e-10" in text and "ABORTED: no finite-key secure key" in text
    assert main(["qkd", "simulate", "--pulses", "1e7", "--seed", "2", "--asymptotic"]) == 0
    text = capsys.readouterr().out
    assert "PA sized by   ASYMPTOTIC (not finite-size secure)" in text and "ABORTED" not in text


def test_qkd_simulate_defaults_give_finite_key_secure_key(capsys):
    from qfl.quantum.qkd import keyrate

    assert main(["qkd", "simulate", "--seed", "3", "--json"]) == 0  # 1e8 pulses over 10 km
    out = json.loads(capsys.readouterr().out)
    assert out["pulses"] == 10**8 and out["pa_bound"] == "finite-key, eps_sec=1e-10"
    assert out["aborted"] is False and out["key_bits"] > 5000
    # at most keyrate's finite-key length of the block (even with error correction at the Shannon limit)
    link = keyrate.LinkParams(distance_km=10.0, mu=0.5, nu1=0.15, nu2=0.0, ec_efficiency=1.0)
    assert out["key_bits"] <= keyrate.finite_key_length(link, 10**8, p_mu=0.5, p_nu1=0.25, p_nu2=0.25)
    assert out["key_bits"] < out["asymptotic_key_bits"]


@pytest.mark.parametrize("args, name", [(["--distance-km", "5", "--pulses", "0"], "pulses"),
                                        (["--distance-km", "-5", "--pulses", "10"], "distance_km"),
                                        (["--pulses", "10", "--eps-sec", "0"], "eps_sec")])
def test_qkd_simulate_bad_input(args, name):
    with pytest.raises(SystemExit) as exc:
        main(["qkd", "simulate", *args])
    assert isinstance(exc.value.code, str) and name in exc.value.code  # exit 1, naming the parameter
