"""A federated run on a real two-node Ray cluster (`ray start --head` plus `ray start --address`), on loopback.

The head and the worker are each given one CPU and the clients one CPU each, so Flower's actor pool holds one
actor per node; every client records the Ray node it ran on, and the test checks that both nodes trained.
Both nodes run `ray start --block` in their own process group and are stopped by PID.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from helpers import REPO, kill_group

from qfl.config import build_config
from qfl.errors import ConfigError

RAY = str(Path(sys.executable).with_name("ray"))

SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    from flwr.clientapp import ClientApp

    from qfl.clients import app as real
    from qfl.clients import secure
    from qfl.config import build_config
    from qfl.simulations.runner import run_simulation_job

    NODES_FILE = sys.argv[2]  # captured by value when Ray ships the mod to the actors


    def where(msg, context, call_next):  # record the Ray node that runs this client's training
        import ray

        if msg.metadata.message_type == "train":
            with open(NODES_FILE, "a") as f:
                f.write(ray.get_runtime_context().get_node_id() + "\\n")
        return call_next(msg, context)


    traced = ClientApp(mods=[where, secure.secagg_mod])
    traced.train()(real.train)
    traced.evaluate()(real.evaluate)
    secure.route_queries(traced)

    cfg = build_config(None, sys.argv[3:])
    run_simulation_job(cfg, Path(sys.argv[1]), client_app=traced)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_node(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    return subprocess.Popen(
        [RAY, "start", "--block", "--num-cpus=1", "--disable-usage-stats", *args],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, env=env,
    )


def _stop_node(proc: subprocess.Popen) -> None:
    """SIGTERM lets `ray start --block` stop its raylet and workers; SIGKILL the group if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    kill_group(proc)


def _wait_for_nodes(address: str, count: int, timeout: float) -> None:
    probe = (
        "import ray, sys, time\n"
        f"ray.init(address={address!r}, logging_level='ERROR', log_to_driver=False)\n"
        f"deadline = time.monotonic() + {timeout}\n"
        f"while sum(n['Alive'] for n in ray.nodes()) < {count}:\n"
        "    if time.monotonic() > deadline: sys.exit(1)\n"
        "    time.sleep(1)\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=timeout + 120, capture_output=True)


@pytest.fixture
def ray_cluster(tmp_path):
    port = _free_port()
    address = f"127.0.0.1:{port}"
    nodes: list[subprocess.Popen] = []
    ray_dir = tempfile.mkdtemp(prefix="qfl-ray-")  # short: Ray's socket paths must stay under 108 bytes
    try:
        nodes.append(_start_node(["--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                                  "--include-dashboard=false", f"--temp-dir={ray_dir}"],
                                 tmp_path / "head.log"))
        deadline = time.monotonic() + 180
        while True:  # the worker may join only once the head's GCS listens
            assert nodes[0].poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the Ray head did not start within 180 s"
                time.sleep(0.5)
        nodes.append(_start_node([f"--address={address}", "--node-ip-address=127.0.0.1"], tmp_path / "worker.log"))
        _wait_for_nodes(address, 2, timeout=180)
        yield address
    finally:
        for proc in reversed(nodes):
            _stop_node(proc)
        shutil.rmtree(ray_dir, ignore_errors=True)


def test_two_rounds_train_on_both_nodes_of_a_ray_cluster(tmp_path, ray_cluster):
    script = tmp_path / "traced_run.py"
    script.write_text(SCRIPT)
    nodes_file = tmp_path / "nodes.txt"
    out = tmp_path / "run"
    settings = ["rounds=2", "clients=4", "local_epochs=1", "fed_eval=false", f"ray_address={ray_cluster}"]
    proc = subprocess.run([sys.executable, str(script), str(out), str(nodes_file), *settings], cwd=REPO,
                          capture_output=True, text=True, timeout=900, start_new_session=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics] == [1, 2]
    trained_on = nodes_file.read_text().split()
    assert len(trained_on) == 2 * 4  # every client trained in both rounds
    assert len(set(trained_on)) == 2  # on both nodes of the cluster


def test_ray_address_is_checked():
    assert build_config(None, ["ray_address=10.0.0.5:6379"]).ray_address == "10.0.0.5:6379"
    for bad in ("10.0.0.5", "head:port", ":6379", "10.0.0.5:70000"):
        with pytest.raises(ConfigError):
            build_config(None, [f"ray_address={bad}"])
