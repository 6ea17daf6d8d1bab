"""Ctrl-C and SIGTERM handlers in-process (a real `qfl run` stopped by Ctrl-C and resumed: tests/test_resume.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from qfl.simulations.interrupt import Interrupts, stop_children


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
