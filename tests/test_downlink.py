"""downlink_mode = "delta": compressed model deltas against the clients' replica, exact on both ends."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from helpers import run_killed_after_round, run_qfl

from qfl.compression import encode_update, make_codec
from qfl.compression.downlink import (
    DELTA,
    FULL,
    SAME,
    SYNC_RECORD,
    DownlinkReplica,
    client_replica,
    make_downlink_codec,
    weights_digest,
)
from qfl.config import RunConfig, build_config
from qfl.errors import ConfigError, DownlinkOutOfSync
from qfl.server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from qfl.server.optimizers import make_server_optimizer
from qfl.server.strategy import QflFedAvg, weights_to_record

SHAPES = {"w": (20, 30), "b": (30,)}


def _weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def _codec_for(version: int):
    return make_downlink_codec("stc", {"ratio": 0.05}, "delta", seed=version)


class Node:
    """A client's side: what it keeps between messages."""

    def __init__(self, initial):
        self.initial, self.held = initial, None

    def receive(self, message):
        self.held = client_replica(message.config(), message.arrays, self.held, lambda: self.initial,
                                   _codec_for(message.version), SHAPES)
        return self.held


def _deliver(replica, nodes, ids):
    modes = {}
    for message in replica.messages(ids):
        for i in message.nodes:
            nodes[i].receive(message)
            modes[i] = message.mode
    return modes


def test_clients_and_server_agree_bit_for_bit_and_the_replica_carries_the_residual():
    initial = _weights(0)
    replica = DownlinkReplica(_codec_for, initial)
    nodes = {i: Node(initial) for i in range(3)}
    w = {k: v.copy() for k, v in initial.items()}
    for t in range(1, 9):
        w = {k: v + 0.1 * _weights(t)[k] for k, v in w.items()}
        replica.sync(w)
        ids = [0, 1] if t == 4 else [0, 1, 2]  # node 2 misses round 4
        modes = _deliver(replica, nodes, ids)
        assert modes[0] == DELTA
        if t == 5:
            assert modes[2] == FULL  # it holds version 3, the delta builds on 4
        for i in ids:
            version, held = nodes[i].held
            assert version == replica.version == t
            assert all(np.array_equal(held[k], replica.replica[k]) for k in SHAPES)
    # what C held back is still in w − r: small against the total movement, never dropped
    moved = sum(float(np.abs(w[k] - initial[k]).sum()) for k in SHAPES)
    left = sum(float(np.abs(w[k] - replica.replica[k]).sum()) for k in SHAPES)
    assert 0 < left < moved
    # an evaluate message after the sync: nothing new to send
    assert _deliver(replica, nodes, [0]) == {0: SAME}


def test_a_sync_towards_the_same_weights_is_not_repeated():
    replica = DownlinkReplica(_codec_for, _weights(0))
    w = _weights(1)
    replica.sync(w)
    replica.sync({k: v.copy() for k, v in w.items()})
    assert replica.version == 1


def test_out_of_sync_clients_raise_and_are_sent_the_full_replica_next():
    initial = _weights(0)
    replica = DownlinkReplica(_codec_for, initial)
    replica.sync(_weights(1))
    (message,) = replica.messages([7])
    assert message.mode == DELTA
    wrong = {k: v + 1 for k, v in initial.items()}  # a node whose replica differs
    with pytest.raises(DownlinkOutOfSync):
        client_replica(message.config(), message.arrays, (0, wrong), lambda: initial, _codec_for(1), SHAPES)
    with pytest.raises(DownlinkOutOfSync):  # another version than the delta builds on
        client_replica(message.config(), message.arrays, (5, initial), lambda: initial, _codec_for(1), SHAPES)
    replica.forget([7])
    (message,) = replica.messages([7])
    assert message.mode == FULL
    version, held = client_replica(message.config(), message.arrays, (0, wrong), lambda: initial, _codec_for(1), SHAPES)
    assert version == 1 and weights_digest(held) == weights_digest(replica.replica)


def test_resume_restores_the_replica_bit_for_bit(tmp_path):
    def run(rounds, replica):
        payloads = []
        for t in range(1, rounds + 1):
            replica.sync({k: v * (1 + 0.01 * t) + 0.1 * _weights(t)[k] for k, v in _weights(0).items()})
            payloads.append(b"".join(bytes(a.data) for a in replica.delta.values()))
        return payloads

    straight = DownlinkReplica(_codec_for, _weights(0))
    expected = run(6, straight)
    first = DownlinkReplica(_codec_for, _weights(0))
    run(3, first)
    save_checkpoint(tmp_path, Checkpoint(3, _weights(0), {}, [], first.state_arrays()))
    resumed = DownlinkReplica(_codec_for, _weights(0))
    resumed.load_state_arrays(load_checkpoint(tmp_path).downlink_state)
    assert resumed.version == 3 and all(np.array_equal(resumed.replica[k], first.replica[k]) for k in SHAPES)
    assert resumed.messages([1])[0].mode == FULL  # node versions are not kept: one full sync each
    payloads = []
    for t in range(4, 7):
        resumed.sync({k: v * (1 + 0.01 * t) + 0.1 * _weights(t)[k] for k, v in _weights(0).items()})
        payloads.append(b"".join(bytes(a.data) for a in resumed.delta.values()))
    assert payloads == expected[3:]
    assert all(np.array_equal(resumed.replica[k], straight.replica[k]) for k in SHAPES)


def test_the_strategy_counts_each_message_and_forgets_failed_nodes(task_identity):
    from test_strategy import FakeGrid

    initial = _weights(0)
    strategy = QflFedAvg(
        codec=make_codec("fp32"), downlink_codec=make_codec("fp32"), shapes=SHAPES,
        optimizer=make_server_optimizer(RunConfig()), min_nodes=3, wait_timeout=1,
        downlink=DownlinkReplica(_codec_for, initial),
    )
    grid = FakeGrid([1, 2, 3])
    msgs = list(strategy.configure_train(1, weights_to_record(_weights(1)), ConfigRecord({}), grid))
    assert {m.content.config_records[SYNC_RECORD]["mode"] for m in msgs} == {DELTA}
    delta_bytes = sum(len(a.data) for a in strategy.downlink.delta.values())
    assert strategy.downlink_bytes == 3 * (delta_bytes + 12)
    replies = [Message(RecordDict({"update": encode_update({k: np.zeros(s, np.float32) for k, s in SHAPES.items()},
                                                           make_codec("fp32")),
                                   "metrics": MetricRecord({"num-examples": 5, "partition-id": i})}), reply_to=m)
               for i, m in enumerate(msgs[:2])]
    replies.append(Message(Error(code=0, reason="replica out of sync"), reply_to=msgs[2]))
    strategy.aggregate_train(1, replies)
    msgs = list(strategy.configure_train(2, weights_to_record(_weights(2)), ConfigRecord({}), grid))
    modes = {m.metadata.dst_node_id: m.content.config_records[SYNC_RECORD]["mode"] for m in msgs}
    assert modes == {1: DELTA, 2: DELTA, 3: FULL}


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["downlink_mode=delta", "downlink_codec=stc", "security=masked-sum"], "downlink_mode"),
        (["downlink_codec=stc"], "downlink_codec"),  # stateful by default: model mode refuses it
        (["downlink_mode=delta", "downlink_codec=stc", "downlink_codec.feedback=true", "security=none"], "downlink_codec"),
        (["downlink_mode=delta", "downlink_codec=stc", "downlink_codec.momentum=0.9", "security=none"], "downlink_codec"),
        (["downlink_mode=sideways"], "downlink_mode"),
        # error feedback through the replica needs a contractive codec: these diverge (README, frontier)
        (["downlink_mode=delta", "downlink_codec=ternary", "downlink_codec.entropy=zstd", "security=none"], "downlink_codec"),
        (["downlink_mode=delta", "downlink_codec=qsgd", "security=none"], "downlink_codec"),
        (["downlink_mode=delta", "downlink_codec=randk", "security=none"], "downlink_codec"),
    ],
)
def test_bad_downlink_settings_are_config_errors(overrides, key):
    from qfl.server.preflight import preflight

    with pytest.raises(ConfigError) as err:
        preflight(build_config(overrides=overrides))
    assert err.value.key == key


DOWN = ["--set", "clients=3", "--set", "security=none", "--set", "downlink_mode=delta", "--set", "downlink_codec=stc",
        "--set", "downlink_codec.ratio=0.05", "--set", "alpha=1.0", "--set", "seed=3"]
DELTA_RUN = [*DOWN, "--set", "codec=stc", "--set", "codec.ratio=0.05"]


def test_a_delta_downlink_run_keeps_every_client_in_sync(tmp_path):
    result = run_qfl(["run", "--out", str(tmp_path), "--set", "rounds=2", *DELTA_RUN])
    assert result.returncode == 0, result.stdout[-4000:]
    history = json.loads((tmp_path / "metrics.json").read_text())
    fp32_model = 4 * 38282
    for r in history:
        assert r["dropped"] == 0 and r["clients"] == 3, r["drop_reasons"]
        assert 0 < r["downlink_bytes"] < 3 * fp32_model / 20
        assert r["eval_downlink_bytes"] == 3 * 12  # evaluate messages: "same", version and digest only
    assert history[-1]["fed_accuracy"] is not None


@pytest.mark.slow
def test_resume_after_kill_in_delta_mode_matches_uninterrupted_run(tmp_path):
    # a stateless uplink codec: the clients' own error-feedback residuals do not survive a restart
    settings = ["--set", "rounds=6", *DOWN, "--set", "codec=qsgd", "--set", "codec.bits=2"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_qfl(["run", "--out", str(straight), *settings]).returncode == 0
    interrupted_at = run_killed_after_round(killed, settings, after_round=2, timeout=240)
    assert 2 <= interrupted_at < 6
    assert run_qfl(["run", "--resume", str(killed)]).returncode == 0
    a, b = load_checkpoint(straight), load_checkpoint(killed)
    for name in a.weights:
        assert np.array_equal(a.weights[name], b.weights[name]), name
    assert a.downlink_state.keys() == b.downlink_state.keys()
    for name in a.downlink_state:
        assert np.array_equal(a.downlink_state[name], b.downlink_state[name]), name
    assert [r["accuracy"] for r in a.history] == [r["accuracy"] for r in b.history]
