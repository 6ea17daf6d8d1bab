"""Sparse masking graphs (Bell et al. 2020): the Harary graph, the degree bound, and double masking over it.

The protocol runs on a real key store without Flower, as in test_double_masking: exact sums with
drops, a lying server that splits one client's peers, and the server's pruning of clients left with
too few peers.
"""

import dataclasses
import itertools
import os
from collections import deque

import numpy as np
import pytest
from helpers import ring_codes as _codes

from qfl.config import resolve_config
from qfl.errors import ConfigError
from qfl.security import graph
from qfl.security import secagg as sa
from qfl.security.keys.store import KeyStore

SHAPES = {"w": (6, 20), "b": (5,)}
CLIPS = {"w": 0.3, "b": 0.1}


def _connected(nodes, adjacency):
    nodes = set(nodes)
    if not nodes:
        return True
    start = next(iter(nodes))
    seen, todo = {start}, deque([start])
    while todo:
        for other in adjacency[todo.popleft()] & nodes:
            if other not in seen:
                seen.add(other)
                todo.append(other)
    return seen == nodes


@pytest.mark.parametrize("n,k", [(24, 4), (24, 6), (101, 10), (101, 64)])
def test_the_harary_graph_is_regular_symmetric_connected_and_drawn_per_round(n, k):
    members = list(range(0, 3 * n, 3))  # partition ids need not be contiguous
    g = graph.neighbours(members, k, server_round=4, round_seed=99)
    assert set(g) == set(members)
    assert all(len(peers) == k and m not in peers for m, peers in g.items())
    assert all(m in g[p] for m, peers in g.items() for p in peers)
    assert _connected(members, g)
    assert g == graph.neighbours(list(reversed(members)), k, server_round=4, round_seed=99)  # both ends agree
    assert g != graph.neighbours(members, k, server_round=5, round_seed=99)  # a fresh graph each round
    for every_pair in (0, n - 1, n + 5):  # degree 0 or >= n − 1: the full graph
        full = graph.neighbours(members, every_pair, 1, 1)
        assert all(len(peers) == n - 1 for peers in full.values())


def test_the_degree_is_logarithmic_minimal_and_within_its_bound():
    target = 2.0**-graph.FAILURE_BITS
    degrees = {n: graph.sparse_degree(n, 0.1, 0.05) for n in (1000, 10_000, 100_000)}
    assert degrees[1000] <= 130 and degrees[100_000] - degrees[1000] <= 24  # O(log n): about +10 a decade
    for n, k in degrees.items():
        assert k % 2 == 0 and graph.degree_bound(n, k, 0.1, 0.05).total <= target
        assert graph.degree_bound(n, k - 2, 0.1, 0.05).total > target  # the least such degree
    assert graph.sparse_degree(30, 0.1, 0.1) == 29  # small rounds keep the full graph
    assert graph.sparse_degree(1000, 0.1, 1 / 3) > graph.sparse_degree(1000, 0.1, 0.1)  # more collusion, more peers


def test_the_split_term_bounds_the_measured_split_probability():
    """Monte Carlo over random graphs and random dropped-or-corrupt sets: the honest survivors stay
    connected at least as often as the bound n·(δ+γ)^{k/2} promises."""
    n, k, lost = 60, 6, 0.3
    rng = np.random.default_rng(0)
    trials, splits = 1500, 0
    for trial in range(trials):
        g = graph.neighbours(range(n), k, server_round=trial, round_seed=7)
        alive = [m for m in range(n) if rng.random() >= lost]
        splits += not _connected(alive, g)
    bound = graph.degree_bound(n, k, lost, 0.0).split
    assert splits / trials <= bound
    assert splits > 0  # the bound is not vacuous at this size: splits do happen


def test_the_config_picks_the_graph_and_refuses_bad_rates():
    cfg = resolve_config({"clients": 1000, "security": "masked-sum"})
    assert sa.round_degree(cfg, 1000) == graph.sparse_degree(1000, 0.1, 0.05) < 999
    k = sa.round_degree(cfg, 1000)
    assert sa.round_colluders(cfg, 1000, k) == graph.colluding_peers(k, 1000, 0.05) > 0.05 * k  # a tail quantile
    assert sa.round_colluders(cfg, 100, 0) == 5  # full graph: every colluder may be a peer
    assert sa.round_degree(cfg, 20) == 0  # the bound needs every peer: full
    assert sa.round_degree(resolve_config({"clients": 1000, "secure_graph": "full"}), 500) == 0
    assert sa.round_degree(resolve_config({"clients": 1000, "secure_degree": 7}), 500) == 8  # rounded up to even
    for key, value in (("secure_dropout", 0.5), ("secure_corrupt", -0.1), ("secure_degree", -2), ("secure_graph", "ring")):
        with pytest.raises(ConfigError) as err:
            resolve_config({key: value})
        assert err.value.key == key


# --------------------------------------------------------------------------- the protocol over a sparse graph


def _plan(n, degree, rnd=1):
    cfg = resolve_config({"security": "masked-sum", "codec": "qsgd", "clients": n, "secure_degree": degree,
                          "secure_corrupt": 0.0})  # thresholds a strict majority of the peers
    return sa.make_plan(cfg, rnd, list(range(n)), SHAPES, CLIPS, round_seed=rnd)


def _store_for(tmp_path, plan, nbytes):
    store = KeyStore(tmp_path / "keys.db")
    for i in plan.participants:
        for j in plan.peers(i):
            if i < j:
                store.add_link(sa.client_sae(i), sa.client_sae(j))
                store.deposit(sa.client_sae(i), sa.client_sae(j), os.urandom(nbytes))
    return store


def _keys(store, plan):
    taken = {i: sa.take_pair_keys(store, plan, i) for i in plan.participants}
    keys = {i: {j: c.key for j, c in taken[i].items()} for i in plan.participants}
    for j in plan.participants:
        keys[j].update(sa.fetch_pair_keys(store, j, {i: taken[i][j].key_id for i in plan.peers(j) if i < j}))
    return taken, keys




def _answer(plan, keys, j, survivors, dropped, shares):
    request = sa.UnmaskRequest(plan.round, tuple(survivors), tuple(dropped), shares)
    answer = sa.answer_unmask(plan, j, keys[j], sa.UnmaskRequest.from_config(plan, request.to_config()))
    return sa.UnmaskReply.decode(plan, j, answer.body(), survivors, dropped)


@pytest.fixture()
def sparse_round(tmp_path):
    n, k = 24, 6
    plan = _plan(n, k)
    assert plan.degree == k and all(len(plan.peers(i)) == k for i in plan.participants)
    store = _store_for(tmp_path, plan, 3 * plan.pair_key_bytes())
    taken, keys = _keys(store, plan)
    rng = np.random.default_rng(0)
    deltas = {i: {s: rng.normal(0, 0.1, shape).astype(np.float32) for s, shape in SHAPES.items()} for i in range(n)}
    uploads = {i: sa.masked_upload(plan, i, deltas[i], keys[i], np.random.default_rng(i)) for i in range(n)}
    return plan, taken, keys, deltas, uploads


def test_a_sparse_round_takes_n_k_over_2_pair_keys_and_sums_exactly_with_drops(sparse_round):
    plan, taken, keys, deltas, uploads = sparse_round
    n, k = len(plan.participants), plan.degree
    assert sum(len(t) for t in taken.values()) == n * k // 2  # against n(n−1)/2 = 276 for the full graph
    assert all(set(up.shares) == set(plan.peers(i)) for i, up in uploads.items())  # shares go to peers only
    dropped = [3, 11, 17]  # uploaded nothing
    survivors = [i for i in plan.participants if i not in dropped]
    shares = {i: sa.shares_from_wire(plan, i, *uploads[i].share_wire()) for i in survivors}
    requests = sa.unmask_requests(plan, shares, dropped)
    replies = {j: _answer(plan, keys, j, survivors, dropped, requests[j].shares) for j in survivors}
    for j in survivors:  # a survivor reveals masks only with its dropped peers, shares only of its surviving peers
        assert len(replies[j].masks) == plan.upload_bytes() * len(set(plan.peers(j)) & set(dropped))
        assert set(replies[j].share_from) == set(plan.peers(j)) & set(survivors)
    out = sa.unmask_sum(plan, {i: uploads[i].blob for i in survivors}, replies, dropped)
    total = sum(_codes(plan, deltas[i], i) for i in survivors)
    start = 0
    for name, shape, clip, c in zip(plan.tensors, plan.shapes, plan.clips, plan.coords()):
        expect = plan.codec.decode_ring_sum(total[start : start + c], clip, len(survivors), plan.seed(name), shape)
        assert np.array_equal(out.total[name], expect)
        start += c


def test_no_split_of_a_sparse_neighbourhood_gives_both_masks_of_a_client():
    """Every split of j's 6 peers into 'told j survived' (they give shares of b_j) and 'told j dropped'
    (they give s_kj), and every drop list sent to j itself: each request is one an honest peer accepts,
    and the server never holds t = 4 shares of b_j together with all of j's pair masks."""
    plan = _plan(24, 6)
    j = plan.participants[0]
    peers, t = plan.peers(j), plan.threshold_of(j)
    everyone = set(plan.participants)
    for r in range(len(peers) + 1):
        for told_survived in itertools.combinations(peers, r):
            masks = set()
            for k in peers:
                S = everyone if k in told_survived else everyone - {j}
                sa.check_unmask_request(plan, k, sa.UnmaskRequest(plan.round, tuple(sorted(S)), tuple(sorted(everyone - S))))
                masks |= set() if k in told_survived else {k}
            for size in range(len(peers) + 1):
                for d_j in itertools.combinations(peers, size):
                    request = sa.UnmaskRequest(plan.round, tuple(sorted(everyone - set(d_j))), tuple(sorted(d_j)))
                    try:
                        sa.check_unmask_request(plan, j, request)
                        revealed = set(d_j)
                    except sa.SecAggError:
                        revealed = set()
                    assert len(told_survived) < t or masks | revealed != set(peers), (told_survived, d_j)


def test_thresholds_follow_the_peers_left_and_isolated_clients_are_pruned():
    plan = _plan(24, 4)
    j = plan.participants[0]
    fewer = plan.with_participants(set(plan.participants) - set(plan.peers(j)[:2]))
    assert len(fewer.peers(j)) == 2 and fewer.threshold_of(j) == 2  # a strict majority of the peers it still has
    alone = plan.with_participants(set(plan.participants) - set(plan.peers(j)))  # every peer of j left
    with pytest.raises(sa.SecAggError):
        alone.check()
    viable = alone.viable()
    assert j not in viable.participants and len(viable.participants) == len(alone.participants) - 1
    viable.check()


@pytest.mark.parametrize("colluders", [0, 2])
def test_the_threshold_resists_exactly_the_colluders_it_is_sized_for(colluders):
    """A lying server with c colluding peers of j (they hand over their shares of b_j and their pair
    masks with j) exposes j iff c >= 2t - d: exhaustively over which honest peers are told j survived
    and which drop list j itself is sent. Sized for c colluders, no split works with c of them; a plan
    sized for fewer falls to exactly 2t - d."""
    plan = sa.make_plan(resolve_config({"security": "masked-sum", "clients": 9}), 1, list(range(9)),
                        SHAPES, CLIPS, round_seed=1)
    plan = dataclasses.replace(plan, colluders=colluders)
    j = 0
    peers, t = plan.peers(j), plan.threshold_of(j)
    d = len(peers)
    assert t == (d + colluders) // 2 + 1

    def exposed(corrupt):
        honest = [k for k in peers if k not in corrupt]
        everyone = set(plan.participants)
        for r in range(len(honest) + 1):
            for givers in itertools.combinations(honest, r):
                if len(givers) + len(corrupt) < t:
                    continue  # not enough shares of b_j
                for k in honest:  # every honest peer's request must be one it answers
                    S = everyone if k in givers else everyone - {j}
                    sa.check_unmask_request(plan, k, sa.UnmaskRequest(1, tuple(sorted(S)), tuple(sorted(everyone - S))))
                d_j = tuple(givers)  # j must reveal its masks with the givers: tell j they dropped
                try:
                    sa.check_unmask_request(plan, j, sa.UnmaskRequest(1, tuple(sorted(everyone - set(d_j))), d_j))
                    return True
                except sa.SecAggError:
                    continue
        return False

    assert not exposed(peers[:colluders])
    assert exposed(peers[: 2 * t - d])  # the bound is tight: 2t - d colluders are enough


def test_a_threshold_the_peers_cannot_meet_is_refused_before_round_one():
    from qfl.server.preflight import check_components

    with pytest.raises(ConfigError) as err:
        check_components(resolve_config({"clients": 200, "security": "masked-sum", "secure_degree": 4}))
    assert err.value.key == "secure_corrupt"  # 4 peers cannot resist the colluders 5% of 200 clients make likely
    check_components(resolve_config({"clients": 200, "security": "masked-sum", "secure_degree": 4, "secure_corrupt": 0}))
