"""Double masking (Bonawitz et al. 2017, §4) on a real key store, without Flower: a server that
lies about who dropped still cannot unmask one update.

Shamir sharing over GF(65537) is checked for reconstruction and for perfect
secrecy below the threshold; the protocol for exact sums with drops and with
an upload that fails its MAC; a lying server (a received upload declared
dropped, split drop lists, requests sent twice) for what it can and cannot
learn; and a tampered share for detection by its recipient.
"""

import itertools
import os

import numpy as np
import pytest
from helpers import ring_codes as _codes
from scipy import stats

from qfl.config import resolve_config
from qfl.errors import SecAggReason
from qfl.security import secagg as sa
from qfl.security.keys.store import KeyStore
from qfl.security.primitives import shamir
from qfl.security.primitives.masking import add_packed, pack_ring

SHAPES = {"w": (8, 30), "b": (6,)}
CLIPS = {"w": 0.3, "b": 0.1}


def _store(tmp_path, n, nbytes=60_000):
    store = KeyStore(tmp_path / "keys.db")
    for a, b in itertools.combinations(sa.network_nodes(n), 2):
        store.add_link(a, b)
        store.deposit(a, b, os.urandom(nbytes))
    return store


def _plan(n, rnd=1, shapes=SHAPES, clips=CLIPS, **values):
    cfg = resolve_config({"security": "masked-sum", "codec": "qsgd", "clients": n, **values})
    return sa.make_plan(cfg, rnd, list(range(n)), shapes, clips, round_seed=rnd)


def _keys(store, plan):
    taken = {i: sa.take_pair_keys(store, plan, i) for i in plan.participants}
    keys = {i: {j: c.key for j, c in taken[i].items()} for i in plan.participants}
    for j in plan.participants:
        keys[j].update(sa.fetch_pair_keys(store, j, {i: taken[i][j].key_id for i in plan.participants if i < j}))
    return keys


def _deltas(n, seed=0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return {i: {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in shapes.items()} for i in range(n)}




def _plain_sum(plan, deltas, survivors):
    total = sum(_codes(plan, deltas[i], i) for i in survivors)
    out, start = {}, 0
    for name, shape, clip, c in zip(plan.tensors, plan.shapes, plan.clips, plan.coords()):
        out[name] = plan.codec.decode_ring_sum(total[start : start + c], clip, len(survivors), plan.seed(name), shape)
        start += c
    return out


def _answer(plan, keys, j, survivors, dropped, shares):
    """Client j's answer to a request (through the wire forms), decoded by the server."""
    request = sa.UnmaskRequest(plan.round, tuple(survivors), tuple(dropped), shares)
    answer = sa.answer_unmask(plan, j, keys[j], sa.UnmaskRequest.from_config(plan, request.to_config()))
    return sa.UnmaskReply.decode(plan, j, answer.body(), survivors, dropped)


def _round(tmp_path, n, **values):
    store = _store(tmp_path, n)
    plan = _plan(n, **values)
    keys = _keys(store, plan)
    deltas = _deltas(n)
    uploads = {i: sa.masked_upload(plan, i, deltas[i], keys[i], np.random.default_rng(i)) for i in range(n)}
    return store, plan, keys, deltas, uploads


# --------------------------------------------------------------------------- Shamir over GF(65537)


@pytest.mark.parametrize("length,n,t", [(37, 6, 3), (1, 3, 1), (10, 4, 4), (0, 2, 2)])
def test_any_t_shares_rebuild_the_secret(length, n, t):
    secret = os.urandom(length)
    chunks = shamir.to_chunks(secret)
    assert shamir.from_chunks(chunks, length) == secret  # the chunking round-trips (odd lengths too)
    shares = shamir.split(chunks, range(1, n + 1), t)
    for k in range(t, n + 1):
        for subset in itertools.combinations(range(1, n + 1), k):
            assert shamir.from_chunks(shamir.combine({x: shares[x] for x in subset}, t), length) == secret
    with pytest.raises(ValueError):  # t − 1 shares cannot reconstruct
        shamir.combine({x: shares[x] for x in range(1, t)}, t)


def test_fewer_than_t_shares_fit_every_secret_equally():
    """Perfect secrecy, exhaustively for t = 3 and the shares at x = 1, 2: for EVERY candidate secret s
    in GF(p) exactly one pair of coefficients (a1, a2) gives the observed shares, so every secret is
    equally likely given them; and empirically the shares of 0 and of 65535 are identically distributed."""
    p = shamir.P
    chunks = np.array([1234], dtype=np.uint64)
    shares = shamir.split(chunks, [1, 2, 3], 3)
    y1, y2 = int(shares[1][0]), int(shares[2][0])
    s = np.arange(p, dtype=np.int64)
    # s + a1·x + a2·x² = y at x = 1, 2:  a1 + a2 = y1 − s,  2a1 + 4a2 = y2 − s  (det = 2, invertible mod p)
    r1, r2 = (y1 - s) % p, (y2 - s) % p
    inv2 = pow(2, p - 2, p)
    a2 = (r2 - 2 * r1) % p * inv2 % p
    a1 = (r1 - a2) % p
    assert np.all((s + a1 + a2) % p == y1) and np.all((s + 2 * a1 + 4 * a2) % p == y2)
    assert len(set(zip(a1.tolist(), a2.tolist()))) == p  # one distinct polynomial per candidate secret
    # t − 1 = 2 shares of 40,000 sharings of 0 and of 65535: the same joint distribution
    counts = []
    for secret in (0, 65535):
        sh = shamir.split(np.full(40_000, secret, dtype=np.uint64), [1, 2, 3], 3)
        joint = (sh[1] * 8 // p) * 8 + sh[2] * 8 // p  # 8 × 8 bins of the pair of shares
        counts.append(np.bincount(joint.astype(np.int64), minlength=64))
        assert stats.chisquare(counts[-1]).pvalue > 1e-4
    assert stats.chi2_contingency(np.vstack(counts)).pvalue > 1e-4


def test_a_share_packs_at_17_bits_and_rejects_values_outside_the_field():
    values = np.array([0, 1, 65535, 65536, 17, 40000, 3], dtype=np.uint64)
    packed = shamir.pack_share(values)
    assert len(packed) == (7 * 17 + 7) // 8 and np.array_equal(shamir.unpack_share(packed, 7), values)
    with pytest.raises(ValueError):  # a value >= p
        shamir.unpack_share(pack_ring(np.array([65537, 0], dtype=np.uint64), 17), 2)
    assert shamir.share_bytes(38_298) == 40_692  # the demo's upload: 19,149 chunks at 17 bits


# --------------------------------------------------------------------------- honest rounds


@pytest.mark.parametrize("self_mask", ["seed", "vector"])
def test_double_masking_with_drops_and_a_failed_mac_sums_exactly_and_never_shares_the_failed(tmp_path, self_mask):
    n = 7
    store, plan, keys, deltas, uploads = _round(tmp_path, n, secure_self_mask=self_mask)
    assert plan.threshold_of(0) == 4 and plan.double and plan.self_mask == self_mask
    secret = 32 if self_mask == "seed" else plan.upload_bytes()
    assert plan.share_bytes() == shamir.share_bytes(secret)
    assert all(len(s.cipher) == plan.share_bytes() for u in uploads.values() for s in u.shares.values())
    # client 3's upload is tampered in transit: its seal fails, so it is dropped although it arrived
    key_id, tag = sa.seal(store, 3, plan.mode, "upload", plan.round, uploads[3].blob)
    bad = bytearray(uploads[3].blob)
    bad[5] ^= 1
    with pytest.raises(sa.SecAggError) as err:
        sa.open_seal(store, 3, plan.mode, "upload", plan.round, bytes(bad), key_id, tag)
    assert err.value.reason is SecAggReason.BAD_MAC
    survivors = [0, 1, 2, 4, 6]  # client 5 never uploaded, client 3 failed its MAC
    dropped = [3, 5]
    requests = sa.unmask_requests(plan, {i: uploads[i].shares for i in survivors}, dropped)
    replies = {j: _answer(plan, keys, j, r.survivors, r.dropped, r.shares) for j, r in requests.items()}
    result = sa.unmask_sum(plan, {i: uploads[i].blob for i in survivors}, replies, dropped)
    expected = _plain_sum(plan, deltas, survivors)
    assert all(np.array_equal(result.total[k], expected[k]) for k in SHAPES) and result.clients == 5
    # the server holds no share of the self-masks of 3 and 5, only their pair masks with the survivors
    assert all(not {3, 5} & set(r.share_from) for r in replies.values())
    assert all(not {3, 5} & set(r.shares) for r in requests.values())
    assert all(len(r.masks) == 2 * plan.upload_bytes() for r in replies.values())
    assert store.verify() == []


def test_a_round_needs_t_plus_one_survivors(tmp_path):
    n = 7
    _, plan, keys, _, uploads = _round(tmp_path, n)
    survivors, dropped = [0, 1, 2, 3], [4, 5, 6]  # 4 < t + 1 = 5
    with pytest.raises(sa.SecAggError) as err:  # 3 surviving peers < t = 4
        _answer(plan, keys, 0, survivors, dropped, {k: uploads[k].shares[0] for k in survivors if k})
    assert err.value.reason is SecAggReason.TOO_FEW
    # and a server that opens with t − 1 shares per self-mask gets an error, not a sum
    replies = {j: sa.UnmaskReply(sa.reveal_masks(plan, j, keys[j], dropped)) for j in survivors}
    with pytest.raises(sa.SecAggError) as err:  # 0 of the t = 4 shares
        sa.unmask_sum(plan, {i: uploads[i].blob for i in survivors}, replies, dropped)
    assert err.value.reason is SecAggReason.TOO_FEW


# --------------------------------------------------------------------------- a lying server


def _unmasked_by_pair_masks(plan, upload, j, masks):
    """y_j minus every pair mask of j (``masks[k]`` = s_jk packed): q_j + b_j, as ring elements."""
    total = np.zeros(plan.elements(), dtype=np.uint64)
    add_packed(total, upload, plan.ring_bits)
    for k, mask in masks.items():  # j added +s_jk for k > j, −s_jk for k < j
        add_packed(total, mask, plan.ring_bits, subtract=k > j)
    return total


def test_a_received_upload_declared_dropped_stays_masked(tmp_path):
    """The server receives every upload, then tells everyone that client 2 dropped (and forwards 2's
    shares anyway): it gets all of 2's pair masks but no share of b_2, and y_2 minus the pair masks
    is uniform and independent of q_2 across rounds."""
    n, j = 5, 2
    shapes, clips = {"w": (256,)}, {"w": 1.0}
    store = _store(tmp_path, n, nbytes=200_000)
    samples = {0: [], 1: []}
    for rnd in range(1, 41):
        plan = _plan(n, rnd=rnd, shapes=shapes, clips=clips)
        keys = _keys(store, plan)
        for which, value in ((0, 0.0), (1, 0.9)):
            delta = {"w": np.full(256, value, np.float32)}
            upload = sa.masked_upload(plan, j, delta, keys[j], np.random.default_rng(rnd))
            others = [k for k in plan.participants if k != j]
            masks = {}
            for k in others:  # the lie: S = everyone but j, D = {j}; j's share for k forwarded too
                reply = sa.answer_unmask(plan, k, keys[k], sa.UnmaskRequest(
                    plan.round, tuple(others), (j,), {j: upload.shares[k]}))
                assert reply.share_from == () and len(reply.masks) == plan.upload_bytes()  # refused: j is "dropped"
                masks[k] = reply.masks
            with pytest.raises(sa.SecAggError) as err:  # j itself does not answer: it is listed as dropped
                sa.answer_unmask(plan, j, keys[j], sa.UnmaskRequest(plan.round, tuple(others), (j,), {}))
            assert err.value.reason is SecAggReason.BAD_REQUEST
            z = _unmasked_by_pair_masks(plan, upload.blob, j, masks)
            q = _codes(plan, delta, rnd)
            assert not np.array_equal(z, q)
            samples[which].append(z[:256].astype(np.int64))  # the codes' positions, 7-bit ring
    B = plan.ring_bits
    a, b = np.concatenate(samples[0]), np.concatenate(samples[1])
    for data in (a, b):  # uniform on Z_{2^B} although q is all-equal codes
        assert stats.chisquare(np.bincount(data, minlength=1 << B)).pvalue > 1e-4
    table = np.vstack([np.bincount(a, minlength=1 << B), np.bincount(b, minlength=1 << B)])
    assert stats.chi2_contingency(table).pvalue > 1e-4  # and the same for two very different updates
    assert store.verify() == []


def _learns(plan, j, told_survived, d_j):
    """What a lying server gathers about client j when the peers in ``told_survived`` are told j survived
    (S = everyone: they give shares of b_j) and the others that j dropped (S = everyone but j: they give
    s_kj), and j itself is asked with dropped = ``d_j``. Each honest client answers one request.
    Returns (shares of b_j, peers whose pair mask with j the server holds)."""
    everyone = set(plan.participants)
    shares, masks = 0, set()
    for k in everyone - {j}:
        S = everyone if k in told_survived else everyone - {j}
        request = sa.UnmaskRequest(plan.round, tuple(sorted(S)), tuple(sorted(everyone - S)))
        sa.check_unmask_request(plan, k, request)  # both requests are acceptable to k
        if j in S:
            shares += 1
        else:
            masks.add(k)
    request = sa.UnmaskRequest(plan.round, tuple(sorted(everyone - set(d_j))), tuple(sorted(d_j)))
    try:
        sa.check_unmask_request(plan, j, request)
        masks |= set(d_j)
    except sa.SecAggError:
        pass
    return shares, masks


def test_no_split_of_the_drop_lists_gives_both_masks_of_a_client(tmp_path):
    """Every split of j's peers into 'told j survived' and 'told j dropped', with every request to j
    itself: the server never holds t shares of b_j AND all of j's pair masks (n = 7, t = 4)."""
    n, j = 7, 0
    plan = _plan(n)
    peers = [k for k in plan.participants if k != j]
    for r in range(len(peers) + 1):
        for told_survived in itertools.combinations(peers, r):
            for size in range(len(peers) + 1):
                for d_j in itertools.combinations(peers, size):
                    shares, masks = _learns(plan, j, set(told_survived), set(d_j))
                    assert shares < plan.threshold_of(j) or masks != set(peers), (told_survived, d_j)


def _rebuilt_self_mask(plan, j, shares, t):
    """What the server subtracts for client j's self-mask after combining ``shares`` at threshold t."""
    secret = shamir.from_chunks(shamir.combine(shares, t), plan.secret_bytes())
    return pack_ring(sa.self_mask_of(plan, j, secret), plan.ring_bits)


@pytest.mark.parametrize("self_mask", ["seed", "vector"])
def test_a_split_lie_does_not_recover_the_update(tmp_path, self_mask):
    """Half of the peers told 0 survived, half told 0 dropped, and 0 asked to reveal its masks with the
    first half: 0 refuses (too few survivors), the server has 3 < t shares of b_0, and its best
    guess at q_0 is wrong."""
    n, j = 7, 0
    _, plan, keys, deltas, uploads = _round(tmp_path, n, secure_self_mask=self_mask)
    survived, dropped_half = [1, 2, 3], [4, 5, 6]
    shares, masks = {}, {}
    for k in survived:  # S = {0, 1, 2, 3, 4}: 5 = t + 1 survivors, so k answers
        S, D = [0, 1, 2, 3, 4], [5, 6]
        reply = _answer(plan, keys, k, S, D, {x: uploads[x].shares[k] for x in S if x != k})
        shares[k + 1] = reply.share_of(plan, j)
    for k in dropped_half:
        S, D = [1, 2, 3, 4, 5, 6], [0]
        reply = _answer(plan, keys, k, S, D, {})
        masks[k] = reply.masks
    with pytest.raises(sa.SecAggError):  # fewer than t of its peers survive
        _answer(plan, keys, j, [0, 4, 5, 6], [1, 2, 3], {})
    assert len(shares) == 3 < plan.threshold_of(0)
    # the best the server can do: treat 3 shares as enough and skip the pair masks it lacks
    z = _unmasked_by_pair_masks(plan, uploads[j].blob, j, masks)
    try:
        add_packed(z, _rebuilt_self_mask(plan, j, shares, 3), plan.ring_bits, subtract=True)
    except ValueError:
        pass  # the "rebuilt" mask is not even a packed ring vector
    assert not np.array_equal(z, _codes(plan, deltas[j], j))
    # control: with a 4th share and ALL pair masks (which no honest client set hands out) q_0 would come out
    full = _answer(plan, keys, 4, list(range(n)), [], {x: uploads[x].shares[4] for x in range(n) if x != 4})
    shares[5] = full.share_of(plan, j)
    b0 = _rebuilt_self_mask(plan, j, shares, plan.threshold_of(0))
    every_mask = {k: sa.reveal_masks(plan, j, keys[j], [k]) for k in range(1, n)}
    z = _unmasked_by_pair_masks(plan, uploads[j].blob, j, every_mask)
    add_packed(z, b0, plan.ring_bits, subtract=True)
    assert np.array_equal(z, _codes(plan, deltas[j], j))


# --------------------------------------------------------------------------- tampering


@pytest.mark.parametrize("part", ["cipher", "tag"])
def test_a_tampered_share_is_caught_by_its_recipient(tmp_path, part):
    n = 5
    _, plan, keys, _, uploads = _round(tmp_path, n)
    sealed = uploads[2].shares[0]
    flipped = bytearray(getattr(sealed, part))
    flipped[len(flipped) // 2] ^= 0x04
    bad = sa.SealedShare(bytes(flipped), sealed.tag) if part == "cipher" else sa.SealedShare(sealed.cipher, bytes(flipped))
    material = sa.pair_material(plan, 0, 2, keys[0][2])
    with pytest.raises(sa.SecAggError) as err:
        sa.open_share(plan, 0, 2, material, bad)
    assert err.value.reason is SecAggReason.BAD_MAC
    shares = {k: uploads[k].shares[0] for k in range(1, n)}
    shares[2] = bad
    reply = _answer(plan, keys, 0, list(range(n)), [], shares)
    assert reply.share_from == (1, 3, 4) and reply.rejected == (2,)
    # a share addressed to another client (or another round) fails too
    with pytest.raises(sa.SecAggError) as err:
        sa.open_share(plan, 0, 2, material, uploads[2].shares[1])
    assert err.value.reason is SecAggReason.BAD_MAC


def test_the_self_mask_form_travels_with_the_plan_and_an_unknown_one_is_refused():
    plan = _plan(5, secure_self_mask="vector")
    assert sa.RoundPlan.from_config(plan.to_config()).self_mask == "vector"
    values = {**_plan(5).to_config(), "self-mask": "zeros"}
    with pytest.raises(sa.SecAggError) as err:
        sa.RoundPlan.from_config(values)
    assert err.value.reason is SecAggReason.BAD_PLAN


def test_different_seeds_give_different_self_masks_spread_over_the_ring():
    plan = _plan(3)
    a, b = (sa.self_mask_of(plan, 0, os.urandom(32)) for _ in range(2))
    assert not np.array_equal(a, b) and a.size == plan.elements()
    assert len(np.unique(a)) > 0.9 * min(a.size, 1 << plan.ring_bits)
