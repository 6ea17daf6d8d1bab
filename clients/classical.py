"""The classical (PyTorch) client task: its data shard, local training, evaluation.

Client ``p`` of ``n`` holds shard ``p`` of the training split, cut by IID or
Dirichlet(α) over labels from the run's seed, so every process that computes a
shard gets the same one. A seeded ``local_val_fraction`` of the shard is kept
out of training for federated evaluation, which therefore measures the global
model on each client's own (possibly skewed) distribution; the central test
split is never seen by clients.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from qfl.config import RunConfig
from qfl.seeds import task_seed

from .datasets import Dataset, load_dataset
from .models import build_model, get_weights, set_weights
from .partition import partition_dirichlet, partition_iid
from .training import evaluate, train


def dataset_for(cfg: RunConfig) -> Dataset:
    return load_dataset(cfg.dataset, cfg.data_dir, cfg.test_fraction, cfg.seed)


def partitions(cfg: RunConfig, labels: np.ndarray, num_partitions: int, salt: int) -> list[np.ndarray]:
    """Every client's indices into ``labels`` (IID, or Dirichlet(alpha) label skew), seeded by the run."""
    seed = cfg.seed * 7919 + salt
    if cfg.alpha is None:
        return list(partition_iid(len(labels), num_partitions, seed))
    return list(partition_dirichlet(labels, num_partitions, cfg.alpha, seed))


def shard(cfg: RunConfig, labels: np.ndarray, partition_id: int, num_partitions: int, salt: int) -> np.ndarray:
    """Indices of client ``partition_id``'s share of ``labels``."""
    return partitions(cfg, labels, num_partitions, salt)[partition_id]


def validation_count(shard_size: int, local_val_fraction: float) -> int:
    """Examples of a shard kept for federated evaluation (none from a one-example shard)."""
    return int(round(shard_size * local_val_fraction)) if shard_size > 1 else 0


def split_shard(
    cfg: RunConfig, labels: np.ndarray, partition_id: int, num_partitions: int
) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, local validation indices) of one client's shard of ``labels``."""
    idx = np.random.default_rng([cfg.seed, partition_id, 1]).permutation(
        shard(cfg, labels, partition_id, num_partitions, salt=0)
    )
    n_val = validation_count(len(idx), cfg.local_val_fraction)
    return np.sort(idx[n_val:]), np.sort(idx[:n_val])


def training_sizes(cfg: RunConfig, labels: np.ndarray, num_partitions: int) -> list[int]:
    """Training examples of every client, as :func:`split_shard` counts them (the server's weight caps)."""
    return [len(p) - validation_count(len(p), cfg.local_val_fraction)
            for p in partitions(cfg, labels, num_partitions, salt=0)]


def model_shapes(cfg: RunConfig) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of the run's model."""
    data = dataset_for(cfg)
    model = build_model(cfg.model, data.input_shape, data.num_classes, seed=cfg.seed)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def local_split(cfg: RunConfig, partition_id: int, num_partitions: int) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, local validation indices) of one client's shard."""
    return split_shard(cfg, dataset_for(cfg).y_train, partition_id, num_partitions)


def local_update(
    cfg: RunConfig, global_weights: dict[str, np.ndarray], partition_id: int, num_partitions: int, server_round: int
) -> tuple[dict[str, np.ndarray], int, float]:
    """Train from ``global_weights`` on this client's shard.

    Returns (Δ = w_local − w_global per tensor, number of training examples, last-epoch loss).
    """
    data = dataset_for(cfg)
    idx, _ = local_split(cfg, partition_id, num_partitions)
    seed = task_seed(cfg.seed, server_round, partition_id)
    model = build_model(cfg.model, data.input_shape, data.num_classes, seed=cfg.seed)
    set_weights(model, global_weights)
    torch.manual_seed(seed)
    loss = train(model, data.x_train[idx], data.y_train[idx], cfg.local_epochs, cfg.batch_size, cfg.lr, cfg.momentum, seed)
    local = get_weights(model)
    delta = {k: local[k] - global_weights[k] for k in global_weights}
    return delta, len(idx), loss


def local_evaluate(
    cfg: RunConfig, global_weights: dict[str, np.ndarray], partition_id: int, num_partitions: int
) -> tuple[float, float, int]:
    """Evaluate the global model on this client's validation share: (loss, accuracy, examples)."""
    data = dataset_for(cfg)
    _, idx = local_split(cfg, partition_id, num_partitions)
    if len(idx) == 0:
        return 0.0, 0.0, 0
    model = build_model(cfg.model, data.input_shape, data.num_classes, seed=cfg.seed)
    set_weights(model, global_weights)
    loss, acc = evaluate(model, data.x_train[idx], data.y_train[idx])
    return loss, acc, len(idx)


class ClassicalTask:
    """:class:`qfl.clients.tasks.ClientTask` for the PyTorch models (cnn, mlp)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.data = dataset_for(cfg)
        self._model: torch.nn.Module | None = None

    def _central_model(self) -> torch.nn.Module:
        if self._model is None:
            self._model = build_model(self.cfg.model, self.data.input_shape, self.data.num_classes, seed=self.cfg.seed)
        return self._model

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return model_shapes(self.cfg)

    def initial_weights(self) -> dict[str, np.ndarray]:
        model = build_model(self.cfg.model, self.data.input_shape, self.data.num_classes, seed=self.cfg.seed)
        return get_weights(model)

    def local_update(self, weights, partition_id, num_partitions, server_round):
        return local_update(self.cfg, weights, partition_id, num_partitions, server_round)

    def round_metrics(self) -> dict[str, Any]:
        return {}

    def local_evaluate(self, weights, partition_id, num_partitions):
        return local_evaluate(self.cfg, weights, partition_id, num_partitions)

    def central_evaluate(self, weights: dict[str, np.ndarray]) -> tuple[float, float]:
        model = self._central_model()
        set_weights(model, weights)
        return evaluate(model, self.data.x_test, self.data.y_test)

    def train_size(self) -> int:
        return len(self.data.y_train)

    def check_partition(self, num_partitions: int) -> None:
        shard(self.cfg, self.data.y_train, 0, num_partitions, salt=0)

    def training_sizes(self, num_partitions: int) -> list[int]:
        return training_sizes(self.cfg, self.data.y_train, num_partitions)
