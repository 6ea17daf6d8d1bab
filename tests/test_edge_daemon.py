"""`qfl certs` for a deployment, and the `qfl edge` daemon against a real TLS + node-auth SuperLink.

The process test starts Flower's own ``flower-superlink`` with TLS and
SuperNode authentication, enrols one node, and runs three daemons: the enrolled
node (connects; restarted after SIGKILL, it stops the SuperNode its killed
predecessor left behind and reconnects with the same identity; reconnects after
the SuperLink is killed with SIGKILL and restarted; refused once the operator
revokes it with `flwr supernode unregister`; drains and exits 0 on SIGTERM), a node whose key was issued by the
same CA but never enrolled (refused), and a node from another CA (it cannot
verify the SuperLink; never connects). Every process is stopped by PID.
"""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from cryptography.x509.oid import ExtendedKeyUsageOID
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from helpers import QFL, REPO

from qfl.clients.daemon import STATE_KEY, EdgeConfig, EdgeState, backoff_delay, edge_state_mod, is_running, read_status
from qfl.security.keys.certs import make_pki
from qfl.server.deployment import LocalDeployment

WAIT_S = 120.0  # each wait; generous for a loaded 2-core machine


def test_certs_issue_superlink_certificate_and_node_bundles(tmp_path: Path) -> None:
    pki = make_pki(tmp_path, ["server", "client-0"], superlink_host="link.example", nodes=["client-0", "edge-x"])
    assert pki.superlink is not None
    cert = x509.load_pem_x509_certificate(pki.superlink[0].read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "link.example" in sans.get_values_for_type(x509.DNSName)
    assert ExtendedKeyUsageOID.SERVER_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    enrolment = json.loads((tmp_path / "nodes.json").read_text())
    for node in ("client-0", "edge-x"):
        bundle = pki.nodes[node]
        key = load_ssh_private_key((bundle / "node.key").read_bytes(), None)  # what flower-supernode reads
        pub = load_ssh_public_key((bundle / "node.pub").read_bytes())  # what `flwr supernode register` reads
        assert key.public_key().public_numbers() == pub.public_numbers()  # type: ignore[union-attr]
        assert key.curve.name == "secp384r1"  # type: ignore[union-attr]
        assert (bundle / "node.key").stat().st_mode & 0o077 == 0
        assert (bundle / "ca.pem").read_bytes() == pki.ca_cert.read_bytes()
        assert enrolment[node] == (bundle / "node.pub").read_text().strip()
    # The SAE node carries its own KMS credentials, and nothing of anyone else's.
    assert sorted(p.name for p in pki.nodes["client-0"].iterdir()) == [
        "ca.pem", "client-0.key", "client-0.pem", "node.key", "node.pub"]
    assert sorted(p.name for p in pki.nodes["edge-x"].iterdir()) == ["ca.pem", "node.key", "node.pub"]
    assert enrolment["client-0"] != enrolment["edge-x"]
    with pytest.raises(ValueError):
        make_pki(tmp_path / "bad", ["server"], nodes=["superlink"])  # would clash with superlink.pem


def test_backoff_is_capped_full_jitter() -> None:
    rng = random.Random(0)
    for attempt in range(12):
        bound = min(30.0, 1.0 * 2**attempt)
        draws = [backoff_delay(attempt, 1.0, 30.0, rng) for _ in range(400)]
        assert all(0.0 <= d <= bound for d in draws)
        assert max(draws) > 0.8 * bound  # full jitter spans the whole interval
    assert backoff_delay(10_000, 1.0, 30.0, rng) <= 30.0


def test_edge_state_mod_records_rounds_and_sit_outs(tmp_path: Path, task_identity) -> None:
    context = Context(run_id=1, node_id=7, node_config={STATE_KEY: str(tmp_path)}, state=RecordDict(), run_config={})
    msg = Message(RecordDict({"config": ConfigRecord({"server-round": 4})}), dst_node_id=7, message_type="train")

    def ok(m: Message, c: Context) -> Message:
        return Message(RecordDict(), reply_to=m)

    edge_state_mod(msg, context, ok)
    state = EdgeState(tmp_path)
    assert state.read()["last_round"] == 4 and state.read()["last_message"] == "train"
    assert "last_sit_out" not in state.read()

    def fails(m: Message, c: Context) -> Message:
        return Message(Error(code=1, reason="KmsUnavailable: cannot reach the KME"), reply_to=m)

    msg5 = Message(RecordDict({"config": ConfigRecord({"server-round": 5})}), dst_node_id=7, message_type="train")
    edge_state_mod(msg5, context, fails)
    sit_out = state.read()["last_sit_out"]
    assert sit_out["round"] == 5 and sit_out["reason"].startswith("KmsUnavailable")
    assert state.increment("reconnects") == 1 and state.increment("reconnects") == 2
    state.close()
    # Outside a daemon (no qfl-state in the node config) the mod only passes the message on.
    bare = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    assert not edge_state_mod(msg, bare, ok).has_error()


def test_edge_config_needs_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        EdgeConfig(superlink="127.0.0.1:1", state_dir=tmp_path)
    with pytest.raises(FileNotFoundError):
        EdgeConfig(superlink="127.0.0.1:1", state_dir=tmp_path, certs=tmp_path)
    with pytest.raises(ValueError):
        EdgeConfig(superlink="127.0.0.1:1", state_dir=tmp_path, insecure=True, partition_id=2, num_partitions=2)


def test_a_daemons_pins_reach_its_node_config_as_flower_parses_it(tmp_path: Path) -> None:
    from flwr.common.config import parse_config_args

    from qfl.clients.daemon import EdgeDaemon
    from qfl.clients.secure import NodePins

    pins = ("secure-masking=double", "secure-self-mask=vector", "secure-corrupt=0.05")
    cfg = EdgeConfig(superlink="127.0.0.1:1", state_dir=tmp_path, insecure=True, pins=pins)
    command = EdgeDaemon(cfg).command(runtime_port=1)
    node_config = parse_config_args([command[command.index("--node-config") + 1]])
    assert NodePins.from_node_config(node_config) == NodePins(masking="double", self_mask="vector", corrupt=0.05)
    for bad in ("secure-masking=triple", "secure-corrupt=many", "secure-colluders=3", "secure-masking"):
        with pytest.raises(ValueError, match="secure-"):
            EdgeConfig(superlink="127.0.0.1:1", state_dir=tmp_path, insecure=True, pins=(bad,))


def _status(path: Path) -> dict:
    try:
        return read_status(path)
    except (FileNotFoundError, sqlite3.Error):
        return {}


@pytest.mark.deployment
def test_daemon_enrolled_refused_foreign_revoked_reconnect_and_sigterm(tmp_path: Path) -> None:
    dep = LocalDeployment(tmp_path / "dep", nodes=2, tls=True, startup_timeout_s=WAIT_S)
    foreign = make_pki(tmp_path / "foreign", ["client-0"], superlink_host="127.0.0.1", nodes=["client-0"])
    states = {"enrolled": dep.daemon_state(0), "unenrolled": dep.daemon_state(1), "foreign": tmp_path / "foreign-state"}
    try:
        dep.make_certs()
        dep.start_superlink()
        dep.write_cli_config()
        pub = dep.certs / "nodes" / "client-0" / "node.pub"
        dep.run_cli("flwr-register", [dep._exe("flwr"), "supernode", "register", str(pub), "qfl-local", "--format", "json"])
        dep.start_daemon(0)
        dep.start_daemon(1)  # same CA, key never registered
        dep.start("edge-foreign", [*QFL, "edge", "run", "--superlink", dep.superlink_address, "--certs",
                                   str(foreign.nodes["client-0"]), "--state", str(states["foreign"]),
                                   "--flower-retries", "1", "--backoff-base", "0.2", "--backoff-cap", "1"])
        watch = ("superlink", "edge-0", "edge-1", "edge-foreign")
        dep._wait("the enrolled daemon to connect", lambda: _status(states["enrolled"]).get("connection") == "connected",
                  watch, WAIT_S)
        dep._wait("the un-enrolled daemon to be refused",
                  lambda: _status(states["unenrolled"]).get("connection") == "refused", watch, WAIT_S)
        dep._wait("the foreign daemon to give up once", lambda: _status(states["foreign"]).get("restarts", 0) >= 1,
                  watch, WAIT_S)
        assert "node_id" not in _status(states["unenrolled"]) and "node_id" not in _status(states["foreign"])
        node_id = _status(states["enrolled"])["node_id"]

        # The daemon killed with SIGKILL: its SuperNode lives on; a restarted daemon stops it and takes over.
        orphan = _status(states["enrolled"])["supernode_pid"]
        dep.kill("edge-0")
        assert is_running(orphan)
        dep.start_daemon(0)
        dep._wait("the restarted daemon to reconnect", lambda: (s := _status(states["enrolled"])).get("reconnects", 0) >= 1
                  and s.get("connection") == "connected" and s.get("supernode_pid") != orphan, ("superlink", "edge-0"), WAIT_S)
        assert not is_running(orphan)

        dep.kill("superlink")  # SIGKILL
        # Kept down until the node has seen the outage: a SuperLink back before the node's next request is
        # never noticed (the node carries on with the restarted SuperLink's state), and nothing is recovered.
        dep._wait("the enrolled daemon to see the SuperLink gone",
                  lambda: _status(states["enrolled"]).get("connection") != "connected", ("edge-0",), WAIT_S)
        dep.start_superlink()  # same port and state database
        dep._wait("the enrolled daemon to reconnect", lambda: (s := _status(states["enrolled"])).get("reconnects", 0) >= 2
                  and s.get("connection") == "connected", ("superlink", "edge-0"), WAIT_S)
        assert _status(states["enrolled"])["node_id"] == node_id  # the same enrolled identity
        assert "node_id" not in _status(states["unenrolled"])  # still refused after the restart

        shown = subprocess.run([*QFL, "edge", "status", "--state", str(states["enrolled"]), "--json"], cwd=REPO,
                               capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        status = json.loads(shown.stdout)
        assert status["daemon_alive"] and status["tls"] and status["node_auth"] and status["keys"]["sae"] == "client-0"

        daemon = dep.procs["edge-0"]
        daemon.send_signal(signal.SIGTERM)  # while connected
        assert daemon.wait(timeout=10.0) == 0  # drains and exits 0 within 10 s
        stopped = _status(states["enrolled"])
        assert stopped["connection"] == "stopped" and not stopped["daemon_alive"] and stopped["supernode_pid"] is None
        log = [json.loads(line) for line in (states["enrolled"] / "edge.log").read_text().splitlines()]
        assert {"daemon started", "connected", "stopping", "daemon stopped"} <= {e["event"] for e in log}
        assert any(e["event"] == "supernode exited" for e in
                   map(json.loads, (states["unenrolled"] / "edge.log").read_text().splitlines()))

        # Revoked: the operator unregisters the node; it loses the SuperLink and is refused from then on.
        dep.start_daemon(0)
        dep._wait("the daemon to be back", lambda: (s := _status(states["enrolled"])).get("connection") == "connected"
                  and s.get("reconnects", 0) >= 3, ("superlink", "edge-0"), WAIT_S)
        dep.run_cli("flwr-unregister", [dep._exe("flwr"), "supernode", "unregister", str(node_id), "qfl-local"])
        dep._wait("the revoked daemon to be refused", lambda: _status(states["enrolled"]).get("connection") == "refused",
                  ("superlink", "edge-0"), WAIT_S)
    finally:
        left = dep.stop()
    assert not left, f"processes survived SIGKILL: {left}"


def test_a_node_uses_its_own_kms_address_and_credentials(tmp_path: Path, task_identity) -> None:
    """The server's kms_url/kms_certs name its own machine's files; a node's node config overrides them."""
    from qfl.clients.secure import NODE_KMS_CERTS, NODE_KMS_URL, _run_config
    from qfl.config import resolve_config

    flat = resolve_config({"key_source": "kms", "kms_url": "https://server-side:1", "kms_certs": "/srv/pki"}).to_flat()
    msg = Message(RecordDict({"config": ConfigRecord({**flat, "server-round": 3})}), dst_node_id=7, message_type="train")
    node = Context(run_id=1, node_id=7, node_config={NODE_KMS_URL: "https://kms.local:8443", NODE_KMS_CERTS: str(tmp_path)},
                   state=RecordDict(), run_config={})
    cfg, server_round = _run_config(msg, node)
    assert (cfg.kms_url, cfg.kms_certs, server_round) == ("https://kms.local:8443", str(tmp_path), 3)
    plain = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    assert _run_config(msg, plain)[0].kms_certs == "/srv/pki"


def test_a_stalled_supernode_is_restarted(tmp_path: Path) -> None:
    """Flower's SuperNode can stay alive without a connection after its retries (seen after a SuperLink
    restart mid-round). A stand-in process that behaves so (prints Flower's lines, then hangs) is stopped
    by PID and restarted after stall_s, with the reconnect counted when it connects again."""
    import sys
    import threading
    import time

    from qfl.clients.daemon import EdgeDaemon, is_running

    stand_in = tmp_path / "hanging-supernode"
    stand_in.write_text(f"#!{sys.executable}\n" + (
        "import sys, time\n"
        "print('INFO :      SuperNode ID: 42', flush=True)\n"
        "time.sleep(0.5)\n"
        "print('WARNING :   Connection attempt failed, retrying in 0.50 seconds', flush=True)\n"
        "time.sleep(3600)\n"
    ))
    stand_in.chmod(0o755)
    cfg = EdgeConfig(superlink="127.0.0.1:1", state_dir=tmp_path / "state", insecure=True, stall_s=1.0,
                     backoff_base_s=0.05, backoff_cap_s=0.1)
    daemon = EdgeDaemon(cfg, executable=str(stand_in))
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + WAIT_S
        while _status(cfg.state_dir).get("reconnects", 0) < 1:
            assert time.monotonic() < deadline, _status(cfg.state_dir)
            time.sleep(0.1)
        first = [json.loads(line) for line in (cfg.state_dir / "edge.log").read_text().splitlines()]
        stalled = [e for e in first if e["event"] == "supernode stalled"]
        started = [e["pid"] for e in first if e["event"] == "supernode started"]
        assert stalled and len(started) >= 2 and not is_running(started[0])
        assert _status(cfg.state_dir)["restarts"] >= 1
    finally:
        daemon.stop()
        thread.join(timeout=15)
    assert not thread.is_alive() and _status(cfg.state_dir)["connection"] == "stopped"
