"""The Flower ServerApp (Message API).

``app`` is what ``flwr run .`` loads (see ``[tool.flwr.app.components]``): it
reads Flower's ``run_config`` through qfl's config schema and writes its run
directory under ``runs/`` in the ServerApp's working directory. ``qfl run``
builds its own ServerApp with :func:`make_server_app`, which carries an
already-resolved config, an output directory and a reporter.
"""

from __future__ import annotations

import threading
import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from qfl.config import RunConfig, resolve_config

from .checkpoint import CHECKPOINT_NAME
from .federation import Reporter, run_federation
from .preflight import preflight


def default_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def make_server_app(
    cfg: RunConfig, run_dir: Path, reporter: Reporter | None = None, resume: bool = False, errors: list | None = None,
    stop: threading.Event | None = None,
) -> ServerApp:
    """A ServerApp running ``cfg`` into ``run_dir`` on the simulation engine; exceptions go to ``errors``;
    ``stop`` ends it after a round.

    Its clients share this machine, so they keep codec state in ``run_dir/client-state`` unless
    ``client_state_dir`` says otherwise."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            run_federation(grid, cfg, run_dir, reporter, resume, stop, client_state_dir=Path(run_dir) / "client-state")
        except BaseException as err:  # the simulation engine would only log it
            if errors is None:
                raise
            errors.append(err)

    return server_app


class LogReporter:
    """One log line per round through Flower's logger: the ServerApp of ``flwr run`` writes no report files.

    Tables and plots are the runner's job (:mod:`qfl.simulations.report`); a
    deployment reads ``metrics.json`` and ``summary.json`` in the run directory.
    """

    def start(self, cfg: RunConfig, run_dir: Path, first_round: int) -> None:
        log(INFO, "qfl: %s clients, codec=%s, security=%s, rounds %s..%s -> %s",
            cfg.clients, cfg.codec, cfg.security, first_round, cfg.rounds, run_dir)

    def round(self, record: dict[str, Any]) -> None:
        log(INFO, "qfl round %s: accuracy %.4f, uplink %s B, key bits %s, dropped %s",
            record["round"], record["accuracy"], record["uplink_bytes"], record["key_bits_used"], record["dropped"])

    def finish(self, summary: dict[str, Any], history: list[dict[str, Any]]) -> None:
        log(INFO, "qfl: final accuracy %s after %s rounds", summary["final_accuracy"], summary["rounds"])


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """``flwr run``'s entry: ``run_dir`` (default runs/<timestamp>), resumed if it holds a checkpoint."""
    cfg = resolve_config(dict(context.run_config))
    for warning in preflight(cfg):
        log(WARNING, "qfl: %s", warning)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir()
    resume = (run_dir / CHECKPOINT_NAME).is_file()
    if resume:
        log(INFO, "qfl: %s holds a checkpoint; resuming after its last complete round", run_dir)
    run_federation(grid, cfg, run_dir, LogReporter(), resume=resume)
