"""Payload bytes are pinned: the speed work on the quantizers must not change them.

Every digest below was computed with the implementation before the speed-up
(numpy-only fp16 cast, payloads built with ``b"".join``), for the
encoded payload and for its decoding, over inputs built from raw PCG64 bits
(a stream NumPy keeps stable): random signs, exponents and mantissas, special
values (±0, ±Inf, NaN, ±65504 and beyond, subnormals), mostly-zero tensors
(with −0) and tiny buckets that take qsgd's subnormal-scale path. The codec
seeds fix qsgd's and ternary's rounding noise, so the digests also pin that
the noise stream (SplitMix64 keyed by the codec's generator) is unchanged.

The qsgd digests were re-pinned once, when qsgd moved from 23-bit to 16-bit
uniforms (four per SplitMix64 lane instead of two, for speed); every other
codec's digest is the original one. ``test_qsgd_noise_is_splitmix64_in_16_bit_cells``
checks the new stream against a pure-Python SplitMix64.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np
import pytest

from qfl.compression import make_codec
from qfl.compression import quantizers as Q
from qfl.compression.bitpack import unpack_bits

_SPECIALS = np.array(
    [0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, 65519.99, 65520.0, -65520.0, 1e-8, -6e-8, 2.0**-24, 2.0**-25,
     3e38, -3.4e38, 1e-45, -1e-45, 1.0, -1.0, 0.5],
    dtype=np.float32,
)


def _vector(shape, seed, low=100, span=45, specials=False, zeros=False):
    """float32 tensor from raw PCG64 bits (NumPy keeps that stream stable): random sign,
    biased exponent in [low, low + span), random mantissa; optionally special values at
    about 1% of the coordinates, or ±0 at about 2/3 of them."""
    n = int(np.prod(shape, dtype=np.int64))
    raw = np.random.PCG64(seed).random_raw(n)
    exponent = (low + (raw >> np.uint64(32)) % np.uint64(span)).astype(np.uint32)
    pattern = ((raw >> np.uint64(63)).astype(np.uint32) << np.uint32(31)) | (exponent << np.uint32(23))
    pattern |= (raw & np.uint64(0x7FFFFF)).astype(np.uint32)
    if zeros:
        pattern[(raw >> np.uint64(24)) % np.uint64(3) != 0] &= np.uint32(0x80000000)
    x = pattern.view(np.float32)
    if specials:
        at = (raw >> np.uint64(8)) % np.uint64(97) == 0
        x[at] = _SPECIALS[((raw[at] >> np.uint64(20)) % np.uint64(_SPECIALS.size)).astype(np.int64)]
    return x.reshape(shape)


def _cases():
    """(label, codec name, params, codec seed, shape, vector kwargs)."""
    out = []
    for shape in [(), (1,), (17,), (3, 5, 7), ((1 << 17) + 13,), ((1 << 20) + 37,)]:
        out.append(("fp16", "fp16", {}, 0, shape, {"low": 95, "span": 50}))
        out.append(("fp16s", "fp16", {}, 0, shape, {"low": 95, "span": 50, "specials": True}))
        out.append(("fp16z", "fp16", {}, 0, shape, {"low": 0, "span": 150, "zeros": True}))
        out.append(("bf16", "bf16", {}, 0, shape, {"low": 1, "span": 254, "specials": True}))
        out.append(("sign", "sign", {}, 0, shape, {}))
        out.append(("signz", "sign", {}, 0, shape, {"zeros": True}))
        out.append(("ternary", "ternary", {}, 11, shape, {}))
        for bits in range(1, 9):
            for bucket in (512, 3, 8, 100):
                out.append((f"qsgd{bits}x{bucket}", "qsgd", {"bits": bits, "bucket": bucket}, 100 + bits, shape, {}))
        for bits in (1, 4, 8):
            out.append((f"qsgd{bits}xbig", "qsgd", {"bits": bits, "bucket": 70000}, 7, shape, {}))
            out.append((f"qsgd{bits}xhuge", "qsgd", {"bits": bits, "bucket": 300000}, 7, shape, {"zeros": True}))
            big = {"specials": True, "low": 1, "span": 254}
            out.append((f"qsgd{bits}s", "qsgd", {"bits": bits, "bucket": 64}, 9, shape, big))
            out.append((f"qsgd{bits}z", "qsgd", {"bits": bits, "bucket": 4}, 9, shape, {"zeros": True, "low": 0, "span": 3}))
            out.append((f"qsgd{bits}t", "qsgd", {"bits": bits, "bucket": 16}, 9, shape, {"low": 0, "span": 30}))
    return out


_BY_LABEL: dict[str, list[tuple[int, str, dict, int, tuple[int, ...], dict]]] = defaultdict(list)
for _i, (_label, *_rest) in enumerate(_cases()):
    _BY_LABEL[_label].append((_i, *_rest))

# label -> sha256 (first 16 hex digits) of every payload and decoded tensor, in case order
PINNED = {
    'fp16': '5c8a6a671ff4f0c3',
    'fp16s': '4d960ec46509d7f8',
    'fp16z': '657e44c74cb5f9e3',
    'bf16': '1d51b1c31799ba99',
    'sign': 'a5dd993e82ecb754',
    'signz': 'ae6e68ed18c10f2c',
    'ternary': '3acd930594feba12',
    'qsgd1x512': '66a0f21509fbc25d',
    'qsgd1x3': 'dedf638dc2e11527',
    'qsgd1x8': '9d01f3039927b71d',
    'qsgd1x100': 'e8b530897cc678c0',
    'qsgd2x512': 'afa5327051b9669f',
    'qsgd2x3': '00ee842add4e7833',
    'qsgd2x8': '0f6092fd90d53a1b',
    'qsgd2x100': '87ce9b78393bca3c',
    'qsgd3x512': '448ce6ecd117f352',
    'qsgd3x3': '0878a3810694bd7c',
    'qsgd3x8': '98b34b5efc847c81',
    'qsgd3x100': '8cfbe03fc4a093fb',
    'qsgd4x512': '57016761256b29db',
    'qsgd4x3': '9cfb3aff42d7e075',
    'qsgd4x8': '58a58d5965727004',
    'qsgd4x100': '55a1b63bce41b908',
    'qsgd5x512': 'c258ce16e68816b0',
    'qsgd5x3': '21ee571c90f0ba49',
    'qsgd5x8': '4a7088302a79c357',
    'qsgd5x100': '07845aad6cc8bed9',
    'qsgd6x512': 'cf2c8470414cd445',
    'qsgd6x3': 'fc9d820e0e596eba',
    'qsgd6x8': '25b059a9cf33b9a5',
    'qsgd6x100': '4e6266b3319f9b0a',
    'qsgd7x512': '16a35e8d5494994a',
    'qsgd7x3': '89afae877d1df0f4',
    'qsgd7x8': 'ad0801e79314a128',
    'qsgd7x100': '4fbcb9d8d080b8b1',
    'qsgd8x512': '335b86dd651b8fbc',
    'qsgd8x3': '7026b35568409114',
    'qsgd8x8': '5731d1c1513eb691',
    'qsgd8x100': 'bd526bff0932cbbd',
    'qsgd1xbig': '0d0cb83e532aac85',
    'qsgd1xhuge': 'a33c8f3bd2e07794',
    'qsgd1s': '65ee49f135ed4fa4',
    'qsgd1z': '2301edcd1a381f78',
    'qsgd1t': '552d9acc8feb45d8',
    'qsgd4xbig': '00845e552709490c',
    'qsgd4xhuge': 'bc19dbce762c8951',
    'qsgd4s': '3b80a892b785a4c1',  # decodes changed: buckets with m > float32 max/4 no longer decode to inf
    'qsgd4z': 'e1baa830ddd0510e',
    'qsgd4t': 'c6d8f98778b9d776',
    'qsgd8xbig': 'f883c62ec8cfa96a',
    'qsgd8xhuge': 'd1423ea71c9fc23b',
    'qsgd8s': 'a70571f4c9b2ac31',  # (k·2/s − 1)·m clipped there
    'qsgd8z': 'bde9a67724b1f949',
    'qsgd8t': '9906152d2642723c',
}


@pytest.mark.parametrize("label", list(PINNED))
def test_payloads_and_decodings_are_pinned(label):
    digest = hashlib.sha256()
    for i, name, params, seed, shape, kwargs in _BY_LABEL[label]:
        x = _vector(shape, 1000 + i, **kwargs)
        codec = make_codec(name, {**params, "feedback": False}, seed=seed)
        with np.errstate(all="ignore"):
            payload = codec.encode(x)
            digest.update(payload)
            digest.update(codec.decode(payload).tobytes())
    assert digest.hexdigest()[:16] == PINNED[label]


def test_every_case_is_pinned():
    assert sorted(PINNED) == sorted(_BY_LABEL)


def test_fp16_fast_cast_and_its_exact_fallback_match_numpy():
    """In-range blocks take torch's cast, blocks with an overflow or a special take
    the integer path; both must agree with numpy's round-to-nearest-even cast."""
    halves = np.arange(2**16, dtype=np.uint16).view(np.float16).astype(np.float32)
    halves = halves[np.isfinite(halves) & (np.abs(halves) < 65504)].view(np.uint32)
    near = np.concatenate([halves, halves + 1, halves - 1, halves + 0x1000, halves + 0xFFF, halves + 0x1001])
    near = near.view(np.float32)
    near = near[np.abs(near) <= 65504]  # no block of these needs the fallback
    x = np.concatenate([near, _vector((1 << 17,), 5, low=95, span=50), near[::-1]])
    x[len(near) + 12345] = 70000.0  # one block with an overflow, one with a NaN
    x[len(near) + 100000] = np.nan
    codec = Q.Fp16Codec()
    payload = codec.encode(x)
    got = np.frombuffer(payload, np.uint16, offset=10)
    with np.errstate(over="ignore", invalid="ignore"):
        ref = np.clip(x, -65504, 65504).astype(np.float16).view(np.uint16)
    assert np.array_equal(got[~np.isnan(x)], ref[~np.isnan(x)])
    assert got[len(near) + 100000] == 0x7E00 and got[len(near) + 12345] == 0x7BFF


def test_payloads_are_fresh_bytes_and_inputs_may_be_read_only():
    x = _vector((3000,), 6)
    x.flags.writeable = False
    for codec in (Q.Fp16Codec(), Q.QsgdCodec(seed=1), Q.SignCodec()):
        first, second = codec.encode(x), codec.encode(x)
        assert type(first) is bytes and first is not second
        assert codec.decode(first).shape == (3000,)
    a = Q.Fp16Codec().encode(np.zeros(4, np.float32))
    b = Q.Fp16Codec().encode(np.ones(4, np.float32))
    assert a != b and hash(a) == hash(bytes(a))  # filled before anyone could hash or share them


def _splitmix64(key: int, lane: int) -> int:
    z = (key + (lane + 1) * 0x9E3779B97F4A7C15) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return z ^ (z >> 31)


def test_qsgd_noise_is_splitmix64_in_16_bit_cells():
    uniforms = Q._Uniforms(np.random.default_rng(3))
    first, count = 1 << 12, 1001
    out, scratch = np.empty(count, np.float32), np.empty(count + 4, np.float32)
    r = uniforms.draw16(first, count, out, scratch)
    expected = [
        1 + (((_splitmix64(uniforms.key, (first + i) // 4) >> (16 * ((first + i) % 4))) & 0xFFFF) + 0.5) / 2**16
        for i in range(count)
    ]
    assert np.array_equal(r.astype(np.float64), np.array(expected))
    # the midpoints of 2^16 cells: exactly representable, mean 3/2
    cells = np.arange(2**16, dtype=np.float64)
    assert np.mean(1 + (cells + 0.5) / 2**16) == 1.5


@pytest.mark.parametrize("bits", range(1, 9))
def test_qsgd_indices_are_clipped_when_rounding_overshoots(bits, monkeypatch):
    """With extreme uniforms (1 and 2 − 2⁻²³, beyond draw16's 1 + 2⁻¹⁷ and 2 − 2⁻¹⁷), x = ±m can round to index −1 or s + 1;
    the encoder must send 0 and s, exactly as clipping the float32 patterns does."""
    s = (1 << bits) - 1
    half = np.float32(s / 2)
    rng = np.random.default_rng(bits)
    m = rng.uniform(0.5, 2, 4000).astype(np.float32)
    m = np.concatenate([m[m * (half / m) > half][:20], m[m * (half / m) < half][:20], m[:20]])
    x = np.stack([m, -m, m * np.float32(0.3), -m], axis=1).astype(np.float32)  # one bucket per row
    r = np.where(np.arange(x.size) % 4, np.float32(1), np.float32(2 - 2.0**-23)).astype(np.float32)  # max for +m
    r[2::4] = rng.uniform(1, 2, r[2::4].size).astype(np.float32)
    monkeypatch.setattr(Q._Uniforms, "draw16", lambda self, first, count, out, scratch: r[first : first + count])
    codec = Q.QsgdCodec(bits=bits, bucket=4, seed=0)
    payload = codec.encode(x)
    got = unpack_bits(payload[6 + 4 * x.ndim + 5 + 4 * m.size :], bits, x.size)
    with np.errstate(over="ignore"):
        t = (x * (half / m)[:, None]).reshape(-1) + r + np.float32(Q._MAGIC + 2 ** (bits - 1) - 2)
    pattern = np.clip(t.view(np.uint32), np.float32(Q._MAGIC).view(np.uint32), np.float32(Q._MAGIC + s).view(np.uint32))
    assert np.array_equal(got, (pattern & 0xFF).astype(np.uint8))
    assert {0, s} <= set(got.tolist())


def test_qsgd_payloads_do_not_depend_on_the_thread_count():
    torch = pytest.importorskip("torch")
    saved = torch.get_num_threads()
    x = _vector((1 << 20) + 37, 8, zeros=True)
    payloads = {}
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            assert Q.encode_threads(x.size) == count and Q.encode_threads(1000) == 1
            payloads[count] = Q.QsgdCodec(bits=3, bucket=100, seed=4).encode(x)
    finally:
        torch.set_num_threads(saved)
    assert payloads[1] == payloads[2] == payloads[3]
