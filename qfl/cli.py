"""The `qfl` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_run(args: argparse.Namespace) -> int:
    from qfl.config import build_config
    from qfl.server.app import default_run_dir
    from qfl.server.federation import load_run_config
    from qfl.simulations.runner import run_simulation_job

    if args.resume:
        if args.config or args.set:
            raise SystemExit(
                "qfl run: --resume continues a run with its own saved config.toml; drop --config/--set"
            )
        run_dir = Path(args.resume)
        cfg = load_run_config(run_dir)
    else:
        cfg = build_config(args.config, args.set)
        run_dir = Path(args.out) if args.out else default_run_dir()
    run_simulation_job(cfg, run_dir, resume=bool(args.resume), verbose=args.verbose)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qfl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a federated simulation (Flower simulation engine)")
    run.add_argument("--config", metavar="FILE", help="TOML config file (keys: see docs/architecture.md)")
    run.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], help="override one config key")
    run.add_argument("--out", metavar="DIR", help="run directory (default runs/<timestamp>)")
    run.add_argument("--resume", metavar="DIR", help="continue a killed run from its last complete round")
    run.add_argument("--verbose", action="store_true", help="show Flower and Ray logs")
    run.set_defaults(func=_cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from qfl.clients.datasets import DatasetNotFound
    from qfl.config import ConfigError
    from qfl.server.federation import ResumeError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DatasetNotFound, ResumeError) as err:
        print(f"qfl {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
