"""Error feedback telescopes, and per-client codec state survives between rounds."""

import numpy as np
import pytest

from qfl.clients.state import CODEC_STATE
from qfl.compression import EncodeContext, decode_update, encode_update, make_codec
from qfl.compression.feedback import RESIDUAL, ErrorFeedback


@pytest.mark.parametrize("name, params", [("sign", {}), ("topk", {"ratio": 0.05}), ("powersgd", {"rank": 1})])
def test_error_feedback_telescopes_in_float64(name, params):
    codec = make_codec(name, params)
    assert isinstance(codec, ErrorFeedback) and codec.traits.stateful
    rng = np.random.default_rng(0)
    ctx = EncodeContext(seed=1, state={})
    shape = (8, 12)
    sent = np.zeros(shape, np.float64)
    inputs = np.zeros(shape, np.float64)
    for _ in range(25):
        x = rng.standard_normal(shape).astype(np.float32)
        inputs += x
        sent += codec.decode(codec.encode(x, ctx))
    assert np.allclose(sent + ctx.state[RESIDUAL], inputs, rtol=0, atol=1e-9)
    # and error feedback is what makes this small: without it, the sum drifts
    assert np.abs(ctx.state[RESIDUAL]).max() < np.abs(inputs).max() + 10


def test_feedback_can_be_turned_off():
    assert not make_codec("sign", {"feedback": False}).traits.stateful
    assert make_codec("qsgd", {"feedback": True}).traits.stateful


def test_update_states_are_kept_per_tensor():
    codec = make_codec("sign")
    states: dict = {}
    update = {"a": np.ones(4, np.float32), "b": -np.ones(3, np.float32)}
    record = encode_update(update, codec, round_seed=3, states=states)
    assert set(states) == {"a", "b"} and all(RESIDUAL in s for s in states.values())
    decoded = decode_update(record, codec, {"a": (4,), "b": (3,)})
    assert np.allclose(decoded["a"] + states["a"][RESIDUAL], 1.0)


def test_client_state_round_trips_through_the_flower_context():
    from flwr.app import Context, RecordDict

    from qfl.clients.state import load_in_memory, save_in_memory

    context = Context(run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config={})
    states = {"conv.weight": {RESIDUAL: np.arange(6.0).reshape(2, 3)}, "fc/bias": {"q": np.ones((3, 1))}}
    save_in_memory(context, states)
    loaded = load_in_memory(context)
    assert set(loaded) == set(states)
    assert np.array_equal(loaded["conv.weight"][RESIDUAL], states["conv.weight"][RESIDUAL])
    assert np.array_equal(loaded["fc/bias"]["q"], states["fc/bias"]["q"])


def test_state_files_give_each_round_the_state_of_the_last_round_before_it(tmp_path):
    """A resume re-runs round r: it must see the state as of r − 1, not what an interrupted r left."""
    from qfl.clients.state import CodecStateFiles

    files = CodecStateFiles(tmp_path, partition=3)
    assert files.load(1) == ({}, None)
    state = {"w": {RESIDUAL: np.arange(4, dtype=np.float32)}}
    for rnd in (2, 5, 7):
        files.save(rnd, {"w": {RESIDUAL: state["w"][RESIDUAL] + rnd}})
    loaded, at = files.load(7)  # round 7 again, after a kill during it
    assert at == 5 and np.array_equal(loaded["w"][RESIDUAL], state["w"][RESIDUAL] + 5)
    assert loaded["w"][RESIDUAL].dtype == np.float32
    assert files.load(9)[1] == 7 and files.load(3)[1] is None  # round 2 is gone: nothing resumes before 5
    files.save(7, {"w": {RESIDUAL: state["w"][RESIDUAL]}})  # the re-run replaces the interrupted file
    assert sorted(p.name for p in (tmp_path / "3").iterdir()) == ["5.npz", "7.npz"]


def test_the_run_config_moves_the_state_to_files_except_on_an_edge_daemon(tmp_path):
    from flwr.app import Context, RecordDict

    from qfl.clients.state import NODE_STATE_DIR, state_files

    plain = Context(run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config={})
    assert state_files(plain, "", 0) is None
    assert state_files(plain, str(tmp_path / "run"), 4).dir == tmp_path / "run" / "4"
    daemon = Context(run_id=1, node_id=2, node_config={NODE_STATE_DIR: str(tmp_path / "node")}, state=RecordDict(),
                     run_config={})
    assert state_files(daemon, str(tmp_path / "run"), 4) is None  # the daemon commits context.state with its rounds


@pytest.mark.parametrize("where", ["memory", "files"])
def test_client_app_keeps_error_feedback_between_rounds(task_identity, tmp_path, where):
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

    from qfl.clients import app as client
    from qfl.clients.classical import model_shapes
    from qfl.config import resolve_config
    from qfl.server.federation import CentralEvaluator

    state_dir = str(tmp_path) if where == "files" else ""
    cfg = resolve_config({"codec": "topk", "codec.ratio": 0.05, "clients": 4, "local_epochs": 1, "security": "none",
                          "client_state_dir": state_dir})
    weights = CentralEvaluator(cfg).initial_weights()
    context = Context(run_id=1, node_id=2, node_config={"partition-id": 1, "num-partitions": 4},
                      state=RecordDict(), run_config={})
    residuals = []
    for rnd in (1, 2):
        config = ConfigRecord({**cfg.to_flat(), "server-round": rnd})
        arrays = encode_update(weights, make_codec("fp32"))
        msg = Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=2, message_type=MessageType.TRAIN)
        reply = client.train(msg, context)
        decoded = decode_update(reply.content["update"], make_codec("topk", {"ratio": 0.05}), model_shapes(cfg))
        states = client.load_codec_state(context, cfg, 1, rnd + 1)
        assert set(states) == set(weights)
        residuals.append({k: s[RESIDUAL].copy() for k, s in states.items()})
        # what was sent plus what is kept equals the residual carried in plus this round's update
        assert all(np.count_nonzero(v) <= max(1, int(np.ceil(0.05 * v.size))) for v in decoded.values())
    assert any(not np.array_equal(residuals[0][k], residuals[1][k]) for k in weights)
    assert (CODEC_STATE in context.state) == (where == "memory")  # on disk, nothing stays in the node's memory


def test_a_failed_encode_leaves_the_residual_as_it_was():
    from qfl.compression.codec import Codec

    class InnerFailed(RuntimeError):
        pass

    class Failing(Codec):
        name, codec_id, traits = "failing", 250, make_codec("sign", {"feedback": False}).traits

        def encode(self, x, ctx=None):
            raise InnerFailed

        def decode(self, payload):
            raise AssertionError("not reached")

    codec = make_codec("sign")
    ctx = EncodeContext(state={})
    codec.encode(np.arange(6, dtype=np.float32), ctx)
    before = ctx.state[RESIDUAL].copy()
    with pytest.raises(InnerFailed):
        ErrorFeedback(Failing()).encode(np.ones(6, np.float32), ctx)
    assert np.array_equal(ctx.state[RESIDUAL], before)


def test_a_read_only_residual_from_a_record_is_copied_not_written():
    codec = make_codec("sign")
    residual = np.linspace(-1, 1, 6)
    residual.flags.writeable = False
    ctx = EncodeContext(state={RESIDUAL: residual})
    x = np.ones(6, np.float32)
    sent = codec.decode(codec.encode(x, ctx))
    assert np.array_equal(residual, np.linspace(-1, 1, 6))
    assert np.allclose(sent + ctx.state[RESIDUAL], residual + x, rtol=0, atol=1e-12)
