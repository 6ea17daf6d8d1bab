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
