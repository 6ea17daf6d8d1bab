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
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from .codec import CodecError

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
        return int(np.prod(self.shape, dtype=np.int64))


def pack_header(codec_id: int, dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """Serialise the header for a tensor of ``dtype`` and ``shape``."""
    code = _DTYPE_CODES.get(np.dtype(dtype).newbyteorder("<"))
    if code is None:
        raise CodecError(f"dtype {dtype} has no wire code; codecs take float32 tensors")
    if len(shape) > MAX_NDIM:
        raise CodecError(f"tensor has {len(shape)} dimensions; the wire format allows {MAX_NDIM}")
    return _FIXED.pack(MAGIC, VERSION, codec_id, code, len(shape)) + struct.pack(
        f"<{len(shape)}I", *shape
    )


def unpack_header(payload: bytes, expected_codec_id: int) -> Header:
    """Parse and check the header; raise CodecError naming what is wrong."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise CodecError(f"payload must be bytes, got {type(payload).__name__}")
    if len(payload) < _FIXED.size:
        raise CodecError(f"payload of {len(payload)} bytes is shorter than the {_FIXED.size}-byte header")
    magic, version, codec_id, dtype_code, ndim = _FIXED.unpack_from(payload, 0)
    if magic != MAGIC:
        raise CodecError(f"payload does not start with the qfl magic {MAGIC!r} (got {bytes(magic)!r})")
    if version != VERSION:
        raise CodecError(f"wire version {version} is not supported (this qfl reads version {VERSION})")
    if codec_id != expected_codec_id:
        raise CodecError(
            f"payload was made by codec id {codec_id}, but this decoder is codec id "
            f"{expected_codec_id}; client and server must use the same codec"
        )
    if dtype_code not in _DTYPES:
        raise CodecError(f"unknown dtype code {dtype_code} in payload header")
    if ndim > MAX_NDIM:
        raise CodecError(f"header claims {ndim} dimensions; at most {MAX_NDIM} are allowed")
    end = _FIXED.size + 4 * ndim
    if len(payload) < end:
        raise CodecError("payload is truncated inside its shape field")
    shape = struct.unpack_from(f"<{ndim}I", payload, _FIXED.size)
    if int(np.prod(shape, dtype=np.int64)) > MAX_ELEMENTS:
        raise CodecError(f"header claims shape {shape}, larger than any tensor qfl sends")
    return Header(codec_id, _DTYPES[dtype_code], tuple(shape), end)
