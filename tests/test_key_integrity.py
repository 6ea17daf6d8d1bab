"""Integrity of simulated QKD key (issue 12): CSPRNG material, durable clock, deposit digests, private files.

Key bits come from the OS CSPRNG and are materialised only when taken; the
store records a SHA-256 of every deposited block and proves that no key was
made twice; the simulated clock lives in the store, so a resumed run never
makes key for the same simulated time twice; the files are mode 0600.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sqlite3
import stat
import time

import numpy as np
import pytest
from helpers import run_killed_after_round, run_qfl

from qfl.cli import main as qfl_main
from qfl.config import resolve_config
from qfl.quantum.qkd.network import QuantumNetwork
from qfl.security.keys import store as keystore_module
from qfl.security.keys.store import CHUNK_BYTES, KeyStore, StoreOutdated
from qfl.server.checkpoint import load_checkpoint
from qfl.server.key_budget import KeyBudget


def _cfg(**values):
    base = {"security": "masked-sum", "clients": 3, "qkd_rate": 1000.0, "qkd_round_s": 1.5, "seed": 11}
    return resolve_config({**base, **values})


def _audit(path) -> tuple[int, dict]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = qfl_main(["keys", "audit", str(path), "--json"])
    return rc, json.loads(out.getvalue())


# -- material ------------------------------------------------------------------------------------


def test_same_seed_makes_different_key(tmp_path):
    budgets = [KeyBudget(_cfg(), tmp_path / name) for name in ("a", "b")]
    keys = []
    for budget in budgets:
        budget.ensure_link("client-0", "client-1")  # the network is lazy: a link exists once a round needs it
        budget.network.advance(2.0)
        keys.append(budget.store.enc_keys("client-0", "client-1", 2, 512))
    assert keys[0][0].key != keys[1][0].key and keys[0][1].key != keys[1][1].key
    with pytest.raises(TypeError):  # no seed path for key material at all
        QuantumNetwork(budgets[0].store, seed=11)


def test_material_is_drawn_from_the_csprng_lazily_and_in_bounded_pieces(tmp_path, monkeypatch):
    store = KeyStore(tmp_path / "keys.db")
    net = QuantumNetwork.mesh(store, ["a", "b", "c"], bits_per_s=100_000.0)
    net.advance(1.0)
    con = sqlite3.connect(store.path)
    assert con.execute("SELECT count(*) FROM chunks").fetchone()[0] == 0  # credited, nothing written
    assert store.status("a", "b").made_bits == 100_000 and store.blocks("a~b") == []

    asked: list[int] = []
    real = keystore_module.secrets.token_bytes
    monkeypatch.setattr(keystore_module.secrets, "token_bytes", lambda n: asked.append(n) or real(n))
    (key,) = store.enc_keys("a", "b", 1, 8 * 5000)
    assert sum(asked) == 5000 and max(asked) <= CHUNK_BYTES  # exactly what the take needs, streamed
    (block,) = store.blocks("a~b")
    assert (block.offset, block.length, block.kind) == (0, 40_000, "qkd") and len(block.sha256) == 64
    assert store.status("a", "b").used_bits == 40_000 and store.status("a", "b").left_bits == 60_000
    assert con.execute("SELECT count(*) FROM chunks").fetchone()[0] == 0
    assert store.blocks("a~c") == [] and store.verify() == []
    con.close()
    store.close()


def test_consumed_key_leaves_the_files(tmp_path):
    store = KeyStore(tmp_path / "keys.db")
    net = QuantumNetwork.star(store, ["hub", "p", "q"], hub="hub", bits_per_s=50_000.0)
    net.advance(1.0)
    net.relay("p", "q", 8 * 2048)  # materialises on both hops, deposits one relay block
    keys = store.enc_keys("p", "q", 2, 8 * 1024) + store.enc_keys("hub", "p", 1, 8 * 1024)
    # a key waiting for its slave sits in a 0600 file of its own, never in the database
    assert sorted(store.held.ids()) == sorted(k.key_id for k in keys)
    assert all(stat.S_IMODE((store.held.folder / k.key_id).stat().st_mode) == 0o600 for k in keys)
    store.scrub()
    assert keys[0].key[:64] not in (tmp_path / "keys.db").read_bytes()
    store.dec_keys("q", "p", [k.key_id for k in keys[:2]])
    store.dec_keys("p", "hub", [keys[2].key_id])
    assert store.held.ids() == []  # wiped once delivered
    store.scrub()
    raw = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    for k in keys:
        assert k.key[:64] not in raw and k.key[-64:] not in raw
    assert store.verify() == [] and store.audit()["duplicate_blocks"] == 0  # the relay copy is no duplicate
    assert [b.kind for b in store.blocks("p~q")] == ["relay"]
    store.close()


# -- the ledger ----------------------------------------------------------------------------------


def test_verify_flags_equal_deposited_blocks(tmp_path):
    store = KeyStore(tmp_path / "keys.db")
    for pair in (("a", "b"), ("a", "c")):
        store.add_link(*pair)
    store.deposit("a", "b", os.urandom(64))
    assert store.verify() == [] and store.audit()["duplicate_blocks"] == 0
    # Forge key made twice: a block on a~c whose bits are a~b's.
    with sqlite3.connect(store.path) as con:
        (digest,) = con.execute("SELECT sha256 FROM deposits").fetchone()
    store.deposit("a", "c", os.urandom(64))
    with sqlite3.connect(store.path) as con:
        con.execute("UPDATE deposits SET sha256 = ? WHERE link_id = (SELECT id FROM links WHERE name = 'a~c')",
                    (digest,))
    (problem,) = store.verify()
    assert "2 deposited blocks share SHA-256" in problem and "made more than once" in problem
    report = store.audit()
    assert report["duplicate_blocks"] == 2 and report["ledger_ok"] is False
    # The same bytes deposited twice through the API are caught too.
    same = os.urandom(32)
    store.deposit("a", "b", same)
    store.deposit("a", "b", same)
    assert store.audit()["duplicate_blocks"] == 4
    store.close()


def test_keys_audit_command(tmp_path):
    run_dir = tmp_path / "run"
    budget = KeyBudget(_cfg(), run_dir)
    for peer in ("server", "client-1", "client-2"):
        budget.ensure_link("client-0", peer)
    budget.tick()
    budget.store.enc_keys("client-0", "server", 1, 256)
    rc, report = _audit(run_dir)
    assert rc == 0 and report["links"] == 3 and report["ledger_ok"] and report["duplicate_blocks"] == 0
    assert report["bits_deposited"] == report["bits_used"] == 256 and report["clock_s"] == 1.5
    assert report["fingerprints"]["client-0~server"] is not None and report["fingerprints"]["client-0~client-1"] is None
    budget.store.deposit("client-0", "client-1", bytes(32))
    budget.store.deposit("client-0", "client-2", bytes(32))
    rc, report = _audit(run_dir)
    assert rc == 1 and report["duplicate_blocks"] == 2
    with pytest.raises(SystemExit) as exc:
        qfl_main(["keys", "audit", str(tmp_path / "empty")])
    assert exc.value.code == 2


def test_an_older_store_is_refused_with_the_fix_named(tmp_path):
    path = tmp_path / "keys.db"
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE meta (k TEXT PRIMARY KEY, v TEXT NOT NULL)")
        con.execute("INSERT INTO meta VALUES ('schema_version', '1')")
        con.execute("CREATE TABLE links (id INTEGER PRIMARY KEY, name TEXT, a TEXT, b TEXT, made_bits INT, used_bits INT)")
    with pytest.raises(StoreOutdated) as err:
        KeyStore(path)
    assert f"mv {path} " in str(err.value)  # the message names the fix: move the file aside


# -- files ---------------------------------------------------------------------------------------


def test_store_files_are_private(tmp_path):
    old = os.umask(0o022)
    try:
        store = KeyStore(tmp_path / "keys.db")
        net = QuantumNetwork.mesh(store, ["a", "b"], bits_per_s=1000.0)
        net.advance(1.0)
        store.enc_keys("a", "b", 1, 256)
        files = sorted(p.name for p in tmp_path.iterdir())
        assert files == ["keys.db", "keys.db-shm", "keys.db-wal", "keys.db.held"]  # held: keys awaiting slaves
        for p in [*tmp_path.iterdir(), *(tmp_path / "keys.db.held").iterdir()]:
            assert stat.S_IMODE(p.stat().st_mode) == (0o700 if p.is_dir() else 0o600), p.name
        store.close()
        # An existing store that others can read is tightened when opened.
        loose = tmp_path / "loose.db"
        KeyStore(loose).close()
        os.chmod(loose, 0o644)
        KeyStore(loose).close()
        assert stat.S_IMODE(loose.stat().st_mode) == 0o600
    finally:
        os.umask(old)


# -- the clock -----------------------------------------------------------------------------------


def test_a_resumed_key_budget_continues_the_clock_from_the_store(tmp_path):
    cfg = _cfg(qkd_rate=1000.3)  # a fraction of a bit carries from tick to tick
    first = KeyBudget(cfg, tmp_path)
    first.tick()
    first.ensure_link("client-0", "client-1")  # added after a tick: credited the key it made since 0
    for _ in range(2):
        first.tick()
    first.store.enc_keys("client-0", "client-1", 1, 1024)
    link = first.network.link("client-0", "client-1")
    saved = (link.made_bits, link.pending_bits, link.carry)
    status = first.store.status("client-0", "client-1")
    first.store.close()

    again = KeyBudget(cfg, tmp_path)  # e.g. `qfl run --resume`: built from the store alone
    assert again.clock_s == pytest.approx(4.5)
    again.ensure_link("client-0", "client-1")  # back in the lazily rebuilt network, its state from the store
    relink = again.network.link("client-0", "client-1")
    assert (relink.made_bits, relink.pending_bits, relink.carry) == saved
    assert again.store.status("client-0", "client-1") == status
    again.tick()
    assert again.clock_s == pytest.approx(6.0)
    made = again.network.link("client-0", "client-1").made_bits
    assert made == int(1000.3 * 6.0 + 1e-6)  # no simulated second counted twice, none lost
    assert again.store.status("client-0", "client-1").made_bits == 8 * (made // 8)


def test_a_tick_is_atomic(tmp_path, monkeypatch):
    store = KeyStore(tmp_path / "keys.db")
    net = QuantumNetwork.mesh(store, ["a", "b", "c"], bits_per_s=800.0)
    net.advance(1.0)
    before = {name: store.status(*name.split("~")) for name in net.links()}
    calls = []

    def failing_credit(self, a, b, bits, state, real=keystore_module.StoreTransaction.credit):
        calls.append((a, b))
        if len(calls) == 2:
            raise OSError("disk gone (test)")
        return real(self, a, b, bits, state)

    monkeypatch.setattr(keystore_module.StoreTransaction, "credit", failing_credit)
    with pytest.raises(OSError):
        net.advance(1.0)
    assert net.now == 1.0 and {name: store.status(*name.split("~")) for name in net.links()} == before
    store.close()


# -- whole runs ----------------------------------------------------------------------------------

RUN = ["--set", "rounds=4", "--set", "clients=3", "--set", "local_epochs=1", "--set", "seed=5",
       "--set", "security=masked-sum"]


@pytest.fixture(scope="module")
def run_pair(tmp_path_factory):
    """Two runs with the same seed: one straight, one killed (-9) after round 1 and resumed."""
    base = tmp_path_factory.mktemp("key-integrity")
    straight, killed = base / "straight", base / "killed"
    result = run_qfl(["run", "--out", str(straight), *RUN], timeout=600)
    assert result.returncode == 0, result.stdout[-4000:]

    interrupted_at = run_killed_after_round(killed, RUN, after_round=1, timeout=480)
    assert 1 <= interrupted_at < 4, f"kill landed after round {interrupted_at}"

    result = run_qfl(["run", "--resume", str(killed)], timeout=600)
    assert result.returncode == 0, result.stdout[-4000:]
    return straight, killed


def test_same_seed_runs_share_weights_not_key(run_pair):
    straight, killed = run_pair
    (rc_a, a), (rc_b, b) = _audit(straight), _audit(killed)
    assert rc_a == rc_b == 0
    assert a["fingerprints"].keys() == b["fingerprints"].keys()
    for link, digest in a["fingerprints"].items():
        assert digest is not None and digest != b["fingerprints"][link], link
    wa, wb = load_checkpoint(straight).weights, load_checkpoint(killed).weights
    for name in wa:
        assert np.array_equal(wa[name], wb[name]), name


def test_crash_and_resume_makes_no_key_twice(run_pair):
    straight, killed = run_pair
    rc, report = _audit(killed)
    assert rc == 0 and report["duplicate_blocks"] == 0 and report["ledger_ok"], report["problems"]
    assert report["bits_used"] == report["bits_deposited"] > 0  # no key materialised that no round took
    # The resumed clock went on from the store: at least as far as the straight run's.
    assert report["clock_s"] >= _audit(straight)[1]["clock_s"]
    assert load_checkpoint(killed).round == 4
    for p in [*killed.iterdir(), *(killed / "keys.db.held").iterdir()]:
        if p.name.startswith("keys.db") or p.parent.name == "keys.db.held":
            assert stat.S_IMODE(p.stat().st_mode) == (0o700 if p.is_dir() else 0o600), p.name


def test_a_key_no_slave_fetched_is_wiped_when_its_round_is_over(tmp_path):

    from qfl.security.keys.source import UnknownKey
    from qfl.security.keys.store import KeyStore

    store = KeyStore(tmp_path / "keys.db")
    store.add_link("a", "b")
    store.deposit("a", "b", bytes(range(64)))
    orphan = store.enc_keys("a", "b", 1, 128)[0]
    time.sleep(0.01)
    later = time.time()
    time.sleep(0.01)
    fresh = store.enc_keys("a", "b", 1, 128)[0]
    assert store.expire_undelivered(later) == 1
    with pytest.raises(UnknownKey):
        store.dec_keys("b", "a", [orphan.key_id])
    assert store.dec_keys("b", "a", [fresh.key_id])[0].key == fresh.key
    assert store.verify() == []
    store.scrub()
    raw = (tmp_path / "keys.db").read_bytes()
    assert orphan.key not in raw
