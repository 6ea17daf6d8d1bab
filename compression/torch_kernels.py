"""Torch kernels for the GPU path of fp16, bf16, sign and qsgd.

Each ``encode_*`` takes a float32 torch tensor on any device and returns the
payload *body* as a uint8 tensor on that device; :func:`to_payload` prepends
the wire header and copies the body to host bytes. The bytes are exactly the
format of the numpy codecs in ``quantizers.py``, so the numpy decoders read
them (tests check this on CPU torch):

- fp16: d IEEE halves (clipped to ±65504; Inf and NaN kept), round to nearest even;
- bf16: d bfloat16 patterns, round to nearest even (torch's cast), finite
  values clipped below Inf like the numpy codec;
- sign: float32 mean|x|, then 1 bit per coordinate (1 = x ≥ 0), little-endian;
- qsgd: uint8 bits, uint32 bucket, float32 max per bucket, then indices
  k ∈ [0, 2^bits − 1] at ``bits`` bits each, little-endian bit order;
  k = ⌊(x + m)/Δ + u⌋ with u ~ U[0, 1) from ``generator`` (unbiased).

Bit packing: value i occupies bits [i·b, (i+1)·b) of the stream, least
significant bit first, as ``bitpack.pack_bits`` does.
"""

from __future__ import annotations

import struct

import numpy as np
import torch

from .quantizers import QSGD_HUGE_SCALE, Bf16Codec, Fp16Codec, QsgdCodec, SignCodec, TernaryCodec
from .sparsify import STCCodec, TopKCodec
from .wire import pack_header

_FP16_MAX = 65504.0
_BF16_MAX = float(np.array([0x7F7F0000], dtype="<u4").view("<f4")[0])
_WEIGHTS: dict[torch.device, torch.Tensor] = {}


def _bit_weights(device: torch.device) -> torch.Tensor:
    if device not in _WEIGHTS:
        _WEIGHTS[device] = (2 ** torch.arange(8, dtype=torch.int32, device=device)).to(torch.uint8)
    return _WEIGHTS[device]


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 values < 2**bits into a dense little-endian bit stream (uint8)."""
    values = values.reshape(-1).to(torch.uint8)
    if bits == 8:
        return values
    shifts = torch.arange(bits, dtype=torch.uint8, device=values.device)
    stream = ((values[:, None] >> shifts) & 1).reshape(-1)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    return (stream.reshape(-1, 8) * _bit_weights(values.device)).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``count`` uint8 values."""
    if bits == 8:
        return packed[:count]
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed[:, None] >> shifts) & 1).reshape(-1)[: count * bits].reshape(count, bits)
    weights = (2 ** torch.arange(bits, device=packed.device, dtype=torch.int32)).to(torch.uint8)
    return (stream * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def encode_fp16(x: torch.Tensor) -> torch.Tensor:
    finite = torch.isfinite(x)
    y = torch.where(finite, x.clamp(-_FP16_MAX, _FP16_MAX), x)
    return _bytes_of(y.to(torch.float16))


def encode_bf16(x: torch.Tensor) -> torch.Tensor:
    finite = torch.isfinite(x)
    y = x.to(torch.bfloat16)
    clipped = torch.where(finite & torch.isinf(y), torch.sign(x) * _BF16_MAX, y.float()).to(torch.bfloat16)
    return _bytes_of(clipped)


def encode_sign(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1)
    scale = flat.abs().mean(dtype=torch.float32) if flat.numel() else flat.new_zeros(())
    return torch.cat([_bytes_of(scale.reshape(1)), pack_bits((flat >= 0).to(torch.uint8), 1)])


def encode_qsgd(x: torch.Tensor, bits: int, bucket: int, generator: torch.Generator | None = None) -> torch.Tensor:
    flat = x.reshape(-1)
    n = flat.numel()
    s = (1 << bits) - 1
    nb = -(-n // bucket)
    padded = torch.nn.functional.pad(flat, (0, nb * bucket - n)).reshape(nb, bucket)
    m = padded.abs().amax(dim=1)
    safe = torch.where(m > 0, m, torch.ones_like(m))
    t = (padded / safe[:, None] + 1) * (s / 2)
    u = torch.rand(padded.shape, generator=generator, device=x.device, dtype=torch.float32)
    k = torch.floor(t + u).clamp_(0, s).to(torch.uint8).reshape(-1)[:n]
    params = torch.tensor(list(struct.pack("<BI", bits, bucket)), dtype=torch.uint8, device=x.device)
    return torch.cat([params, _bytes_of(m.float()), pack_bits(k, bits)])


def decode_sign(body: torch.Tensor, count: int) -> torch.Tensor:
    scale = body[:4].view(torch.float32)
    signs = unpack_bits(body[4:], 1, count).to(torch.float32) * 2 - 1
    return signs * scale


def decode_qsgd(body: torch.Tensor, count: int) -> torch.Tensor:
    """k·Δ − m per bucket, Δ = m·fl(2/s); as QsgdCodec.dequantize, a subnormal m or one above
    float32 max/4 takes (k·2/s − 1)·m clipped to [−m, m]. Equal to the CPU codec up to FMA contraction."""
    bits, bucket = struct.unpack("<BI", bytes(body[:5].cpu().tolist()))
    ratio = float(np.float32(2 / ((1 << bits) - 1)))
    nb = -(-count // bucket)
    m = body[5 : 5 + 4 * nb].clone().view(torch.float32)[:, None]
    k = unpack_bits(body[5 + 4 * nb :], bits, count).to(torch.float32)
    k = torch.nn.functional.pad(k, (0, nb * bucket - count)).reshape(nb, bucket)
    plain = k * (m * ratio) - m
    awkward = torch.isfinite(m) & ((m > float(QSGD_HUGE_SCALE)) | (m < torch.finfo(torch.float32).tiny))
    v = (k * ratio - 1) * m
    odd = torch.where(v > m, m, torch.where(v < -m, -m, v))
    return torch.where(awkward, odd, plain).reshape(-1)[:count]


def decode_ternary(body: torch.Tensor, count: int) -> torch.Tensor:
    """(code − 1)·m from a ternary body (float32 m, then 2-bit codes in {0, 1, 2})."""
    scale = body[:4].clone().view(torch.float32)
    return (unpack_bits(body[4:], 2, count).to(torch.float32) - 1) * scale


CODEC_IDS = {"fp16": Fp16Codec.codec_id, "bf16": Bf16Codec.codec_id, "sign": SignCodec.codec_id, "qsgd": QsgdCodec.codec_id,
             "ternary": TernaryCodec.codec_id, "topk": TopKCodec.codec_id, "stc": STCCodec.codec_id}


def to_payload(name: str, x: torch.Tensor, body: torch.Tensor) -> bytes:
    """Wire header + body, on the host: the bytes a client would send."""
    return pack_header(CODEC_IDS[name], np.dtype("<f4"), tuple(x.shape)) + body.cpu().numpy().tobytes()
