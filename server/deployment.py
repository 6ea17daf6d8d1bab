"""A whole deployment on one machine: ``qfl deploy local``.

It starts, on 127.0.0.1 and with Flower's and qfl's own commands, what the
multi-machine recipe of the README starts one per machine:

1. ``qfl certs``: a CA, the SuperLink's and the KME's server certificates, an
   SAE certificate for the server and each client, one bundle per node
   (:mod:`qfl.security.keys.certs`);
2. ``qfl kms serve``: the ETSI GS QKD 014 KME over mutual TLS, with a simulated
   QKD link for every pair of SAEs feeding its store in real time;
3. ``flower-superlink`` with TLS (``--ssl-*``), SuperNode authentication
   (``--enable-supernode-auth``) and runtime dependency installation disabled;
   every node's public key is enrolled with ``flwr supernode register``;
4. N ``qfl edge run`` daemons, each with its own bundle: it verifies the
   SuperLink against the CA, signs in with its node key, and takes its QKD key
   from the KMS with its own SAE certificate (node config ``kms-certs``);
5. the run, submitted with ``flwr run`` (``key_source = "kms"``, ``run_dir``
   fixed so that a resubmitted run resumes from its checkpoint).

Every process gets the deployment's marker in its environment, and
:meth:`LocalDeployment.stop` stops each of them and whatever they spawned, by
PID. Without TLS (``tls=False``) the SuperLink runs ``--insecure`` and Flower
allows no node authentication; the KMS still uses mutual TLS.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qfl.clients.daemon import ANSI_ESCAPE, free_port, read_status, stop_marked
from qfl.errors import DeploymentError, DeploymentReason
from qfl.files import atomic_write_json
from qfl.security.keys.certs import NODE_PUB_FILE, NODES_DIR, SUPERLINK_STEM, make_pki
from qfl.security.secagg import SERVER_SAE, client_sae, network_nodes

from .checkpoint import CHECKPOINT_NAME
from .federation import METRICS_NAME

MARKER_VAR = "QFL_DEPLOY_MARKER"
CONNECTION = "qfl-local"
DEPLOYMENT_JSON = "deployment.json"


def app_dir() -> Path:
    """The Flower app (this repository: pyproject.toml with [tool.flwr.app])."""
    here = Path(__file__).resolve().parents[1]
    if not (here / "pyproject.toml").is_file():
        raise DeploymentError(f"no pyproject.toml next to {here}; run from a source checkout (pip install -e .)", reason=DeploymentReason.NOT_INSTALLED)
    return here


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


@dataclass
class LocalDeployment:
    """The processes of one local deployment under ``out`` (see the module docstring)."""

    out: Path
    nodes: int = 3
    rounds: int = 3
    tls: bool = True
    run_config: dict[str, Any] = field(default_factory=dict)  # more `flwr run --run-config` keys
    kms_bits_per_s: float = 2e6  # each simulated QKD link's key rate
    startup_timeout_s: float = 90.0
    node_kms_url: dict[int, str] = field(default_factory=dict)  # partition -> its own KMS address (tests: a proxy)
    node_data: dict[int, str] = field(default_factory=dict)  # partition -> its daemon's --data (default: generated)

    def __post_init__(self) -> None:
        self.out = Path(self.out).resolve()
        if self.nodes < 2:
            raise DeploymentError("a deployment needs at least 2 nodes (secure aggregation sums 2 or more uploads)", reason=DeploymentReason.BAD_REQUEST)
        self.marker = uuid.uuid4().hex
        self.bin = Path(sys.executable).parent
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs = self.out / "logs"
        self.certs = self.out / "certs"
        self.superlink_port = free_port()
        self.superlink_address = f"127.0.0.1:{self.superlink_port}"
        self.kms_url = ""
        self.cli_home = self.out / "flwr-cli"
        self.run_dir = self.out / "run"
        self.run_ids: list[int] = []
        self.recoveries: list[list[int]] = []  # per SuperLink restart: the node IDs online again
        self.superlink_starts = 0
        self.env = {
            **os.environ, MARKER_VAR: self.marker, "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1",
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2", "MPLBACKEND": "Agg",
        }

    # -- processes ----------------------------------------------------------------------------

    def _exe(self, name: str) -> str:
        path = self.bin / name
        found = str(path) if path.exists() else shutil.which(name)
        if not found:
            raise DeploymentError(f"{name} not found next to {sys.executable}; install qfl (`make install`)", reason=DeploymentReason.NOT_INSTALLED)
        return found

    def start(self, name: str, argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start ``argv`` in its own session; stdout and stderr go to ``logs/<name>.log`` (appended)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        cwd = cwd or self.out
        cwd.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(argv, cwd=cwd, env={**self.env, **(env or {})}, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def run_cli(self, name: str, argv: list[str], timeout_s: float = 120.0) -> str:
        """Run a short ``flwr`` command with the deployment's CLI config; its stdout (ANSI removed)."""
        try:
            done = subprocess.run(argv, cwd=self.out, env={**self.env, "FLWR_HOME": str(self.cli_home)},
                                  stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as err:
            raise DeploymentError(f"`{' '.join(argv)}` did not finish within {timeout_s:.0f} s", reason=DeploymentReason.TIMEOUT) from err
        out = ANSI_ESCAPE.sub("", done.stdout.decode(errors="replace"))
        with open(self.logs / f"{name}.log", "ab") as log:
            log.write(done.stdout + done.stderr)
        if done.returncode != 0:
            raise DeploymentError(f"`{' '.join(argv)}` exited with {done.returncode}: {out[-800:]} "
                                  f"{ANSI_ESCAPE.sub('', done.stderr.decode(errors='replace'))[-800:]}", reason=DeploymentReason.EXITED)
        return out

    def tail(self, name: str, chars: int = 3000) -> str:
        try:
            return ANSI_ESCAPE.sub("", (self.logs / f"{name}.log").read_text(errors="replace"))[-chars:]
        except OSError:
            return ""

    def _wait(self, what: str, ready: Any, watch: tuple[str, ...], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            for name in watch:
                rc = self.procs[name].poll()
                if rc is not None:
                    raise DeploymentError(f"{name} exited with {rc} while waiting for {what}:\n{self.tail(name)}", reason=DeploymentReason.EXITED)
            if time.monotonic() > deadline:
                raise DeploymentError(f"timed out after {timeout_s:.0f} s waiting for {what}", reason=DeploymentReason.TIMEOUT)
            time.sleep(0.2)

    # -- the parts ----------------------------------------------------------------------------

    def make_certs(self) -> None:
        saes = network_nodes(self.nodes)
        make_pki(self.certs, saes, kme_host="127.0.0.1", superlink_host="127.0.0.1",
                 nodes=[client_sae(i) for i in range(self.nodes)])

    def start_kms(self) -> None:
        """``qfl kms serve`` with a link per pair of SAEs; on a restart, the same port and store."""
        port = int(self.kms_url.rsplit(":", 1)[1]) if self.kms_url else 0
        links = [f"{a}:{b}" for i, a in enumerate(network_nodes(self.nodes)) for b in network_nodes(self.nodes)[i + 1:]]
        ready = self.out / "kms" / "ready.txt"
        ready.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "qfl", "kms", "serve", "--store", str(self.out / "kms" / "keys.db"),
                "--certs", str(self.certs), "--port", str(port), "--bits-per-s", str(self.kms_bits_per_s), "--tick", "0.2"]
        for link in links:
            argv += ["--link", link]
        (self.out / "kms").mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(ready, "wb") as fh, open(self.logs / "kms.log", "ab") as log:  # stdout: "KME listening on https://..."
            self.procs["kms"] = subprocess.Popen(argv, cwd=self.out / "kms", env=self.env, stdin=subprocess.DEVNULL,
                                                 stdout=fh, stderr=log, start_new_session=True)
        self._wait("the KMS to listen", lambda: "KME listening on" in ready.read_text(), ("kms",), self.startup_timeout_s)
        self.kms_url = ready.read_text().split()[-1]

    def start_superlink(self) -> None:
        """``flower-superlink`` on the deployment's port and state database (a restart resumes both)."""
        tls = ["--ssl-ca-certfile", str(self.certs / "ca.pem"), "--ssl-certfile", str(self.certs / f"{SUPERLINK_STEM}.pem"),
               "--ssl-keyfile", str(self.certs / f"{SUPERLINK_STEM}.key"), "--enable-supernode-auth"] if self.tls else ["--insecure"]
        home = self.out / "superlink"
        self.start("superlink", [self._exe("flower-superlink"), *tls, "--disable-runtime-dependency-installation",
                                 "--host", "127.0.0.1", "--port", str(self.superlink_port),
                                 "--database", str(home / "state.db")],
                   cwd=home, env={"FLWR_HOME": str(home / "flwr-home")})
        self.superlink_starts += 1
        self._wait("the SuperLink to listen", lambda: _listening(self.superlink_port), ("superlink",), self.startup_timeout_s)

    def write_cli_config(self) -> None:
        """The ``flwr`` CLI's connection to this SuperLink (FLWR_HOME/config.toml)."""
        self.cli_home.mkdir(parents=True, exist_ok=True)
        security = f'root-certificates = "{self.certs / "ca.pem"}"' if self.tls else "insecure = true"
        (self.cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{self.superlink_address}"\n{security}\n'
        )

    def enrol_nodes(self) -> None:
        """``flwr supernode register`` every node's public key (node authentication)."""
        for i in range(self.nodes):
            pub = self.certs / NODES_DIR / client_sae(i) / NODE_PUB_FILE
            self.run_cli("flwr-register", [self._exe("flwr"), "supernode", "register", str(pub), CONNECTION,
                                           "--name", client_sae(i), "--format", "json"])

    def daemon_state(self, i: int) -> Path:
        return self.out / "edge" / client_sae(i)

    def start_daemon(self, i: int) -> subprocess.Popen:
        argv = [sys.executable, "-m", "qfl", "edge", "run", "--superlink", self.superlink_address,
                "--certs", str(self.certs / NODES_DIR / client_sae(i)), "--state", str(self.daemon_state(i)),
                "--partition", str(i), "--partitions", str(self.nodes), "--kms-url", self.node_kms_url.get(i, self.kms_url),
                "--backoff-base", "0.5", "--backoff-cap", "5", "--stall-timeout", "30",
                "--data", self.node_data.get(i, "generated")]
        if not self.tls:
            argv.append("--insecure")
        return self.start(f"edge-{i}", argv)

    def wait_connected(self, timeout_s: float | None = None, reconnected: dict[int, int] | None = None) -> None:
        """Until every daemon reports ``connected`` (with at least ``reconnected[i]`` reconnects)."""
        want = reconnected or {}

        def ready() -> bool:
            for i in range(self.nodes):
                try:
                    st = read_status(self.daemon_state(i))
                except FileNotFoundError:
                    return False
                if st.get("connection") != "connected" or st.get("reconnects", 0) < want.get(i, 0):
                    return False
            return True

        try:
            self._wait("the edge daemons to connect", ready, tuple(f"edge-{i}" for i in range(self.nodes)),
                       timeout_s or self.startup_timeout_s)
        except DeploymentError as err:
            seen = {}
            for i in range(self.nodes):
                try:
                    st = read_status(self.daemon_state(i))
                except FileNotFoundError:
                    st = {}
                seen[client_sae(i)] = {k: st.get(k) for k in ("connection", "reconnects", "restarts", "last_exit_reason")}
            raise DeploymentError(f"{err}; daemons (wanted reconnects {want}): {seen}", reason=err.reason) from None

    def submit(self) -> int:
        """``flwr run`` the app with this deployment's run config; returns the run ID."""
        config = {"rounds": self.rounds, "clients": self.nodes, "security": "masked-sum", "key_source": "kms",
                  "kms_url": self.kms_url, "kms_certs": str(self.certs), "run_dir": str(self.run_dir),
                  "fed_eval": False, **self.run_config}
        out = self.run_cli("flwr-run", [self._exe("flwr"), "run", str(app_dir()), CONNECTION, "--run-config",
                                        " ".join(f"{k}={_toml_value(v)}" for k, v in config.items()), "--format", "json"])
        match = re.search(r'"run-id":\s*"?(\d+)', out) or re.search(r"run (\d+)", out)
        if not match:
            raise DeploymentError(f"`flwr run` printed no run ID: {out[-800:]}", reason=DeploymentReason.NO_RUN_ID)
        self.run_ids.append(int(match.group(1)))
        return self.run_ids[-1]

    def run_status(self, run_id: int) -> str:
        out = self.run_cli("flwr-ls", [self._exe("flwr"), "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"])
        runs = json.loads(out[out.index("{"):])["runs"]
        return str(runs[0]["status"]) if runs else "unknown"

    def rounds_completed(self) -> int:
        try:
            return len(json.loads((self.run_dir / METRICS_NAME).read_text()))
        except (OSError, ValueError):
            return 0

    def wait_run(self, run_id: int, timeout_s: float, until_round: int | None = None, recover: int = 0) -> str:
        """Until the run finishes (its status) or, with ``until_round``, has that many rounds in metrics.json.

        If the SuperLink dies meanwhile, up to ``recover`` times: :meth:`recover_superlink`, then wait
        for the resubmitted run (the ID is the last of :attr:`run_ids`).
        """
        deadline = time.monotonic() + timeout_s
        status = "unknown"
        while time.monotonic() < deadline:
            if until_round is not None and self.rounds_completed() >= until_round:
                return "running"
            if self.procs["superlink"].poll() is not None and recover > 0:
                recover -= 1
                run_id = self.recover_superlink()
                continue
            for name in ("superlink", "kms"):
                if self.procs[name].poll() is not None:
                    raise DeploymentError(f"{name} exited with {self.procs[name].returncode}:\n{self.tail(name)}", reason=DeploymentReason.EXITED)
            status = self.run_status(run_id)
            if status.startswith("finished"):
                return status
            time.sleep(1.0)
        raise DeploymentError(f"run {run_id} still {status!r} after {timeout_s:.0f} s "
                              f"({self.rounds_completed()} rounds done)", reason=DeploymentReason.TIMEOUT)

    def online_node_ids(self) -> set[int]:
        """The node IDs the SuperLink lists as online (``flwr supernode ls``)."""
        out = self.run_cli("flwr-supernode-ls", [self._exe("flwr"), "supernode", "ls", CONNECTION, "--format", "json"])
        nodes = json.loads(out[out.index("{"):])["nodes"]
        return {int(n["node-id"]) for n in nodes if n.get("status") == "online"}

    def wait_nodes_online(self, timeout_s: float | None = None) -> set[int]:
        """Until every daemon is connected and the SuperLink lists its node ID as online; returns the IDs.

        A daemon need not have seen the SuperLink go: a SuperNode busy with a ClientApp sends nothing
        meanwhile, and Flower's requests are plain HTTPS, so it may simply carry on with the new process.
        """
        ids: set[int] = set()

        def ready() -> bool:
            ids.clear()
            for i in range(self.nodes):
                try:
                    st = read_status(self.daemon_state(i))
                except FileNotFoundError:
                    return False
                if st.get("connection") != "connected" or not st.get("node_id"):
                    return False
                ids.add(int(st["node_id"]))
            return ids <= self.online_node_ids()

        self._wait("every node to be online at the SuperLink", ready, ("superlink",), timeout_s or self.startup_timeout_s)
        return set(ids)

    def recover_superlink(self) -> int:
        """The SuperLink died: start it again on the same port and state database, wait until every
        daemon's node is online there again, stop the runs it left unfinished (``flwr stop``) and
        resubmit; the ServerApp finds the checkpoint in ``run_dir`` and resumes after its last complete
        round. Returns the new run ID."""
        self.kill("superlink")  # reaps it (it may still be dying)
        self.start_superlink()
        self.recoveries.append(sorted(self.wait_nodes_online()))
        for old in self.run_ids:
            try:
                if not self.run_status(old).startswith("finished"):
                    self.run_cli("flwr-stop", [self._exe("flwr"), "stop", str(old), CONNECTION])
            except DeploymentError:  # the old run may be unknown or already ending; the new one matters
                pass
        return self.submit()

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal one started process (by its PID) and reap it."""
        proc = self.procs[name]
        if proc.poll() is None:
            os.kill(proc.pid, sig)
            proc.wait(timeout=30)

    def up(self) -> None:
        """Certificates, KMS, SuperLink, enrolment and the daemons, each waited for."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.make_certs()
        self.start_kms()
        self.start_superlink()
        self.write_cli_config()
        if self.tls:
            self.enrol_nodes()
        for i in range(self.nodes):
            self.start_daemon(i)
        self.wait_connected()

    def stop(self) -> list[int]:
        """Daemons first (SIGTERM: they drain their SuperNodes), then the rest; every process by PID."""
        daemons = [p.pid for n, p in self.procs.items() if n.startswith("edge-") and p.poll() is None]
        left = stop_marked(self.marker, grace_s=10.0, first=daemons, var=MARKER_VAR)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
        return left

    def summary(self, status: str) -> dict[str, Any]:
        states = {}
        for i in range(self.nodes):
            try:
                states[client_sae(i)] = read_status(self.daemon_state(i))
            except FileNotFoundError:
                states[client_sae(i)] = {}
        return {
            "tls": self.tls,
            "node_auth": self.tls,  # Flower allows SuperNode authentication over TLS only
            "key_source": str(self.run_config.get("key_source", "kms")),
            "nodes": self.nodes,
            "rounds": self.rounds,
            "rounds_completed": self.rounds_completed(),
            "reconnects": sum(int(s.get("reconnects", 0)) for s in states.values()),
            "superlink": self.superlink_address,
            "superlink_starts": self.superlink_starts,
            "nodes_back_after_superlink_restarts": self.recoveries,
            "kms_url": self.kms_url,
            "run_ids": self.run_ids,
            "status": status,
            "resumed": (self.run_dir / CHECKPOINT_NAME).is_file() and len(self.run_ids) > 1,
            "run_dir": str(self.run_dir),
            "daemons": {sae: {k: s.get(k) for k in ("node_id", "connection", "reconnects", "restarts", "last_round",
                                                    "last_sit_out")} for sae, s in states.items()},
            "server_sae": SERVER_SAE,
        }

    def write_summary(self, status: str) -> dict[str, Any]:
        summary = self.summary(status)
        atomic_write_json(self.out / DEPLOYMENT_JSON, summary)
        return summary


def deploy_local(out: Path, nodes: int, rounds: int, tls: bool, run_timeout_s: float = 1800.0,
                 run_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """``qfl deploy local``: bring everything up, run, write ``deployment.json``, stop every process."""
    deployment = LocalDeployment(Path(out), nodes=nodes, rounds=rounds, tls=tls, run_config=run_config or {})
    status = "not started"
    try:
        deployment.up()
        run_id = deployment.submit()
        status = deployment.wait_run(run_id, run_timeout_s, recover=3)
    finally:
        left = deployment.stop()
        summary = deployment.write_summary(status)
    if left:
        raise DeploymentError(f"processes survived SIGKILL: {left}", reason=DeploymentReason.SURVIVED_KILL)
    return summary
