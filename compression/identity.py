"""The identity codec: raw little-endian float32, 32 bits per coordinate."""

from __future__ import annotations

import numpy as np

from .codec import Codec, CodecError, CodecReason, CodecTraits, EncodeContext
from .summable import FIXED_POINT_LEVELS, grid_codes
from .wire import pack_header, unpack_header


class Fp32Codec(Codec):
    """Sends the tensor as is. Lossless, unbiased, commutes with sum.

    Bits: 32·d + 8·(6 + 4·ndim). Variance: 0. Under a masked sum (ring form)
    the values are sent as 32-bit fixed point over the round's clip bound.
    """

    name = "fp32"
    codec_id = 1
    traits = CodecTraits(
        unbiased=True, contractive=True, commutes_with_sum=True, stateful=False, lossless=True
    )

    def encode(self, x: np.ndarray, ctx: EncodeContext | None = None) -> bytes:
        return b"".join(self.encode_parts(x, ctx))  # the header, then the tensor's bytes

    def encode_parts(self, x: np.ndarray, ctx: EncodeContext | None = None) -> list[bytes | memoryview]:
        """The header, then the tensor's own memory (no copy when it is contiguous little-endian float32)."""
        x = np.asarray(x, dtype="<f4")  # keeps 0-d tensors 0-d
        flat = np.ascontiguousarray(x).reshape(-1)  # one copy at most; 0-d keeps its header shape
        return [pack_header(self.codec_id, x.dtype, x.shape), memoryview(flat).cast("B")]  # type: ignore[arg-type]  # ndarray is a buffer; numpy's stubs say so only for Python >= 3.12

    def ring_levels(self) -> int:
        """s = 2³² − 1: the masked sum's ring form is 32-bit fixed point over [−C, C]."""
        return FIXED_POINT_LEVELS

    def ring_round(self, values: np.ndarray, clip: float, rng: np.random.Generator) -> np.ndarray:
        """Codes on the fixed-point grid Δ = 2C/(2³² − 1), stochastic rounding (``summable.grid_codes``):
        E[k·Δ − C] = clip(v, −C, C), Var ≤ Δ²/4 = C²/(2³² − 1)²."""
        return grid_codes(values, clip, FIXED_POINT_LEVELS, rng)

    def decode(self, payload: bytes) -> np.ndarray:
        header = unpack_header(payload, self.codec_id)
        body = memoryview(payload)[header.size :]
        expected = 4 * header.numel
        if len(body) != expected:
            raise CodecError(
                f"fp32 payload for shape {header.shape} needs {expected} body bytes, got {len(body)}", reason=CodecReason.WRONG_LENGTH
            )
        return np.frombuffer(body, dtype="<f4").reshape(header.shape).astype(np.float32)
