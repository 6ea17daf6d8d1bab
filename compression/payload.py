"""A whole model update to and from a Flower ``ArrayRecord``.

Each named tensor travels as one Flower ``Array`` whose ``data`` is the codec's
payload, with ``stype`` = :data:`PAYLOAD_STYPE`, ``dtype`` = ``"uint8"`` and
``shape`` = ``(len(payload),)``. Flower's own numpy arrays are never used for
updates, so the bytes counted are exactly the bytes the codec produced.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING

import numpy as np

from qfl.errors import PayloadError, PayloadReason

from .codec import Codec, CodecError, EncodeContext

if TYPE_CHECKING:
    from flwr.app import ArrayRecord
# flwr is imported where a record is built: the codecs and their GPU kernels import with numpy and torch alone
# (the GPU bench, ../shared/gpu/bench_codecs_gpu.sh, runs where flwr is not installed).

PAYLOAD_STYPE = "qfl.codec/v1"


def tensor_seed(round_seed: int, name: str) -> int:
    """The seed every client uses for tensor ``name`` in a round (shared support)."""
    return int(np.random.SeedSequence([round_seed, zlib.crc32(name.encode())]).generate_state(1, np.uint64)[0])


def encode_update(
    update: Mapping[str, np.ndarray],
    codec: Codec,
    round_seed: int = 0,
    states: MutableMapping[str, dict[str, np.ndarray]] | None = None,
) -> ArrayRecord:
    """Encode every tensor of ``update`` with ``codec`` into an ArrayRecord.

    ``round_seed`` is shared by all clients of the round; ``states`` holds this
    client's per-tensor codec state and is updated in place (stateful codecs).
    """
    from flwr.app import Array, ArrayRecord

    record = ArrayRecord()
    for name, tensor in update.items():
        state = states.setdefault(name, {}) if states is not None else {}
        ctx = EncodeContext(seed=tensor_seed(round_seed, name), state=state)
        payload = codec.encode(np.asarray(tensor, dtype=np.float32), ctx)
        record[name] = Array(dtype="uint8", shape=(len(payload),), stype=PAYLOAD_STYPE, data=payload)
    return record


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of array data a record puts into a Flower message."""
    return sum(len(array.data) for array in record.values())


def decode_update(
    record: ArrayRecord, codec: Codec, expected_shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, np.ndarray]:
    """Decode and validate an update record against the model's tensor shapes.

    Raises PayloadError naming the first problem: missing or unexpected tensor
    names, a foreign ``stype``, a shape mismatch, undecodable bytes, or NaN/Inf.
    Nothing else escapes, and every allocation is bounded by the expected
    shapes (:meth:`Codec.decode_as`), whatever the record holds.
    """
    missing = sorted(set(expected_shapes) - set(record.keys()))
    extra = sorted(set(record.keys()) - set(expected_shapes))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"unexpected {extra}")
        raise PayloadError(
            f"update tensors do not match the model ({'; '.join(parts)}); "
            "client and server must build the same model", reason=PayloadReason.TENSOR_MISMATCH
        )
    decoded: dict[str, np.ndarray] = {}
    for name, shape in expected_shapes.items():
        array = record[name]
        if array.stype != PAYLOAD_STYPE:
            raise PayloadError(
                f"tensor {name!r} has stype {array.stype!r}, expected {PAYLOAD_STYPE!r}; "
                "updates must be made by qfl.compression.encode_update", reason=PayloadReason.FOREIGN_ARRAY
            )
        try:
            # decode_as refuses a foreign header, another shape or an oversize
            # payload before the decoder allocates anything (nested stages too)
            tensor = codec.decode_as(array.data, tuple(shape))
        except CodecError as err:
            raise PayloadError(f"tensor {name!r} cannot be decoded: {err}", reason=PayloadReason.UNDECODABLE) from err
        bad = int(np.count_nonzero(~np.isfinite(tensor)))
        if bad:
            raise PayloadError(
                f"tensor {name!r} holds {bad} NaN/Inf values; the client diverged "
                "(lower `lr` or check its data)", reason=PayloadReason.NON_FINITE
            )
        decoded[name] = tensor
    return decoded
