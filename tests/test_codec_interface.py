import numpy as np
import pytest

from qfl.compression import (
    PAYLOAD_STYPE,
    Codec,
    CodecError,
    PayloadError,
    codec_names,
    decode_update,
    encode_update,
    make_codec,
    payload_bytes,
)
from qfl.compression.wire import pack_header
from qfl.errors import CodecReason, PayloadReason


@pytest.fixture
def fp32() -> Codec:
    return make_codec("fp32")


def test_registry_and_declared_algebra(fp32):
    assert "fp32" in codec_names()
    traits = fp32.traits
    assert traits.lossless and traits.unbiased and traits.commutes_with_sum and not traits.stateful
    with pytest.raises(ValueError):  # an unknown codec
        make_codec("nope")
    with pytest.raises(ValueError):  # a parameter the codec does not take
        make_codec("fp32", {"bits": 4})


@pytest.mark.parametrize("shape", [(), (1,), (7,), (3, 4), (16, 1, 3, 3)])
def test_fp32_round_trip_is_bit_exact(fp32, shape):
    x = np.asarray(np.random.default_rng(0).standard_normal(shape), dtype=np.float32)
    payload = fp32.encode(x)
    y = fp32.decode(payload)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.array_equal(x.view(np.uint32), y.view(np.uint32))
    assert len(payload) == 4 * x.size + 6 + 4 * len(shape)


def test_decode_rejects_truncated_payloads(fp32):
    payload = fp32.encode(np.arange(10, dtype=np.float32))
    for cut in range(len(payload)):
        with pytest.raises(CodecError):
            fp32.decode(payload[:cut])
    with pytest.raises(CodecError):
        fp32.decode(payload + b"\x00")


def test_decode_rejects_corrupted_headers(fp32):
    payload = bytearray(fp32.encode(np.ones(4, dtype=np.float32)))
    for offset, value, reason in [
        (0, ord("X"), CodecReason.BAD_MAGIC),
        (2, 9, CodecReason.VERSION),
        (3, 77, CodecReason.WRONG_CODEC),
        (4, 200, CodecReason.BAD_HEADER),
        (5, 60, CodecReason.BAD_HEADER),
    ]:
        bad = bytearray(payload)
        bad[offset] = value
        with pytest.raises(CodecError) as err:
            fp32.decode(bytes(bad))
        assert err.value.reason is reason


def test_decode_of_random_bytes_never_crashes_or_returns_garbage(fp32):
    rng = np.random.default_rng(1)
    for n in range(0, 300, 7):
        blob = rng.integers(0, 256, size=n, dtype=np.uint8).tobytes()
        with pytest.raises(CodecError):
            fp32.decode(blob)
    with pytest.raises(CodecError) as err:
        fp32.decode("not bytes")  # type: ignore[arg-type]
    assert err.value.reason is CodecReason.NOT_BYTES


def test_huge_claimed_shape_is_refused_before_allocation(fp32):
    blob = pack_header(fp32.codec_id, np.dtype("<f4"), (1 << 20, 1 << 20)) + b"\x00" * 16
    with pytest.raises(CodecError) as err:
        fp32.decode(blob)
    assert err.value.reason is CodecReason.OVERSIZE


def _update():
    rng = np.random.default_rng(2)
    return {"w": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(4).astype(np.float32)}


def test_update_record_round_trip_and_byte_count(fp32):
    update = _update()
    record = encode_update(update, fp32)
    for array in record.values():
        assert array.stype == PAYLOAD_STYPE and array.dtype == "uint8" and len(array.shape) == 1
    assert payload_bytes(record) == sum(len(fp32.encode(v)) for v in update.values())
    shapes = {k: v.shape for k, v in update.items()}
    decoded = decode_update(record, fp32, shapes)
    assert all(np.array_equal(decoded[k], update[k]) for k in update)


def test_update_record_problems_are_named(fp32):
    update = _update()
    shapes = {k: v.shape for k, v in update.items()}
    record = encode_update(update, fp32)

    missing = encode_update({"w": update["w"]}, fp32)
    with pytest.raises(PayloadError) as err:
        decode_update(missing, fp32, shapes)
    assert err.value.reason is PayloadReason.TENSOR_MISMATCH

    extra = encode_update({**update, "z": np.zeros(1, np.float32)}, fp32)
    with pytest.raises(PayloadError) as err:
        decode_update(extra, fp32, shapes)
    assert err.value.reason is PayloadReason.TENSOR_MISMATCH

    with pytest.raises(PayloadError) as err:
        decode_update(record, fp32, {"w": (4, 3), "b": (4,)})
    assert err.value.reason is PayloadReason.UNDECODABLE
    assert isinstance(err.value.__cause__, CodecError) and err.value.__cause__.reason is CodecReason.SHAPE_MISMATCH

    from flwr.app import Array

    foreign = encode_update(update, fp32)
    foreign["b"] = Array(np.zeros(4, np.float32))
    with pytest.raises(PayloadError) as err:
        decode_update(foreign, fp32, shapes)
    assert err.value.reason is PayloadReason.FOREIGN_ARRAY

    truncated = encode_update(update, fp32)
    truncated["w"] = Array(dtype="uint8", shape=(5,), stype=PAYLOAD_STYPE, data=record["w"].data[:5])
    with pytest.raises(PayloadError) as err:
        decode_update(truncated, fp32, shapes)
    assert err.value.reason is PayloadReason.UNDECODABLE


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_updates_are_refused(fp32, bad):
    update = _update()
    update["w"][1, 2] = bad
    record = encode_update(update, fp32)
    with pytest.raises(PayloadError) as err:
        decode_update(record, fp32, {k: v.shape for k, v in update.items()})
    assert err.value.reason is PayloadReason.NON_FINITE
