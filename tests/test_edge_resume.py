"""kill -9 an edge daemon in the middle of a round; restarted, it resumes its stream exactly where it was.

A TLS + node-auth deployment on loopback (:class:`LocalDeployment`) of two
edge daemons training StreamSplit (``model = "streamsplit"``) for three rounds:
client-0 reads a watched folder of WAV files (22.05 kHz stereo: resampled and
mixed down), client-1 the generated stream. While client-0's ClientApp holds
a round's windows (an open lease in its spool), the daemon and everything it
started (SuperNode, ClientApp) are frozen and killed with SIGKILL, as a power
loss or an OOM kill of its cgroup would; then the daemon is started again on
the same state directory. Checked from the durable state (``edge.db``)
afterwards:

- the killed round's lease was released at the restart and the next round
  took the same windows (no skip); the committed leases tile the stream from
  sample 0 without a gap or an overlap (no window trained on twice), and each
  one's SHA-256 is that of the source's samples at that place;
- every file was read once: the samples ingested are exactly those of the
  files, decoded once each (no re-read after the restart);
- the run completed all its rounds, client-0 took part again after the kill,
  and its error-feedback residuals are in its state.

A second, lighter test kills a daemon in the middle of its stream (its
buffer full, a file half read; no SuperLink needed) and checks that the
restarted one reads exactly the rest.

Every process is stopped by PID.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
from helpers import QFL, REPO

from qfl.clients.daemon import is_running, marked_processes, read_status
from qfl.clients.edge.frontend import SAMPLE_RATE, read_audio
from qfl.clients.edge.spool import StreamSpool, to_pcm
from qfl.clients.edge.stream import SyntheticStream
from qfl.errors import DeploymentError
from qfl.server.deployment import LocalDeployment

pytestmark = pytest.mark.deployment
WAIT_S = 600.0  # per wait; a healthy round takes well under a minute on a loaded 2-core machine
ROUNDS = 3
WINDOWS = 8  # per round and node, of 1 s
EDGE = {"model": "streamsplit", "security": "none", "codec": "sign", "edge_blocks": 4, "edge_windows": WINDOWS,
        "edge_batch": 4, "edge_split": "static", "edge_components": 8, "edge_virtual_negatives": 16,
        "edge_probe_windows": 20, "timeout_s": 120.0}
FILES = 4  # of 7 s: 28 s of audio, enough for every round of client-0 (24 s)


def _write_files(folder: Path, count: int = FILES, seconds: float = 7.0) -> list[Path]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(4)
    paths = []
    for i in range(count):
        rate = 22050
        t = np.arange(int(seconds * rate)) / rate
        left = 0.2 * np.sin(2 * np.pi * (200 + 150 * i) * t) + 0.02 * rng.standard_normal(len(t))
        path = folder / f"clip-{i}.wav"
        soundfile.write(path, np.stack([left, 0.5 * left], axis=1).astype(np.float32), rate)
        os.utime(path, (1_000_000 + i, 1_000_000 + i))  # the order the folder source takes them in
        paths.append(path)
    return paths


def _freeze_and_check(pids: list[int], spool_dir: Path) -> dict | None:
    """SIGSTOP ``pids``; the open lease if the kill would land mid-round, else SIGCONT and None."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    with StreamSpool(spool_dir) as spool:
        lease = spool.summary()["open_lease"]
    if lease is None:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    return lease


def _kill_mid_round(dep: LocalDeployment, state: Path) -> dict:
    """Wait until client-0's ClientApp holds a lease before the last round, then SIGKILL the daemon and every
    process it started (by PID), frozen first so that the lease is still open when they die."""
    daemon = dep.procs["edge-0"]
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        status = read_status(state)
        lease = status["stream"]["open_lease"]
        if lease is not None and lease["round"] < ROUNDS:
            tree = [daemon.pid, *marked_processes(status["marker"])]
            frozen = _freeze_and_check(tree, state)
            if frozen is not None:
                for pid in tree:
                    os.kill(pid, signal.SIGKILL)
                daemon.wait(timeout=30)
                for _ in range(50):  # by PID, until none of its processes is left
                    left = [p for p in marked_processes(status["marker"]) if is_running(p)]
                    if not left:
                        return frozen
                    for pid in left:
                        os.kill(pid, signal.SIGKILL)
                    time.sleep(0.2)
                raise AssertionError(f"processes of the killed daemon survived SIGKILL: {left}")
        if dep.rounds_completed() >= ROUNDS - 1:
            break
        time.sleep(0.1)
    raise AssertionError(f"client-0 held no lease before round {ROUNDS} ({dep.rounds_completed()} rounds done)")


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    out = tmp_path_factory.mktemp("edge-resume")
    files = _write_files(out / "audio")
    dep = LocalDeployment(out / "dep", nodes=2, rounds=ROUNDS, tls=True, run_config=EDGE,
                          node_data={0: str(out / "audio")}, startup_timeout_s=180.0)
    seen: dict = {"files": files}
    try:
        dep.up()
        run_id = dep.submit()
        seen["killed"] = _kill_mid_round(dep, dep.daemon_state(0))
        dep.start_daemon(0)
        seen["status"] = dep.wait_run(run_id, WAIT_S)
    except DeploymentError as err:
        seen["error"] = str(err)
    finally:
        left = dep.stop()
        dep.write_summary(seen.get("status", "failed"))
    yield dep, seen, left


def _check_ledger(spool: StreamSpool, pcm: bytes) -> list[dict]:
    """The committed leases tile ``[0, consumed)`` in order, each with the SHA-256 of ``pcm`` there."""
    committed = spool.ledger("committed")
    position = 0
    for lease in committed:
        assert lease["start"] == position, committed  # no gap, no overlap
        assert lease["sha256"] == hashlib.sha256(pcm[2 * lease["start"] : 2 * lease["end"]]).hexdigest()
        position = lease["end"]
    assert spool.summary()["consumed_samples"] == position
    return committed


def test_the_run_completes_and_every_process_is_stopped(resumed) -> None:
    dep, seen, left = resumed
    assert "error" not in seen, seen.get("error")
    assert seen["status"] == "finished:completed"
    assert not left, f"processes survived SIGKILL: {left}"
    history = json.loads((dep.run_dir / "metrics.json").read_text())
    assert [r["round"] for r in history] == list(range(1, ROUNDS + 1))
    killed_round = seen["killed"]["round"]
    assert history[killed_round - 1]["clients"] <= 1  # the killed node's round went on without it


def test_the_killed_daemon_resumes_its_stream_without_rereading_or_skipping(resumed) -> None:
    dep, seen, _ = resumed
    assert "error" not in seen, seen.get("error")
    killed = seen["killed"]
    source = np.concatenate([read_audio(path) for path in seen["files"]])
    pcm = to_pcm(source)
    with StreamSpool(dep.daemon_state(0)) as spool:
        ledger = spool.ledger()
        committed = _check_ledger(spool, pcm)
        summary = spool.summary()
        assert summary["ingested_samples"] == len(source)  # every file read once, none again after the restart
        assert spool.done_files() == {path.name for path in seen["files"]}
    released = [lease for lease in ledger if lease["state"] == "released"]
    assert [(r["round"], r["start"], r["end"]) for r in released] == [(killed["round"], killed["start"], killed["end"])]
    after = [lease for lease in committed if lease["round"] > killed["round"]]
    assert after and after[0]["start"] == killed["start"]  # the next round trained on the killed round's windows
    assert all(lease["end"] - lease["start"] == WINDOWS * SAMPLE_RATE for lease in committed)
    shown = subprocess.run([*QFL, "edge", "status", "--state", str(dep.daemon_state(0)), "--json"], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)  # what `qfl edge status` shows of the stream
    assert status["last_lease"]["round"] == ROUNDS and "codec-state" in status["stream"]["records"]
    assert status["stream"]["rounds_committed"] == len(committed) and status["stream"]["open_lease"] is None
    assert status["stream"]["buffered_s"] == pytest.approx((len(source) - committed[-1]["end"]) / SAMPLE_RATE)
    log = [json.loads(line) for line in (dep.daemon_state(0) / "edge.log").read_text().splitlines()]
    assert [e["released_leases"] for e in log if e["event"] == "stream resumed"] == [0, 1]


def test_the_generated_stream_is_consumed_in_order_too(resumed) -> None:
    dep, seen, _ = resumed
    assert "error" not in seen, seen.get("error")
    with StreamSpool(dep.daemon_state(1)) as spool:
        made = spool.position()["windows"]
        waves, _ = SyntheticStream(seed=0).windows(1, 2, 0, made)
        committed = _check_ledger(spool, to_pcm(waves.reshape(-1)))
    assert [lease["round"] for lease in committed] == list(range(1, ROUNDS + 1))


def _edge_run(state: Path, data: Path, buffer_s: float) -> subprocess.Popen:
    """`qfl edge run` toward a SuperLink that is not there (its SuperNode keeps retrying): the ingest alone."""
    return subprocess.Popen([*QFL, "edge", "run", "--superlink", "127.0.0.1:1", "--insecure", "--state", str(state),
                             "--data", str(data), "--buffer", str(buffer_s), "--flower-retries", "1",
                             "--backoff-base", "0.5", "--backoff-cap", "2"],
                            cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _wait_for(what: str, ready, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + WAIT_S
    while not ready():
        assert proc.poll() is None, f"the daemon exited with {proc.returncode} while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _stream(state: Path) -> tuple[int, dict, int]:
    """(samples ingested, source position, files done) of a daemon's state; zeros before it has one."""
    if not (state / "edge.db").is_file():
        return 0, {}, 0
    with StreamSpool(state) as spool:
        return spool.summary()["ingested_samples"], spool.position(), len(spool.done_files())


def _stop_all(daemon: subprocess.Popen, markers: list[str]) -> list[int]:
    """SIGTERM the daemon (it drains its SuperNode); SIGKILL, by PID, whatever any of its daemons left."""
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
    left: list[int] = []
    for _ in range(50):
        left = [p for marker in markers for p in marked_processes(marker) if is_running(p)]
        if not left:
            break
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    return left


def test_a_daemon_killed_mid_stream_reads_on_without_rereading_or_skipping(tmp_path: Path) -> None:
    """kill -9 a daemon while its folder holds more audio than it has read (its buffer is full, the current file
    half read); restarted with a larger buffer, it reads exactly the rest: the stream is the files' samples."""
    files = _write_files(tmp_path / "audio", count=2, seconds=25.0)  # read in 10 s chunks
    expected = to_pcm(np.concatenate([read_audio(path) for path in files]))
    state = tmp_path / "state"
    markers: list[str] = []
    daemon = _edge_run(state, tmp_path / "audio", buffer_s=15.0)
    try:
        _wait_for("15 s of audio read", lambda: _stream(state)[0] >= 15 * SAMPLE_RATE, daemon)
        markers.append(read_status(state)["marker"])
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.wait(timeout=30)
        ingested, position, _ = _stream(state)
        assert not position["done"] and position["offset"] > 0  # killed in the middle of a file
        assert ingested < len(expected) // 2
        daemon = _edge_run(state, tmp_path / "audio", buffer_s=60.0)  # it stops the SuperNode the killed one left
        _wait_for("every file read", lambda: _stream(state)[2] == len(files), daemon)
        markers.append(read_status(state)["marker"])
        with StreamSpool(state) as spool:
            assert spool.summary()["ingested_samples"] == len(expected) // 2
            assert spool._read(0, len(expected) // 2) == expected  # no sample read twice, none skipped
    finally:
        left = _stop_all(daemon, markers)
    assert daemon.returncode == 0 and not left
