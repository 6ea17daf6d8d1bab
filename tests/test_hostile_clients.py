"""One hostile client can never kill a run, blow up memory, or take more than its capped weight."""

import math
import struct
import tracemalloc

import numpy as np
import pytest
import zstandard
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from qfl.compression import PAYLOAD_STYPE, CodecError, PayloadError, decode_update, encode_update, make_codec
from qfl.compression.wire import max_payload_size, pack_header, unpack_header
from qfl.config import ConfigError, RunConfig, resolve_config
from qfl.errors import CodecReason, UntrustedReason
from qfl.server.optimizers import make_server_optimizer
from qfl.server.strategy import DropReason, QflFedAvg, record_to_weights, weights_to_record
from qfl.server.untrusted import UntrustedValue, capped_examples, finite_float, int_in_range

F32 = np.dtype("<f4")
SHAPES = {"w": (2, 3), "b": (3,)}
NODES = [11, 12, 13, 14]
HOSTILE = [float("nan"), float("inf"), float("-inf"), -3, 1.7e308, 10**30, 2.5, [1, 2], "7"]


def _peak(fn) -> int:
    """tracemalloc peak of ``fn()`` (which must raise CodecError or PayloadError)."""
    tracemalloc.start()
    try:
        with pytest.raises((CodecError, PayloadError)):
            fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _inner_bomb(outer_shape=(10,)) -> bytes:
    """The reported payload: randk+zstd whose outer header is honest and whose inner one claims 2**34 elements."""
    inner = pack_header(8, F32, (1 << 17, 1 << 17)) + struct.pack("<QI", 7, 1) + np.float32(1).tobytes()
    frame = zstandard.ZstdCompressor(level=1, write_content_size=True).compress(inner)
    return pack_header(10, F32, outer_shape) + bytes((1, 8)) + frame


# ------------------------------------------------------------------ decoders


def test_the_51_byte_inner_bomb_is_refused_without_allocating():
    payload = _inner_bomb()
    assert len(payload) == 51
    codec = make_codec("randk", {"ratio": 0.1, "entropy": "zstd"})
    record = ArrayRecord({"w": Array(dtype="uint8", shape=(51,), stype=PAYLOAD_STYPE, data=payload)})
    for decode in (
        lambda: codec.decode_as(payload, (10,)),
        lambda: codec.decode(payload),  # the entropy stage checks its inner header even without decode_as
        lambda: decode_update(record, codec, {"w": (10,)}),
    ):
        assert _peak(decode) < 1 << 20
    with pytest.raises(CodecError) as err:
        codec.decode_as(payload, (10,))
    assert err.value.reason is CodecReason.SHAPE_MISMATCH  # the inner header's claim, refused before allocating


@pytest.mark.parametrize(
    "name, params, body",
    [
        ("randk", {"ratio": 0.1}, struct.pack("<QI", 7, 1) + np.float32(1).tobytes()),
        ("topk", {"ratio": 0.1}, struct.pack("<IB", 1, 0) + b"\x80" + np.float16(1).tobytes()),
        ("powersgd", {"rank": 1}, struct.pack("<I", 1) + bytes(8)),
        ("qsgd", {}, struct.pack("<BI", 4, 0xFFFFFFFF) + bytes(9)),
    ],
)
def test_raw_decoders_refuse_a_huge_claim_before_allocating(name, params, body):
    codec = make_codec(name, {**params, "feedback": False})
    payload = pack_header(codec.codec_id, F32, (1 << 17, 1 << 17)) + body
    assert _peak(lambda: codec.decode_as(payload, (4, 3))) < 1 << 20
    with pytest.raises(CodecError) as err:
        codec.decode_as(payload, (4, 3))
    assert err.value.reason is CodecReason.SHAPE_MISMATCH


def test_decompression_is_bounded_by_the_expected_shape():
    for method in ("zstd", "zlib"):
        codec = make_codec("fp32", {"entropy": method})
        head = pack_header(10, F32, (8,)) + bytes((1 if method == "zstd" else 2, 1))
        bomb = zstandard.ZstdCompressor(level=1).compress(bytes(1 << 26)) if method == "zstd" else None
        if bomb is None:
            import zlib

            bomb = zlib.compress(bytes(1 << 26), 9)
        assert _peak(lambda: codec.decode_as(head + bomb, (8,))) < 1 << 20
    # a zstd frame that claims 2**40 bytes of content
    frame = struct.pack("<IB", 0xFD2FB528, 0xE0) + struct.pack("<Q", 1 << 40) + b"\x01\x00\x00"
    codec = make_codec("fp32", {"entropy": "zstd"})
    with pytest.raises(CodecError) as err:
        codec.decode_as(pack_header(10, F32, (8,)) + bytes((1, 1)) + frame, (8,))
    assert err.value.reason is CodecReason.OVERSIZE


def test_oversize_payloads_and_wrapping_shapes_are_refused():
    codec = make_codec("fp32")
    with pytest.raises(CodecError) as err:
        codec.decode_as(bytes(max_payload_size(12) + 1), (3, 4))
    assert err.value.reason is CodecReason.OVERSIZE
    # 2**32 · 2**32 wraps to 0 in int64: the header must still be refused, not read as empty
    with pytest.raises(CodecError) as err:
        unpack_header(pack_header(1, F32, (0xFFFFFFFF,) * 8), 1)
    assert err.value.reason is CodecReason.OVERSIZE


def test_powersgd_refuses_a_rank_above_its_own():
    codec = make_codec("powersgd", {"rank": 1, "feedback": False})
    rank3 = make_codec("powersgd", {"rank": 3, "feedback": False}).encode(np.ones((6, 5), np.float32))
    with pytest.raises(CodecError) as err:
        codec.decode_as(rank3, (6, 5))
    assert err.value.reason is CodecReason.BAD_PARAMETER


# ------------------------------------------------------------------ untrusted


def test_untrusted_validators():
    assert capped_examples(3.0, 10) == 3 and int_in_range(0, "p", 0, 4) == 0 and finite_float(2, "x") == 2.0
    for bad in HOSTILE + [True, None, 0, 11]:
        with pytest.raises(UntrustedValue):
            capped_examples(bad, 10)
    with pytest.raises(UntrustedValue) as err:
        finite_float(float("nan"), "loss")
    assert (err.value.reason, err.value.key) == (UntrustedReason.NOT_FINITE, "loss")
    with pytest.raises(UntrustedValue) as err:
        finite_float(2.0, "acc", 0.0, 1.0)
    assert (err.value.reason, err.value.key) == (UntrustedReason.OUT_OF_RANGE, "acc")


def test_max_client_examples_is_a_checked_config_key():
    assert RunConfig().max_client_examples == 100_000
    assert resolve_config({"max_client_examples": 500}).max_client_examples == 500
    for bad in (0, -1, 2**60):
        with pytest.raises(ConfigError) as err:
            resolve_config({"max_client_examples": bad})
        assert err.value.key == "max_client_examples"


# ------------------------------------------------------------------ strategy


class FakeGrid:
    def get_node_ids(self):
        return list(NODES)


def _strategy(**kwargs):
    return QflFedAvg(
        codec=make_codec("fp32"), downlink_codec=make_codec("fp32"), shapes=SHAPES,
        optimizer=make_server_optimizer(RunConfig()), min_nodes=len(NODES), wait_timeout=1, **kwargs,
    )


def _weights(value=0.0):
    return {k: np.full(s, value, dtype=np.float32) for k, s in SHAPES.items()}


def _configure(strategy, config=None, weights=None):
    arrays = weights_to_record(weights or _weights())
    return list(strategy.configure_train(1, arrays, ConfigRecord(config or {}), FakeGrid()))


def _metrics(**values) -> MetricRecord:
    """A MetricRecord holding any values, strings included (a hostile peer is not bound by Flower's checks)."""
    record = MetricRecord({})
    record.__dict__["_data"].update(values)
    return record


def _reply(msg, value=1.0, update=None, **metrics):
    fields = {"num-examples": 10, "train-loss": 0.5, "partition-id": 0, **metrics}
    update = update if update is not None else _weights(value)
    return Message(RecordDict({"update": encode_update(update, make_codec("fp32")), "metrics": _metrics(**fields)}), reply_to=msg)


VALID_LOSSES = (-3, 2.5)  # a finite, moderate loss is a valid loss, not a hostile one
BAD_METRICS = [(field, bad) for field in ("num-examples", "partition-id", "train-loss") for bad in HOSTILE
               if not (field == "train-loss" and bad in VALID_LOSSES)]


@pytest.mark.parametrize("field, bad", BAD_METRICS, ids=repr)
def test_a_bad_metric_drops_that_client_and_the_round_goes_on(task_identity, field, bad):
    strategy = _strategy()
    msgs = _configure(strategy)
    replies = [_reply(m, float(i + 1), **{"partition-id": i}) for i, m in enumerate(msgs[:3])]
    replies.append(_reply(msgs[3], 1000.0, **{"partition-id": 3, field: bad}))
    new, metrics = strategy.aggregate_train(1, replies)
    assert metrics["clients"] == 3 and metrics["dropped"] == 1
    assert np.allclose(record_to_weights(new)["w"], 2.0)  # mean of 1, 2, 3; the hostile 1000 left out
    assert math.isclose(metrics["train-loss"], 0.5)
    (drop,) = strategy.drops
    assert (drop.node, drop.reason) == (NODES[3], DropReason.BAD_METRICS)
    assert f"'{field}'" in drop.detail  # names the metric at fault


def test_the_example_weight_is_capped(task_identity):
    strategy = _strategy(max_client_examples=50, example_caps={1: 20})
    msgs = _configure(strategy)
    replies = [
        _reply(msgs[0], 1.0, **{"partition-id": 0, "num-examples": 50}),  # at the configured cap: accepted
        _reply(msgs[1], 9.0, **{"partition-id": 1, "num-examples": 21}),  # above its known partition size
        _reply(msgs[2], 5.0, **{"partition-id": 2, "num-examples": 51}),  # above the configured cap
        _reply(msgs[3], 3.0, **{"partition-id": 1, "num-examples": 20}),  # at its partition size
    ]
    new, metrics = strategy.aggregate_train(1, replies)
    assert metrics["clients"] == 2 and metrics["dropped"] == 2
    assert np.allclose(record_to_weights(new)["b"], (50 * 1.0 + 20 * 3.0) / 70)
    assert [(d.node, d.reason) for d in strategy.drops] == [(NODES[1], DropReason.BAD_METRICS),
                                                            (NODES[2], DropReason.BAD_METRICS)]


def test_the_round_config_sets_the_cap_and_partition_ids_are_range_checked(task_identity):
    strategy = _strategy(num_partitions=4)
    msgs = _configure(strategy, config={"max_client_examples": 30})
    assert strategy.max_client_examples == 30
    replies = [
        _reply(msgs[0], 1.0, **{"num-examples": 30}),
        _reply(msgs[1], 1.0, **{"num-examples": 31, "partition-id": 1}),
        _reply(msgs[2], 1.0, **{"partition-id": 4}),
        _reply(msgs[3], 1.0, **{"partition-id": 0}),  # a duplicate id is kept, in node order
    ]
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics["clients"] == 2 and metrics["dropped"] == 2
    assert [(d.node, d.reason) for d in strategy.drops] == [(NODES[1], DropReason.BAD_METRICS),
                                                            (NODES[2], DropReason.BAD_METRICS)]


def test_hostile_payloads_in_a_round_are_dropped(task_identity):
    codec = make_codec("randk", {"ratio": 0.5, "entropy": "zstd"})
    strategy = QflFedAvg(codec=codec, downlink_codec=make_codec("fp32"), shapes=SHAPES,
                         optimizer=make_server_optimizer(RunConfig()), min_nodes=len(NODES), wait_timeout=1)
    msgs = _configure(strategy)
    good = [Message(RecordDict({"update": encode_update(_weights(1.0), codec),
                                "metrics": _metrics(**{"num-examples": 10, "partition-id": i})}), reply_to=m)
            for i, m in enumerate(msgs[:3])]
    bomb = encode_update(_weights(1.0), codec)
    bomb["w"] = Array(dtype="uint8", shape=(51,), stype=PAYLOAD_STYPE, data=_inner_bomb((2, 3)))
    hostile = Message(RecordDict({"update": bomb, "metrics": _metrics(**{"num-examples": 10, "partition-id": 3})}),
                      reply_to=msgs[3])
    tracemalloc.start()
    try:
        new, metrics = strategy.aggregate_train(1, good + [hostile])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20
    assert metrics["clients"] == 3 and metrics["dropped"] == 1 and new is not None
    assert [(d.node, d.reason) for d in strategy.drops] == [(NODES[3], DropReason.UNDECODABLE)]


def test_an_unexpected_decoder_error_drops_the_client_not_the_run(task_identity, monkeypatch):
    strategy = _strategy()
    msgs = _configure(strategy)
    calls = []

    def flaky(record, codec, shapes):
        calls.append(1)
        if len(calls) == 2:
            raise IndexError("index 99 is out of bounds")
        return decode_update(record, codec, shapes)

    monkeypatch.setattr("qfl.server.strategy.decode_update", flaky)
    new, metrics = strategy.aggregate_train(1, [_reply(m, **{"partition-id": i}) for i, m in enumerate(msgs)])
    assert metrics["clients"] == 3 and metrics["dropped"] == 1 and new is not None
    assert [d.reason for d in strategy.drops] == [DropReason.UNDECODABLE]


def test_finite_but_huge_updates_leave_the_model_and_the_optimizer_unchanged(task_identity):
    strategy = _strategy()
    strategy.optimizer = make_server_optimizer(RunConfig(server_opt="fedavgm"))
    msgs = _configure(strategy, weights=_weights(3e38))
    new, metrics = strategy.aggregate_train(1, [_reply(m, 3e38, **{"partition-id": i}) for i, m in enumerate(msgs)])
    assert new is None and metrics["clients"] == 4
    assert strategy.drops == [] and len(strategy.drop_reasons) == 1  # no client dropped: the round says why
    assert strategy.optimizer.state == {}  # the velocity of the refused step was rolled back


def test_evaluate_replies_with_bad_metrics_are_ignored_with_a_reason(task_identity):
    strategy = _strategy(max_client_examples=100)

    def reply(node, **m):
        msg = Message(RecordDict({"metrics": _metrics(**m)}), dst_node_id=node, message_type="evaluate")
        return Message(RecordDict({"metrics": _metrics(**m)}), reply_to=msg)

    good = {"num-examples": 10, "eval-loss": 1.0, "eval-accuracy": 0.5, "partition-id": 0}
    replies = [
        reply(11, **good),
        reply(12, **{**good, "num-examples": float("nan")}),
        reply(13, **{**good, "eval-accuracy": 7.0}),
        reply(14, **{**good, "num-examples": 1.7e308}),
        reply(15, **{**good, "eval-loss": float("inf")}),
        reply(16, **{**good, "num-examples": 0}),  # an empty validation share: skipped quietly
    ]
    fed = strategy.aggregate_evaluate(1, replies)
    assert fed["fed-clients"] == 1 and fed["fed-loss"] == 1.0 and fed["fed-accuracy"] == 0.5
    assert len(strategy.eval_ignored) == 4 and "from node 12 ignored" in strategy.eval_ignored[0]
    text = " | ".join(strategy.eval_ignored)
    assert "'num-examples' must be an integer, got nan" in text and "'eval-accuracy' = 7.0 is outside" in text


def test_federated_evaluation_asks_a_sample_as_large_as_the_training_one(task_identity):
    """At 1,000 clients and fraction 0.1 a round evaluates on 100 nodes, not on all 1,000."""
    strategy = _strategy(fraction_train=0.5, seed=3)
    train = {m.metadata.dst_node_id for m in _configure(strategy)}
    evaluate = {m.metadata.dst_node_id for m in strategy.configure_evaluate(1, weights_to_record(_weights()),
                                                                            ConfigRecord({}), FakeGrid())}
    assert len(evaluate) == len(train) == round(len(NODES) * 0.5) and evaluate <= set(NODES)
    everyone = _strategy(fraction_train=1.0)
    assert len(list(everyone.configure_evaluate(1, weights_to_record(_weights()), ConfigRecord({}), FakeGrid()))) == len(NODES)
    assert list(_strategy(fed_eval=False).configure_evaluate(1, weights_to_record(_weights()), ConfigRecord({}),
                                                             FakeGrid())) == []
