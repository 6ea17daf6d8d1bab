"""The codec interface.

A codec maps a float32 tensor ``x`` to bytes and back. It declares its algebra
up front (after TensorFlow Federated's ``tensor_encoding`` stages) so that the
security layer can refuse combinations that cannot work, before a round runs:

- ``unbiased``: E[decode(encode(x))] = x.
- ``contractive``: ||decode(encode(x)) - x||² <= (1 - δ)||x||² for some δ > 0;
  such a codec needs error feedback to converge.
- ``commutes_with_sum``: given parameters shared by every client of a round,
  the sum of encodings decodes to the sum of inputs (what masked sums need);
  such a codec implements the ring form below (``ring_levels``, ``ring_round``,
  ``encode_ring``, ``decode_ring_sum``) with its own quantizer.
- ``stateful``: keeps a per-client residual between rounds.
- ``lossless``: decode(encode(x)) == x bit for bit.

Every codec writes the common wire header (``wire.py``) so a payload names its
codec, dtype and shape; ``decode`` checks them and raises :class:`CodecError`
on any malformed, truncated or foreign byte string.

Untrusted payloads go through ``decode_as(payload, shape)``: it refuses, in
O(1) and before any allocation, a payload whose header claims another shape
or that is longer than ``wire.max_payload_size`` of that shape. Past that
check every decoder (and every nested stage: the entropy stage decodes its
inner payload with ``decode_as`` too) bounds its allocations by a constant
times the expected element count, and raises nothing but CodecError.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from qfl.errors import CodecError, CodecReason

from .summable import clip_flags, decode_grid_sum, ring_input, summable_codec_names


@dataclass(frozen=True)
class CodecTraits:
    """The algebra a codec declares."""

    unbiased: bool
    contractive: bool
    commutes_with_sum: bool
    stateful: bool
    lossless: bool


@dataclass
class EncodeContext:
    """What an encoder may use besides the tensor.

    ``seed``: the same for every client of a round for a given tensor (rand-k
    draws its coordinates from it, so all clients pick the same support).
    ``state``: this client's persistent arrays for this tensor, kept between
    rounds by the caller (error-feedback residual, PowerSGD's warm-start Q).
    """

    seed: int = 0
    state: dict[str, np.ndarray] = field(default_factory=dict)


class Codec(ABC):
    """Turns one float32 tensor into bytes and back.

    Subclasses set ``name`` (the config value), ``codec_id`` (the byte in the
    wire header, unique and never reused) and ``traits``. ``decode`` needs
    nothing but the payload: whatever the decoder must know (scale, seed,
    shape) travels in it.
    """

    name: ClassVar[str]
    codec_id: ClassVar[int]
    traits: ClassVar[CodecTraits]

    @abstractmethod
    def encode(self, x: np.ndarray, ctx: EncodeContext | None = None) -> bytes:
        """Encode a float32 tensor of any shape into a self-describing payload."""

    def encode_parts(self, x: np.ndarray, ctx: EncodeContext | None = None) -> list[bytes | memoryview]:
        """The payload of :meth:`encode` as buffers that concatenate to it.

        A stage that reads the payload once (the entropy coder) takes these
        instead of ``encode``'s bytes. The default is ``[encode(x, ctx)]``; a
        codec whose body is its input's own memory (fp32) returns a view of
        it, which saves copying the whole tensor into a fresh payload first.
        The views are valid while ``x`` is unchanged.
        """
        return [self.encode(x, ctx)]

    @abstractmethod
    def decode(self, payload: bytes) -> np.ndarray:
        """Decode a payload made by :meth:`encode`; raise CodecError if malformed."""

    def decode_as(self, payload: bytes, shape: tuple[int, ...]) -> np.ndarray:
        """Decode an untrusted payload that must hold a float32 tensor of ``shape``.

        Before decoding, checks (O(1)) that the payload is bytes, at most
        ``wire.max_payload_size(prod(shape))`` long, and that its header is this
        codec's and claims exactly ``shape``; so the decoder's allocations are
        bounded by the expected shape, never by what a sender claims. Raises
        CodecError on any problem, including a decoder that returns another shape.
        """
        from .wire import max_payload_size, unpack_header  # wire imports this module

        shape = tuple(int(n) for n in shape)
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise CodecError(f"payload must be bytes, got {type(payload).__name__}", reason=CodecReason.NOT_BYTES)
        limit = max_payload_size(math.prod(shape))
        size = payload.nbytes if isinstance(payload, memoryview) else len(payload)
        if size > limit:
            raise CodecError(
                f"payload of {size} bytes is longer than any codec sends for shape {shape} "
                f"({limit} bytes at most); the sender is faulty or hostile", reason=CodecReason.OVERSIZE
            )
        claimed = unpack_header(payload, self.codec_id).shape
        if claimed != shape:
            raise CodecError(f"payload header claims shape {claimed}, expected {shape}", reason=CodecReason.SHAPE_MISMATCH)
        tensor = self.decode(payload)
        if tensor.shape != shape:
            raise CodecError(f"payload decoded to shape {tensor.shape}, expected {shape}", reason=CodecReason.SHAPE_MISMATCH)
        return tensor

    # ------------------------------------------------------------ ring form (masked sums)
    #
    # A codec that declares ``commutes_with_sum`` provides its integer form
    # for a masked sum (after TensorFlow Federated's encoding stages): given
    # the round's shared clip bound C and seed, it sends integer codes in
    # [0, s] on the grid −C + k·Δ, Δ = 2C/s, by its own rounding, so that the
    # sum of n clients' codes decodes to the sum of their (clipped) inputs.
    # ``qfl.compression.summable`` holds the codec-independent parts.

    #: Config parameters (``codec.NAME``) that have no ring form, with why and
    #: the fix; a masked sum refuses them (``registry.make_summable_codec``).
    ring_refuses: ClassVar[Mapping[str, str]] = {}

    def ring_levels(self) -> int:
        """s: ring codes are integers in ``[0, s]``. Raises ValueError unless the codec commutes with sum."""
        raise ValueError(_not_summable(self))

    def ring_coords(self, seed: int, d: int) -> int:
        """How many codes a tensor of ``d`` elements contributes for round seed ``seed`` (default: d)."""
        return d

    def ring_support(self, seed: int, d: int) -> np.ndarray | None:
        """The coordinates sent of a tensor of ``d`` elements (None, the default: all of them)."""
        return None

    def ring_values(self, flat: np.ndarray, seed: int) -> np.ndarray:
        """The values the codes stand for, from the flat float64 tensor (default: the tensor itself)."""
        return flat

    def ring_round(self, values: np.ndarray, clip: float, rng: np.random.Generator) -> np.ndarray:
        """uint64 codes k ∈ [0, s] of ``values`` with E[k·Δ − C] = clip(v, −C, C), Δ = 2C/s, C = ``clip``.

        The rounding noise comes from ``rng``. Raises ValueError unless the codec commutes with sum.
        """
        raise ValueError(_not_summable(self))

    def encode_ring(
        self, x: np.ndarray, clip: float, seed: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, int, int]:
        """One tensor's ring codes (uint64, one per sent coordinate) and its clip flags (over, under).

        ``clip`` (C) and ``seed`` are shared by every client of the round,
        ``rng`` is this client's. Codes: :meth:`ring_round` of
        :meth:`ring_values`; flags: ``summable.clip_flags`` of those values.
        Raises ValueError on NaN/Inf, a bad clip bound, or a codec that does
        not commute with sum.
        """
        levels = self.ring_levels()
        values = self.ring_values(ring_input(x, clip), seed)
        over, under = clip_flags(values, clip, levels)
        return self.ring_round(values, clip, rng), over, under

    def decode_ring_sum(
        self, code_sum: np.ndarray, clip: float, n_clients: int, seed: int, shape: tuple[int, ...]
    ) -> np.ndarray:
        """The sum of ``n_clients`` decoded tensors (float64, dense) from the sum of their ring codes.

        ``Σk·Δ − n·C`` per sent coordinate, zero off :meth:`ring_support`.
        """
        values = decode_grid_sum(code_sum, clip, self.ring_levels(), n_clients)
        d = math.prod(shape)
        support = self.ring_support(seed, d)
        if support is None:
            return values.reshape(shape)
        out = np.zeros(d, dtype=np.float64)
        out[support] = values
        return out.reshape(shape)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _not_summable(codec: Codec) -> str:
    name = getattr(codec, "name", type(codec).__name__)
    return (
        f"codec {name!r} does not commute with sum (its encodings cannot be added under masks); "
        f"masked sums accept {summable_codec_names()}; use security=channel-pad for any codec"
    )
