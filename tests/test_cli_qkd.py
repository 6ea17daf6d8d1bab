"""`qfl qkd ...` on the command line."""

import json

import pytest

from qfl.cli import main


def test_qkd_rate_json_has_the_documented_fields(capsys):
    assert main(["qkd", "rate", "--distance-km", "50", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"distance_km", "mu", "gain", "qber", "rate_per_pulse", "bits_per_s", "cutoff_km"} <= set(report)
    assert report["distance_km"] == 50 and 0 < report["rate_per_pulse"] < 1e-3 and 130 < report["cutoff_km"] < 150


@pytest.mark.parametrize("args, message", [(["--distance-km", "-1"], "distance_km must be >= 0"),
                                           (["--distance-km", "5", "--mu", "0"], "mu must be > 0")])
def test_qkd_rate_bad_input(args, message):
    with pytest.raises(SystemExit, match=message):
        main(["qkd", "rate", *args])


def test_qkd_simulate_json_and_eve_abort(capsys):
    assert main(["qkd", "simulate", "--distance-km", "10", "--pulses", "2000000", "--seed", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == ["pulses", "sifted_bits", "qber", "leaked_bits", "key_bits", "aborted"]
    assert out["aborted"] is False and out["key_bits"] > 0 and out["key_bits"] < out["sifted_bits"] - out["leaked_bits"]
    assert main(["qkd", "simulate", "--distance-km", "0", "--pulses", "200000", "--eve", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["aborted"] is True and out["key_bits"] == 0 and out["qber"] > 0.2


@pytest.mark.parametrize("args, message", [(["--distance-km", "5", "--pulses", "0"], "pulses"),
                                           (["--distance-km", "-5", "--pulses", "10"], "distance_km")])
def test_qkd_simulate_bad_input(args, message):
    with pytest.raises(SystemExit, match=message):
        main(["qkd", "simulate", *args])
