"""What a run shows on the terminal (a progress bar or one line per round, the per-round table), and the
helpers every plot uses. The files a run leaves to read are :mod:`qfl.simulations.run_report`'s."""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from qfl.config import RunConfig

COLUMNS = (
    ("round", "round", "{}"),
    ("accuracy", "acc", "{:.4f}"),
    ("loss", "loss", "{:.4f}"),
    ("fed_accuracy", "fed acc", "{:.4f}"),
    ("uplink_bytes", "up B", "{:,}"),
    ("downlink_bytes", "down B", "{:,}"),
    ("bits_per_param_up", "bits/param", "{:.2f}"),
    ("key_bits_used", "key bits", "{:,}"),
    ("clients", "clients", "{}"),
    ("dropped", "dropped", "{}"),
    ("wall_s", "wall s", "{:.2f}"),
)


# The edge task's split figures (model = "streamsplit"), shown after the common columns when present.
EDGE_COLUMNS = (
    ("split_uplink_bytes", "split up B", "{:,}"),
    ("split_hist", "k hist", "{}"),
    ("latency_ms_per_window", "ms/window", "{:.1f}"),
    ("energy_mj_per_window", "mJ/window", "{:.2f}"),
)


def _cell(fmt: str, value: Any) -> str:
    return "-" if value is None else fmt.format(value)


def round_table(history: list[dict[str, Any]]) -> Table:
    table = Table(title="per-round results")
    for _, header, _ in COLUMNS:
        table.add_column(header, justify="right")
    for record in history:
        table.add_row(*(_cell(fmt, record.get(key)) for key, _, fmt in COLUMNS))
    return table


def markdown_table(history: list[dict[str, Any]]) -> str:
    """The per-round table as GitHub markdown (for the README and reports)."""
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "---:|" * len(COLUMNS)]
    for record in history:
        lines.append("| " + " | ".join(_cell(fmt, record.get(key)) for key, _, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: Path) -> Path:
    """Write ``fig`` to ``path`` as a PNG, atomically (never half a file), and close it."""
    from qfl.files import atomic_write_bytes

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    pyplot().close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


class ConsoleReporter:
    """What the terminal shows: a header, one line while Ray starts, then a progress bar (on a terminal)
    or one line per round (to a file or pipe, never wrapped), the table and the result at the end.
    ``quiet``: the result line only."""

    def __init__(self, console: Console | None = None, live: bool = True, quiet: bool = False) -> None:
        tty = sys.stdout.isatty()
        self.console = console or Console(width=None if tty else 1000, soft_wrap=not tty)
        self.live = live and self.console.is_terminal and not quiet
        self.quiet = quiet
        self.progress: Progress | None = None
        self.task: TaskID | None = None
        self.run_dir = Path(".")

    def say(self, text: str) -> None:
        """One line for the user (also while the progress bar runs)."""
        (self.progress.console if self.progress is not None else self.console).print(text, highlight=False)

    def announce(self, cfg: RunConfig, run_dir: Path, first_round: int) -> None:
        """The run's settings and where it writes, before anything slow starts."""
        if self.quiet:
            return
        alpha = "IID" if cfg.alpha is None else f"Dirichlet alpha={cfg.alpha}"
        data = str(cfg.dataset)
        if cfg.model == "streamsplit":  # edge devices: each its own audio stream, activations through edge_codec
            data, alpha = cfg.edge_audio or "synthetic-audio", f"own streams, split={cfg.edge_split}, edge_codec={cfg.edge_codec}"
        self.console.print(
            f"[bold]qfl[/] {data}/{cfg.model}, {cfg.clients} clients ({alpha}), codec={cfg.codec}, "
            f"security={cfg.security}, server_opt={cfg.server_opt}, rounds {first_round}..{cfg.rounds} -> {run_dir}"
        )
        if cfg.security != "none":
            from qfl.security.protection import topology_caveat
            from qfl.security.secagg import SECURITY_LEVELS

            topology = f", QKD {cfg.qkd_topology} at {cfg.qkd_distance_km:g} km" if cfg.key_source == "store" else ""
            caveat = topology_caveat(cfg)
            self.console.print(f"security: {SECURITY_LEVELS[cfg.security]}{topology}" + (f" ({caveat})" if caveat else ""))

    def ray_starting(self, where: str) -> None:
        if not self.quiet:
            self.say(f"starting Ray ({where}); on a busy machine this takes up to a minute ...")

    def start(self, cfg: RunConfig, run_dir: Path, first_round: int) -> None:
        self.run_dir = Path(run_dir)
        self.progress = Progress(
            TextColumn("rounds"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            console=self.console,
            disable=not self.live,
        )
        self.progress.start()
        self.task = self.progress.add_task("rounds", total=cfg.rounds, completed=first_round - 1,
                                           status="the first round also starts the client processes")

    def round(self, record: dict[str, Any]) -> None:
        columns = COLUMNS + (EDGE_COLUMNS if "split_hist" in record else ())
        line = "  ".join(f"{h}={_cell(fmt, record.get(k))}" for k, h, fmt in columns)
        if self.progress is not None and self.task is not None:  # start() sets both
            self.progress.update(self.task, advance=1, status=f"acc {record['accuracy']:.3f}")
            if not self.quiet:
                self.progress.console.print(line, highlight=False)

    def stop_progress(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def finish(self, summary: dict[str, Any], history: list[dict[str, Any]]) -> None:
        self.stop_progress()
        if not self.quiet:
            self.console.print(round_table(history))
        self.console.print(
            f"final accuracy {summary['final_accuracy']:.4f}, uplink {summary['total_uplink_bytes']:,} B, "
            f"{summary['wall_s']:.1f} s -> {self.run_dir}", highlight=False
        )
        if summary.get("total_reduction_vs_fp32") and summary.get("codec") != "fp32":
            self.console.print(
                f"against fp32 both ways: uplink {summary['uplink_reduction_vs_fp32']:.1f}× less, downlink "
                f"{summary['downlink_reduction_vs_fp32']:.1f}× less, total {summary['total_reduction_vs_fp32']:.1f}× "
                f"({summary['total_uplink_bytes'] + summary['total_downlink_bytes']:,} B against "
                f"{summary['fp32_uplink_bytes'] + summary['fp32_downlink_bytes']:,} B)", highlight=False
            )
