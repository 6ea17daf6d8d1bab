"""Split a training set across N clients: IID or Dirichlet(α) over labels.

Dirichlet partitioning (Hsu et al. 2019): for each class c draw
p_c ~ Dir(α·1_N) and give client i the share p_c[i] of class c's samples.
Small α gives each client few classes; α → ∞ approaches IID. Draws repeat
until every client holds at least ``min_size`` samples, so no client trains on
nothing. Both schemes are deterministic in ``seed``.
"""

from __future__ import annotations

import numpy as np

from qfl.errors import PartitionError, PartitionReason

_MAX_DRAWS = 1000


def partition_iid(num_samples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffle and cut into ``num_clients`` near-equal parts (sizes differ by <= 1)."""
    _check_counts(num_samples, num_clients)
    order = np.random.default_rng(seed).permutation(num_samples)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def partition_dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_size: int = 2
) -> list[np.ndarray]:
    """Label-skewed split: class shares per client drawn from Dir(α)."""
    labels = np.asarray(labels)
    _check_counts(len(labels), num_clients)
    if alpha <= 0:
        raise PartitionError(f"alpha must be > 0, got {alpha}", reason=PartitionReason.BAD_ARGUMENT)
    min_size = min(min_size, len(labels) // num_clients)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    for _ in range(_MAX_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for idx in by_class:
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        sizes = [sum(len(c) for c in p) for p in parts]
        if min(sizes) >= min_size:
            return [np.sort(np.concatenate(p)) for p in parts]
    raise PartitionError(
        f"could not give each of {num_clients} clients >= {min_size} samples with alpha={alpha} "
        f"in {_MAX_DRAWS} draws; raise alpha or use fewer clients", reason=PartitionReason.NO_SPLIT
    )


def _check_counts(num_samples: int, num_clients: int) -> None:
    if num_clients < 1:
        raise PartitionError(f"clients must be >= 1, got {num_clients}", reason=PartitionReason.BAD_ARGUMENT)
    if num_clients > num_samples:
        raise PartitionError(
            f"{num_clients} clients but only {num_samples} training samples; "
            "use fewer clients or a larger dataset", reason=PartitionReason.TOO_FEW_SAMPLES
        )
