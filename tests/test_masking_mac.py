"""Secure-aggregation primitives: one-time-pad masks on the ring, packing, the Wegman–Carter MAC."""

import math
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qfl.security.primitives import mac, masking
from qfl.security.primitives.masking import (
    add_packed,
    expand_key,
    key_bytes_needed,
    mask_from_key,
    masked_pack,
    pack_ring,
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


def _masked_reference(q, me, masks, B):
    """Client ``me``'s upload as ring elements: ``q + Σ_{j > me} m_j − Σ_{j < me} m_j`` mod 2^B, in Python integers."""
    out = [int(v) for v in q]
    for j, m in masks.items():
        sign = 1 if j > me else -1
        out = [v + sign * int(x) for v, x in zip(out, m)]
    return np.array([v % (1 << B) for v in out], dtype=np.uint64)


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
    keys = {}
    total = np.zeros(d, dtype=np.uint64)
    for i, q in qs.items():
        add_packed(total, masked_pack(q, i, _peer_keys(rng, i, range(n), d, B, keys), B), B)
    assert np.array_equal(total, _plain_sum(qs.values(), B)[:d])


# --------------------------------------------------------------------------- masks hide the input


def _masked_uploads(q, B, draws, rng, peers=2):
    """``draws`` uploads of client 1 (peers 0 and 2, ...) with fresh random keys, concatenated."""
    d = q.size
    out = []
    for _ in range(draws):
        masks = {j: rng.bytes(key_bytes_needed(d, B)) for j in range(peers + 1) if j != 1}
        out.append(unpack_ring(masked_pack(q, 1, masks, B), B, d))
    return np.concatenate(out)


def test_a_masked_upload_is_uniform_on_the_ring():
    from scipy import stats
    B, d, draws = 16, 1 << 14, 16
    rng = np.random.default_rng(4)
    signed = np.round(np.linspace(-3, 3, d) * 2**8).astype(np.int64)  # -3..3 in steps of 2^-8: far from uniform
    q = signed.view(np.uint64) & np.uint64((1 << B) - 1)
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
        with pytest.raises(ValueError):  # too few key bytes
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
    with pytest.raises(ValueError):  # a value >= 2**bits
        pack_ring(np.array([1 << 10], dtype=np.uint64), 10)
    with pytest.raises(TypeError):
        pack_ring(q.astype(np.int64), 10)
    data = pack_ring(q, 10)
    assert len(data) == 4
    with pytest.raises(ValueError):  # too short
        unpack_ring(data[:-1], 10, 3)
    with pytest.raises(ValueError):  # too long
        unpack_ring(data + b"\0", 10, 3)
    with pytest.raises(ValueError):  # non-zero padding bits
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
    with pytest.raises(ValueError):  # lengths differ
        xor_pad(payload, key[:-1])
    with pytest.raises(ValueError):  # lengths differ
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
    with pytest.raises(ValueError):  # not a 32-byte key
        expand_key(key[:16], 10, nonce_a)
    with pytest.raises(ValueError):  # not a 12-byte nonce
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
def test_masked_pack_is_pack_of_the_masked_sum(n, d, B, group, seed):
    rng = np.random.default_rng(seed)
    ids = sorted(rng.choice(1000, size=n + 1, replace=False).tolist())
    keys = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(masking, "_GROUP", group)
        for me in ids:
            peer_keys = _peer_keys(rng, me, ids, d, B, keys)
            q = rng.integers(0, 2**64 - 1, size=d, dtype=np.uint64, endpoint=True)  # taken mod 2^B
            masks = {j: mask_from_key(k, d, B) for j, k in peer_keys.items()}
            expected = pack_ring(_masked_reference(q, me, masks, B), B)
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
        assert np.array_equal(running, _plain_sum([total, y], B)[:d])
        add_packed(running, memoryview(data), B, subtract=True)
        assert np.array_equal(running, total)
        # an unreduced running sum comes back reduced
        big = total | (rng.integers(0, 2**63, size=d, dtype=np.uint64) << np.uint64(B)) if B < 64 else total.copy()
        assert np.array_equal(add_packed(big, data, B), _plain_sum([total, y], B)[:d])


def test_add_packed_checks_its_inputs():
    q = np.array([1, 2, 3], dtype=np.uint64)
    data = pack_ring(q, 10)
    total = np.zeros(3, dtype=np.uint64)
    with pytest.raises(ValueError):  # too short
        add_packed(total, data[:-1], 10)
    with pytest.raises(ValueError):  # non-zero padding bits
        add_packed(total, data[:-1] + bytes([data[-1] | 0x80]), 10)
    assert not total.any()  # untouched by a failed call
    with pytest.raises(TypeError):  # not uint64
        add_packed(total.astype(np.int64), data, 10)
    with pytest.raises(ValueError):  # not contiguous
        add_packed(np.zeros(6, dtype=np.uint64)[::2], data, 10)
    frozen = np.zeros(3, dtype=np.uint64)
    frozen.flags.writeable = False
    with pytest.raises(ValueError):  # not writable
        add_packed(frozen, data, 10)
    two_d = np.zeros((3, 1), dtype=np.uint64)
    assert add_packed(two_d, data, 10).shape == (3, 1) and two_d.ravel().tolist() == [1, 2, 3]


def test_masked_pack_checks_its_inputs():
    q = np.zeros(5, dtype=np.uint64)
    key = bytes(key_bytes_needed(5, 13))
    with pytest.raises(ValueError):  # a client masking with itself
        masked_pack(q, 2, {2: key}, 13)
    with pytest.raises(ValueError):  # too few key bytes
        masked_pack(q, 0, {1: key[:-1]}, 13)
    with pytest.raises(TypeError):  # not uint64
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
    truth = _plain_sum([qs[i] for i in survivors], B)[:d]
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
        with pytest.raises(ValueError):  # not a 16-byte key
            mac.tag(message, bad_key)
        with pytest.raises(ValueError):  # not a 16-byte key
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
