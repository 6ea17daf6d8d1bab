"""Ctrl-C and SIGTERM: a real `qfl run` stopped mid-run and resumed to the end; the handlers in-process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from helpers import QFL, REPO, kill_group, run_qfl

from qfl.server.checkpoint import load_checkpoint
from qfl.simulations.interrupt import EXIT_INTERRUPTED, Interrupts, stop_children

SETTINGS = ["--set", "rounds=3", "--set", "clients=3", "--set", "local_epochs=1"]


def _alive(procs: list[psutil.Process]) -> list[int]:
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def test_ctrl_c_mid_run_checkpoints_stops_every_process_then_resume_completes(tmp_path):
    out = tmp_path / "run"
    log = (tmp_path / "out.txt").open("w")
    proc = subprocess.Popen([*QFL, "run", "--out", str(out), *SETTINGS], cwd=REPO, start_new_session=True,
                            stdout=log, stderr=subprocess.STDOUT)
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # a round is complete: the next one is in flight
            if (out / "checkpoint.npz").exists() and load_checkpoint(out).round >= 1:
                break
            assert proc.poll() is None, (tmp_path / "out.txt").read_text()[-4000:]
            time.sleep(0.05)
        children = psutil.Process(proc.pid).children(recursive=True)  # Ray's GCS, raylet, workers
        assert children
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
        assert proc.wait(timeout=120) == EXIT_INTERRUPTED
        printed = (tmp_path / "out.txt").read_text()
        stopped_at = load_checkpoint(out).round
        assert 1 <= stopped_at < 3 and not (out / "summary.json").exists()
        assert f"qfl run --resume {out}" in printed
        assert _alive(children) == []
    finally:
        kill_group(proc)
        for p in children:
            try:
                p.kill()
            except psutil.Error:
                pass
        log.close()

    result = run_qfl(["run", "--resume", str(out)])
    assert result.returncode == 0, result.stdout[-4000:]
    history = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in history] == [1, 2, 3]
    assert (out / "report.md").exists() and (out / "run.log").exists()


@pytest.fixture
def interrupts():
    notes: list[str] = []
    handlers = Interrupts(notify=notes.append, goodbye=lambda: "resume hint", grace_s=3600)
    handlers.install()
    yield handlers, notes
    handlers.restore()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_before_the_rounds_an_interrupt_stops_at_once(interrupts, sig):
    handlers, _ = interrupts
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), sig)
        time.sleep(1)  # the handler runs between bytecodes; this is never reached
    assert handlers.stop.is_set()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_during_the_rounds_an_interrupt_asks_the_loop_to_stop(interrupts, sig):
    handlers, notes = interrupts
    handlers.rounds_running = True
    os.kill(os.getpid(), sig)
    assert handlers.stop.wait(5) and len(notes) == 1


def test_restore_puts_back_the_previous_handlers():
    before = signal.getsignal(signal.SIGTERM)
    handlers = Interrupts(notify=print, goodbye=str)
    handlers.install()
    handlers.install()  # twice, as the runner does around ray.init
    handlers.restore()
    assert signal.getsignal(signal.SIGTERM) is before


def test_stop_children_ends_the_runs_children_and_spares_older_ones():
    older = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    handlers = Interrupts(notify=print, goodbye=str)  # the run starts: `older` is not its to stop
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        assert stop_children(handlers.spare, timeout_s=5) == [child.pid]
        assert child.wait(timeout=10) is not None and older.poll() is None
    finally:
        child.kill()
        older.kill()
