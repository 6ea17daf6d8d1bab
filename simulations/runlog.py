"""Where a run's log records go: ``run.log`` in the run directory gets them all, the terminal a few.

``run.log`` holds qfl's records (logger ``qfl``: warnings, interrupts, Ray's
start-up time) and Flower's (logger ``flwr``: the strategy's drops and
retries, the simulation engine), with time stamps, appended across resumes.
The terminal shows qfl's warnings (errors only with ``--quiet``); Flower's
records reach it only with ``--verbose``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

RUN_LOG_NAME = "run.log"
_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s"
_DATE = "%Y-%m-%d %H:%M:%S"


def start_run_log(run_dir: Path, verbose: bool = False, quiet: bool = False) -> Callable[[], None]:
    """Attach run.log (and qfl's console handler) for one run; returns the function that detaches them."""
    file_handler = logging.FileHandler(Path(run_dir) / RUN_LOG_NAME, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter(_FORMAT, _DATE))
    file_handler.setLevel(logging.DEBUG if verbose else logging.INFO)
    qfl_console = logging.StreamHandler()
    qfl_console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    qfl_console.setLevel(logging.ERROR if quiet else logging.WARNING)

    flwr, qfl = logging.getLogger("flwr"), logging.getLogger("qfl")
    saved = (flwr.level, qfl.level, qfl.propagate, [(h, h.level) for h in flwr.handlers])
    for handler in flwr.handlers:  # Flower's own console handler: only with --verbose
        handler.setLevel(logging.DEBUG if verbose else logging.CRITICAL + 1)
    flwr.setLevel(logging.DEBUG if verbose else logging.INFO)
    qfl.setLevel(logging.DEBUG if verbose else logging.INFO)
    qfl.propagate = False
    flwr.addHandler(file_handler)
    qfl.addHandler(file_handler)
    qfl.addHandler(qfl_console)

    def stop() -> None:
        flwr.removeHandler(file_handler)
        qfl.removeHandler(file_handler)
        qfl.removeHandler(qfl_console)
        file_handler.close()
        flwr.level, qfl.level, qfl.propagate = saved[0], saved[1], saved[2]
        for handler, level in saved[3]:
            handler.setLevel(level)

    return stop
