"""Models for the classical clients: a small CNN and an MLP.

Both take images ``[N, C, H, W]``; the CNN pools adaptively to 4x4 so the same
definition fits 8x8 digits, 28x28 MNIST and 32x32 CIFAR-10. No batch norm:
every tensor in ``state_dict`` is a trainable parameter, so a model update is
exactly the list of its parameters.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int, seed: int = 0) -> nn.Module:
    """A freshly initialised model; identical for identical arguments."""
    torch.manual_seed(seed)
    channels, height, width = input_shape
    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d((4, 4)),
            nn.Flatten(),
            nn.Linear(32 * 16, 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )
    if name == "mlp":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * height * width, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )
    raise ValueError(f"unknown model {name!r}; choose cnn or mlp")


def get_weights(model: nn.Module) -> dict[str, np.ndarray]:
    """Copies of the model's tensors as float32 numpy arrays, in state_dict order."""
    return {k: v.detach().cpu().numpy().astype(np.float32, copy=True) for k, v in model.state_dict().items()}


def set_weights(model: nn.Module, weights: dict[str, np.ndarray]) -> None:
    """Load numpy weights; strict, so a missing or extra tensor is an error."""
    model.load_state_dict(OrderedDict((k, torch.from_numpy(np.asarray(v, dtype=np.float32))) for k, v in weights.items()))
