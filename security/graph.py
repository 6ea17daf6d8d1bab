"""The masking graph of a secure round: which pairs of participants share a pair mask.

``full`` (Bonawitz et al., CCS 2017): every pair. Each client spends pair key
with ``n − 1`` peers, so a round costs ``n(n−1)/2`` pair keys.

``sparse`` (Bell et al., CCS 2020): a Harary graph ``H(k, n)`` over a random
order of the participants. Place them on a cycle in that order and join each
to the ``k/2`` nearest on either side. Every client then has exactly ``k``
neighbours (``k`` even), the graph is ``k``-connected, and a round costs
``n·k/2`` pair keys. Each client shares its self-mask only with its
neighbours, so the protocol's argument (:mod:`qfl.security.secagg`) holds per
neighbourhood. When ``k ≥ n − 1`` the sparse graph *is* the full graph.

Threshold against a lying server with colluders (:func:`threshold`). A client
with ``d`` peers, ``c`` of them colluding with a server that lies about who
dropped, is exposed iff the server can find ``a`` honest peers to give shares
of its self-mask (``a + c ≥ t``) while the client itself, told those ``a``
dropped, still sees ``t`` surviving peers and reveals its pair masks with them
(``d − a ≥ t``): iff ``c ≥ 2t − d``. So ``t = ⌊(d + c)/2⌋ + 1`` resists ``c``
colluding peers, and the strict majority ``⌊d/2⌋ + 1`` resists none beyond
``c = 0`` (one when ``d`` is odd). The plan sizes ``c`` from
``secure_corrupt`` (γ): ``⌊γ·n⌋`` in the full graph (every colluder may be a
peer), and in a sparse graph the least ``c`` that a client's peers exceed with
probability at most ``2^−σ/n`` (:func:`colluding_peers`).

The order is drawn from SHA-256 of the round number, the round seed and the
graph's members, so both ends compute the same graph and a client checks its
own neighbours instead of trusting a list from the server. The server still
chooses the members and the round seed: a server that grinds ``G`` candidate
rounds multiplies the failure bound below by ``G``.

Choice of ``k`` (:func:`sparse_degree`). Write ``δ`` for the rate at which
clients drop during a round (``secure_dropout``) and ``γ`` for the fraction of
clients colluding with the server (``secure_corrupt``). A fixed client's
neighbours are a uniform random ``k``-subset of the others, so their counts
have binomial (dropouts, independent) or hypergeometric (a fixed corrupt set;
its tails are below the binomial's, Hoeffding 1963) laws. Three events break
a round, each bounded by a union over the ``n`` clients:

- *correctness*: a survivor keeps fewer than ``t`` surviving neighbours, so
  its self-mask cannot be rebuilt and the round is not opened (the model is
  unchanged): ``n · P(Bin(k, 1−δ) < t)``;
- *exposure*: more of an honest client's neighbours collude than its
  threshold allows for (``c`` above): ``n · P(Bin(k, γ) > c)``;
- *split*: the graph of honest survivors falls apart, and the server learns
  the sum of each part. On the cycle every node is joined to all nodes within
  ``k/2`` places, so the survivors stay connected unless ``k/2`` consecutive
  places are all dropped or corrupt: ``n · (δ + γ)^{k/2}``.

:func:`sparse_degree` returns the least even ``k`` whose summed bound is at
most ``2^−σ`` (``σ = FAILURE_BITS``); it grows as ``O(log n)``
(``k/2 ≥ (σ + log2 n) / log2(1/(δ+γ))`` for the split term). Example, δ = γ
= 0.1: k = 104 at n = 1,000 (:func:`degree_bound` prints the terms).
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

FAILURE_BITS = 40  # σ: the chosen degree keeps the failure bound of a round below 2^−σ
_DOMAIN = b"qfl-masking-graph/v1\x00"


def _binom_cdf_below(k: int, p: float, t: int) -> float:
    """P(Bin(k, p) < t)."""
    return sum(math.comb(k, i) * p**i * (1 - p) ** (k - i) for i in range(0, min(t, k + 1)))


def _binom_tail_from(k: int, p: float, t: int) -> float:
    """P(Bin(k, p) ≥ t), summed directly (no cancellation in 1 − cdf)."""
    return sum(math.comb(k, i) * p**i * (1 - p) ** (k - i) for i in range(max(t, 0), k + 1))


@dataclass(frozen=True)
class DegreeBound:
    """The three terms of the failure bound of degree ``k`` over ``n`` clients (see the module docstring)."""

    n: int
    k: int
    correctness: float
    exposure: float
    split: float

    @property
    def total(self) -> float:
        return self.correctness + self.exposure + self.split


def threshold(peers: int, colluders: int) -> int:
    """Shares that rebuild a self-mask shared among ``peers``, ``colluders`` of them with a lying server:
    ``⌊(d + c)/2⌋ + 1`` (module docstring); ``c = 0`` gives a strict majority of the peers."""
    return (int(peers) + min(int(colluders), int(peers))) // 2 + 1


def colluding_peers(k: int, n: int, corrupt: float, failure_bits: int = FAILURE_BITS) -> int:
    """The least ``c`` with ``n · P(Bin(k, γ) > c) ≤ 2^−failure_bits``: colluders a sparse neighbourhood of
    ``k`` exceeds only with that probability (0 when γ = 0)."""
    if corrupt <= 0:
        return 0
    target = 2.0**-failure_bits / max(n, 1)
    for c in range(0, k + 1):
        if _binom_tail_from(k, corrupt, c + 1) <= target:
            return c
    return k


def degree_bound(n: int, k: int, dropout: float, corrupt: float) -> DegreeBound:
    """The failure bound of a Harary graph of even degree ``k`` over ``n`` clients (threshold sized for
    :func:`colluding_peers`)."""
    c = colluding_peers(k, n, corrupt)
    t = threshold(k, c)
    correctness = n * _binom_cdf_below(k, 1.0 - dropout, t)
    exposure = n * _binom_tail_from(k, corrupt, c + 1) if corrupt > 0 else 0.0
    split = n * (dropout + corrupt) ** (k // 2)
    return DegreeBound(n, k, min(correctness, 1.0), min(exposure, 1.0), min(split, 1.0))


def sparse_degree(n: int, dropout: float, corrupt: float, failure_bits: int = FAILURE_BITS) -> int:
    """The least even ``k`` whose failure bound is ``≤ 2^−failure_bits``; ``n − 1`` (full) if none below it is."""
    if n <= 2:
        return max(n - 1, 0)
    target = 2.0**-failure_bits
    for k in range(2, n - 1, 2):
        if degree_bound(n, k, dropout, corrupt).total <= target:
            return k
    return n - 1


def _order(members: Sequence[int], server_round: int, round_seed: int) -> list[int]:
    """The members in the round's random cyclic order (SHA-256 of round, seed and members)."""
    head = struct.pack("<IQ", int(server_round) & 0xFFFFFFFF, int(round_seed) & 0xFFFFFFFFFFFFFFFF)
    body = np.asarray(sorted(members), dtype="<u4").tobytes()
    digest = hashlib.sha256(_DOMAIN + head + body).digest()
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(digest, "little")))
    return [int(m) for m in rng.permutation(np.asarray(sorted(members), dtype=np.int64))]


def neighbours(members: Sequence[int], degree: int, server_round: int, round_seed: int) -> dict[int, frozenset[int]]:
    """The masking graph over ``members``: each member's neighbours.

    ``degree`` ``0`` or ``≥ len(members) − 1``: the full graph. Otherwise the
    Harary graph ``H(degree, n)`` (``degree`` rounded up to even) over the
    round's random order.
    """
    members = sorted(int(m) for m in members)
    n = len(members)
    if degree <= 0 or degree >= n - 1:
        everyone = frozenset(members)
        return {m: everyone - {m} for m in members}
    half = (int(degree) + 1) // 2
    order = _order(members, server_round, round_seed)
    out: dict[int, set[int]] = {m: set() for m in members}
    for pos, m in enumerate(order):
        for step in range(1, half + 1):
            other = order[(pos + step) % n]
            out[m].add(other)
            out[other].add(m)
    return {m: frozenset(peers) for m, peers in out.items()}
