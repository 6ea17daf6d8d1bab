"""`qfl experiment streamsplit`: split strategies, negatives and the hybrid loss on the same audio streams.

Eight methods (the five strategies below, and the PPO splitter under three
uplink prices) train the same encoder on the same synthetic device streams with
the same seeds, in a federation of ``clients`` devices over ``rounds`` rounds
(FedAvg of codec-encoded updates, the run's ``codec``):

- **server-centric**: static k = 0. The device sends its input, the log-mel
  frames, through ``edge_codec``, once per window; the server makes the
  positive view from what it received and runs the whole encoder. (The paper
  leaves its baseline's payload undefined; this is ours, the strongest we
  know: every split point k ≥ 1 must send both views.)
- **edge-only**: static k = L and no server loss (λ1 = λ2 = 0): the device
  trains alone and sends only its d-dim embedding.
- **static-mid**: static k = ⌊L/2⌋.
- **heuristic**: k = clip(⌊L·(0.6·(1 − load) + 0.4·b)⌋, 1, L − 1).
- **streamsplit**: the PPO splitter (adaptive), trained in the cost simulator on the paper's reward.
- **streamsplit, uplink price ζ**: the same with the reward's price on uplink bytes
  (``edge_reward_zeta`` = 0.3, 0.5, 1): the frontier between bytes and the rest.

The federation is driven in-process through the same :class:`~qfl.clients.edge.task.EdgeTask`
that the Flower ClientApp runs (``qfl run`` with ``model = "streamsplit"``),
without Ray, so the eight methods × seeds fit the time budget; update bytes are
counted from the codec payloads exactly as the strategy counts them.

Per method: ``linear_probe_accuracy`` (final global encoder, held-out windows;
with its Student-t 95% interval over the seeds, and ``accuracy_delta_pts`` with
``accuracy_delta_ci95``, the paired difference to server-centric seed by seed),
``uplink_bytes_per_hour`` (activation payloads that crossed the split per hour
of audio per device; a split k ≥ 1 sends two views per window, anchor and
positive, server-centric one),
``model_uplink_bytes_per_hour`` (the encoder updates, the same for every method
here because every device uploads the whole encoder, see the task's docstring),
``latency_ms_per_window`` and ``energy_mj_per_window`` (cost model at each
device's injected load and bandwidth), ``split_hist``.

Also: the splitter in the simulator (mean reward, latency, energy and bytes of
random, static, heuristic, PPO and the per-state oracle on held-out traces),
the split chosen over a scripted trace (idle on a fast link, loaded on it,
loaded on a slow link, idle on it), the negatives comparison and the
server-loss ablation (each term on and off). The negatives comparison trains
with InfoNCE only, fp32 at k = 0, the same number of steps in every arm:
virtual negatives at batch 8 and in-batch at batch 8, each step on fresh
consecutive windows of the stream; in-batch at batch 256 on consecutive windows
(what a device with that much memory would see streaming), and in-batch at
batch 256 over the same windows shuffled (offline training on the recorded
stream, the intended upper bound). Batch 256 sees 32× the audio; with ``quick``
its arms run on the first seed only.

Writes ``streamsplit.json`` (one object per method), ``splitter.json``,
``negatives.json``, ``ablation.json``, ``streamsplit.md`` (all tables) and the
plots ``accuracy_vs_bytes.png`` and ``split_over_time.png`` into ``out``.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qfl.clients.edge.costs import scripted_conditions, single_thread
from qfl.clients.edge.encoder import CodecChannel
from qfl.clients.edge.losses import HybridWeights
from qfl.clients.edge.splitter import heuristic_policy, oracle_policy, random_policy, states, static_policy
from qfl.clients.edge.task import (
    EdgeTask,
    build_encoder,
    build_mixture,
    policy_for,
    probe_set,
    simulator_for,
    source_for,
    stream_training,
    to_logmel,
)
from qfl.clients.edge.trainer import SplitTrainer, embed, linear_probe
from qfl.compression import decode_update, encode_update, make_codec, payload_bytes
from qfl.config import RunConfig, resolve_config
from qfl.files import atomic_write_bytes, atomic_write_json
from qfl.seeds import round_seed, task_seed
from qfl.server.optimizers import make_server_optimizer, weighted_mean

from .report import pyplot, save_png
from .stats import mean_ci95

SECONDS_PER_HOUR = 3600.0
UPLINK_PRICES = (0.3, 0.5, 1.0)  # ζ of the extra streamsplit arms: the frontier of the reward's uplink price


def base_config(seed: int, quick: bool, **overrides: Any) -> RunConfig:
    values: dict[str, Any] = {
        "model": "streamsplit", "seed": seed, "security": "none", "codec": "qsgd", "codec.bits": 8,
        "edge_codec": "qsgd", "edge_codec.bits": 4,
        "clients": 3 if quick else 4, "rounds": 3 if quick else 6, "edge_windows": 64 if quick else 96,
        "edge_probe_windows": 1000 if quick else 2000, "edge_ppo_iterations": 100 if quick else 200,
    }
    values.update(overrides)
    return resolve_config(values)


def methods(depth: int) -> list[tuple[str, dict[str, Any]]]:
    return [
        ("server-centric", {"edge_split": "static", "edge_split_k": 0}),
        ("edge-only", {"edge_split": "static", "edge_split_k": depth, "edge_lambda_sw": 0.0, "edge_lambda_lap": 0.0}),
        ("static-mid", {"edge_split": "static", "edge_split_k": depth // 2}),
        ("heuristic", {"edge_split": "heuristic"}),
        ("streamsplit", {"edge_split": "adaptive"}),
        *[(f"streamsplit, uplink price ζ={z:g}", {"edge_split": "adaptive", "edge_reward_zeta": z}) for z in UPLINK_PRICES],
    ]


def run_federation_in_process(cfg: RunConfig) -> dict[str, Any]:
    """FedAvg of ``cfg.clients`` edge devices over ``cfg.rounds`` rounds; the final probe and the round's figures."""
    task = EdgeTask(cfg)
    weights = task.initial_weights()
    shapes = {k: v.shape for k, v in weights.items()}
    optimizer = make_server_optimizer(cfg)
    decoder = make_codec(cfg.codec, cfg.codec_params)
    windows = split_up = split_down = model_up = 0
    latency = energy = 0.0
    hist = np.zeros(cfg.edge_blocks + 1, dtype=np.int64)
    for rnd in range(1, cfg.rounds + 1):
        updates = []
        for pid in range(cfg.clients):
            delta, n, _ = task.local_update(weights, pid, cfg.clients, rnd)
            codec = make_codec(cfg.codec, cfg.codec_params, seed=task_seed(cfg.seed, rnd, pid))
            record = encode_update(delta, codec, round_seed(cfg.seed, rnd))
            model_up += payload_bytes(record)
            updates.append((n, decode_update(record, decoder, shapes)))
            m = task.round_metrics()
            windows += m["edge-windows"]
            split_up += m["edge-split-uplink-bytes"]
            split_down += m["edge-split-downlink-bytes"]
            latency += m["edge-latency-ms"]
            energy += m["edge-energy-mj"]
            hist += np.asarray(m["edge-split-hist"])
        weights = optimizer.step(weights, weighted_mean(updates, shapes))
    _, accuracy = task.central_evaluate(weights)
    hours = windows * cfg.edge_window_s / SECONDS_PER_HOUR
    return {
        "linear_probe_accuracy": accuracy,
        "uplink_bytes_per_hour": split_up / hours,
        "downlink_bytes_per_hour": split_down / hours,
        "model_uplink_bytes_per_hour": model_up / hours,
        "latency_ms_per_window": latency / windows,
        "energy_mj_per_window": energy / windows,
        "split_hist": hist.tolist(),
    }


def compare_methods(seeds: Sequence[int], quick: bool, stage: Callable[[str], None] = lambda _: None) -> list[dict[str, Any]]:
    rows = []
    depth = base_config(seeds[0], quick).edge_blocks
    for name, overrides in methods(depth):
        runs = [run_federation_in_process(base_config(seed, quick, **overrides)) for seed in seeds]
        row: dict[str, Any] = {"method": name, "seeds": list(seeds)}
        for key in ("linear_probe_accuracy", "uplink_bytes_per_hour", "downlink_bytes_per_hour",
                    "model_uplink_bytes_per_hour", "latency_ms_per_window", "energy_mj_per_window"):
            row[key] = float(np.mean([r[key] for r in runs]))
        row["accuracy_by_seed"] = [r["linear_probe_accuracy"] for r in runs]
        row["split_hist"] = np.sum([r["split_hist"] for r in runs], axis=0).tolist()
        rows.append(row)
        stage(f"method {name} done")
    base = rows[0]
    for row in rows:
        row["uplink_reduction_pct"] = 100.0 * (1.0 - row["uplink_bytes_per_hour"] / base["uplink_bytes_per_hour"])
        _, row["linear_probe_accuracy_ci95"] = mean_ci95(row["accuracy_by_seed"])
        paired = [100.0 * (a - b) for a, b in zip(row["accuracy_by_seed"], base["accuracy_by_seed"])]
        row["accuracy_delta_pts"], row["accuracy_delta_ci95"] = mean_ci95(paired)
    return rows


def splitter_comparison(cfg: RunConfig) -> dict[str, Any]:
    """Every splitter in the measured-cost simulator, on held-out client traces, plus the cost table per k."""
    sim = simulator_for(cfg)
    depth = cfg.edge_blocks
    policies = {
        "random": random_policy(depth + 1, cfg.seed), "static k=0": static_policy(0),
        f"static k={depth // 2}": static_policy(depth // 2), f"static k={depth}": static_policy(depth),
        "heuristic": heuristic_policy(depth), "ppo": policy_for(cfg), "oracle (upper bound)": oracle_policy(sim),
    }
    costs = sim.costs
    return {
        "policies": {name: sim.evaluate(p) for name, p in policies.items()},
        "cost_by_k": [
            {"k": k, "bytes": costs.bytes_by_k[k], "fidelity": costs.fidelity_by_k[k],
             "device_ms_idle": costs.device_ms(k, 0.0), "energy_mj": costs.energy_mj(k)}
            for k in range(depth + 1)
        ],
        "part_ms_measured": list(costs.part_ms),
    }


def split_over_time(cfg: RunConfig, steps: int = 100) -> dict[str, list[float]]:
    """The adaptive, heuristic and oracle choices over the scripted load/bandwidth trace (uncertainty at log C / 2)."""
    load, mbps = scripted_conditions(steps)
    log_c = math.log(cfg.edge_components)
    s = states(np.full(steps, 0.5 * log_c), log_c, load, mbps)
    return {
        "load": load.tolist(), "mbps": mbps.tolist(),
        "streamsplit": policy_for(cfg)(s).tolist(), "heuristic": heuristic_policy(cfg.edge_blocks)(s).tolist(),
        "oracle": oracle_policy(simulator_for(cfg))(s).tolist(),
    }


def _train_single_stream(
    cfg: RunConfig, steps: int, batch: int, weights: HybridWeights, shuffled: bool = False,
) -> float:
    """Probe accuracy after ``steps`` steps on device 0's stream (fp32 channel at k = 0), step i on the
    consecutive windows i·batch .. (i+1)·batch − 1: every step sees fresh audio. ``shuffled``: the same
    steps·batch windows in a seeded random order (offline training on a recorded stream: each batch
    is drawn from the whole recording, not from one stretch of it)."""
    waves, _ = source_for(cfg).windows(0, 1, 0, steps * batch)
    logmel = to_logmel(cfg, waves)
    if shuffled:
        logmel = logmel[torch.randperm(len(logmel), generator=torch.Generator().manual_seed(cfg.seed))]
    encoder = build_encoder(cfg)
    settings = replace(stream_training(cfg), batch=batch, loss_weights=weights)
    trainer = SplitTrainer(encoder, build_mixture(cfg, cfg.seed), CodecChannel(make_codec("fp32")), settings, cfg.seed)
    for step in range(steps):
        trainer.step(logmel[step * batch : (step + 1) * batch], 0)
    probe_x, probe_y = probe_set(cfg)
    return linear_probe(embed(encoder, probe_x), probe_y, seed=cfg.seed)[1]


def negatives_comparison(seeds: Sequence[int], quick: bool, steps: int) -> list[dict[str, Any]]:
    """Virtual against in-batch negatives (InfoNCE only), ``steps`` steps each; Δ paired with in-batch at batch 8."""
    arms = [("virtual, batch 8", "virtual", 8, False), ("in-batch, batch 8", "in-batch", 8, False),
            ("in-batch, batch 256, streamed", "in-batch", 256, False),
            ("in-batch, batch 256, shuffled (offline upper bound)", "in-batch", 256, True)]
    rows: list[dict[str, Any]] = []
    for label, negatives, batch, shuffled in arms:
        arm_seeds = list(seeds[:1]) if quick and batch > 8 else list(seeds)
        accs = [
            _train_single_stream(base_config(seed, quick, edge_negatives=negatives), steps, batch,
                                 HybridWeights(1.0, 0.0, 0.0), shuffled)
            for seed in arm_seeds
        ]
        mean, ci = mean_ci95(accs)
        rows.append({"negatives": label, "batch": batch, "shuffled": shuffled, "linear_probe_accuracy": mean,
                     "linear_probe_accuracy_ci95": ci, "accuracy_by_seed": accs, "steps": steps,
                     "windows": steps * batch, "seeds": arm_seeds})
    reference = rows[1]["accuracy_by_seed"]
    for row in rows:
        paired = [100.0 * (a - b) for a, b in zip(row["accuracy_by_seed"], reference)]
        row["delta_vs_in_batch_8_pts"], row["delta_vs_in_batch_8_ci95"] = mean_ci95(paired)
    return rows


def ablation(seeds: Sequence[int], quick: bool, steps: int) -> list[dict[str, Any]]:
    arms = [("hybrid (task + SW + Laplacian)", 0.1, 0.01), ("task + SW", 0.1, 0.0), ("task + Laplacian", 0.0, 0.01),
            ("task only", 0.0, 0.0)]
    rows = []
    for label, sw, lap in arms:
        accs = [
            _train_single_stream(base_config(seed, quick), steps, 8, HybridWeights(1.0, sw, lap))
            for seed in seeds
        ]
        mean, ci = mean_ci95(accs)
        rows.append({"server_loss": label, "lambda_sw": sw, "lambda_lap": lap, "linear_probe_accuracy": mean,
                     "linear_probe_accuracy_ci95": ci, "accuracy_by_seed": accs, "steps": steps, "seeds": list(seeds)})
    return rows


def run_streamsplit_experiment(out: Path, seeds: Sequence[int] = (0,), quick: bool = False) -> list[dict[str, Any]]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(seeds)
    if not seeds:
        raise ValueError("the streamsplit experiment needs at least one seed")
    started = time.perf_counter()
    steps = 96 if quick else 192  # on-device steps of the negatives arms and the ablation

    def stage(name: str) -> None:
        print(f"streamsplit experiment: {name} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)

    with single_thread():
        cfg = base_config(seeds[0], quick)
        splitter = splitter_comparison(cfg)
        timeline = split_over_time(cfg)
        stage("splitter trained and compared")
        rows = compare_methods(seeds, quick, stage)
        negatives = negatives_comparison(seeds, quick, steps)
        stage("negatives compared")
        ablations = ablation(seeds, quick, steps)
        stage("ablation done")
    atomic_write_json(out / "streamsplit.json", rows)
    atomic_write_json(out / "splitter.json", {**splitter, "split_over_time": timeline})
    atomic_write_json(out / "negatives.json", negatives)
    atomic_write_json(out / "ablation.json", ablations)
    wall = time.perf_counter() - started
    text = format_report(rows, splitter, negatives, ablations, cfg, quick, wall)
    atomic_write_bytes(out / "streamsplit.md", (text + "\n").encode())
    _plot(out, rows, timeline, cfg.edge_blocks)
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| method | probe acc [95% CI] | Δ acc vs server-centric, pts [95% CI, paired] | uplink B/h (split) "
        "| uplink vs server-centric | model B/h | ms/window | mJ/window | split hist k=0..L |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['linear_probe_accuracy']:.4f} {_interval(r['linear_probe_accuracy_ci95'], '.3f')} "
            f"| {r['accuracy_delta_pts']:+.2f} {_interval(r['accuracy_delta_ci95'], '+.2f')} "
            f"| {r['uplink_bytes_per_hour']:,.0f} | {-r['uplink_reduction_pct']:+.1f}% "
            f"| {r['model_uplink_bytes_per_hour']:,.0f} | {r['latency_ms_per_window']:.1f} "
            f"| {r['energy_mj_per_window']:.2f} | {' '.join(str(h) for h in r['split_hist'])} |"
        )
    return "\n".join(lines)


def _interval(ci: Sequence[float], spec: str) -> str:
    return f"[{ci[0]:{spec}}, {ci[1]:{spec}}]"


def format_report(
    rows: list[dict[str, Any]], splitter: dict[str, Any], negatives: list[dict[str, Any]],
    ablations: list[dict[str, Any]], cfg: RunConfig, quick: bool, wall_s: float,
) -> str:
    seeds = rows[0]["seeds"]
    parts = [
        f"StreamSplit experiment ({'quick' if quick else 'full'}; seeds {seeds}; {cfg.clients} devices × "
        f"{cfg.rounds} rounds × {cfg.edge_windows} windows of {cfg.edge_window_s:g} s; activations "
        f"{cfg.edge_codec} {cfg.edge_codec_params}; {wall_s:.0f} s wall).",
        "",
        "Server-centric sends the log-mel frames through the same codec, once per window (the server makes the "
        "positive view). A split k ≥ 1 sends both training views (anchor and positive). Uplink B/h counts "
        "these activation payloads per device-hour of audio; model B/h is the encoder update, uploaded "
        "whole by every method in this simulation. Intervals: Student t over the seeds.",
        "",
        format_rows(rows),
        "",
        "Splitter in the measured-cost simulator (held-out client traces):",
        "",
        "| policy | reward | latency ms | energy mJ | bytes/window | split hist |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, r in splitter["policies"].items():
        parts.append(f"| {name} | {r['reward']:.3f} | {r['latency_ms']:.1f} | {r['energy_mj']:.2f} "
                     f"| {r['bytes_per_window']:.0f} | {' '.join(str(h) for h in r['split_hist'])} |")
    parts += ["", "Cost per split point (one window):", "", "| k | bytes | fidelity | device ms (idle) | energy mJ |",
              "|---:|---:|---:|---:|---:|"]
    for c in splitter["cost_by_k"]:
        parts.append(f"| {c['k']} | {c['bytes']} | {c['fidelity']:.4f} | {c['device_ms_idle']:.1f} | {c['energy_mj']:.2f} |")
    parts += ["", f"Negatives (InfoNCE only, {negatives[0]['steps']} steps each on fresh stream windows):", "",
              "| negatives | windows seen | probe acc [95% CI] | Δ vs in-batch b8, pts [95% CI, paired] | by seed |",
              "|---|---:|---:|---:|---|"]
    for r in negatives:
        parts.append(f"| {r['negatives']} | {r['windows']:,} | {r['linear_probe_accuracy']:.4f} "
                     f"{_interval(r['linear_probe_accuracy_ci95'], '.3f')} | {r['delta_vs_in_batch_8_pts']:+.2f} "
                     f"{_interval(r['delta_vs_in_batch_8_ci95'], '+.2f')} | "
                     f"{' '.join(f'{a:.3f}' for a in r['accuracy_by_seed'])} |")
    parts += ["", f"Server-loss ablation (virtual negatives, batch 8, {ablations[0]['steps']} steps):", "",
              "| server loss | probe acc [95% CI] | by seed |", "|---|---:|---|"]
    for r in ablations:
        parts.append(f"| {r['server_loss']} | {r['linear_probe_accuracy']:.4f} "
                     f"{_interval(r['linear_probe_accuracy_ci95'], '.3f')} | "
                     f"{' '.join(f'{a:.3f}' for a in r['accuracy_by_seed'])} |")
    return "\n".join(parts)


def _plot(out: Path, rows: list[dict[str, Any]], timeline: dict[str, list[float]], depth: int) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    for r in rows:
        low, high = r["linear_probe_accuracy_ci95"]
        acc = r["linear_probe_accuracy"]
        ax.errorbar(r["uplink_bytes_per_hour"], acc, yerr=[[acc - low], [high - acc]], fmt="o", capsize=3)
        ax.annotate(r["method"].replace("uplink price ", ""), (r["uplink_bytes_per_hour"], acc), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("split uplink bytes per device-hour")
    ax.set_ylabel("linear-probe accuracy (95% CI over seeds)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, out / "accuracy_vs_bytes.png")

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), dpi=110, sharex=True)
    steps = np.arange(len(timeline["load"]))
    top.step(steps, timeline["streamsplit"], where="post", label="streamsplit (PPO)")
    top.step(steps, timeline["heuristic"], where="post", label="heuristic", alpha=0.7)
    top.step(steps, timeline["oracle"], where="post", label="oracle (knows the cost model)", linestyle=":", color="k")
    top.set_ylabel("split point k")
    top.set_ylim(-0.3, depth + 0.3)
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    bottom.plot(steps, timeline["load"], label="injected CPU load", color="tab:red")
    bottom.set_ylabel("CPU load")
    twin = bottom.twinx()
    twin.plot(steps, timeline["mbps"], label="uplink Mbit/s", color="tab:green")
    twin.set_yscale("log")
    twin.set_ylabel("uplink Mbit/s")
    bottom.set_xlabel("decision step (scripted: idle/fast link, loaded/fast, loaded/slow link, idle/slow)")
    bottom.legend(loc="upper left", fontsize=8)
    twin.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    save_png(fig, out / "split_over_time.png")
