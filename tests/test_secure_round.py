"""SecureFedAvg's masked round in memory: the server workflow against qfl's real client half
(the ClientApp's secagg_mod: hello, setup, masked train reply, unmask) over a fake Grid and a real key store, without Ray.

Checks: an honest double-masked round opens the exact mean and prices its key by use; single
masking never asks for the pair masks of a received upload; a client answers one unmask
request per round and uploads once; every hostile field a client can send drops that
client with a reason and never raises out of ``aggregate_train``.
"""

import math

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from qfl.clients import app as client_app
from qfl.clients import secure as client_secure
from qfl.compression import encode_update, make_codec
from qfl.config import resolve_config
from qfl.errors import SecAggError, SecAggReason
from qfl.server.key_budget import KeyBudget
from qfl.server.optimizers import make_server_optimizer
from qfl.server.preflight import check_components
from qfl.server.secure import HELLO, REVEAL, SETUP, DropReason, FailReason, secure_strategy
from qfl.server.strategy import record_to_weights, weights_to_record

SHAPES = {"w": (4, 5), "b": (3,)}
N = 6


def _delta(pid):
    rng = np.random.default_rng(100 + pid)
    return {k: rng.uniform(-0.5, 0.5, s).astype(np.float32) for k, s in SHAPES.items()}


def _fake_train(msg, context):
    """The app's train handler for a fixed Δ per partition (no local training), keeping the app/mod contract:
    the raw Δ when the mod asks for it (a masked mode), else the fp32 codec payload."""
    pid = int(context.node_config["partition-id"])
    metrics = MetricRecord({"num-examples": 10, "train-loss": 0.5 + pid, "partition-id": pid})
    if client_secure.wants_raw_delta(msg):
        record = {client_secure.RAW_DELTA: client_secure.raw_delta_record(_delta(pid))}
    else:
        record = {"update": encode_update(_delta(pid), make_codec("fp32"))}
    return Message(RecordDict({**record, "metrics": metrics}), reply_to=msg)


def _train_through_mod(msg, context):
    """A train message through qfl's secagg_mod, wrapped around the fake train handler."""
    return client_secure.secagg_mod(msg, context, _fake_train)


HANDLERS = {  # the queries go through the real ClientApp (its secagg_mod answers them)
    HELLO: client_app.app,
    SETUP: client_app.app,
    REVEAL: client_app.app,
    MessageType.TRAIN: _train_through_mod,
}


class FakeGrid:
    """Routes each message to the real client handler of its node; ``faults[(type, pid)](msg, reply)``
    may replace a reply (None: no reply)."""

    def __init__(self, n, faults=None, forge=None):
        self.contexts = {
            100 + p: Context(run_id=1, node_id=100 + p, node_config={"partition-id": p, "num-partitions": n},
                             state=RecordDict(), run_config={})
            for p in range(n)
        }
        self.faults = faults or {}
        self.forge = forge or {}  # (type, pid) -> msg -> the message the client gets instead
        self.sent: list[tuple[str, int, Message]] = []

    def get_node_ids(self):
        return sorted(self.contexts)

    def deliver(self, msg):
        context = self.contexts[msg.metadata.dst_node_id]
        try:
            return HANDLERS[msg.metadata.message_type](msg, context)
        except Exception as err:  # noqa: BLE001 -- Flower turns a raising ClientApp into an error reply
            return Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg)

    def send_and_receive(self, messages, timeout=None):
        out = []
        for msg in messages:
            pid = self.contexts[msg.metadata.dst_node_id].node_config["partition-id"]
            self.sent.append((msg.metadata.message_type, pid, msg))
            forge = self.forge.get((msg.metadata.message_type, pid))
            reply = self.deliver(forge(msg) if forge else msg)
            hook = self.faults.get((msg.metadata.message_type, pid))
            reply = hook(msg, reply) if hook else reply
            if reply is not None:
                out.append(reply)
        return out


def _strategy(tmp_path, **values):
    cfg = check_components(resolve_config({
        "security": "masked-sum", "codec": "fp32", "clients": N, "qkd_rate": 1e8, "key_policy": "wait",
        "fed_eval": False, "secure_clip": 1.0, **values,
    }))
    budget = KeyBudget(cfg, tmp_path)
    strategy = secure_strategy(
        codec=make_codec(cfg.codec, cfg.codec_params), downlink_codec=make_codec("fp32"), shapes=SHAPES,
        optimizer=make_server_optimizer(cfg), min_nodes=N, wait_timeout=1, cfg=cfg, budget=budget,
        round_seed=lambda r: r,
    )
    flat = {**cfg.to_flat(), "key_store": str(budget.store_path)}
    return strategy, flat, budget


def _drops(strategy):
    """(partition id, DropReason) of every client the masked round left out, in order."""
    return [(d.pid, d.reason) for d in strategy.drops]


def _round(strategy, flat, grid, rnd=1):
    weights = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    messages = list(strategy.configure_train(rnd, weights_to_record(weights), ConfigRecord(dict(flat)), grid))
    new, metrics = strategy.aggregate_train(rnd, grid.send_and_receive(messages))
    return (record_to_weights(new) if new is not None else None), metrics


def _mean(pids):
    return {k: np.mean([_delta(p)[k] for p in pids], axis=0) for k in SHAPES}


def _sent(grid, kind):
    return sorted(pid for t, pid, _ in grid.sent if t == kind)


def test_an_honest_double_masked_round_opens_the_mean_and_prices_its_key(tmp_path, task_identity):
    strategy, flat, _ = _strategy(tmp_path)
    grid = FakeGrid(N)
    new, metrics = _round(strategy, flat, grid)
    assert metrics["clients"] == N and metrics["dropped"] == 0 and strategy.drop_reasons == []
    expected = _mean(range(N))
    assert all(np.abs(new[k] - expected[k]).max() < 1e-6 for k in SHAPES)
    assert math.isclose(metrics["train-loss"], 0.5 + 2.5)
    assert _sent(grid, REVEAL) == list(range(N))  # double masking always unmasks
    # the key split adds up to the ledger (a mesh, nothing lost): pair keys of 15 pairs + 12 server MAC keys
    plan = strategy.masked.plan
    split = strategy.key_split
    pairs = N * (N - 1) // 2
    assert split.pair_masks == 8 * pairs * plan.upload_bytes()
    assert split.share_pads == 8 * pairs * 2 * plan.share_bytes()
    assert split.macs == 8 * 16 * (2 * pairs + 2 * N)
    assert split.pair_masks + split.share_pads + split.macs == metrics["key-bits-used"]


def test_a_crash_and_a_tampered_upload_are_dropped_and_never_unmasked(tmp_path, task_identity):
    def crash(msg, reply):
        return Message(Error(code=0, reason="client crashed (test)"), reply_to=msg)

    def flip(msg, reply):
        data = bytearray(reply.content["update"]["masked"].data)
        data[3] ^= 0x10
        reply.content["update"] = ArrayRecord({"masked": Array(dtype="uint8", shape=(len(data),), stype="x",
                                                               data=bytes(data))})
        return reply

    strategy, flat, _ = _strategy(tmp_path)
    grid = FakeGrid(N, {(MessageType.TRAIN, 1): crash, (MessageType.TRAIN, 4): flip})
    new, metrics = _round(strategy, flat, grid)
    assert metrics["clients"] == 4 and metrics["dropped"] == 2
    expected = _mean([0, 2, 3, 5])
    assert all(np.abs(new[k] - expected[k]).max() < 1e-6 for k in SHAPES)
    assert _drops(strategy) == [(1, DropReason.CLIENT_ERROR), (4, DropReason.BAD_SEAL)]
    assert len(strategy.drop_reasons) == 2  # the same, as text for the logs and metrics
    # the unmask requests list 4 as dropped and carry no share of b_4 (nor of b_1)
    for kind, _pid, msg in grid.sent:
        if kind == REVEAL:
            sec = msg.content["secagg"]
            assert sec["dropped"] == [1, 4] and not {1, 4} & set(sec["share-from"])


def test_single_masking_never_asks_for_the_pair_masks_of_a_received_upload(tmp_path, task_identity):
    def flip(msg, reply):
        data = bytearray(reply.content["update"]["masked"].data)
        data[0] ^= 1
        reply.content["update"] = ArrayRecord({"masked": Array(dtype="uint8", shape=(len(data),), stype="x",
                                                               data=bytes(data))})
        return reply

    strategy, flat, _ = _strategy(tmp_path, secure_masking="single")
    grid = FakeGrid(N, {(MessageType.TRAIN, 2): flip})
    new, metrics = _round(strategy, flat, grid)
    assert new is None and metrics["clients"] == 0
    assert _sent(grid, REVEAL) == []  # nobody was asked for anything
    assert _drops(strategy) == [(2, DropReason.BAD_SEAL)]
    assert strategy.masked.outcome.fail_reason is FailReason.SINGLE_MASKING_RECEIVED
    # a client that sent nothing is different: its pair masks are revealed and the round opens
    strategy, flat, _ = _strategy(tmp_path / "b", secure_masking="single")
    grid = FakeGrid(N, {(MessageType.TRAIN, 2): lambda msg, reply: None})
    new, metrics = _round(strategy, flat, grid)
    assert metrics["clients"] == N - 1 and _sent(grid, REVEAL) == [0, 1, 3, 4, 5]
    expected = _mean([0, 1, 3, 4, 5])
    assert all(np.abs(new[k] - expected[k]).max() < 1e-6 for k in SHAPES)
    assert strategy.key_split.share_pads == 0


def test_a_client_answers_one_unmask_request_and_uploads_once_per_round(tmp_path, task_identity):
    strategy, flat, _ = _strategy(tmp_path)
    grid = FakeGrid(N)
    _round(strategy, flat, grid)
    reveal_to_0 = next(msg for kind, pid, msg in grid.sent if kind == REVEAL and pid == 0)
    again = grid.deliver(reveal_to_0)
    assert again.has_error() and "already answered an unmask request for round 1" in again.error.reason
    # a different story the second time (0's peer 3 "dropped") is refused just the same
    lie = ConfigRecord({**dict(reveal_to_0.content["secagg"]), "survivors": [0, 1, 2, 4, 5], "dropped": [3]})
    msg = Message(RecordDict({"config": reveal_to_0.content["config"], "secagg": lie}), dst_node_id=100,
                  message_type=REVEAL)
    assert "already answered" in grid.deliver(msg).error.reason
    train_to_0 = next(msg for kind, pid, msg in grid.sent if kind == MessageType.TRAIN and pid == 0)
    assert "refusing a second upload" in grid.deliver(train_to_0).error.reason


def test_a_client_refuses_a_request_that_breaks_the_rules(tmp_path, task_identity):
    def lie(msg):  # too few survivors for t = 3: a server fishing for pair masks
        sec = ConfigRecord({**dict(msg.content["secagg"]), "survivors": [0, 1, 2], "dropped": [3, 4, 5]})
        return Message(RecordDict({"config": msg.content["config"], "secagg": sec}), dst_node_id=100,
                       message_type=REVEAL)

    strategy, flat, _ = _strategy(tmp_path)
    grid = FakeGrid(N, forge={(REVEAL, 0): lie})
    _, metrics = _round(strategy, flat, grid)
    assert _drops(strategy) == [(0, DropReason.NO_UNMASK)]
    assert metrics["clients"] == N  # nobody dropped: the other five survivors hold t shares of every self-mask


def _hostile_train(kind):
    def hook(msg, reply):
        c = reply.content
        if kind == "tag-int":
            c["seal"] = ConfigRecord({"key-id": c["seal"]["key-id"], "tag": 10**12})
        elif kind == "key-id-list":
            c["seal"] = ConfigRecord({"key-id": ["a", "b"], "tag": c["seal"]["tag"]})
        elif kind == "no-seal":
            del c["seal"]
        elif kind == "two-arrays":
            arr = c["update"]["masked"]
            c["update"] = ArrayRecord({"masked": arr, "extra": arr})
        elif kind == "short-shares":
            arr = c["shares"]["ciphers"]
            c["shares"] = ArrayRecord({"ciphers": Array(dtype="uint8", shape=(3,), stype="x", data=bytes(arr.data)[:3]),
                                       "tags": c["shares"]["tags"]})
        elif kind == "no-shares":
            del c["shares"]
        else:  # a metric
            field, value = kind
            metrics = MetricRecord({})
            metrics.__dict__["_data"].update({**dict(c["metrics"]), field: value})
            c["metrics"] = metrics
        return reply
    return hook


HOSTILE = ["tag-int", "key-id-list", "no-seal", "two-arrays", "short-shares", "no-shares",
           ("num-examples", float("nan")), ("num-examples", 10**30), ("num-examples", "7"),
           ("train-loss", float("inf")), ("train-loss", [1.0])]


@pytest.mark.parametrize("kind", HOSTILE, ids=str)
def test_a_hostile_upload_drops_only_that_client(tmp_path, task_identity, kind):
    strategy, flat, _ = _strategy(tmp_path)
    grid = FakeGrid(N, {(MessageType.TRAIN, 3): _hostile_train(kind)})
    new, metrics = _round(strategy, flat, grid)
    assert metrics["clients"] == N - 1 and metrics["dropped"] == 1
    expected = _mean([0, 1, 2, 4, 5])
    assert all(np.abs(new[k] - expected[k]).max() < 1e-6 for k in SHAPES)
    (drop,) = strategy.drops
    assert drop.pid == 3


@pytest.mark.parametrize("kind", ["garbage-body", "tag-int", "error"])
def test_a_hostile_unmask_reply_is_ignored_when_the_others_suffice(tmp_path, task_identity, kind):
    def hook(msg, reply):
        if kind == "error":
            return Message(Error(code=0, reason="x" * 10_000), reply_to=msg)
        rec = dict(reply.content["reveal"])
        rec.update({"body": b"\xff" * 11} if kind == "garbage-body" else {"tag": 10**12})
        reply.content["reveal"] = ConfigRecord(rec)
        return reply

    strategy, flat, _ = _strategy(tmp_path)
    grid = FakeGrid(N, {(REVEAL, 2): hook})
    new, metrics = _round(strategy, flat, grid)
    # nobody dropped, so 2's reply only carried shares: the other 4 survivors give t = 3 shares of each b_k
    assert metrics["clients"] == N
    expected = _mean(range(N))
    assert all(np.abs(new[k] - expected[k]).max() < 1e-6 for k in SHAPES)
    assert _drops(strategy) == [(2, DropReason.NO_UNMASK)]
    (reason,) = strategy.drop_reasons
    assert len(reason) < 500  # a client's long error text is cut short


@pytest.mark.parametrize("claim", ["7", 99, -1, float("nan"), "dup"])
def test_a_bad_partition_id_leaves_that_node_out(tmp_path, task_identity, claim):
    def hook(msg, reply):
        metrics = MetricRecord({})
        metrics.__dict__["_data"]["partition-id"] = 4 if claim == "dup" else claim
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    strategy, flat, _ = _strategy(tmp_path)
    grid = FakeGrid(N, {(HELLO, 5): hook})
    new, metrics = _round(strategy, flat, grid)
    left_out = [5] if claim != "dup" else [4, 5]  # two nodes claiming one partition: neither is trusted
    assert metrics["clients"] == N - len(left_out)
    assert not set(left_out) & set(_sent(grid, MessageType.TRAIN))
    assert len(strategy.drop_reasons) == len(left_out)
    expected = _mean([p for p in range(N) if p not in left_out])
    assert all(np.abs(new[k] - expected[k]).max() < 1e-6 for k in SHAPES)


def test_too_few_self_mask_shares_leave_the_model_unchanged_with_the_reason(tmp_path, task_identity):
    silent = {(REVEAL, p): (lambda msg, reply: None) for p in (0, 1, 2)}  # half the survivors never answer
    strategy, flat, _ = _strategy(tmp_path)
    grid = FakeGrid(N, silent)
    new, metrics = _round(strategy, flat, grid)
    assert new is None and metrics["clients"] == 0
    assert strategy.masked.outcome.fail_reason is FailReason.UNMASK_FAILED  # only 2 of the 3 shares of a self-mask
    assert _drops(strategy) == [(p, DropReason.NO_UNMASK) for p in (0, 1, 2)]


# --------------------------------------------------------------------------- secagg_mod on its own


def _keep_replies(replies):
    """Keep what each reply carried as it left the node (the server lets go of records it has parsed)."""
    def hook(msg, reply):
        replies.append(RecordDict(dict(reply.content.items())))
        return reply
    return hook


@pytest.mark.parametrize("masking", ["double", "single"])
def test_the_masked_reply_leaving_the_mod_never_carries_the_raw_delta(tmp_path, task_identity, masking):
    replies: list[RecordDict] = []
    strategy, flat, _ = _strategy(tmp_path, secure_masking=masking)
    grid = FakeGrid(N, {(MessageType.TRAIN, p): _keep_replies(replies) for p in range(N)})
    new, _ = _round(strategy, flat, grid)
    assert all(np.abs(new[k] - _mean(range(N))[k]).max() < 1e-6 for k in SHAPES)
    assert len(replies) == N
    for content in replies:
        pid = int(content["metrics"]["partition-id"])
        expected = {"update", "seal", "metrics"} | ({"shares"} if masking == "double" else set())
        assert set(content.keys()) == expected and client_secure.RAW_DELTA not in content.array_records
        sent = b"".join(bytes(a.data) for rec in content.array_records.values() for a in rec.values())
        assert all(bytes(np.ascontiguousarray(v).data) not in sent for v in _delta(pid).values())
    # the mark is the mod's own: it never stays on (or travels with) the server's message
    assert not any(client_secure.RAW_DELTA_MARK in m.content.config_records for _, _, m in grid.sent)


def test_the_server_lets_go_of_the_self_mask_shares_once_the_round_is_done(tmp_path, task_identity):
    """At 100 participants the shares are ~1 GB a round; the server must not keep a copy per stage."""
    kept: list[Message] = []

    def keep(msg, reply):
        kept.append(reply)
        return reply
    strategy, flat, _ = _strategy(tmp_path)
    grid = FakeGrid(N, {(MessageType.TRAIN, p): keep for p in range(N)})
    _round(strategy, flat, grid)
    assert len(kept) == N and all("shares" not in reply.content for reply in kept)
    assert strategy.masked is not None and strategy.masked.uploads == {}


def test_a_mod_that_cannot_mask_replies_with_an_error_not_the_delta(tmp_path, task_identity):
    strategy, flat, _ = _strategy(tmp_path)
    grid = FakeGrid(N)
    _round(strategy, flat, grid)
    train_to_0 = next(msg for kind, pid, msg in grid.sent if kind == MessageType.TRAIN and pid == 0)
    calls = []

    def app_train(msg, context):
        calls.append(msg)
        return _fake_train(msg, context)

    # a node that never took part in the key setup trains, then lacks its pair keys: an error reply, no Δ
    fresh = Context(run_id=1, node_id=100, node_config={"partition-id": 0, "num-partitions": N},
                    state=RecordDict(), run_config={})
    reply = client_secure.secagg_mod(train_to_0, fresh, app_train)
    assert len(calls) == 1 and reply.has_error() and not reply.has_content()
    # a handler that answers a masked round with a codec payload instead of Δ: refused, not forwarded
    fresh = Context(run_id=1, node_id=100, node_config={"partition-id": 0, "num-partitions": N},
                    state=RecordDict(), run_config={})

    def codec_train(msg, context):
        return Message(RecordDict({"update": encode_update(_delta(0), make_codec("fp32"))}), reply_to=msg)

    reply = client_secure.secagg_mod(train_to_0, fresh, codec_train)
    assert reply.has_error() and "no 'delta' record" in reply.error.reason


def test_channel_pad_is_a_transport_step_of_the_mod(tmp_path, task_identity):
    replies: list[RecordDict] = []
    strategy, flat, _ = _strategy(tmp_path, security="channel-pad")
    grid = FakeGrid(N, {(MessageType.TRAIN, p): _keep_replies(replies) for p in range(N)})
    new, metrics = _round(strategy, flat, grid)
    assert metrics["clients"] == N
    assert all(np.abs(new[k] - _mean(range(N))[k]).max() < 1e-6 for k in SHAPES)
    for content in replies:
        assert set(content.keys()) == {"update", "seal", "metrics"}
        assert all(a.stype.endswith(client_secure.PADDED_SUFFIX) for a in content["update"].values())


def _plain_message(message_type, secagg=None):
    content = RecordDict({"config": ConfigRecord({"server-round": 1})})
    if secagg is not None:
        content["secagg"] = ConfigRecord(secagg)
    return Message(content, dst_node_id=100, message_type=message_type)


@pytest.mark.parametrize("message_type,secagg", [(MessageType.TRAIN, None), (MessageType.TRAIN, {"mode": "none"}),
                                                 (MessageType.EVALUATE, None), ("query.other", None)])
def test_the_mod_passes_other_messages_through_untouched(task_identity, message_type, secagg):
    msg = _plain_message(message_type, secagg)
    before = msg.content.object_id
    context = Context(run_id=1, node_id=100, node_config={"partition-id": 0, "num-partitions": N},
                      state=RecordDict(), run_config={})
    seen = []
    answer = Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)

    def app(m, c):
        seen.append((m, c))
        return answer

    assert client_secure.secagg_mod(msg, context, app) is answer
    assert seen == [(msg, context)] and msg.content.object_id == before and len(context.state) == 0


def test_the_mod_refuses_a_forged_mark_and_a_raw_delta_in_the_clear(task_identity):
    context = Context(run_id=1, node_id=100, node_config={"partition-id": 0, "num-partitions": N},
                      state=RecordDict(), run_config={})
    forged = _plain_message(MessageType.TRAIN, {"mode": "none"})
    forged.content[client_secure.RAW_DELTA_MARK] = ConfigRecord({"by": "server"})
    reply = client_secure.secagg_mod(forged, context, lambda m, c: pytest.fail("the app must not run"))
    assert reply.has_error() and "only secagg_mod sets it" in reply.error.reason

    def leaky(m, c):
        return Message(RecordDict({client_secure.RAW_DELTA: client_secure.raw_delta_record(_delta(0))}), reply_to=m)

    reply = client_secure.secagg_mod(_plain_message(MessageType.TRAIN), context, leaky)
    assert reply.has_error() and not reply.has_content()


def test_the_client_app_routes_the_workflow_queries_to_its_mod(task_identity):
    assert (client_secure.HELLO, client_secure.SETUP, client_secure.REVEAL) == (HELLO, SETUP, REVEAL)
    context = Context(run_id=1, node_id=100, node_config={"partition-id": 3, "num-partitions": N},
                      state=RecordDict(), run_config={})
    reply = client_app.app(Message(RecordDict({}), dst_node_id=100, message_type=HELLO), context)
    assert reply.content["metrics"]["partition-id"] == 3
    # without the mod the registered endpoint only raises
    with pytest.raises(SecAggError) as err:
        client_secure._answered_by_mod(Message(RecordDict({}), dst_node_id=100, message_type=HELLO), context)
    assert err.value.reason is SecAggReason.SETUP  # the message says: install secagg_mod


def test_a_pinned_node_refuses_the_setup_before_it_takes_a_key(tmp_path, task_identity):
    # the node pins double masking (clients/secure.py NodePins); a lying server asks it for single
    strategy, flat, budget = _strategy(tmp_path, secure_masking="single")
    grid = FakeGrid(N)
    pinned = grid.contexts[100]
    grid.contexts[100] = Context(run_id=1, node_id=100, node_config={**pinned.node_config, "secure-masking": "double"},
                                 state=RecordDict(), run_config={})
    new, metrics = _round(strategy, flat, grid)
    assert metrics["clients"] == N - 1 and new is not None
    assert [(d.pid, d.reason) for d in strategy.drops] == [(0, DropReason.SETUP_FAILED)]
    assert len(grid.contexts[100].state) == 0  # no pair key taken, nothing stored
    assert 0 in _sent(grid, SETUP) and 0 not in _sent(grid, MessageType.TRAIN)
    expected = _mean(range(1, N))
    assert all(np.abs(new[k] - expected[k]).max() < 1e-6 for k in SHAPES)
