"""kill -9 in the middle of a run, then `qfl run --resume`, Ctrl-C in the middle of that, then `--resume`
again: same weights as a run never stopped, and no process of the stopped runs left behind.

The run uses top-k with error feedback, so the clients' residuals (kept in the run's client-state files)
must resume too; masked-sum resumes are tested in test_key_integrity."""

import json

import numpy as np
from helpers import ctrl_c_after_round, run_killed_after_round, run_qfl

from qfl.server.checkpoint import load_checkpoint
from qfl.simulations.interrupt import EXIT_INTERRUPTED

SETTINGS = ["--set", "rounds=8", "--set", "clients=3", "--set", "server_opt=fedadam", "--set", "server_lr=0.01",
            "--set", "alpha=1.0", "--set", "seed=7", "--set", "security=none", "--set", "codec=topk",
            "--set", "codec.ratio=0.1"]


def test_resume_after_kill_and_after_ctrl_c_matches_uninterrupted_run(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    result = run_qfl(["run", "--out", str(straight), *SETTINGS])
    assert result.returncode == 0, result.stdout[-4000:]

    interrupted_at = run_killed_after_round(killed, SETTINGS, after_round=2, timeout=240)
    assert 2 <= interrupted_at < 6, f"kill landed after round {interrupted_at}"
    assert not (killed / "summary.json").exists()

    # resumed, then Ctrl-C once a further round is complete: the round in flight ends, Ray and every
    # process the run started stop, the resume command is printed, exit status 130
    status, printed, alive = ctrl_c_after_round(killed, ["run", "--resume", str(killed)],
                                                after_round=interrupted_at + 1, timeout=240)
    assert status == EXIT_INTERRUPTED, printed[-4000:]
    assert f"qfl run --resume {killed}" in printed and alive == []
    assert interrupted_at < load_checkpoint(killed).round < 8 and not (killed / "summary.json").exists()

    result = run_qfl(["run", "--resume", str(killed)])
    assert result.returncode == 0, result.stdout[-4000:]
    a, b = load_checkpoint(straight), load_checkpoint(killed)
    assert a.round == b.round == 8
    for name in a.weights:
        assert np.array_equal(a.weights[name], b.weights[name]), name
    for name in a.optimizer_state:
        assert np.array_equal(a.optimizer_state[name], b.optimizer_state[name]), name
    history = json.loads((killed / "metrics.json").read_text())
    assert [r["round"] for r in history] == list(range(1, 9))
    assert [r["accuracy"] for r in history] == [r["accuracy"] for r in a.history]
    assert len(list((killed / "client-state").glob("*/*.npz"))) >= 3  # every client's residual is on disk


def test_resume_refuses_config_changes(tmp_path):
    result = run_qfl(["run", "--resume", str(tmp_path), "--set", "rounds=3"])
    assert result.returncode != 0 and "drop --config/--set" in result.stdout
    result = run_qfl(["run", "--resume", str(tmp_path / "none")])
    assert result.returncode == 2 and "no config.toml" in result.stdout
