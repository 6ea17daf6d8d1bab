"""The secure-aggregation protocol on a real key store, without Flower.

Proves by test: the masked sum equals the plaintext sum of the codes bit for
bit, with double and single masking (with up to 30% dropouts recovered), codecs that do not commute with sum
are refused by name, sealed uploads reject tampering and replay, the channel
pad round-trips, and no key bit is handed out twice (the store's ledger).
"""

import itertools
import os

import numpy as np
import pytest
from scipy import stats

from qfl.compression import make_summable_codec
from qfl.compression.summable import adapt_clip
from qfl.config import ConfigError, resolve_config
from qfl.errors import SecAggReason, UnknownKeyId
from qfl.security import secagg as sa
from qfl.security.keys.store import KeyStore
from qfl.server.preflight import check_components

SHAPES = {"w": (12, 30), "b": (9,)}


def _store(tmp_path, n, bits=600_000):
    store = KeyStore(tmp_path / "keys.db")
    for a, b in itertools.combinations(sa.network_nodes(n), 2):
        store.add_link(a, b)
        store.deposit(a, b, os.urandom(bits // 8))
    return store


def _keys(store, plan):
    """Setup (masters take) and fetch (slaves by id), as the round does."""
    taken = {i: sa.take_pair_keys(store, plan, i) for i in plan.participants}
    keys = {i: {j: c.key for j, c in taken[i].items()} for i in plan.participants}
    for j in plan.participants:
        ids = {i: taken[i][j].key_id for i in plan.participants if i < j}
        keys[j].update(sa.fetch_pair_keys(store, j, ids))
    return keys


def open_round(plan, keys, uploads, dropped):
    """The server's unmask stage in memory: requests to the survivors, their answers (through the wire
    forms), then the sum. ``uploads`` are the survivors' MaskedUploads."""
    requests = sa.unmask_requests(plan, {i: u.shares for i, u in uploads.items()}, dropped)
    replies = {}
    for j, request in requests.items():
        answer = sa.answer_unmask(plan, j, keys[j], sa.UnmaskRequest.from_config(plan, request.to_config()))
        replies[j] = sa.UnmaskReply.decode(plan, j, answer.body(), request.survivors, request.dropped)
    return sa.unmask_sum(plan, {i: u.blob for i, u in uploads.items()}, replies, dropped)


def _deltas(n, seed=0):
    rng = np.random.default_rng(seed)
    return {i: {k: rng.normal(0, 0.2, s).astype(np.float32) for k, s in SHAPES.items()} for i in range(n)}


CODECS = [
    ("fp32", {}),
    ("qsgd", {"codec.bits": 4}),
    ("qsgd", {"codec.bits": 1}),
    ("ternary", {}),
    ("randk", {"codec.ratio": 0.2}),
    ("randk", {"codec.ratio": 0.3, "codec.bits": 8}),
    ("expanded-fp32", {}),
    ("expanded-qsgd", {"codec.bits": 8}),
]


@pytest.mark.parametrize("masking", ["double", "single"])
@pytest.mark.parametrize("codec,params", CODECS)
@pytest.mark.parametrize("n,dropped", [(2, []), (5, []), (10, [2, 5, 9])])
def test_masked_sum_equals_plaintext_sum_bit_for_bit(tmp_path, codec, params, n, dropped, masking):
    mode = "masked-sum"
    if codec.startswith("expanded-"):
        mode, codec = "expanded", codec.removeprefix("expanded-")
    cfg = resolve_config({"security": mode, "codec": codec, "clients": n, "secure_masking": masking, **params})
    store = _store(tmp_path, n)
    plan = sa.make_plan(cfg, 4, list(range(n)), SHAPES, {"w": 0.3, "b": 0.1}, round_seed=99)
    keys = _keys(store, plan)
    deltas = _deltas(n)
    uploads = {i: sa.masked_upload(plan, i, deltas[i], keys[i], np.random.default_rng(i)) for i in range(n)}
    survivors = {i: uploads[i] for i in range(n) if i not in dropped}
    assert all(bool(u.shares) == (masking == "double") for u in uploads.values())
    result = open_round(plan, keys, survivors, dropped)
    # plaintext: the same codes (same rounding noise), summed without masks
    for name, clip in zip(plan.tensors, plan.clips):
        codes = {}
        for i in survivors:
            rng = np.random.default_rng(i)
            for t, c in zip(plan.tensors, plan.clips):  # replay the per-tensor draws in order
                out = plan.codec.encode_ring(deltas[i][t], c, plan.seed(t), rng)
                if t == name:
                    codes[i] = out
        code_sum = sum(c[0] for c in codes.values())
        expected = plan.codec.decode_ring_sum(code_sum, clip, len(survivors), plan.seed(name), SHAPES[name])
        assert np.array_equal(result.total[name], expected)
        assert result.over[name] == sum(c[1] for c in codes.values())
        assert result.under[name] == sum(c[2] for c in codes.values())
    assert result.clients == len(survivors)
    assert store.verify() == []


def test_fp32_masked_sum_is_close_to_the_float_sum(tmp_path):
    n = 4
    cfg = resolve_config({"security": "masked-sum", "codec": "fp32", "clients": n})
    store = _store(tmp_path, n)
    plan = sa.make_plan(cfg, 1, list(range(n)), SHAPES, {"w": 1.0, "b": 1.0}, round_seed=1)
    keys = _keys(store, plan)
    deltas = _deltas(n)
    uploads = {i: sa.masked_upload(plan, i, deltas[i], keys[i], np.random.default_rng(i)) for i in range(n)}
    result = open_round(plan, keys, uploads, [])
    for name in SHAPES:
        true = sum(deltas[i][name].astype(np.float64) for i in range(n))
        assert np.abs(result.total[name] - true).max() <= n * 2.0 / (2**32 - 1) * 1.01  # n grid steps
    # 32-bit codes, n = 4: B = bit_length(4 · (2^32 − 1)) = 34
    assert plan.ring_bits == 34


@pytest.mark.parametrize("codec,params,levels,ring", [
    ("qsgd", {"codec.bits": 4}, 15, 9),  # 20 clients: B = bit_length(20·15) = 9
    ("ternary", {}, 2, 6),
    ("fp32", {}, 2**32 - 1, 37),
    ("randk", {"codec.ratio": 0.25, "codec.bits": 8}, 255, 13),
])
def test_the_ring_is_as_small_as_the_codes_allow(codec, params, levels, ring):
    cfg = resolve_config({"security": "masked-sum", "codec": codec, "clients": 20, **params})
    plan = sa.make_plan(cfg, 1, list(range(20)), SHAPES, {"w": 0.3, "b": 0.1}, round_seed=1)
    assert plan.codec.ring_levels() == levels and plan.ring_bits == ring


def test_randk_masked_sum_is_unbiased():
    codec = make_summable_codec("randk", {"ratio": 0.25})
    x = np.random.default_rng(0).normal(0, 0.1, 400)
    seeds = range(400)
    est = np.mean([
        codec.decode_ring_sum(codec.encode_ring(x, 2.0, s, np.random.default_rng(s))[0], 2.0, 1, s, x.shape)
        for s in seeds
    ], axis=0)
    # rand-k variance per coordinate: (d/k − 1)·x² → standard error sqrt(3·x²/400)
    assert (np.abs(est - x) < 6 * np.sqrt(3 * x**2 / 400) + 1e-6).all()


@pytest.mark.parametrize("codec", ["topk", "sign", "powersgd", "fp16", "bf16"])
def test_masked_sum_refuses_codecs_that_do_not_commute(codec):
    with pytest.raises(ConfigError) as err:
        check_components(resolve_config({"security": "masked-sum", "codec": codec}))
    assert err.value.key == "codec" and "channel-pad" in str(err.value)  # the message names the fix
    check_components(resolve_config({"security": "channel-pad", "codec": codec}))  # any codec works with the channel pad


def test_a_masked_upload_is_uniform_and_independent_of_the_data(tmp_path):
    """Chi-square: the bytes of masked uploads are uniform; two very different updates give
    upload distributions a two-sample test cannot tell apart."""
    n = 3
    cfg = resolve_config({"security": "masked-sum", "codec": "randk", "codec.ratio": 0.5, "clients": n})
    shapes = {"w": (256,)}
    store = KeyStore(tmp_path / "keys.db")
    for a, b in itertools.combinations(sa.network_nodes(n), 2):
        store.add_link(a, b)
        store.deposit(a, b, os.urandom(200_000))
    zeros = {"w": np.zeros(256, np.float32)}
    spikes = {"w": np.full(256, 0.9, np.float32)}
    samples = {0: [], 1: []}
    for r in range(60):
        plan = sa.make_plan(cfg, r, list(range(n)), shapes, {"w": 1.0}, round_seed=r)
        keys = _keys(store, plan)
        for which, delta in ((0, zeros), (1, spikes)):
            blob = sa.masked_upload(plan, 1, delta, keys[1], np.random.default_rng(r)).blob
            samples[which].append(np.frombuffer(blob, np.uint8))
    a, b = np.concatenate(samples[0]), np.concatenate(samples[1])
    # the last byte of each upload holds zero padding bits: test the full bytes only
    full = len(samples[0][0]) - 1
    a = np.concatenate([s[:full] for s in samples[0]])
    b = np.concatenate([s[:full] for s in samples[1]])
    for data in (a, b):
        assert stats.chisquare(np.bincount(data, minlength=256)).pvalue > 1e-4
    table = np.vstack([np.bincount(a, minlength=256), np.bincount(b, minlength=256)])
    assert stats.chi2_contingency(table).pvalue > 1e-4
    assert store.verify() == []


def test_seal_rejects_tampering_and_replay(tmp_path):
    store = _store(tmp_path, 2, bits=8_000)
    body = b"masked upload bytes"
    key_id, tag = sa.seal(store, 1, "masked-sum", "upload", 7, body)
    tampered = bytearray(body)
    tampered[3] ^= 1
    with pytest.raises(sa.SecAggError) as err:
        sa.open_seal(store, 1, "masked-sum", "upload", 7, bytes(tampered), key_id, tag)
    assert err.value.reason is SecAggReason.BAD_MAC
    key_id, tag = sa.seal(store, 1, "masked-sum", "upload", 7, body)
    with pytest.raises(sa.SecAggError) as err:  # right bytes, wrong round
        sa.open_seal(store, 1, "masked-sum", "upload", 8, body, key_id, tag)
    assert err.value.reason is SecAggReason.BAD_MAC
    key_id, tag = sa.seal(store, 1, "masked-sum", "upload", 7, body)
    sa.open_seal(store, 1, "masked-sum", "upload", 7, body, key_id, tag)
    with pytest.raises(UnknownKeyId) as err:  # the same message again
        sa.open_seal(store, 1, "masked-sum", "upload", 7, body, key_id, tag)
    assert err.value.reason is SecAggReason.REPLAYED
    with pytest.raises(UnknownKeyId):  # a key id that never existed
        sa.open_seal(store, 1, "masked-sum", "upload", 7, body, "not-a-key", tag)


def test_channel_pad_round_trip_and_tampering(tmp_path):
    store = _store(tmp_path, 2, bits=80_000)
    payload = os.urandom(3000)
    cipher, key_id, tag = sa.pad_and_seal(store, 0, 3, payload)
    assert cipher != payload and len(cipher) == len(payload)
    assert sa.open_pad(store, 0, 3, cipher, key_id, tag) == payload
    cipher, key_id, tag = sa.pad_and_seal(store, 0, 3, payload)
    bad = bytearray(cipher)
    bad[-1] ^= 0x80
    with pytest.raises(sa.SecAggError) as err:
        sa.open_pad(store, 0, 3, bytes(bad), key_id, tag)
    assert err.value.reason is SecAggReason.BAD_MAC
    # the pad and the tag key cost 8·(16 + len) bits on client-0~server, nothing else
    used = {e.length for e in store.ledger("client-0~server")}
    assert used == {8 * (16 + 3000)}


def test_round_plan_survives_the_config_record():
    cfg = resolve_config({"security": "masked-sum", "codec": "randk", "codec.ratio": 0.1, "clients": 3})
    plan = sa.make_plan(cfg, 2, [2, 0, 1], SHAPES, {"w": 0.3, "b": 0.25}, round_seed=2**63 + 5)
    assert sa.RoundPlan.from_config(plan.to_config()) == plan
    with pytest.raises(sa.SecAggError) as err:
        sa.RoundPlan.from_config({"round": 1})
    assert err.value.reason is SecAggReason.MALFORMED
    # the threshold never goes below a strict majority of the peers, whatever the plan says
    hostile = {**plan.to_config(), "threshold": -5, "participants": list(range(7)), "graph-of": list(range(7))}
    with pytest.raises(sa.SecAggError) as err:
        sa.RoundPlan.from_config(hostile)  # a negative threshold
    assert err.value.reason is SecAggReason.BAD_PLAN
    assert sa.RoundPlan.from_config({**hostile, "threshold": 1}).threshold_of(0) == 4
    with pytest.raises(sa.SecAggError):  # t = 7 > the 6 peers each client has
        sa.RoundPlan.from_config({**hostile, "threshold": 7})
    with pytest.raises(sa.SecAggError):  # participants outside the graph the plan was drawn over
        sa.RoundPlan.from_config({**hostile, "threshold": 1, "graph-of": [0, 1, 2]})


def test_clip_adapts_to_the_summed_flags():
    assert adapt_clip(0.5, over=1, under=0, n_clients=4) == 1.0
    assert adapt_clip(0.5, over=0, under=4, n_clients=4) == 0.25
    assert adapt_clip(0.5, over=0, under=3, n_clients=4) == 0.5
