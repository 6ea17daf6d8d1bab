"""GPU codecs: fused Triton kernels for sign, qsgd and ternary, threshold selection for top-k and STC.

Payloads are the CPU codecs' byte for byte, with two stated exceptions: sign's float32 scale
(summed in another order) and, rarely, STC's μ (:func:`encode_stc`).

``torch_kernels.py`` builds each payload from a chain of eager torch ops (its
bit packing alone expands every bit into a byte). Here each encoder is one
Triton kernel that reads x once from memory and writes the packed body
(ternary: after a max reduction):

- :func:`encode_sign`: per block of 8·G coordinates, the G bytes of sign bits
  (1 = x ≥ 0, little-endian bit order) and the block's Σ|x| (float32); the
  scale is Σ|x|/d over the blocks' partial sums (a tiny second reduction).
  Bits: byte-identical to :class:`~.quantizers.SignCodec`; the float32 scale
  differs from its float64 sum by float32 rounding only.
- :func:`encode_qsgd`: one program per bucket: the bucket's max |x| (m), the
  index of each coordinate (k = ⌊x·(s/2)/m + r + s/2 − 1/2⌋ clipped to
  [0, s], s = 2^bits − 1, formed in float32 exactly as
  :class:`~.quantizers.QsgdCodec` does, with its magic-number rounding), r
  the codec's own 16-bit uniforms: SplitMix64 lane i//4 of the call's 64-bit
  ``key``, 16-bit cell i mod 4, r = 1 + (j + 1/2)/2¹⁶ on [1, 2), and the
  packed bytes. For bits in {1, 2, 4, 8} and a power-of-two bucket of
  64..4096 (the default 512) the bucket is one register tile, read once
  (:func:`_qsgd_tile_kernel`); otherwise the bucket is walked in chunks and
  each output byte's fields are gathered. Byte-identical to
  ``QsgdCodec(bits, bucket, seed)`` whose first key is ``key``
  (:func:`first_key`), for finite inputs; needs bucket·bits ≡ 0 (mod 8) so
  that each bucket owns whole bytes.
- :func:`encode_ternary`: scale m = max |x| (a first reduction kernel: the
  codec's one scale per tensor needs it before any code), then, per block of
  consecutive coordinates read once,
  code 1 + sign(x)·b, b = [r < 1 + |x|/m] with the codec's 23-bit uniforms
  (lane i//2 of the key's SplitMix64 stream, 32-bit half i mod 2), 2 bits
  each (|x|/m as |x|·(1/m), or |x|/m where 1/m overflows for a subnormal m,
  as the CPU codec). Byte-identical to :class:`~.quantizers.TernaryCodec` for
  finite inputs.

The fused decoders write each coordinate's float32 from its packed bits in one
pass (one program per block of coordinates, the block's bytes read once):

- :func:`decode_sign`: the pattern of ±scale, ``((bit ⊕ 1) << 31) | scale``,
  as :meth:`~.quantizers.SignCodec.decode`.
- :func:`decode_qsgd`: ``k·Δ − m`` with Δ = m·float32(2/s) per bucket (and
  ``(k·float32(2/s) − 1)·m`` clipped to [−m, m] where m > float32 max/4 or m
  is subnormal), as :meth:`~.quantizers.QsgdCodec.dequantize`; one bucket
  per program for the layouts the encoder tiles (its bytes and scale read
  once), else a block of coordinates, each field and scale gathered.
- :func:`decode_ternary`: ``(code − 1)·m``; the invalid code 3 (the CPU
  codec refuses it) decodes to NaN, which the server's non-finite check rejects.

Top-k and STC (:func:`encode_topk`, :func:`encode_stc`) select their support
with :func:`top_k_support`: radix selection of the threshold in three
histogram passes over x, then an order-keeping compaction (no sort; ties keep
the lowest positions, as on the CPU). The positions are Rice-coded on the
device (:func:`_rice_code`, the :mod:`~.golomb` layout: unary parts, then the
remainders), and :func:`decode_topk` / :func:`decode_stc` read them back
there. The coded stream is k·(b + ~2.4) bits, small beside x, so these steps
are torch ops rather than kernels.

Every kernel whose float arithmetic must equal numpy's (the qsgd and ternary
encoders, the qsgd decoder) is launched with ``enable_fp_fusion=False``: an
FMA rounds a·b + c once where numpy rounds twice, and Triton's interpreter (the
CPU tests) never fuses, so only the compiled kernel would differ.
``python -m qfl.benchmarks.triton_compile`` compiles every launch for sm_90
without a GPU and counts the FMAs in the PTX (none).

The three fused decoders are bit-identical to the CPU codecs' decoders on their valid
payloads. They check the body's length; the qsgd decoder does not look for
negative scales (a host sync): decode untrusted payloads with the CPU codecs,
which refuse them, or check ``scales >= 0`` first.

Importing this module needs ``triton`` (``pip install triton``). On a machine
without a GPU the kernels run under Triton's interpreter (set
``TRITON_INTERPRET=1`` before the import), which is how the tests check the
bytes on CPU torch; the speed figures need a CUDA device (``qfl bench codecs
--device cuda``).
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl

from .golomb import MAX_RICE_PARAMETER, cheapest_rice_parameter, rice_parameter_candidates
from .quantizers import QSGD_HUGE_SCALE
from .sparsify import support_size
from .torch_kernels import encode_fp16, pack_bits, unpack_bits

_GOLDEN = 0x9E3779B97F4A7C15
_MAGIC = 1.5 * 2.0**23  # as quantizers._MAGIC: float32 sums in [2**23, 2**24) are integers
_SIGN_BLOCK = 1024  # coordinates per program of the sign kernel (128 output bytes)
# QsgdCodec.dequantize's bounds of an ordinary bucket scale, as kernel constants
_QSGD_HUGE = tl.constexpr(float(QSGD_HUGE_SCALE))
_F32_TINY = tl.constexpr(float(np.finfo(np.float32).tiny))
_CHUNK = 1024  # coordinates per step of the qsgd bucket-max loop
_OUT_CHUNK = 256  # output bytes per step of the packing loops


def first_key(seed: int) -> int:
    """The 64-bit noise key the CPU codecs (qsgd, ternary) built with ``seed`` draw at their first encode."""
    return int(np.random.default_rng(seed).integers(0, 2**64, dtype=np.uint64))


@triton.jit
def _splitmix(key, lane):
    """SplitMix64 output of ``lane`` (uint64 tensor) of the stream keyed by ``key``: mix(key + (lane + 1)·golden)."""
    z = key + (lane + 1) * 0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    return z ^ (z >> 31)


@triton.jit
def _sign_kernel(x_ptr, bits_ptr, partial_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    x = tl.load(x_ptr + offs, mask=inside, other=0.0)
    tl.store(partial_ptr + pid, tl.sum(tl.abs(x), axis=0))
    bit = ((x >= 0.0) & inside).to(tl.int32)
    weights = 1 << tl.arange(0, 8)
    byte = tl.sum(tl.reshape(bit, (BLOCK // 8, 8)) * weights[None, :], axis=1)
    out = pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
    tl.store(bits_ptr + out, byte.to(tl.uint8), mask=out < (n + 7) // 8)


def encode_sign(x: torch.Tensor) -> torch.Tensor:
    """The sign payload body (float32 mean |x|, then the sign bits) as uint8 on ``x``'s device."""
    flat = x.reshape(-1).contiguous().float()
    n = flat.numel()
    grid = max(1, triton.cdiv(n, _SIGN_BLOCK))
    packed = torch.empty((n + 7) // 8, dtype=torch.uint8, device=flat.device)
    partial = torch.empty(grid, dtype=torch.float32, device=flat.device)
    _sign_kernel[(grid,)](flat, packed, partial, n, BLOCK=_SIGN_BLOCK)
    scale = (partial.sum() / n if n else partial.new_zeros(())).reshape(1)
    return torch.cat([scale.view(torch.uint8), packed])


@triton.jit
def _qsgd_index(x, i, m, a, key, S: tl.constexpr):
    """QSGD's index of coordinate ``i`` (value ``x``) in a bucket of scale ``m`` (``a`` = (s/2)/m), as int32."""
    m = tl.zeros(x.shape, tl.float32) + m  # the bucket's scalars as tensors of x's shape
    a = tl.zeros(x.shape, tl.float32) + a
    tiny = ((a != a) | (a == float("inf"))) & (m > 0.0) & (m < float("inf"))  # a not finite, m subnormal
    a0 = tl.where((a == a) & (a < float("inf")), a, 0.0)
    uv = tl.where(tiny, tl.math.div_rn(x, m) * (S / 2), x * a0)
    lane = (i // 4).to(tl.uint64)
    cell = (_splitmix(key, lane) >> ((i % 4).to(tl.uint64) * 16)).to(tl.uint32) & 0xFFFF
    r = ((cell << 7) | 0x3F800040).to(tl.float32, bitcast=True)
    u = (uv + r) + (1.5 * 2.0**23 + (S + 1) // 2 - 2)
    pattern = u.to(tl.uint32, bitcast=True)
    lowest = tl.full(pattern.shape, 0x4B400000, tl.uint32)  # the pattern of _MAGIC
    pattern = tl.minimum(tl.maximum(pattern, lowest), lowest + S)
    return (pattern - lowest).to(tl.int32)


@triton.jit
def _qsgd_kernel(x_ptr, scales_ptr, packed_ptr, n, bucket, key,
                 BITS: tl.constexpr, CHUNK: tl.constexpr, OUT_CHUNK: tl.constexpr):
    b = tl.program_id(0)
    start = b * bucket
    stop = tl.minimum(start + bucket, n)
    m = tl.zeros((CHUNK,), tl.float32)
    low = tl.full((CHUNK,), float("inf"), tl.float32)
    for lo in range(start, stop, CHUNK):
        offs = lo + tl.arange(0, CHUNK)
        x = tl.load(x_ptr + offs, mask=offs < stop, other=float("inf"))
        m = tl.maximum(m, tl.where(offs < stop, tl.abs(x), 0.0))
        low = tl.minimum(low, x)
    scale = tl.max(m, axis=0)
    # an all-zero bucket: the CPU codec writes numpy's max(max x, −min x), i.e. −min x (−0.0 for +0s)
    scale = tl.where(scale == 0.0, -tl.min(low, axis=0), scale)
    tl.store(scales_ptr + b, scale)
    S: tl.constexpr = (1 << BITS) - 1
    a = tl.math.div_rn(tl.full((OUT_CHUNK,), S / 2, tl.float32), tl.zeros((OUT_CHUNK,), tl.float32) + scale)
    first_byte = start * BITS // 8
    last_byte = (stop * BITS + 7) // 8
    for lo in range(first_byte, last_byte, OUT_CHUNK):
        j = lo + tl.arange(0, OUT_CHUNK)
        byte = tl.zeros((OUT_CHUNK,), tl.int32)
        for t in tl.static_range(8):
            p = j * 8 + t  # the bit's position in the stream
            i = p // BITS
            valid = (j < last_byte) & (i < stop)
            x = tl.load(x_ptr + i, mask=valid, other=0.0)
            k = _qsgd_index(x, i, scale, a, key, S)
            byte = byte | tl.where(valid, ((k >> (p % BITS)) & 1) << t, 0)
        tl.store(packed_ptr + j, byte.to(tl.uint8), mask=j < last_byte)


@triton.jit
def _qsgd_tile_kernel(x_ptr, scales_ptr, packed_ptr, n, key, BITS: tl.constexpr, BUCKET: tl.constexpr):
    """One bucket per program, read once: its max |x|, every index, and the packed bytes from registers."""
    b = tl.program_id(0)
    i = b * BUCKET + tl.arange(0, BUCKET)
    inside = i < n
    x = tl.load(x_ptr + i, mask=inside, other=0.0)
    scale = tl.max(tl.where(inside, tl.abs(x), 0.0), axis=0)
    # an all-zero bucket: the CPU codec writes numpy's max(max x, −min x), i.e. −min x (−0.0 for +0s)
    scale = tl.where(scale == 0.0, -tl.min(tl.where(inside, x, float("inf")), axis=0), scale)
    tl.store(scales_ptr + b, scale)
    S: tl.constexpr = (1 << BITS) - 1
    a = tl.math.div_rn(tl.full((BUCKET,), S / 2, tl.float32), tl.zeros((BUCKET,), tl.float32) + scale)
    k = tl.where(inside, _qsgd_index(x, i, scale, a, key, S), 0)
    PER: tl.constexpr = 8 // BITS  # fields per byte, the first in the low bits
    fields = tl.reshape(k, (BUCKET // PER, PER))
    byte = tl.sum(fields << (tl.arange(0, PER) * BITS)[None, :], axis=1)
    j = b * (BUCKET // PER) + tl.arange(0, BUCKET // PER)
    tl.store(packed_ptr + j, byte.to(tl.uint8), mask=j < (n * BITS + 7) // 8)


def _tiles(bits: int, bucket: int) -> bool:
    """Whether :func:`_qsgd_tile_kernel` takes this layout: fields that never span bytes, a power-of-two
    bucket of 64..4096 coordinates (one register tile per program)."""
    return bits in (1, 2, 4, 8) and 64 <= bucket <= 4096 and bucket & (bucket - 1) == 0


def encode_qsgd(x: torch.Tensor, bits: int, bucket: int, key: int) -> torch.Tensor:
    """The qsgd payload body (bits, bucket, float32 scale per bucket, packed indices) as uint8 on ``x``'s device.

    ``key``: the call's 64-bit noise key (``first_key(seed)`` reproduces the
    CPU codec built with ``seed``). Raises ValueError unless bits ∈ 1..8 and
    bucket·bits is a multiple of 8.
    """
    if not 1 <= bits <= 8 or bucket < 1 or (bucket * bits) % 8:
        raise ValueError(
            f"the fused qsgd kernel needs bits in 1..8 and bucket·bits a multiple of 8 (got bits={bits}, "
            f"bucket={bucket}); use a bucket such as 512, or torch_kernels.encode_qsgd"
        )
    flat = x.reshape(-1).contiguous().float()
    n = flat.numel()
    nb = -(-n // bucket)
    scales = torch.empty(nb, dtype=torch.float32, device=flat.device)
    packed = torch.empty((n * bits + 7) // 8, dtype=torch.uint8, device=flat.device)
    if n and _tiles(bits, bucket):
        _qsgd_tile_kernel[(nb,)](flat, scales, packed, n, _as_u64(key), BITS=bits, BUCKET=bucket,
                                 enable_fp_fusion=False)
    elif n:  # any other layout: the bucket in chunks, each output byte's bits gathered
        _qsgd_kernel[(nb,)](flat, scales, packed, n, bucket, _as_u64(key),
                            BITS=bits, CHUNK=_CHUNK, OUT_CHUNK=_OUT_CHUNK, enable_fp_fusion=False)
    params = torch.tensor(list(struct.pack("<BI", bits, bucket)), dtype=torch.uint8, device=flat.device)
    return torch.cat([params, scales.view(torch.uint8), packed])


@triton.jit
def _absmax_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + pid, tl.max(tl.abs(tl.load(x_ptr + offs, mask=offs < n, other=0.0)), axis=0))


@triton.jit
def _ternary_kernel(x_ptr, packed_ptr, n, scale, key, BLOCK: tl.constexpr):
    """BLOCK consecutive coordinates per program, read once; four 2-bit codes a byte, the first in the low bits."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = i < n
    x = tl.load(x_ptr + i, mask=valid, other=0.0)
    s = tl.zeros((BLOCK,), tl.float32) + scale
    inv = tl.math.div_rn(tl.full((BLOCK,), 1.0, tl.float32), s)
    # |x|/s as |x|·(1/s), or |x|/s where 1/s overflows (a subnormal s), then + 1: two roundings, as numpy
    # (the kernel is compiled with enable_fp_fusion=False: no FMA)
    p = tl.where(inv < float("inf"), tl.abs(x) * inv, tl.math.div_rn(tl.abs(x), s)) + 1.0
    lane = (i // 2).to(tl.uint64)
    half = (_splitmix(key, lane) >> ((i % 2).to(tl.uint64) * 32)).to(tl.uint32)  # truncates to the low 32 bits
    r = ((half >> 9) | 0x3F800000).to(tl.float32, bitcast=True)
    keep = (r < p).to(tl.int32)
    code = tl.where(valid, (1 + keep) ^ ((keep & (x < 0.0).to(tl.int32)) << 1), 0)
    byte = tl.sum(tl.reshape(code, (BLOCK // 4, 4)) << (tl.arange(0, 4) * 2)[None, :], axis=1)
    j = tl.program_id(0) * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
    tl.store(packed_ptr + j, byte.to(tl.uint8), mask=j < (n + 3) // 4)


def encode_ternary(x: torch.Tensor, key: int) -> torch.Tensor:
    """The ternary payload body (float32 max |x|, then 2-bit codes) as uint8 on ``x``'s device.

    All zero or non-finite tensors send code 1 (zero) everywhere, as the CPU codec.
    """
    _as_u64(key)
    flat = x.reshape(-1).contiguous().float()
    n = flat.numel()
    packed = torch.full(((n + 3) // 4,), 0b01010101, dtype=torch.uint8, device=flat.device)
    if n % 4:
        packed[-1] = (1 << 2 * (n % 4)) - 1 & 0b01010101
    if not n:
        return torch.cat([flat.new_zeros(1).view(torch.uint8), packed])
    grid = triton.cdiv(n, _SIGN_BLOCK)
    partial = torch.empty(grid, dtype=torch.float32, device=flat.device)
    _absmax_kernel[(grid,)](flat, partial, n, BLOCK=_SIGN_BLOCK)
    scale = partial.max()
    if float(scale) == 0.0:  # all zero: the CPU codec writes numpy's max(max x, −min x), i.e. −min x (−0.0 for +0s)
        scale = -flat.min()
    value = float(scale)  # the one host sync: the kernel takes the scale as an argument
    if 0 < value < float("inf"):
        _ternary_kernel[(grid,)](flat, packed, n, value, _as_u64(key), BLOCK=_SIGN_BLOCK, enable_fp_fusion=False)
    return torch.cat([scale.reshape(1).view(torch.uint8), packed])


@triton.jit
def _sign_decode_kernel(packed_ptr, scale_ptr, out_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    j = pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
    byte = tl.load(packed_ptr + j, mask=j < (n + 7) // 8, other=0).to(tl.uint32)
    bit = (byte[:, None] >> tl.arange(0, 8)[None, :].to(tl.uint32)) & 1
    pattern = ((bit ^ 1) << 31) | tl.load(scale_ptr).to(tl.uint32, bitcast=True)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.reshape(pattern, (BLOCK,)).to(tl.float32, bitcast=True), mask=offs < n)


def decode_sign(body: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` float32 values from a sign body (float32 scale, then the sign bits), on ``body``'s device."""
    return _decode_scaled("sign", _sign_decode_kernel, body, count, bits=1)


def _decode_scaled(name: str, kernel: Any, body: torch.Tensor, count: int, bits: int) -> torch.Tensor:
    """Run a decoder ``kernel`` on a body of one float32 scale and ``bits``-bit codes."""
    _expect_length(name, body, 4 + (count * bits + 7) // 8)
    scale = body[:4].clone().view(torch.float32)
    out = torch.empty(count, dtype=torch.float32, device=body.device)
    if count:
        kernel[(triton.cdiv(count, _SIGN_BLOCK),)](body[4:], scale, out, count, BLOCK=_SIGN_BLOCK)
    return out


@triton.jit
def _unpack(packed_ptr, i, inside, BITS: tl.constexpr):
    """The ``BITS``-bit field of coordinate ``i`` in a little-endian bit stream (it may span two bytes)."""
    p = i.to(tl.int64) * BITS
    lo = tl.load(packed_ptr + p // 8, mask=inside, other=0).to(tl.int32)
    if 8 % BITS == 0:  # a field never spans two bytes
        return (lo >> (p % 8).to(tl.int32)) & ((1 << BITS) - 1)
    hi = tl.load(packed_ptr + p // 8 + 1, mask=inside & ((p % 8 + BITS) > 8), other=0).to(tl.int32)
    return ((lo | (hi << 8)) >> (p % 8).to(tl.int32)) & ((1 << BITS) - 1)


@triton.jit
def _qsgd_value(k, m, ratio):
    """k·Δ − m, Δ = m·ratio (no FMA: the kernels are compiled with enable_fp_fusion=False); as
    QsgdCodec.dequantize, m subnormal or above float32 max/4 takes clip((k·ratio − 1)·m, −m, m)."""
    plain = k * (m * ratio) - m
    awkward = (m == m) & (m < float("inf")) & ((m > _QSGD_HUGE) | (m < _F32_TINY))
    v = (k * ratio - 1.0) * m
    return tl.where(awkward, tl.where(v > m, m, tl.where(v < -m, -m, v)), plain)


@triton.jit
def _qsgd_decode_kernel(packed_ptr, scales_ptr, out_ptr, n, bucket, ratio,
                        BITS: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = i < n
    k = _unpack(packed_ptr, i, inside, BITS).to(tl.float32)
    m = tl.load(scales_ptr + i // bucket, mask=inside, other=1.0)
    tl.store(out_ptr + i, _qsgd_value(k, m, ratio), mask=inside)


@triton.jit
def _qsgd_tile_decode_kernel(packed_ptr, scales_ptr, out_ptr, n, ratio, BITS: tl.constexpr, BUCKET: tl.constexpr):
    """One bucket per program (the layouts of :func:`_tiles`): its bytes and scale read once, its floats written."""
    b = tl.program_id(0)
    PER: tl.constexpr = 8 // BITS
    j = b * (BUCKET // PER) + tl.arange(0, BUCKET // PER)
    byte = tl.load(packed_ptr + j, mask=j < (n * BITS + 7) // 8, other=0).to(tl.int32)
    k = tl.reshape((byte[:, None] >> (tl.arange(0, PER) * BITS)[None, :]) & ((1 << BITS) - 1), (BUCKET,))
    m = tl.zeros((BUCKET,), tl.float32) + tl.load(scales_ptr + b)
    i = b * BUCKET + tl.arange(0, BUCKET)
    tl.store(out_ptr + i, _qsgd_value(k.to(tl.float32), m, ratio), mask=i < n)


def decode_qsgd(body: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` float32 values from a qsgd body (bits, bucket, float32 scales, packed indices)."""
    if body.numel() < 5:
        raise ValueError(f"a qsgd body holds at least 5 bytes of parameters, got {body.numel()}")
    bits, bucket = struct.unpack("<BI", bytes(body[:5].cpu().tolist()))
    if not 1 <= bits <= 8 or bucket < 1:
        raise ValueError(f"qsgd body has bits={bits}, bucket={bucket}; need bits in 1..8, bucket >= 1")
    nb = -(-count // bucket)
    _expect_length("qsgd", body, 5 + 4 * nb + (count * bits + 7) // 8)
    scales = body[5 : 5 + 4 * nb].clone().view(torch.float32)  # unaligned in the body: copied (n/bucket floats)
    out = torch.empty(count, dtype=torch.float32, device=body.device)
    ratio = float(np.float32(2 / ((1 << bits) - 1)))
    if count and _tiles(bits, bucket):
        _qsgd_tile_decode_kernel[(nb,)](body[5 + 4 * nb :], scales, out, count, ratio, BITS=bits, BUCKET=bucket,
                                        enable_fp_fusion=False)
    elif count:
        _qsgd_decode_kernel[(triton.cdiv(count, _SIGN_BLOCK),)](
            body[5 + 4 * nb :], scales, out, count, bucket, ratio, BITS=bits, BLOCK=_SIGN_BLOCK,
            enable_fp_fusion=False,
        )
    return out


@triton.jit
def _ternary_decode_kernel(packed_ptr, scale_ptr, out_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    j = pid * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
    byte = tl.load(packed_ptr + j, mask=j < (n + 3) // 4, other=0).to(tl.int32)
    code = (byte[:, None] >> (2 * tl.arange(0, 4))[None, :]) & 3
    value = (code.to(tl.float32) - 1.0) * tl.load(scale_ptr)
    value = tl.where(code == 3, float("nan"), value)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.reshape(value, (BLOCK,)), mask=offs < n)


def decode_ternary(body: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` float32 values ``(code − 1)·m`` from a ternary body (float32 m, then 2-bit codes)."""
    return _decode_scaled("ternary", _ternary_decode_kernel, body, count, bits=2)


# ------------------------------------------------------------------ top-k and STC: threshold selection

_RADIX_PASSES = ((31, 20, 11), (20, 10, 10), (10, 0, 10))  # (prefix shift, shift, bits): |x|'s 31 bits, top first


@triton.jit
def _magnitude_key(x):
    """|x|'s float32 pattern as int32 (monotone in |x|); every NaN the one value just above inf."""
    key = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return tl.where(key > 0x7F800000, 0x7F800001, key)


@triton.jit
def _radix_hist_kernel(x_ptr, hist_ptr, n, prefix, PREFIX_SHIFT: tl.constexpr, SHIFT: tl.constexpr,
                       BINS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    key = _magnitude_key(tl.load(x_ptr + offs, mask=inside, other=0.0))
    match = inside & ((key >> PREFIX_SHIFT) == prefix)
    counts = tl.histogram((key >> SHIFT) & (BINS - 1), BINS, mask=match)
    tl.atomic_add(hist_ptr + tl.arange(0, BINS), counts)


@triton.jit
def _threshold_counts_kernel(x_ptr, above_ptr, ties_ptr, n, threshold, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    key = _magnitude_key(tl.load(x_ptr + offs, mask=inside, other=0.0))
    tl.store(above_ptr + pid, tl.sum((inside & (key > threshold)).to(tl.int64), axis=0))
    tl.store(ties_ptr + pid, tl.sum((inside & (key == threshold)).to(tl.int64), axis=0))


@triton.jit
def _compact_kernel(x_ptr, idx_ptr, start_ptr, tie_start_ptr, n, threshold, ties_kept, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    key = _magnitude_key(tl.load(x_ptr + offs, mask=inside, other=0.0))
    tie = (inside & (key == threshold)).to(tl.int64)
    tie_rank = tl.load(tie_start_ptr + pid) + tl.cumsum(tie, axis=0) - 1  # among all ties, in index order
    keep = (inside & (key > threshold)) | ((tie == 1) & (tie_rank < ties_kept))
    slot = tl.load(start_ptr + pid) + tl.cumsum(keep.to(tl.int64), axis=0) - 1
    tl.store(idx_ptr + slot, offs, mask=keep)


def top_k_support(x: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted int64 positions of the ``k`` largest |x| on ``x``'s device, as :func:`~.sparsify.top_k_positions`
    (ties at the threshold keep the lowest positions).

    Radix selection of the threshold T = the k-th largest |x|'s float32 pattern:
    three histogram passes over x (11, 10 and 10 bits of the pattern, each pass
    counting only the coordinates that share the bits found so far), then one
    pass that counts, per block, the coordinates above T and equal to T, and one
    that writes the kept positions in index order (block offsets from prefix sums).
    Five reads of x and no sort; three small host syncs (one per histogram).
    NaNs rank above every number, as on the CPU (which coordinates among several
    NaNs are kept may differ from the CPU codec's).
    """
    flat = x.reshape(-1).contiguous().float()
    n = flat.numel()
    if not 0 <= k <= n:
        raise ValueError(f"k = {k} positions of a tensor of {n} values")
    if k == n:
        return torch.arange(n, dtype=torch.int64, device=flat.device)
    if k == 0:
        return torch.zeros(0, dtype=torch.int64, device=flat.device)
    grid = triton.cdiv(n, _SIGN_BLOCK)
    prefix, rank, above = 0, k, 0  # rank: T is the rank-th largest among those sharing prefix
    for prefix_shift, shift, bits in _RADIX_PASSES:
        hist = torch.zeros(1 << bits, dtype=torch.int32, device=flat.device)
        _radix_hist_kernel[(grid,)](flat, hist, n, prefix, PREFIX_SHIFT=prefix_shift, SHIFT=shift, BINS=1 << bits,
                                    BLOCK=_SIGN_BLOCK)
        from_top = hist.flip(0).to(torch.int64).cumsum(0).cpu().numpy()
        j = int(np.searchsorted(from_top, rank))  # the first bin (from the top) that reaches the rank
        higher = int(from_top[j - 1]) if j else 0
        rank -= higher
        above += higher
        prefix = (prefix << bits) | ((1 << bits) - 1 - j)
    threshold, ties_kept = prefix, k - above
    counts_above = torch.empty(grid, dtype=torch.int64, device=flat.device)
    counts_ties = torch.empty(grid, dtype=torch.int64, device=flat.device)
    _threshold_counts_kernel[(grid,)](flat, counts_above, counts_ties, n, threshold, BLOCK=_SIGN_BLOCK)
    tie_start = counts_ties.cumsum(0) - counts_ties
    kept = counts_above + (ties_kept - tie_start).clamp(0).minimum(counts_ties)
    start = kept.cumsum(0) - kept
    idx = torch.empty(k, dtype=torch.int64, device=flat.device)
    _compact_kernel[(grid,)](flat, idx, start, tie_start, n, threshold, ties_kept, BLOCK=_SIGN_BLOCK)
    return idx


def _rice_code(gaps: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(b, bytes) of :func:`~.golomb.rice_encode` with :func:`~.golomb.best_rice_parameter`'s b, on the device:
    the unary terminators and the remainder bits are set by scattered adds of distinct powers of two."""
    count = gaps.numel()
    device = gaps.device
    candidates = rice_parameter_candidates(int(gaps.sum()) / count)
    b = cheapest_rice_parameter(candidates, torch.stack([(gaps >> c).sum() for c in candidates]).tolist(), count)
    terminators = (gaps >> b).add_(1).cumsum(0).sub_(1)
    unary_bits = int(terminators[-1]) + 1
    out = torch.zeros((unary_bits + count * b + 7) // 8, dtype=torch.int32, device=device)
    out.index_add_(0, terminators // 8, 128 >> (terminators % 8).to(torch.int32))
    if b:
        shifts = torch.arange(b - 1, -1, -1, device=device)
        bits = ((gaps[:, None] >> shifts[None, :]) & 1).reshape(-1)
        position = unary_bits + torch.arange(count * b, device=device)
        out.index_add_(0, position // 8, (bits << (7 - position % 8)).to(torch.int32))
    return b, out.to(torch.uint8)


def _support_fields(x: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """(flat x, sorted top-k positions, Rice parameter, Rice-coded gaps) for ``ratio`` of the coordinates."""
    flat = x.reshape(-1).contiguous().float()
    k = support_size(ratio, flat.numel())
    idx = top_k_support(flat, k)
    if not k:
        return flat, idx, 0, torch.zeros(0, dtype=torch.uint8, device=flat.device)
    gaps = idx.diff(prepend=idx.new_full((1,), -1)) - 1
    b, coded = _rice_code(gaps)
    return flat, idx, b, coded


def encode_topk(x: torch.Tensor, ratio: float, values: str = "fp16") -> torch.Tensor:
    """The topk payload body (k, Rice parameter, Rice-coded gaps, kept values) as uint8 on ``x``'s device,
    byte-identical to ``TopKCodec(ratio, values)``'s for finite x."""
    if values not in ("fp16", "fp32"):
        raise ValueError(f"topk values must be 'fp16' or 'fp32', got {values!r}")
    flat, idx, b, coded = _support_fields(x, ratio)
    kept = flat[idx]
    kept_bytes = encode_fp16(kept) if values == "fp16" else kept.view(torch.uint8)  # fp16: clipped as the CPU codec
    fields = torch.tensor(list(struct.pack("<IB", idx.numel(), b)), dtype=torch.uint8, device=flat.device)
    return torch.cat([fields, coded, kept_bytes])


def encode_stc(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """The stc payload body (k, Rice parameter, μ, Rice-coded gaps, sign bits) as uint8 on ``x``'s device.

    μ is the mean |kept| summed in float64 and rounded to float32, as the CPU
    codec; the two float64 sums may differ in their last bit (a different
    summation order), which changes μ's float32 only when the mean lies within
    that bit of a float32 rounding boundary.
    """
    flat, idx, b, coded = _support_fields(x, ratio)
    kept = flat[idx]
    mu = kept.double().abs().mean().float() if idx.numel() else flat.new_zeros(())
    fields = torch.tensor(list(struct.pack("<IB", idx.numel(), b)), dtype=torch.uint8, device=flat.device)
    signs = pack_bits(torch.signbit(kept).to(torch.uint8), 1)
    return torch.cat([fields, mu.reshape(1).view(torch.uint8), coded, signs])


def _rice_positions(name: str, coded: torch.Tensor, b: int, k: int, n: int) -> torch.Tensor:
    """Sorted positions from Rice-coded gaps (:func:`_rice_code`'s layout) with torch ops on the device.

    The stream is k·(b + ~2.4) bits, small beside the tensor: its bits are
    unpacked (MSB first), the first k ones are the unary terminators, the
    remainders follow. ValueError if the stream is too short, has bytes or bits
    beyond its last value, or its positions run past ``n``."""
    if b > MAX_RICE_PARAMETER:
        raise ValueError(f"{name} body has Rice parameter {b}; at most {MAX_RICE_PARAMETER} is valid")
    bits = ((coded[:, None] >> torch.arange(7, -1, -1, device=coded.device)) & 1).reshape(-1)
    terminators = torch.nonzero(bits).reshape(-1)[:k]
    if terminators.numel() < k:
        raise ValueError(f"{name} body is truncated: {terminators.numel()} of {k} Rice terminators")
    unary_bits = int(terminators[-1]) + 1
    if (unary_bits + k * b + 7) // 8 != coded.numel() or bits[unary_bits + k * b :].any():
        raise ValueError(f"{name} body's Rice stream does not end where its {k} values do (a corrupt payload)")
    quotients = terminators.diff(prepend=terminators.new_full((1,), -1)) - 1
    gaps = quotients << b
    if b:
        weights = 1 << torch.arange(b - 1, -1, -1, device=coded.device)
        gaps |= (bits[unary_bits : unary_bits + k * b].reshape(k, b) * weights).sum(1)
    positions = (gaps + 1).cumsum(0) - 1
    if int(positions[-1]) >= n:
        raise ValueError(f"{name} positions run past the end of the {n}-element tensor")
    return positions


def decode_topk(body: torch.Tensor, count: int, values: str = "fp16") -> torch.Tensor:
    """``count`` float32 values from a topk body, zeros off the support, on ``body``'s device."""
    width = {"fp16": 2, "fp32": 4}[values]
    k, b = struct.unpack("<IB", bytes(body[:5].cpu().tolist()))
    out = torch.zeros(count, dtype=torch.float32, device=body.device)
    if not k:
        return out
    if body.numel() < 5 + k * width:
        raise ValueError(f"topk body of {body.numel()} bytes is too short for {k} {values} values")
    kept = body[body.numel() - k * width :].clone().view(torch.float16 if width == 2 else torch.float32)
    out[_rice_positions("topk", body[5 : body.numel() - k * width], b, k, count)] = kept.float()
    return out


def decode_stc(body: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` float32 values ±μ on the support, zeros elsewhere, from an stc body."""
    k, b = struct.unpack("<IB", bytes(body[:5].cpu().tolist()))
    out = torch.zeros(count, dtype=torch.float32, device=body.device)
    if not k:
        return out
    sign_bytes = (k + 7) // 8
    if body.numel() < 9 + sign_bytes:
        raise ValueError(f"stc body of {body.numel()} bytes is too short for {k} sign bits")
    mu = body[5:9].clone().view(torch.float32)
    negative = unpack_bits(body[body.numel() - sign_bytes :], 1, k).bool()
    positions = _rice_positions("stc", body[9 : body.numel() - sign_bytes], b, k, count)
    out[positions] = torch.where(negative, -mu, mu)
    return out


def _expect_length(name: str, body: torch.Tensor, expected: int) -> None:
    if body.dtype != torch.uint8 or body.dim() != 1 or body.numel() != expected:
        raise ValueError(
            f"a {name} body for this many values is {expected} uint8 bytes; got {body.numel()} of {body.dtype} "
            f"(a truncated or foreign payload: decode it with the CPU codec for a precise error)"
        )


def _as_u64(key: int) -> int:
    if not 0 <= key < 2**64:
        raise ValueError(f"the noise key must be a 64-bit unsigned integer, got {key}")
    return key
