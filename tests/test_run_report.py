"""report.md, metrics.csv, the plots and `qfl report` over run directories (written here, no simulation)."""

from __future__ import annotations

import csv
import json

import pytest

from qfl.cli import main
from qfl.config import build_config, describe_keys
from qfl.files import atomic_write_json
from qfl.simulations.run_report import PLOTS, compare_runs, load_run, report_markdown, write_run_report


def _fake_run(path, overrides, rounds=3, done=True):
    cfg = build_config(overrides=[f"rounds={rounds}", *overrides])
    path.mkdir(parents=True)
    (path / "config.toml").write_text(cfg.to_toml())
    history = [{
        "round": r, "accuracy": 0.5 + r / 10, "loss": 1.0 / r, "fed_accuracy": None if r == 1 else 0.4 + r / 10,
        "fed_loss": 1.2 / r, "uplink_bytes": 1000 * r, "downlink_bytes": 4000, "bits_per_param_up": 8.0,
        "key_bits_used": 0 if cfg.security == "none" else 5000, "clients": 3, "dropped": 0, "drop_reasons": [],
        "key_pools_left": {} if cfg.security == "none" else {"client-0~server": 100 * r, "client-1~server": 50},
        "wall_s": 1.0, "elapsed_s": float(r),
    } for r in range(1, (rounds if done else rounds - 1) + 1)]
    atomic_write_json(path / "metrics.json", history)
    if done:
        atomic_write_json(path / "summary.json", {"rounds": rounds})
    return history


def test_a_run_report_has_the_config_security_rounds_totals_and_plots(tmp_path):
    history = _fake_run(tmp_path / "a", [])
    report = write_run_report(tmp_path / "a").read_text()
    for name in PLOTS:
        assert (tmp_path / "a" / name).stat().st_size > 0 and f"({name})" in report
    assert "rounds = 3" in report  # the resolved config.toml
    assert report.count("\n| 3 | 0.8000 |") == 1  # the last round's row
    assert f"{sum(r['uplink_bytes'] for r in history):,}" in report
    with (tmp_path / "a" / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["round"]) for r in rows] == [1, 2, 3]
    assert rows[0]["fed_accuracy"] == "" and int(rows[2]["key_left_bits"]) == 350
    assert json.loads(rows[0]["key_pools_left"]) == history[0]["key_pools_left"]


def test_an_unfinished_run_names_the_resume_command(tmp_path):
    _fake_run(tmp_path / "a", [], done=False)
    assert f"qfl run --resume {tmp_path / 'a'}" in report_markdown(load_run(tmp_path / "a"))


@pytest.mark.parametrize("security, rows", [("none", 2), ("channel-pad", 5), ("masked-sum", 6)])
def test_the_security_section_follows_the_mode(tmp_path, security, rows):
    _fake_run(tmp_path / "a", [f"security={security}", "codec=fp32" if security != "masked-sum" else "codec=qsgd"])
    report = report_markdown(load_run(tmp_path / "a"))
    section = report.split("## Security")[1].split("## Totals")[0]
    assert section.count("\n| ") - 1 == rows  # the header row is not a party


def test_qfl_report_overlays_several_runs(tmp_path, capsys):
    _fake_run(tmp_path / "qsgd", [])
    _fake_run(tmp_path / "fp32", ["codec=fp32", "security=none"])
    assert main(["report", str(tmp_path / "qsgd"), str(tmp_path / "fp32"), "--out", str(tmp_path / "cmp")]) == 0
    text = (tmp_path / "cmp" / "compare.md").read_text()
    assert "qsgd: codec=qsgd, security=masked-sum" in text and "fp32: codec=fp32, security=none" in text
    assert all((tmp_path / "cmp" / name).stat().st_size > 0 for name in PLOTS)


def test_compare_refuses_a_directory_without_a_run(tmp_path):
    from qfl.errors import ResumeError

    with pytest.raises(ResumeError):
        compare_runs([tmp_path], tmp_path / "out")


def test_run_help_lists_every_key_with_its_default(capsys):
    with pytest.raises(SystemExit) as done:
        main(["run", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for info in describe_keys():
        assert f"    {info.key} = {info.default}" in text


def test_config_show_prints_the_resolved_config(capsys, tmp_path):
    (tmp_path / "c.toml").write_text("rounds = 7\nclients = 4\n")
    assert main(["config", "show", "--config", str(tmp_path / "c.toml"), "--set", "clients=5"]) == 0
    text = capsys.readouterr().out
    assert build_config(tmp_path / "c.toml", ["clients=5"]).to_toml() == text
    assert main(["config", "show", "--set", "clients=1"]) == 2  # masked sums refuse one client


def test_tensorboard_scalars_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    history = _fake_run(tmp_path / "a", [])
    write_run_report(tmp_path / "a")
    events = EventAccumulator(str(tmp_path / "a" / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("accuracy")] == pytest.approx([r["accuracy"] for r in history])
