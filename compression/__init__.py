"""Codecs: float tensors to bytes and back, with their algebra declared.

Public interface (what other folders may import):

- :class:`Codec`, :class:`CodecTraits`, :class:`CodecError` (``codec.py``)
- :func:`make_codec`, :func:`make_summable_codec`, :func:`codec_names` (``registry.py``)
- :func:`encode_update`, :func:`decode_update`, :data:`PAYLOAD_STYPE`
  (``payload.py``): a whole model update to and from a Flower ``ArrayRecord``.
"""

from .codec import Codec, CodecError, CodecTraits, EncodeContext
from .payload import PAYLOAD_STYPE, PayloadError, decode_update, encode_update, payload_bytes
from .registry import codec_names, make_codec, make_summable_codec

__all__ = [
    "Codec",
    "CodecError",
    "CodecTraits",
    "EncodeContext",
    "PAYLOAD_STYPE",
    "PayloadError",
    "codec_names",
    "decode_update",
    "encode_update",
    "make_codec",
    "make_summable_codec",
    "payload_bytes",
]
