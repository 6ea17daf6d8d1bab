"""STC (top-k support, one magnitude, sign bits) and DGC's options of the error-feedback wrapper."""

from __future__ import annotations

import hashlib
import math
import struct

import numpy as np
import pytest

from qfl.compression import EncodeContext, make_codec
from qfl.compression.codec import CodecError
from qfl.compression.feedback import MOMENTUM, RESIDUAL, STEPS, DgcOptions, ErrorFeedback, warmup_ratio
from qfl.compression.sparsify import STCCodec, TopKCodec, support_size, top_k_positions
from qfl.compression.wire import pack_header


def _x(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("shape, ratio", [((), 0.5), ((1,), 1.0), ((17,), 0.2), ((40, 50), 0.01), ((3, 5, 7), 0.1)])
def test_stc_keeps_the_top_k_as_plus_minus_the_mean_magnitude(shape, ratio):
    x = _x(shape)
    codec = STCCodec(ratio)
    y = codec.decode(codec.encode(x))
    flat, out = x.reshape(-1), y.reshape(-1)
    k = support_size(ratio, flat.size)
    idx = top_k_positions(flat, k)
    mu = np.float32(np.abs(flat[idx].astype(np.float64)).mean())
    expected = np.zeros_like(flat)
    expected[idx] = np.where(flat[idx] < 0, -mu, mu)
    assert y.shape == x.shape and y.dtype == np.float32
    assert np.array_equal(out, expected)
    # ||x − C(x)||² = ||x||² − k·μ² (module docstring), up to float32 rounding
    err = float(np.sum((flat.astype(np.float64) - out) ** 2))
    assert math.isclose(err, float(np.sum(flat.astype(np.float64) ** 2)) - k * float(mu) ** 2, rel_tol=1e-5, abs_tol=1e-5)


def test_stc_costs_one_bit_per_kept_value_besides_the_rice_positions():
    x = _x((64, 600), seed=3)
    payload = STCCodec(0.01).encode(x)
    k = support_size(0.01, x.size)
    topk_fp16 = TopKCodec(0.01).encode(x)
    # topk sends 16 bits per value where stc sends 1, plus a 4-byte magnitude
    assert len(topk_fp16) - len(payload) == 2 * k - 4 - (k + 7) // 8
    assert 8 * len(payload) / x.size < 0.1


STC_PINNED = "7ad2b4f07f0d0972"  # pinned when stc was added (wire layout in STCCodec)


def test_stc_payload_bytes_are_pinned():
    xs = [_x((40, 50), 1), _x((257,), 2), _x((), 3), np.zeros(9, np.float32)]
    h = hashlib.sha256()
    for x in xs:
        h.update(STCCodec(0.03).encode(x))
    assert h.hexdigest()[:16] == STC_PINNED


def _body(payload: bytes, ndim: int) -> int:
    return 6 + 4 * ndim


@pytest.mark.parametrize(
    "mutate",
    [
        lambda p, h: p[:-1],  # sign bytes truncated
        lambda p, h: p + b"\0",  # a byte too many
        lambda p, h: p[:h] + struct.pack("<I", 10**6) + p[h + 4 :],  # k > d
        lambda p, h: p[:h] + struct.pack("<I", 0) + p[h + 4 :],  # k = 0 of a non-empty tensor
        lambda p, h: p[:h + 4] + bytes([64]) + p[h + 5 :],  # Rice parameter > 63
        lambda p, h: p[:-1] + bytes([p[-1] | 0x80]),  # a padding sign bit set (k % 8 != 0)
        lambda p, h: p[: h + 6],  # inside the fields
    ],
)
def test_stc_decoder_rejects_hostile_payloads_with_codec_error(mutate):
    x = _x((13, 7))  # k = ceil(0.05·91) = 5: three padding bits in the sign byte
    codec = STCCodec(0.05)
    payload = codec.encode(x)
    bad = mutate(payload, _body(payload, 2))
    with pytest.raises(CodecError):
        codec.decode_as(bad, x.shape)


def test_stc_positions_past_the_end_are_rejected():
    codec = STCCodec(1.0)
    x = _x((4,))
    good = codec.encode(x)
    header = pack_header(codec.codec_id, np.dtype("<f4"), (4,))
    # k = 4, b = 0, gaps 0,0,0,5 (unary: 1,1,1,000001) → the last index is 8 ≥ d
    bad = header + struct.pack("<IBf", 4, 0, 1.0) + bytes([0b11100000, 0b10000000]) + bytes([0])
    with pytest.raises(CodecError):
        codec.decode(bad)
    assert codec.decode(good).shape == (4,)


def test_stc_is_registered_with_error_feedback_and_fuzzed():
    from qfl.benchmarks.fuzz_decoders import targets

    codec = make_codec("stc", {"ratio": 0.1})
    assert isinstance(codec, ErrorFeedback) and isinstance(codec.inner, STCCodec)
    assert not make_codec("stc", {"feedback": False}).traits.stateful
    assert any(t.name == "stc" for t in targets())


# --------------------------------------------------------------------------- DGC options


def test_every_option_off_is_plain_error_feedback_byte_for_byte():
    plain, dgc = make_codec("topk", {"ratio": 0.05}), ErrorFeedback(TopKCodec(0.05), DgcOptions())
    a, b = EncodeContext(), EncodeContext()
    for t in range(5):
        x = _x((30, 20), t)
        assert plain.encode(x, a) == dgc.encode(x, b)
    assert np.array_equal(a.state[RESIDUAL], b.state[RESIDUAL])


@pytest.mark.parametrize("masking", [False, True])
def test_momentum_correction_conserves_what_the_momentum_adds(masking):
    m = 0.9
    codec = make_codec("stc", {"ratio": 0.05, "momentum": m, "momentum_masking": masking})
    ctx = EncodeContext()
    sent = np.zeros((30, 20))
    pushed = np.zeros((30, 20))  # Σ_t u_t
    u = np.zeros((30, 20))
    for t in range(12):
        x = _x((30, 20), t)
        before = ctx.state.get(MOMENTUM)
        u = x.astype(np.float64) + (m * before if before is not None else 0.0)
        pushed += u
        decoded = codec.decode(codec.encode(x, ctx))
        sent += decoded
        if masking:
            assert np.all(ctx.state[MOMENTUM][decoded != 0] == 0.0)
            assert np.array_equal(ctx.state[MOMENTUM][decoded == 0], u[decoded == 0])
        else:
            assert np.array_equal(ctx.state[MOMENTUM], u)
    assert np.allclose(sent + ctx.state[RESIDUAL], pushed, rtol=0, atol=1e-9)


def test_local_clipping_bounds_the_norm_of_what_enters_the_residual():
    codec = make_codec("topk", {"ratio": 1.0, "values": "fp32", "clip": 2.0})
    ctx = EncodeContext()
    x = 10 * _x((50,))
    y = codec.decode(codec.encode(x, ctx)).astype(np.float64) + ctx.state[RESIDUAL]
    assert math.isclose(float(np.linalg.norm(y)), 2.0, rel_tol=1e-6)
    small = 1e-3 * _x((50,))
    codec2, ctx2 = make_codec("topk", {"ratio": 1.0, "values": "fp32", "clip": 2.0}), EncodeContext()
    assert np.array_equal(codec2.decode(codec2.encode(small, ctx2)), small)


def test_sparsity_warm_up_falls_exponentially_to_the_codec_ratio():
    assert warmup_ratio(0.01, 0.25, 4, 0) == 0.25
    assert math.isclose(warmup_ratio(0.01, 0.25, 4, 2), math.sqrt(0.25 * 0.01))
    assert warmup_ratio(0.01, 0.25, 4, 4) == 0.01 == warmup_ratio(0.01, 0.25, 4, 99)
    codec = make_codec("stc", {"ratio": 0.01, "warmup_rounds": 4, "warmup_start": 0.25})
    ctx = EncodeContext()
    x = _x((100, 100))
    kept = [np.count_nonzero(codec.decode(codec.encode(x, ctx))) for _ in range(6)]
    expected = [support_size(warmup_ratio(0.01, 0.25, 4, t), x.size) for t in range(6)]
    assert kept == expected and kept[0] == 2500 and kept[-1] == 100
    assert int(ctx.state[STEPS][0]) == 6


@pytest.mark.parametrize(
    "name, params",
    [
        ("topk", {"momentum": 1.0}),
        ("topk", {"clip": -1.0}),
        ("topk", {"momentum_masking": True}),
        ("topk", {"warmup_rounds": -1}),
        ("topk", {"warmup_rounds": 2, "warmup_start": 0.0}),
        ("sign", {"warmup_rounds": 3}),  # no kept ratio to warm up
        ("qsgd", {"momentum": 0.9}),  # feedback off for qsgd
        ("stc", {"momentum": "lots"}),
    ],
)
def test_bad_dgc_options_are_refused_by_the_registry(name, params):
    with pytest.raises(ValueError):
        make_codec(name, params)


def test_bad_dgc_options_are_a_config_error_before_a_run():
    from qfl.config import build_config
    from qfl.errors import ConfigError
    from qfl.server.preflight import preflight

    cfg = build_config(overrides=["codec=stc", "codec.momentum=1.5", "security=none"])
    with pytest.raises(ConfigError) as err:
        preflight(cfg)
    assert err.value.key == "codec"
