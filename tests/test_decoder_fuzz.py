"""Hypothesis fuzzing of every decoder (the quick version of `make fuzz`).

Every registered codec (with its entropy stages and layout variants,
``qfl.benchmarks.fuzz_decoders.targets``) decodes generated payloads through
``decode_as`` and ``decode_update`` with the shape the server expects. Only the
layer's own error may come out (CodecError, PayloadError for records), a
decoded tensor has the expected shape, and the tracemalloc peak stays under
``memory_bound(numel, len(payload))``.
"""

from __future__ import annotations

import math
import struct
import tracemalloc
from functools import cache

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qfl.benchmarks.fuzz_decoders import (
    F32,
    INTERESTING_U32,
    SHAPES,
    Target,
    apply_mutations,
    run_decode,
    targets,
    valid_payload,
    wrap_entropy,
)
from qfl.compression.entropy import EntropyCodec
from qfl.compression.wire import pack_header

FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SMALL_SHAPES = [s for s in SHAPES if math.prod(s) <= 4096]

u32 = st.one_of(st.sampled_from(INTERESTING_U32), st.integers(0, 2**32 - 1))
position = st.one_of(st.integers(0, 47), st.integers(0, 1 << 16))
ops = st.lists(
    st.one_of(
        st.tuples(st.just("flip"), position, st.integers(0, 7)),
        st.tuples(st.just("set"), position, st.integers(0, 255)),
        st.tuples(st.just("u32"), position, u32),
        st.tuples(st.just("trunc"), position),
        st.tuples(st.just("extend"), st.binary(min_size=1, max_size=64)),
        st.tuples(st.just("insert"), position, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("delete"), position, st.integers(1, 16)),
    ),
    min_size=1,
    max_size=4,
)


@cache
def _codec(target: Target):
    return target.codec()


@pytest.fixture(autouse=True, scope="module")
def tracing():
    for target in targets():  # import what encoders import lazily (torch) before tracing
        valid_payload(_codec(target), (3, 4), 0)
    tracemalloc.start()
    yield
    tracemalloc.stop()


def _check(target: Target, payload: bytes, shape: tuple[int, ...], record: bool) -> None:
    outcome = run_decode(_codec(target), payload, shape, record=record)
    assert outcome.status != "crash", f"{target.label} {shape}: {outcome.detail}; payload {payload[:80].hex()}"
    assert outcome.peak <= outcome.bound, f"{target.label} {shape}: peak {outcome.peak} B > {outcome.bound} B"


@FUZZ
@given(target=st.sampled_from(targets()), shape=st.sampled_from(SMALL_SHAPES), data=st.binary(max_size=512),
       keep_header=st.booleans(), record=st.booleans())
def test_random_bytes(target, shape, data, keep_header, record):
    head = pack_header(_codec(target).codec_id, F32, shape) if keep_header else b""
    _check(target, head + data, shape, record)


@FUZZ
@given(target=st.sampled_from(targets()), shape=st.sampled_from(SMALL_SHAPES), seed=st.integers(0, 2**32),
       mutations=ops, inner=st.booleans(), record=st.booleans())
def test_mutated_valid_payloads(target, shape, seed, mutations, inner, record):
    codec = _codec(target)
    if inner and isinstance(codec, EntropyCodec):  # hostile bytes inside a well-formed compressed stream
        payload = wrap_entropy(codec, shape, apply_mutations(valid_payload(codec.inner, shape, seed), mutations))
    else:
        payload = apply_mutations(valid_payload(codec, shape, seed), mutations)
    _check(target, payload, shape, record)


@FUZZ
@given(target=st.sampled_from(targets()), shape=st.sampled_from(SMALL_SHAPES),
       claimed=st.lists(st.one_of(st.sampled_from([0, 1, 1 << 16, 1 << 17, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1)),
                        max_size=8),
       fields=st.lists(u32, max_size=6), tail=st.binary(max_size=64), inner=st.booleans())
def test_headers_with_huge_counts(target, shape, claimed, fields, tail, inner):
    codec = _codec(target)
    inner_codec = codec.inner if isinstance(codec, EntropyCodec) else codec
    body = struct.pack(f"<{len(fields)}I", *fields) + tail
    hostile = pack_header(inner_codec.codec_id, F32, tuple(claimed)) + body
    if isinstance(codec, EntropyCodec):
        hostile = wrap_entropy(codec, shape, hostile, outer_shape=None if inner else tuple(claimed))
    _check(target, hostile, shape, record=False)
