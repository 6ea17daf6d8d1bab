"""Payload bytes are pinned: the speed work on the quantizers must not change them.

Every digest below was computed with the implementation before the speed-up
(numpy-only fp16 cast, payloads built with ``b"".join``), for the
encoded payload and for its decoding, over inputs built from raw PCG64 bits
(a stream NumPy keeps stable): random signs, exponents and mantissas, special
values (±0, ±Inf, NaN, ±65504 and beyond, subnormals), mostly-zero tensors
(with −0) and tiny buckets that take qsgd's subnormal-scale path. The codec
seeds fix qsgd's and ternary's rounding noise, so the digests also pin that
the noise stream (SplitMix64 keyed by the codec's generator) is unchanged.
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
    'qsgd1x512': '3848e5e433831f11',
    'qsgd1x3': '003323aed7c41f1a',
    'qsgd1x8': 'ed0597dba33b6b5a',
    'qsgd1x100': '3fc87df1f3d6555c',
    'qsgd2x512': 'fb6f930159b620d2',
    'qsgd2x3': '779992a34ab615ce',
    'qsgd2x8': '0980aae78b545934',
    'qsgd2x100': '520708365bb464b2',
    'qsgd3x512': '62a3d2618df5e021',
    'qsgd3x3': '77f2d5fb7a8890af',
    'qsgd3x8': 'f3b94d505ebb44fb',
    'qsgd3x100': '9d7ed4e327e9ddba',
    'qsgd4x512': '33ed59316f78f4c7',
    'qsgd4x3': 'bc4921ca2042a3e9',
    'qsgd4x8': '3a1a874b84986937',
    'qsgd4x100': '5dd4caa7e1db55e0',
    'qsgd5x512': '53a8fc3aeaa45119',
    'qsgd5x3': '7e12f6e5198d883a',
    'qsgd5x8': '02b04232d3333122',
    'qsgd5x100': '3de35ed851c2beb4',
    'qsgd6x512': '1c4aef0acc747364',
    'qsgd6x3': '0d27ac8935fa37b1',
    'qsgd6x8': '4d6719233149bd9d',
    'qsgd6x100': '8fee83460928282e',
    'qsgd7x512': 'b19fd8a73acf9c99',
    'qsgd7x3': '6d00e9fb7fe9821d',
    'qsgd7x8': '16ca0c39237389a4',
    'qsgd7x100': 'a5fa7d8fc7c823dd',
    'qsgd8x512': '1da2188d2434477c',
    'qsgd8x3': 'fc7bff183ddd6cb4',
    'qsgd8x8': 'e3ec2f5be7532473',
    'qsgd8x100': '452afd53b8a1890b',
    'qsgd1xbig': '0d30c8f936980c20',
    'qsgd1xhuge': 'df8c63c370c15fb4',
    'qsgd1s': '1ff9673e907e17c4',
    'qsgd1z': '818c00e6e9dad1f5',
    'qsgd1t': '564fc0132ee172ad',
    'qsgd4xbig': 'd1f02c977b6196e5',
    'qsgd4xhuge': '899f7fdbcc37ac47',
    'qsgd4s': 'ec275fa276f0b122',
    'qsgd4z': '80da7057d228387d',
    'qsgd4t': 'bb42859385328ef5',
    'qsgd8xbig': '1582b0bf7ff6650e',
    'qsgd8xhuge': '8eee4d6aba9c59b6',
    'qsgd8s': '3c7d269da9fb6d04',
    'qsgd8z': 'f011dd193364d8e5',
    'qsgd8t': '0c7d999760440866',
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


@pytest.mark.parametrize("bits", range(1, 9))
def test_qsgd_indices_are_clipped_when_rounding_overshoots(bits, monkeypatch):
    """With the extreme uniforms (1 and 2 − 2⁻²³), x = ±m can round to index −1 or s + 1;
    the encoder must send 0 and s, exactly as clipping the float32 patterns does."""
    s = (1 << bits) - 1
    half = np.float32(s / 2)
    rng = np.random.default_rng(bits)
    m = rng.uniform(0.5, 2, 4000).astype(np.float32)
    m = np.concatenate([m[m * (half / m) > half][:20], m[m * (half / m) < half][:20], m[:20]])
    x = np.stack([m, -m, m * np.float32(0.3), -m], axis=1).astype(np.float32)  # one bucket per row
    r = np.where(np.arange(x.size) % 4, np.float32(1), np.float32(2 - 2.0**-23)).astype(np.float32)  # max for +m
    r[2::4] = rng.uniform(1, 2, r[2::4].size).astype(np.float32)
    monkeypatch.setattr(Q._Uniforms, "draw", lambda self, first, count, z, w: r[first : first + count])
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
