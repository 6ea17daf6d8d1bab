"""Statistics the experiments report: a mean with its Student-t 95% interval."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np


def mean_ci95(values: Iterable[float]) -> tuple[float, list[float]]:
    """Mean and its 95% interval, mean ± t_{0.975, n−1}·s/√n (Student t; a single value gives a zero-width interval)."""
    x = np.asarray(list(values), dtype=np.float64)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, [mean, mean]
    from scipy.stats import t

    half = float(t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return mean, [mean - half, mean + half]
