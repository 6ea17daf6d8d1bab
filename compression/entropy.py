"""A lossless entropy-coding stage (zstd or zlib) after any codec."""

from __future__ import annotations

import io
import zlib

import numpy as np

from .codec import Codec, CodecError, CodecReason, CodecTraits, EncodeContext
from .wire import pack_header, unpack_header

_METHODS = {"zstd": 1, "zlib": 2}
_METHOD_NAMES = {code: name for name, code in _METHODS.items()}
# Level 1: on float payloads levels 1..9 give the same size to 0.1 % (the gain
# is Huffman coding of exponent bytes, not matches) and level 1 is the fastest
# that still entropy-codes literals (negative levels store floats raw).
ZSTD_LEVEL = 1
ZLIB_LEVEL = 6


def max_inner_payload(numel: int) -> int:
    """The largest inner payload a tensor of ``numel`` elements may decompress to.

    ``8·numel + 4096`` bytes: twice raw float32, so that every inner codec's
    legitimate worst case fits (top-k at ratio 1 with fp32 values sends about
    4.13 bytes per coordinate; PowerSGD at full rank sends 4·r·(n + m) ≤ 8·n·m),
    plus room for headers and the payloads of tiny tensors.
    """
    return 8 * numel + 4096


def _zstd():
    try:
        import zstandard
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "the zstd entropy stage needs the `zstandard` package (pip install zstandard), "
            "or use method 'zlib'"
        ) from exc
    return zstandard


class EntropyCodec(Codec):
    """Compresses another codec's payload losslessly; decode undoes it, then the inner codec.

    Payload (little-endian)::

        wire header        codec_id 10, float32, the tensor's shape
        uint8              method: 1 = zstd (level 1), 2 = zlib (level 6)
        uint8              the inner codec's codec_id
        bytes              compressed inner payload (one zstd frame carrying
                           its content size, or one zlib stream), nothing after

    Decoding refuses, before it allocates, any stream that would expand past
    :func:`max_inner_payload` of the header's element count (a decompression
    bomb that claims a tiny tensor), and any stream with bytes after its end;
    the inner payload is decoded with ``decode_as(inner, header.shape)``, so an
    inner header that claims another (e.g. a 2**34-element) shape is refused
    before the inner decoder allocates anything.

    ``name`` is ``"<inner>+<method>"`` and ``traits`` are the inner codec's:
    this stage changes the bits, not the algebra. Bits: those of the inner
    codec times the compression ratio, plus 8·(8 + 4·ndim).
    """

    name = "entropy"  # instances carry f"{inner.name}+{method}"
    codec_id = 10
    traits = CodecTraits(  # instances carry the inner codec's traits
        unbiased=True, contractive=True, commutes_with_sum=False, stateful=False, lossless=True
    )

    def __init__(self, inner: Codec, method: str = "zstd") -> None:
        if not isinstance(inner, Codec):
            raise ValueError(f"the entropy stage wraps a Codec, got {type(inner).__name__}")
        if method not in _METHODS:
            raise ValueError(f"entropy method must be zstd|zlib, got {method!r}")
        if method == "zstd":
            _zstd()
        self.inner = inner
        self.method = method
        self.name = f"{inner.name}+{method}"  # type: ignore[misc]
        self.traits = inner.traits  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"EntropyCodec({self.inner!r}, method={self.method!r})"

    def encode(self, x: np.ndarray, ctx: EncodeContext | None = None) -> bytes:
        x = np.asarray(x, dtype="<f4")
        parts = self.inner.encode_parts(x, ctx)  # for fp32: the header and a view of x, not a copy
        size = sum(len(part) for part in parts)
        cap = max_inner_payload(x.size)
        if size > cap:
            raise ValueError(
                f"{self.inner.name} made a {size}-byte payload for {x.size} values, more than "
                f"the {cap} bytes the entropy stage's decoder accepts"
            )
        prefix = pack_header(self.codec_id, x.dtype, x.shape) + bytes((_METHODS[self.method], self.inner.codec_id))
        if self.method == "zlib":
            stream = zlib.compressobj(ZLIB_LEVEL)
            return b"".join([prefix, *(stream.compress(part) for part in parts), stream.flush()])
        # Streaming into a buffer that already holds the prefix saves a copy of
        # the whole compressed payload; `size` puts the content size in the frame.
        out = io.BytesIO()
        out.write(prefix)
        compressor = _zstd().ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
        with compressor.stream_writer(out, size=size, closefd=False) as writer:
            for part in parts:
                writer.write(part)
        return out.getvalue()

    def decode(self, payload: bytes) -> np.ndarray:
        header = unpack_header(payload, self.codec_id)
        body = memoryview(payload)[header.size :]
        if len(body) < 2:
            raise CodecError(f"entropy body of {len(body)} bytes is shorter than its method/codec fields", reason=CodecReason.TRUNCATED)
        method, inner_id = body[0], body[1]
        if method != _METHODS[self.method]:
            got = _METHOD_NAMES.get(method, f"unknown method {method}")
            raise CodecError(f"payload was compressed with {got}, this decoder expects {self.method}", reason=CodecReason.WRONG_CODEC)
        if inner_id != self.inner.codec_id:
            raise CodecError(
                f"payload wraps codec id {inner_id}, but this decoder wraps {self.inner.name} "
                f"(codec id {self.inner.codec_id}); client and server must use the same codec", reason=CodecReason.WRONG_CODEC
            )
        cap = max_inner_payload(header.numel)
        data = body[2:]
        inner = self._decompress_zstd(data, cap) if method == 1 else self._decompress_zlib(data, cap)
        try:  # the inner header is checked against the outer shape before the inner decoder allocates
            return self.inner.decode_as(inner, header.shape)
        except CodecError as err:
            raise CodecError(f"entropy payload of shape {header.shape}: inner {self.inner.name} payload: {err}", reason=err.reason) from None

    @staticmethod
    def _decompress_zstd(data: memoryview, cap: int) -> bytes:
        zstandard = _zstd()
        try:
            size = zstandard.frame_content_size(data)
        except zstandard.ZstdError as exc:
            raise CodecError(f"entropy payload is not a zstd frame: {exc}", reason=CodecReason.CORRUPT) from None
        if size < 0:
            raise CodecError("zstd frame does not record its content size", reason=CodecReason.CORRUPT)
        if size > cap:
            raise CodecError(
                f"zstd frame claims {size} decompressed bytes, more than the {cap} this tensor's shape allows", reason=CodecReason.OVERSIZE
            )
        try:
            out = zstandard.ZstdDecompressor().decompress(data, max_output_size=cap, allow_extra_data=False)
        except zstandard.ZstdError as exc:
            raise CodecError(f"zstd stream is corrupt or truncated: {exc}", reason=CodecReason.CORRUPT) from None
        if len(out) != size:
            raise CodecError(f"zstd frame decompressed to {len(out)} bytes, its header says {size}", reason=CodecReason.CORRUPT)
        return out

    @staticmethod
    def _decompress_zlib(data: memoryview, cap: int) -> bytes:
        stream = zlib.decompressobj()
        try:
            out = stream.decompress(data, cap + 1)
        except zlib.error as exc:
            raise CodecError(f"zlib stream is corrupt: {exc}", reason=CodecReason.CORRUPT) from None
        if len(out) > cap:
            raise CodecError(f"zlib stream expands past the {cap} bytes this tensor's shape allows", reason=CodecReason.OVERSIZE)
        if not stream.eof:
            raise CodecError("zlib stream is truncated", reason=CodecReason.TRUNCATED)
        if stream.unused_data:
            raise CodecError(f"zlib stream is followed by {len(stream.unused_data)} extra byte(s)", reason=CodecReason.WRONG_LENGTH)
        return out
