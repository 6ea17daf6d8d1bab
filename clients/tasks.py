"""What a client trains: one interface for classical and quantum tasks.

The server and the ClientApp only see a :class:`ClientTask`: the model's
tensor shapes and initial weights, one client's local update and local
evaluation, and the central evaluation on held-out data. Every task's
parameters are a dict of float32 arrays, so compression and secure aggregation
treat a variational circuit's angles exactly like a CNN's weights.

``task_for(cfg)`` picks the task from ``cfg.model``: ``cnn``/``mlp`` are
classical PyTorch models (:mod:`qfl.clients.classical`); ``vqc``/``hybrid`` are
quantum or hybrid models (:mod:`qfl.clients.quantum`); ``streamsplit`` is the edge
task, split contrastive learning on audio streams (:mod:`qfl.clients.edge.task`).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from qfl.config import RunConfig

CLASSICAL_MODELS = ("cnn", "mlp")


class ClientTask(Protocol):
    """One run's learning task, as every process sees it (deterministic from the config)."""

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor names and shapes of the model."""

    def initial_weights(self) -> dict[str, np.ndarray]:
        """The round-0 global model (seeded by ``cfg.seed``)."""

    def local_update(
        self, weights: dict[str, np.ndarray], partition_id: int, num_partitions: int, server_round: int
    ) -> tuple[dict[str, np.ndarray], int, float]:
        """Train from ``weights`` on the client's shard: (Δ = w_local − w, training examples, loss)."""

    def round_metrics(self) -> dict[str, Any]:
        """Metrics of the last ``local_update`` beyond examples and loss, for the reply's MetricRecord
        (int, float or list[int] values): the edge task's split traffic, choices, latency and energy; {} otherwise."""

    def local_evaluate(
        self, weights: dict[str, np.ndarray], partition_id: int, num_partitions: int
    ) -> tuple[float, float, int]:
        """Evaluate ``weights`` on the client's validation share: (loss, accuracy, examples)."""

    def central_evaluate(self, weights: dict[str, np.ndarray]) -> tuple[float, float]:
        """(loss, accuracy) of ``weights`` on the held-out test split."""

    def train_size(self) -> int:
        """Number of training examples (to check that every client can get a shard)."""

    def check_partition(self, num_partitions: int) -> None:
        """Raise ValueError if ``num_partitions`` shards cannot be cut (e.g. Dirichlet leaves one empty)."""

    def training_sizes(self, num_partitions: int) -> list[int]:
        """Training examples of each of ``num_partitions`` clients: what an honest client reports, so
        the server caps each client's averaging weight at its own partition's size."""


def task_for(cfg: RunConfig) -> ClientTask:
    """The task ``cfg.model`` names."""
    if cfg.model == "streamsplit":
        from .edge.task import EdgeTask

        return EdgeTask(cfg)
    if cfg.model in CLASSICAL_MODELS:
        from .classical import ClassicalTask

        return ClassicalTask(cfg)
    from .quantum import QuantumTask

    return QuantumTask(cfg)
