"""Faults of a TLS + node-auth + KMS deployment on loopback, one scenario run once for the module.

`qfl deploy local`'s :class:`LocalDeployment` with two edge daemons and two
rounds (channel-pad, so every upload takes key from the KMS over mutual TLS):

- round 1: client-1's way to the KMS is cut (a TCP relay in front of the KMS,
  its node's ``--kms-url``, resets every connection): client-1 sits out with
  the reason recorded; round 2 has both clients again;
- after round 1: the SuperLink is killed with SIGKILL in the middle of the run;
  the deployment restarts it, every node is online again there with the same
  identity (a daemon busy with a ClientApp may not even notice the outage),
  the run is resubmitted and resumes from the server checkpoint (round 1 is
  not run again);
- afterwards the KMS's key store proves that no key was handed out twice and
  that every bit made is either used or still in its pool.

The refusal of un-enrolled and foreign nodes is tested in test_edge_daemon.py.
"""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest

from qfl.clients.daemon import key_left, read_status
from qfl.security.keys.store import KeyStore
from qfl.server.deployment import DEPLOYMENT_JSON, LocalDeployment

pytestmark = pytest.mark.deployment
RUN_TIMEOUT_S = 600.0  # per phase; a healthy phase takes about a minute on a loaded 2-core machine
FAST = {"security": "channel-pad", "model": "mlp", "local_epochs": 1, "timeout_s": 120.0}


class Relay:
    """A TCP relay on loopback whose accepting can be switched off (a network cut) and on again."""

    def __init__(self) -> None:
        self.target = 0
        self.open = threading.Event()
        self.open.set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            if not self.open.is_set():
                client.close()  # connection reset: the KME is unreachable
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self.open.clear()
        for conn in self._conns:  # kept-alive connections go down too
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._conns.clear()

    def close(self) -> None:
        self._stop.set()
        self.cut()
        self._thread.join(timeout=5)
        self._listener.close()


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy-faults")
    relay = Relay()
    dep = LocalDeployment(out, nodes=2, rounds=2, tls=True, run_config=FAST,
                          node_kms_url={1: f"https://127.0.0.1:{relay.port}"}, startup_timeout_s=180.0)
    seen: dict = {}
    try:
        dep.out.mkdir(parents=True, exist_ok=True)
        dep.make_certs()
        dep.start_kms()
        relay.target = int(dep.kms_url.rsplit(":", 1)[1])
        dep.start_superlink()
        dep.write_cli_config()
        dep.enrol_nodes()
        for i in range(dep.nodes):
            dep.start_daemon(i)
        dep.wait_connected()
        relay.cut()  # client-1 cannot reach the KMS in round 1
        first = dep.submit()
        dep.wait_run(first, RUN_TIMEOUT_S, until_round=1)
        relay.open.set()
        seen["before_kill"] = json.loads((dep.run_dir / "metrics.json").read_text())
        dep.kill("superlink")  # SIGKILL, in the middle of the run
        seen["status"] = dep.wait_run(first, RUN_TIMEOUT_S, recover=1)
        seen["key_left"] = [key_left(read_status(dep.daemon_state(i))) for i in range(dep.nodes)]  # `qfl edge status`
    finally:
        left = dep.stop()
        relay.close()
        dep.write_summary(seen.get("status", "failed"))
    yield dep, seen, left


def _metrics(dep: LocalDeployment) -> list[dict]:
    return json.loads((dep.run_dir / "metrics.json").read_text())


def test_run_completes_and_every_process_is_stopped(scenario) -> None:
    dep, seen, left = scenario
    assert seen["status"] == "finished:completed"
    assert not left, f"processes survived SIGKILL: {left}"
    summary = json.loads((dep.out / DEPLOYMENT_JSON).read_text())
    assert summary["tls"] and summary["node_auth"] and summary["key_source"] == "kms"
    assert summary["nodes"] == 2 and summary["rounds_completed"] == 2 and summary["reconnects"] >= 0
    # each daemon asks the KMS, with its own certificate, how much key its link to the server holds
    assert all(isinstance(bits, int) and bits > 0 for bits in seen["key_left"]), seen["key_left"]


def test_superlink_kill_resumes_from_the_checkpoint(scenario) -> None:
    dep, seen, _ = scenario
    history = _metrics(dep)
    assert [r["round"] for r in history] == [1, 2]
    assert len(seen["before_kill"]) == 1 and history[:1] == seen["before_kill"]  # round 1 kept, not rerun
    assert len(dep.run_ids) == 2 and dep.superlink_starts == 2
    # The resubmitted run loaded the checkpoint: its elapsed time continues round 1's (a fresh run starts at 0).
    assert history[1]["elapsed_s"] == pytest.approx(history[0]["elapsed_s"] + history[1]["wall_s"])
    node_ids = sorted(read_status(dep.daemon_state(i))["node_id"] for i in range(dep.nodes))
    assert dep.recoveries == [node_ids]  # every node online again at the restarted SuperLink, same identity
    assert history[1]["clients"] == 2 and history[1]["dropped"] == 0


def test_kms_outage_makes_that_client_sit_out_and_loses_no_key(scenario) -> None:
    dep, _, _ = scenario
    history = _metrics(dep)
    assert history[0]["dropped"] == 1 and history[0]["clients"] == 1
    assert any("KmsUnavailable" in reason for reason in history[0]["drop_reasons"]), history[0]["drop_reasons"]
    state = read_status(dep.daemon_state(1))
    assert state["last_sit_out"]["round"] == 1 and state["last_sit_out"]["reason"].startswith("KmsUnavailable")
    assert state["last_round"] == 2  # and it took part again once the KMS was back
    with KeyStore(Path(dep.out) / "kms" / "keys.db") as store:
        audit = store.audit()
        assert audit["ledger_ok"] and audit["duplicate_blocks"] == 0, audit["problems"]
        for peer in ("client-0", "client-1"):
            link = store.status("server", peer)
            assert link.used_bits > 0 and link.used_bits + link.left_bits == link.made_bits
