"""What a run leaves to read: ``report.md``, ``metrics.csv``, the plots, and optional TensorBoard scalars.

Everything here is built from the files a run directory already holds
(``config.toml``, ``metrics.json``, ``summary.json`` when the run finished), so
``qfl run`` writes it at the end (also after an interrupt) and ``qfl report``
rewrites it for any run, or overlays several runs on the same axes.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qfl.config import RunConfig
from qfl.files import atomic_write_bytes
from qfl.security.protection import protection
from qfl.server.federation import CONFIG_NAME, METRICS_NAME, SUMMARY_NAME, load_run_config

from .report import markdown_table, pyplot, save_png

REPORT_NAME = "report.md"
CSV_NAME = "metrics.csv"
COMPARE_NAME = "compare.md"
TENSORBOARD_DIR = "tensorboard"
PLOTS = ("accuracy.png", "loss.png", "traffic.png", "key.png")


@dataclass(frozen=True)
class RunData:
    """One run directory as read back: its config, the per-round records and the summary (None if unfinished)."""

    run_dir: Path
    cfg: RunConfig
    history: list[dict[str, Any]]
    summary: dict[str, Any] | None

    @property
    def name(self) -> str:
        return self.run_dir.resolve().name


def load_run(run_dir: Path) -> RunData:
    """Read a run directory (raises ResumeError when it has no config.toml)."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    metrics, summary = run_dir / METRICS_NAME, run_dir / SUMMARY_NAME
    history = json.loads(metrics.read_text()) if metrics.exists() else []
    return RunData(run_dir, cfg, history, json.loads(summary.read_text()) if summary.exists() else None)


def _main_parts(cfg: RunConfig) -> list[str]:
    split = "IID" if cfg.alpha is None else f"alpha={cfg.alpha:g}"
    return [f"{cfg.dataset}/{cfg.model}", f"{cfg.clients} clients ({split})", f"codec={cfg.codec}",
            f"security={cfg.security}", f"server_opt={cfg.server_opt}"]


def main_config(cfg: RunConfig) -> str:
    """The settings a reader needs to tell runs apart, on one line."""
    return ", ".join(_main_parts(cfg))


def key_left_bits(record: dict[str, Any]) -> int | None:
    """Key bits left in the pools of the links a round used (None without a key store)."""
    pools = record.get("key_pools_left")
    return int(sum(pools.values())) if pools else None


def _cumulative(history: list[dict[str, Any]], key: str) -> list[int]:
    total, out = 0, []
    for record in history:
        total += record.get(key) or 0
        out.append(total)
    return out


def _values(history: list[dict[str, Any]], key: str) -> list[float]:
    """A record's values as floats, NaN where absent (a gap in the plot)."""
    return [math.nan if record.get(key) is None else float(record[key]) for record in history]


# --------------------------------------------------------------------------- metrics.csv


def write_metrics_csv(run_dir: Path, history: list[dict[str, Any]]) -> Path:
    """One row per round, every key of metrics.json as a column (nested values as JSON), plus key_left_bits."""
    columns: list[str] = []
    for record in history:
        columns += [k for k in record if k not in columns]
    columns.append("key_left_bits")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for record in history:
        row = {**record, "key_left_bits": key_left_bits(record)}
        writer.writerow(["" if row.get(k) is None else json.dumps(row[k]) if isinstance(row[k], dict | list)
                         else row[k] for k in columns])
    path = Path(run_dir) / CSV_NAME
    atomic_write_bytes(path, buffer.getvalue().encode())
    return path


# --------------------------------------------------------------------------- plots


def _labels(runs: Sequence[RunData]) -> list[str]:
    """A run's name, plus the config keys in which the runs differ (so overlaid curves can be told apart)."""
    if len(runs) == 1:
        return [runs[0].name]
    flats = [r.cfg.to_flat() for r in runs]
    keys = sorted({k for f in flats for k in f} - {"run_dir", "key_store"})
    differing = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flats}) > 1]
    return [f"{r.name}: " + ", ".join(f"{k}={f.get(k)}" for k in differing) if differing else r.name
            for r, f in zip(runs, flats)]


def _title(runs: Sequence[RunData], what: str) -> str:
    if len(runs) == 1:
        return f"{runs[0].name}: {what}\n{main_config(runs[0].cfg)}"
    shared = [part for part in _main_parts(runs[0].cfg) if all(part in _main_parts(r.cfg) for r in runs[1:])]
    return f"{what}, {len(runs)} runs compared\n" + (", ".join(shared) if shared else "(see the legend)")


def plot_runs(runs: Sequence[RunData], out_dir: Path) -> list[Path]:
    """accuracy.png, loss.png, traffic.png and key.png in ``out_dir``, one colour per run (solid: central
    or uplink or key used; dashed: federated or downlink or key left)."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    labels = _labels(runs)
    paths = []
    for name, what in zip(PLOTS, ("accuracy", "loss", "cumulative traffic", "QKD key")):
        fig, ax = plt.subplots(figsize=(7.5, 4.4), dpi=110)
        right = ax.twinx() if name == "key.png" else None
        for i, (run, label) in enumerate(zip(runs, labels)):
            rounds = [r["round"] for r in run.history]
            colour = f"C{i % 10}"
            if name == "accuracy.png":
                ax.plot(rounds, _values(run.history, "accuracy"), "-o", ms=3, color=colour, label=f"{label} (central)")
                ax.plot(rounds, _values(run.history, "fed_accuracy"), "--", color=colour, label=f"{label} (federated)")
            elif name == "loss.png":
                ax.plot(rounds, _values(run.history, "loss"), "-o", ms=3, color=colour, label=f"{label} (central)")
                ax.plot(rounds, _values(run.history, "fed_loss"), "--", color=colour, label=f"{label} (federated)")
            elif name == "traffic.png":
                ax.plot(rounds, [b / 1e6 for b in _cumulative(run.history, "uplink_bytes")], "-o", ms=3, color=colour,
                        label=f"{label} (uplink)")
                ax.plot(rounds, [b / 1e6 for b in _cumulative(run.history, "downlink_bytes")], "--", color=colour,
                        label=f"{label} (downlink)")
            else:
                assert right is not None
                ax.plot(rounds, [(r.get("key_bits_used") or 0) / 1e6 for r in run.history], "-o", ms=3, color=colour,
                        label=f"{label} (used per round)")
                left = [key_left_bits(r) for r in run.history]
                right.plot(rounds, [math.nan if b is None else b / 1e6 for b in left], "--", color=colour,
                           label=f"{label} (left in the pools)")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel({"accuracy.png": "accuracy", "loss.png": "loss", "traffic.png": "cumulative MB (10^6 bytes)",
                       "key.png": "key bits used per round (10^6)"}[name])
        ax.grid(alpha=0.3)
        if name in ("traffic.png", "key.png"):  # amounts: from zero, so a flat line looks flat
            ax.set_ylim(bottom=0)
        handles, texts = ax.get_legend_handles_labels()
        if right is not None:
            right.set_ylim(bottom=0)
            right.set_ylabel("key bits left in the pools (10^6)")
            more = right.get_legend_handles_labels()
            handles, texts = handles + more[0], texts + more[1]
            if not any(r.get("key_bits_used") for run in runs for r in run.history):
                ax.text(0.5, 0.5, "security = none: no key used", transform=ax.transAxes, ha="center", alpha=0.6)
        ax.legend(handles, texts, fontsize=7, loc="best")
        ax.set_title(_title(runs, what), fontsize=9)
        fig.tight_layout()
        paths.append(save_png(fig, Path(out_dir) / name))
    return paths


# --------------------------------------------------------------------------- TensorBoard


def write_tensorboard(run: RunData) -> Path | None:
    """Every numeric per-round value as a TensorBoard scalar in RUN_DIR/tensorboard, when tensorboard is
    installed (None otherwise); rewritten whole, so a resumed run has one curve per value."""
    if importlib.util.find_spec("tensorboard") is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    log_dir = run.run_dir / TENSORBOARD_DIR
    shutil.rmtree(log_dir, ignore_errors=True)
    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for record in run.history:
            for key, value in {**record, "key_left_bits": key_left_bits(record)}.items():
                if isinstance(value, int | float) and not isinstance(value, bool) and key != "round":
                    writer.add_scalar(key, value, record["round"])
    finally:
        writer.close()
    return log_dir


# --------------------------------------------------------------------------- report.md


def _totals(run: RunData) -> list[tuple[str, str]]:
    h = run.history
    up, down = sum(r["uplink_bytes"] for r in h), sum(r["downlink_bytes"] for r in h)
    last = h[-1] if h else {}
    best = max((r["accuracy"] for r in h), default=None)
    fed = last.get("fed_accuracy")
    return [
        ("rounds", f"{len(h)} of {run.cfg.rounds}"),
        ("final accuracy (central test split)", "-" if not h else f"{last['accuracy']:.4f}"),
        ("best accuracy (central)", "-" if best is None else f"{best:.4f}"),
        ("final federated accuracy", "-" if fed is None else f"{fed:.4f}"),
        ("bytes up (client to server)", f"{up:,} ({up / 1e6:.2f} MB)"),
        ("bytes down (server to client)", f"{down:,} ({down / 1e6:.2f} MB)"),
        ("QKD key bits used", f"{sum(r['key_bits_used'] for r in h):,}"),
        ("key bits left in the pools after the last round", "-" if key_left_bits(last) is None
         else f"{key_left_bits(last):,}"),
        ("uploads dropped", f"{sum(r['dropped'] for r in h)}"),
        ("wall time of the rounds", f"{last.get('elapsed_s', 0.0):.1f} s (round 1 includes starting the client processes)"),
    ]


def report_markdown(run: RunData) -> str:
    """The text of RUN_DIR/report.md."""
    done = run.summary is not None and len(run.history) >= run.cfg.rounds
    status = (f"complete: {len(run.history)} rounds" if done else
              f"**interrupted** after round {len(run.history)} of {run.cfg.rounds}; continue it with "
              f"`qfl run --resume {run.run_dir}`")
    lines = [f"# qfl run `{run.name}`", "", f"{main_config(run.cfg)}. Status: {status}.", "",
             "## Security", "", "What this run hides, and from whom (docs/threat-model.md):", "",
             "| from | hidden |", "|---|---|"]
    lines += [f"| {party} | {text} |" for party, text in protection(run.cfg)]
    lines += ["", "## Totals", "", "| | |", "|---|---:|"]
    lines += [f"| {what} | {value} |" for what, value in _totals(run)]
    lines += ["", "## Per round", "",
              "`acc`/`loss`: central test split; `fed acc`: mean of the clients' validation accuracy; "
              "`up B`/`down B`: bytes put into Flower messages in the round; `key bits`: QKD key given out.", "",
              markdown_table(run.history) if run.history else "(no complete round)", "",
              "## Plots", ""]
    lines += [f"![{name[:-4]}]({name})" for name in PLOTS]
    lines += ["", "## Resolved configuration", "", "```toml", (run.run_dir / CONFIG_NAME).read_text().rstrip(), "```",
              "", "## Files", "",
              f"`{CONFIG_NAME}`, `{METRICS_NAME}` and `{CSV_NAME}` (one record per round), `summary.json` (when complete), "
              "`checkpoint.npz` (resume point), `run.log` (qfl's and Flower's log records), `keys.db` (key pools; "
              "`qfl keys audit` checks it), the plots above"
              + (f", `{TENSORBOARD_DIR}/` (TensorBoard scalars)" if (run.run_dir / TENSORBOARD_DIR).is_dir() else "")
              + "."]
    return "\n".join(lines) + "\n"


def write_run_report(run_dir: Path) -> Path:
    """report.md, metrics.csv, the plots and (if installed) TensorBoard scalars of one run; returns report.md."""
    run = load_run(Path(run_dir))
    write_metrics_csv(run.run_dir, run.history)
    plot_runs([run], run.run_dir)
    write_tensorboard(run)
    path = run.run_dir / REPORT_NAME
    atomic_write_bytes(path, report_markdown(run).encode())
    return path


def compare_runs(run_dirs: Sequence[Path], out_dir: Path) -> Path:
    """Several runs on the same axes (the four plots) and a table of their totals in OUT_DIR/compare.md."""
    runs = [load_run(Path(d)) for d in run_dirs]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_runs(runs, out_dir)
    lines = [f"# {len(runs)} qfl runs compared", "",
             "| run | final acc | best acc | fed acc | bytes up | bytes down | key bits | rounds | wall s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run, label in zip(runs, _labels(runs)):
        t = dict(_totals(run))
        h = run.history
        lines.append(f"| {label} | {t['final accuracy (central test split)']} | {t['best accuracy (central)']} | "
                     f"{t['final federated accuracy']} | {sum(r['uplink_bytes'] for r in h):,} | "
                     f"{sum(r['downlink_bytes'] for r in h):,} | {sum(r['key_bits_used'] for r in h):,} | "
                     f"{t['rounds']} | {(h[-1]['elapsed_s'] if h else 0.0):.1f} |")
    lines += ["", *[f"![{name[:-4]}]({name})" for name in PLOTS], ""]
    path = out_dir / COMPARE_NAME
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path
