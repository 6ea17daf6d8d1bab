"""Local training and evaluation loops (cross-entropy; SGD with momentum, or Adam)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def train(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    seed: int,
    optimizer: str = "sgd",
) -> float:
    """Train in place with ``optimizer`` (``sgd`` with ``momentum``, or ``adam``); return the
    mean training loss of the last epoch."""
    generator = torch.Generator().manual_seed(seed)
    xs, ys = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)
    step: torch.optim.Optimizer
    if optimizer == "adam":
        step = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        step = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    last = float("nan")
    for _ in range(epochs):
        order = torch.randperm(len(xs), generator=generator)
        total, count = 0.0, 0
        for start in range(0, len(xs), batch_size):
            idx = order[start : start + batch_size]
            step.zero_grad()
            loss = loss_fn(model(xs[idx]), ys[idx])
            loss.backward()
            step.step()
            total += loss.item() * len(idx)
            count += len(idx)
        last = total / max(count, 1)
    return last


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 512) -> tuple[float, float]:
    """Return (mean cross-entropy loss, accuracy) on (x, y)."""
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total_loss, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        xb = torch.from_numpy(np.array(x[start : start + batch_size]))  # a copy: cached datasets are read-only
        yb = torch.from_numpy(y[start : start + batch_size])
        logits = model(xb)
        total_loss += float(loss_fn(logits, yb))
        correct += int((logits.argmax(dim=1) == yb).sum())
    n = max(len(x), 1)
    return total_loss / n, correct / n
