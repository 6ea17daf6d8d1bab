"""Rice coding, top-k, rand-k, PowerSGD and the entropy stage."""

import hashlib
import math
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qfl.compression import CodecError, EncodeContext, make_codec
from qfl.compression.entropy import EntropyCodec, max_inner_payload
from qfl.compression.golomb import best_rice_parameter, rice_bits, rice_decode, rice_encode
from qfl.compression.identity import Fp32Codec
from qfl.compression.lowrank import PowerSGDCodec
from qfl.compression.sparsify import RandKCodec, TopKCodec, randk_support, support_size
from qfl.compression.wire import pack_header
from qfl.errors import CodecReason

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
U64 = (1 << 64) - 1


def _normal(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# --------------------------------------------------------------------------- Rice


@FAST
@given(st.lists(st.integers(0, U64), max_size=200), st.data())
def test_rice_round_trip(values, data):
    v = np.array(values, dtype=np.uint64)
    k_best = best_rice_parameter(v)
    # any k large enough that the unary part stays small
    k_min = max(0, int(v.max()).bit_length() - 10) if v.size else 0
    for k in {k_best, data.draw(st.integers(k_min, 63))}:
        coded = rice_encode(v, k)
        assert len(coded) == math.ceil(rice_bits(v, k) / 8)
        out = rice_decode(coded, k, v.size)
        assert out.dtype == np.uint64 and np.array_equal(out, v)


@FAST
@given(st.floats(1.5, 5000.0), st.integers(1, 400), st.integers(0, 2**32))
def test_best_rice_parameter_on_geometric_gaps(mean, n, seed):
    gaps = np.random.default_rng(seed).geometric(1.0 / (mean + 1.0), n).astype(np.int64) - 1
    k = best_rice_parameter(gaps)
    assert abs(k - math.log2(max(gaps.mean(), 1e-9) * math.log(2))) <= 2.5 or gaps.mean() < 2
    assert np.array_equal(rice_decode(rice_encode(gaps, k), k, n), gaps)
    # best_rice_parameter is at least as good as its neighbours
    for other in (k - 1, k + 1):
        if 0 <= other <= 63:
            assert rice_bits(gaps, k) <= rice_bits(gaps, other)


def test_rice_edge_cases():
    empty = np.zeros(0, dtype=np.uint64)
    assert rice_encode(empty, 5) == b"" and best_rice_parameter(empty) == 0
    assert rice_decode(b"", 5, 0).size == 0
    zeros = np.zeros(13, dtype=np.int64)
    assert best_rice_parameter(zeros) == 0
    assert rice_encode(zeros, 0) == b"\xff\xf8"  # 13 one-bit codes, 3 padding zeros
    assert np.array_equal(rice_decode(b"\xff\xf8", 0, 13), zeros)
    huge = np.array([U64, 0, 1 << 63, U64 - 1, 12345], dtype=np.uint64)
    k = best_rice_parameter(huge)
    assert np.array_equal(rice_decode(rice_encode(huge, k), k, huge.size), huge)
    assert np.array_equal(rice_decode(rice_encode(huge, 63), 63, huge.size), huge)
    one = np.array([7], dtype=np.uint64)  # q = 1, r = 3 with k = 2: "01" + "11"
    assert rice_encode(one, 2) == bytes([0b01110000])


def test_rice_rejects_bad_input_and_malformed_streams():
    with pytest.raises(ValueError):  # a negative value
        rice_encode(np.array([1, -1]), 2)
    with pytest.raises(ValueError):  # not integers
        rice_encode(np.array([1.5]), 2)
    with pytest.raises(ValueError):  # a parameter outside [0, 63]
        rice_encode(np.array([1]), 64)
    with pytest.raises(ValueError):  # a parameter too small for the value
        rice_encode(np.array([U64], dtype=np.uint64), 0)

    v = np.array([3, 0, 17, 250, 1, 9], dtype=np.uint64)
    coded = rice_encode(v, 3)
    for cut in range(len(coded)):
        with pytest.raises(CodecError):
            rice_decode(coded[:cut], 3, v.size)
    with pytest.raises(CodecError) as err:
        rice_decode(coded + b"\x00", 3, v.size)
    assert err.value.reason is CodecReason.WRONG_LENGTH
    with pytest.raises(CodecError) as err:
        rice_decode(coded, 3, 100)
    assert err.value.reason is CodecReason.TRUNCATED
    assert rice_bits(v, 3) == 58  # so the last 6 bits of the 8th byte are padding
    padded = bytearray(coded)
    padded[-1] |= 1
    with pytest.raises(CodecError) as err:
        rice_decode(bytes(padded), 3, v.size)
    assert err.value.reason is CodecReason.BAD_VALUE  # non-zero padding bits
    with pytest.raises(CodecError) as err:
        rice_decode(b"\x00" * 4, 0, 1)  # a unary run past the end
    assert err.value.reason is CodecReason.TRUNCATED
    with pytest.raises(CodecError) as err:
        rice_decode(bytes([0b00100000]) + b"\x00" * 8, 63, 1)  # q = 2 with k = 63: does not fit 64 bits
    assert err.value.reason is CodecReason.BAD_VALUE
    with pytest.raises(CodecError) as err:
        rice_decode(b"\x80", 0, 0)  # 0 values need an empty stream
    assert err.value.reason is CodecReason.WRONG_LENGTH
    with pytest.raises(CodecError):
        rice_decode(b"\x80", 64, 1)


# --------------------------------------------------------------------------- top-k


@FAST
@given(
    st.integers(1, 3000),
    st.floats(1e-3, 1.0),
    st.sampled_from(["fp16", "fp32"]),
    st.integers(0, 2**32),
)
def test_topk_keeps_exactly_the_k_largest_magnitudes(d, ratio, values, seed):
    x = np.random.default_rng(seed).permutation(np.linspace(-3.0, 3.0, d, dtype=np.float32) + 0.0)
    codec = TopKCodec(ratio, values)
    k = support_size(ratio, d)
    y = codec.decode(codec.encode(x))
    kept = np.sort(np.argsort(-np.abs(x), kind="stable")[:k])
    assert y.shape == x.shape and y.dtype == np.float32
    mask = np.zeros(d, dtype=bool)
    mask[kept] = True
    assert not y[~mask].any()
    expected = x[mask] if values == "fp32" else x[mask].astype(np.float16).astype(np.float32)
    assert np.array_equal(y[mask], expected)
    if values == "fp32":  # contractive with δ = k/d
        assert np.sum((x - y) ** 2) <= (1 - k / d) * np.sum(x**2) * (1 + 1e-6)


def test_topk_support_size_and_ties():
    assert support_size(0.07, 100) == 7 and support_size(0.01, 2**24) == 167773
    assert support_size(1e-9, 10) == 1 and support_size(1.0, 10) == 10 and support_size(0.5, 0) == 0
    x = np.ones(10, dtype=np.float32)
    y = TopKCodec(0.3).decode(TopKCodec(0.3).encode(x))
    assert np.array_equal(np.flatnonzero(y), [0, 1, 2])  # ties: lowest indices


def test_topk_bits_per_coordinate_within_the_docstring_bound():
    d, ratio = 2**16, 0.01
    x = _normal(d, 3)
    payload = TopKCodec(ratio).encode(x)
    k = support_size(ratio, d)
    measured = 8 * len(payload) / d
    # docstring: k·(b + 2.44 + 16)/d with b ≈ log2(ln2·d/k), plus 5 body bytes and the header
    bound = k * (math.log2(math.log(2) * d / k) + 3 + 16) / d + 8 * (5 + 6 + 4) / d
    assert measured <= bound, (measured, bound)
    assert measured < 0.26


def test_topk_values_fp16_clipping_and_non_finite():
    x = np.array([1e6, -1e6, 0.5, 0.0], dtype=np.float32)
    y = TopKCodec(0.5).decode(TopKCodec(0.5).encode(x))
    assert y.tolist() == [65504.0, -65504.0, 0.0, 0.0]
    x = np.array([np.inf, 1.0, np.nan, 2.0, 0.0, 0.0], dtype=np.float32)
    y = TopKCodec(0.34).decode(TopKCodec(0.34).encode(x))  # k = 3: Inf, NaN and 2.0
    assert np.isposinf(y[0]) and np.isnan(y[2]) and y[3] == 2.0 and not y[[1, 4, 5]].any()


def test_topk_lossless_at_ratio_one_with_fp32_values():
    x = _normal((5, 3, 2), 4)
    codec = TopKCodec(1.0, "fp32")
    assert np.array_equal(codec.decode(codec.encode(x)), x)


# --------------------------------------------------------------------------- rand-k


@pytest.mark.parametrize("d, ratio", [(40, 0.1), (320, 1 / 16), (7, 0.5)])
def test_randk_is_unbiased_over_the_seed(d, ratio):
    # (40, 0.1) and (7, 0.5) use the dense sampler, (320, 1/16) the sparse one
    x = _normal(d, 5) + 0.5
    codec = RandKCodec(ratio)
    k = support_size(ratio, d)
    runs = 3000
    total = np.zeros(d, dtype=np.float64)
    for seed in range(runs):
        total += codec.decode(codec.encode(x, EncodeContext(seed=seed)))
    mean = total / runs
    z = (mean - x) / np.sqrt((d / k - 1) * x.astype(np.float64) ** 2 / runs)
    assert np.abs(z).max() < 5.5
    assert np.mean(z**2) < 2.5  # the spread matches (d/k - 1)·x²


@pytest.mark.parametrize("d, k", [(2000, 20), (200, 60)])
def test_randk_support_is_uniform_and_deterministic(d, k):
    counts = np.zeros(d)
    runs = 600
    for seed in range(runs):
        support = randk_support(seed, d, k)
        assert support.size == k and np.all(np.diff(support) > 0) and support[-1] < d
        counts[support] += 1
    expected = runs * k / d
    chi2 = np.sum((counts - expected) ** 2 / expected)
    dof = d - 1
    assert abs(chi2 - dof) < 6 * math.sqrt(2 * dof)
    assert not randk_support(1, d, k).flags.writeable


def test_randk_support_is_pinned():
    # Built from raw PCG64 output, which NumPy keeps stable: a change here means
    # clients and servers on different versions would disagree on supports.
    assert randk_support(12345, 1000, 10).tolist() == [191, 232, 324, 340, 400, 612, 688, 692, 816, 964]
    assert randk_support(U64, 20, 5).tolist() == [2, 4, 5, 7, 11]


def test_randk_shared_seed_shares_the_support_and_commutes_with_sum():
    d, ratio = 1000, 0.03
    codec = RandKCodec(ratio)
    k = support_size(ratio, d)
    x, y = _normal(d, 6) + 5.0, _normal(d, 7) - 5.0  # no zeros
    ctx = EncodeContext(seed=2024)
    px, py = codec.encode(x, ctx), codec.encode(y, ctx)
    dx, dy = RandKCodec(0.5).decode(px), RandKCodec(0.5).decode(py)  # self-contained payloads
    support = np.flatnonzero(dx)
    assert support.size == k and np.array_equal(support, np.flatnonzero(dy))
    expected = np.zeros(d)
    expected[support] = (x + y)[support].astype(np.float64) * (d / k)
    np.testing.assert_allclose(dx + dy, expected, rtol=1e-5, atol=1e-5)
    other = codec.decode(codec.encode(x, EncodeContext(seed=2025)))
    assert not np.array_equal(np.flatnonzero(other), support)
    assert struct.unpack_from("<Q", px, 6 + 4)[0] == 2024
    negative = codec.encode(x, EncodeContext(seed=-1))  # reduced mod 2**64
    assert struct.unpack_from("<Q", negative, 10)[0] == U64


def test_randk_fp32_payloads_are_unchanged_by_the_bits_parameter():
    # Bytes of the payloads made before `bits` existed (bits = 32 is the default).
    x = (np.arange(10, dtype=np.float32) - 4.5) * np.float32(0.25)
    payload = RandKCodec(0.3).encode(x.reshape(2, 5), EncodeContext(seed=12345))
    assert payload.hex() == (
        "5143010801020200000005000000393000000000000003000000000070c0abaa3ac055550540"
    )
    assert RandKCodec(0.3, bits=32, seed=9).encode(x.reshape(2, 5), EncodeContext(seed=12345)) == payload
    digest = hashlib.sha256()
    for d in (1, 17, 1000, 70000):
        x = (np.arange(d, dtype=np.float32) % 97 - 48) / np.float32(7)
        for ratio in (0.01, 0.1, 0.5, 1.0):
            for seed in (0, 3, U64):
                digest.update(RandKCodec(ratio).encode(x, EncodeContext(seed=seed)))
    assert digest.hexdigest()[:16] == "d087a5cc75acc480"


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_randk_quantized_is_unbiased_over_the_seed_and_the_rounding(bits):
    d, ratio = 60, 0.1
    x = _normal(d, 8) + 0.5
    k = support_size(ratio, d)
    codec = RandKCodec(ratio, bits=bits, seed=bits)
    runs = 3000
    total = np.zeros(d, dtype=np.float64)
    for seed in range(runs):
        total += codec.decode(codec.encode(x, EncodeContext(seed=seed)))
    mean = total / runs
    # per coordinate: support variance (d/k - 1)·x² plus rounding variance <= (k/d)·m²/s²
    m = (d / k) * float(np.abs(x).max())
    var = (d / k - 1) * x.astype(np.float64) ** 2 + (k / d) * (m / ((1 << bits) - 1)) ** 2
    z = (mean - x) / np.sqrt(var / runs)
    assert np.abs(z).max() < 5.5
    assert np.mean(z**2) < 2.5


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_randk_rounding_is_unbiased_with_the_documented_variance(bits):
    d, ratio, seed = 4000, 0.05, 77
    x = _normal(d, 9)
    codec = RandKCodec(ratio, bits=bits, seed=1)
    support = codec.support(seed, d)
    exact = x[support].astype(np.float64) * (d / support.size)
    m = np.abs(exact).max()
    step = 2 * m / ((1 << bits) - 1)
    runs = 400
    draws = np.stack([codec.decode(codec.encode(x, EncodeContext(seed=seed)))[support] for _ in range(runs)])
    draws = draws.astype(np.float64)
    assert np.all(np.abs(draws - exact) <= step * (1 + 1e-5))  # a neighbouring grid point
    frac = (exact + m) / step % 1
    var = step**2 * frac * (1 - frac)  # Var = Δ²·f(1 − f) <= Δ²/4
    error = draws.mean(axis=0) - exact
    assert np.all(np.abs(error) <= 5.5 * np.sqrt(var / runs) + 1e-4 * step)  # + float32 slack in t
    inner = (frac > 0.05) & (frac < 0.95)
    assert np.mean(error[inner] ** 2 / (var[inner] / runs)) < 1.5
    np.testing.assert_allclose(draws.var(axis=0).mean(), var.mean(), rtol=0.1)


@pytest.mark.parametrize("bits", [1, 2, 5, 7, 8, 32])
@pytest.mark.parametrize("shape", [(), (1,), (0,), (7,), (3, 4, 5), (300, 70)])
def test_randk_round_trip_shape_dtype_support_and_size(bits, shape):
    x = _normal(shape, 10)
    d = x.size
    codec = RandKCodec(0.2, bits=bits, seed=3)
    payload = codec.encode(x, EncodeContext(seed=41))
    out = codec.decode(payload)
    assert out.shape == shape and out.dtype == np.float32
    k = support_size(0.2, d)
    support = codec.support(41, d)
    assert np.array_equal(support, randk_support(41, d, k))
    assert np.count_nonzero(out.reshape(-1)[np.setdiff1d(np.arange(d), support)]) == 0
    body = len(payload) - (6 + 4 * len(shape))
    assert body == (12 + 4 * k if bits == 32 or d == 0 else 21 + (k * bits + 7) // 8)
    for other in (RandKCodec(0.9), RandKCodec(0.2, bits=4)):  # the payload says how to read it
        assert np.array_equal(other.decode(payload), out, equal_nan=True)
    if bits < 32 and d:
        m = float(np.abs(x.reshape(-1)[support].astype(np.float64) * (d / k)).max())
        kept = out.reshape(-1)[support]
        assert np.abs(kept).max() <= m * (1 + 1e-6)


def test_randk_quantized_noise_is_per_client_and_reproducible():
    x = _normal(5000, 11)
    ctx = EncodeContext(seed=3)
    a = make_codec("randk", {"ratio": 0.1, "bits": 2}, seed=1).encode(x, ctx)
    again = make_codec("randk", {"ratio": 0.1, "bits": 2}, seed=1).encode(x, ctx)
    other = make_codec("randk", {"ratio": 0.1, "bits": 2}, seed=2).encode(x, ctx)
    assert a == again and a != other
    codec = RandKCodec(0.1, bits=2)
    assert np.array_equal(np.flatnonzero(codec.decode(a)), np.flatnonzero(codec.decode(other)))  # same support
    assert make_codec("randk", {"ratio": 0.1}, seed=1).encode(x, ctx) == RandKCodec(0.1).encode(x, ctx)
    assert (make_codec("randk", {"ratio": 0.1, "bits": 32}, seed=5).encode(x, ctx)
            == make_codec("randk", {"ratio": 0.1}, seed=6).encode(x, ctx))


def test_randk_quantized_keeps_non_finite_values_visible():
    x = _normal(1000, 12)
    codec = RandKCodec(0.5, bits=4, seed=0)
    support = codec.support(8, x.size)
    x[support[3]] = np.nan
    assert np.isnan(codec.decode(codec.encode(x, EncodeContext(seed=8)))).any()
    zeros = np.zeros(1000, np.float32)
    assert not codec.decode(codec.encode(zeros, EncodeContext(seed=8))).any()


@pytest.mark.parametrize("bits", [0, 9, 16, 31, 33, -1, True, 4.0, "8"])
def test_randk_bits_out_of_range_is_refused_at_make_codec(bits):
    with pytest.raises(ValueError):
        make_codec("randk", {"ratio": 0.1, "bits": bits})
    if not isinstance(bits, (bool, float, str)):
        with pytest.raises(ValueError):
            RandKCodec(0.1, bits=bits)


def test_randk_attributes_for_masked_sums():
    codec = make_codec("randk", {"ratio": 0.25, "bits": 8, "feedback": False}, seed=1)
    assert isinstance(codec, RandKCodec) and codec.ratio == 0.25 and codec.bits == 8
    assert RandKCodec(0.25).bits == 32
    assert np.array_equal(codec.support(U64 + 6, 100), randk_support(5, 100, 25))  # seed taken mod 2**64
    assert repr(codec) == "RandKCodec(ratio=0.25, bits=8)"
    with pytest.raises(ValueError):
        RandKCodec(0.5, bits=4, seed=1.5)  # type: ignore[arg-type]


def test_randk_quantized_payloads_reject_corruption_by_field():
    shape = (50,)
    codec = RandKCodec(0.2, bits=3, seed=0)
    payload = codec.encode(_normal(shape, 13), EncodeContext(seed=4))
    head = 6 + 4 * len(shape)
    k = support_size(0.2, 50)
    assert struct.unpack_from("<QIIB", payload, head) == (4, 0, k, 3)

    def patched(offset, fmt, value):
        data = bytearray(payload)
        struct.pack_into(fmt, data, head + offset, value)
        return bytes(data)

    for bits in (0, 9, 255):
        with pytest.raises(CodecError) as err:
            codec.decode(patched(16, "<B", bits))
        assert err.value.reason is CodecReason.BAD_PARAMETER
    for bad_k in (51, 2**32 - 1):
        with pytest.raises(CodecError) as err:
            codec.decode(patched(12, "<I", bad_k))
        assert err.value.reason is CodecReason.BAD_PARAMETER
    with pytest.raises(CodecError) as err:
        codec.decode(patched(16, "<B", 4))  # a valid width, but not this payload's length
    assert err.value.reason is CodecReason.WRONG_LENGTH
    with pytest.raises(CodecError) as err:
        codec.decode(patched(17, "<f", -1.0))  # a negative scale
    assert err.value.reason is CodecReason.BAD_VALUE
    for cut in range(len(payload)):
        with pytest.raises(CodecError):
            codec.decode(payload[:cut])
    with pytest.raises(CodecError):
        codec.decode(payload + b"\x00")


# --------------------------------------------------------------------------- PowerSGD


def test_powersgd_is_exact_on_a_low_rank_matrix():
    rng = np.random.default_rng(8)
    m = (rng.standard_normal((30, 3)) @ rng.standard_normal((3, 20))).astype(np.float32)
    codec, ctx = PowerSGDCodec(3), EncodeContext(seed=1)
    for _ in range(3):
        out = codec.decode(codec.encode(m, ctx))
        assert np.linalg.norm(out - m) <= 1e-5 * np.linalg.norm(m)


def test_powersgd_warm_start_converges_to_the_best_rank_r_error():
    rng = np.random.default_rng(9)
    u, _ = np.linalg.qr(rng.standard_normal((60, 40)))
    v, _ = np.linalg.qr(rng.standard_normal((50, 40)))
    s = 0.8 ** np.arange(40)
    m = ((u * s) @ v.T).astype(np.float32)
    best = np.sqrt(np.sum(s[2:] ** 2))  # Eckart–Young, rank 2
    codec, ctx = PowerSGDCodec(2), EncodeContext(seed=3)
    errors = [np.linalg.norm(codec.decode(codec.encode(m, ctx)) - m) for _ in range(15)]
    assert errors[-1] <= best * (1 + 1e-3)
    assert errors[-1] < errors[0]
    # a fresh state each round does not converge
    cold = np.linalg.norm(codec.decode(codec.encode(m, EncodeContext(seed=3))) - m)
    assert cold == pytest.approx(errors[0], rel=1e-5)


def test_powersgd_stores_and_reuses_q():
    m = _normal((12, 9), 10)
    codec = PowerSGDCodec(2)
    ctx = EncodeContext(seed=4)
    codec.encode(m, ctx)
    q = ctx.state["q"]
    assert q.shape == (9, 2) and q.dtype == np.float32
    # with a stored Q, the seed no longer matters
    a = codec.encode(m, EncodeContext(seed=1, state={"q": q.copy()}))
    b = codec.encode(m, EncodeContext(seed=2, state={"q": q.copy()}))
    assert a == b
    assert codec.encode(m, EncodeContext(seed=1)) != codec.encode(m, EncodeContext(seed=2))
    # a stored Q of the wrong shape (rank changed) is replaced
    ctx = EncodeContext(seed=4, state={"q": np.ones((9, 5), np.float32)})
    codec.encode(m, ctx)
    assert ctx.state["q"].shape == (9, 2)


def test_powersgd_recovers_after_an_all_zero_round():
    codec, ctx = PowerSGDCodec(1), EncodeContext(seed=5)
    assert not codec.decode(codec.encode(np.zeros((6, 4), np.float32), ctx)).any()
    rank1 = np.outer(np.arange(1, 7), np.arange(1, 5)).astype(np.float32)
    np.testing.assert_allclose(codec.decode(codec.encode(rank1, ctx)), rank1, rtol=1e-5)


def test_powersgd_shapes_vectors_and_payload_size():
    codec = PowerSGDCodec(4)
    kernel = _normal((16, 8, 3, 3), 11)
    payload = codec.encode(kernel, EncodeContext(seed=1))
    assert codec.decode(payload).shape == (16, 8, 3, 3)
    assert len(payload) == 6 + 4 * 4 + 4 + 4 * 4 * (16 + 72)
    for shape in [(7,), (), (0,)]:
        x = _normal(shape, 12)
        payload = codec.encode(x)
        assert len(payload) == 6 + 4 * len(shape) + 4 * x.size
        assert np.array_equal(codec.decode(payload), x)
    tall = _normal((3, 2), 13)  # r = min(4, 3, 2) = 2: exact
    np.testing.assert_allclose(codec.decode(codec.encode(tall)), tall, atol=1e-6)
    for shape in [(0, 3), (3, 0)]:
        assert codec.decode(codec.encode(np.zeros(shape, np.float32))).shape == shape


# --------------------------------------------------------------------------- entropy stage


@pytest.mark.parametrize("method", ["zstd", "zlib"])
def test_entropy_stage_is_lossless_and_compresses_sparse_payloads(method):
    x = _normal((33, 17), 14)
    fp32 = EntropyCodec(Fp32Codec(), method)
    assert fp32.name == f"fp32+{method}" and fp32.traits == Fp32Codec.traits
    assert np.array_equal(fp32.decode(fp32.encode(x)).view(np.uint32), x.view(np.uint32))
    topk = TopKCodec(0.1)
    wrapped = EntropyCodec(topk, method)
    assert wrapped.name == f"topk+{method}" and wrapped.traits == TopKCodec.traits
    assert np.array_equal(wrapped.decode(wrapped.encode(x)), topk.decode(topk.encode(x)))
    sparse = np.zeros(10_000, np.float32)
    sparse[::97] = 1.5
    assert len(fp32.encode(sparse)) < 0.02 * len(Fp32Codec().encode(sparse))
    stateful = EntropyCodec(PowerSGDCodec(2), method)
    ctx = EncodeContext(seed=1)
    stateful.encode(x, ctx)
    assert ctx.state["q"].shape == (17, 2)  # the context reaches the inner codec


def _entropy_payload(method_code, inner_id, shape, compressed):
    return pack_header(10, np.dtype("<f4"), shape) + bytes((method_code, inner_id)) + compressed


def test_entropy_stage_refuses_decompression_bombs():
    import zstandard

    bomb = b"\x00" * (8 << 20)
    for codec, code, compressed in [
        (EntropyCodec(Fp32Codec(), "zstd"), 1, zstandard.ZstdCompressor().compress(bomb)),
        (EntropyCodec(Fp32Codec(), "zlib"), 2, zlib.compress(bomb, 9)),
    ]:
        with pytest.raises(CodecError) as err:
            codec.decode(_entropy_payload(code, 1, (2,), compressed))
        assert err.value.reason is CodecReason.OVERSIZE
    # a zstd frame without its content size is refused too
    writer = zstandard.ZstdCompressor().compressobj()
    unsized = writer.compress(Fp32Codec().encode(np.ones(2, np.float32))) + writer.flush()
    with pytest.raises(CodecError) as err:
        EntropyCodec(Fp32Codec()).decode(_entropy_payload(1, 1, (2,), unsized))
    assert err.value.reason is CodecReason.CORRUPT  # a zstd frame must record its content size
    assert max_inner_payload(0) == 4096


def test_entropy_stage_checks_method_and_inner_codec():
    x = np.ones(4, np.float32)
    zstd_payload = EntropyCodec(Fp32Codec(), "zstd").encode(x)
    with pytest.raises(CodecError) as err:
        EntropyCodec(Fp32Codec(), "zlib").decode(zstd_payload)
    assert err.value.reason is CodecReason.WRONG_CODEC  # another entropy method
    with pytest.raises(CodecError) as err:
        EntropyCodec(TopKCodec(), "zstd").decode(zstd_payload)
    assert err.value.reason is CodecReason.WRONG_CODEC  # another inner codec
    lying = _entropy_payload(1, 1, (5,), zstandard_compress(Fp32Codec().encode(x)))
    with pytest.raises(CodecError) as err:
        EntropyCodec(Fp32Codec()).decode(lying)
    assert err.value.reason is CodecReason.SHAPE_MISMATCH  # the inner header's shape, not the outer one


def zstandard_compress(data):
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


# --------------------------------------------------------------------------- robustness


def _codecs():
    return [
        ("topk-fp16", TopKCodec(0.3), (5, 7)),
        ("topk-fp32", TopKCodec(0.3, "fp32"), (11,)),
        ("randk", RandKCodec(0.3), (5, 7)),
        ("randk-4bit", RandKCodec(0.3, bits=4, seed=0), (5, 7)),
        ("randk-1bit", RandKCodec(0.5, bits=1, seed=0), (3,)),
        ("powersgd", PowerSGDCodec(2), (5, 7)),
        ("powersgd-1d", PowerSGDCodec(2), (6,)),
        ("fp32+zstd", EntropyCodec(Fp32Codec(), "zstd"), (4, 3)),
        ("topk+zlib", EntropyCodec(TopKCodec(0.5), "zlib"), (4, 3)),
        ("randk+zstd", EntropyCodec(RandKCodec(0.5), "zstd"), (9,)),
    ]


@pytest.mark.parametrize("label, codec, shape", _codecs(), ids=[c[0] for c in _codecs()])
def test_every_codec_rejects_truncated_extended_and_random_payloads(label, codec, shape):
    payload = codec.encode(_normal(shape, 15), EncodeContext(seed=6))
    assert codec.decode(payload).shape == shape
    for cut in range(len(payload)):
        with pytest.raises(CodecError):
            codec.decode(payload[:cut])
    with pytest.raises(CodecError):
        codec.decode(payload + b"\x00")
    rng = np.random.default_rng(16)
    for n in range(0, 200, 9):
        with pytest.raises(CodecError):
            codec.decode(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
    with pytest.raises(CodecError) as err:
        codec.decode(Fp32Codec().encode(_normal(shape)))
    assert err.value.reason is CodecReason.WRONG_CODEC


@pytest.mark.parametrize("label, codec, shape", _codecs(), ids=[c[0] for c in _codecs()])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_every_codec_survives_corrupted_bodies(label, codec, shape, data):
    """A tampered body either raises CodecError or decodes to a tensor of the header's shape."""
    payload = bytearray(codec.encode(_normal(shape, 17), EncodeContext(seed=7)))
    header = 6 + 4 * len(shape)
    if data.draw(st.booleans()):
        body = data.draw(st.binary(max_size=3 * (len(payload) - header)))
        payload = payload[:header] + body
    else:
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(header, len(payload) - 1))
            payload[i] ^= 1 << data.draw(st.integers(0, 7))
    try:
        out = codec.decode(bytes(payload))
    except CodecError:
        return
    assert out.shape == shape and out.dtype == np.float32


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("cls, name", [(TopKCodec, "topk"), (RandKCodec, "randk")])
@pytest.mark.parametrize("ratio", [0, -0.5, 1.5, float("nan")])
def test_ratio_validation_names_the_parameter(cls, name, ratio):
    with pytest.raises(ValueError) as err:
        cls(ratio)
    assert f"{name} ratio" in str(err.value)  # the message names what to change (its wording is free)


def test_other_constructor_validation():
    with pytest.raises(ValueError):
        TopKCodec("0.1")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        TopKCodec(0.1, "bf16")
    for rank in (0, -3, 2.5, True):
        with pytest.raises(ValueError):
            PowerSGDCodec(rank)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        EntropyCodec(Fp32Codec(), "gzip")
    with pytest.raises(ValueError):
        EntropyCodec("fp32", "zstd")  # type: ignore[arg-type]
    assert repr(TopKCodec(0.5, "fp32")) == "TopKCodec(ratio=0.5, values='fp32')"


@pytest.mark.parametrize("case", ["normal", "ties", "coarse", "periodic", "nan", "sparse"])
def test_topk_sampled_bound_selects_exactly_what_a_full_selection_does(case):
    from qfl.compression import sparsify as S

    rng = np.random.default_rng(7)
    d = (1 << 21) + 4099
    x = rng.standard_normal(d).astype(np.float32)
    if case == "ties":
        x[::7] = 0.5
    elif case == "coarse":
        x = np.round(x * 2).astype(np.float32)  # a handful of magnitudes, ties at the threshold
    elif case == "periodic":  # the strided sample sees only one phase
        x = np.zeros(d, np.float32)
        x[1::4] = 5.0
    elif case == "nan":
        x[[5, 70000]] = np.nan
    elif case == "sparse":
        x[rng.random(d) < 0.999] = 0.0
    k = S.support_size(0.01, d)
    got = S.top_k_positions(x, k)
    want = S._top_k(np.abs(x), k)
    assert got.size == k and np.all(np.diff(got) > 0)
    if case == "nan":  # NaNs are kept, and the same magnitudes fill the rest
        assert {5, 70000} <= set(got.tolist())
        assert np.array_equal(np.sort(np.abs(x[got]))[: k - 2], np.sort(np.abs(x[want]))[: k - 2])
    else:
        assert np.array_equal(got, want)
