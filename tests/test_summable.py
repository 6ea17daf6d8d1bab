"""Masked sums use each codec's own ring form (``Codec.encode_ring``), never a codec's name.

Proves by test: a masked round with codec=qsgd encodes through QsgdCodec's own
quantizer (spied, with the shared clip as its scale); parameters a ring form
would ignore (qsgd's bucket, an entropy stage, error feedback) are refused at
the config check and in a plan, naming the parameter; for every summable codec
the sum of ring encodings decodes to the sum of the inputs within n·Δ; and each
ring encoding is unbiased within the clip bound.
"""

import os

import numpy as np
import pytest

from qfl.compression import make_codec, make_summable_codec
from qfl.compression.quantizers import QsgdCodec
from qfl.compression.summable import decode_grid_sum, ring_bits
from qfl.config import ConfigError, resolve_config
from qfl.errors import SecAggReason
from qfl.security import secagg as sa
from qfl.server.preflight import check_components

SHAPES = {"w": (6, 20), "b": (5,)}
CLIPS = {"w": 0.3, "b": 0.1}

SUMMABLE = [
    ("fp32", {}),
    ("qsgd", {"bits": 1}),
    ("qsgd", {"bits": 4}),
    ("qsgd", {"bits": 8}),
    ("ternary", {}),
    ("randk", {"ratio": 0.25}),
    ("randk", {"ratio": 0.25, "bits": 8}),
]


def _pair_keys(plan):
    """One random key per pair, held by both ends (what take/fetch_pair_keys hand out)."""
    keys = {i: {} for i in plan.participants}
    for i in plan.participants:
        for j in plan.participants:
            if i < j:
                keys[i][j] = keys[j][i] = os.urandom(plan.pair_key_bytes())
    return keys


def _open(plan, keys, uploads):
    requests = sa.unmask_requests(plan, {i: u.shares for i, u in uploads.items()}, [])
    replies = {}
    for j, request in requests.items():
        answer = sa.answer_unmask(plan, j, keys[j], sa.UnmaskRequest.from_config(plan, request.to_config()))
        replies[j] = sa.UnmaskReply.decode(plan, j, answer.body(), request.survivors, request.dropped)
    return sa.unmask_sum(plan, {i: u.blob for i, u in uploads.items()}, replies, [])


def test_masked_qsgd_round_encodes_through_the_qsgd_quantizer(monkeypatch):
    n = 4
    cfg = resolve_config({"security": "masked-sum", "codec": "qsgd", "codec.bits": 3, "clients": n})
    plan = sa.RoundPlan.from_config(sa.make_plan(cfg, 2, list(range(n)), SHAPES, CLIPS, round_seed=7).to_config())
    assert isinstance(plan.codec, QsgdCodec) and plan.codec.bits == 3
    assert plan.ring_bits == ring_bits(7, n) == 5
    rounds, scales = [], []
    ring_round, quantize_into = QsgdCodec.ring_round, QsgdCodec.quantize_into

    def spy_round(self, values, clip, rng):
        rounds.append(clip)
        return ring_round(self, values, clip, rng)

    def spy_quantize(self, flat, out, rng=None, scale=None):
        scales.append(scale)
        return quantize_into(self, flat, out, rng, scale)

    monkeypatch.setattr(QsgdCodec, "ring_round", spy_round)
    monkeypatch.setattr(QsgdCodec, "quantize_into", spy_quantize)
    rng = np.random.default_rng(0)
    deltas = {i: {k: rng.normal(0, 0.05, s).astype(np.float32) for k, s in SHAPES.items()} for i in range(n)}
    keys = _pair_keys(plan)
    uploads = {i: sa.masked_upload(plan, i, deltas[i], keys[i], np.random.default_rng(10 + i)) for i in range(n)}
    assert rounds == [CLIPS["w"], CLIPS["b"]] * n
    assert scales == [np.float32(CLIPS["w"]), np.float32(CLIPS["b"])] * n  # QSGD's grid with m = C
    result = _open(plan, keys, uploads)
    codes = {name: np.zeros(int(np.prod(shape)), np.uint64) for name, shape in SHAPES.items()}
    for i in range(n):  # replay each client's draws, tensor by tensor in plan order
        rng = np.random.default_rng(10 + i)
        for name in plan.tensors:
            codes[name] += plan.codec.encode_ring(deltas[i][name], CLIPS[name], plan.seed(name), rng)[0]
    for name in SHAPES:  # the sum of qsgd's own codes, unmasked exactly
        expected = plan.codec.decode_ring_sum(codes[name], CLIPS[name], n, plan.seed(name), SHAPES[name])
        assert np.array_equal(result.total[name], expected)


@pytest.mark.parametrize("values,named", [
    ({"codec": "qsgd", "codec.bucket": 64}, "codec.bucket"),
    ({"codec": "qsgd", "codec.entropy": "zstd"}, "codec.entropy"),
    ({"codec": "fp32", "codec.entropy": "zlib"}, "codec.entropy"),
    ({"codec": "ternary", "codec.feedback": True}, "codec.feedback"),
    ({"codec": "randk", "codec.feedback": True}, "codec.feedback"),
])
@pytest.mark.parametrize("mode", ["masked-sum", "expanded"])
def test_parameters_without_a_ring_form_are_refused_by_name(values, named, mode):
    cfg = resolve_config({"security": mode, "clients": 4, **values})
    with pytest.raises(ConfigError) as err:
        check_components(cfg)
    assert err.value.key == "codec" and named in str(err.value)  # the message names the parameter to remove
    check_components(resolve_config({"security": "channel-pad", "clients": 4, **values}))  # any codec there


def test_a_clip_bound_outside_the_ring_range_is_refused():
    with pytest.raises(ConfigError) as err:
        check_components(resolve_config({"security": "masked-sum", "codec": "qsgd", "secure_clip": 1e-40}))
    assert err.value.key == "secure_clip"
    with pytest.raises(ValueError):  # outside float32's normal range
        make_summable_codec("ternary").encode_ring(np.ones(3), 1e-40, 0, np.random.default_rng(0))


def test_a_plan_with_a_parameter_without_a_ring_form_is_refused():
    cfg = resolve_config({"security": "masked-sum", "codec": "qsgd", "clients": 3})
    plan = sa.make_plan(cfg, 1, [0, 1, 2], SHAPES, CLIPS, round_seed=1).to_config()
    assert sa.RoundPlan.from_config(plan).codec_params == ()
    with pytest.raises(sa.SecAggError) as err:
        sa.RoundPlan.from_config({**plan, "codec-params": '{"bucket": 16}'})
    assert err.value.reason is SecAggReason.UNSUMMABLE_CODEC
    with pytest.raises(sa.SecAggError) as err:
        sa.RoundPlan.from_config({**plan, "codec": "topk"})  # does not commute with sum
    assert err.value.reason is SecAggReason.UNSUMMABLE_CODEC
    with pytest.raises(ValueError):  # codec.bucket has no ring form
        bucketed = resolve_config({"security": "masked-sum", "codec": "qsgd", "codec.bucket": 16, "clients": 3})
        sa.make_plan(bucketed, 1, [0, 1, 2], SHAPES, CLIPS, round_seed=1)


def test_codecs_without_a_ring_form_refuse_it():
    with pytest.raises(ValueError):
        make_codec("sign").encode_ring(np.zeros(3), 1.0, 0, np.random.default_rng(0))
    with pytest.raises(ValueError):
        make_summable_codec("powersgd")


def _decoded_inputs(codec, x, seed):
    """What the ring form encodes, dense: x itself, or rand-k's x[support]·d/k on the support."""
    support = codec.ring_support(seed, x.size)
    if support is None:
        return x.astype(np.float64)
    out = np.zeros(x.size)
    out[support] = codec.ring_values(x.reshape(-1).astype(np.float64), seed)
    return out.reshape(x.shape)


@pytest.mark.parametrize("name,params", SUMMABLE)
def test_the_sum_of_ring_encodings_decodes_to_the_sum_of_inputs(name, params):
    """Each client's code is a grid neighbour of its value, so |Σ decoded − Σ x| ≤ n·Δ, Δ = 2C/s."""
    codec, n, seed, shape = make_summable_codec(name, params), 7, 3, (9, 40)
    s = codec.ring_levels()
    rng = np.random.default_rng(1)
    xs = [rng.uniform(-0.1, 0.1, shape).astype(np.float32) for _ in range(n)]
    clip = 0.1 * shape[0] * shape[1] / codec.ring_coords(seed, xs[0].size)  # rand-k's d/k scaling stays inside C
    codes = [codec.encode_ring(x, clip, seed, np.random.default_rng(100 + i)) for i, x in enumerate(xs)]
    assert all(c[0].dtype == np.uint64 and c[0].max() <= s and (c[1], c[2]) == (0, 0) for c in codes)  # flags
    total = codec.decode_ring_sum(sum(c[0] for c in codes), clip, n, seed, shape)
    expected = sum(_decoded_inputs(codec, x, seed) for x in xs)
    assert total.shape == shape
    assert np.abs(total - expected).max() <= n * 2 * clip / s * (1 + 1e-5) + n * clip * 2**-20


@pytest.mark.parametrize("name,params", SUMMABLE)
def test_ring_encoding_is_unbiased_within_the_clip_bound(name, params):
    """E[decode(encode_ring(x))] = x for |x| ≤ C: the mean of R draws is within 6 standard errors
    (Var ≤ Δ²/4 per draw) plus the float32 slack of the codecs that round in float32."""
    codec, seed, reps, clip = make_summable_codec(name, params), 5, 1500, 0.5
    x = np.linspace(-0.12, 0.12, 48).astype(np.float32)
    target = _decoded_inputs(codec, x, seed)
    assert np.abs(target).max() <= clip
    est = np.mean([
        codec.decode_ring_sum(codec.encode_ring(x, clip, seed, np.random.default_rng(r))[0], clip, 1, seed, x.shape)
        for r in range(reps)
    ], axis=0)
    step = 2 * clip / codec.ring_levels()
    assert np.abs(est - target).max() <= 6 * step / 2 / np.sqrt(reps) + step * 2**-15 + clip * 2**-20


def test_grid_sum_decoding():
    assert np.allclose(decode_grid_sum(np.array([0, 3, 6], np.uint64), 1.0, 3, 2), [-2.0, 0.0, 2.0])
