"""The versioned wire header shared by every codec.

Layout (little-endian)::

    offset size  field
    0      2     magic  b"QC"
    2      1     version (1)
    3      1     codec_id
    4      1     dtype code of the decoded tensor (1 = float32)
    5      1     ndim (0..8)
    6      4*n   shape, one uint32 per dimension
    ...          codec body (the codec's parameters, then its packed bits)

The header costs 6 + 4·ndim bytes per tensor; bit accounting always counts it.

Untrusted payloads: the header's shape is the sender's claim. A receiver that
knows the shape to expect decodes through :meth:`Codec.decode_as
<qfl.compression.codec.Codec.decode_as>`, which checks the claim against that
shape and the payload length against :func:`max_payload_size` before any
decoder allocates, so every allocation is bounded by the expected shape.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

from .codec import CodecError, CodecReason

MAGIC = b"QC"
VERSION = 1
MAX_NDIM = 8
MAX_ELEMENTS = 1 << 34
_DTYPES = {1: np.dtype("<f4")}
_DTYPE_CODES = {dtype: code for code, dtype in _DTYPES.items()}
_FIXED = struct.Struct("<2sBBBB")


@dataclass(frozen=True)
class Header:
    codec_id: int
    dtype: np.dtype
    shape: tuple[int, ...]
    size: int  # bytes the header occupies; the body starts here

    @property
    def numel(self) -> int:
        return math.prod(self.shape)  # Python ints: never wraps


def max_payload_size(numel: int) -> int:
    """The longest payload any qfl codec sends for a tensor of ``numel`` elements.

    ``9·numel + 8192`` bytes. The worst legitimate cases are PowerSGD at full
    rank on a square matrix (4·r·(n + m) = 8·numel, plus its rank field) and the
    entropy stage around an inner payload of up to ``8·numel + 4096`` bytes
    (``entropy.max_inner_payload``) that does not compress (zstd and zlib add
    well under 1/128 of the input, plus a few bytes); headers take at most 38
    bytes. Anything longer is refused before it is decoded.
    """
    return 9 * numel + 8192


def pack_header(codec_id: int, dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """Serialise the header for a tensor of ``dtype`` and ``shape``."""
    code = _DTYPE_CODES.get(np.dtype(dtype).newbyteorder("<"))
    if code is None:
        raise CodecError(f"dtype {dtype} has no wire code; codecs take float32 tensors", reason=CodecReason.UNENCODABLE)
    if len(shape) > MAX_NDIM:
        raise CodecError(f"tensor has {len(shape)} dimensions; the wire format allows {MAX_NDIM}", reason=CodecReason.UNENCODABLE)
    return _FIXED.pack(MAGIC, VERSION, codec_id, code, len(shape)) + struct.pack(
        f"<{len(shape)}I", *shape
    )


def unpack_header(payload: bytes, expected_codec_id: int) -> Header:
    """Parse and check the header; raise CodecError naming what is wrong."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise CodecError(f"payload must be bytes, got {type(payload).__name__}", reason=CodecReason.NOT_BYTES)
    if len(payload) < _FIXED.size:
        raise CodecError(f"payload of {len(payload)} bytes is shorter than the {_FIXED.size}-byte header", reason=CodecReason.TRUNCATED)
    magic, version, codec_id, dtype_code, ndim = _FIXED.unpack_from(payload, 0)
    if magic != MAGIC:
        raise CodecError(f"payload does not start with the qfl magic {MAGIC!r} (got {bytes(magic)!r})", reason=CodecReason.BAD_MAGIC)
    if version != VERSION:
        raise CodecError(f"wire version {version} is not supported (this qfl reads version {VERSION})", reason=CodecReason.VERSION)
    if codec_id != expected_codec_id:
        raise CodecError(
            f"payload was made by codec id {codec_id}, but this decoder is codec id "
            f"{expected_codec_id}; client and server must use the same codec", reason=CodecReason.WRONG_CODEC
        )
    if dtype_code not in _DTYPES:
        raise CodecError(f"unknown dtype code {dtype_code} in payload header", reason=CodecReason.BAD_HEADER)
    if ndim > MAX_NDIM:
        raise CodecError(f"header claims {ndim} dimensions; at most {MAX_NDIM} are allowed", reason=CodecReason.BAD_HEADER)
    end = _FIXED.size + 4 * ndim
    if len(payload) < end:
        raise CodecError("payload is truncated inside its shape field", reason=CodecReason.TRUNCATED)
    shape = struct.unpack_from(f"<{ndim}I", payload, _FIXED.size)
    if math.prod(shape) > MAX_ELEMENTS:  # Python ints: 8 dims of 2**32 - 1 do not wrap to 0
        raise CodecError(f"header claims shape {shape}, larger than any tensor qfl sends", reason=CodecReason.OVERSIZE)
    return Header(codec_id, _DTYPES[dtype_code], tuple(shape), end)
