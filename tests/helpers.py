"""Shared test helpers: whole simulations in child processes, and the codes a masked upload carries."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QFL = [sys.executable, "-m", "qfl"]


def run_qfl(args: list[str], timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `qfl ARGS` in its own process group; kill the whole group on timeout."""
    proc = subprocess.Popen(
        QFL + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd or REPO,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as err:
        kill_group(proc)
        out, _ = proc.communicate()
        raise AssertionError(f"qfl {' '.join(args)} timed out after {timeout}s:\n{out[-4000:]}") from err
    finally:
        kill_group(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group of ``proc`` (Ray workers included), if any is left."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_killed_after_round(out: Path, args: list[str], after_round: int, timeout: float) -> int:
    """Start `qfl run --out OUT ARGS`, SIGKILL it (Ray workers included) once its checkpoint holds
    ``after_round``; return the round the checkpoint holds after the kill."""
    import time

    from qfl.server.checkpoint import load_checkpoint

    proc = subprocess.Popen(QFL + ["run", "--out", str(out), *args], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ckpt = load_checkpoint(out) if (out / "checkpoint.npz").exists() else None
            if ckpt is not None and ckpt.round >= after_round:
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
        kill_group(proc)
        proc.wait(timeout=60)
    finally:
        kill_group(proc)
    return load_checkpoint(out).round


def ctrl_c_after_round(out: Path, args: list[str], after_round: int, timeout: float) -> tuple[int, str, list[int]]:
    """Start `qfl ARGS` (a run writing into OUT), and once OUT's checkpoint holds ``after_round`` send SIGINT to
    its whole process group, as a terminal's Ctrl-C does. Return its exit status, its output, and the PIDs of
    the processes it had started (Ray's GCS, raylet, workers) that are still alive after it exited."""
    import time

    import psutil

    from qfl.server.checkpoint import load_checkpoint

    log = out.with_name(out.name + ".out")
    with log.open("w") as fh:
        proc = subprocess.Popen(QFL + args, cwd=REPO, start_new_session=True, stdout=fh, stderr=subprocess.STDOUT)
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + timeout
        while not ((out / "checkpoint.npz").exists() and load_checkpoint(out).round >= after_round):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.05)
        children = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, signal.SIGINT)
        status = proc.wait(timeout=timeout)
        alive = []
        for child in children:
            try:
                if child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
                    alive.append(child.pid)
            except psutil.NoSuchProcess:
                pass
        return status, log.read_text(), alive
    finally:
        kill_group(proc)
        for child in children:
            try:
                child.kill()
            except psutil.Error:
                pass


def ring_codes(plan, delta, seed):
    """The codes and flags a client's masked upload carries before any mask, with its rounding drawn
    from rng(seed) as ``secagg.masked_upload`` draws it."""
    import numpy as np

    rng = np.random.default_rng(seed)
    parts, flags = [], []
    for name, clip in zip(plan.tensors, plan.clips):
        codes, over, under = plan.codec.encode_ring(delta[name], clip, plan.seed(name), rng)
        parts.append(codes)
        flags += [over, under]
    return np.concatenate([*parts, np.asarray(flags, dtype=np.uint64)])
