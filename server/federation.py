"""The round loop: train, aggregate, evaluate, checkpoint, record.

``run_federation`` drives any Flower ``Grid`` (simulation or deployment
engine). After every round it writes, atomically, the checkpoint (weights,
optimizer state, round, history) and then ``metrics.json``; a resumed run
reloads the checkpoint and continues at the next round, so its weights equal
an uninterrupted run's.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from flwr.app import ConfigRecord
from flwr.serverapp import Grid

from qfl.clients.tasks import ClientTask, task_for
from qfl.compression import encode_update, make_codec, payload_bytes
from qfl.compression.downlink import DownlinkReplica, make_downlink_codec
from qfl.config import RunConfig, resolve_config
from qfl.errors import ResumeError, ResumeReason
from qfl.files import atomic_write_bytes, atomic_write_json
from qfl.records import as_int
from qfl.security.secagg import SECURITY_LEVELS
from qfl.seeds import round_seed
from qfl.server.key_budget import KeyBudget

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .optimizers import make_server_optimizer
from .secure import KeyedFedAvg, SecureFedAvg, secure_strategy
from .strategy import QflFedAvg, record_to_weights, weights_to_record

CONFIG_NAME = "config.toml"
METRICS_NAME = "metrics.json"
SUMMARY_NAME = "summary.json"
log = logging.getLogger("qfl.server")


class Reporter(Protocol):
    """Receives progress; the console reporter and plots live in qfl.simulations."""

    def start(self, cfg: RunConfig, run_dir: Path, first_round: int) -> None: ...
    def round(self, record: dict[str, Any]) -> None: ...
    def finish(self, summary: dict[str, Any], history: list[dict[str, Any]]) -> None: ...


@dataclass
class CentralEvaluator:
    """Evaluates global weights on the task's held-out test split."""

    cfg: RunConfig

    def __post_init__(self) -> None:
        self.task: ClientTask = task_for(self.cfg)

    def initial_weights(self) -> dict[str, np.ndarray]:
        return self.task.initial_weights()

    def __call__(self, weights: dict[str, np.ndarray]) -> tuple[float, float]:
        return self.task.central_evaluate(weights)


def load_run_config(run_dir: Path) -> RunConfig:
    """The resolved configuration a run directory was started with."""
    from qfl.config import load_config_file

    path = Path(run_dir) / CONFIG_NAME
    if not path.exists():
        raise ResumeError(f"{run_dir} has no {CONFIG_NAME}; pass the directory a `qfl run` wrote", reason=ResumeReason.NO_CONFIG)
    return resolve_config(load_config_file(path))


def run_federation(
    grid: Grid, cfg: RunConfig, run_dir: Path, reporter: Reporter | None = None, resume: bool = False,
    stop: threading.Event | None = None,
    client_state_dir: Path | None = None,
) -> dict[str, Any] | None:
    """Run (or continue) ``cfg.rounds`` rounds on ``grid``; return the summary.

    ``stop``: checked before each round; once set, the loop returns None after the round in flight,
    with every complete round in the checkpoint (``qfl run --resume`` continues from there).
    ``client_state_dir``: where the clients keep codec state when ``cfg.client_state_dir`` is empty
    (a folder they can reach: simulations only; None = their memory, see qfl.clients.state)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    evaluator = CentralEvaluator(cfg)
    weights = evaluator.initial_weights()
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    num_params = int(sum(v.size for v in weights.values()))
    optimizer = make_server_optimizer(cfg)
    history: list[dict[str, Any]] = []
    first_round = 1
    downlink = None
    if cfg.downlink_mode == "delta":  # the clients' replica starts at the initial model they build themselves
        def downlink_codec_for(version: int):
            return make_downlink_codec(
                cfg.downlink_codec, cfg.downlink_codec_params, "delta", seed=round_seed(cfg.seed, version)
            )

        downlink = DownlinkReplica(downlink_codec_for, weights)
    checkpoint = load_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        if {k: tuple(v.shape) for k, v in checkpoint.weights.items()} != shapes:
            raise ResumeError(f"checkpoint in {run_dir} does not match the model {cfg.model!r}", reason=ResumeReason.MODEL_MISMATCH)
        weights, history, first_round = checkpoint.weights, checkpoint.history, checkpoint.round + 1
        optimizer.load_state_arrays(checkpoint.optimizer_state)
        if downlink is not None:
            downlink.load_state_arrays(checkpoint.downlink_state)
    else:
        atomic_write_bytes(run_dir / CONFIG_NAME, cfg.to_toml().encode())
    initial_loss, initial_acc = evaluator(evaluator.initial_weights())

    common: dict[str, Any] = dict(
        codec=make_codec(cfg.codec, cfg.codec_params),
        downlink_codec=make_downlink_codec(cfg.downlink_codec, cfg.downlink_codec_params, cfg.downlink_mode),
        downlink=downlink,
        shapes=shapes,
        optimizer=optimizer,
        min_nodes=cfg.clients,
        fraction_train=cfg.fraction,
        seed=cfg.seed,
        fed_eval=cfg.fed_eval,
        wait_timeout=cfg.timeout_s,
        num_partitions=cfg.clients,  # nodes are started with num-partitions = clients
        example_caps=dict(enumerate(evaluator.task.training_sizes(cfg.clients))),
    )
    flat_config = cfg.to_flat()
    if not cfg.client_state_dir and client_state_dir is not None:
        flat_config["client_state_dir"] = str(Path(client_state_dir).resolve())
    budget = None
    if cfg.security == "none":
        strategy = QflFedAvg(**common)
    else:
        last = history[-1] if history else {}
        budget = KeyBudget(cfg, run_dir)  # its QKD clock continues from the key store, not from history
        if cfg.key_source == "store":
            flat_config["key_store"] = str(budget.store_path.resolve())  # where the clients find the pools
        strategy = secure_strategy(
            **common, cfg=cfg, budget=budget, round_seed=lambda r: round_seed(cfg.seed, r), clips=last.get("secure_clip")
        )
    if reporter:
        reporter.start(cfg, run_dir, first_round)
    elapsed = history[-1]["elapsed_s"] if history else 0.0

    for rnd in range(first_round, cfg.rounds + 1):
        if stop is not None and stop.is_set():
            log.info("stopped before round %s of %s; the checkpoint holds round %s", rnd, cfg.rounds, rnd - 1)
            break
        t0 = time.perf_counter()
        messages = strategy.configure_train(rnd, weights_to_record(weights), ConfigRecord(dict(flat_config)), grid)
        replies = list(grid.send_and_receive(messages, timeout=cfg.timeout_s))
        edge = _edge_record(cfg, replies)
        new_record, train = strategy.aggregate_train(rnd, replies)
        assert train is not None  # both strategies return the round's metrics, even with no usable update
        if new_record is not None:
            weights = record_to_weights(new_record)
        fed: dict[str, Any] = {}
        if cfg.fed_eval:
            messages = strategy.configure_evaluate(rnd, weights_to_record(weights), ConfigRecord(dict(flat_config)), grid)
            fed = dict(strategy.aggregate_evaluate(rnd, grid.send_and_receive(messages, timeout=cfg.timeout_s)) or {})
        loss, accuracy = evaluator(weights)
        wall = time.perf_counter() - t0
        elapsed += wall
        uploads = as_int(train["uploads"])
        record = {
            "round": rnd,
            "accuracy": accuracy,
            "loss": loss,
            "fed_accuracy": fed.get("fed-accuracy"),
            "fed_loss": fed.get("fed-loss"),
            "train_loss": train.get("train-loss"),
            "uplink_bytes": as_int(train["uplink-bytes"]),
            "downlink_bytes": as_int(train["downlink-bytes"]),
            "eval_downlink_bytes": strategy.eval_downlink_bytes,
            "bits_per_param_up": 8.0 * as_int(train["uplink-bytes"]) / (num_params * uploads) if uploads else None,
            "key_bits_used": as_int(train["key-bits-used"]),
            "uploads": uploads,
            "clients": as_int(train["clients"]),
            "sampled": as_int(train["sampled"]),
            "dropped": as_int(train["dropped"]),
            "drop_reasons": list(strategy.drop_reasons),
            **(_key_record(strategy, budget) if isinstance(strategy, KeyedFedAvg) and budget is not None else {}),
            **({"linear_probe_accuracy": accuracy, **edge} if edge else {}),
            "wall_s": wall,
            "elapsed_s": elapsed,
        }
        history.append(record)
        log.info("round %s: accuracy %.4f, loss %.4f, fed accuracy %s, uplink %s B, downlink %s B, key bits %s, "
                 "dropped %s, %.2f s", rnd, accuracy, loss, record["fed_accuracy"], record["uplink_bytes"],
                 record["downlink_bytes"], record["key_bits_used"], record["dropped"], wall)
        downlink_state = downlink.state_arrays() if downlink is not None else {}
        save_checkpoint(run_dir, Checkpoint(rnd, weights, optimizer.state_arrays(), history, downlink_state))
        atomic_write_json(run_dir / METRICS_NAME, history)
        if reporter:
            reporter.round(record)

    if budget is not None:
        budget.close()  # the last round's consumed key leaves the store's WAL
    if len(history) < cfg.rounds:
        return None
    fp32_message_bytes = payload_bytes(encode_update(weights, make_codec("fp32")))
    summary = summarize(cfg, history, num_params, initial_acc, initial_loss, fp32_message_bytes)
    atomic_write_json(run_dir / SUMMARY_NAME, summary)
    if reporter:
        reporter.finish(summary, history)
    return summary


def _edge_record(cfg: RunConfig, replies: list[Any]) -> dict[str, Any]:
    """The edge task's split figures of a round (empty for other tasks)."""
    if cfg.model != "streamsplit":
        return {}
    from .edge_metrics import split_round_metrics

    return split_round_metrics(replies, cfg.edge_blocks)


def _key_record(strategy: KeyedFedAvg, budget: KeyBudget) -> dict[str, Any]:
    """The key layer's figures for one round's metrics.json record."""
    return {
        "key_bits_by_link": dict(sorted(strategy.key_links.items())),
        "key_pools_left": budget.pools(strategy.key_links),
        "key_wait_s": strategy.key_wait_s,
        "qkd_clock_s": budget.clock_s,
        **(_masked_record(strategy) if isinstance(strategy, SecureFedAvg) else {}),
    }


def _masked_record(strategy: SecureFedAvg) -> dict[str, Any]:
    return {
        "secure_clip": strategy.checkpoint_state(),
        # mean peers a client masked with (security.graph): n − 1 in the full graph, k in a sparse one
        **({"mask_degree": strategy.masked.plan.mask_degree()} if strategy.masked is not None else {}),
        # key bits by use (pair masks / share pads / MAC keys), end to end; see server.secure.KeySplit
        **strategy.key_split.record(),
    }


def summarize(
    cfg: RunConfig, history: list[dict[str, Any]], num_params: int, initial_acc: float, initial_loss: float,
    fp32_message_bytes: int,
) -> dict[str, Any]:
    last = history[-1] if history else {}
    summary = {
        "rounds": len(history),
        "clients": cfg.clients,
        "model": cfg.model,
        # the edge task streams audio: its own source, not the image/quantum ``dataset`` key
        "dataset": (cfg.edge_audio or "synthetic-audio") if cfg.model == "streamsplit" else cfg.dataset,
        "codec": cfg.codec,
        "security": cfg.security,
        "security_level": SECURITY_LEVELS[cfg.security],
        "server_opt": cfg.server_opt,
        "num_params": num_params,
        "initial_accuracy": initial_acc,
        "initial_loss": initial_loss,
        "final_accuracy": last.get("accuracy"),
        "final_loss": last.get("loss"),
        "best_accuracy": max((r["accuracy"] for r in history), default=None),
        "total_uplink_bytes": sum(r["uplink_bytes"] for r in history),
        "total_downlink_bytes": sum(r["downlink_bytes"] for r in history),
        "total_key_bits_used": sum(r["key_bits_used"] for r in history),
        "total_dropped": sum(r["dropped"] for r in history),
        "qkd_clock_s": last.get("qkd_clock_s"),
        "wall_s": last.get("elapsed_s", 0.0),
        **(_edge_summary(history) if cfg.model == "streamsplit" else {}),
    }
    return {**summary, **fp32_comparison(summary, history, fp32_message_bytes)}


def fp32_comparison(summary: dict[str, Any], history: list[dict[str, Any]], fp32_message_bytes: int) -> dict[str, Any]:
    """What the same rounds would have sent in fp32 both ways (one fp32 model per upload and per sampled
    client; rounds of older metrics without ``uploads`` count the accepted clients), and the reductions: fp32 bytes over the bytes sent (1.0 for an fp32 run; None where nothing was sent)."""
    up = fp32_message_bytes * sum(r.get("uploads", r.get("clients", 0)) for r in history)
    down = fp32_message_bytes * sum(r.get("sampled", 0) for r in history)
    sent_up, sent_down = summary["total_uplink_bytes"], summary["total_downlink_bytes"]
    return {
        "fp32_uplink_bytes": up,
        "fp32_downlink_bytes": down,
        "uplink_reduction_vs_fp32": up / sent_up if sent_up else None,
        "downlink_reduction_vs_fp32": down / sent_down if sent_down else None,
        "total_reduction_vs_fp32": (up + down) / (sent_up + sent_down) if sent_up + sent_down else None,
    }


def _edge_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals of the edge task's split figures over the run."""
    windows = sum(r.get("edge_windows", 0) for r in history)
    depth = max((len(r.get("split_hist", [])) for r in history), default=0)
    return {
        "final_linear_probe_accuracy": history[-1].get("linear_probe_accuracy") if history else None,
        "total_split_uplink_bytes": sum(r.get("split_uplink_bytes", 0) for r in history),
        "total_split_downlink_bytes": sum(r.get("split_downlink_bytes", 0) for r in history),
        "split_hist": [sum(r["split_hist"][k] for r in history if "split_hist" in r) for k in range(depth)],
        "edge_windows": windows,
        "latency_ms_per_window": sum((r.get("latency_ms_per_window") or 0) * r.get("edge_windows", 0) for r in history)
        / windows if windows else None,
        "energy_mj_per_window": sum((r.get("energy_mj_per_window") or 0) * r.get("edge_windows", 0) for r in history)
        / windows if windows else None,
    }
