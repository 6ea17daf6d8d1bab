"""The SQLite key store (security/keys/store.py) and the QKD network on a simulated clock (quantum/qkd/network.py)."""

from __future__ import annotations

import math
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qfl.quantum.qkd.network import QuantumNetwork
from qfl.security.keys.source import KeyExhausted, KeySource, UnknownKey, UnknownLink
from qfl.security.keys.store import CHUNK_BYTES, KeyStore, link_name


@pytest.fixture
def store(tmp_path):
    s = KeyStore(tmp_path / "keys.db")
    yield s
    s.close()


def counters(s: KeyStore, a: str, b: str) -> tuple[int, int, int]:
    st_ = s.status(a, b)
    return st_.made_bits, st_.used_bits, st_.left_bits


def assert_ledger_tiles(s: KeyStore, link: str) -> None:
    """The ledger's intervals never overlap and cover [0, used_bits) exactly."""
    a, b = link.split("~")
    end = 0
    for e in s.ledger(link):
        assert e.offset == end, f"{link}: interval at {e.offset} after end {end} (overlap or gap)"
        end = e.offset + e.length
    assert end == s.status(a, b).used_bits


# -- KeySource semantics -------------------------------------------------------------------------


def test_store_is_a_key_source_and_pickles_by_path(store):
    source: KeySource = store  # the protocol is structural; this documents the intent
    assert callable(source.enc_keys) and callable(source.dec_keys) and callable(source.status)
    assert store.add_link("b", "a") == "a~b" == link_name("a", "b")
    assert store.add_link("a", "b") == "a~b"  # idempotent
    assert store.links() == ["a~b"]
    clone = pickle.loads(pickle.dumps(store))
    assert clone.path == store.path and clone.links() == ["a~b"]
    clone.close()


def test_round_trip_gives_master_and_slave_the_same_keys(store):
    store.add_link("server", "client-1")
    material = os.urandom(4 * CHUNK_BYTES + 5)
    store.deposit("server", "client-1", material)
    keys = store.enc_keys("client-1", "server", 5, 256)
    assert len({k.key_id for k in keys}) == 5 and all(len(k.key) == 32 for k in keys)
    assert b"".join(k.key for k in keys) == material[: 5 * 32]  # the pool is handed out in order
    got = store.dec_keys("server", "client-1", [k.key_id for k in reversed(keys)])
    assert got == list(reversed(keys))
    made, used, left = counters(store, "server", "client-1")
    assert (made, used, left) == (8 * len(material), 5 * 256, 8 * len(material) - 5 * 256)
    # Across chunk boundaries, odd sizes.
    big = store.enc_keys("server", "client-1", 3, 8 * (CHUNK_BYTES + 8))
    assert b"".join(k.key for k in big) == material[5 * 32 : 5 * 32 + 3 * (CHUNK_BYTES + 8)]
    assert store.verify() == []
    assert_ledger_tiles(store, "client-1~server")


def test_a_key_is_delivered_once_and_its_material_is_deleted(store):
    store.add_link("a", "b")
    store.deposit("a", "b", os.urandom(64))
    (key,) = store.enc_keys("a", "b", 1, 128)
    assert store.pending_keys("a", "b") == 1
    assert store.dec_keys("b", "a", [key.key_id]) == [key]
    with pytest.raises(UnknownKey):
        store.dec_keys("b", "a", [key.key_id])
    assert store.pending_keys("a", "b") == 0
    con = store._connection()
    row = con.execute("SELECT material, state FROM keys WHERE key_id = ?", (key.key_id,)).fetchone()
    assert row == (None, "consumed")
    assert con.execute("PRAGMA secure_delete").fetchone()[0] == 1
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_wrong_sae_or_unknown_id_delivers_nothing(store):
    store.add_link("a", "b")
    store.add_link("a", "c")
    store.deposit("a", "b", os.urandom(256))
    store.deposit("a", "c", os.urandom(256))
    k1, k2 = store.enc_keys("a", "b", 2, 128)
    (kc,) = store.enc_keys("a", "c", 1, 128)
    bad_requests = [
        ("b", "a", [k1.key_id, "00000000-0000-4000-8000-000000000000"]),  # one unknown id spoils the request
        ("b", "a", [k1.key_id, kc.key_id]),  # kc belongs to the pair a→c
        ("a", "b", [k1.key_id]),  # the master asks as if it were the slave
        ("c", "a", [k1.key_id]),  # another SAE asks for a→b's key
        ("b", "a", [k2.key_id, k2.key_id]),  # the same id twice in one request
    ]
    for slave, master, ids in bad_requests:
        with pytest.raises(UnknownKey):
            store.dec_keys(slave, master, ids)
    with pytest.raises(UnknownLink):
        store.dec_keys("b", "c", [k1.key_id])
    assert store.pending_keys("a", "b") == 2  # nothing was delivered by the failed requests
    assert store.dec_keys("b", "a", [k1.key_id, k2.key_id]) == [k1, k2]
    assert store.dec_keys("c", "a", [kc.key_id]) == [kc]


def test_bad_requests_and_unknown_links(store):
    store.add_link("a", "b")
    store.deposit("a", "b", os.urandom(64))
    for number, size in [(1, 0), (1, 7), (1, 12), (0, 8), (-1, 8), (1, -8), (1.0, 8), (1, True)]:
        with pytest.raises(ValueError):
            store.enc_keys("a", "b", number, size)
    for a, b in [("a", "a"), ("a", ""), ("a", "x~y")]:
        with pytest.raises(ValueError):
            store.add_link(a, b)
    with pytest.raises(UnknownLink):
        store.enc_keys("a", "z", 1, 8)
    with pytest.raises(UnknownLink):
        store.status("a", "z")
    assert counters(store, "a", "b") == (512, 0, 512)


def test_exhaustion_takes_nothing(store):
    store.add_link("a", "b")
    store.deposit("a", "b", os.urandom(125))  # 1000 bits
    store.enc_keys("a", "b", 1, 256)
    before, ledger = counters(store, "a", "b"), store.ledger("a~b")
    with pytest.raises(KeyExhausted) as err:
        store.enc_keys("b", "a", 3, 256)  # 768 > 744
    assert (err.value.link, err.value.requested_bits, err.value.available_bits) == ("a~b", 768, 744)
    assert counters(store, "a", "b") == before and store.ledger("a~b") == ledger
    assert len(store.enc_keys("b", "a", 2, 256)) == 2  # what is there can still be taken
    made, used, left = counters(store, "a", "b")
    assert used + left == made and left == 232


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("deposit"), st.integers(0, 3 * CHUNK_BYTES)),
            st.tuples(st.just("enc"), st.integers(1, 4), st.integers(1, 1200)),
            st.tuples(st.just("dec"), st.integers(0, 10)),
        ),
        max_size=25,
    )
)
def test_random_operations_never_hand_out_a_bit_twice(ops):
    with tempfile.TemporaryDirectory() as d:
        s = KeyStore(Path(d) / "k.db")
        s.add_link("m", "s")
        stream = b""  # everything deposited, in order: key i must be exactly its slice of it
        pending = []
        for op in ops:
            if op[0] == "deposit":
                chunk = os.urandom(op[1])
                s.deposit("m", "s", chunk)
                stream += chunk
            elif op[0] == "enc":
                number, size_bytes = op[1], op[2]
                before = counters(s, "m", "s")
                try:
                    keys = s.enc_keys("m", "s", number, 8 * size_bytes)
                except KeyExhausted:
                    assert before[2] < 8 * number * size_bytes
                    assert counters(s, "m", "s") == before
                    continue
                offset = before[1] // 8
                assert b"".join(k.key for k in keys) == stream[offset : offset + number * size_bytes]
                pending.extend(keys)
            elif pending:
                key = pending.pop(op[1] % len(pending))
                assert s.dec_keys("s", "m", [key.key_id]) == [key]
            made, used, left = counters(s, "m", "s")
            assert used + left == made == 8 * len(stream)
        assert_ledger_tiles(s, "m~s")
        assert s.verify() == []
        s.close()


# -- several threads and processes ---------------------------------------------------------------

_TAKER = textwrap.dedent(
    """
    import sys
    from qfl.security.keys.store import KeyStore
    path, count, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    import os, time
    s = KeyStore(path)
    while not os.path.exists(go):
        time.sleep(0.001)
    out = []
    for _ in range(count):
        (k,) = s.enc_keys("m", "s", 1, 128)
        out.append(k.key_id + " " + k.key.hex())
    print("\\n".join(out), flush=True)
    """
)


def test_threads_and_processes_never_share_key_material(tmp_path):
    path, go = tmp_path / "k.db", tmp_path / "go"
    s = KeyStore(path)
    s.add_link("m", "s")
    threads_n, per_thread, procs_n, per_proc = 8, 120, 2, 250
    s.deposit("m", "s", os.urandom(16 * (threads_n * per_thread + procs_n * per_proc)))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _TAKER, str(path), str(per_proc), str(go)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(procs_n)
    ]
    results: list[list] = [[] for _ in range(threads_n)]
    errors = []

    def take(i: int) -> None:
        try:
            while not go.exists():
                time.sleep(0.001)
            for _ in range(per_thread):
                results[i].extend(s.enc_keys("m", "s", 1, 128))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    workers = [threading.Thread(target=take, args=(i,)) for i in range(threads_n)]
    try:
        for w in workers:
            w.start()
        go.touch()
        for w in workers:
            w.join()
        outputs = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        go.touch()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0] * procs_n
    keys = {k.key_id: k.key for r in results for k in r}
    for out in outputs:
        for key_id, hexkey in (line.split() for line in out.strip().splitlines()):
            keys[key_id] = bytes.fromhex(hexkey)
    assert not errors
    total = threads_n * per_thread + procs_n * per_proc
    assert len(keys) == total
    assert len(set(keys.values())) == total  # random pool: a repeated 128-bit key means bits were reused
    assert counters(s, "m", "s")[1:] == (128 * total, 0)
    assert_ledger_tiles(s, "m~s")
    # The slave gets the very keys every taker got, from any thread.
    delivered = s.dec_keys("s", "m", list(keys))
    assert {k.key_id: k.key for k in delivered} == keys
    assert s.verify() == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_opens_its_own_connection(store):
    store.add_link("m", "s")
    store.deposit("m", "s", os.urandom(1024))
    parent_first = store.enc_keys("m", "s", 1, 128)  # the parent holds a connection before the fork
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: use the inherited KeyStore object
        code = 1
        try:
            keys = store.enc_keys("m", "s", 4, 128)
            os.write(write, b"".join(k.key for k in keys))
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    child_material = b""
    while chunk := os.read(read, 4096):
        child_material += chunk
    os.close(read)
    assert os.waitpid(pid, 0)[1] == 0 and len(child_material) == 64
    parent_more = store.enc_keys("m", "s", 4, 128)  # the parent's connection still works
    chunks = {child_material[i : i + 16] for i in range(0, 64, 16)}
    assert len(chunks | {k.key for k in parent_first + parent_more}) == 9
    assert store.verify() == []


_KILLED = textwrap.dedent(
    """
    import os, sys
    from qfl.security.keys.store import KeyStore
    s = KeyStore(sys.argv[1])
    with open(sys.argv[2], "a") as f:
        while True:
            (k,) = s.enc_keys("m", "s", 1, 256)
            f.write(k.key_id + " " + k.key.hex() + "\\n")
            f.flush()
            os.fsync(f.fileno())
            print(k.key_id, flush=True)
    """
)


def test_kill_9_mid_way_loses_no_consistency_and_reuses_no_bits(tmp_path):
    path, received = tmp_path / "k.db", tmp_path / "received.txt"
    s = KeyStore(path)
    s.add_link("m", "s")
    s.deposit("m", "s", os.urandom(32 * 3000))
    child_keys: dict[str, bytes] = {}
    for kill_after in (150, 333):  # twice, to land in different places of the loop
        child = subprocess.Popen(
            [sys.executable, "-c", _KILLED, str(path), str(received)], stdout=subprocess.PIPE, text=True
        )
        printed = 0
        try:
            while printed < kill_after:
                assert child.stdout.readline(), "child died"
                printed += 1
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=10)
        child.stdout.close()
        assert child.returncode == -signal.SIGKILL
        text = received.read_text()
        complete = text[: text.rfind("\n") + 1]  # a line without its newline is a write cut short: drop it
        received.write_text(complete)
        child_keys = dict((i, bytes.fromhex(h)) for i, h in (line.split() for line in complete.splitlines()))
        assert len(child_keys) >= printed
    # The store opens cleanly and its ledger is consistent. A kill between writing a held-key file and the
    # commit that records its key (or between a commit and its wipe) leaves at most one stray file per kill:
    # the only problem verify() may name, and the one the end-of-run scrub (idle: nobody else has the store
    # open, the child is dead) wipes.
    s.close()
    s = KeyStore(path)
    problems = s.verify()
    assert problems in ([], ["1 held-key files belong to no waiting key"], ["2 held-key files belong to no waiting key"])
    s.scrub(idle=True)
    assert s.verify() == []
    made, used, left = counters(s, "m", "s")
    assert used + left == made
    ledger = s.ledger("m~s")
    assert len(ledger) >= len(child_keys)  # a key that was taken but not yet written to the file is lost, never reused
    # Every key the child received is durable: the slave gets the same material.
    assert {k.key_id: k.key for k in s.dec_keys("s", "m", list(child_keys))} == child_keys
    # Keys taken after recovery never repeat the child's.
    after = []
    while True:
        try:
            after.extend(s.enc_keys("m", "s", 50, 256))
        except KeyExhausted:
            break
    assert set(k.key for k in after).isdisjoint(child_keys.values())
    assert len({k.key for k in after} | set(child_keys.values())) == len(after) + len(child_keys)
    assert_ledger_tiles(s, "m~s")
    assert s.status("m", "s").left_bits < 50 * 256
    s.close()


# -- the network ---------------------------------------------------------------------------------


def test_mesh_makes_floor_rate_times_t_with_carry(store):
    rate = {("a", "b"): 1000.0, ("a", "c"): 3.3, ("b", "c"): 123.456}
    net = QuantumNetwork.mesh(
        store, ["a", "b", "c"], bits_per_s=1.0,
        overrides={pair: {"bits_per_s": r, "distance_km": 25.0} for pair, r in rate.items()},
    )
    assert net.links() == ["a~b", "a~c", "b~c"] and not net.relayed
    for _ in range(10):
        net.advance(0.7)
    assert math.isclose(net.now, 7.0)
    for (a, b), r in rate.items():
        link = net.link(a, b)
        assert link.made_bits == math.floor(r * 7.0)  # 7000, 23, 864
        made, used, left = counters(store, a, b)
        assert made == 8 * (link.made_bits // 8) == link.deposited_bits and link.pending_bits == link.made_bits % 8
        assert used == 0 and left == made
    assert store.verify() == []


def test_rate_as_a_function_of_distance_and_time_to_make(store):
    net = QuantumNetwork(store)
    net.add_link("a", "b", distance_km=50.0, bits_per_s=lambda d: 1e4 * 10 ** (-0.02 * d))  # 1000 bits/s
    net.add_link("a", "c", bits_per_s=0.0)
    assert math.isclose(net.link("a", "b").bits_per_s, 1000.0)
    net.advance(0.0105)  # 10 bits: 1 byte deposited, 2 bits pending, ~0.5 bit carried
    t = net.time_to_make("a~b", 800)
    assert math.isclose(t, (800 - 2 - 0.5) / 1000.0)
    assert net.advance(t)["a~b"] == 800
    assert math.isinf(net.time_to_make("a~c", 8))
    with pytest.raises(ValueError):
        net.add_link("b", "c", bits_per_s=-1.0)
    with pytest.raises(ValueError):
        net.advance(-1.0)


def test_star_relay_xor_gives_both_leaves_the_first_hop_key(store):
    net = QuantumNetwork.star(store, ["server", "c1", "c2", "c3"], hub="server", bits_per_s=100.0)
    assert sorted(net.direct) == ["c1~server", "c2~server", "c3~server"]
    assert sorted(net.relayed) == ["c1~c2", "c1~c3", "c2~c3"]
    k1, k2 = os.urandom(64), os.urandom(64)
    store.deposit("c1", "server", k1)  # known material on the two hops
    store.deposit("server", "c2", k2)
    record = net.relay("c1", "c2", 256)
    (published,) = record.published
    assert published == bytes(x ^ y for x, y in zip(k1[:32], k2[:32]))  # what the relay announces
    assert bytes(x ^ y for x, y in zip(published, k2[:32])) == k1[:32]  # what c2 recovers with its hop key
    keys = store.enc_keys("c1", "c2", 1, 256)
    assert keys[0].key == k1[:32] and store.dec_keys("c2", "c1", [keys[0].key_id]) == keys
    # Equal amounts from both hops, counted and in the ledgers.
    assert counters(store, "c1", "server") == (512, 256, 256) == counters(store, "c2", "server")
    assert [e.state for e in store.ledger("c1~server")] == ["relayed"]
    stats = net.stats()
    assert stats["c1~server"]["relay_bits"] == stats["c2~server"]["relay_bits"] == 256
    assert stats["c1~c2"]["relayed_bits"] == 256 and stats["c3~server"]["relay_bits"] == 0
    # A hop short of key: KeyExhausted, nothing taken from either hop.
    with pytest.raises(KeyExhausted):
        net.relay("c1", "c3", 8)
    assert counters(store, "c1", "server") == (512, 256, 256)
    with pytest.raises(ValueError):
        net.relay("c1", "server", 8)  # a direct link
    assert store.verify() == []


def test_star_through_a_chain_of_relays(store):
    net = QuantumNetwork(store)
    for x, y in [("a", "r1"), ("r1", "r2"), ("r2", "b")]:
        net.add_link(x, y, bits_per_s=800.0)
    net.add_relayed_link("a", "b", via=["r1", "r2"])
    net.advance(1.0)
    net.relay("a", "b", 400)
    (key,) = store.enc_keys("b", "a", 1, 400)
    assert store.dec_keys("a", "b", [key.key_id]) == [key]
    for x, y in [("a", "r1"), ("r1", "r2"), ("r2", "b")]:
        assert counters(store, x, y) == (800, 400, 400)
    assert store.verify() == []


def test_star_network_clock_and_relayed_pools(store):
    net = QuantumNetwork.build(store, ["s", "x", "y"], "star", hub="s", bits_per_s=512.0)
    net.advance(2.0)
    assert counters(store, "s", "x") == (1024, 0, 1024) and counters(store, "x", "y") == (0, 0, 0)
    assert math.isclose(net.time_to_make("x~y", 1024), 2.0)


def test_supply_on_a_direct_link(store):
    net = QuantumNetwork.mesh(store, ["a", "b"], bits_per_s=1000.0)
    net.advance(0.256)  # 256 bits
    before = counters(store, "a", "b")
    with pytest.raises(KeyExhausted):
        store.enc_keys("a", "b", 2, 256)
    assert net.supply("a", "b", 256, wait=False) == 0.0  # a direct link cannot make key in no time
    assert counters(store, "a", "b") == before and net.now == pytest.approx(0.256)
    assert net.supply("a", "b", 768, wait=True) == pytest.approx(0.768)  # waits exactly for the missing bits
    keys = store.enc_keys("a", "b", 4, 256)
    assert len(keys) == 4 and net.now == pytest.approx(1.024)
    assert counters(store, "a", "b") == (1024, 1024, 0)
    zero = QuantumNetwork(store)
    zero.add_link("a", "z", bits_per_s=0.0)
    with pytest.raises(KeyExhausted):
        zero.supply("a", "z", 8, wait=True)  # never comes: do not spin


def test_supply_on_a_relayed_link(store):
    net = QuantumNetwork.star(store, ["hub", "p", "q"], hub="hub", bits_per_s=1000.0)
    net.advance(1.0)  # 1000 bits on each hop, nothing relayed yet
    # without waiting, a relay moves what the hops already hold, in zero simulated time
    assert net.supply("p", "q", 512, wait=False) == 0.0
    assert len(store.enc_keys("p", "q", 2, 256)) == 2 and net.now == 1.0
    net.supply("p", "q", 1024, wait=False)  # hops hold 488 bits each
    assert counters(store, "p", "q")[2] == 488  # ...which were relayed, but are not enough
    # wait: advance until both hops can relay the rest
    net.supply("q", "p", 1024 - 488, wait=True)
    keys = store.enc_keys("q", "p", 4, 256)
    assert len(keys) == 4 and net.now == pytest.approx(1.0 + (1024 - 488) / 1000.0)
    assert store.dec_keys("p", "q", [k.key_id for k in keys]) == keys
    for leaf in "pq":
        made, used, left = counters(store, "hub", leaf)
        assert used == 1536 and used + left == made
    assert store.verify() == []


def test_rates_from_the_analytic_key_rate_model(store):
    keyrate = pytest.importorskip("qfl.quantum.qkd.keyrate")
    net = QuantumNetwork(store)
    net.add_link("a", "b", distance_km=50.0)  # no bits_per_s: the model's defaults at 50 km
    # (the model's finite-key rate, blocks of 1e10 pulses: no key beyond ~69 km, hence 60 km here)
    slow = keyrate.LinkParams(distance_km=60.0, pulse_rate_hz=1e8)
    net.add_link("a", "c", bits_per_s=slow)  # distance taken from the parameters
    net.add_link("b", "c", bits_per_s=slow, distance_km=20.0)  # an explicit distance wins
    at_50 = keyrate.finite_key_bits_per_s(keyrate.LinkParams(distance_km=50.0))
    assert net.link("a", "b").bits_per_s == pytest.approx(at_50)
    assert net.link("a", "c").distance_km == 60.0
    assert net.link("a", "c").bits_per_s == pytest.approx(keyrate.finite_key_bits_per_s(slow))
    assert net.link("b", "c").bits_per_s == pytest.approx(keyrate.finite_key_bits_per_s(slow.with_distance(20.0)))
    assert net.link("a", "b").bits_per_s > net.link("b", "c").bits_per_s > net.link("a", "c").bits_per_s > 0
    net.advance(0.001)
    assert counters(store, "a", "b")[0] == 8 * (math.floor(net.link("a", "b").bits_per_s * 0.001) // 8)


def test_a_stray_held_key_file_goes_at_once_when_the_store_is_idle(store):
    """A kill -9 between a commit and its wipe leaves a file; mid-run scrubs keep young ones (a transaction
    elsewhere may own them), the end-of-run scrub (idle) wipes it, so the audit finds nothing."""
    store.held.write("left-by-a-kill", b"\x01" * 32)
    store.scrub()
    assert store.held.ids() == ["left-by-a-kill"]
    store.scrub(idle=True)
    assert store.held.ids() == [] and store.verify() == []
