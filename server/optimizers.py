"""Server optimizers: how the mean client update Δ̄ moves the global model.

All three take the example-weighted mean update Δ̄ = Σ n_i Δ_i / Σ n_i:

- FedAvg (McMahan et al. 2017):   w ← w + η Δ̄              (η = 1 is plain averaging)
- FedAvgM (Hsu et al. 2019):      v ← β v + Δ̄;  w ← w + η v
- FedAdam (Reddi et al. 2021):    m ← β₁ m + (1−β₁) Δ̄;  v ← β₂ v + (1−β₂) Δ̄²;
                                   w ← w + η m / (√v + τ)

State (v, m) is explicit and checkpointed with the weights, so a resumed run
continues exactly where it stopped.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence

import numpy as np

from qfl.config import RunConfig

Weights = dict[str, np.ndarray]


def weighted_mean(updates: Sequence[tuple[int, Weights]], names: Iterable[str]) -> Weights:
    """The example-weighted mean update Δ̄ = Σ n_i Δ_i / Σ n_i over ``(n_i, Δ_i)`` pairs, in float64.

    ``names`` are the tensors to average (every Δ_i holds them). Raises
    ValueError if the weights do not sum to a positive number.
    """
    total = sum(n for n, _ in updates)
    if total <= 0:
        raise ValueError(f"the mean update needs a positive total weight, got {total}")
    mean: Weights = {}
    for name in names:
        acc = np.zeros(np.shape(updates[0][1][name]), np.float64)
        for n, delta in updates:
            acc += n * delta[name].astype(np.float64)
        mean[name] = acc / total
    return mean


class ServerOptimizer(ABC):
    """Applies a mean update to the global weights and owns its own state."""

    def __init__(self, lr: float) -> None:
        self.lr = lr
        self.state: dict[str, Weights] = {}

    @abstractmethod
    def step(self, weights: Weights, mean_delta: Weights) -> Weights:
        """Return the new global weights (float32); never modifies the inputs."""

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The optimizer state as flat ``slot/tensor`` arrays (for checkpoints)."""
        return {f"{slot}/{name}": arr for slot, tensors in self.state.items() for name, arr in tensors.items()}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.state = {}
        for key, arr in arrays.items():
            slot, _, name = key.partition("/")
            self.state.setdefault(slot, {})[name] = np.array(arr)

    def _slot(self, slot: str, like: Weights) -> Weights:
        if slot not in self.state:
            self.state[slot] = {k: np.zeros_like(v, dtype=np.float64) for k, v in like.items()}
        return self.state[slot]


class FedAvgOptimizer(ServerOptimizer):
    def step(self, weights: Weights, mean_delta: Weights) -> Weights:
        return {k: (weights[k] + self.lr * mean_delta[k]).astype(np.float32) for k in weights}


class FedAvgMOptimizer(ServerOptimizer):
    def __init__(self, lr: float, momentum: float) -> None:
        super().__init__(lr)
        self.momentum = momentum

    def step(self, weights: Weights, mean_delta: Weights) -> Weights:
        velocity = self._slot("velocity", weights)
        for k in weights:
            velocity[k] = self.momentum * velocity[k] + mean_delta[k]
        return {k: (weights[k] + self.lr * velocity[k]).astype(np.float32) for k in weights}


class FedAdamOptimizer(ServerOptimizer):
    def __init__(self, lr: float, beta1: float, beta2: float, tau: float) -> None:
        super().__init__(lr)
        self.beta1, self.beta2, self.tau = beta1, beta2, tau

    def step(self, weights: Weights, mean_delta: Weights) -> Weights:
        m = self._slot("m", weights)
        v = self._slot("v", weights)
        new = {}
        for k in weights:
            d = mean_delta[k].astype(np.float64)
            m[k] = self.beta1 * m[k] + (1 - self.beta1) * d
            v[k] = self.beta2 * v[k] + (1 - self.beta2) * d * d
            new[k] = (weights[k] + self.lr * m[k] / (np.sqrt(v[k]) + self.tau)).astype(np.float32)
        return new


def make_server_optimizer(cfg: RunConfig) -> ServerOptimizer:
    if cfg.server_opt == "fedavg":
        return FedAvgOptimizer(cfg.server_lr)
    if cfg.server_opt == "fedavgm":
        return FedAvgMOptimizer(cfg.server_lr, cfg.server_momentum)
    if cfg.server_opt == "fedadam":
        return FedAdamOptimizer(cfg.server_lr, cfg.adam_beta1, cfg.adam_beta2, cfg.adam_tau)
    raise ValueError(f"unknown server_opt {cfg.server_opt!r}")
