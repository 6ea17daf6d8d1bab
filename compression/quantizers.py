"""Quantizers: fewer bits per coordinate, no coordinate dropped.

=========  ==  =====================================  ========  ===========
codec      id  bits per coordinate (d coordinates)    unbiased  contractive
=========  ==  =====================================  ========  ===========
fp16        2  16                                     no        yes
bf16        3  16                                     no        yes
qsgd        4  bits + 32/bucket (+40 bits a tensor)   yes       no
ternary     5  2                (+32 bits a tensor)   yes       no
sign        6  1                (+32 bits a tensor)   no        yes
=========  ==  =====================================  ========  ===========

Every payload is the wire header (``wire.py``, 6 + 4·ndim bytes) followed by
the body described in each class; numbers are little-endian, scales are
float32, and packed integers use :mod:`bitpack`'s little-endian bit order.

Non-finite inputs stay visible: a NaN or ±Inf anywhere in what a codec
summarises by one scale (the tensor, or a qsgd bucket) decodes to NaN or Inf,
so the server's NaN/Inf check (``payload.decode_update``) still sees a
diverged client. Decoders therefore accept NaN/Inf scales, but reject
negative scales, impossible codes and wrong lengths with :class:`CodecError`.

Speed: each codec walks the tensor in blocks (:data:`bitpack.BLOCK`
coordinates; qsgd: ``_QSGD_BLOCK``) with preallocated scratch, so that
temporaries stay in cache and no block allocates (allocations above glibc's
mmap threshold page-fault on every call); all work is whole-block numpy
operations. fp16 and qsgd write their body straight into the payload
(:class:`_Payload`) instead of copying it there. fp16 encodes with torch's
vectorised CPU cast (numpy's float16 cast is scalar code) and redoes the
blocks that hold Inf, NaN or values beyond ±65504 with an exact integer
conversion; bf16 and the fp16 decoder work on the float32 bit patterns with
integer operations. All are exact IEEE round-to-nearest-even (tests check
them against numpy's cast). qsgd's encoder spends about half its time on its
uniforms (eleven numpy passes over their 64-bit lanes); it splits tensors of
two blocks and more over :func:`encode_threads` threads (torch's intra-op
thread count), with the same payload for any count. Every other codec runs
on the calling thread.
"""

from __future__ import annotations

import ctypes
import struct
import sys
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from types import ModuleType
from typing import Any

import numpy as np

from .bitpack import BLOCK, _pack_into, _unpack_into, packed_size
from .codec import Codec, CodecError, CodecReason, CodecTraits, EncodeContext
from .wire import Header, pack_header, unpack_header

__all__ = ["Bf16Codec", "Fp16Codec", "QsgdCodec", "SignCodec", "TernaryCodec"]

_F32 = np.dtype("<f4")
_U32 = np.dtype("<u4")
_U16 = np.dtype("<u2")
_U64 = np.dtype("<u8")
_SCALE = struct.Struct("<f")
_F32_INF = 0x7F800000  # float32 pattern of +Inf; larger |x| patterns are NaN


def _flatten(x: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """``x`` as a flat C-contiguous float32 array (copied only if needed), and its shape."""
    a = np.asarray(x, dtype=_F32, order="C")
    return a.reshape(-1), a.shape


def _open(payload: bytes, codec: Codec) -> tuple[Header, np.ndarray]:
    """Check the header; return it and the body as a read-only uint8 array."""
    header = unpack_header(payload, codec.codec_id)
    body = np.frombuffer(memoryview(payload)[header.size :], dtype=np.uint8)
    return header, body


def _expect(codec: Codec, header: Header, body: np.ndarray, expected: int) -> None:
    if body.size != expected:
        raise CodecError(
            f"{codec.name} payload for shape {header.shape} needs {expected} body bytes, got {body.size}", reason=CodecReason.WRONG_LENGTH
        )


def _open_scaled(payload: bytes, codec: Codec, bits: int) -> tuple[Header, np.float32, np.ndarray]:
    """Header, float32 scale (>= 0 or NaN/Inf) and packed ``bits``-bit codes of a scale + codes body."""
    header, body = _open(payload, codec)
    _expect(codec, header, body, 4 + packed_size(header.numel, bits))
    scale = body[:4].view(_F32)[0]
    if scale < 0:
        raise CodecError(f"{codec.name} payload has a negative scale {scale}", reason=CodecReason.BAD_VALUE)
    return header, scale, body[4:]


def _join(header: bytes, *parts: np.ndarray | bytes) -> bytes:
    return b"".join((header, *parts))  # type: ignore[arg-type]  # ndarray is a buffer; numpy's stubs say so only for Python >= 3.12


# A bytes object of a given size whose contents the caller fills in (CPython's
# C API; the documented contract is that the caller fills it before sharing it).
_new_bytes: Any  # the C function, or None off CPython
if sys.implementation.name == "cpython":
    _new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
    _new_bytes.restype = ctypes.py_object
    _new_bytes.argtypes = (ctypes.c_char_p, ctypes.c_ssize_t)
else:  # pragma: no cover - other interpreters build a bytearray and copy it once
    _new_bytes = None

# Large payloads ask Linux for transparent huge pages, as numpy does for its
# own arrays of 4 MiB and more: a payload is fresh memory, and faulting it in
# 4 KiB pages costs more than an fp16 encode (2 MiB pages cost ~1/5 of that).
# Where huge pages are off, madvise does nothing.
_HUGE_PAGE = 1 << 21
_MADV_HUGEPAGE = 14
_madvise: Any  # the C function, or None where there is none
if sys.platform.startswith("linux"):
    try:
        _madvise = ctypes.CDLL(None).madvise
        _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    except (OSError, AttributeError):  # pragma: no cover
        _madvise = None
else:  # pragma: no cover
    _madvise = None


class _Payload:
    """``header`` followed by a body of ``size`` bytes that the encoder fills in place.

    ``body`` is a writable uint8 array over the payload's own memory; fill all
    of it, then :meth:`done` returns the payload as ``bytes`` without copying
    it (``b"".join`` of a large body costs more than most encodes: every page
    of the new object faults on first write, then the body is copied). The
    array must not be used after :meth:`done`.
    """

    def __init__(self, header: bytes, size: int) -> None:
        total = len(header) + size  # >= 6: never one of CPython's shared empty or 1-byte objects
        if _new_bytes is not None:
            self._data: bytes | bytearray = _new_bytes(None, total)
            address = ctypes.cast(ctypes.c_char_p(self._data), ctypes.c_void_p).value
            assert address is not None  # the buffer of a live bytes object
            start, end = -(-address // _HUGE_PAGE) * _HUGE_PAGE, (address + total) // _HUGE_PAGE * _HUGE_PAGE
            if _madvise is not None and end - start >= 2 * _HUGE_PAGE:
                _madvise(start, end - start, _MADV_HUGEPAGE)  # before the first write faults the pages in
            # a ctypes array is a buffer; typeshed says so only for Python >= 3.12
            whole = np.frombuffer((ctypes.c_char * total).from_address(address), np.uint8)  # type: ignore[call-overload]
        else:  # pragma: no cover
            self._data = bytearray(total)
            whole = np.frombuffer(self._data, np.uint8)
        whole[: len(header)] = np.frombuffer(header, np.uint8)
        self.body = whole[len(header) :]

    def done(self) -> bytes:
        self.body = None
        return self._data if isinstance(self._data, bytes) else bytes(self._data)


# torch runs an elementwise op on the calling thread up to its grain size,
# 32768 elements; above it, on its intra-op threads, whose start-up costs more
# than the op on a small machine. Codecs call torch on pieces of this size.
_TORCH_SERIAL = 1 << 15


def encode_threads(n: int) -> int:
    """Threads for an encode of ``n`` coordinates: torch's intra-op thread count
    (``torch.set_num_threads``, ``OMP_NUM_THREADS``), at most one per qsgd block,
    and one below two blocks (not worth starting threads for)."""
    if n < 2 * _QSGD_BLOCK:
        return 1
    return max(1, min(_torch().get_num_threads(), n // _QSGD_BLOCK))


@cache
def _torch() -> ModuleType:
    """torch, imported on first use (importing it takes about a second)."""
    import torch

    return torch


def _tensor(a: np.ndarray) -> Any:
    """A torch.Tensor over ``a``'s memory (no copy). Read-only arrays are only
    read, so torch's warning that it cannot mark them read-only is silenced."""
    torch = _torch()
    if a.flags.writeable:
        return torch.from_numpy(a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


# -------------------------------------------------------------- randomness

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
# qsgd's encoder and decoder work in blocks of this many coordinates (a bucket
# that fits one is never split): larger than BLOCK, because the encoder makes
# about 30 numpy calls a block and their overhead outweighs L2 misses up to here.
_QSGD_BLOCK = 1 << 18
_RANDOM_PIECE = _QSGD_BLOCK  # coordinates per piece (two per 64-bit lane: 1 MiB of lanes)
_STEPS = np.arange(1, _RANDOM_PIECE // 2 + 1, dtype=_U64) * _GOLDEN  # wraps mod 2**64


def _mix(key: int, lane: int, z: np.ndarray, w: np.ndarray) -> np.ndarray:
    """SplitMix64 outputs of lanes ``lane`` .. ``lane + z.size`` of the stream keyed by ``key``, into ``z``.

    Lane j is mix(key + (j + 1)·golden); ``w`` is scratch of the same size (at
    most ``_RANDOM_PIECE // 2`` lanes).
    """
    base = np.uint64((key + lane * int(_GOLDEN)) & (2**64 - 1))
    np.add(_STEPS[: z.size], base, out=z)
    np.right_shift(z, np.uint64(30), out=w)
    z ^= w
    z *= _MIX1
    np.right_shift(z, np.uint64(27), out=w)
    z ^= w
    z *= _MIX2
    np.right_shift(z, np.uint64(31), out=w)
    z ^= w
    return z


def _splitmix(key: int, lane: int, z: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Uniforms on [1, 2) of lanes ``lane`` .. ``lane + z.size`` of the stream keyed by ``key``.

    Lane j's (:func:`_mix`) low and high 32-bit halves give coordinates 2j and
    2j + 1: 23 random mantissa bits under exponent 0. Returns a float32 view of
    ``z`` (2·z.size values); ``w`` is scratch of the same size.
    """
    r = _mix(key, lane, z, w).view(_U32)
    r >>= np.uint32(9)
    r |= np.uint32(0x3F800000)
    return r.view(_F32)


class _Uniforms:
    """Float32 uniforms on [1, 2) for one encode call.

    The codec's ``np.random.Generator`` draws one 64-bit key per call; the
    stream is SplitMix64 (Steele, Lea & Flood 2014; Java's SplittableRandom)
    from that key, computed for a whole piece at once with numpy
    (:func:`_splitmix`). Coordinate i's uniform depends on the key and i only,
    so blocks can be drawn in any order and on any thread. This is about 1.7×
    faster than ``Generator.random(dtype=np.float32)``, which makes one C call
    per number.

    Two resolutions: :meth:`pieces` (ternary) gives 23 random bits per
    coordinate, two coordinates per 64-bit lane; :meth:`draw16` (qsgd) gives
    16, four per lane, 1 + (j + 1/2)/2¹⁶ for j uniform on 0..2¹⁶ − 1 (the
    midpoints of 2¹⁶ equal cells, so the mean is exactly 3/2), which halves the
    mixing work.
    """

    def __init__(self, rng: np.random.Generator, capacity: int = 0) -> None:
        self.key = int(rng.integers(0, 2**64, dtype=np.uint64))
        self.used = 0  # lanes drawn so far by pieces()
        self.lanes = self.scratch(capacity)  # pieces()' buffers

    @staticmethod
    def scratch(capacity: int) -> tuple[np.ndarray, np.ndarray]:
        """Lane buffers (z, w) for draws of up to ``capacity`` coordinates at a time."""
        lanes = max(1, min(_RANDOM_PIECE, capacity + 1) // 2)
        return np.empty(lanes, _U64), np.empty(lanes, _U64)

    def draw16(self, first: int, count: int, out: np.ndarray, scratch: np.ndarray) -> np.ndarray:
        """The 16-bit uniforms of coordinates ``first`` .. ``first + count`` (``first`` a
        multiple of 4, ``count`` at most ``2·_RANDOM_PIECE``) as ``out[:count]``
        (float32, written); ``scratch``: float32, at least 4·⌈count/4⌉ values, 8-byte aligned."""
        half = 2 * ((count + 3) // 4)  # float32s per lane buffer: ⌈count/4⌉ lanes
        z = scratch[:half].view(_U64)
        w = scratch[half : 2 * half].view(_U64)
        _mix(self.key, first // 4, z, w)
        bits = out[:count].view(_U32)
        np.copyto(bits, z.view(np.uint16)[:count], casting="unsafe")
        bits <<= np.uint32(7)  # j in mantissa bits 22..7
        bits |= np.uint32(0x3F800040)  # exponent of [1, 2), and the half cell (bit 6)
        return out[:count]

    def pieces(self, n: int) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield (lo, hi, r) covering the next ``n`` coordinates of the stream, r uniform on [1, 2)."""
        z, w = self.lanes
        for lo in range(0, n, 2 * z.size):
            hi = min(lo + 2 * z.size, n)
            lanes = (hi - lo + 1) // 2
            r = _splitmix(self.key, self.used, z[:lanes], w[:lanes])
            self.used += lanes
            yield lo, hi, r[: hi - lo]


def _generator(seed: int | None) -> np.random.Generator:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise ValueError(f"seed must be an integer or None, got {seed!r}")
    return np.random.default_rng(seed)


# --------------------------------------------------------------------- fp16

_F16_MIN_NORMAL = np.uint32(0x38800000)  # float32 pattern of 2**-14, the smallest normal fp16
_F16_MAX = np.uint32(0x477FE000)  # float32 pattern of 65504, the largest finite fp16
# (pattern - 2**-14 pattern + 0xFFF + odd) >> 13 is the fp16 pattern minus 0x400.
_F16_BIAS = np.uint32((0xFFF - 0x38800000) & 0xFFFFFFFF)


def _f32_to_f16_bits(x: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> None:
    """fp16 patterns (round to nearest even) of float32 ``x`` into uint16 ``out``.

    ``scratch``: uint32, shape (3, x.size). Finite values beyond ±65504 become
    ±65504; ±Inf and NaN are kept. Normal results: round the float32 pattern
    at bit 13 after rebasing the exponent. Subnormal results: |x| + 0.5 in
    float32 rounds |x| to a multiple of 2**-24, whose count is the low bits of
    the sum's pattern. Each path saturates at 2**-14 (fp16 pattern 0x400), so
    the sum of the two less 0x400 is the answer.
    """
    u = x.view(_U32)
    a, t, w = scratch
    np.bitwise_and(u, np.uint32(0x7FFFFFFF), out=a)
    top = int(a.max())
    np.clip(a, _F16_MIN_NORMAL, _F16_MAX, out=t)
    np.right_shift(t, np.uint32(13), out=w)
    w &= np.uint32(1)
    t += w
    t += _F16_BIAS
    t >>= np.uint32(13)  # fp16 pattern - 0x400 (normal), 0 (subnormal)
    np.clip(a, np.uint32(0), _F16_MIN_NORMAL, out=w)
    sub = w.view(_F32)
    sub += np.float32(0.5)  # pattern 0x3F000000 + subnormal count (0x400 if normal)
    t += w  # low 16 bits: the fp16 pattern of |x|
    np.right_shift(u, np.uint32(16), out=w)
    w &= np.uint32(0x8000)
    t |= w
    np.copyto(out, t, casting="unsafe")  # keeps the low 16 bits
    if top >= _F32_INF:  # Inf or NaN somewhere: restore them
        bad = a >= _F32_INF
        out[bad] = np.where(a[bad] > _F32_INF, 0x7E00, 0x7C00) | ((u[bad] >> 16) & 0x8000)


def _f16_bits_to_f32(h: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> None:
    """Exact float32 values of fp16 patterns ``h`` into ``out``; ``scratch``: uint32 like ``h``.

    The pattern, sign-extended and shifted to float32's mantissa position, is
    the fp16 value times 2**-112 (subnormals included); multiplying by 2**112
    is exact.
    """
    np.copyto(scratch.view(np.int32), h.view("<i2"))  # sign-extends
    scratch <<= np.uint32(13)
    scratch &= np.uint32(0x8FFFFFFF)  # sign at bit 31, exponent and mantissa at bits 13..27
    np.multiply(scratch.view(_F32), np.float32(2.0**112), out=out)
    if not -65536 < out.min() <= out.max() < 65536:  # exponent 31 (Inf, NaN) lands on ±2**16..2**17
        bad = (h & 0x7C00) == 0x7C00
        values = np.where(h[bad] & 0x3FF, np.float32(np.nan), np.float32(np.inf))
        out[bad] = np.where(h[bad] & 0x8000, -values, values)


class Fp16Codec(Codec):
    """IEEE half precision, round to nearest even, clipped to ±65504.

    Bits: 16·d + 8·(6 + 4·ndim). Body: d little-endian fp16 values.
    Deterministic (Var = 0); the bias is the rounding error,
    |x̂ᵢ − xᵢ| ≤ 2⁻¹¹·|xᵢ| for 2⁻¹⁴ ≤ |xᵢ| ≤ 65504 and ≤ 2⁻²⁵ below (subnormals).
    Finite |xᵢ| > 65504 is sent as ±65504 (clipped, never turned into Inf);
    ±Inf and NaN stay Inf and NaN. Contractive: |x̂ᵢ − xᵢ| < |xᵢ| for xᵢ ≠ 0,
    with δ ≥ 1 − 2⁻²² when every |xᵢ| is in the normal range (δ → 0 only for
    tensors entirely below 2⁻²⁵ in magnitude, which flush to zero).
    """

    name = "fp16"
    codec_id = 2
    traits = CodecTraits(
        unbiased=False, contractive=True, commutes_with_sum=False, stateful=False, lossless=False
    )

    def encode(self, x: np.ndarray, ctx: EncodeContext | None = None) -> bytes:
        flat, shape = _flatten(x)
        n = flat.size
        payload = _Payload(pack_header(self.codec_id, _F32, shape), 2 * n)
        out = payload.body.view(_U16)
        if n:
            # torch's CPU cast: IEEE round to nearest even and vectorised, but
            # finite values beyond ±65504 become Inf and NaN payloads are kept.
            # Blocks whose result holds an Inf or NaN pattern are redone with the
            # exact integer conversion.
            half = out.view(np.float16)
            for lo in range(0, n, _TORCH_SERIAL):
                hi = min(lo + _TORCH_SERIAL, n)
                _tensor(half[lo:hi]).copy_(_tensor(flat[lo:hi]))
            if out.view(np.int16).max() >= 0x7C00 or out.max() >= 0xFC00:
                scratch = np.empty((3, min(n, BLOCK)), _U32)
                for lo in range(0, n, BLOCK):
                    hi = min(lo + BLOCK, n)
                    h = out[lo:hi]
                    if h.view(np.int16).max() >= 0x7C00 or h.max() >= 0xFC00:
                        _f32_to_f16_bits(flat[lo:hi], h, scratch[:, : hi - lo])
        return payload.done()

    def decode(self, payload: bytes) -> np.ndarray:
        header, body = _open(payload, self)
        _expect(self, header, body, 2 * header.numel)
        h = body.view(_U16)
        out = np.empty(h.size, np.float32)
        scratch = np.empty(min(h.size, BLOCK), _U32)
        for lo in range(0, h.size, BLOCK):
            hi = min(lo + BLOCK, h.size)
            _f16_bits_to_f32(h[lo:hi], out[lo:hi], scratch[: hi - lo])
        return out.reshape(header.shape)


# --------------------------------------------------------------------- bf16

_BF16_OVERFLOW = 0x7F7F8000  # |x| patterns from here (below Inf) round up to Inf
_BF16_MAX = 0x7F7F  # largest finite bf16 pattern, 3.3895e38


class Bf16Codec(Codec):
    """bfloat16: the upper 16 bits of the float32, rounded to nearest even.

    Bits: 16·d + 8·(6 + 4·ndim). Body: d little-endian bf16 patterns.
    Deterministic (Var = 0); the bias is the rounding error,
    |x̂ᵢ − xᵢ| ≤ 2⁻⁸·|xᵢ| for normal float32 values (8 significant bits; same
    exponent range as float32). As for fp16, finite values that would round
    up to Inf (|xᵢ| ≥ (2 − 2⁻⁸)·2¹²⁷) are clipped to ±3.3895e38, while ±Inf stay
    Inf and NaN stays NaN. Contractive like fp16 (δ ≥ 1 − 2⁻¹⁶ for normal values).
    """

    name = "bf16"
    codec_id = 3
    traits = CodecTraits(
        unbiased=False, contractive=True, commutes_with_sum=False, stateful=False, lossless=False
    )

    def encode(self, x: np.ndarray, ctx: EncodeContext | None = None) -> bytes:
        flat, shape = _flatten(x)
        out = np.empty(flat.size, _U16)
        scratch = np.empty(min(flat.size, BLOCK), _U32)
        for lo in range(0, flat.size, BLOCK):
            hi = min(lo + BLOCK, flat.size)
            chunk, w = flat[lo:hi], scratch[: hi - lo]
            u = chunk.view(_U32)
            np.right_shift(u, np.uint32(16), out=w)
            w &= np.uint32(1)
            w += u
            w += np.uint32(0x7FFF)  # + 0x7FFF + odd, then drop 16 bits: round to nearest even
            w >>= np.uint32(16)
            np.copyto(out[lo:hi], w, casting="unsafe")
            if not -3.3e38 < chunk.min() <= chunk.max() < 3.3e38:  # NaN, Inf or near overflow
                self._fix_specials(u, out[lo:hi])
        return _join(pack_header(self.codec_id, _F32, shape), out)

    @staticmethod
    def _fix_specials(u: np.ndarray, dest: np.ndarray) -> None:
        """NaN (whose rounding can carry into Inf or the sign) and finite overflow."""
        a = u & 0x7FFFFFFF
        sign = ((u >> 16) & 0x8000).astype(_U16)
        nan = a > _F32_INF
        dest[nan] = sign[nan] | 0x7FC0
        big = (a >= _BF16_OVERFLOW) & (a < _F32_INF)
        dest[big] = sign[big] | _BF16_MAX

    def decode(self, payload: bytes) -> np.ndarray:
        header, body = _open(payload, self)
        _expect(self, header, body, 2 * header.numel)
        h = body.view(_U16)
        out = np.empty(h.size, _U32)
        for lo in range(0, h.size, BLOCK):
            block = out[lo : lo + BLOCK]
            np.copyto(block, h[lo : lo + BLOCK])
            block <<= np.uint32(16)
        return out.view(_F32).reshape(header.shape)


# --------------------------------------------------------------------- qsgd

_QSGD_PARAMS = struct.Struct("<BI")  # bits, bucket
_MAGIC = 1.5 * 2.0**23  # float32 sums in [2**23, 2**24) are integers: adding it rounds
_SMALL_SCALE = np.float32(1e-30)  # bucket scales above it have a finite s/2m (s < 256)
# bucket scales above it may overflow k·Δ (≤ s·Δ ≈ 2m): the decoder uses (k·2/s − 1)·m there
QSGD_HUGE_SCALE = np.float32(np.finfo(np.float32).max / 4)


def _f32_clip(clip: float) -> np.float32:
    """The clip bound as a float32 scale; ValueError if float32 cannot hold it as a normal number."""
    m = np.float32(clip)
    if not np.finfo(np.float32).tiny <= m < np.inf:
        raise ValueError(
            f"clip bound {clip!r} is outside float32's normal range; qsgd and ternary quantize in float32: "
            "set secure_clip between 1e-30 and 1e30"
        )
    return m


class QsgdCodec(Codec):
    """QSGD (Alistarh et al. 2017) with per-bucket max scaling and stochastic rounding.

    Scheme: the flattened (C order) tensor is cut into buckets of ``bucket``
    coordinates (the last may be shorter). Bucket j with m = max |xᵢ|
    (float32) uses the 2**bits grid points −m + kΔ, k = 0..s, with
    s = 2**bits − 1 and Δ = 2m/s (zero is not a grid point unless m = 0;
    bits=1 is a stochastic sign scaled by m). Coordinate i, at grid position
    t = (xᵢ + m)/Δ ∈ [0, s], is sent as k = ⌊t⌋ + 1 with probability t − ⌊t⌋
    and as ⌊t⌋ otherwise; the decoder returns k·Δ − m (for m subnormal or
    above float32 max/4, where k·Δ could lose its precision or overflow:
    (k·2/s − 1)·m clipped to [−m, m]). So

        E[x̂ᵢ] = xᵢ,    Var[x̂ᵢ] = Δ²·f(1 − f) ≤ Δ²/4 = m²/s²,   f = t − ⌊t⌋,

    up to the resolution of the noise and of float32: the uniforms are the
    midpoints of 2¹⁶ equal cells (``_Uniforms.draw16``), which biases
    P(k = ⌊t⌋ + 1) by at most 2⁻¹⁷, and t is formed in float32, within
    2⁻¹⁶·Δ for bits=8 and less for fewer bits.

    Body: uint8 bits, uint32 bucket, then ⌈d/bucket⌉ float32 scales m, then
    the d indices k packed at ``bits`` bits each. Bits: bits·d +
    32·⌈d/bucket⌉ + 40 + 8·(6 + 4·ndim), ≈ bits + 32/bucket per coordinate.
    The decoder takes bits and bucket from the payload, not from itself.

    Randomness: each instance owns a ``np.random.Generator`` seeded with
    ``seed`` (None: fresh OS entropy) that keys a SplitMix64 stream per
    encode (see ``_Uniforms``). Clients must not share an instance or a seed,
    or their rounding noise is correlated; ``ctx.seed`` (shared by all clients
    of a round) is therefore not used.

    Commutes with sum given a scale shared by the round: this codec picks its
    own scale per bucket, but with one clip bound C for every client (what a
    masked sum's round plan sets) the grid indices of n clients add up to an
    index of the sum on the same grid (widened by ⌈log2 n⌉ bits). That ring
    form (:meth:`ring_round`) is this quantizer with m = C for every
    coordinate, after clipping to [−C, C]; m is not sent, and ``bucket`` has
    no meaning there (a masked sum refuses ``codec.bucket``).
    """

    name = "qsgd"
    codec_id = 4
    traits = CodecTraits(
        unbiased=True, contractive=False, commutes_with_sum=True, stateful=False, lossless=False
    )

    def __init__(self, bits: int = 4, bucket: int = 512, seed: int | None = None) -> None:
        if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
            raise ValueError(f"qsgd bits must be in 1..8, got {bits!r}")
        if isinstance(bucket, bool) or not isinstance(bucket, (int, np.integer)) or not 1 <= bucket < 2**32:
            raise ValueError(f"qsgd bucket must be an integer in 1..2**32-1, got {bucket!r}")
        self.bits = int(bits)
        self.bucket = int(bucket)
        self.rng = _generator(seed)

    def __repr__(self) -> str:
        return f"QsgdCodec(bits={self.bits}, bucket={self.bucket})"

    ring_refuses = {
        "bucket": "a masked sum scales every coordinate by the round's shared clip bound C, so qsgd has "
        "no per-bucket scales there; remove codec.bucket (or use security=channel-pad to keep buckets)",
    }

    def ring_levels(self) -> int:
        """s = 2^bits − 1: QSGD's grid."""
        return (1 << self.bits) - 1

    def ring_round(self, values: np.ndarray, clip: float, rng: np.random.Generator) -> np.ndarray:
        """QSGD's own quantizer (:meth:`quantize_into`) with the shared scale m = C on ``clip(v, −C, C)``.

        Codes k ∈ [0, s] on the grid −C + kΔ, Δ = 2C/s:
        E[kΔ − C] = clip(v, −C, C), Var ≤ Δ²/4 = C²/s² per coordinate (n clients' sum: ≤ n·C²/s²),
        up to the float32 resolution of the class docstring, with C rounded to
        float32 (a relative error below 2⁻²⁴). The noise: one 64-bit draw of ``rng``.
        """
        m = _f32_clip(clip)
        flat = np.clip(np.asarray(values, dtype=_F32).reshape(-1), -m, m)
        data = np.empty(self.quantized_size(flat.size), np.uint8)
        self.quantize_into(flat, data, rng, scale=m)
        codes = np.empty(flat.size, np.uint8)
        if flat.size:
            _unpack_into(data[4 * -(-flat.size // self.bucket) :], self.bits, codes)
        return codes.astype(np.uint64)

    @staticmethod
    def _block_length(bucket: int) -> int:
        """Coordinates per block: a multiple of 8 and, when a bucket fits in a block, of the bucket."""
        if bucket > _QSGD_BLOCK:
            return _QSGD_BLOCK
        align = 8 // int(np.gcd(bucket, 8))
        per = _QSGD_BLOCK // bucket
        return max(align, per - per % align) * bucket

    @classmethod
    def _blocks(cls, n: int, bucket: int) -> Iterator[tuple[int, int, list[tuple[int, int, int, int]]]]:
        """Yield (lo, hi, pieces) per block; a piece (start, stop, rows, first)
        is ``rows`` whole buckets from bucket ``first`` on, or (rows=1) part of
        bucket ``first``."""
        length = cls._block_length(bucket)
        for lo in range(0, n, length):
            hi = min(lo + length, n)
            pieces = []
            if bucket <= _QSGD_BLOCK:
                whole = (hi - lo) // bucket
                if whole:
                    pieces.append((lo, lo + whole * bucket, whole, lo // bucket))
                if lo + whole * bucket < hi:
                    pieces.append((lo + whole * bucket, hi, 1, lo // bucket + whole))
            else:
                start = lo
                while start < hi:
                    stop = min(hi, (start // bucket + 1) * bucket)
                    pieces.append((start, stop, 1, start // bucket))
                    start = stop
            yield lo, hi, pieces

    @staticmethod
    def _absmax(rows: np.ndarray, scratch: np.ndarray | None = None) -> np.ndarray:
        """max |x| of each row, float32 (NaN if the row has one).

        One integer max over the sign-cleared bit patterns (``scratch``: uint32,
        shaped like ``rows``) keeps the rows in cache; rows whose answer is 0 or
        NaN are redone as max(max x, −min x), whose zero sign and NaN payload
        the wire format has always carried.
        """
        if scratch is None:
            return np.maximum(rows.max(axis=1), -rows.min(axis=1))
        magnitude = scratch.reshape(rows.shape)
        np.bitwise_and(rows.view(_U32), np.uint32(0x7FFFFFFF), out=magnitude)
        m = magnitude.max(axis=1).view(_F32)  # NaN patterns exceed Inf's
        if not m.min() > 0:  # a zero or NaN row
            odd = ~(m > 0)
            m[odd] = np.maximum(rows[odd].max(axis=1), -rows[odd].min(axis=1))
        return m

    def encode(self, x: np.ndarray, ctx: EncodeContext | None = None) -> bytes:
        flat, shape = _flatten(x)
        n = flat.size
        size = _QSGD_PARAMS.size + self.quantized_size(n)
        payload = _Payload(pack_header(self.codec_id, _F32, shape), size)
        body = payload.body
        body[: _QSGD_PARAMS.size] = np.frombuffer(_QSGD_PARAMS.pack(self.bits, self.bucket), np.uint8)
        self.quantize_into(flat, body[_QSGD_PARAMS.size :])
        return payload.done()

    def quantized_size(self, n: int) -> int:
        """Bytes of the scales and packed indices of ``n`` coordinates (the body after bits and bucket)."""
        return 4 * -(-n // self.bucket) + packed_size(n, self.bits)

    def quantize_into(
        self,
        flat: np.ndarray,
        out: np.ndarray,
        rng: np.random.Generator | None = None,
        scale: float | np.float32 | None = None,
    ) -> None:
        """Write the scales and packed indices of ``flat`` (1-D float32) into ``out``.

        ``out``: uint8, :meth:`quantized_size` bytes. The rounding noise comes
        from ``rng`` (default: this codec's generator; one 64-bit draw).
        ``scale``: one scale m for every bucket in place of each bucket's
        max |xᵢ| (the ring form's shared clip bound; ``flat`` must lie in
        [−m, m]); the scales written are then all m.
        """
        n, bucket = flat.size, self.bucket
        nbuckets = -(-n // bucket)
        scales = np.empty(nbuckets, _F32)  # aligned; copied into ``out`` at the end
        shared = scale is not None
        if shared:
            scales[:] = scale
        elif bucket > _QSGD_BLOCK:  # a bucket spans blocks: scales first
            for j in range(nbuckets):
                end = min(n, (j + 1) * bucket)
                parts = [
                    self._absmax(flat[lo : min(lo + BLOCK, end)].reshape(1, -1))[0]
                    for lo in range(j * bucket, end, BLOCK)
                ]
                scales[j] = np.max(parts)  # NaN if any part is NaN
        uniforms = _Uniforms(self.rng if rng is None else rng)
        packed = out[4 * nbuckets :]
        blocks = list(self._blocks(n, bucket))
        threads = encode_threads(n)
        if threads == 1:
            self._quantize_blocks(flat, blocks, scales, packed, uniforms, shared)
        else:  # consecutive runs of blocks, one a thread; numpy releases the GIL in its loops
            bounds = [len(blocks) * i // threads for i in range(threads + 1)]
            with ThreadPoolExecutor(threads) as pool:
                runs = [blocks[a:b] for a, b in zip(bounds, bounds[1:])]
                for done in [pool.submit(self._quantize_blocks, flat, run, scales, packed, uniforms, shared) for run in runs]:
                    done.result()
        out[: 4 * nbuckets] = scales.view(np.uint8)

    def _quantize_blocks(
        self,
        flat: np.ndarray,
        blocks: list[tuple[int, int, list[tuple[int, int, int, int]]]],
        scales: np.ndarray,
        packed: np.ndarray,
        uniforms: _Uniforms,
        shared: bool = False,
    ) -> None:
        """The scales (when a bucket fits a block and they are not ``shared``, i.e. given) and packed
        indices of ``blocks``."""
        n, bits, bucket = flat.size, self.bits, self.bucket
        s = (1 << bits) - 1
        half = np.float32(s / 2)
        # t + r (r uniform on [0, 1)) is formed as x·s/2m + (r + 1) + offset
        # with offset = _MAGIC + s/2 - 1 - 1/2: float32 rounds the sum to the
        # integer _MAGIC + ⌊t + r⌋ (ties, of probability ~2⁻²³, go to even),
        # whose pattern's low byte is the index.
        offset = np.float32(_MAGIC + 2 ** (bits - 1) - 2)
        lowest = np.float32(_MAGIC).view(_U32)  # patterns of _MAGIC + 0 and _MAGIC + s
        highest = np.float32(_MAGIC + s).view(_U32)
        length = min(n, self._block_length(bucket))
        uniform = np.empty(length, _F32)  # the block's uniforms
        work = np.empty(length + 4, _F32)  # the uniforms' scratch (two lane buffers), then the magnitudes, then t
        idx = np.empty(length, np.uint8)
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            for lo, hi, pieces in blocks:
                r = uniforms.draw16(lo, hi - lo, uniform, work)
                finite = True  # every scale of the block finite, so t is too
                for start, stop, rows, first in pieces:
                    xv = flat[start:stop].reshape(rows, -1)
                    uv = work[start - lo : stop - lo].reshape(rows, -1)
                    if bucket <= _QSGD_BLOCK and not shared:  # uv is free until the multiply: scratch for the magnitudes
                        scales[first : first + rows] = self._absmax(xv, uv.view(_U32))
                    m = scales[first : first + rows]
                    finite = finite and bool(m.max() < np.inf)
                    if m.min() > _SMALL_SCALE:  # so s/2m is finite: one reduction for the common case
                        np.multiply(xv, (half / m)[:, None], out=uv)
                        continue
                    a = half / m
                    if np.isfinite(a).all():
                        np.multiply(xv, a[:, None], out=uv)
                    else:  # m = 0 (a = Inf), NaN or Inf (indices do not matter), or subnormal
                        tiny = ~np.isfinite(a) & (m > 0) & np.isfinite(m)
                        a[~np.isfinite(a)] = 0
                        np.multiply(xv, a[:, None], out=uv)
                        uv[tiny] = xv[tiny] / m[tiny, None] * half
                u = work[: hi - lo]
                u += r
                u += offset
                pattern = u.view(_U32)
                dest = packed[lo * bits // 8 : packed_size(hi, bits)]
                # float32 rounding can reach index -1 or s + 1 (and NaN a NaN
                # pattern): clip the patterns to those of 0 and s. When t is
                # finite and bits < 8, the low bytes of -1 and s + 1 (255 and
                # s + 1) are the only ones above s, so a byte max finds them.
                if bits == 8 or not finite:
                    np.clip(pattern, lowest, highest, out=pattern)
                k = idx[: hi - lo] if bits < 8 else dest
                np.copyto(k, pattern, casting="unsafe")  # low byte = index
                if bits < 8:
                    if finite and k.max() > s:
                        k[k == 255] = 0
                        np.minimum(k, np.uint8(s), out=k)
                    _pack_into(k, bits, dest)

    def decode(self, payload: bytes) -> np.ndarray:
        header, body = _open(payload, self)
        n = header.numel
        if body.size < _QSGD_PARAMS.size:
            raise CodecError(f"qsgd payload body of {body.size} bytes is shorter than its parameters", reason=CodecReason.TRUNCATED)
        bits, bucket = _QSGD_PARAMS.unpack_from(body, 0)  # type: ignore[arg-type]  # ndarray is a buffer; numpy's stubs say so only for Python >= 3.12
        if not 1 <= bits <= 8 or bucket < 1:
            raise CodecError(f"qsgd payload has bits={bits}, bucket={bucket}; need bits in 1..8, bucket >= 1", reason=CodecReason.BAD_PARAMETER)
        nbuckets = -(-n // bucket)
        _expect(self, header, body, _QSGD_PARAMS.size + 4 * nbuckets + packed_size(n, bits))
        return self.dequantize(body[_QSGD_PARAMS.size :], n, bits, bucket).reshape(header.shape)

    @classmethod
    def dequantize(cls, data: np.ndarray, n: int, bits: int, bucket: int) -> np.ndarray:
        """``n`` float32 values from the scales and packed indices in ``data``
        (uint8, exactly ``4·⌈n/bucket⌉ + ⌈n·bits/8⌉`` bytes; the caller checks
        the length). Raises CodecError on a negative scale."""
        nbuckets = -(-n // bucket)
        scales = data[: 4 * nbuckets].view(_F32)
        if np.any(scales < 0):
            raise CodecError("qsgd payload has a negative bucket scale", reason=CodecReason.BAD_VALUE)
        packed = data[4 * nbuckets :]
        ratio = np.float32(2 / ((1 << bits) - 1))
        with np.errstate(over="ignore", invalid="ignore"):
            steps = scales * ratio  # Δ = 2m/s
        # k·Δ may overflow (m > float32 max/4) or Δ is subnormal: clip((k·2/s − 1)·m, −m, m) for those buckets
        awkward = np.isfinite(scales) & ((scales > QSGD_HUGE_SCALE) | (scales < np.finfo(np.float32).tiny))
        out = np.empty(n, np.float32)
        idx = np.empty(min(n, cls._block_length(bucket)), np.uint8)
        with np.errstate(over="ignore", invalid="ignore"):  # the awkward buckets are redone below
            for lo, hi, pieces in cls._blocks(n, bucket):
                k = idx[: hi - lo]
                _unpack_into(packed[lo * bits // 8 : packed_size(hi, bits)], bits, k)
                np.copyto(out[lo:hi], k)
                for start, stop, rows, first in pieces:
                    view = out[start:stop].reshape(rows, -1)
                    view *= steps[first : first + rows, None]  # k·Δ - m
                    view -= scales[first : first + rows, None]
                    odd = awkward[first : first + rows]
                    if odd.any():
                        kv = k[start - lo : stop - lo].reshape(rows, -1)[odd] * ratio - np.float32(1)
                        mv = scales[first : first + rows, None][odd]
                        v = kv * mv  # k·2/s − 1 may round above 1: clip to [−m, m] (keeping −0.0)
                        view[odd] = np.where(v > mv, mv, np.where(v < -mv, -mv, v))
        return out


# ------------------------------------------------------------------ ternary


class TernaryCodec(Codec):
    """TernGrad (Wen et al. 2017): x̂ᵢ = s·sign(xᵢ)·bᵢ, bᵢ ~ Bernoulli(|xᵢ|/s), s = max |x|.

        E[x̂ᵢ] = xᵢ,    Var[x̂ᵢ] = |xᵢ|·(s − |xᵢ|) ≤ s²/4,

    up to float32 rounding (the Bernoulli draws compare 23-bit uniforms with
    |xᵢ|/s rounded to float32). Commutes with sum given a scale s shared by the
    round (codes {0, 1, 2} add up; :meth:`ring_round`, s = the clip bound C). Body: float32 s, then one 2-bit code per
    coordinate: 0 = −s, 1 = 0, 2 = +s (3 is invalid). Bits: 2·d + 32 +
    8·(6 + 4·ndim). Randomness as :class:`QsgdCodec`: an instance-owned
    generator seeded with ``seed`` (None: OS entropy).
    """

    name = "ternary"
    codec_id = 5
    traits = CodecTraits(
        unbiased=True, contractive=False, commutes_with_sum=True, stateful=False, lossless=False
    )

    def __init__(self, seed: int | None = None) -> None:
        self.rng = _generator(seed)

    def encode(self, x: np.ndarray, ctx: EncodeContext | None = None) -> bytes:
        flat, shape = _flatten(x)
        n = flat.size
        scale = np.maximum(flat.max(), -flat.min()) if n else np.float32(0)  # NaN if any NaN
        packed = np.empty(packed_size(n, 2), np.uint8)
        if not 0 < scale < np.inf:  # all zero (decodes to 0) or non-finite (decodes to NaN)
            packed[:] = 0b01010101  # code 1 (zero) everywhere
            if n % 4:
                packed[-1] &= (1 << 2 * (n % 4)) - 1
        else:
            for lo, hi, cv in self._code_blocks(flat, scale, self.rng):
                _pack_into(cv, 2, packed[lo // 4 : packed_size(hi, 2)])
        return _join(pack_header(self.codec_id, _F32, shape), _SCALE.pack(scale), packed)

    @staticmethod
    def _code_blocks(
        flat: np.ndarray, scale: np.float32, rng: np.random.Generator
    ) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield (lo, hi, codes) per block of ``flat`` (float32, |x| ≤ ``scale``, 0 < scale < Inf):
        code 1 + sign(x)·b, b ~ Bernoulli(|x|/scale); ``codes`` (uint8) is reused by the next block."""
        n = flat.size
        with np.errstate(over="ignore"):
            inv = np.float32(1) / scale  # Inf if the scale is subnormal
        length = min(n, BLOCK)
        p = np.empty(length, _F32)
        keep = np.empty(length, np.bool_)
        neg = np.empty(length, np.bool_)
        code = np.empty(length, np.uint8)
        uniforms = _Uniforms(rng, length)
        for lo in range(0, n, BLOCK):
            hi = min(lo + BLOCK, n)
            chunk = flat[lo:hi]
            pv, kv, nv, cv = p[: hi - lo], keep[: hi - lo], neg[: hi - lo], code[: hi - lo]
            np.abs(chunk, out=pv)
            if np.isfinite(inv):
                pv *= inv
            else:
                pv /= scale
            pv += np.float32(1)  # 1 + |x|/s in [1, 2]
            for r0, r1, r in uniforms.pieces(hi - lo):
                np.less(r, pv[r0:r1], out=kv[r0:r1])  # probability |x|/s
            np.less(chunk, np.float32(0), out=nv)
            nv &= kv
            np.add(kv.view(np.uint8), np.uint8(1), out=cv)  # 1 (zero) or 2 (+s)
            shifted = nv.view(np.uint8)
            shifted <<= np.uint8(1)
            cv ^= shifted  # 2 -> 0 (-s) where negative
            yield lo, hi, cv

    def ring_levels(self) -> int:
        """s = 2: codes {0, 1, 2} for {−C, 0, +C}."""
        return 2

    def ring_round(self, values: np.ndarray, clip: float, rng: np.random.Generator) -> np.ndarray:
        """TernGrad's own rounding with the shared scale C on ``clip(v, −C, C)``: code 1 + sign(v)·b,
        b ~ Bernoulli(|v|/C), so E[(k − 1)·C] = clip(v, −C, C) and Var = |v|(C − |v|) ≤ C²/4
        (the grid's Δ²/4 with Δ = C), up to float32 rounding of C and |v|/C."""
        m = _f32_clip(clip)
        flat = np.clip(np.asarray(values, dtype=_F32).reshape(-1), -m, m)
        codes = np.empty(flat.size, np.uint64)
        for lo, hi, cv in self._code_blocks(flat, m, rng):
            codes[lo:hi] = cv
        return codes

    def decode(self, payload: bytes) -> np.ndarray:
        header, scale, packed = _open_scaled(payload, self, 2)
        n = header.numel
        out = np.empty(n, np.float32)
        code = np.empty(min(n, BLOCK), np.uint8)
        with np.errstate(invalid="ignore"):
            for lo in range(0, n, BLOCK):
                hi = min(lo + BLOCK, n)
                k = code[: hi - lo]
                _unpack_into(packed[lo // 4 : packed_size(hi, 2)], 2, k)
                if k.max() > 2:
                    raise CodecError("ternary payload holds the invalid code 3", reason=CodecReason.BAD_VALUE)
                block = out[lo:hi]
                np.copyto(block, k)
                block -= np.float32(1)
                block *= scale
        return out.reshape(header.shape)


# --------------------------------------------------------------------- sign


class SignCodec(Codec):
    """Scaled sign (as in EF-signSGD, Karimireddy et al. 2019): x̂ = (‖x‖₁/d)·sign(x), sign(0) = +1.

    Deterministic and biased: ‖x̂ − x‖² = ‖x‖² − ‖x‖₁²/d ≤ (1 − 1/d)‖x‖², so it
    is contractive with δ = ‖x‖₁²/(d‖x‖²) ≥ 1/d; it needs error feedback to
    converge, which the generic ``feedback.ErrorFeedback`` wrapper adds (this
    class keeps no state). Body: float32 scale ‖x‖₁/d, then one bit per
    coordinate, 1 = + (x ≥ 0, −0 included), 0 = −. Bits: d + 32 + 8·(6 + 4·ndim).
    """

    name = "sign"
    codec_id = 6
    traits = CodecTraits(
        unbiased=False, contractive=True, commutes_with_sum=False, stateful=False, lossless=False
    )

    def encode(self, x: np.ndarray, ctx: EncodeContext | None = None) -> bytes:
        flat, shape = _flatten(x)
        n = flat.size
        packed = np.empty(packed_size(n, 1), np.uint8)
        total = 0.0
        work = np.empty(min(n, BLOCK), _F32)
        positive = np.empty(min(n, BLOCK), np.bool_)
        for lo in range(0, n, BLOCK):
            hi = min(lo + BLOCK, n)
            chunk = flat[lo:hi]
            total += float(np.abs(chunk, out=work[: hi - lo]).sum())
            np.greater_equal(chunk, np.float32(0), out=positive[: hi - lo])
            packed[lo // 8 : packed_size(hi, 1)] = np.packbits(positive[: hi - lo], bitorder="little")
        scale = np.float32(total / n) if n else np.float32(0)
        return _join(pack_header(self.codec_id, _F32, shape), _SCALE.pack(scale), packed)

    def decode(self, payload: bytes) -> np.ndarray:
        header, scale, packed = _open_scaled(payload, self, 1)
        n = header.numel
        out = np.empty(n, _U32)  # built as float32 patterns: the scale's, with the sign bit set for -
        pattern = np.float32(scale).view(_U32)
        for lo in range(0, n, BLOCK):
            hi = min(lo + BLOCK, n)
            block = out[lo:hi]
            signs = np.unpackbits(packed[lo // 8 : packed_size(hi, 1)], count=hi - lo, bitorder="little")
            np.copyto(block, signs)
            block ^= np.uint32(1)
            block <<= np.uint32(31)
            block |= pattern
        return out.view(_F32).reshape(header.shape)
