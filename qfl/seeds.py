"""The run's derived seeds: one place for every seed the run seed fans out to.

Seeds govern training, partitions and codec randomness, so a run is
reproducible from its config. They never govern key material: QKD key and
self-masks come from the operating system's CSPRNG (see docs/threat-model.md),
so nothing secret can be recomputed from ``config.toml``.
"""

from __future__ import annotations

import numpy as np


def task_seed(run_seed: int, server_round: int, partition_id: int) -> int:
    """The seed of one client's training in one round (independent of process)."""
    return int(np.random.SeedSequence([run_seed, server_round, partition_id]).generate_state(1)[0])


def round_seed(run_seed: int, server_round: int) -> int:
    """Shared by every client of a round (rand-k's common support), and known to the server."""
    return int(np.random.SeedSequence([run_seed, server_round, 2]).generate_state(1)[0])
