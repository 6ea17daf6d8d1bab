"""The server caps each client's averaging weight at its own partition's training size."""

import pytest

from qfl.clients.classical import local_split
from qfl.clients.tasks import task_for
from qfl.config import resolve_config


@pytest.mark.parametrize("alpha", [None, 0.5])
def test_training_sizes_are_what_honest_clients_report(alpha):
    cfg = resolve_config({"clients": 7, "alpha": alpha if alpha is not None else "iid", "security": "none"})
    sizes = task_for(cfg).training_sizes(cfg.clients)
    assert sizes == [len(local_split(cfg, p, cfg.clients)[0]) for p in range(cfg.clients)]
    assert sum(sizes) < task_for(cfg).train_size()  # the validation shares are kept back


def test_quantum_training_sizes_match_its_split():
    from qfl.clients.quantum import local_split as quantum_split

    cfg = resolve_config({"model": "vqc", "dataset": "ntangled", "clients": 4, "quantum_samples": 120, "embedding": "state",
                          "security": "none"})
    sizes = task_for(cfg).training_sizes(cfg.clients)
    assert sizes == [len(quantum_split(cfg, p, cfg.clients)[0]) for p in range(cfg.clients)]
