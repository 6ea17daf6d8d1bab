"""Sparsifying codecs: top-k (largest magnitudes) and rand-k (shared random support).

Both keep ``k = max(1, ceil(ratio·d))`` of the ``d`` coordinates of a tensor
(all of them when ``d`` is 0 or ``ratio`` is 1) and send zeros for the rest.
Neither keeps state: error feedback, which top-k needs to converge, is a
generic wrapper around any biased codec, not part of this module.
"""

from __future__ import annotations

import math
import numbers
import struct
from functools import lru_cache

import numpy as np

from .bitpack import packed_size
from .codec import Codec, CodecError, CodecReason, CodecTraits, EncodeContext
from .golomb import MAX_RICE_PARAMETER, best_rice_parameter, rice_decode, rice_encode
from .quantizers import QsgdCodec
from .summable import FIXED_POINT_LEVELS, grid_codes
from .wire import Header, pack_header, unpack_header

_FP16_MAX = float(np.finfo(np.float16).max)
_VALUE_DTYPES: dict[str, np.dtype] = {"fp16": np.dtype("<f2"), "fp32": np.dtype("<f4")}
_U64 = (1 << 64) - 1
_QUANTIZED = struct.Struct("<QIIB")  # rand-k's quantized layout: seed, 0, k, bits (then m and the indices)


def _check_ratio(name: str, ratio: object) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise ValueError(f"{name} ratio must be a number in (0, 1], got {ratio!r}")
    value = float(ratio)
    if not (0.0 < value <= 1.0):  # also rejects NaN
        raise ValueError(
            f"{name} ratio must be in (0, 1], got {ratio}: k = ratio·d must satisfy 0 < k ≤ d"
        )
    return value


def support_size(ratio: float, d: int) -> int:
    """``k = max(1, ceil(ratio·d))``, at most ``d`` (0 for an empty tensor).

    The product is rounded down by a relative 1e-12 before the ceiling so that
    a ratio that is not exact in binary (0.07·100 = 7.000000000000001) gives
    the k a person expects (7, not 8).
    """
    if d == 0:
        return 0
    return min(d, max(1, math.ceil(ratio * d * (1.0 - 1e-12))))


def _flat_f32(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The tensor as little-endian float32 and its flat view (a copy only if not contiguous)."""
    x = np.asarray(x, dtype="<f4")
    return x, x.reshape(-1)


def _check_k_fits(name: str, k: int) -> None:
    if k > 0xFFFFFFFF:
        raise ValueError(f"{name} keeps {k} coordinates; the wire format counts at most 2**32 - 1")


def _open_sparse(
    payload: bytes, codec: Codec, fields: str, names: str, k_index: int = 0
) -> tuple[Header, memoryview, tuple[int, ...]]:
    """Header, body and the leading ``fields`` of a sparse payload; checks 0 < k <= d."""
    header = unpack_header(payload, codec.codec_id)
    body = memoryview(payload)[header.size :]
    size = struct.calcsize(fields)
    if len(body) < size:
        raise CodecError(f"{codec.name} body of {len(body)} bytes is shorter than its {size}-byte {names} fields", reason=CodecReason.TRUNCATED)
    values = struct.unpack_from(fields, body)
    k, d = values[k_index], header.numel
    if k > d or (k == 0 and d > 0):
        raise CodecError(f"{codec.name} payload keeps k={k} coordinates of a {d}-element tensor; need 0 < k ≤ d", reason=CodecReason.BAD_PARAMETER)
    return header, body, values


_SAMPLE = 1 << 16  # magnitudes top-k samples to bound its threshold from below


def _top_k(magnitude: np.ndarray, k: int) -> np.ndarray:
    """Sorted positions of the ``k`` largest of ``magnitude`` (ties: lowest positions; NaN counts as largest)."""
    n = magnitude.size
    top = np.partition(magnitude, n - k)[n - k :]
    threshold = top[0]
    if np.isnan(top).any():
        # NaN sorts above every number: keep it among the k so that the
        # server's NaN/Inf check still sees the diverged client.
        return np.sort(np.argpartition(magnitude, n - k)[n - k :]).astype(np.int64)
    idx = np.flatnonzero(magnitude > threshold)
    if idx.size < k:
        ties = np.flatnonzero(magnitude == threshold)[: k - idx.size]
        idx = np.sort(np.concatenate([idx, ties]))
    return idx.astype(np.int64, copy=False)


def _candidates(magnitude: np.ndarray, k: int) -> np.ndarray | None:
    """Sorted positions that hold the ``k`` largest magnitudes (and NaNs), or None.

    A strided sample of ``_SAMPLE`` magnitudes gives a lower bound L on the
    k-th largest (its rank sits about 1.5× and 4σ past the sample's expected
    count above the k-th), so one pass keeps the positions with magnitude ≥ L
    (or NaN), typically 1.5·k of them, and the exact selection runs on those
    alone. The result is exact whatever the data: if fewer than k positions
    pass (an unlucky or periodic sample), or so many that gathering them costs
    more than it saves (over d/4, e.g. a mostly-zero tensor with bound 0), this
    returns None and the caller selects over the whole tensor.
    """
    d = magnitude.size
    if d < 16 * _SAMPLE or 4 * k > d:
        return None
    sample = magnitude[:: d // _SAMPLE]
    expected = sample.size * k / d
    rank = min(sample.size, int(1.5 * expected + 4 * expected**0.5 + 8))
    bound = np.partition(sample, sample.size - rank)[sample.size - rank]
    if np.isnan(bound):
        return None
    keep = np.less(magnitude, bound)
    np.logical_not(keep, out=keep)  # magnitude ≥ bound, or NaN
    candidates = np.flatnonzero(keep)
    return candidates if k <= candidates.size <= d // 4 else None


def top_k_positions(flat: np.ndarray, k: int) -> np.ndarray:
    """Sorted int64 positions of the ``k`` largest |flat| (ties: lowest positions; NaN counts as largest)."""
    d = flat.size
    if k == d:
        return np.arange(d, dtype=np.int64)
    magnitude = np.abs(flat)
    candidates = _candidates(magnitude, k)
    if candidates is not None:  # the k largest are among these (sorted) positions
        return candidates[_top_k(magnitude[candidates], k)]
    return _top_k(magnitude, k)


def _coded_support(name: str, ratio: float, flat: np.ndarray) -> tuple[np.ndarray, int, bytes]:
    """The top-k positions of ``flat`` (k from ``ratio``), their Rice parameter and Rice-coded gaps."""
    k = support_size(ratio, flat.size)
    _check_k_fits(name, k)
    idx = top_k_positions(flat, k)
    gaps = np.diff(idx, prepend=-1) - 1
    b = best_rice_parameter(gaps)
    return idx, b, rice_encode(gaps, b)


def _decode_support(name: str, coded: memoryview, b: int, k: int, d: int) -> np.ndarray:
    """The sorted positions from Rice-coded gaps; CodecError if b is invalid or they run past ``d``."""
    if b > MAX_RICE_PARAMETER:
        raise CodecError(f"{name} payload has Rice parameter {b}; at most {MAX_RICE_PARAMETER} is valid", reason=CodecReason.BAD_PARAMETER)
    gaps = rice_decode(coded, b, k)
    if k and (int(gaps.max()) >= d or float(gaps.sum(dtype=np.float64)) + k > d):
        raise CodecError(f"{name} positions run past the end of the {d}-element tensor", reason=CodecReason.BAD_VALUE)
    return np.cumsum(gaps.astype(np.int64) + 1) - 1


class TopKCodec(Codec):
    """Keeps the ``k = max(1, ceil(ratio·d))`` largest-magnitude coordinates.

    Positions are sorted and sent as Rice-coded gaps (``golomb.py``): the first
    gap is the first index, each next gap is ``index_i - index_{i-1} - 1``.
    Values are sent at fp16 (clipped to ±65504, the largest finite fp16; Inf and
    NaN pass through so the payload check still sees them) or fp32. Ties at the
    threshold magnitude keep the lowest indices.

    Wire body after the header (little-endian)::

        uint32  k
        uint8   Rice parameter b (0..63)
        bytes   Rice code of the k gaps (exactly ceil(bits/8) bytes)
        k × fp16 | fp32   the kept values, in index order

    The value width is this codec's ``values`` parameter, not a payload field:
    the decoder must be built with the same ``values`` as the encoder.

    Bits per coordinate ≈ k·(b + 1 + gap/2**b + 16)/d with fp16 values
    (``+ 32`` with fp32), where with b ≈ log2(ln2·d/k) the Rice part is about
    b + 2.44 bits, plus 8·(5 + 6 + 4·ndim)/d for the body fields and header.
    At ratio 0.01 that is about 0.01·(8.2 + 16) ≈ 0.25 bits per coordinate.

    Algebra: biased; contractive with δ = k/d (||x - C(x)||² ≤ (1 - k/d)||x||²
    up to the fp16 rounding of the kept values); does not commute with sum
    (each client keeps its own support); stateless.
    """

    name = "topk"
    codec_id = 7
    traits = CodecTraits(
        unbiased=False, contractive=True, commutes_with_sum=False, stateful=False, lossless=False
    )

    def __init__(self, ratio: float = 0.01, values: str = "fp16") -> None:
        self.ratio = _check_ratio("topk", ratio)
        if values not in _VALUE_DTYPES:
            raise ValueError(f"topk values must be 'fp16' or 'fp32', got {values!r}")
        self.values = values
        self._vdtype = _VALUE_DTYPES[values]

    def __repr__(self) -> str:
        return f"TopKCodec(ratio={self.ratio!r}, values={self.values!r})"

    def with_ratio(self, ratio: float) -> TopKCodec:
        """The same codec keeping ``ratio`` of the coordinates (error feedback's sparsity warm-up)."""
        return TopKCodec(ratio, self.values)

    def encode(self, x: np.ndarray, ctx: EncodeContext | None = None) -> bytes:
        x, flat = _flat_f32(x)
        idx, b, coded = _coded_support("topk", self.ratio, flat)
        values = flat[idx]
        if self.values == "fp16":
            values = np.where(np.isfinite(values), np.clip(values, -_FP16_MAX, _FP16_MAX), values)
        return b"".join(
            (
                pack_header(self.codec_id, x.dtype, x.shape),
                struct.pack("<IB", idx.size, b),
                coded,
                values.astype(self._vdtype).tobytes(),
            )
        )

    def decode(self, payload: bytes) -> np.ndarray:
        header, body, (k, b) = _open_sparse(payload, self, "<IB", "k/Rice")
        d = header.numel
        value_bytes = k * self._vdtype.itemsize
        positions_end = len(body) - value_bytes
        if positions_end < 5:
            raise CodecError(
                f"topk payload is truncated: {k} {self.values} values need {value_bytes} bytes "
                f"after the positions, the body has {len(body) - 5}", reason=CodecReason.TRUNCATED
            )
        idx = _decode_support("topk", body[5:positions_end], b, k, d)
        out = np.zeros(d, dtype=np.float32)
        out[idx] = np.frombuffer(body[positions_end:], dtype=self._vdtype)
        return out.reshape(header.shape)


class STCCodec(Codec):
    """Sparse Ternary Compression (Sattler et al. 2019): top-k support, one magnitude, sign bits.

    Keeps the ``k = max(1, ceil(ratio·d))`` largest-magnitude coordinates
    (selected exactly as :class:`TopKCodec`, ties at the lowest indices) and
    replaces each kept value by ``±μ``, μ = mean |x_i| over the kept ones
    (computed in float64, sent as float32); all other coordinates are 0.

    Wire body after the header (little-endian)::

        uint32  k
        uint8   Rice parameter b (0..63)
        float32 μ
        bytes   Rice code of the k gaps (as topk's: first index, then index_i − index_{i−1} − 1)
        ⌈k/8⌉ bytes  sign bits, one per kept value in index order (1 = negative),
                     little-endian bit order, padding bits 0

    Bits per coordinate: k·(b + 1 + gap/2**b + 1)/d + (72 + h)/d, h = 8·(6 + 4·ndim)
    header bits; with b ≈ log2(ln2·d/k) the Rice part is ≈ b + 2.44, so at
    ratio 0.01 about 0.01·(8.2 + 1) ≈ 0.092 bits per coordinate.

    Error: ||x − C(x)||² = ||x||² − k·μ² exactly (Σ over the kept of
    (|x_i| − μ)² = Σ|x_i|² − k·μ²), and k·μ² ≥ ||x||²/d, so the codec is
    contractive with δ = k·μ²/||x||² ≥ 1/d (≥ k/d·(μ/rms_top)², rms_top the root
    mean square of the kept values). Biased; needs error feedback (on by
    default in the registry); does not commute with sum (each client keeps its
    own support); stateless. A non-finite kept value makes μ non-finite, so
    the server's NaN/Inf check still sees a diverged client.
    """

    name = "stc"
    codec_id = 11
    traits = CodecTraits(
        unbiased=False, contractive=True, commutes_with_sum=False, stateful=False, lossless=False
    )
    _FIELDS = struct.Struct("<IBf")

    def __init__(self, ratio: float = 0.01) -> None:
        self.ratio = _check_ratio("stc", ratio)

    def __repr__(self) -> str:
        return f"STCCodec(ratio={self.ratio!r})"

    def with_ratio(self, ratio: float) -> STCCodec:
        """The same codec keeping ``ratio`` of the coordinates (error feedback's sparsity warm-up)."""
        return STCCodec(ratio)

    def encode(self, x: np.ndarray, ctx: EncodeContext | None = None) -> bytes:
        x, flat = _flat_f32(x)
        idx, b, coded = _coded_support("stc", self.ratio, flat)
        kept = flat[idx]
        with np.errstate(over="ignore", invalid="ignore"):
            mu = np.float32(np.abs(kept, dtype=np.float64).mean()) if idx.size else np.float32(0.0)
        signs = np.packbits(np.signbit(kept), bitorder="little")
        return b"".join(
            (
                pack_header(self.codec_id, x.dtype, x.shape),
                self._FIELDS.pack(idx.size, b, mu),
                coded,
                signs.tobytes(),
            )
        )

    def decode(self, payload: bytes) -> np.ndarray:
        header, body, (k, b, mu) = _open_sparse(payload, self, "<IBf", "k/Rice/magnitude")
        d = header.numel
        sign_bytes = (k + 7) // 8
        start = self._FIELDS.size
        positions_end = len(body) - sign_bytes
        if positions_end < start:
            raise CodecError(
                f"stc payload is truncated: {k} sign bits need {sign_bytes} bytes after the positions, "
                f"the body has {len(body) - start}", reason=CodecReason.TRUNCATED
            )
        idx = _decode_support("stc", body[start:positions_end], b, k, d)
        signs = np.frombuffer(body[positions_end:], dtype=np.uint8)
        if k % 8 and int(signs[-1]) >> (k % 8):
            raise CodecError("stc sign bits have non-zero padding bits", reason=CodecReason.CORRUPT)
        negative = np.unpackbits(signs, count=k, bitorder="little").astype(bool)
        out = np.zeros(d, dtype=np.float32)
        out[idx] = np.where(negative, -mu, mu).astype(np.float32)
        return out.reshape(header.shape)


# ---------------------------------------------------------------------------
# rand-k


def _distinct_prefix(bitgen: np.random.PCG64, d: int, m: int) -> np.ndarray:
    """The first ``m`` distinct values of a uniform stream over [0, d), sorted.

    The stream takes the top ``ceil(log2 d)`` bits of each raw 64-bit PCG64
    output and rejects values ≥ d, so it is exactly uniform; the first ``m``
    distinct values of an i.i.d. uniform stream are a uniform ``m``-subset.
    Batch sizes depend on (d, m) only, so the result depends on the seed only.
    """
    bits = max(1, (d - 1).bit_length())
    shift = np.uint64(64 - bits)
    accept = d / float(1 << bits)
    expected = -d * math.log1p(-m / d)  # accepted draws until m distinct
    batch = int((expected + 4.0 * math.sqrt(expected) + 32.0) / accept)
    stream = np.zeros(0, dtype=np.uint64)
    while True:
        raw = bitgen.random_raw(batch) >> shift
        stream = np.concatenate([stream, raw[raw < np.uint64(d)]])
        unique, first = np.unique(stream, return_index=True)
        if unique.size >= m:
            # first-occurrence indices are distinct: exactly m pass the cut
            cut = np.partition(first, m - 1)[m - 1]
            return unique[first <= cut].astype(np.int64)
        batch = max(batch // 4, 1024)


def _smallest_keys(bitgen: np.random.PCG64, d: int, k: int) -> np.ndarray:
    """The ``k`` coordinates with the smallest i.i.d. 64-bit keys, sorted (ties: lowest index)."""
    keys = bitgen.random_raw(d)
    threshold = np.partition(keys, k - 1)[k - 1]
    idx = np.flatnonzero(keys < threshold)
    if idx.size < k:
        ties = np.flatnonzero(keys == threshold)[: k - idx.size]
        idx = np.sort(np.concatenate([idx, ties]))
    return idx.astype(np.int64, copy=False)


def randk_support(seed: int, d: int, k: int) -> np.ndarray:
    """The sorted, read-only support rand-k uses for ``(seed, d, k)``.

    A uniformly random ``k``-subset of ``range(d)`` that depends on nothing but
    its arguments: it is built from the raw output of ``numpy.random.PCG64(seed)``
    (whose stream NumPy keeps stable across versions, unlike the methods of
    ``Generator``), so clients and a server on different NumPy versions agree.
    Sparse supports (k ≤ d/16) take the first k distinct values of a uniform
    stream (≈ 15 ms for d = 2**24, k = d/100); denser ones keep the k smallest
    of d random keys (O(d)). Cached, since every client of a round and the
    server ask for the same supports.
    """
    if not 0 <= k <= d:
        raise ValueError(f"rand-k support needs 0 ≤ k ≤ d, got k={k}, d={d}")
    if k == d:  # every coordinate, whatever the seed: one cache entry per d
        return _full_support(d)
    return _random_support(seed, d, k)


@lru_cache(maxsize=8)
def _full_support(d: int) -> np.ndarray:
    idx = np.arange(d, dtype=np.int64)
    idx.flags.writeable = False
    return idx


def _build_support(seed: int, d: int, k: int) -> np.ndarray:
    """The support for 0 < k < d, uncached (:func:`randk_support`)."""
    bitgen = np.random.PCG64(seed)
    idx = _distinct_prefix(bitgen, d, k) if 16 * k <= d else _smallest_keys(bitgen, d, k)
    idx.flags.writeable = False
    return idx


_random_support = lru_cache(maxsize=64)(_build_support)


class RandKCodec(Codec):
    """Keeps ``k = max(1, ceil(ratio·d))`` coordinates drawn from the round's seed.

    The support is a uniformly random k-subset of the coordinates, drawn
    without replacement from ``ctx.seed`` (see :func:`randk_support` and
    :meth:`support`), so every client of a round picks the same coordinates
    for the same tensor; the kept values are multiplied by d/k, so
    E_seed[decode(encode(x))] = x. The seed is reduced mod 2**64 and travels
    in the payload: decoding needs nothing else.

    ``bits`` = 32 (the default) sends the scaled values as float32; ``bits``
    in 1..8 quantizes them with QSGD's grid (:class:`~.quantizers.QsgdCodec`
    with one bucket): m = max |vᵢ| over the k scaled values vᵢ (one float32
    per payload), grid points −m + jΔ, Δ = 2m/s, s = 2**bits − 1, stochastic
    rounding to a neighbouring grid point, so E[v̂ᵢ] = vᵢ and
    Var[v̂ᵢ] ≤ Δ²/4 = m²/s². The rounding noise comes from the codec's own
    generator, seeded with ``seed`` (the registry passes one per client and
    round, as for qsgd; ``ctx.seed`` is shared by the clients of a round and
    must not drive it). With bits = 32 the codec is deterministic given ctx.seed.

    Wire body after the header (little-endian), in one of two layouts::

        float32 values (bits = 32, and every empty tensor):
            uint64  seed
            uint32  k                (0 < k ≤ d; 0 only when d = 0)
            k × float32              x[support]·(d/k), support in increasing order
        quantized values (bits in 1..8, d > 0):
            uint64  seed
            uint32  0                (marks this layout: k = 0 is invalid above when d > 0)
            uint32  k                (0 < k ≤ d)
            uint8   bits             (1..8)
            float32 m
            ⌈k·bits/8⌉ bytes         the grid indices j at ``bits`` bits each
                                     (``bitpack`` order), in support order

    The decoder reads the layout from the payload, so payloads made before
    ``bits`` existed decode exactly as before and a decoder built with any
    ``bits`` reads both; each layout has one valid length, so a truncated or
    extended payload of either is a CodecError.

    Bits per coordinate, with h = 8·(6 + 4·ndim) header bits:
    bits = 32: (32·k + 96 + h)/d (≈ 0.32 at ratio 0.01);
    bits < 32: (bits·k + 168 + h)/d (≈ 0.08 at ratio 0.01, bits = 8).
    Variance, over the support and the rounding:
    E||C(x) − x||² = (d/k − 1)·||x||² at bits = 32, plus at most
    k·m²/s² ≤ (d²/k)·||x||∞²/s² for bits < 32.

    Algebra: unbiased (over the seed and the rounding); commutes with sum
    (with a shared seed the supports match, so the sum of the value vectors is
    the encoding of the sum; with bits < 32 the indices add up when the
    clients also share the scale, as the ring form :meth:`ring_round` does);
    not contractive (the d/k scaling expands); stateless.
    """

    name = "randk"
    codec_id = 8
    traits = CodecTraits(
        unbiased=True, contractive=False, commutes_with_sum=True, stateful=False, lossless=False
    )

    def __init__(self, ratio: float = 0.01, bits: int = 32, seed: int | None = None) -> None:
        self.ratio = _check_ratio("randk", ratio)
        if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not (1 <= bits <= 8 or bits == 32):
            raise ValueError(f"randk bits must be 32 (float32 values) or in 1..8 (QSGD grid), got {bits!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise ValueError(f"seed must be an integer or None, got {seed!r}")
        self.bits = int(bits)
        self.rng = np.random.default_rng(seed) if self.bits < 32 else None  # bits = 32 draws nothing

    def __repr__(self) -> str:
        return f"RandKCodec(ratio={self.ratio!r}, bits={self.bits})"

    def support(self, seed: int, d: int) -> np.ndarray:
        """The sorted coordinates this codec keeps of a ``d``-element tensor for round seed ``seed``."""
        return randk_support(int(seed) & _U64, d, support_size(self.ratio, d))

    def ring_levels(self) -> int:
        """s = 2^bits − 1 (QSGD's grid), or 2³² − 1 (32-bit fixed point) for bits = 32."""
        return FIXED_POINT_LEVELS if self.bits == 32 else (1 << self.bits) - 1

    def ring_coords(self, seed: int, d: int) -> int:
        """k = max(1, ⌈ratio·d⌉) codes per tensor (0 when d = 0)."""
        return support_size(self.ratio, d)

    def ring_support(self, seed: int, d: int) -> np.ndarray:
        """The round-shared support (:meth:`support`): every client sends the same k coordinates."""
        return self.support(seed, d)

    def ring_values(self, flat: np.ndarray, seed: int) -> np.ndarray:
        """The sent values x[support]·(d/k) (float64), as :meth:`encode` sends them."""
        support = self.support(seed, flat.size)
        return flat[support] * (flat.size / max(len(support), 1))

    def ring_round(self, values: np.ndarray, clip: float, rng: np.random.Generator) -> np.ndarray:
        """The codes of the k scaled values: as :meth:`encode` quantizes them (QSGD with one
        bucket, :meth:`QsgdCodec.ring_round`, m = C) for bits in 1..8; for bits = 32,
        32-bit fixed point (``summable.grid_codes``). E[kΔ − C] = clip(v, −C, C),
        Var ≤ Δ²/4 = C²/s² per sent value."""
        if self.bits == 32:
            return grid_codes(values, clip, FIXED_POINT_LEVELS, rng)
        return QsgdCodec(self.bits, bucket=max(1, values.size), seed=0).ring_round(values, clip, rng)

    def encode(self, x: np.ndarray, ctx: EncodeContext | None = None) -> bytes:
        x, flat = _flat_f32(x)
        d = flat.size
        k = support_size(self.ratio, d)
        _check_k_fits("randk", k)
        seed = int(ctx.seed if ctx is not None else 0) & _U64
        support = randk_support(seed, d, k)
        scale = d / k if k else 1.0
        values = (flat[support].astype(np.float64) * scale).astype("<f4")
        header = pack_header(self.codec_id, x.dtype, x.shape)
        if self.bits == 32 or k == 0:
            return b"".join((header, struct.pack("<QI", seed, k), values.tobytes()))
        quantizer = QsgdCodec(self.bits, bucket=k, seed=0)  # one bucket; the noise comes from self.rng
        body = np.empty(_QUANTIZED.size + quantizer.quantized_size(k), np.uint8)
        body[: _QUANTIZED.size] = np.frombuffer(_QUANTIZED.pack(seed, 0, k, self.bits), np.uint8)
        quantizer.quantize_into(values, body[_QUANTIZED.size :], self.rng)  # m, then the indices
        return header + body.tobytes()

    def decode(self, payload: bytes) -> np.ndarray:
        header = unpack_header(payload, self.codec_id)
        body = memoryview(payload)[header.size :]
        d = header.numel
        if len(body) >= _QUANTIZED.size and d > 0 and struct.unpack_from("<I", body, 8)[0] == 0:
            seed, _, k, bits = _QUANTIZED.unpack_from(body)
            if not 0 < k <= d or not 1 <= bits <= 8:
                raise CodecError(
                    f"randk payload has k={k}, bits={bits} for a {d}-element tensor; need 0 < k ≤ d, bits in 1..8", reason=CodecReason.BAD_PARAMETER
                )
            expected = _QUANTIZED.size + 4 + packed_size(k, bits)
            if len(body) != expected:
                raise CodecError(f"randk payload with k={k} at {bits} bits needs a {expected}-byte body, got {len(body)}", reason=CodecReason.WRONG_LENGTH)
            data = np.frombuffer(body[_QUANTIZED.size :], np.uint8)
            values = QsgdCodec.dequantize(data, k, bits, k)
        else:
            header, body, (seed, k) = _open_sparse(payload, self, "<QI", "seed/k", k_index=1)
            if len(body) != 12 + 4 * k:
                raise CodecError(f"randk payload with k={k} needs a {12 + 4 * k}-byte body, got {len(body)}", reason=CodecReason.WRONG_LENGTH)
            values = np.frombuffer(body[12:], dtype="<f4")
        out = np.zeros(d, dtype=np.float32)
        if k == support_size(self.ratio, d) or k == d:
            support = randk_support(seed, d, k)
        else:
            # A k this decoder's ratio would not pick: build the support without
            # caching it, so that payloads with odd k and fresh seeds cannot pin
            # up to 64 supports of up to d - 1 coordinates each in the cache.
            support = _build_support(seed, d, k)
        out[support] = values
        return out.reshape(header.shape)
