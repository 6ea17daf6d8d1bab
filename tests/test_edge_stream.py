"""An edge daemon's data (``qfl edge run --data``) and durable state, without processes.

The stream spool (leases committed or released, in stream order), the three
sources (generated, watched folder, named pipe) resuming after an interrupted
ingest without re-reading or skipping samples, ``edge_state_mod`` committing
a round's windows with the node's records and restoring them into a fresh
SuperNode's ``context.state``, a real StreamSplit round on leased windows, and
the secure-aggregation log surviving a restart (a second unmask request for
the same round is refused).
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict

from qfl.clients import app as client_app
from qfl.clients import secure as client_secure
from qfl.clients.daemon import (
    MIXTURE_STATE,
    PERSISTED_RECORDS,
    STATE_KEY,
    EdgeConfig,
    dump_record,
    edge_state_mod,
    load_record,
    read_status,
)
from qfl.clients.edge.frontend import SAMPLE_RATE, read_audio
from qfl.clients.edge.ingest import FILE_CHUNK_S, FolderSource, GeneratedSource, PipeSource, describe
from qfl.clients.edge.spool import StreamSpool, from_pcm, to_pcm
from qfl.clients.edge.stream import SyntheticStream
from qfl.errors import EdgeDataError, EdgeDataReason

WINDOW = 1600  # 0.1 s windows keep the spool tests small
RUN = 2**64 - 5  # Flower's run IDs are unsigned 64-bit


def _tone(seconds: float, rate: int, channels: int, freq: float) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    mono = 0.3 * np.sin(2 * np.pi * freq * t)
    return np.stack([mono * (0.5 + 0.5 * c) for c in range(channels)], axis=1).astype(np.float32)


def _all_audio(spool: StreamSpool) -> np.ndarray:
    """Every sample the spool ingested (nothing consumed yet)."""
    total = spool.summary()["ingested_samples"]
    return from_pcm(spool._read(0, total))


# --------------------------------------------------------------------------- the spool


def test_leases_commit_and_release_in_stream_order(tmp_path: Path) -> None:
    spool = StreamSpool(tmp_path)
    audio = np.random.default_rng(0).uniform(-0.5, 0.5, 10 * WINDOW).astype(np.float32)
    for part in np.array_split(audio, 7):  # chunks that do not align with windows
        spool.append(to_pcm(part), {"kind": "test"})
    expected = from_pcm(to_pcm(audio))

    first = spool.lease(run_id=RUN, server_round=1, window=WINDOW, windows=4, multiple=2)
    assert (first.start, first.end, first.first_window) == (0, 4 * WINDOW, 0)
    np.testing.assert_array_equal(first.audio, expected[: 4 * WINDOW])
    again = spool.lease(run_id=RUN, server_round=1, window=WINDOW, windows=4, multiple=2)  # the same message twice
    assert (again.start, again.end) == (first.start, first.end)
    assert spool.release() == 1  # a kill before the reply: the windows are buffered again, first in line
    retry = spool.lease(run_id=RUN, server_round=2, window=WINDOW, windows=4, multiple=2)
    assert (retry.start, retry.end) == (0, 4 * WINDOW)
    committed = spool.commit(RUN, 2, {"codec-state": ("array", b"x")})
    assert committed is not None and committed.end == 4 * WINDOW
    assert spool.records() == {"codec-state": ("array", b"x")}

    # an open lease of a round the server has left behind is released by the next round's lease
    spool.lease(run_id=RUN, server_round=3, window=WINDOW, windows=4, multiple=2)
    later = spool.lease(run_id=RUN, server_round=4, window=WINDOW, windows=5, multiple=2)
    assert (later.start, later.end) == (4 * WINDOW, 8 * WINDOW)  # 4 of 5: a multiple of the batch
    np.testing.assert_array_equal(later.audio, expected[4 * WINDOW : 8 * WINDOW])
    spool.commit(RUN, 4, {})
    with pytest.raises(EdgeDataError) as err:  # 2 windows left, fewer than one batch of 3
        spool.lease(run_id=RUN, server_round=5, window=WINDOW, windows=4, multiple=3)
    assert err.value.reason is EdgeDataReason.NOT_ENOUGH_AUDIO

    committed_leases = spool.ledger("committed")
    assert [(c["round"], c["start"], c["end"]) for c in committed_leases] == [(2, 0, 4 * WINDOW), (4, 4 * WINDOW, 8 * WINDOW)]
    assert [c["round"] for c in spool.ledger("released")] == [1, 3]
    assert {c["run_id"] for c in spool.ledger()} == {RUN}
    summary = spool.summary()
    assert summary["consumed_samples"] == 8 * WINDOW and summary["buffered_s"] == pytest.approx(2 * WINDOW / SAMPLE_RATE)
    assert summary["open_lease"] is None and summary["rounds_committed"] == 2
    # consumed chunks are dropped; the buffered ones are whole
    np.testing.assert_array_equal(from_pcm(spool._read(8 * WINDOW, 10 * WINDOW)), expected[8 * WINDOW :])
    pcm = to_pcm(audio)
    assert committed_leases[1]["sha256"] == hashlib.sha256(pcm[8 * WINDOW : 16 * WINDOW]).hexdigest()
    spool.close()


def test_data_names_a_source_or_says_why_not(tmp_path: Path) -> None:
    assert describe("generated") == "generated" and describe("-") == "stdin" and describe(str(tmp_path)) == "folder"
    fifo = tmp_path / "pcm"
    os.mkfifo(fifo)
    assert describe(str(fifo)) == "pipe"
    with pytest.raises(EdgeDataError) as missing:
        describe(str(tmp_path / "nowhere"))
    assert missing.value.reason is EdgeDataReason.NO_SUCH_SOURCE
    (tmp_path / "one.wav").write_bytes(b"")
    with pytest.raises(EdgeDataError) as regular:
        EdgeConfig(superlink="127.0.0.1:1", state_dir=tmp_path / "s", insecure=True, data=str(tmp_path / "one.wav"))
    assert regular.value.reason is EdgeDataReason.NOT_A_SOURCE


# --------------------------------------------------------------------------- the sources


def test_generated_source_resumes_at_its_position(tmp_path: Path) -> None:
    stream = SyntheticStream(seed=3)
    spool = StreamSpool(tmp_path)
    GeneratedSource(stream, 1, 2).step(spool)
    GeneratedSource(stream, 1, 2).step(spool)  # a new source (a restarted daemon) continues from the position
    made = spool.position()["windows"]
    waves, _ = stream.windows(1, 2, 0, made)
    np.testing.assert_array_equal(_all_audio(spool), from_pcm(to_pcm(waves.reshape(-1))))
    spool.close()


def test_folder_source_reads_each_file_once_resampled_to_16k_mono(tmp_path: Path) -> None:
    folder = tmp_path / "audio"
    folder.mkdir()
    soundfile.write(folder / "a.wav", _tone(FILE_CHUNK_S * 2.5, 8000, 2, 440), 8000)  # stereo, 8 kHz, 3 chunks
    soundfile.write(folder / "b.flac", _tone(1.3, 16000, 1, 880), 16000)
    (folder / "c.wav").write_bytes(b"not audio")
    for i, name in enumerate(("a.wav", "b.flac", "c.wav")):  # oldest first
        os.utime(folder / name, (1_000_000 + i, 1_000_000 + i))
    (folder / "notes.txt").write_text("ignored")
    spool = StreamSpool(tmp_path / "state")
    source = FolderSource(folder, settle_s=0.0)
    assert source.step(spool) and source.step(spool)  # two of a.wav's three chunks; then the daemon dies
    assert spool.position() == {"kind": "folder", "file": "a.wav", "offset": int(2 * FILE_CHUNK_S * SAMPLE_RATE),
                                "done": False}
    source = FolderSource(folder, settle_s=0.0)  # restarted: decodes a.wav again, continues at the offset
    while source.step(spool):
        pass
    expected = np.concatenate([read_audio(folder / "a.wav"), read_audio(folder / "b.flac")])
    assert len(expected) == int(FILE_CHUNK_S * 2.5 * SAMPLE_RATE) + int(1.3 * SAMPLE_RATE)
    np.testing.assert_array_equal(_all_audio(spool), from_pcm(to_pcm(expected)))
    assert spool.done_files() == {"a.wav", "b.flac", "c.wav"}  # c.wav: recorded unreadable, never read again
    assert not FolderSource(folder, settle_s=0.0).step(spool)  # nothing new
    soundfile.write(folder / "d.wav", _tone(0.5, 44100, 1, 300), 44100)  # a new file arrives
    assert FolderSource(folder, settle_s=0.0).step(spool)
    assert spool.summary()["ingested_samples"] == len(expected) + len(read_audio(folder / "d.wav"))
    spool.close()


def test_pipe_source_keeps_odd_bytes_and_reopens_for_a_new_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "pcm"
    os.mkfifo(fifo)
    pcm = to_pcm(np.random.default_rng(1).uniform(-0.9, 0.9, 50_001).astype(np.float32))
    parts = [pcm[:12_345], pcm[12_345:70_001], pcm[70_001:]]  # odd sizes; two writers one after the other

    def write(chunks: list[bytes]) -> None:
        with open(fifo, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
                fh.flush()

    spool = StreamSpool(tmp_path / "state")
    source = PipeSource(fifo)
    for chunks in (parts[:2], parts[2:]):
        writer = threading.Thread(target=write, args=(chunks,))
        writer.start()
        want = pcm.index(chunks[-1]) + len(chunks[-1])
        for _ in range(500):
            if spool.position().get("bytes", 0) >= want:
                break
            source.step(spool)
        writer.join(timeout=30)
        assert spool.position()["bytes"] == want
        source.close()
        source = PipeSource(fifo)  # a restarted daemon: the odd byte it had read is in the position
        if chunks is parts[:2]:
            assert spool.position()["carry"] != ""
    source.close()
    assert spool.position()["bytes"] == len(pcm) and spool.position()["carry"] == ""
    np.testing.assert_array_equal(_all_audio(spool), from_pcm(pcm))
    spool.close()


def test_stdin_source_reads_until_its_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    read_end, write_end = os.pipe()
    monkeypatch.setattr("sys.stdin", os.fdopen(read_end, "rb"))
    pcm = to_pcm(np.linspace(-0.5, 0.5, 30_000, dtype=np.float32))
    os.write(write_end, pcm[:-1])  # an odd byte count first
    os.write(write_end, pcm[-1:])
    os.close(write_end)
    spool = StreamSpool(tmp_path)
    source = PipeSource(None)
    for _ in range(100):
        if source.ended:
            break
        source.step(spool)
    assert source.ended and spool.position() == {"kind": "stdin", "bytes": len(pcm), "carry": ""}
    np.testing.assert_array_equal(_all_audio(spool), from_pcm(pcm))
    spool.close()


# --------------------------------------------------------------------------- the ClientApp side


def test_records_round_trip() -> None:
    arrays = ArrayRecord({"w/residual": Array(np.arange(6, dtype=np.float32).reshape(2, 3)),
                          "b/p": Array(np.zeros(0, np.float64))})
    back = load_record(*dump_record(arrays))
    assert isinstance(back, ArrayRecord) and set(back) == {"w/residual", "b/p"}
    np.testing.assert_array_equal(back["w/residual"].numpy(), arrays["w/residual"].numpy())
    config = ConfigRecord({"round": 3, "clips": [0.5, 1.0], "mode": "masked-sum", "blob": b"\x00\xff", "blobs": [b"a", b"b"]})
    again = load_record(*dump_record(config))
    assert isinstance(again, ConfigRecord) and dict(again) == dict(config)


def _context(state_dir: Path, node_id: int = 7) -> Context:
    return Context(run_id=RUN, node_id=node_id, node_config={STATE_KEY: str(state_dir), "partition-id": 0,
                                                            "num-partitions": 1}, state=RecordDict(), run_config={})


def _train_msg(server_round: int) -> Message:
    return Message(RecordDict({"config": ConfigRecord({"server-round": server_round})}), dst_node_id=7,
                   message_type=MessageType.TRAIN)


def test_state_mod_commits_a_round_with_its_records_and_releases_a_failed_one(tmp_path: Path, task_identity) -> None:
    with StreamSpool(tmp_path) as spool:
        spool.append(to_pcm(np.zeros(8 * WINDOW, np.float32)), {"kind": "test"})

    def trains(residual: float, fail: Exception | None = None, error: bool = False):
        def handler(msg: Message, context: Context) -> Message:
            with StreamSpool(tmp_path) as spool:
                spool.lease(context.run_id, 1 + residual.__floor__(), WINDOW, 4, multiple=2)
            context.state["codec-state"] = ArrayRecord({"w/residual": Array(np.full(3, residual, np.float32))})
            if fail is not None:
                raise fail
            if error:
                return Message(Error(code=1, reason="KmsUnavailable: no KME"), reply_to=msg)
            return Message(RecordDict(), reply_to=msg)
        return handler

    context = _context(tmp_path)
    assert not edge_state_mod(_train_msg(1), context, trains(0.0)).has_error()
    failed = edge_state_mod(_train_msg(2), context, trains(1.0, fail=RuntimeError("boom")))
    assert failed.has_error() and failed.error.reason.startswith("RuntimeError")
    sat_out = edge_state_mod(_train_msg(3), context, trains(2.0, error=True))
    assert sat_out.has_error()
    status = read_status(tmp_path)
    assert status["last_sit_out"]["round"] == 3 and status["last_lease"]["round"] == 1
    stream = status["stream"]
    assert stream["consumed_samples"] == 4 * WINDOW and stream["open_lease"] is None
    with StreamSpool(tmp_path) as spool:
        assert [(c["round"], c["start"]) for c in spool.ledger("committed")] == [(1, 0)]
        assert [(c["round"], c["start"]) for c in spool.ledger("released")] == [(2, 4 * WINDOW), (3, 4 * WINDOW)]

    # A fresh SuperNode (empty context.state): the records come back before the handler runs.
    seen = {}

    def looks(msg: Message, context: Context) -> Message:
        seen.update({name: context.state[name] for name in PERSISTED_RECORDS if name in context.state})
        return Message(RecordDict(), reply_to=msg)

    edge_state_mod(Message(RecordDict(), dst_node_id=7, message_type=MessageType.EVALUATE), _context(tmp_path), looks)
    assert set(seen) == {"codec-state"}
    np.testing.assert_array_equal(seen["codec-state"]["w/residual"].numpy(), np.full(3, 2.0, np.float32))


def test_a_reply_whose_windows_cannot_be_committed_is_withheld(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             task_identity) -> None:
    import sqlite3

    with StreamSpool(tmp_path) as spool:
        spool.append(to_pcm(np.zeros(4 * WINDOW, np.float32)), {"kind": "test"})

    def trains(msg: Message, context: Context) -> Message:
        with StreamSpool(tmp_path) as spool:
            spool.lease(context.run_id, 1, WINDOW, 4)
        return Message(RecordDict({"update": ArrayRecord()}), reply_to=msg)

    def locked(*args: object) -> None:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(StreamSpool, "commit", locked)
    reply = edge_state_mod(_train_msg(1), _context(tmp_path), trains)
    assert reply.has_error()  # the update is not sent
    monkeypatch.undo()
    with StreamSpool(tmp_path) as spool:
        assert spool.summary()["consumed_samples"] == 0 and spool.summary()["open_lease"]["round"] == 1


EDGE_RUN = {"model": "streamsplit", "security": "none", "codec": "sign", "edge_blocks": 4, "edge_windows": 16,
            "edge_batch": 8, "edge_split": "static", "edge_components": 8, "edge_virtual_negatives": 16,
            "edge_probe_windows": 20, "clients": 1}


def test_a_daemon_node_trains_streamsplit_on_its_own_stream(tmp_path: Path, task_identity) -> None:
    """The real ClientApp on a daemon's node: a round trains on the leased windows (not the run's stream),
    commits them, and keeps the error-feedback residuals and the device's mixture in the daemon's state."""
    from qfl.clients.edge.task import EdgeTask
    from qfl.compression import encode_update, make_codec
    from qfl.config import resolve_config

    cfg = resolve_config(EDGE_RUN)
    source = GeneratedSource(SyntheticStream(seed=9), 0, 1)
    with StreamSpool(tmp_path) as spool:
        while spool.buffered() < 20 * SAMPLE_RATE:
            source.step(spool)
    weights = EdgeTask(cfg).initial_weights()
    arrays = encode_update(weights, make_codec(cfg.downlink_codec, cfg.downlink_codec_params))
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({**cfg.to_flat(), "server-round": 1})})
    msg = Message(content, dst_node_id=7, message_type=MessageType.TRAIN)
    context = _context(tmp_path)
    reply = client_app.app(msg, context)
    assert not reply.has_error(), reply.error.reason
    assert reply.content.metric_records["metrics"]["num-examples"] == 16
    status = read_status(tmp_path)
    assert status["last_lease"] == {"run_id": RUN, "round": 1, "start": 0, "end": 16 * SAMPLE_RATE}
    assert status["stream"]["consumed_samples"] == 16 * SAMPLE_RATE
    assert {"codec-state", MIXTURE_STATE} <= set(status["stream"]["records"])
    with StreamSpool(tmp_path) as spool:
        mixture = load_record(*spool.records()[MIXTURE_STATE])
    assert isinstance(mixture, ArrayRecord) and set(mixture) == {k for k in weights if k.startswith("gmm.")}


# --------------------------------------------------------------------------- secure aggregation across a restart


def test_a_restarted_node_refuses_a_second_unmask_request_for_the_round(tmp_path: Path, task_identity) -> None:
    """Flower's context.state dies with the SuperNode; on a daemon's node the secagg log is restored from the
    daemon's state, so a lying server cannot ask the restarted node again for the same round."""
    import test_secure_round as rounds

    strategy, flat, _ = rounds._strategy(tmp_path)
    grid = rounds.FakeGrid(rounds.N)
    for node_id, context in grid.contexts.items():
        context.node_config[STATE_KEY] = str(tmp_path / f"node-{node_id}")
    handlers = {**rounds.HANDLERS, MessageType.TRAIN: lambda m, c: edge_state_mod(m, c, rounds._train_through_mod)}
    saved = rounds.HANDLERS.copy()
    rounds.HANDLERS.update(handlers)  # queries go through client_app.app, whose outermost mod is edge_state_mod
    try:
        _, metrics = rounds._round(strategy, flat, grid)
        assert metrics["clients"] == rounds.N
        reveal_to_0 = next(msg for kind, pid, msg in grid.sent if kind == client_secure.REVEAL and pid == 0)
        restarted = Context(run_id=1, node_id=100, node_config=dict(grid.contexts[100].node_config), state=RecordDict(),
                            run_config={})
        grid.contexts[100] = restarted  # the SuperNode was restarted: Flower's per-node state is gone
        again = grid.deliver(reveal_to_0)
        assert again.has_error() and again.error.reason.startswith("SecAggError")
        assert client_secure._log(restarted) == (1, 1)  # refused by the restored log: answered round 1
        train_to_0 = next(msg for kind, pid, msg in grid.sent if kind == MessageType.TRAIN and pid == 0)
        second = grid.deliver(train_to_0)  # nor does it upload twice in the round
        assert second.has_error() and second.error.reason.startswith("SecAggError")
    finally:
        rounds.HANDLERS.clear()
        rounds.HANDLERS.update(saved)
