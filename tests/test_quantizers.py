"""Quantizer codecs (fp16, bf16, qsgd, ternary, sign) and the bit packer they use."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qfl.compression.bitpack import BLOCK, _pack_portable, pack_bits, packed_size, unpack_bits
from qfl.compression.codec import CodecError
from qfl.compression.identity import Fp32Codec
from qfl.compression.quantizers import Bf16Codec, Fp16Codec, QsgdCodec, SignCodec, TernaryCodec
from qfl.compression.wire import pack_header
from qfl.errors import CodecReason

F32 = np.dtype("<f4")
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def codecs():
    """One instance of every quantizer, qsgd in three shapes (bucket > BLOCK included)."""
    return [
        Fp16Codec(),
        Bf16Codec(),
        QsgdCodec(seed=1),
        QsgdCodec(bits=1, bucket=3, seed=2),
        QsgdCodec(bits=7, bucket=BLOCK + 5, seed=3),
        TernaryCodec(seed=4),
        SignCodec(),
    ]


CODEC_IDS = ["fp16", "bf16", "qsgd4x512", "qsgd1x3", "qsgd7xbig", "ternary", "sign"]


def header_bytes(shape) -> int:
    return 6 + 4 * len(shape)


def expected_length(codec, shape) -> int:
    """The payload lengths the class docstrings state."""
    d = int(np.prod(shape, dtype=np.int64))
    body = {
        "fp16": lambda: 2 * d,
        "bf16": lambda: 2 * d,
        "qsgd": lambda: 5 + 4 * -(-d // codec.bucket) + packed_size(d, codec.bits),
        "ternary": lambda: 4 + packed_size(d, 2),
        "sign": lambda: 4 + packed_size(d, 1),
    }[codec.name]()
    return header_bytes(shape) + body


# ---------------------------------------------------------------- bitpack


@pytest.mark.parametrize("bits", range(1, 9))
def test_bitpack_round_trip_matches_reference(bits):
    rng = np.random.default_rng(bits)
    for count in [*range(0, 33), 1001, BLOCK - 3, BLOCK + 13, 2 * BLOCK + 7]:
        values = rng.integers(0, 1 << bits, count, dtype=np.uint8)
        packed = pack_bits(values, bits)
        assert len(packed) == packed_size(count, bits) == (count * bits + 7) // 8
        assert packed == (_pack_portable(values, bits).tobytes() if count else b"")
        assert np.array_equal(unpack_bits(packed, bits, count), values)
        assert np.array_equal(unpack_bits(packed + b"\xff", bits, count), values)  # extra bytes ignored


def test_bitpack_bit_order_is_little_endian():
    assert pack_bits(np.array([1, 2], np.uint8), 4) == b"\x21"
    assert pack_bits(np.array([3, 0, 1, 2], np.uint8), 2) == bytes([0b10_01_00_11])
    assert pack_bits(np.array([1, 0, 0, 0, 0, 0, 0, 1, 1], np.uint8), 1) == b"\x81\x01"
    assert pack_bits(np.array([5, 6, 7], np.uint8), 3) == bytes([0b11_110_101, 0b1])


def test_bitpack_rejects_bad_input():
    with pytest.raises(CodecError) as err:
        unpack_bits(b"\x00" * 3, 4, 7)
    assert err.value.reason is CodecReason.TRUNCATED
    with pytest.raises(ValueError):  # a value outside 0..15
        pack_bits(np.array([16], np.uint8), 4)
    with pytest.raises(ValueError):  # a value outside 0..1
        pack_bits(np.array([-1, 0]), 1)
    for bits in (0, 9):
        with pytest.raises(ValueError):
            pack_bits(np.zeros(3, np.uint8), bits)
    with pytest.raises(ValueError):  # not integers
        pack_bits(np.zeros(3, np.float32), 4)


# ------------------------------------------------------------- declarations


def test_ids_names_and_traits():
    table = {c.name: c for c in (Fp16Codec(), Bf16Codec(), QsgdCodec(), TernaryCodec(), SignCodec())}
    assert {name: c.codec_id for name, c in table.items()} == {
        "fp16": 2, "bf16": 3, "qsgd": 4, "ternary": 5, "sign": 6
    }
    assert Fp32Codec.codec_id not in {c.codec_id for c in table.values()}
    for name in ("fp16", "bf16", "sign"):
        t = table[name].traits
        assert (t.unbiased, t.contractive, t.commutes_with_sum, t.stateful, t.lossless) == (
            False, True, False, False, False
        )
    for name in ("qsgd", "ternary"):  # commute with sum given a scale shared by the round
        t = table[name].traits
        assert (t.unbiased, t.contractive, t.commutes_with_sum, t.stateful, t.lossless) == (
            True, False, True, False, False
        )


def test_qsgd_constructor_validation():
    for bits in (0, 9, True):
        with pytest.raises(ValueError):
            QsgdCodec(bits=bits)
    for bucket in (0, 2**32):
        with pytest.raises(ValueError):
            QsgdCodec(bucket=bucket)
    with pytest.raises(ValueError):
        QsgdCodec(seed="7")  # type: ignore[arg-type]
    assert repr(QsgdCodec(bits=2, bucket=64)) == "QsgdCodec(bits=2, bucket=64)"


# ------------------------------------------------------- unbiased codecs


TRIALS = 20_000


def _trial_matrix(codec, x):
    """decode(encode(x)) for TRIALS independent draws: x tiled, one bucket per copy."""
    y = codec.decode(codec.encode(np.tile(x, TRIALS)))
    return y.reshape(TRIALS, x.size).astype(np.float64)


def _probe_vector():
    rng = np.random.default_rng(11)
    x = rng.standard_normal(64).astype(np.float32)
    x[0], x[1], x[2] = 0.0, np.abs(x).max(), -np.abs(x).max()  # zero, +max and -max
    x[3] = np.float32(1e-30)
    return x


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_qsgd_is_unbiased_with_the_stated_variance(bits):
    x = _probe_vector()
    y = _trial_matrix(QsgdCodec(bits=bits, bucket=x.size, seed=bits), x)
    m = float(np.abs(x).max())
    s = 2**bits - 1
    delta = 2 * m / s
    mean, var = y.mean(axis=0), y.var(axis=0, ddof=1)
    stderr = np.sqrt(var / TRIALS)
    assert np.all(np.abs(mean - x) <= 5 * stderr + 1e-6 * m)
    # Var = Δ²·f(1−f) ≤ Δ²/4 exactly; sampling error of the variance is ≤ (Δ²/4)/√TRIALS.
    t = (x.astype(np.float64) + m) / delta
    f = t - np.floor(t)
    assert np.all(var <= delta**2 / 4 * 1.06)
    assert np.allclose(var, delta**2 * f * (1 - f), rtol=0, atol=0.06 * delta**2 / 4)
    # every value is one of the two grid points around x
    grid = (y + m) / delta
    assert np.allclose(grid, np.round(grid), atol=1e-3)
    assert np.all(np.abs(y - x) <= delta * (1 + 1e-5))


def test_ternary_is_unbiased_with_the_stated_variance():
    x = _probe_vector()
    y = _trial_matrix(TernaryCodec(seed=9), np.asarray(x))  # scale = max over the whole tiled tensor
    s = float(np.abs(x).max())
    assert set(np.unique(y).tolist()) <= {-s, 0.0, s}
    mean, var = y.mean(axis=0), y.var(axis=0, ddof=1)
    stderr = np.sqrt(var / TRIALS)
    assert np.all(np.abs(mean - x) <= 5 * stderr + 1e-6 * s)
    exact = np.abs(x.astype(np.float64)) * (s - np.abs(x.astype(np.float64)))
    assert np.allclose(var, exact, rtol=0, atol=0.06 * s**2 / 4)


@pytest.mark.parametrize("bucket", [1, 3, 512, 1000, BLOCK + 5, 10**6])
def test_qsgd_blocks_and_buckets_cover_every_coordinate(bucket):
    """Values land on their own bucket's grid, next to x, whatever the blocking."""
    rng = np.random.default_rng(bucket)
    n = 3 * BLOCK + 123
    x = (rng.standard_normal(n) * np.exp(rng.uniform(-3, 3, n))).astype(np.float32)
    codec = QsgdCodec(bits=3, bucket=bucket, seed=0)
    y = codec.decode(codec.encode(x)).astype(np.float64)
    starts = np.arange(0, n, bucket)
    m = np.maximum.reduceat(np.abs(x), starts).astype(np.float64)
    m = np.repeat(m, np.diff(np.append(starts, n)))
    delta = 2 * m / 7
    grid = (y + m) / delta
    assert np.allclose(grid, np.round(grid), atol=1e-3)
    assert np.all((np.round(grid) >= 0) & (np.round(grid) <= 7))
    assert np.all(np.abs(y - x) <= delta * (1 + 1e-5))


def test_uniforms_are_splitmix64_keyed_by_the_generator():
    from qfl.compression.quantizers import _Uniforms

    mask = 2**64 - 1

    def splitmix64(state):
        while True:
            state = (state + 0x9E3779B97F4A7C15) & mask
            z = state
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
            yield z ^ (z >> 31)

    uniforms = _Uniforms(np.random.default_rng(3), 10)
    drawn = [r.copy() for _, _, r in uniforms.pieces(10)] + [r.copy() for _, _, r in uniforms.pieces(7)]
    drawn = np.concatenate(drawn)
    stream = splitmix64(uniforms.key)
    words = [next(stream) for _ in range(9)]
    halves = [w >> shift & 0xFFFFFFFF for w in words for shift in (0, 32)]
    expected = [1 + (h >> 9) * 2.0**-23 for h in halves]
    assert drawn.tolist() == expected[:10] + expected[10:17]
    big = _Uniforms(np.random.default_rng(4), 1 << 20)
    many = np.concatenate([r.copy() for _, _, r in big.pieces(1 << 20)])
    assert many.min() >= 1 and many.max() < 2
    assert abs(many.mean() - 1.5) < 5 * np.sqrt(1 / 12 / many.size)
    counts = np.bincount(((many - 1) * 64).astype(int), minlength=64)
    chi2 = np.sum((counts - many.size / 64) ** 2 / (many.size / 64))
    assert chi2 < 120  # 63 degrees of freedom; P(chi2 > 120) < 1e-5


def test_qsgd_randomness_is_seeded_and_fresh_per_call():
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    a, b = QsgdCodec(seed=5), QsgdCodec(seed=5)
    first = a.encode(x)
    assert first == b.encode(x)
    assert first != a.encode(x)
    assert first != QsgdCodec(seed=6).encode(x)


def test_qsgd_extreme_scales():
    zeros = np.zeros(1000, np.float32)
    assert np.array_equal(QsgdCodec(seed=0).decode(QsgdCodec(seed=0).encode(zeros)), zeros)
    tiny = np.array([1e-45, -1e-45, 0.0, 5e-45], np.float32)  # subnormal bucket max
    y = QsgdCodec(bits=2, seed=0).decode(QsgdCodec(bits=2, seed=0).encode(tiny))
    assert np.all(np.isfinite(y)) and np.all(np.abs(y) <= 5e-45)
    huge = np.array([3e38, -3e38, 1e38], np.float32)  # 2m/s overflows float32 for bits=1
    y = QsgdCodec(bits=1, seed=0).decode(QsgdCodec(bits=1, seed=0).encode(huge))
    assert np.all(np.isfinite(y)) and set(np.abs(y).tolist()) == {float(np.float32(3e38))}
    # m > float32 max/2: k·Δ overflows at the top index for every bits, not only bits=1
    for bits in range(1, 9):
        codec = QsgdCodec(bits=bits, bucket=4, seed=bits)
        x = np.array([3e38, -3e38, 1e38, np.finfo(np.float32).max, 2e38, -1e38, 0.0, 1e37], np.float32)
        y = codec.decode(codec.encode(x))
        m = np.repeat([np.float32(np.finfo(np.float32).max), np.float32(2e38)], 4)
        assert np.all(np.isfinite(y)) and np.all(np.abs(y) <= m), (bits, y)


# ---------------------------------------------------- deterministic codecs


def _float32_patterns(count: int, seed: int) -> np.ndarray:
    """Random float32 bit patterns plus every fp16 value, its neighbours and the midpoints."""
    rng = np.random.default_rng(seed)
    random = rng.integers(0, 2**32, count, dtype=np.uint64).astype(np.uint32)
    halves = np.arange(2**16, dtype=np.uint16).view(np.float16).astype(np.float32)
    halves = halves[np.isfinite(halves)].view(np.uint32)
    near = np.concatenate([halves, halves + 1, halves - 1, halves + 0x1000, halves + 0xFFF, halves + 0x1001])
    return np.concatenate([random, near]).view(np.float32)


def test_fp16_matches_numpy_round_to_nearest_even():
    x = _float32_patterns(1 << 20, 0)
    codec = Fp16Codec()
    y = codec.decode(codec.encode(x))
    with np.errstate(invalid="ignore", over="ignore"):
        ref = np.clip(x, -65504, 65504).astype(np.float16).astype(np.float32)
    finite = np.isfinite(x)
    assert np.array_equal(y[finite].view(np.uint32), ref[finite].view(np.uint32))
    assert np.array_equal(np.isnan(y), np.isnan(x))
    assert np.array_equal(y[np.isinf(x)], x[np.isinf(x)])


def test_fp16_error_bounds_and_clipping():
    rng = np.random.default_rng(1)
    normal = (rng.choice([-1, 1], 100_000) * np.exp2(rng.uniform(-14, 15.99, 100_000))).astype(np.float32)
    codec = Fp16Codec()
    y = codec.decode(codec.encode(normal))
    assert np.all(np.abs(y - normal) <= 2.0**-11 * np.abs(normal))
    sub = (rng.uniform(-1, 1, 10_000) * 2.0**-14).astype(np.float32)
    assert np.all(np.abs(codec.decode(codec.encode(sub)) - sub) <= 2.0**-25)
    big = np.array([65504, 65519, 65520, 1e5, 3e38, np.finfo(np.float32).max], np.float32)
    big = np.concatenate([big, -big])
    y = codec.decode(codec.encode(big))
    assert np.array_equal(y, np.sign(big) * 65504)
    specials = np.array([np.inf, -np.inf, np.nan, -0.0], np.float32)
    y = codec.decode(codec.encode(specials))
    assert y[0] == np.inf and y[1] == -np.inf and np.isnan(y[2]) and y[3] == 0 and np.signbit(y[3])


def test_fp16_decodes_every_pattern_exactly():
    patterns = np.arange(2**16, dtype=np.uint16)
    payload = pack_header(Fp16Codec.codec_id, F32, (2**16,)) + patterns.tobytes()
    y = Fp16Codec().decode(payload)
    ref = patterns.view(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(y), nan)
    assert np.array_equal(y[~nan].view(np.uint32), ref[~nan].view(np.uint32))


def _bf16_reference(x: np.ndarray) -> np.ndarray:
    u = x.view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32)


def test_bf16_round_to_nearest_even_and_error_bound():
    x = _float32_patterns(1 << 20, 2)
    codec = Bf16Codec()
    y = codec.decode(codec.encode(x))
    ordinary = np.isfinite(x) & (np.abs(x) < 3.38e38)
    assert np.array_equal(y[ordinary], _bf16_reference(x[ordinary]))
    normal = ordinary & (np.abs(x) >= np.finfo(np.float32).tiny)
    assert np.all(np.abs(y[normal] - x[normal]) <= 2.0**-8 * np.abs(x[normal]))
    assert np.array_equal(np.isnan(y), np.isnan(x))
    assert np.array_equal(y[np.isinf(x)], x[np.isinf(x)])


def test_bf16_keeps_nan_and_clips_instead_of_overflowing():
    patterns = np.array([0x7F800001, 0xFFFFFFFF, 0x7FFFFFFF, 0xFF800001, 0x7FC00000], np.uint32)
    y = Bf16Codec().decode(Bf16Codec().encode(patterns.view(np.float32)))
    assert np.all(np.isnan(y))
    big = np.array([np.finfo(np.float32).max, -np.finfo(np.float32).max, 3.3962e38], np.float32)
    y = Bf16Codec().decode(Bf16Codec().encode(big))
    bf16_max = np.uint32(0x7F7F0000).view(np.float32)
    assert np.array_equal(y, np.array([bf16_max, -bf16_max, bf16_max], np.float32))


def test_sign_is_mean_magnitude_times_sign():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((37, 11)).astype(np.float32)
    x[0, :3] = [0.0, -0.0, 0.0]
    codec = SignCodec()
    y = codec.decode(codec.encode(x))
    scale = np.float32(np.abs(x).astype(np.float64).mean())
    assert np.allclose(np.abs(y), scale, rtol=1e-6, atol=0)
    assert len(set(np.abs(y).ravel().tolist())) == 1
    assert np.array_equal(np.sign(y), np.where(x >= 0, 1.0, -1.0))  # zero (and -0) -> +
    d = x.size
    err = np.sum((y.astype(np.float64) - x) ** 2)
    assert err <= (1 - 1 / d) * np.sum(x.astype(np.float64) ** 2)


# ------------------------------------------------------------ bit budgets


@pytest.mark.parametrize("codec", codecs(), ids=CODEC_IDS)
@pytest.mark.parametrize("shape", [(), (0,), (1,), (9,), (3, 0, 4), (2**16,), (3, 5, 7, 11)])
def test_payload_lengths_match_docstrings(codec, shape):
    x = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    assert len(codec.encode(x)) == expected_length(codec, shape)


def test_qsgd_bits_per_coordinate():
    n = 2**16
    payload = QsgdCodec(bits=4, bucket=512, seed=0).encode(np.ones(n, np.float32))
    header = header_bytes((n,)) + 5
    assert len(payload) == header + 4 * n // 512 + n // 2
    assert 8 * len(payload) / n <= 4 + 32 / 512 + 8 * header / n


# ------------------------------------------------------------- robustness


def _small_payloads():
    x = np.random.default_rng(5).standard_normal((3, 5)).astype(np.float32)
    return [(c, c.encode(x)) for c in codecs()] + [(Fp32Codec(), Fp32Codec().encode(x))]


@pytest.mark.parametrize("index", range(len(CODEC_IDS)), ids=CODEC_IDS)
def test_decode_rejects_truncated_extended_random_and_foreign_payloads(index):
    payloads = _small_payloads()
    codec, payload = payloads[index]
    assert codec.decode(payload).shape == (3, 5)
    for cut in range(len(payload)):
        with pytest.raises(CodecError):
            codec.decode(payload[:cut])
    with pytest.raises(CodecError):
        codec.decode(payload + b"\x00")
    rng = np.random.default_rng(index)
    for n in range(0, 200, 3):
        with pytest.raises(CodecError):
            codec.decode(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
    for other, foreign in payloads:
        if other.codec_id != codec.codec_id:
            with pytest.raises(CodecError) as err:
                codec.decode(foreign)
            assert err.value.reason is CodecReason.WRONG_CODEC
    with pytest.raises(CodecError) as err:
        codec.decode("not bytes")  # type: ignore[arg-type]
    assert err.value.reason is CodecReason.NOT_BYTES


def test_decode_rejects_impossible_bodies():
    header = pack_header(TernaryCodec.codec_id, F32, (4,))
    with pytest.raises(CodecError) as err:
        TernaryCodec().decode(header + np.float32(1).tobytes() + bytes([0b11_01_01_01]))  # the code 3
    assert err.value.reason is CodecReason.BAD_VALUE
    for codec in (TernaryCodec(), SignCodec()):
        body = np.float32(-1).tobytes() + b"\x00"
        with pytest.raises(CodecError) as err:
            codec.decode(pack_header(codec.codec_id, F32, (4,)) + body)  # a negative scale
        assert err.value.reason is CodecReason.BAD_VALUE
    qsgd_header = pack_header(QsgdCodec.codec_id, F32, (4,))
    params = bytes([4]) + (512).to_bytes(4, "little")
    with pytest.raises(CodecError) as err:
        QsgdCodec().decode(qsgd_header + params + np.float32(-1).tobytes() + b"\x00\x00")  # a negative bucket scale
    assert err.value.reason is CodecReason.BAD_VALUE
    for bits, bucket in [(0, 512), (9, 512), (4, 0)]:
        with pytest.raises(CodecError) as err:
            QsgdCodec().decode(qsgd_header + bytes([bits]) + bucket.to_bytes(4, "little") + b"\x00" * 16)
        assert err.value.reason is CodecReason.BAD_PARAMETER
    with pytest.raises(CodecError) as err:
        Fp16Codec().decode(pack_header(Fp16Codec.codec_id, F32, (2**20, 2**20)) + b"\x00" * 8)
    assert err.value.reason is CodecReason.OVERSIZE


@FUZZ
@given(
    index=st.integers(0, len(CODEC_IDS) - 1),
    shape=st.lists(st.integers(0, 6), max_size=3),
    body=st.binary(max_size=96),
)
def test_decode_of_any_body_is_a_tensor_or_a_codec_error(index, shape, body):
    codec = codecs()[index]
    payload = pack_header(codec.codec_id, F32, tuple(shape)) + body
    try:
        y = codec.decode(payload)
    except CodecError:
        return
    assert y.shape == tuple(shape) and y.dtype == np.float32


# ------------------------------------------------------ shapes and specials


@FUZZ
@given(
    index=st.integers(0, len(CODEC_IDS) - 1),
    shape=st.lists(st.integers(0, 7), min_size=0, max_size=4),
    seed=st.integers(0, 2**32 - 1),
    scale=st.sampled_from([0.0, 1e-30, 1e-6, 1.0, 1e4, 1e30]),
)
def test_any_shape_round_trips_shape_and_dtype(index, shape, seed, scale):
    codec = codecs()[index]
    x = (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)
    payload = codec.encode(x)
    y = codec.decode(payload)
    assert y.shape == x.shape and y.dtype == np.float32
    assert len(payload) == expected_length(codec, x.shape)
    assert np.all(np.isfinite(y))


@pytest.mark.parametrize("codec", codecs(), ids=CODEC_IDS)
def test_input_conversion_and_zero_dim(codec):
    y = codec.decode(codec.encode(np.float64(2.5)))
    assert y.shape == () and y.dtype == np.float32
    x = np.arange(24, dtype=np.float64).reshape(4, 6)[:, ::2]  # float64, not contiguous
    assert codec.decode(codec.encode(x)).shape == (4, 3)


@pytest.mark.parametrize("codec", codecs(), ids=CODEC_IDS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_stay_non_finite(codec, bad):
    x = np.linspace(-1, 1, 40, dtype=np.float32)
    x[7] = bad
    y = codec.decode(codec.encode(x))
    assert not np.isfinite(y[7])
