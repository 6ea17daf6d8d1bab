"""The Flower ServerApp (Message API).

``app`` is what ``flwr run .`` loads (see ``[tool.flwr.app.components]``): it
reads Flower's ``run_config`` through qfl's config schema and writes its run
directory under ``runs/`` in the ServerApp's working directory. ``qfl run``
builds its own ServerApp with :func:`make_server_app`, which carries an
already-resolved config, an output directory and a reporter.
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from qfl.config import RunConfig, resolve_config

from .federation import Reporter, run_federation


def default_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def make_server_app(
    cfg: RunConfig, run_dir: Path, reporter: Reporter | None = None, resume: bool = False, errors: list | None = None
) -> ServerApp:
    """A ServerApp running ``cfg`` into ``run_dir``; exceptions go to ``errors``."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            run_federation(grid, cfg, run_dir, reporter, resume)
        except BaseException as err:  # the simulation engine would only log it
            if errors is None:
                raise
            errors.append(err)

    return server_app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from qfl.simulations.report import ConsoleReporter

    cfg = resolve_config(dict(context.run_config))
    run_federation(grid, cfg, default_run_dir(), ConsoleReporter(live=False))
