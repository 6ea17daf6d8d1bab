"""Bad replies are dropped and counted; they never touch the global model."""

import numpy as np
import pytest
from flwr.app import Array, ConfigRecord, Error, Message, MetricRecord, RecordDict

from qfl.compression import PAYLOAD_STYPE, encode_update, make_codec
from qfl.config import RunConfig
from qfl.server.optimizers import make_server_optimizer
from qfl.server.strategy import DropReason, NotEnoughNodes, QflFedAvg, record_to_weights, weights_to_record

SHAPES = {"w": (2, 3), "b": (3,)}
NODES = [11, 12, 13, 14]


class FakeGrid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def _strategy(fraction=1.0, seed=0):
    return QflFedAvg(
        codec=make_codec("fp32"),
        downlink_codec=make_codec("fp32"),
        shapes=SHAPES,
        optimizer=make_server_optimizer(RunConfig()),
        min_nodes=len(NODES),
        fraction_train=fraction,
        seed=seed,
        wait_timeout=1,
    )


def _weights(value=0.0):
    return {k: np.full(s, value, dtype=np.float32) for k, s in SHAPES.items()}


def _configure(strategy, rnd=1):
    return list(strategy.configure_train(rnd, weights_to_record(_weights()), ConfigRecord({}), FakeGrid(NODES)))


def _reply(msg, update=None, examples=10, partition=0, record=None):
    if record is None:
        record = RecordDict(
            {
                "update": encode_update(update, make_codec("fp32")),
                "metrics": MetricRecord({"num-examples": examples, "train-loss": 0.5, "partition-id": partition}),
            }
        )
    return Message(record, reply_to=msg)


def test_weighted_mean_of_updates(task_identity):
    strategy = _strategy()
    msgs = _configure(strategy)
    replies = [_reply(m, _weights(float(i + 1)), examples=10 * (i + 1), partition=i) for i, m in enumerate(msgs)]
    new, metrics = strategy.aggregate_train(1, replies)
    expected = sum(10 * (i + 1) * (i + 1) for i in range(4)) / sum(10 * (i + 1) for i in range(4))
    assert np.allclose(record_to_weights(new)["w"], expected)
    assert metrics["clients"] == 4 and metrics["dropped"] == 0
    assert metrics["uplink-bytes"] == sum(sum(len(a.data) for a in r.content["update"].values()) for r in replies)
    assert metrics["downlink-bytes"] == 4 * sum(len(make_codec("fp32").encode(v)) for v in _weights().values())


def test_bad_replies_are_dropped_and_counted(task_identity):
    strategy = _strategy()
    msgs = _configure(strategy)
    good = _reply(msgs[0], _weights(1.0), partition=0)
    nan_update = _weights(1.0)
    nan_update["b"][0] = np.nan
    nan = _reply(msgs[1], nan_update, partition=1)
    no_arrays = _reply(msgs[2], record=RecordDict({"metrics": MetricRecord({"num-examples": 5})}))
    malformed_record = encode_update(_weights(1.0), make_codec("fp32"))
    malformed_record["w"] = Array(dtype="uint8", shape=(3,), stype=PAYLOAD_STYPE, data=b"abc")
    malformed = _reply(
        msgs[3], record=RecordDict({"update": malformed_record, "metrics": MetricRecord({"num-examples": 5})})
    )
    new, metrics = strategy.aggregate_train(1, [good, nan, no_arrays, malformed])
    assert metrics["clients"] == 1 and metrics["dropped"] == 3
    assert np.allclose(record_to_weights(new)["w"], 1.0)  # only the good update counted
    assert [d.reason for d in strategy.drops] == [DropReason.UNDECODABLE, DropReason.MALFORMED, DropReason.UNDECODABLE]
    assert len(strategy.drop_reasons) == 3  # the same, as text for the logs and metrics


def test_error_replies_zero_examples_and_silent_nodes_are_dropped(task_identity):
    strategy = _strategy()
    msgs = _configure(strategy)
    crashed = Message(Error(code=1, reason="CUDA out of memory"), reply_to=msgs[0])
    zero = _reply(msgs[1], _weights(1.0), examples=0)
    good = _reply(msgs[2], _weights(2.0), partition=2)
    new, metrics = strategy.aggregate_train(1, [crashed, zero, good])  # msgs[3]'s node never answers
    assert metrics["dropped"] == 3 and metrics["clients"] == 1
    assert np.allclose(record_to_weights(new)["b"], 2.0)
    assert [(d.node, d.reason) for d in strategy.drops] == [
        (NODES[3], DropReason.NO_REPLY), (NODES[0], DropReason.CLIENT_ERROR), (NODES[1], DropReason.BAD_METRICS)
    ]
    assert "CUDA out of memory" in strategy.drops[1].detail  # the client's own error text is passed on


def test_no_usable_reply_leaves_the_model_alone(task_identity):
    strategy = _strategy()
    msgs = _configure(strategy)
    new, metrics = strategy.aggregate_train(1, [Message(Error(code=1, reason="x"), reply_to=m) for m in msgs])
    assert new is None and metrics["dropped"] == 4 and metrics["clients"] == 0


def test_aggregate_does_not_depend_on_reply_order(task_identity):
    rng = np.random.default_rng(5)
    updates = [{k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()} for _ in NODES]
    results = []
    for order in ([0, 1, 2, 3], [3, 1, 0, 2]):
        strategy = _strategy()
        msgs = _configure(strategy)
        replies = [_reply(msgs[i], updates[i], examples=7 + i, partition=i) for i in order]
        new, _ = strategy.aggregate_train(1, replies)
        results.append(record_to_weights(new))
    assert all(np.array_equal(results[0][k], results[1][k]) for k in SHAPES)


def test_sampling_is_seeded_and_respects_fraction(task_identity):
    a = [m.metadata.dst_node_id for m in _configure(_strategy(fraction=0.5, seed=3), rnd=2)]
    b = [m.metadata.dst_node_id for m in _configure(_strategy(fraction=0.5, seed=3), rnd=2)]
    assert a == b and len(a) == 2 and set(a) <= set(NODES)


def test_waiting_for_nodes_times_out_with_the_fix(task_identity):
    strategy = _strategy()
    with pytest.raises(NotEnoughNodes) as err:
        list(strategy.configure_train(1, weights_to_record(_weights()), ConfigRecord({}), FakeGrid([1, 2])))
    assert (err.value.connected, err.value.needed) == (2, 4) and "clients=2" in str(err.value)  # names the fix
