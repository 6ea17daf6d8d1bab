"""`qfl run`: one federated run on Flower's simulation engine (Ray backend).

Every check a user can fail (config, dataset files, partition feasibility)
runs here, before Ray starts. The run writes into its directory:
``config.toml``, ``checkpoint.npz`` and ``metrics.json`` after every round,
then ``summary.json``, ``accuracy.png`` and ``uplink.png``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from qfl.config import RunConfig
from qfl.server.app import make_server_app
from qfl.server.checkpoint import load_checkpoint
from qfl.server.federation import SUMMARY_NAME, Reporter
from qfl.server.preflight import preflight

from .report import ConsoleReporter


def run_simulation_job(
    cfg: RunConfig, run_dir: Path, resume: bool = False, reporter: Reporter | None = None, verbose: bool = False,
    client_app: Any = None,
) -> dict[str, Any]:
    """Run ``cfg`` on the simulation engine; return the summary dict.

    ``client_app``: the Flower ClientApp the supernodes run (default: qfl's own,
    ``qfl.clients.app.app``); tests pass one that wraps it with faults.
    """
    preflight(cfg)
    run_dir = Path(run_dir)
    if resume:
        checkpoint = load_checkpoint(run_dir)
        if checkpoint is not None and checkpoint.round >= cfg.rounds and (run_dir / SUMMARY_NAME).exists():
            import json

            return json.loads((run_dir / SUMMARY_NAME).read_text())

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation

    if client_app is None:
        from qfl.clients.app import app as client_app

    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)
    errors: list[BaseException] = []
    server_app = make_server_app(cfg, run_dir, reporter or ConsoleReporter(), resume, errors)
    backend_config: dict[str, dict[str, Any]] = {
        "client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": 0.0},
        "init_args": {"logging_level": "ERROR", "log_to_driver": verbose, "include_dashboard": False},
    }
    if cfg.ray_address:  # join a running cluster: its nodes' CPUs host the clients
        backend_config["init_args"] = {"address": cfg.ray_address, "logging_level": "ERROR", "log_to_driver": verbose}
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=cfg.clients,
        backend_config=backend_config,
        verbose_logging=verbose,
    )
    if errors:
        raise errors[0]
    summary_path = run_dir / SUMMARY_NAME
    if not summary_path.exists():
        raise RuntimeError(f"the simulation ended without finishing the run; see the log above ({run_dir})")
    import json

    return json.loads(summary_path.read_text())
