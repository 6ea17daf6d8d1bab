"""Secure-aggregation primitives: fixed-point ring encoding, one-time-pad masks, packing, the Wegman–Carter MAC."""

import math
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qfl.compression import EncodeContext
from qfl.compression.identity import Fp32Codec
from qfl.compression.sparsify import RandKCodec, randk_support, support_size
from qfl.security.primitives import mac, masking
from qfl.security.primitives.masking import (
    add_packed,
    aggregate,
    apply_masks,
    decode_fixed_point,
    encode_fixed_point,
    expand_key,
    key_bytes_needed,
    mask_from_key,
    masked_pack,
    pack_ring,
    remove_dropped,
    ring_bits,
    ring_to_signed,
    scale_bits_for_clip,
    unpack_ring,
    xor_pad,
)

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
P = (1 << 61) - 1


# --------------------------------------------------------------------------- helpers


def _ring_values(rng, d, B):
    return rng.integers(0, 1 << B, size=d, dtype=np.uint64, endpoint=False) if B < 64 else rng.integers(
        0, (1 << 64) - 1, size=d, dtype=np.uint64, endpoint=True
    )


def _pair_masks(rng, ids, d, B):
    """One mask per unordered pair of clients, each read from its own fresh random key."""
    ids = sorted(ids)
    return {
        (i, j): mask_from_key(rng.bytes(key_bytes_needed(d, B)), d, B)
        for a, i in enumerate(ids)
        for j in ids[a + 1 :]
    }


def _peers(masks, me):
    """The masks client ``me`` holds, keyed by peer id."""
    out = {}
    for (i, j), m in masks.items():
        if me == i:
            out[j] = m
        elif me == j:
            out[i] = m
    return out


def _mask_all(qs, masks, B):
    return {i: apply_masks(q, i, _peers(masks, i), B) for i, q in qs.items()}


def _plain_sum(qs, B):
    total = 0
    for q in qs:
        total = total + q.astype(object)
    return np.array([int(v) % (1 << B) for v in np.atleast_1d(total)], dtype=np.uint64)


GROUP = 1 << 17  # the wire layout's group of sub-byte fields


def _pack_reference(values, B, group=GROUP):
    """The wire layout of the masking module docstring, in Python integers, field by field."""
    vals = [int(v) for v in values]
    d, r = len(vals), B % 8
    m = d - d % 8  # the sub-byte fields cover the first m elements; the rest is the tail
    out, shift = bytearray(), 0
    for w in [w for w in (64, 32, 16, 8, 4, 2, 1) if B & w]:  # the binary digits of B, largest first
        field = [(v >> shift) & ((1 << w) - 1) for v in vals]
        shift += w
        if w >= 8:  # d little-endian words
            for x in field:
                out += x.to_bytes(w // 8, "little")
            continue
        per = 8 // w  # values per byte
        for g0 in range(0, m, group):
            part = field[g0 : min(m, g0 + group)]
            g = len(part)
            if w == 1:  # byte j: elements 8j .. 8j+7
                out += bytes(sum(part[8 * j + t] << t for t in range(8)) for j in range(g // 8))
            else:  # byte j: elements j + t·g/per
                out += bytes(sum(part[j + t * (g // per)] << (w * t) for t in range(per)) for j in range(g // per))
    tail = 0  # the top r bits of the last d mod 8 elements, r bits each
    for k, v in enumerate(vals[m:]):
        tail |= (v >> (B - r)) << (r * k)
    out += tail.to_bytes(((d - m) * r + 7) // 8, "little")
    return bytes(out)


def _hash_reference(message, r):
    acc = 0
    for start in range(0, len(message), 7):
        acc = (acc * r + int.from_bytes(message[start : start + 7], "little")) % P
    acc = (acc * r + len(message)) % P
    return acc * r % P


# --------------------------------------------------------------------------- masked sums are exact


@FAST
@given(
    n=st.integers(2, 8),
    d=st.integers(0, 40),
    B=st.integers(1, 64),
    seed=st.integers(0, 2**32 - 1),
)
def test_masked_aggregate_of_ring_elements_is_exact(n, d, B, seed):
    rng = np.random.default_rng(seed)
    qs = {i: _ring_values(rng, d, B) for i in range(n)}
    masked = _mask_all(qs, _pair_masks(rng, range(n), d, B), B)
    total = aggregate(list(masked.values()), B)
    assert total.dtype == np.uint64 and total.shape == (d,)
    assert np.array_equal(total, aggregate(list(qs.values()), B))
    assert np.array_equal(total, _plain_sum(qs.values(), B)[:d])


@FAST
@given(
    n=st.integers(2, 8),
    d=st.integers(1, 60),
    B=st.sampled_from([24, 32, 40, 53, 64]),
    clip=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**32 - 1),
)
def test_fp32_fixed_point_masked_aggregate_is_bit_exact(n, d, B, clip, seed):
    rng = np.random.default_rng(seed)
    codec = Fp32Codec()
    assert codec.traits.commutes_with_sum
    s = scale_bits_for_clip(clip, n, B)
    xs = [codec.decode(codec.encode(rng.standard_normal(d).astype(np.float32) * clip)) for _ in range(n)]
    qs = {i: encode_fixed_point(x, s, B, rng, clip=clip) for i, x in enumerate(xs)}
    masked = _mask_all(qs, _pair_masks(rng, range(n), d, B), B)
    total = aggregate(list(masked.values()), B)
    assert np.array_equal(total, aggregate(list(qs.values()), B))  # bit for bit
    exact = [sum(int(v) for v in col) for col in zip(*(ring_to_signed(q, B).tolist() for q in qs.values()))]
    assert ring_to_signed(total, B).tolist() == exact  # the ring did not wrap
    decoded = decode_fixed_point(total, s, B)
    if B <= 53:
        assert np.array_equal(decoded, np.ldexp(np.array(exact, dtype=np.float64), -s))
    plain = np.sum(np.clip(np.array(xs, dtype=np.float64), -clip, clip), axis=0)
    # each client rounds by less than one grid step; the float64 reference sum has its own rounding
    assert np.all(np.abs(decoded - plain) <= n * 2.0**-s + 1e-12 * n * clip)


@FAST
@given(n=st.integers(2, 8), d=st.integers(20, 300), ratio=st.sampled_from([0.05, 0.2, 1.0]), seed=st.integers(0, 2**32 - 1))
def test_randk_payload_values_masked_aggregate_is_bit_exact(n, d, ratio, seed):
    rng = np.random.default_rng(seed)
    codec = RandKCodec(ratio)
    assert codec.traits.commutes_with_sum
    round_seed = int(rng.integers(0, 2**63))
    k = support_size(ratio, d)
    support = randk_support(round_seed, d, k)
    values = []
    for _ in range(n):  # each client's kept, d/k-scaled values on the shared support
        payload = codec.encode(rng.standard_normal(d).astype(np.float32), EncodeContext(seed=round_seed))
        values.append(codec.decode(payload)[support])
    B = 40
    clip = float(max(np.abs(v).max() for v in values))
    s = scale_bits_for_clip(clip, n, B)
    qs = {i: encode_fixed_point(v, s, B, rng, clip=clip) for i, v in enumerate(values)}
    masked = _mask_all(qs, _pair_masks(rng, range(n), k, B), B)
    total = aggregate(list(masked.values()), B)
    assert np.array_equal(total, aggregate(list(qs.values()), B))
    dense = np.zeros(d)
    dense[support] = decode_fixed_point(total, s, B)
    plain = np.zeros(d)
    plain[support] = np.sum(np.array(values, dtype=np.float64), axis=0)
    assert np.all(np.abs(dense - plain) <= n * 2.0**-s)


# --------------------------------------------------------------------------- fixed point


def test_stochastic_rounding_is_unbiased():
    rng = np.random.default_rng(1)
    s, B, reps = 3, 16, 200_000
    x = np.array([0.3, -1.7, 0.01, -0.049, 2.0, 5.0625], dtype=np.float32)
    q = encode_fixed_point(np.tile(x, (reps, 1)), s, B, rng)
    v = ring_to_signed(q, B)
    y = x.astype(np.float64) * 2**s
    assert np.all((v == np.floor(y)) | (v == np.ceil(y)))  # only the two neighbours
    frac = y - np.floor(y)
    sigma = np.sqrt(frac * (1 - frac) / reps)
    err = v.mean(axis=0) - y
    assert np.all(np.abs(err) <= 5 * sigma + 1e-12), (err, sigma)
    assert np.all(v[:, frac == 0] == y[frac == 0])  # grid points are exact
    # round-to-nearest would be off by frac or 1 - frac; the error here is ~1e-3 of a step
    assert np.all(np.abs(err[frac > 0]) < 0.01)


def test_decode_of_the_sum_equals_the_sum_of_the_rounded_values():
    rng = np.random.default_rng(2)
    n, d, B, clip = 7, 1000, 48, 4.0
    s = scale_bits_for_clip(clip, n, B)
    xs = [rng.uniform(-5, 5, d).astype(np.float32) for _ in range(n)]
    qs = [encode_fixed_point(x, s, B, rng, clip=clip) for x in xs]
    signed = np.sum([ring_to_signed(q, B) for q in qs], axis=0)  # |sum| < 2^47: no int64 overflow
    total = aggregate(qs, B)
    assert np.array_equal(ring_to_signed(total, B), signed)
    assert np.array_equal(decode_fixed_point(total, s, B), signed.astype(np.float64) / 2.0**s)
    # every client's value is within one grid step of its clipped input
    for x, q in zip(xs, qs):
        assert np.all(np.abs(ring_to_signed(q, B) / 2.0**s - np.clip(x, -clip, clip)) < 2.0**-s)


def test_clipping_biases_only_clipped_coordinates():
    rng = np.random.default_rng(3)
    B, n, clip = 32, 4, 1.0
    s = scale_bits_for_clip(clip, n, B)
    x = np.array([-7.0, -1.0, -0.25, 0.5, 1.0, 3.0], dtype=np.float32)
    v = ring_to_signed(encode_fixed_point(x, s, B, rng, clip=clip), B) / 2.0**s
    assert v.tolist() == [-1.0, -1.0, -0.25, 0.5, 1.0, 1.0]  # grid points: no rounding noise


@given(clip=st.floats(1e-30, 1e30), n=st.integers(1, 1000), B=st.integers(12, 64))
@settings(max_examples=200, deadline=None)
def test_scale_bits_for_clip_is_the_largest_safe_scale(clip, n, B):
    s = scale_bits_for_clip(clip, n, B)
    assert n * math.ceil(math.ldexp(clip, s)) < 2 ** (B - 1)
    assert n * math.ceil(math.ldexp(clip, s + 1)) >= 2 ** (B - 1)


@pytest.mark.parametrize("B", [8, 16, 33, 64])
def test_worst_case_inputs_at_the_clip_bound_do_not_wrap(B):
    n, clip = 5, 0.7
    s = scale_bits_for_clip(clip, n, B)
    rng = np.random.default_rng(B)
    for sign in (1.0, -1.0):
        x = np.full(50, sign * clip, dtype=np.float64)  # C·2^s is not an integer: rounding goes both ways
        qs = [encode_fixed_point(x, s, B, rng, clip=clip) for _ in range(n)]
        total = ring_to_signed(aggregate(qs, B), B)
        assert np.array_equal(total, np.sum([ring_to_signed(q, B) for q in qs], axis=0))
        assert np.all(np.sign(total) == sign)


def test_encode_checks_its_own_range_and_rejects_non_finite_values():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="does not fit"):
        encode_fixed_point(np.array([200.0], dtype=np.float32), 0, 8, rng)  # 200 >= 2^7
    assert ring_to_signed(encode_fixed_point(np.array([-127.0, 127.0]), 0, 8, rng), 8).tolist() == [-127, 127]
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(ValueError, match="NaN or Inf"):
            encode_fixed_point(np.array([0.0, bad], dtype=np.float32), 4, 16, rng, clip=1.0)
    with pytest.raises(ValueError, match="clip"):
        encode_fixed_point(np.zeros(3), 4, 16, rng, clip=0.0)
    q = encode_fixed_point(np.float32(1.5), 1, 8, rng)  # 0-d keeps its shape
    assert q.shape == () and int(q) == 3


def test_ring_to_signed_reads_the_top_half_as_negative():
    for B in (1, 2, 8, 63, 64):
        top = (1 << B) - 1
        half = 1 << (B - 1)
        q = np.array([0, 1 % (1 << B), half - 1, half, top], dtype=np.uint64)
        assert ring_to_signed(q, B).tolist() == [0, 1 % (1 << B) if B > 1 else -1, half - 1, -half, -1]


def test_ring_bits():
    assert ring_bits(20, 1) == 21
    assert ring_bits(20, 2) == 22
    assert ring_bits(20, 8) == 24
    assert ring_bits(20, 9) == 25
    assert ring_bits(20, 100, headroom=3) == 20 + 7 + 3
    assert ring_bits(62, 2) == 64
    with pytest.raises(ValueError, match="at most 64"):
        ring_bits(62, 3)
    with pytest.raises(ValueError):
        ring_bits(10, 0)
    with pytest.raises(ValueError):
        scale_bits_for_clip(1.0, 128, 8)  # 128 clients cannot even sum ±1 in 8 bits
    # the bound is tight: n values of magnitude < 2^value_bits always fit
    n, vb = 6, 10
    B = ring_bits(vb, n)
    qs = [encode_fixed_point(np.array([-(2**vb - 1.0)]), 0, B, 0) for _ in range(n)]
    assert ring_to_signed(aggregate(qs, B), B).tolist() == [-n * (2**vb - 1)]


# --------------------------------------------------------------------------- masks hide the input


def _masked_uploads(q, B, draws, rng, peers=2):
    """``draws`` uploads of client 1 (peers 0 and 2, ...) with fresh random keys, concatenated."""
    d = q.size
    out = []
    for _ in range(draws):
        masks = {j: mask_from_key(rng.bytes(key_bytes_needed(d, B)), d, B) for j in range(peers + 1) if j != 1}
        out.append(apply_masks(q, 1, masks, B))
    return np.concatenate(out)


def test_a_masked_upload_is_uniform_on_the_ring():
    from scipy import stats
    B, d, draws = 16, 1 << 14, 16
    rng = np.random.default_rng(4)
    q = encode_fixed_point(np.linspace(-3, 3, d, dtype=np.float32), 8, B, rng)  # far from uniform
    y = _masked_uploads(q, B, draws, rng)
    for bins in (y >> np.uint64(8), y & np.uint64(0xFF)):  # top and low 8 bits: 256 bins of 1024 expected
        counts = np.bincount(bins.astype(np.int64), minlength=256)
        assert stats.chisquare(counts).pvalue > 1e-4
    assert stats.chisquare(np.bincount((y >> np.uint64(12)).astype(np.int64), minlength=16)).pvalue > 1e-4
    # the same test has power: the unmasked input is rejected outright
    raw = np.bincount((np.tile(q, draws) >> np.uint64(8)).astype(np.int64), minlength=256)
    assert stats.chisquare(raw).pvalue < 1e-12


def test_masked_uploads_of_very_different_inputs_are_indistinguishable():
    from scipy import stats
    B, d, draws = 16, 1 << 13, 16
    rng = np.random.default_rng(5)
    zeros = np.zeros(d, dtype=np.uint64)
    extreme = np.full(d, (1 << (B - 1)) - 1, dtype=np.uint64)  # the largest positive value
    ya = _masked_uploads(zeros, B, draws, rng)
    yb = _masked_uploads(extreme, B, draws, rng)
    table = np.stack(
        [np.bincount((y >> np.uint64(8)).astype(np.int64), minlength=256) for y in (ya, yb)]
    )
    assert stats.chi2_contingency(table).pvalue > 1e-4
    assert stats.ks_2samp(ya.astype(np.float64), yb.astype(np.float64)).pvalue > 1e-4
    # control: the same tests tell the two inputs apart when masks are not applied
    noisy = (zeros + rng.integers(0, 256, d).astype(np.uint64), extreme + rng.integers(0, 256, d).astype(np.uint64))
    ctrl = np.stack([np.bincount((y >> np.uint64(8)).astype(np.int64), minlength=256) for y in noisy])
    assert stats.chi2_contingency(ctrl[:, ctrl.sum(axis=0) > 0]).pvalue < 1e-12


# --------------------------------------------------------------------------- dropouts


@FAST
@given(n=st.integers(2, 14), d=st.integers(1, 50), B=st.integers(8, 64), data=st.data())
def test_dropout_recovery_gives_the_exact_survivor_sum(n, d, B, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    ids = data.draw(st.lists(st.integers(0, 10_000), min_size=n, max_size=n, unique=True))
    max_drop = int(0.3 * n)
    dropped = set(data.draw(st.lists(st.sampled_from(ids), max_size=max_drop, unique=True))) if max_drop else set()
    survivors = [i for i in ids if i not in dropped]
    qs = {i: _ring_values(rng, d, B) for i in ids}
    masks = _pair_masks(rng, ids, d, B)
    uploads = {i: apply_masks(qs[i], i, _peers(masks, i), B) for i in survivors}  # dropped never upload
    total = aggregate(list(uploads.values()), B)
    reveals = {(i, k): _peers(masks, i)[k] for i in survivors for k in dropped}
    recovered = remove_dropped(total, reveals, B, survivors=survivors, dropped=dropped)
    assert np.array_equal(recovered, aggregate([qs[i] for i in survivors], B))
    assert np.array_equal(remove_dropped(total, reveals, B), recovered)


def test_without_recovery_the_sum_is_garbage_and_reveals_are_checked():
    rng = np.random.default_rng(6)
    n, d, B = 10, 64, 32
    qs = {i: _ring_values(rng, d, B) for i in range(n)}
    masks = _pair_masks(rng, range(n), d, B)
    dropped, survivors = {2, 7, 9}, [i for i in range(n) if i not in {2, 7, 9}]
    total = aggregate([apply_masks(qs[i], i, _peers(masks, i), B) for i in survivors], B)
    truth = aggregate([qs[i] for i in survivors], B)
    assert np.count_nonzero(total == truth) < 3  # leftover masks are uniform
    reveals = {(i, k): _peers(masks, i)[k] for i in survivors for k in dropped}
    assert np.array_equal(remove_dropped(total, reveals, B, survivors=survivors, dropped=dropped), truth)
    missing = dict(reveals)
    del missing[(0, 2)]
    with pytest.raises(ValueError, match="missing"):
        remove_dropped(total, missing, B, survivors=survivors, dropped=dropped)
    with pytest.raises(ValueError, match="unexpected"):
        remove_dropped(total, {**reveals, (1, 3): masks[(1, 3)]}, B, survivors=survivors, dropped=dropped)
    with pytest.raises(ValueError, match="both"):
        remove_dropped(total, reveals, B, survivors=survivors + [2], dropped=dropped)
    with pytest.raises(ValueError, match="neither"):
        remove_dropped(total, reveals, B, survivors=survivors)
    with pytest.raises(ValueError, match="itself"):
        remove_dropped(total, {(3, 3): masks[(1, 3)]}, B)


def test_a_single_survivor_is_recovered_in_clear():
    # the arithmetic allows it, which is why the protocol must set a minimum number of survivors
    rng = np.random.default_rng(7)
    n, d, B = 4, 16, 24
    qs = {i: _ring_values(rng, d, B) for i in range(n)}
    masks = _pair_masks(rng, range(n), d, B)
    total = aggregate([apply_masks(qs[2], 2, _peers(masks, 2), B)], B)
    reveals = {(2, k): _peers(masks, 2)[k] for k in (0, 1, 3)}
    assert np.array_equal(remove_dropped(total, reveals, B), qs[2])


def test_apply_masks_validates_its_inputs():
    q = np.zeros(4, dtype=np.uint64)
    m = np.ones(4, dtype=np.uint64)
    with pytest.raises(ValueError, match="itself"):
        apply_masks(q, 3, {3: m}, 16)
    with pytest.raises(ValueError, match="shape"):
        apply_masks(q, 0, {1: np.ones(5, dtype=np.uint64)}, 16)
    with pytest.raises(TypeError, match="uint64"):
        apply_masks(q, 0, {1: np.ones(4, dtype=np.int64)}, 16)
    with pytest.raises(TypeError, match="uint64"):
        apply_masks(q.astype(np.float32), 0, {1: m}, 16)
    with pytest.raises(ValueError):
        apply_masks(q, 0, {1: m}, 65)
    assert apply_masks(q, 0, {1: m, 2: m}, 16).tolist() == [2] * 4
    assert apply_masks(q, 5, {1: m, 2: m}, 16).tolist() == [(1 << 16) - 2] * 4
    assert apply_masks(q, 0, {}, 16).tolist() == [0] * 4
    with pytest.raises(ValueError, match="at least one"):
        aggregate([], 16)
    with pytest.raises(ValueError, match="shape"):
        aggregate([q, np.zeros(3, dtype=np.uint64)], 16)


# --------------------------------------------------------------------------- key accounting


@FAST
@given(d=st.integers(0, 300), B=st.integers(1, 64), seed=st.integers(0, 2**32 - 1))
def test_mask_from_key_consumes_exactly_key_bytes_needed(d, B, seed):
    rng = np.random.default_rng(seed)
    need = key_bytes_needed(d, B)
    assert need == math.ceil(d * B / 8)
    key = rng.bytes(need + 5)
    mask = mask_from_key(key, d, B)
    assert mask.dtype == np.uint64 and mask.shape == (d,)
    assert np.array_equal(mask, mask_from_key(key[:need], d, B))  # bytes after `need` are not read
    assert np.array_equal(mask, mask_from_key(key[:need] + bytes(5), d, B))
    if need:
        flipped = bytearray(key)
        flipped[need - 1] ^= 1  # the last byte consumed still carries a used bit
        assert not np.array_equal(mask, mask_from_key(bytes(flipped), d, B))
        with pytest.raises(ValueError, match="key bytes"):
            mask_from_key(key[: need - 1], d, B)
    # the mask is exactly the consumed key bits: none is wasted, none is used twice
    tail = (d * B) % 8
    expected = bytearray(key[:need])
    if tail:
        expected[-1] &= (1 << tail) - 1
    assert pack_ring(mask, B) == bytes(expected)
    if B < 64:
        assert mask.max(initial=0) < 1 << B


def test_key_cost_per_client_and_round():
    n, d, B = 8, 1000, 37
    per_peer = key_bytes_needed(d, B)
    assert per_peer * 8 >= d * B > (per_peer - 1) * 8
    # a client holds n - 1 masks: (n-1)·d·B bits, rounded up to whole bytes per peer
    rng = np.random.default_rng(8)
    masks = _pair_masks(rng, range(n), d, B)
    assert len(_peers(masks, 0)) == n - 1
    assert sum(key_bytes_needed(m.size, B) for m in _peers(masks, 0).values()) == (n - 1) * per_peer


def test_uniform_key_bytes_give_uniform_mask_values():
    from scipy import stats
    B, d = 13, 1 << 16  # 13-bit elements straddle byte boundaries
    m = mask_from_key(np.random.default_rng(9).bytes(key_bytes_needed(d, B)), d, B)
    counts = np.bincount((m >> np.uint64(B - 7)).astype(np.int64), minlength=128)
    assert counts.size == 128 and stats.chisquare(counts).pvalue > 1e-4


# --------------------------------------------------------------------------- packing and pads


@FAST
@given(B=st.integers(1, 64), d=st.integers(0, 70), seed=st.integers(0, 2**32 - 1))
def test_pack_ring_round_trip_and_layout(B, d, seed):
    q = _ring_values(np.random.default_rng(seed), d, B)
    data = pack_ring(q, B)
    assert len(data) == key_bytes_needed(d, B)
    assert data == _pack_reference(q, B)
    assert np.array_equal(unpack_ring(data, B, d), q)
    assert np.array_equal(unpack_ring(bytearray(data), B, d), q)


@FAST
@given(B=st.integers(1, 64), d=st.integers(0, 100), seed=st.integers(0, 2**32 - 1))
def test_pack_ring_layout_over_several_groups(B, d, seed):
    # the same layout with groups of 16 elements: several groups, a short last group, a tail
    q = _ring_values(np.random.default_rng(seed), d, B)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(masking, "_GROUP", 16)
        data = pack_ring(q, B)
        assert data == _pack_reference(q, B, group=16)
        assert np.array_equal(unpack_ring(data, B, d), q)


@pytest.mark.parametrize("B", [3, 6, 9, 12, 13, 16, 24, 31, 37, 40, 58, 63, 64])
@pytest.mark.parametrize("d", [2 * GROUP, GROUP + 8 * 3 + 5])
def test_pack_ring_across_groups(B, d):
    q = _ring_values(np.random.default_rng(B), d, B)
    data = pack_ring(q, B)
    assert data == _pack_reference(q, B)
    assert np.array_equal(unpack_ring(data, B, d), q)


def test_pack_ring_layout_example():
    # B = 12 = 8 + 4: the low bytes, then the nibbles of the first 8 elements (element j with j + 4),
    # then the tail: the nibbles of the last 2 elements as one little-endian bit string
    q = np.arange(10, dtype=np.uint64) * 0x111
    data = pack_ring(q, 12)
    assert data.hex() == "00112233445566778899" + "40516273" + "98"
    assert len(data) == math.ceil(10 * 12 / 8)
    # B = 37 = 32 + 4 + 1: the low words, the 4-bit field, the 1-bit field (elements 8j..8j+7, LSB first)
    q = (np.arange(8, dtype=np.uint64) << np.uint64(32)) + np.uint64(7) + (np.uint64(1) << np.uint64(36))
    data = pack_ring(q, 37)
    assert data == bytes.fromhex("07000000" * 8 + "40516273" + "ff")


def test_pack_ring_errors():
    q = np.array([1, 2, 3], dtype=np.uint64)
    with pytest.raises(ValueError, match=">= 2"):
        pack_ring(np.array([1 << 10], dtype=np.uint64), 10)
    with pytest.raises(TypeError):
        pack_ring(q.astype(np.int64), 10)
    data = pack_ring(q, 10)
    assert len(data) == 4
    with pytest.raises(ValueError, match="take 4 bytes"):
        unpack_ring(data[:-1], 10, 3)
    with pytest.raises(ValueError, match="take 4 bytes"):
        unpack_ring(data + b"\0", 10, 3)
    with pytest.raises(ValueError, match="padding"):
        unpack_ring(data[:-1] + bytes([data[-1] | 0x80]), 10, 3)
    assert unpack_ring(b"", 10, 0).size == 0 and pack_ring(np.zeros(0, dtype=np.uint64), 10) == b""
    assert pack_ring(q.reshape(3, 1), 10) == data  # any shape, C order


def test_xor_pad():
    rng = np.random.default_rng(10)
    payload, key = rng.bytes(1000), rng.bytes(1000)
    padded = xor_pad(payload, key)
    assert padded != payload and len(padded) == 1000
    assert xor_pad(padded, key) == payload
    assert xor_pad(b"", b"") == b""
    assert xor_pad(b"\x0f\xf0", b"\xff\xff") == b"\xf0\x0f"
    with pytest.raises(ValueError, match="equal"):
        xor_pad(payload, key[:-1])
    with pytest.raises(ValueError, match="equal"):
        xor_pad(payload, key + b"\0")


def test_expand_key():
    key = bytes(range(32))
    nonce_a, nonce_b = bytes(12), bytes(11) + b"\x01"
    a = expand_key(key, 1000, nonce_a)
    assert len(a) == 1000 and a == expand_key(key, 1000, nonce_a)
    assert a[:10] == expand_key(key, 10, nonce_a)  # a prefix of one keystream
    assert a != expand_key(key, 1000, nonce_b)
    assert a != expand_key(bytes(32), 1000, nonce_a)
    assert expand_key(key, 0, nonce_a) == b""
    # RFC 8439 §2.3.2: block counter 1 of this key and nonce is the second 64-byte block
    rfc = expand_key(key, 128, bytes.fromhex("000000090000004a00000000"))
    assert rfc[64:80].hex() == "10f1e7e4d13b5915500fdd1fa32071c4"
    with pytest.raises(ValueError, match="32-byte"):
        expand_key(key[:16], 10, nonce_a)
    with pytest.raises(ValueError, match="12 bytes"):
        expand_key(key, 10, bytes(16))
    with pytest.raises(ValueError):
        expand_key(key, -1, nonce_a)


# --------------------------------------------------------------------------- the fused client and server steps


def _peer_keys(rng, me, ids, d, B, keys):
    """Client ``me``'s pair keys (one fresh key per unordered pair, shared by both ends)."""
    return {j: keys.setdefault(frozenset((me, j)), rng.bytes(key_bytes_needed(d, B) + 3)) for j in ids if j != me}


@FAST
@given(
    n=st.integers(1, 6),
    d=st.integers(0, 120),
    B=st.integers(1, 64),
    group=st.sampled_from([8, 16, GROUP]),
    seed=st.integers(0, 2**32 - 1),
)
def test_masked_pack_is_pack_of_apply_masks(n, d, B, group, seed):
    rng = np.random.default_rng(seed)
    ids = sorted(rng.choice(1000, size=n + 1, replace=False).tolist())
    keys = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(masking, "_GROUP", group)
        for me in ids:
            peer_keys = _peer_keys(rng, me, ids, d, B, keys)
            q = rng.integers(0, 2**64 - 1, size=d, dtype=np.uint64, endpoint=True)  # taken mod 2^B, as apply_masks does
            masks = {j: mask_from_key(k, d, B) for j, k in peer_keys.items()}
            expected = pack_ring(apply_masks(q, me, masks, B), B)
            got = masked_pack(q, me, peer_keys, B)
            assert isinstance(got, bytes) and got == expected
            as_bytearrays = {j: bytearray(k) for j, k in peer_keys.items()}
            assert masked_pack(q.reshape(-1, 1) if d else q, me, as_bytearrays, B) == got  # any shape, any buffer


@FAST
@given(
    d=st.integers(0, 120),
    B=st.integers(1, 64),
    group=st.sampled_from([8, 16, GROUP]),
    seed=st.integers(0, 2**32 - 1),
)
def test_add_packed_adds_and_subtracts_in_place(d, B, group, seed):
    rng = np.random.default_rng(seed)
    total, y = _ring_values(rng, d, B), _ring_values(rng, d, B)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(masking, "_GROUP", group)
        data = pack_ring(y, B)
        running = total.copy()
        assert add_packed(running, data, B) is running
        assert np.array_equal(running, aggregate([total, y], B))
        add_packed(running, memoryview(data), B, subtract=True)
        assert np.array_equal(running, total)
        # an unreduced running sum comes back reduced, like aggregate's
        big = total | (rng.integers(0, 2**63, size=d, dtype=np.uint64) << np.uint64(B)) if B < 64 else total.copy()
        assert np.array_equal(add_packed(big, data, B), aggregate([total, y], B))


def test_add_packed_checks_its_inputs():
    q = np.array([1, 2, 3], dtype=np.uint64)
    data = pack_ring(q, 10)
    total = np.zeros(3, dtype=np.uint64)
    with pytest.raises(ValueError, match="take 4 bytes"):
        add_packed(total, data[:-1], 10)
    with pytest.raises(ValueError, match="padding"):
        add_packed(total, data[:-1] + bytes([data[-1] | 0x80]), 10)
    assert not total.any()  # untouched by a failed call
    with pytest.raises(TypeError, match="uint64"):
        add_packed(total.astype(np.int64), data, 10)
    with pytest.raises(ValueError, match="contiguous"):
        add_packed(np.zeros(6, dtype=np.uint64)[::2], data, 10)
    frozen = np.zeros(3, dtype=np.uint64)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        add_packed(frozen, data, 10)
    two_d = np.zeros((3, 1), dtype=np.uint64)
    assert add_packed(two_d, data, 10).shape == (3, 1) and two_d.ravel().tolist() == [1, 2, 3]


def test_masked_pack_checks_its_inputs():
    q = np.zeros(5, dtype=np.uint64)
    key = bytes(key_bytes_needed(5, 13))
    with pytest.raises(ValueError, match="itself"):
        masked_pack(q, 2, {2: key}, 13)
    with pytest.raises(ValueError, match="key bytes"):
        masked_pack(q, 0, {1: key[:-1]}, 13)
    with pytest.raises(TypeError, match="uint64"):
        masked_pack(q.astype(np.int64), 0, {1: key}, 13)
    with pytest.raises(ValueError):
        masked_pack(q, 0, {1: key}, 65)
    assert masked_pack(q, 0, {}, 13) == pack_ring(q, 13)
    assert masked_pack(np.zeros(0, dtype=np.uint64), 0, {1: b""}, 13) == b""


@pytest.mark.parametrize("B", [1, 5, 9, 13, 33, 37, 47, 63])
def test_the_portable_route_of_big_endian_hosts_gives_the_same_bytes(B, monkeypatch):
    rng = np.random.default_rng(B)
    d = 3 * 64 + 13
    q, total = _ring_values(rng, d, B), _ring_values(rng, d, B)
    key = rng.bytes(key_bytes_needed(d, B))
    monkeypatch.setattr(masking, "_GROUP", 64)
    reveal = pack_ring(mask_from_key(key, d, B), B)
    fast = (pack_ring(q, B), masked_pack(q, 4, {7: key}, B), add_packed(total.copy(), reveal, B, subtract=True))
    monkeypatch.setattr(masking, "_LITTLE", False)  # the steps that view words as bytes take their portable route
    assert pack_ring(q, B) == fast[0] == _pack_reference(q, B, group=64)
    assert np.array_equal(unpack_ring(fast[0], B, d), q)
    assert masked_pack(q, 4, {7: key}, B) == fast[1]
    assert np.array_equal(add_packed(total.copy(), reveal, B, subtract=True), fast[2])


@pytest.mark.parametrize("B", [6, 9, 12, 16, 24, 34, 37, 64])
def test_fused_round_with_dropouts_gives_the_survivor_sum(B):
    """Clients masked_pack, the server add_packed-s the uploads, then removes the dropped clients' masks."""
    rng = np.random.default_rng(B)
    ids, d = [3, 5, 8, 13, 21, 34], 2 * GROUP + 13  # several groups and a tail
    dropped = {5, 21}
    survivors = [i for i in ids if i not in dropped]
    keys = {}
    qs = {i: _ring_values(rng, d, B) for i in ids}
    total = np.zeros(d, dtype=np.uint64)
    for i in survivors:
        add_packed(total, masked_pack(qs[i], i, _peer_keys(rng, i, ids, d, B, keys), B), B)
    truth = aggregate([qs[i] for i in survivors], B)
    assert np.count_nonzero(total == truth) < 2 * d * 2.0**-B + 20  # the masks shared with the dropped remain
    for i in survivors:  # survivor i reveals m_ik packed; it had added +m_ik if k > i, -m_ik if k < i
        for k in dropped:
            reveal = pack_ring(mask_from_key(keys[frozenset((i, k))], d, B), B)
            add_packed(total, reveal, B, subtract=k > i)
    assert np.array_equal(total, truth)


# --------------------------------------------------------------------------- MAC


@given(a=st.integers(0, P - 1), b=st.integers(0, P - 1))
@settings(max_examples=300, deadline=None)
def test_mulmod_matches_python_integers(a, b):
    got = mac._mulmod(np.array([a, P - 1, 0], dtype=np.uint64), np.uint64(b))
    assert got.tolist() == [a * b % P, (P - 1) * b % P, 0]


def test_poly_hash_matches_a_reference_at_every_length_and_path(monkeypatch):
    rng = np.random.default_rng(11)
    lengths = list(range(0, 40)) + [7 * 1024 - 1, 7 * 1024, 7 * 1024 + 1, 7 * 1025, 50_000, 7 * (1 << 14) + 3]
    for length in lengths:
        message = rng.bytes(length)
        for r in (1, 2, P - 1, int(rng.integers(1, P))):
            assert mac.poly_hash(message, r) == _hash_reference(message, r), (length, r)
    # small rows and chunks: many rows, several chunks, the recursive row evaluation
    monkeypatch.setattr(mac, "_ROW", 8)
    monkeypatch.setattr(mac, "_CHUNK_BLOCKS", 24)
    monkeypatch.setattr(mac, "_PY_BLOCKS", 4)
    for length in (29, 56, 57, 200, 1000, 4001):
        message = rng.bytes(length)
        r = int(rng.integers(1, P))
        assert mac.poly_hash(message, r) == _hash_reference(message, r), length
    # all-ones blocks: the largest coefficients the exact-sum bounds must hold for
    message = b"\xff" * (7 * 300)
    assert mac.poly_hash(message, P - 1) == _hash_reference(message, P - 1)


def test_poly_hash_is_linear_in_the_blocks():
    rng = np.random.default_rng(12)
    for length in (100, 20_000):  # the Python and the numpy paths
        a = rng.integers(0, 128, length, dtype=np.uint8)
        b = rng.integers(0, 128, length, dtype=np.uint8)
        r = int(rng.integers(1, P))
        h = lambda m: mac.poly_hash(bytes(m), r)  # noqa: E731
        # bytes below 128 add without carries, so the blocks of a + b are the sums of the blocks;
        # the length block appears once on each side after adding H(0^L)
        assert (h(a) + h(b)) % P == (h(a + b) + h(np.zeros(length, np.uint8))) % P


def test_mac_accepts_the_right_tag_and_rejects_every_single_bit_flip():
    rng = np.random.default_rng(13)
    for length in (0, 1, 64, 9000):
        message, key = rng.bytes(length), rng.bytes(mac.mac_key_bytes())
        t = mac.tag(message, key)
        assert len(t) == 8 and int.from_bytes(t, "little") < P
        assert mac.verify(message, t, key)
        assert mac.verify(bytearray(message), memoryview(t), bytes(key))
        for bit in range(min(8 * length, 1024)):
            flipped = bytearray(message)
            flipped[bit // 8] ^= 1 << (bit % 8)
            assert not mac.verify(bytes(flipped), t, key)
        for bit in range(64):
            bad = bytearray(t)
            bad[bit // 8] ^= 1 << (bit % 8)
            assert not mac.verify(message, bytes(bad), key)


def test_mac_rejects_other_keys_replays_and_malformed_tags():
    rng = np.random.default_rng(14)
    message, key, other = rng.bytes(200), rng.bytes(16), rng.bytes(16)
    t = mac.tag(message, key)
    assert not mac.verify(message, mac.tag(message, other), key)
    assert not mac.verify(message, t, other)
    assert not mac.verify(rng.bytes(200), t, key)  # a replayed tag on another message
    assert not mac.verify(message + b"\0", t, key)  # extension
    assert not mac.verify(message[:-1], t, key)  # truncation
    assert not mac.verify(message, t[:7], key)
    assert not mac.verify(message, t + b"\0", key)
    assert not mac.verify(message, b"", key)
    for bad_key in (key[:15], key + b"\0", b""):
        with pytest.raises(ValueError, match="16"):
            mac.tag(message, bad_key)
        with pytest.raises(ValueError, match="16"):
            mac.verify(message, t, bad_key)


def test_no_constant_term_blocks_the_length_forgery():
    # with a constant length term, tag("\0"*7) = tag("") + 7 for every key
    rng = np.random.default_rng(15)
    for _ in range(100):
        key = rng.bytes(16)
        forged = ((int.from_bytes(mac.tag(b"", key), "little") + 7) % P).to_bytes(8, "little")
        assert not mac.verify(b"\0" * 7, forged, key)


def test_mac_key_derivation_never_uses_the_zero_point():
    assert mac.mac_key_bytes() == 16
    for head in (0, P - 1, 2 * (P - 1), 8 * (P - 1)):
        key = head.to_bytes(8, "little") + bytes(8)
        r, s = mac._key_parts(key)
        assert r == 1 and s == 0
    r, s = mac._key_parts(b"\xff" * 16)
    assert 1 <= r < P and 0 <= s < P
    assert mac.tag(b"abc", bytes(16)) == mac.poly_hash(b"abc", 1).to_bytes(8, "little")
    with pytest.raises(ValueError):
        mac.poly_hash(b"abc", 0)
    with pytest.raises(ValueError):
        mac.poly_hash(b"abc", P)


def test_no_hash_collisions_among_many_messages_of_one_length():
    rng = np.random.default_rng(16)
    for _ in range(3):
        r = mac._key_parts(rng.bytes(16))[0]
        hashes = {mac.poly_hash(rng.bytes(32), r) for _ in range(10_000)}
        assert len(hashes) == 10_000
    r = mac._key_parts(rng.bytes(16))[0]
    base = rng.bytes(20_000)  # the numpy path, on messages that differ from base in one byte
    messages = set()
    for _ in range(300):
        m = bytearray(base)
        m[int(rng.integers(0, len(m)))] ^= int(rng.integers(1, 256))
        messages.add(bytes(m))
    messages.add(base)
    assert len({mac.poly_hash(m, r) for m in messages}) == len(messages)


def test_mac_throughput_is_at_least_a_few_mb_per_second():
    message, key = np.random.default_rng(17).bytes(4 << 20), bytes(range(16))
    start = time.perf_counter()
    t = mac.tag(message, key)
    assert time.perf_counter() - start < 2.0  # ≥ 2 MB/s; ~700 MB/s measured
    assert mac.verify(message, t, key)
