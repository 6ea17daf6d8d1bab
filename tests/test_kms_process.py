"""`qfl certs` + `qfl kms serve` as a real process: links fill the store in real
time, a master and a slave get the same key over HTTPS with mutual TLS."""

import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import REPO

from qfl.security.keys.kms_client import KmsKeySource
from qfl.security.keys.source import UnknownKey


def test_kms_process_serves_keys_made_by_its_links(tmp_path):
    certs = tmp_path / "certs"
    made = subprocess.run([sys.executable, "-m", "qfl", "certs", "--out", str(certs), "--sae", "server",
                           "--sae", "client0"], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    proc = subprocess.Popen(
        [sys.executable, "-m", "qfl", "kms", "serve", "--store", str(tmp_path / "keys.db"), "--certs", str(certs),
         "--port", "0", "--link", "server:client0", "--bits-per-s", "100000", "--tick", "0.1"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("KME listening on https://"), line + proc.stdout.read()[-2000:] if proc.poll() else line
        url = line.split()[-1]
        master = KmsKeySource(url, certs / "server.pem", certs / "server.key", certs / "ca.pem")
        slave = KmsKeySource(url, certs / "client0.pem", certs / "client0.key", certs / "ca.pem")
        deadline = time.monotonic() + 30
        while master.status("server", "client0").left_bits < 4 * 256:
            assert time.monotonic() < deadline, "the link made no key"
            time.sleep(0.1)
        keys = master.enc_keys("server", "client0", 4, 256)
        got = slave.dec_keys("client0", "server", [k.key_id for k in keys])
        assert [k.key for k in got] == [k.key for k in keys] and all(len(k.key) == 32 for k in keys)
        with pytest.raises(UnknownKey):
            slave.dec_keys("client0", "server", [keys[0].key_id])
        status = master.status("server", "client0")
        assert status.used_bits >= 4 * 256 and status.used_bits + status.left_bits == status.made_bits
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode is not None
