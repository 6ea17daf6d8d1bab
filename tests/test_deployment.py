"""The Flower deployment engine on loopback: a real SuperLink, two SuperNodes, `flwr run`.

Unlike the simulation tests, this one starts the processes a user starts by
hand (``flower-superlink``, ``flower-supernode`` and the ``flwr`` CLI, all from
this interpreter's environment), runs the app of this repository for two rounds
through them, and checks the ``runs/*/metrics.json`` the ServerApp writes in
the SuperLink's working directory.

Everything the processes write (state database, FLWR_HOME, logs, the run
directory) lies under pytest's ``tmp_path``; every process is started in its
own session, and every process carries a per-test marker in its environment,
so that the ``finally`` block can stop each of them, and each process that
they spawned (SuperExec, ``flwr-serverapp``, ``flwr-clientapp``, which Flower
starts partly in sessions of their own), by PID.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path

import pytest

APP_DIR = Path(__file__).resolve().parents[1]
BIN_DIR = Path(sys.executable).parent  # the venv's bin/, where flwr's scripts live
CONNECTION = "qfl-deployment-test"
pytestmark = pytest.mark.deployment  # one loopback deployment at a time (tests/conftest.py)
# Flower's SuperLink accepts --run-config keys only if [tool.flwr.app.config]
# declares them; the resolved config.toml of the run is checked below.
RUN_CONFIG = {"rounds": 2, "clients": 2, "fed_eval": True, "alpha": 1.0, "security": "masked-sum"}
EXPECTED_CONFIG = dict(RUN_CONFIG)
NUM_SUPERNODES = 2
OVERALL_TIMEOUT_S = 240.0  # the whole test; a healthy run takes about a minute on 2 cores
STARTUP_TIMEOUT_S = 60.0  # SuperLink listening / a SuperNode registered
STOP_GRACE_S = 15.0  # SIGTERM, then SIGKILL
MARKER_VAR = "QFL_DEPLOYMENT_TEST_MARKER"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _executable(name: str) -> str:
    path = BIN_DIR / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    assert found, f"{name} not found next to {sys.executable} nor on PATH; install the project (`make install`)"
    return found


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (held open together so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _tail(path: Path, lines: int = 40, chars: int = 4000) -> str:
    try:
        text = _ANSI.sub("", path.read_text(errors="replace"))
    except OSError as err:
        return f"<cannot read {path}: {err.strerror}>"
    return "\n".join(text.splitlines()[-lines:])[-chars:] or "<empty>"


def _marked_processes(marker: str) -> dict[int, str]:
    """PID -> command line of every live process whose environment holds ``marker``.

    Children inherit the environment, so this finds what the started processes
    spawned too, even in other sessions or after re-parenting. Zombies have no
    readable environment and are skipped. Without /proc (not Linux) it finds
    nothing, and cleanup relies on the process groups alone.
    """
    needle = f"{MARKER_VAR}={marker}".encode()
    found: dict[int, str] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if needle not in fh.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        found[int(entry)] = cmdline
    return found


class _Processes:
    """Starts processes with logs in ``log_dir`` and stops all of them (and their children)."""

    def __init__(self, log_dir: Path, env: dict[str, str], marker: str) -> None:
        self.log_dir = log_dir
        self.env = env
        self.marker = marker
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, argv: list[str], cwd: Path, env: dict[str, str] | None = None, stdout_file: bool = False):
        """Start ``argv``; stderr (and stdout unless ``stdout_file``) goes to ``<name>.log``."""
        cwd.mkdir(parents=True, exist_ok=True)
        log = self.logs[name] = self.log_dir / f"{name}.log"
        env = {**self.env, **(env or {})}
        out = open(self.log_dir / f"{name}.out", "wb") if stdout_file else contextlib.nullcontext()
        with open(log, "wb") as err_fh, out as out_fh:
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out_fh or err_fh,
                stderr=err_fh,
                start_new_session=True,  # its own process group, so killpg reaches its children
            )
        self.procs[name] = proc
        return proc

    def run(self, name: str, argv: list[str], cwd: Path, env: dict[str, str], timeout: float) -> tuple[int, str]:
        """Run a short command to its end: (exit status, stdout)."""
        proc = self.start(name, argv, cwd, env, stdout_file=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"`{' '.join(argv)}` did not finish within {timeout:.0f}s\n{self.tail(name)}") from None
        return proc.returncode, (self.log_dir / f"{name}.out").read_text(errors="replace")

    def tail(self, *names: str) -> str:
        return "\n".join(f"----- {n} ({self.logs[n]}) -----\n{_tail(self.logs[n])}" for n in names or self.logs)

    def check_alive(self, *names: str) -> None:
        for name in names:
            rc = self.procs[name].poll()
            if rc is not None:
                raise AssertionError(f"{name} exited early with status {rc}\n{self.tail()}")

    def wait_for(self, what: str, ready, watch: tuple[str, ...], deadline: float) -> None:
        """Poll ``ready()`` until true; fail if a watched process dies or the deadline passes."""
        while not ready():
            self.check_alive(*watch)
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n{self.tail()}")
            time.sleep(0.2)

    def stop_all(self) -> dict[int, str]:
        """SIGTERM, then SIGKILL, everything started and spawned; return what survived."""
        for sig, grace in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 5.0)):
            self._signal_all(sig)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                leaders_done = all(p.poll() is not None for p in self.procs.values())
                if leaders_done and not _marked_processes(self.marker):
                    return {}
                time.sleep(0.1)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
        return _marked_processes(self.marker)

    def _signal_all(self, sig: int) -> None:
        for proc in self.procs.values():
            # Signal a group only while its leader is unreaped: its PID, hence the
            # group ID, cannot have been reused. Members of reaped leaders' groups
            # are found by their marker below.
            if proc.returncode is None:
                try:
                    os.killpg(proc.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
        for pid in _marked_processes(self.marker):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)  # ints, floats and strings are written alike in TOML


def test_flwr_run_on_local_superlink_and_two_supernodes(tmp_path: Path) -> None:
    t_start = time.monotonic()
    deadline = t_start + OVERALL_TIMEOUT_S

    # The SuperLink refuses --run-config keys that [tool.flwr.app.config] lacks.
    declared = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"].get("config", {})
    missing = sorted(set(RUN_CONFIG) - set(declared))
    assert not missing, (
        f"{APP_DIR / 'pyproject.toml'} [tool.flwr.app.config] lacks {missing}; Flower's SuperLink rejects "
        "`flwr run --run-config` overrides of undeclared keys ('Invalid run configuration')"
    )

    marker = uuid.uuid4().hex
    env = {
        **os.environ,
        "PATH": f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}",  # SuperLink/SuperNode exec flower-superexec etc.
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",  # no network
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",  # default 1 s per task launch
        "PYTHONUNBUFFERED": "1",
        "MPLBACKEND": "Agg",
        "MPLCONFIGDIR": str(tmp_path / "matplotlib"),
        MARKER_VAR: marker,
    }
    procs = _Processes(tmp_path / "logs", env, marker)
    superlink_dir = tmp_path / "superlink"
    cli_home = tmp_path / "flwr-home"
    port, *node_ports = _free_ports(1 + NUM_SUPERNODES)
    address = f"127.0.0.1:{port}"
    timings: dict[str, float] = {}

    try:
        # 1. SuperLink: Control, Fleet and Runtime HTTP APIs all on one port in flwr 1.41.
        procs.start(
            "superlink",
            [
                _executable("flower-superlink"),
                "--insecure",
                "--disable-runtime-dependency-installation",
                "--host", "127.0.0.1",
                "--port", str(port),
                "--database", str(superlink_dir / "state.db"),
            ],
            cwd=superlink_dir,  # the ServerApp inherits it: runs/ lands here
            env={"FLWR_HOME": str(superlink_dir / "flwr-home")},
        )

        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return True
            except OSError:
                return False

        # uvicorn binds only after the app's startup (state, SuperExec) is done.
        procs.wait_for("the SuperLink to listen", listening, ("superlink",), min(deadline, time.monotonic() + STARTUP_TIMEOUT_S))
        timings["superlink up"] = time.monotonic() - t_start

        # 2. Two SuperNodes, each with its own Runtime API port, FLWR_HOME and working directory.
        nodes = [f"supernode-{i}" for i in range(NUM_SUPERNODES)]
        for i, (name, node_port) in enumerate(zip(nodes, node_ports)):
            node_dir = tmp_path / name
            procs.start(
                name,
                [
                    _executable("flower-supernode"),
                    "--insecure",
                    "--superlink", address,
                    "--host", "127.0.0.1",
                    "--port", str(node_port),
                    "--node-config", f"partition-id={i} num-partitions={NUM_SUPERNODES}",
                ],
                cwd=node_dir,
                env={"FLWR_HOME": str(node_dir / "flwr-home")},
            )

        # 3. The CLI's connection, then `flwr run`, streaming the run's logs until it ends.
        cli_home.mkdir()
        (cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "{address}"\ninsecure = true\n'
        )
        cli_env = {"FLWR_HOME": str(cli_home)}
        run_config = " ".join(f"{k}={_toml_value(v)}" for k, v in RUN_CONFIG.items())
        flwr = _executable("flwr")
        procs.start(
            "flwr-run",
            [flwr, "run", str(APP_DIR), CONNECTION, "--run-config", run_config, "--stream"],
            cwd=tmp_path / "cli",
            env=cli_env,
        )

        daemons = ("superlink", *nodes)
        for name in nodes:  # the ServerApp waits for them too; this only fails faster with a clearer message
            procs.wait_for(
                f"{name} to register with the SuperLink",
                lambda name=name: "SuperNode ID:" in procs.logs[name].read_text(errors="replace"),
                daemons,
                min(deadline, time.monotonic() + STARTUP_TIMEOUT_S),
            )
        timings["supernodes registered"] = time.monotonic() - t_start

        run_proc = procs.procs["flwr-run"]
        procs.wait_for("`flwr run --stream` to end", lambda: run_proc.poll() is not None, daemons, deadline)
        timings["flwr run ended"] = time.monotonic() - t_start
        run_log = _ANSI.sub("", procs.logs["flwr-run"].read_text(errors="replace"))
        assert run_proc.returncode == 0, f"`flwr run` exited with {run_proc.returncode}\n{procs.tail()}"
        match = re.search(r"Successfully started run (\d+)", run_log)
        assert match, f"`flwr run` printed no run ID\n{procs.tail()}"
        run_id = match.group(1)

        # 4. The run's final status, as the SuperLink reports it.
        for attempt in range(1000):
            rc, out = procs.run(
                f"flwr-ls-{attempt}",
                [flwr, "ls", CONNECTION, "--run-id", run_id, "--format", "json"],
                cwd=tmp_path / "cli",
                env=cli_env,
                timeout=max(5.0, deadline - time.monotonic()),
            )
            assert rc == 0, f"`flwr ls` exited with {rc}: {out}\n{procs.tail(f'flwr-ls-{attempt}')}"
            runs = json.loads(out)["runs"]
            assert len(runs) == 1 and runs[0]["run-id"] == run_id, out
            status = runs[0]["status"]
            if status.startswith("finished") or time.monotonic() > deadline:
                break
            procs.check_alive(*daemons)
            time.sleep(1.0)
        assert status == "finished:completed", (
            f"run {run_id} ended as {status!r} ({runs[0].get('status-details')!r})\n{procs.tail()}"
        )

        # 5. What the ServerApp wrote in the SuperLink's working directory.
        metrics_files = sorted(superlink_dir.glob("runs/*/metrics.json"))
        assert len(metrics_files) == 1, (
            f"expected one runs/*/metrics.json under {superlink_dir}, found {metrics_files}; "
            f"files there: {sorted(str(p.relative_to(superlink_dir)) for p in superlink_dir.rglob('*') if p.is_file())}"
            f"\n{procs.tail()}"
        )
        resolved = tomllib.loads((metrics_files[0].parent / "config.toml").read_text())
        assert {k: resolved.get(k) for k in EXPECTED_CONFIG} == EXPECTED_CONFIG, resolved
        history = json.loads(metrics_files[0].read_text())
        assert [r["round"] for r in history] == [1, 2], history
        for record in history:
            assert record["clients"] == 2, record
            assert record["sampled"] == 2, record
            assert record["dropped"] == 0, (record, record.get("drop_reasons"))
            assert record["uplink_bytes"] > 0, record
            # masked-sum: the pair key and two MAC keys came from the run's QKD pools
            assert record["key_bits_used"] > 0 and record["key_bits_by_link"]["client-0~client-1"] > 0, record
            assert isinstance(record["accuracy"], float) and math.isfinite(record["accuracy"]), record
            # fed_eval=true: both SuperNodes also evaluated the global model.
            assert isinstance(record["fed_accuracy"], float) and math.isfinite(record["fed_accuracy"]), record
    finally:
        t_stop = time.monotonic()
        leftovers = procs.stop_all()
        timings["stopped"] = time.monotonic() - t_start
        timings["stopping took"] = time.monotonic() - t_stop
        print("deployment test timings (s):", {k: round(v, 1) for k, v in timings.items()})

    assert not leftovers, f"processes survived SIGKILL: {leftovers}"
