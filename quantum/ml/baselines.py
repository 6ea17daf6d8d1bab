"""Classical learners on classical information about quantum states: the yardsticks a quantum client must beat.

* :func:`single_qubit_accuracy` — the best of three classifiers that see the
  *exact* single-qubit Pauli expectations ⟨X_i⟩, ⟨Y_i⟩, ⟨Z_i⟩ (3n numbers per
  state; unlimited copies): a logistic regression on them, a logistic
  regression on the Bloch-vector lengths |r_i| (invariant under local
  unitaries), and a small MLP. A dataset has a *local shortcut* when this beats
  chance; the shipped datasets are built so that it cannot (every reduced
  state is I/2, :func:`qfl.quantum.ml.qdata.project_marginal_code`).
* :func:`shadow_accuracy` — logistic regression or a small MLP on classical-shadow
  features (:func:`qfl.quantum.ml.shadows.shadow_features`) estimated from M
  randomized Pauli measurements per state.

All learners are scikit-learn's, inputs standardised on the training split,
seeded; accuracy is measured on the held-out split.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from . import qdata

SMALL_MLP_HIDDEN = (32,)


def _fit_score(model: Any, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> float:
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pipe = make_pipeline(StandardScaler(), model)
    pipe.fit(x_train, y_train)
    return float(np.mean(pipe.predict(x_test) == y_test))


def logreg(seed: int) -> Any:
    """L2-regularised logistic regression (C = 1)."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=2000, random_state=seed)


def small_mlp(seed: int) -> Any:
    """One hidden layer of 32 ReLU units, Adam, L2 penalty 0.1, 500 epochs (sklearn's ``MLPClassifier``)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    return MLPClassifier(SMALL_MLP_HIDDEN, alpha=0.1, max_iter=500, random_state=seed)


def single_qubit_accuracy(data: qdata.QuantumDataset, seed: int = 0) -> dict[str, float]:
    """Held-out accuracy of classifiers on exact single-qubit expectations: ``logreg``, ``logreg_lengths``, ``mlp``, ``best``."""
    # Rounded to 1e-12: the simulation's round-off (~1e-16) would otherwise be standardised into unit-variance noise.
    bloch_train, bloch_test = (np.round(qdata.bloch_vectors(x), 12) for x in (data.x_train, data.x_test))
    flat_train, flat_test = bloch_train.reshape(len(bloch_train), -1), bloch_test.reshape(len(bloch_test), -1)
    len_train, len_test = np.linalg.norm(bloch_train, axis=-1), np.linalg.norm(bloch_test, axis=-1)
    out = {
        "logreg": _fit_score(logreg(seed), flat_train, data.y_train, flat_test, data.y_test),
        "logreg_lengths": _fit_score(logreg(seed), len_train, data.y_train, len_test, data.y_test),
        "mlp": _fit_score(small_mlp(seed), flat_train, data.y_train, flat_test, data.y_test),
    }
    out["best"] = max(out.values())
    return out


def _feature_accuracy(data: qdata.QuantumDataset, features: Callable[[np.ndarray, int, int], np.ndarray], copies: int,
                      seed: int) -> dict[str, float]:
    x_train = features(data.x_train, copies, seed)
    x_test = features(data.x_test, copies, seed + 1)
    return {
        "logreg": _fit_score(logreg(seed), x_train, data.y_train, x_test, data.y_test),
        "mlp": _fit_score(small_mlp(seed), x_train, data.y_train, x_test, data.y_test),
    }


def shadow_accuracy(data: qdata.QuantumDataset, copies: int, seed: int = 0) -> dict[str, float]:
    """Held-out accuracy of ``logreg`` and ``mlp`` on shadow features from ``copies`` snapshots per state (0: exact)."""
    from .shadows import shadow_features

    return _feature_accuracy(data, shadow_features, copies, seed)


def bell_accuracy(data: qdata.QuantumDataset, copies: int, seed: int = 0) -> dict[str, float]:
    """Held-out accuracy of ``logreg`` and ``mlp`` on Bell-sampled purities from ``copies`` copies per state (0: exact)."""
    from .bell import bell_features

    return _feature_accuracy(data, bell_features, copies, seed)
