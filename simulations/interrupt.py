"""Ctrl-C and SIGTERM during `qfl run`: stop after the round, keep the checkpoint, leave no process behind.

The first SIGINT or SIGTERM sets :attr:`Interrupts.stop`. Before the rounds
start (data, Ray's start-up) that is all there is to stop, so it raises
KeyboardInterrupt at once. During the rounds the round loop
(:func:`qfl.server.federation.run_federation`) sees the event after the round
in flight and returns; the runner then stops Ray and every child process and
the command exits 130 naming ``qfl run --resume``. The checkpoint already
holds every complete round (it is written atomically after each one), so a
round that cannot finish within :data:`GRACE_S` is abandoned: a watchdog
kills the children and exits 130. A second signal does the same at once.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Collection
from types import FrameType
from typing import Any

import psutil

# Seconds the first interrupt gives the round in flight (and Ray's shutdown) before the run is abandoned.
GRACE_S = 10.0
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C
_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_PR_SET_CHILD_SUBREAPER = 36  # prctl(2), linux/prctl.h


def descendants() -> list[psutil.Process]:
    """Every living descendant of this process (Ray's GCS, raylet, workers, ...)."""
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def adopt_orphans(on: bool = True) -> None:
    """Make this process (``on=False``: no longer) the child subreaper of its descendants (Linux): a Ray
    worker whose raylet has exited is re-parented here, not to init, so :func:`stop_children` still finds
    it. Elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)


def stop_children(spare: Collection[int] = (), timeout_s: float = 3.0, force: bool = False) -> list[int]:
    """SIGTERM (``force``: SIGKILL) every descendant of this process but those in ``spare`` (there before
    the run), SIGKILL those still alive after ``timeout_s``; return the PIDs it signalled."""
    procs = {p.pid: p for p in descendants() if p.pid not in spare}
    signalled = []
    for proc in procs.values():
        try:
            if proc.is_running():
                proc.kill() if force else proc.terminate()
                signalled.append(proc)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(signalled, timeout=timeout_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=timeout_s)
    return [p.pid for p in signalled]


class Interrupts:
    """SIGINT/SIGTERM handlers for one run; install in the main thread, :meth:`restore` when done.

    ``notify`` shows a line to the user; ``goodbye`` returns the last lines before a hard exit
    (where the checkpoint is, how to resume).
    """

    def __init__(self, notify: Callable[[str], None], goodbye: Callable[[], str], grace_s: float = GRACE_S) -> None:
        self.stop = threading.Event()
        self.notify, self.goodbye, self.grace_s = notify, goodbye, grace_s
        self.rounds_running = False
        self._previous: dict[int, Any] = {}
        self._watchdog: threading.Timer | None = None
        self.spare = {p.pid for p in descendants()}  # processes from before the run are not the run's to stop

    def install(self) -> None:
        """Put the handlers in place (again: ``ray.init`` installs its own for SIGTERM)."""
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                previous = signal.signal(sig, self._handle)
                self._previous.setdefault(sig, previous)

    def restore(self) -> None:
        """The handlers from before :meth:`install`; a pending watchdog is cancelled (the run has ended)."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.stop.is_set():
            self.exit_now(f"{name} again: stopping at once")
        self.stop.set()
        if not self.rounds_running:
            raise KeyboardInterrupt
        self.notify(f"{name}: finishing the round in flight (at most {self.grace_s:.0f} s), then checkpoint and stop; "
                    "press Ctrl-C again to stop at once")
        self._watchdog = threading.Timer(self.grace_s, self.exit_now,
                                         args=(f"the run did not stop within {self.grace_s:.0f} s: round abandoned",))
        self._watchdog.daemon = True
        self._watchdog.start()

    def exit_now(self, reason: str) -> None:
        """Kill every child process and exit 130 (the checkpoint holds the last complete round)."""
        logging.getLogger("qfl").info("%s; killing the child processes", reason)  # run.log; stderr below
        stop_children(self.spare, timeout_s=1.0, force=True)
        sys.stderr.write(f"{reason}\n{self.goodbye()}\n")
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)
