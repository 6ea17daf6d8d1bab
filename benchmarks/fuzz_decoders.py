"""`make fuzz`: hostile payloads against every decoder, as the server meets them.

Every registered codec (with and without its entropy stage, zstd and zlib,
and with the parameter variants that change the wire layout) decodes payloads
built to hurt it, through the two entry points the server uses:

- ``codec.decode_as(payload, shape)`` (one tensor of a known shape), and
- ``decode_update(record, codec, shapes)`` (a whole update record).

Cases (:data:`KINDS`): random bytes; a valid header with a random body; a
valid payload with random mutations (bit flips, byte and 32-bit field
overwrites with huge counts, truncations, extensions, insertions, deletions);
the same with the mutations applied to the *inner* payload of an entropy
stage and then recompressed (so the hostile bytes get past the decompressor);
headers and inner headers that claim huge shapes; decompression bombs; valid
payloads of other codecs.

A case passes when the decoder returns a float32 tensor of the expected shape
or raises the layer's own error (CodecError; PayloadError for records). It
fails as

- a *crash*: any other exception (MemoryError, IndexError, OverflowError, ...)
  or an output of the wrong shape or dtype;
- a *hang*: a case that takes more than ``--hang-s`` seconds (measured, not
  interrupted; a case past ``--abort-s`` is stopped with SIGALRM);
- an *oversize* allocation: a tracemalloc peak above :func:`memory_bound`,
  ``64·numel + 16·len(payload) + 256 KiB`` for the expected shape (the payload
  length is itself at most ``9·numel + 8192``, ``wire.max_payload_size``).

Usage::

    python -m qfl.benchmarks.fuzz_decoders [--cases 100000] [--seed 0]

prints a table per target and exits 1 if any case failed. The hypothesis test
``tests/test_decoder_fuzz.py`` drives the same targets and checks.
"""

from __future__ import annotations

import argparse
import math
import signal
import struct
import sys
import time
import tracemalloc
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from qfl.compression import PAYLOAD_STYPE, Codec, EncodeContext, PayloadError, codec_names, decode_update, make_codec
from qfl.compression.codec import CodecError
from qfl.compression.entropy import EntropyCodec
from qfl.compression.wire import pack_header
from qfl.errors import QflError

F32 = np.dtype("<f4")
SHAPES: list[tuple[int, ...]] = [(), (0,), (1,), (5,), (3, 4), (64,), (17, 9), (2, 3, 4), (1, 1, 1, 2), (513,), (40, 50), (257, 300)]
HUGE_SHAPES: list[tuple[int, ...]] = [(1 << 16, 1 << 18), (1 << 17, 1 << 17), (0xFFFFFFFF,), (0xFFFFFFFF,) * 8, (1 << 16,) * 4, (3, 1 << 31)]
KINDS = ("random", "header+random", "mutated", "inner-mutated", "huge-shape", "bomb", "foreign", "record")
MiB = 1 << 20


def memory_bound(numel: int, payload_len: int) -> int:
    """The tracemalloc peak a decode may reach: 64·numel + 16·len(payload) + 256 KiB bytes."""
    return 64 * numel + 16 * payload_len + 256 * 1024


# -------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """One decoder configuration: a registry codec name, its parameters and an entropy method."""

    name: str
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in self.params if k != "entropy")
        entropy = dict(self.params).get("entropy", "none")
        return f"{self.name}({extra})" + ("" if entropy == "none" else f"+{entropy}")

    def codec(self) -> Codec:
        return make_codec(self.name, dict(self.params), seed=0)


def targets() -> list[Target]:
    """Every registered codec, its layout-changing variants, each with no entropy stage, zstd and zlib."""
    variants: dict[str, list[dict[str, Any]]] = {
        "qsgd": [{}, {"bits": 1, "bucket": 1}, {"bits": 8, "bucket": 7}],
        "topk": [{"ratio": 0.2}, {"ratio": 1.0, "values": "fp32"}],
        "stc": [{"ratio": 0.2}, {"ratio": 1.0}],
        "randk": [{"ratio": 0.3}, {"ratio": 0.3, "bits": 4}, {"ratio": 1.0, "bits": 1}],
        "powersgd": [{"rank": 1}, {"rank": 3}],
    }
    out = []
    for name in codec_names():
        for params in variants.get(name, [{}]):
            for entropy in ("none", "zstd", "zlib"):
                out.append(Target(name, tuple(sorted({**params, "entropy": entropy}.items()))))
    return out


# ------------------------------------------------------------------ mutations

Op = tuple  # ("flip", pos, bit) | ("set", pos, byte) | ("u32", pos, value) | ("trunc", n) | ...
INTERESTING_U32 = (0, 1, 2, 3, 7, 8, 9, 31, 32, 33, 63, 64, 255, 256, 1 << 16, (1 << 31) - 1, 1 << 31, 0xFFFFFFFF)


def apply_mutations(payload: bytes, ops: Sequence[Op]) -> bytes:
    """Apply mutation ops in order; positions are taken modulo the current length."""
    data = bytearray(payload)
    for op in ops:
        kind = op[0]
        if kind == "trunc":
            del data[op[1] % (len(data) + 1) :]
        elif kind == "extend":
            data += op[1]
        elif not data:
            continue
        elif kind == "flip":
            data[op[1] % len(data)] ^= 1 << (op[2] % 8)
        elif kind == "set":
            data[op[1] % len(data)] = op[2] % 256
        elif kind == "u32":
            at = op[1] % len(data)
            data[at : at + 4] = struct.pack("<I", op[2] % (1 << 32))[: len(data) - at]
        elif kind == "insert":
            at = op[1] % (len(data) + 1)
            data[at:at] = op[2]
        elif kind == "delete":
            at = op[1] % len(data)
            del data[at : at + op[2]]
        else:
            raise ValueError(f"unknown mutation {kind!r}")
    return bytes(data)


def random_ops(rng: np.random.Generator, numel: int, count: int) -> list[Op]:
    """``count`` random mutation ops; half the positions fall in the first 48 bytes (header and fields)."""
    ops: list[Op] = []
    for _ in range(count):
        pos = int(rng.integers(0, 48)) if rng.random() < 0.5 else int(rng.integers(0, 1 << 20))
        kind = ("flip", "set", "u32", "u32", "trunc", "extend", "insert", "delete")[int(rng.integers(0, 8))]
        if kind == "flip":
            ops.append(("flip", pos, int(rng.integers(0, 8))))
        elif kind == "set":
            ops.append(("set", pos, int(rng.choice([0, 1, 0x7F, 0x80, 0xFF, int(rng.integers(0, 256))]))))
        elif kind == "u32":
            pool = (*INTERESTING_U32, numel, numel + 1, 2 * numel, max(numel - 1, 0))
            value = int(rng.choice(pool)) if rng.random() < 0.8 else int(rng.integers(0, 1 << 32))
            ops.append(("u32", pos, value))
        elif kind == "trunc":
            ops.append(("trunc", pos))
        elif kind == "extend":
            ops.append(("extend", rng.bytes(int(rng.integers(1, 64)))))
        elif kind == "insert":
            ops.append(("insert", pos, rng.bytes(int(rng.integers(1, 16)))))
        else:
            ops.append(("delete", pos, int(rng.integers(1, 16))))
    return ops


# --------------------------------------------------------------- case makers


def valid_payload(codec: Codec, shape: tuple[int, ...], seed: int) -> bytes:
    """An honest payload for a random tensor (normal values, a few zeros) of ``shape``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    if x.size:
        x.reshape(-1)[rng.random(x.size) < 0.2] = 0.0
    return codec.encode(x, EncodeContext(seed=seed))


def _compress(method: str, data: bytes) -> bytes:
    if method == "zlib":
        return zlib.compress(data, 6)
    import zstandard

    return zstandard.ZstdCompressor(level=1, write_content_size=True).compress(data)


@lru_cache(maxsize=64)
def _zeros_compressed(method: str, size: int) -> bytes:
    """``size`` zero bytes, compressed (a decompression bomb; cached: compressing 16 MiB takes a while)."""
    return _compress(method, bytes(size))


def wrap_entropy(codec: EntropyCodec, shape: tuple[int, ...], inner: bytes, outer_shape: tuple[int, ...] | None = None) -> bytes:
    """An entropy-stage payload of ``outer_shape`` (default ``shape``) around any inner bytes, compressed properly."""
    prefix = pack_header(codec.codec_id, F32, outer_shape if outer_shape is not None else shape)
    return prefix + bytes((1 if codec.method == "zstd" else 2, codec.inner.codec_id)) + _compress(codec.method, inner)


def _inner(codec: Codec) -> Codec:
    return codec.inner if isinstance(codec, EntropyCodec) else codec


def _huge_header_payload(codec: Codec, rng: np.random.Generator) -> bytes:
    """A header of this codec that claims a huge shape, with a short plausible body (k = 1, rank 1, ...)."""
    shape = HUGE_SHAPES[int(rng.integers(0, len(HUGE_SHAPES)))]
    inner = _inner(codec)
    bodies = [
        struct.pack("<QI", 7, 1) + np.float32(1).tobytes(),  # rand-k, k = 1
        struct.pack("<IB", 1, 0) + b"\x80" + b"\x00\x3c",  # top-k, k = 1
        struct.pack("<I", 1) + rng.bytes(16),  # powersgd, rank 1
        struct.pack("<BI", 4, 0xFFFFFFFF) + rng.bytes(8),  # qsgd, one huge bucket
        rng.bytes(int(rng.integers(0, 32))),
    ]
    return pack_header(inner.codec_id, F32, shape) + bodies[int(rng.integers(0, len(bodies)))]


def make_payload(kind: str, codec: Codec, shape: tuple[int, ...], rng: np.random.Generator) -> bytes:
    """One hostile payload of ``kind`` for ``codec``, whose server expects ``shape``."""
    numel = math.prod(shape)
    seed = int(rng.integers(0, 1 << 62))
    if kind == "random":
        valid_len = len(valid_payload(codec, shape, seed))
        return rng.bytes(int(rng.integers(0, 2 * valid_len + 16)))
    if kind == "header+random":
        valid = valid_payload(codec, shape, seed)
        head_len = len(pack_header(codec.codec_id, F32, shape))
        length = max(0, len(valid) - head_len + int(rng.integers(-8, 9)))
        if rng.random() < 0.5:  # the real fields, random bits after them
            keep = min(len(valid), head_len + int(rng.integers(0, 24)))
            return valid[:keep] + rng.bytes(max(0, len(valid) - keep + int(rng.integers(-4, 5))))
        return valid[:head_len] + rng.bytes(length)
    if kind == "mutated":
        return apply_mutations(valid_payload(codec, shape, seed), random_ops(rng, numel, int(rng.integers(1, 5))))
    if kind == "inner-mutated":
        if not isinstance(codec, EntropyCodec):
            return apply_mutations(valid_payload(codec, shape, seed), random_ops(rng, numel, 1))
        inner = valid_payload(codec.inner, shape, seed)
        return wrap_entropy(codec, shape, apply_mutations(inner, random_ops(rng, numel, int(rng.integers(1, 4)))))
    if kind == "huge-shape":
        huge = _huge_header_payload(codec, rng)
        if isinstance(codec, EntropyCodec):
            if rng.random() < 0.75:  # the 51-byte attack: an honest outer header, a huge inner one
                return wrap_entropy(codec, shape, huge)
            outer = HUGE_SHAPES[int(rng.integers(0, len(HUGE_SHAPES)))]
            return wrap_entropy(codec, shape, huge, outer_shape=outer)
        return huge
    if kind == "bomb":
        if not isinstance(codec, EntropyCodec):
            return pack_header(codec.codec_id, F32, shape) + bytes(int(rng.integers(0, 64)))
        head = pack_header(codec.codec_id, F32, shape) + bytes((1 if codec.method == "zstd" else 2, codec.inner.codec_id))
        if codec.method == "zstd" and rng.random() < 0.5:  # a frame that claims 2**40 bytes of content
            frame = struct.pack("<IB", 0xFD2FB528, 0xE0) + struct.pack("<Q", 1 << 40) + b"\x01\x00\x00"
            return head + frame
        sizes = (8 * numel + 4097, 8 * numel + 4096 + (1 << 16), 1 << 24)  # just past what the shape allows, or far past
        return head + _zeros_compressed(codec.method, sizes[int(rng.integers(0, len(sizes)))])
    if kind == "foreign":
        names = codec_names()
        other = make_codec(names[int(rng.integers(0, len(names)))], {"feedback": False})
        return valid_payload(other, shape, seed)
    raise ValueError(f"unknown case kind {kind!r}")


# -------------------------------------------------------------------- running


class _Abort(QflError):
    """Raised by SIGALRM in a case past the abort limit."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise _Abort()


@dataclass
class Outcome:
    status: str  # "ok" | "rejected" | "crash"
    detail: str
    seconds: float
    peak: int  # tracemalloc peak above the level before the case, bytes
    bound: int


def run_decode(codec: Codec, payload: bytes, shape: tuple[int, ...], record: bool = False, abort_s: float = 0.0) -> Outcome:
    """Decode one case the way the server does; classify what happened (tracemalloc must be tracing)."""
    numel = math.prod(shape)
    bound = memory_bound(numel, len(payload))
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    if abort_s:
        signal.setitimer(signal.ITIMER_REAL, abort_s)
    expected: type[Exception] = PayloadError if record else CodecError
    start = time.perf_counter()
    try:
        if record:
            array = Array(dtype="uint8", shape=(len(payload),), stype=PAYLOAD_STYPE, data=payload)
            out = decode_update(ArrayRecord({"t": array}), codec, {"t": shape})["t"]
        else:
            out = codec.decode_as(payload, shape)
        if out.shape != shape or out.dtype != np.float32:
            status, detail = "crash", f"returned {out.dtype} {out.shape}, expected float32 {shape}"
        else:
            status, detail = "ok", ""
    except expected as err:
        status, detail = "rejected", str(err)[:120]
    except _Abort:
        status, detail = "crash", f"aborted after {abort_s} s"
    except Exception as err:  # noqa: BLE001 - classifying every other exception is the point
        status, detail = "crash", f"{type(err).__name__}: {str(err)[:160]}"
    finally:
        if abort_s:
            signal.setitimer(signal.ITIMER_REAL, 0)
    seconds = time.perf_counter() - start
    peak = max(0, tracemalloc.get_traced_memory()[1] - base)
    return Outcome(status, detail, seconds, peak, bound)


@dataclass
class Tally:
    cases: int = 0
    ok: int = 0
    rejected: int = 0
    crashes: int = 0
    hangs: int = 0
    oversize: int = 0
    slowest: float = 0.0
    worst_ratio: float = 0.0  # peak / bound
    examples: list[str] = field(default_factory=list)


def fuzz(cases: int, seed: int = 0, hang_s: float = 2.0, abort_s: float = 30.0,
         progress: Callable[[int], None] | None = None) -> dict[str, Tally]:
    """Run ``cases`` cases spread evenly over every target; a Tally per target label."""
    rng = np.random.default_rng(seed)
    all_targets = targets()
    codecs = {t: t.codec() for t in all_targets}
    tallies: dict[str, Tally] = defaultdict(Tally)
    for codec in codecs.values():  # import what encoders import lazily (torch) before tracing
        valid_payload(codec, (3, 4), 0)
    old = signal.signal(signal.SIGALRM, _on_alarm) if abort_s else None
    tracemalloc.start()
    try:
        for i in range(cases):
            target = all_targets[i % len(all_targets)]
            codec = codecs[target]
            shape = SHAPES[int(rng.integers(0, len(SHAPES)))]
            kind = KINDS[int(rng.integers(0, len(KINDS)))]
            record = kind == "record"
            if record:
                kind = KINDS[int(rng.integers(0, len(KINDS) - 1))]
            payload = make_payload(kind, codec, shape, rng)
            outcome = run_decode(codec, payload, shape, record=record, abort_s=abort_s)
            tally = tallies[target.label]
            tally.cases += 1
            tally.slowest = max(tally.slowest, outcome.seconds)
            tally.worst_ratio = max(tally.worst_ratio, outcome.peak / outcome.bound)
            problems = []
            if outcome.status == "crash":
                tally.crashes += 1
                problems.append(outcome.detail)
            else:
                setattr(tally, outcome.status, getattr(tally, outcome.status) + 1)
            if outcome.seconds > hang_s:
                tally.hangs += 1
                problems.append(f"took {outcome.seconds:.2f} s")
            if outcome.peak > outcome.bound:
                tally.oversize += 1
                problems.append(f"peak {outcome.peak} B > bound {outcome.bound} B")
            if problems and len(tally.examples) < 3:
                tally.examples.append(
                    f"{kind}{' (record)' if record else ''} shape={shape} payload={payload[:64].hex()}"
                    f"{'...' if len(payload) > 64 else ''} ({len(payload)} B): {'; '.join(problems)}"
                )
            if progress is not None and (i + 1) % 10_000 == 0:
                progress(i + 1)
    finally:
        tracemalloc.stop()
        if old is not None:
            signal.signal(signal.SIGALRM, old)
    return dict(tallies)


def format_table(tallies: dict[str, Tally]) -> str:
    head = f"{'target':<32} {'cases':>7} {'ok':>6} {'reject':>7} {'crash':>6} {'hang':>5} {'oversz':>6} {'slowest':>9} {'peak/bd':>8}"
    lines = [head, "-" * len(head)]
    total = Tally()
    for label in sorted(tallies):
        t = tallies[label]
        lines.append(
            f"{label:<32} {t.cases:>7} {t.ok:>6} {t.rejected:>7} {t.crashes:>6} {t.hangs:>5} {t.oversize:>6} "
            f"{1e3 * t.slowest:>7.1f}ms {t.worst_ratio:>8.3f}"
        )
        for name in ("cases", "ok", "rejected", "crashes", "hangs", "oversize"):
            setattr(total, name, getattr(total, name) + getattr(t, name))
        total.slowest = max(total.slowest, t.slowest)
        total.worst_ratio = max(total.worst_ratio, t.worst_ratio)
    lines.append("-" * len(head))
    lines.append(
        f"{'TOTAL':<32} {total.cases:>7} {total.ok:>6} {total.rejected:>7} {total.crashes:>6} {total.hangs:>5} "
        f"{total.oversize:>6} {1e3 * total.slowest:>7.1f}ms {total.worst_ratio:>8.3f}"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=100_000, help="cases in all, spread over every target")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hang-s", type=float, default=2.0, help="a case slower than this counts as a hang")
    parser.add_argument("--abort-s", type=float, default=30.0, help="stop a case after this long (0: never)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    tallies = fuzz(args.cases, args.seed, args.hang_s, args.abort_s,
                   progress=lambda n: print(f"  {n} cases, {time.perf_counter() - start:.0f} s", file=sys.stderr))
    print(format_table(tallies))
    failures = {label: t for label, t in tallies.items() if t.crashes or t.hangs or t.oversize}
    kinds: Counter[str] = Counter()
    for t in failures.values():
        kinds.update(crashes=t.crashes, hangs=t.hangs, oversize=t.oversize)
    print(f"\n{sum(t.cases for t in tallies.values())} cases over {len(tallies)} targets in "
          f"{time.perf_counter() - start:.0f} s (seed {args.seed}); memory bound 64·numel + 16·len(payload) + 256 KiB; "
          f"hang threshold {args.hang_s} s")
    if failures:
        print(f"FAILED: {kinds['crashes']} crashes, {kinds['hangs']} hangs, {kinds['oversize']} oversize allocations")
        for label, t in sorted(failures.items()):
            for example in t.examples:
                print(f"  {label}: {example}")
        return 1
    print("OK: 0 crashes, 0 hangs, 0 oversize allocations")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
