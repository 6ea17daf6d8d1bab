"""The edge task: StreamSplit split contrastive learning as a :class:`~qfl.clients.tasks.ClientTask`.

``model = "streamsplit"``. Each Flower ClientApp is one edge device. Its
partition id picks its audio stream (the synthetic stream's device, or its
share of a real audio folder) and its own injected CPU-load and bandwidth
trace (:func:`~qfl.clients.edge.costs.client_conditions`). In round r the device
streams windows ``(r−1)·W .. r·W−1`` of its stream (W = ``edge_windows``) and
trains on them with :func:`~qfl.clients.edge.trainer.train_on_stream`, choosing
the split point per batch with the configured splitter; the activations (and
the gradients coming back) cross through ``edge_codec``, and their bytes are
counted from the payloads.

Where the server-side blocks run. In this simulation the blocks after the split
and the head run inside the same ClientApp process, on that device's copy of
the global model; nothing else of the device's data leaves the device than what
crossed the channel. The model update each device sends at the end of the
round covers the whole encoder, so the server-side blocks are averaged across
devices like the device blocks (SplitFed-v1 style: one server-side copy per
device per round, averaged). Its bytes are the run's ``uplink_bytes``; the
activation traffic is reported separately as ``split_uplink_bytes`` /
``split_downlink_bytes``.

The global model also carries the streaming mixture's sufficient statistics
(``gmm.*``; see :mod:`~qfl.clients.edge.mixture`): devices update them on their
streams, the server averages them like any other tensor, and the next round's
download is the mixture sync (send it with ``downlink_codec = "fp16"``).

Central evaluation is the linear probe: a logistic regression on the embeddings
of ``edge_probe_windows`` held-out windows (half fit, half scored); its
accuracy is the run's ``accuracy`` (``linear_probe_accuracy``). Federated
evaluation on a device: nearest-class-mean accuracy on W windows of its stream
that come after the last training round.

The cost model (per-part compute measured in this process, bytes and fidelity
per k with ``edge_codec``) and the PPO splitter trained on it are built once
per process and cached; ``qfl run`` logs nothing of them, the experiment
(:mod:`qfl.simulations.streamsplit`) reports them.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qfl.compression import make_codec
from qfl.config import RunConfig
from qfl.errors import DatasetNotFound
from qfl.seeds import task_seed

from .costs import CostModel, build_cost_model, client_conditions
from .encoder import CodecChannel, SplitEncoder
from .frontend import SAMPLE_RATE, LogMel
from .losses import HybridWeights
from .mixture import STATE_NAMES, StreamingGMM
from .splitter import (
    Policy,
    RewardWeights,
    SplitSimulator,
    heuristic_policy,
    random_policy,
    static_policy,
    train_ppo,
)
from .stream import AudioSource, FileStream, SyntheticStream, audio_folder_items, esc50_items
from .trainer import StreamStats, StreamTraining, embed, linear_probe, nearest_centroid_accuracy, train_on_stream

CHANNELS = (16, 16, 32, 32, 64, 64, 128, 128)
STRIDES = (1, 2, 1, 2, 1, 2, 1, 2)
COST_PROFILE_WINDOWS = 16


def build_encoder(cfg: RunConfig) -> SplitEncoder:
    return SplitEncoder(CHANNELS[: cfg.edge_blocks], STRIDES[: cfg.edge_blocks], cfg.edge_dim, seed=cfg.seed)


def build_mixture(cfg: RunConfig, seed: int = 0) -> StreamingGMM:
    return StreamingGMM(cfg.edge_components, cfg.edge_dim, rate=cfg.edge_gmm_rate, seed=seed)


def source_for(cfg: RunConfig) -> AudioSource:
    return _source(cfg.edge_audio, cfg.edge_classes, cfg.edge_window_s, cfg.seed)


@lru_cache(maxsize=8)
def _source(audio: str, classes: int, window_s: float, seed: int) -> AudioSource:
    if not audio:
        return SyntheticStream(seed=seed, num_classes=classes, window_s=window_s)
    path = Path(audio)
    if path.suffix.lower() == ".csv":
        items, names = esc50_items(path)
    elif path.is_dir():
        items, names = audio_folder_items(path)
    else:
        raise DatasetNotFound(f"edge_audio={audio!r} is neither a folder of class subfolders nor an ESC-50 style .csv")
    return FileStream(items, len(names), window_s=window_s, seed=seed)


@lru_cache(maxsize=4)
def _front_end(mels: int) -> LogMel:
    return LogMel(n_mels=mels)


def to_logmel(cfg: RunConfig, waves: np.ndarray) -> torch.Tensor:
    """Windows ``[N, T]`` → log-mel ``[N, 1, mels, frames]``."""
    with torch.no_grad():
        return _front_end(cfg.edge_mels)(torch.from_numpy(np.ascontiguousarray(waves)))[:, None]


def probe_set(cfg: RunConfig) -> tuple[torch.Tensor, np.ndarray]:
    return _probe(cfg.edge_audio, cfg.edge_classes, cfg.edge_window_s, cfg.seed, cfg.edge_mels, cfg.edge_probe_windows)


@lru_cache(maxsize=4)
def _probe(audio: str, classes: int, window_s: float, seed: int, mels: int, count: int) -> tuple[torch.Tensor, np.ndarray]:
    waves, labels = _source(audio, classes, window_s, seed).probe_set(count)
    with torch.no_grad():
        return _front_end(mels)(torch.from_numpy(waves))[:, None], labels


def cost_model_for(cfg: RunConfig) -> CostModel:
    """Measured in this process once per (encoder, codec, constants)."""
    return _cost_model(*_cost_key(cfg))


def _cost_key(cfg: RunConfig) -> tuple[Any, ...]:
    return (
        cfg.edge_audio, cfg.edge_classes, cfg.edge_window_s, cfg.seed, cfg.edge_mels, cfg.edge_blocks, cfg.edge_dim,
        cfg.edge_codec, tuple(sorted(cfg.edge_codec_params.items())), cfg.edge_device_slowdown,
        cfg.edge_server_speedup, cfg.edge_rtt_ms, cfg.edge_joule_per_flop, cfg.edge_joule_per_byte,
    )


@lru_cache(maxsize=4)
def _cost_model(audio, classes, window_s, seed, mels, blocks, dim, codec, params, slowdown, speedup, rtt, jflop, jbyte) -> CostModel:
    cfg = RunConfig(seed=seed, edge_blocks=blocks, edge_dim=dim)
    logmel, _ = _probe(audio, classes, window_s, seed, mels, COST_PROFILE_WINDOWS)
    channel = CodecChannel(make_codec(codec, dict(params), seed=seed))
    return build_cost_model(
        build_encoder(cfg), channel, logmel, device_slowdown=slowdown, server_speedup=speedup,
        rtt_ms=rtt, joule_per_flop=jflop, joule_per_byte=jbyte,
    )


def reward_weights(cfg: RunConfig) -> RewardWeights:
    return RewardWeights(cfg.edge_reward_alpha, cfg.edge_reward_beta, cfg.edge_reward_eta, cfg.edge_t_max_ms,
                         cfg.edge_e_budget_mj, cfg.edge_reward_zeta, cfg.edge_b_budget_bytes)


def simulator_for(cfg: RunConfig) -> SplitSimulator:
    return SplitSimulator(cost_model_for(cfg), reward_weights(cfg), math.log(cfg.edge_components), seed=cfg.seed)


def policy_for(cfg: RunConfig) -> Policy:
    """The configured splitter (PPO is trained once per process and cost model)."""
    depth = cfg.edge_blocks
    if cfg.edge_split == "static":
        return static_policy(cfg.edge_split_k)
    if cfg.edge_split == "heuristic":
        return heuristic_policy(depth)
    if cfg.edge_split == "random":
        return random_policy(depth + 1, cfg.seed)
    return _ppo(_cost_key(cfg), reward_weights(cfg), cfg.edge_components, cfg.edge_ppo_iterations, cfg.seed).greedy


@lru_cache(maxsize=4)
def _ppo(cost_key: tuple[Any, ...], weights: RewardWeights, components: int, iterations: int, seed: int):
    sim = SplitSimulator(_cost_model(*cost_key), weights, math.log(components), seed=seed)
    return train_ppo(sim, iterations=iterations, seed=seed)


def stream_training(cfg: RunConfig) -> StreamTraining:
    return StreamTraining(
        batch=cfg.edge_batch, negatives=cfg.edge_negatives.value, virtual_negatives=cfg.edge_virtual_negatives,
        tau=cfg.edge_tau, loss_weights=HybridWeights(1.0, cfg.edge_lambda_sw, cfg.edge_lambda_lap), lr=cfg.edge_lr,
    )


class EdgeTask:
    """:class:`qfl.clients.tasks.ClientTask` for ``model = "streamsplit"`` (see the module docstring)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.source = source_for(cfg)
        self.last_stats: StreamStats | None = None
        self.last_mixture: dict[str, np.ndarray] = {}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self.initial_weights().items()}

    def initial_weights(self) -> dict[str, np.ndarray]:
        encoder = build_encoder(self.cfg)
        weights = {k: v.detach().numpy().astype(np.float32, copy=True) for k, v in encoder.state_dict().items()}
        weights.update(build_mixture(self.cfg, seed=self.cfg.seed).state())
        return weights

    def _load(self, weights: dict[str, np.ndarray], seed: int) -> tuple[SplitEncoder, StreamingGMM]:
        encoder = build_encoder(self.cfg)
        encoder.load_state_dict({k: torch.from_numpy(np.array(weights[k], dtype=np.float32)) for k in encoder.state_dict()})
        gmm = build_mixture(self.cfg, seed=seed)
        gmm.load_state({k: weights[k] for k in STATE_NAMES})
        return encoder, gmm

    @property
    def window(self) -> int:
        """Samples per window (``edge_window_s`` at 16 kHz)."""
        return int(round(self.cfg.edge_window_s * SAMPLE_RATE))

    def local_update(
        self, weights: dict[str, np.ndarray], partition_id: int, num_partitions: int, server_round: int
    ) -> tuple[dict[str, np.ndarray], int, float]:
        """Round r trains on windows ``(r−1)·W .. r·W−1`` of the configured source (a simulation's stream)."""
        start = (server_round - 1) * self.cfg.edge_windows
        waves, _ = self.source.windows(partition_id, num_partitions, start, self.cfg.edge_windows)
        return self.train_on(weights, waves, partition_id, server_round, start)

    def train_on(
        self, weights: dict[str, np.ndarray], waves: np.ndarray, partition_id: int, server_round: int, first_window: int
    ) -> tuple[dict[str, np.ndarray], int, float]:
        """Train from ``weights`` on ``waves`` ``[windows, window]`` (stream windows ``first_window``.. in temporal
        order; an edge daemon's leased windows, or :meth:`local_update`'s): (Δ, windows trained on, loss).
        The device's mixture afterwards is :attr:`last_mixture`."""
        cfg = self.cfg
        seed = task_seed(cfg.seed, server_round, partition_id)
        torch.manual_seed(seed)
        encoder, gmm = self._load(weights, seed)
        start = first_window
        steps = len(waves) // cfg.edge_batch
        load, mbps = client_conditions(cfg.seed, partition_id, steps, start=start // cfg.edge_batch)
        channel = CodecChannel(make_codec(cfg.edge_codec, cfg.edge_codec_params, seed=seed))
        stats = train_on_stream(
            encoder, gmm, to_logmel(cfg, waves), channel, policy_for(cfg), cost_model_for(cfg), load, mbps,
            stream_training(cfg), seed, first_window=start,
        )
        self.last_stats = stats
        self.last_mixture = gmm.state()
        local = {k: v.detach().numpy() for k, v in encoder.state_dict().items()} | self.last_mixture
        delta = {k: (local[k] - weights[k]).astype(np.float32) for k in weights}
        return delta, stats.windows, stats.loss

    def round_metrics(self) -> dict[str, Any]:
        """The last local_update's split traffic, choices, latency and energy (sums over its windows)."""
        s = self.last_stats
        if s is None:
            return {}
        return {
            "edge-windows": s.windows,
            "edge-split-uplink-bytes": s.traffic.up,
            "edge-split-downlink-bytes": s.traffic.down,
            "edge-split-hist": s.split_hist(self.cfg.edge_blocks),
            "edge-latency-ms": s.latency_ms,
            "edge-energy-mj": s.energy_mj,
        }

    def local_evaluate(
        self, weights: dict[str, np.ndarray], partition_id: int, num_partitions: int
    ) -> tuple[float, float, int]:
        """Nearest-class-mean accuracy on the device's windows after the last training round (never trained on);
        the loss reported is the error rate, 1 − accuracy."""
        encoder, _ = self._load(weights, 0)
        start = self.cfg.rounds * self.cfg.edge_windows
        waves, labels = self.source.windows(partition_id, num_partitions, start, self.cfg.edge_windows)
        features = embed(encoder, to_logmel(self.cfg, waves))
        accuracy = nearest_centroid_accuracy(features, labels)
        return 1.0 - accuracy, accuracy, len(labels) - len(labels) // 2

    def central_evaluate(self, weights: dict[str, np.ndarray]) -> tuple[float, float]:
        encoder, _ = self._load(weights, 0)
        logmel, labels = probe_set(self.cfg)
        return linear_probe(embed(encoder, logmel), labels, seed=self.cfg.seed)

    def train_size(self) -> int:
        if isinstance(self.source, FileStream):
            return self.source.train_files
        return self.cfg.edge_windows * self.cfg.clients

    def check_partition(self, num_partitions: int) -> None:
        if isinstance(self.source, FileStream) and self.source.train_files < num_partitions:
            raise ValueError(
                f"{self.source.train_files} audio files for training cannot feed {num_partitions} devices; "
                "use fewer clients or more files"
            )

    def training_sizes(self, num_partitions: int) -> list[int]:
        return [self.cfg.edge_windows] * num_partitions
