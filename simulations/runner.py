"""`qfl run`: one federated run on Flower's simulation engine (Ray backend).

Every check a user can fail (config, dataset files, partition feasibility)
runs here, before Ray starts. The run writes into its directory:
``config.toml``, ``checkpoint.npz`` and ``metrics.json`` after every round,
``run.log`` as it goes (:mod:`.runlog`), then ``summary.json``, and at the end
(also after an interrupt) ``report.md``, ``metrics.csv`` and the plots
(:mod:`.run_report`). Ctrl-C and SIGTERM stop it after the round in flight
(:mod:`.interrupt`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from qfl.config import RunConfig
from qfl.errors import RunInterrupted
from qfl.server.app import make_server_app
from qfl.server.checkpoint import CHECKPOINT_NAME, load_checkpoint
from qfl.server.federation import CONFIG_NAME, SUMMARY_NAME, Reporter
from qfl.server.preflight import preflight

from .flower_polling import node_polling
from .interrupt import Interrupts, adopt_orphans, stop_children
from .report import ConsoleReporter
from .runlog import RUN_LOG_NAME, start_run_log

log = logging.getLogger("qfl.run")


def resume_hint(run_dir: Path) -> str:
    """Where the run stopped and the command that continues it."""
    checkpoint = load_checkpoint(run_dir) if (run_dir / CHECKPOINT_NAME).exists() else None
    if checkpoint is None:
        return f"no round was complete; start again with `qfl run --out {run_dir}` (same settings)"
    return (f"the checkpoint {run_dir / CHECKPOINT_NAME} holds round {checkpoint.round}; "
            f"continue with: qfl run --resume {run_dir}")


def _start_ray(cfg: RunConfig, verbose: bool) -> None:
    """Start (or join) Ray here, as Flower's Ray backend would, so that the wait is announced and timed
    and so that the run's signal handlers, not Ray's, are in place during the rounds."""
    import ray

    if ray.is_initialized():
        return
    # Ray's workers get this driver's sys.path through the environment (Flower's backend does the same).
    pythonpath = os.pathsep.join(sys.path) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    os.environ["PYTHONPATH"] = pythonpath
    where: dict[str, Any] = {"address": cfg.ray_address} if cfg.ray_address else {"include_dashboard": False}
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, logging_level=logging.ERROR,
             log_to_driver=verbose, **where)


def run_simulation_job(
    cfg: RunConfig, run_dir: Path, resume: bool = False, reporter: Reporter | None = None, verbose: bool = False,
    client_app: Any = None, quiet: bool = False,
) -> dict[str, Any]:
    """Run ``cfg`` on the simulation engine; return the summary.

    ``client_app``: the Flower ClientApp the supernodes run (default: qfl's own,
    ``qfl.clients.app.app``); tests pass one that wraps it with faults.
    Raises :class:`~qfl.errors.RunInterrupted` after a Ctrl-C or SIGTERM stopped it between rounds.
    """
    warnings = preflight(cfg)
    run_dir = Path(run_dir)
    if resume:
        checkpoint = load_checkpoint(run_dir)
        if checkpoint is not None and checkpoint.round >= cfg.rounds and (run_dir / SUMMARY_NAME).exists():
            return json.loads((run_dir / SUMMARY_NAME).read_text())

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation

    if client_app is None:
        from qfl.clients.app import app as client_app

    run_dir.mkdir(parents=True, exist_ok=True)
    console = ConsoleReporter(quiet=quiet) if reporter is None else None
    stop_log = start_run_log(run_dir, verbose=verbose, quiet=quiet or console is None)
    interrupts = Interrupts(notify=console.say if console else log.warning, goodbye=lambda: resume_hint(run_dir))
    interrupts.install()
    adopt_orphans()
    errors: list[BaseException] = []
    try:
        checkpoint = load_checkpoint(run_dir) if resume and (run_dir / CHECKPOINT_NAME).exists() else None
        first_round = checkpoint.round + 1 if checkpoint is not None else 1
        log.info("qfl run %s: rounds %s..%s%s", run_dir, first_round, cfg.rounds, " (resumed)" if resume else "")
        if console:
            console.announce(cfg, run_dir, first_round)
        for warning in warnings:
            log.warning(warning)
        if console:
            console.ray_starting(f"cluster at {cfg.ray_address}" if cfg.ray_address else
                                 f"a private instance for {cfg.clients} clients")
        t0 = time.perf_counter()
        try:  # Ray starts its processes with SIGINT blocked: a terminal's Ctrl-C is qfl's to handle
            _start_ray(cfg, verbose)
        finally:
            interrupts.install()  # again: ray.init replaces the SIGTERM handler
        log.info("Ray ready after %.1f s", time.perf_counter() - t0)
        interrupts.rounds_running = True
        server_app = make_server_app(cfg, run_dir, reporter or console, resume, errors, stop=interrupts.stop)
        backend_config: dict[str, dict[str, Any]] = {
            "client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": 0.0},
            "init_args": {"logging_level": "ERROR", "log_to_driver": verbose, "include_dashboard": False},
        }
        with node_polling():  # Flower polls every registered node 10 times a second otherwise
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=cfg.clients,
                backend_config=backend_config,
                verbose_logging=verbose,
            )
    finally:
        interrupts.rounds_running = False
        if console:
            console.stop_progress()
        t_stop = time.perf_counter()
        _stop_ray()
        stopped = stop_children(interrupts.spare)
        adopt_orphans(False)
        log.info("Ray stopped in %.1f s", time.perf_counter() - t_stop)
        if stopped:
            log.info("stopped %s leftover child processes: %s", len(stopped), stopped)
        if (run_dir / CONFIG_NAME).exists() and not interrupts.stop.is_set():  # else the resumed run writes it
            report = _write_report(run_dir)
            if console and report and not quiet:
                console.say(f"report {report}, log {run_dir / RUN_LOG_NAME}")
        interrupts.restore()
        stop_log()
    if errors:
        raise errors[0]
    summary_path = run_dir / SUMMARY_NAME
    if not summary_path.exists():
        if interrupts.stop.is_set():
            raise RunInterrupted(f"interrupted: {resume_hint(run_dir)}", run_dir=run_dir)
        raise RuntimeError(f"the simulation ended without finishing the run; see {run_dir / 'run.log'}")
    return json.loads(summary_path.read_text())


def _stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _write_report(run_dir: Path) -> Path | None:
    """report.md, metrics.csv and the plots; a failure here is logged, never hides the run's own outcome."""
    from .run_report import write_run_report

    try:
        path = write_run_report(run_dir)
    except Exception:  # the run's files are intact; `qfl report RUN_DIR` can rebuild the report
        log.exception("could not write the report of %s; rebuild it with `qfl report %s`", run_dir, run_dir)
        return None
    log.info("report: %s", path)
    return path
