"""Durable key pools, one per link, in one SQLite file.

:class:`KeyStore` implements :class:`qfl.security.keys.source.KeySource` for the
simulation engine: every process (the ServerApp, Ray workers running
ClientApps, the KMS server's request threads) opens the same file and sees the
same pools. Nothing about the pools lives in a Python object.

Schema (``schema_version`` 2)::

    meta(k TEXT PRIMARY KEY, v TEXT)                 -- schema_version, clock_s
    links(id INTEGER PRIMARY KEY, name TEXT UNIQUE,  -- name = "a~b", a < b
          a TEXT, b TEXT, made_bits INT, mat_bits INT, used_bits INT,
          gen_bits INT, gen_pending INT, gen_carry REAL)
    chunks(seq INTEGER PRIMARY KEY, link_id INT, data BLOB)
          -- the materialised, unused key of a link, in stream order (ORDER BY
          -- seq), each chunk at most CHUNK_BYTES; the first byte of the first
          -- chunk is the link's bit offset used_bits
    keys(key_id TEXT PRIMARY KEY, link_id INT, master TEXT, slave TEXT,
         offset_bits INT, size_bits INT, state TEXT, material BLOB,
         created_at REAL, delivered_at REAL, UNIQUE(link_id, offset_bits))
          -- one row per interval ever taken from a pool (the ledger);
          -- material is kept only while state = 'delivered-to-master'
    deposits(seq INTEGER PRIMARY KEY, link_id INT, offset_bits INT, size_bits INT,
             kind TEXT, sha256 TEXT, created_at REAL, UNIQUE(link_id, offset_bits))
          -- one row per block of key that ever entered a link's stream

A link's key is a stream of bits. ``used_bits <= mat_bits <= made_bits``:
``made_bits`` counts what the link made (what :meth:`KeyStore.status` reports),
``mat_bits`` what of it exists as bytes (was *materialised*), ``used_bits``
what was taken. The chunks hold exactly the bits ``[used_bits, mat_bits)``; the
bits ``[mat_bits, made_bits)`` are a *credit*: key the simulated QKD link is
known to have made, which is drawn from the OS CSPRNG (:func:`secrets.token_bytes`,
``CHUNK_BYTES`` at a time) only when a take needs it, inside the take's
transaction. So key that no one takes is never written to disk, and every bit
ever handed out comes from the operating system's random source, never from a
seeded generator. Taking ``n`` bits copies them out of the first chunks
(deleting the chunks used up, rewriting the one partly used), materialises the
rest from the credit, records the interval ``[used_bits, used_bits + n)`` in
``keys`` and sets ``used_bits += n``. The cost is O(n + CHUNK_BYTES), never
O(pool).

Deposits. Every block that enters a stream gets a ``deposits`` row: its place
``[offset_bits, offset_bits + size_bits)`` (the rows of a link tile
``[0, mat_bits)``), its kind — ``qkd`` (materialised from the credit),
``given`` (bytes passed to :meth:`KeyStore.deposit`) or ``relay`` (made by XOR
relay over other links, :mod:`qfl.quantum.qkd.network`) — and its SHA-256. A relay
block is by construction a copy of its first hop's key, so its digest is taken
under a domain tag (SHA-256 of ``b"qfl-relay\\0" + block``): the copy is not
mistaken for key made twice, two relays of the same bits still collide. Blocks
under ``DIGEST_MIN_BITS`` (128) get no digest: so short a digest could be
inverted by brute force, and such blocks collide by chance. Two blocks with the
same digest mean the same key was made twice; :meth:`KeyStore.verify` reports
them and :meth:`KeyStore.audit` counts them.

Clock. ``meta.clock_s`` and the links' ``gen_*`` columns are the state of the
simulated QKD clock (:class:`qfl.quantum.qkd.network.QuantumNetwork`): whole bits
the link's clock made (``gen_bits``), bits not yet a whole byte
(``gen_pending``, 0–7) and the fraction of a bit carried (``gen_carry``). A
clock tick writes them in the same transaction as its credits, so a network
rebuilt on the store (a resumed run) continues where the last committed tick
left off and never makes key for the same simulated time twice.

Atomicity. Every public operation is one ``BEGIN IMMEDIATE … COMMIT``
transaction: BEGIN IMMEDIATE takes the database's write lock before the first
read, so two takers (threads or processes) are serialised and the second one
reads the ``used_bits`` the first one committed. The journal is a WAL with
``synchronous=FULL``, so a transaction whose COMMIT returned is on disk (the WAL
is fsync'd at every commit) and one that did not commit leaves no trace after a
crash (kill -9 or power loss): the pointer move, the chunk deletions and the
ledger row commit together or not at all. ``enc_keys`` returns key material
only after its COMMIT returned, so every key a caller ever saw is durably
recorded as used, and the next take — in any process, after any crash — starts
after it. ``UNIQUE(link_id, offset_bits)`` guards the same property in the
schema itself.

Deletion. ``dec_keys`` sets the material of a delivered key to NULL in the same
transaction that marks it consumed; taking from the pool deletes or rewrites
the chunks it used. ``PRAGMA secure_delete=ON`` makes SQLite overwrite the freed
bytes with zeros in the database file. Old page images may remain in the WAL
file until the next checkpoint; :meth:`KeyStore.scrub` checkpoints and truncates
it. (Bits left on the physical medium by the file system are out of reach.)
The file and its ``-wal`` / ``-shm`` companions are created mode 0600 (SQLite
gives the companions the database file's mode); an existing file that others
may read is tightened to 0600 when a :class:`KeyStore` opens it.

Connections. One connection per (process, thread), made on first use; a
``KeyStore`` object may be shared by threads, pickled to other processes (only
the path travels) and used after ``fork``. A thread's connection is closed when
the thread ends (its thread-local storage is freed) or by :meth:`close`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

from qfl.errors import StoreCorrupt, StoreOutdated
from qfl.security.keys.source import KeyContainer, KeyExhausted, LinkStatus, UnknownKey, UnknownLink

__all__ = [
    "CHUNK_BYTES",
    "DIGEST_MIN_BITS",
    "Block",
    "GeneratorState",
    "KeyStore",
    "LedgerEntry",
    "StoreCorrupt",
    "StoreOutdated",
    "StoreTransaction",
    "link_name",
]

SCHEMA_VERSION = 2
CHUNK_BYTES = 1024  # largest pool chunk (a take rewrites at most one partly used chunk); materialisation step
DIGEST_MIN_BITS = 128  # shorter deposited blocks get no digest (brute-forceable, and they collide by chance)
RELAY_DIGEST_TAG = b"qfl-relay\0"
DEPOSIT_KINDS = ("qkd", "given", "relay")
FILE_MODE = 0o600
log = logging.getLogger("qfl.keystore")
LINK_SEP = "~"
BUSY_TIMEOUT_MS = 60_000
_INHERITED: list[sqlite3.Connection] = []  # connections a forked child got from its parent (never touched)

STATE_DELIVERED = "delivered-to-master"
STATE_CONSUMED = "consumed"
STATE_RELAYED = "relayed"  # taken by a trusted relay to make key on another link; never delivered
STATE_EXPIRED = "expired"  # taken by a master, never fetched by the slave before its round ended; wiped

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS links (
    id        INTEGER PRIMARY KEY,
    name      TEXT NOT NULL UNIQUE,
    a         TEXT NOT NULL,
    b         TEXT NOT NULL,
    made_bits INTEGER NOT NULL DEFAULT 0,
    mat_bits  INTEGER NOT NULL DEFAULT 0,
    used_bits INTEGER NOT NULL DEFAULT 0,
    gen_bits    INTEGER NOT NULL DEFAULT 0 CHECK (gen_bits >= 0),
    gen_pending INTEGER NOT NULL DEFAULT 0 CHECK (gen_pending BETWEEN 0 AND 7),
    gen_carry   REAL NOT NULL DEFAULT 0 CHECK (gen_carry >= 0),
    CHECK (a < b),
    CHECK (0 <= used_bits AND used_bits <= mat_bits AND mat_bits <= made_bits)
);
CREATE TABLE IF NOT EXISTS chunks (
    seq     INTEGER PRIMARY KEY,
    link_id INTEGER NOT NULL REFERENCES links(id),
    data    BLOB NOT NULL CHECK (length(data) > 0)
);
CREATE INDEX IF NOT EXISTS chunks_by_link ON chunks (link_id, seq);
CREATE TABLE IF NOT EXISTS keys (
    key_id       TEXT PRIMARY KEY,
    link_id      INTEGER NOT NULL REFERENCES links(id),
    master       TEXT NOT NULL,
    slave        TEXT NOT NULL,
    offset_bits  INTEGER NOT NULL CHECK (offset_bits >= 0),
    size_bits    INTEGER NOT NULL CHECK (size_bits > 0),
    state        TEXT NOT NULL CHECK (state IN ('{STATE_DELIVERED}', '{STATE_CONSUMED}', '{STATE_RELAYED}',
                                                '{STATE_EXPIRED}')),
    material     BLOB,
    created_at   REAL NOT NULL,
    delivered_at REAL,
    UNIQUE (link_id, offset_bits)
);
CREATE TABLE IF NOT EXISTS deposits (
    seq         INTEGER PRIMARY KEY,
    link_id     INTEGER NOT NULL REFERENCES links(id),
    offset_bits INTEGER NOT NULL CHECK (offset_bits >= 0),
    size_bits   INTEGER NOT NULL CHECK (size_bits > 0),
    kind        TEXT NOT NULL CHECK (kind IN ({', '.join(repr(k) for k in DEPOSIT_KINDS)})),
    sha256      TEXT,
    created_at  REAL NOT NULL,
    UNIQUE (link_id, offset_bits)
);
CREATE INDEX IF NOT EXISTS deposits_by_digest ON deposits (sha256);
"""


@dataclass(frozen=True)
class Block:
    """A block of key that entered a link's stream: bits ``[offset, offset + length)``, how, and its digest."""

    offset: int
    length: int
    kind: str  # qkd | given | relay
    sha256: str | None  # hex; None for blocks under DIGEST_MIN_BITS


@dataclass(frozen=True)
class GeneratorState:
    """A simulated QKD link's clock-side state (see the module docstring, "Clock")."""

    gen_bits: int = 0  # whole bits its clock made, pending ones included
    pending_bits: int = 0  # 0-7 bits made but not yet a whole byte (not credited yet)
    carry: float = 0.0  # fraction of a bit made, carried to the next tick


def block_digest(kind: str, data: bytes) -> str | None:
    """Hex SHA-256 of a deposited block (of ``RELAY_DIGEST_TAG + data`` for a relay block); None if too short."""
    if 8 * len(data) < DIGEST_MIN_BITS:
        return None
    h = hashlib.sha256(RELAY_DIGEST_TAG if kind == "relay" else b"")
    h.update(data)
    return h.hexdigest()


@dataclass(frozen=True)
class LedgerEntry:
    """An interval of a link's key stream taken from the pool (bits ``[offset, offset + length)``)."""

    offset: int
    length: int
    key_id: str
    state: str


def link_name(a: str, b: str) -> str:
    """The name of the link joining SAEs ``a`` and ``b``: the two names sorted, joined by ``~``."""
    _check_sae(a)
    _check_sae(b)
    if a == b:
        raise ValueError(f"a link joins two different SAEs, got {a!r} twice")
    lo, hi = sorted((a, b))
    return f"{lo}{LINK_SEP}{hi}"


def _check_sae(name: str) -> None:
    if not isinstance(name, str) or not name or LINK_SEP in name:
        raise ValueError(f"an SAE name is a non-empty string without {LINK_SEP!r}, got {name!r}")


def _check_request(number: int, size_bits: int) -> None:
    for label, value in (("number", number), ("size_bits", size_bits)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{label} must be an int, got {value!r}")
    if number < 1:
        raise ValueError(f"number must be at least 1, got {number}")
    if size_bits < 8 or size_bits % 8:
        raise ValueError(f"size_bits must be a positive multiple of 8, got {size_bits}")


class StoreTransaction:
    """Pool operations inside one open transaction (see :meth:`KeyStore.transaction`)."""

    def __init__(self, con: sqlite3.Connection, held: HeldKeys | None = None) -> None:
        self._con = con
        self._held = held
        self.written: list[str] = []  # held-key files this transaction wrote (wiped if it rolls back)
        self.released: list[str] = []  # held-key files to wipe once it commits

    def link_row(self, a: str, b: str) -> tuple[int, str, int, int]:
        """(id, name, made_bits, used_bits) of the link joining a and b; UnknownLink if none."""
        name = link_name(a, b)
        row = self._con.execute("SELECT id, name, made_bits, used_bits FROM links WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise UnknownLink(f"no link joins {a!r} and {b!r} (link {name!r} was never added)")
        return row

    def _row(self, a: str, b: str) -> tuple[int, str, int, int, int]:
        """(id, name, made_bits, mat_bits, used_bits) of the link joining a and b; UnknownLink if none."""
        name = link_name(a, b)
        row = self._con.execute(
            "SELECT id, name, made_bits, mat_bits, used_bits FROM links WHERE name = ?", (name,)
        ).fetchone()
        if row is None:
            raise UnknownLink(f"no link joins {a!r} and {b!r} (link {name!r} was never added)")
        return row

    def _record_block(self, link_id: int, offset_bits: int, size_bits: int, kind: str, digest: str | None) -> None:
        self._con.execute(
            "INSERT INTO deposits (link_id, offset_bits, size_bits, kind, sha256, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (link_id, offset_bits, size_bits, kind, digest, time.time()),
        )

    def deposit(self, a: str, b: str, key: bytes, *, kind: str = "given") -> int:
        """Append ``key`` to the stream (and pool) of link a~b; return the link's made_bits afterwards.

        The block is recorded in ``deposits`` with its digest (``kind``:
        ``given`` for caller's bytes, ``relay`` for relayed key).
        """
        if kind not in ("given", "relay"):
            raise ValueError(f"deposit kind must be 'given' or 'relay', got {kind!r} ('qkd' blocks come from credit)")
        key = bytes(key)
        link_id, _, made, mat, _ = self._row(a, b)
        if not key:
            return made
        con = self._con
        last = con.execute(
            "SELECT seq, data FROM chunks WHERE link_id = ? ORDER BY seq DESC LIMIT 1", (link_id,)
        ).fetchone()
        pos = 0
        if last is not None and len(last[1]) < CHUNK_BYTES:  # top up the last chunk first
            pos = CHUNK_BYTES - len(last[1])
            con.execute("UPDATE chunks SET data = ? WHERE seq = ?", (last[1] + key[:pos], last[0]))
        for start in range(pos, len(key), CHUNK_BYTES):
            con.execute("INSERT INTO chunks (link_id, data) VALUES (?, ?)", (link_id, key[start : start + CHUNK_BYTES]))
        self._record_block(link_id, mat, 8 * len(key), kind, block_digest(kind, key))
        made += 8 * len(key)
        con.execute("UPDATE links SET made_bits = ?, mat_bits = mat_bits + ? WHERE id = ?", (made, 8 * len(key), link_id))
        return made

    def credit(self, a: str, b: str, bits: int, state: GeneratorState) -> int:
        """Credit link a~b with ``bits`` (a multiple of 8) made by its QKD clock, and save the clock's state.

        No key material is written: the bits are materialised from the OS
        CSPRNG by the take that needs them. Returns made_bits afterwards.
        """
        if isinstance(bits, bool) or not isinstance(bits, int) or bits < 0 or bits % 8:
            raise ValueError(f"credit bits must be a multiple of 8 >= 0, got {bits!r}")
        link_id, _, made, _, _ = self._row(a, b)
        made += bits
        self._con.execute(
            "UPDATE links SET made_bits = ?, gen_bits = ?, gen_pending = ?, gen_carry = ? WHERE id = ?",
            (made, int(state.gen_bits), int(state.pending_bits), float(state.carry), link_id),
        )
        return made

    def generator(self, a: str, b: str) -> GeneratorState:
        """The saved clock state of link a~b (zeros for a link no clock has ticked)."""
        row = self._con.execute(
            "SELECT gen_bits, gen_pending, gen_carry FROM links WHERE name = ?", (link_name(a, b),)
        ).fetchone()
        if row is None:
            raise UnknownLink(f"no link joins {a!r} and {b!r}")
        return GeneratorState(*row)

    def clock(self) -> float:
        """The simulated QKD clock of this store, in seconds (0.0 before the first tick)."""
        row = self._con.execute("SELECT v FROM meta WHERE k = 'clock_s'").fetchone()
        return 0.0 if row is None else float(row[0])

    def set_clock(self, now_s: float) -> None:
        """Save the simulated clock (exact: a float's repr round-trips)."""
        self._con.execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('clock_s', ?)", (repr(float(now_s)),))

    def _materialise(self, link_id: int, offset_bits: int, nbytes: int) -> bytes:
        """Draw ``nbytes`` of credited key from the OS CSPRNG, CHUNK_BYTES at a time; record the block."""
        out = bytearray()
        for start in range(0, nbytes, CHUNK_BYTES):
            out += secrets.token_bytes(min(CHUNK_BYTES, nbytes - start))
        block = bytes(out)
        self._record_block(link_id, offset_bits, 8 * nbytes, "qkd", block_digest("qkd", block))
        self._con.execute("UPDATE links SET mat_bits = mat_bits + ? WHERE id = ?", (8 * nbytes, link_id))
        return block

    def take(self, a: str, b: str, nbytes: int) -> tuple[int, bytes]:
        """Remove the next ``nbytes`` bytes from the pool of a~b; return (offset_bits, material).

        Materialised bytes come first; what they lack is materialised from
        the link's credit. Raises KeyExhausted (taking nothing) when the link
        holds fewer bits. The caller must record the interval in the ledger
        (:meth:`record`).
        """
        link_id, name, made, mat, used = self._row(a, b)
        if 8 * nbytes > made - used:
            raise KeyExhausted(name, 8 * nbytes, made - used)
        out = bytearray()
        used_up: list[int] = []
        partial: tuple[int, bytes] | None = None
        if mat > used:
            cur = self._con.execute("SELECT seq, data FROM chunks WHERE link_id = ? ORDER BY seq", (link_id,))
            try:
                for seq, data in cur:
                    need = nbytes - len(out)
                    if len(data) <= need:
                        out += data
                        used_up.append(seq)
                    else:
                        out += data[:need]
                        partial = (seq, data[need:])
                    if len(out) == nbytes:
                        break
            finally:
                cur.close()
        if len(out) != min(nbytes, (mat - used) // 8):
            raise StoreCorrupt(f"link {name!r}: counters say {mat - used} materialised bits left, "
                               f"the pool holds {8 * len(out)}")
        if len(out) < nbytes:
            out += self._materialise(link_id, mat, nbytes - len(out))
        self._con.executemany("DELETE FROM chunks WHERE seq = ?", [(s,) for s in used_up])
        if partial is not None:
            self._con.execute("UPDATE chunks SET data = ? WHERE seq = ?", (partial[1], partial[0]))
        self._con.execute("UPDATE links SET used_bits = ? WHERE id = ?", (used + 8 * nbytes, link_id))
        return used, bytes(out)

    def record(
        self, link_id: int, key_id: str, master: str, slave: str, offset_bits: int, size_bits: int,
        state: str, material: bytes | None,
    ) -> None:
        """Write one ledger row (a key, or an interval consumed by a relay) of the link with ``link_id``."""
        self._con.execute(
            "INSERT INTO keys (key_id, link_id, master, slave, offset_bits, size_bits, state, material, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (key_id, link_id, master, slave, offset_bits, size_bits, state, material, time.time()),
        )

    def take_keys(self, master: str, slave: str, number: int, size_bits: int) -> list[KeyContainer]:
        """The body of :meth:`KeyStore.enc_keys`, inside this transaction."""
        _check_request(number, size_bits)
        size = size_bits // 8
        link_id = self.link_row(master, slave)[0]
        offset, material = self.take(master, slave, number * size)
        keys = []
        for i in range(number):
            key = KeyContainer(str(uuid.uuid4()), material[i * size : (i + 1) * size])
            kept: bytes | None = key.key
            if self._held is not None:  # the slave's copy waits in a file of its own, not in the database
                self._held.write(key.key_id, key.key)
                self.written.append(key.key_id)
                kept = None
            self.record(link_id, key.key_id, master, slave, offset + i * size_bits, size_bits, STATE_DELIVERED, kept)
            keys.append(key)
        return keys

    def take_relayed(self, a: str, b: str, nbytes: int, purpose: str) -> bytes:
        """Take ``nbytes`` from a~b for a relay (recorded in the ledger as 'relayed', no material kept).

        The ledger row's key_id is ``relay:<purpose>:<uuid>`` (purpose: the relayed link's name).
        """
        link_id = self.link_row(a, b)[0]
        offset, material = self.take(a, b, nbytes)
        self.record(link_id, f"relay:{purpose}:{uuid.uuid4()}", a, b, offset, 8 * nbytes, STATE_RELAYED, None)
        return material

    def status(self, master: str, slave: str) -> LinkStatus:
        _, name, made, used = self.link_row(master, slave)
        return LinkStatus(name, master, slave, made, used, made - used)


def _private_files(path: Path) -> None:
    """Create the database file mode 0600 if it is missing; tighten it and its -wal/-shm to 0600.

    SQLite creates ``-wal`` and ``-shm`` with the database file's mode, so a
    0600 database keeps its companions private too.
    """
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE))
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            if p.stat().st_mode & 0o077:
                os.chmod(p, FILE_MODE)
        except FileNotFoundError:
            continue
        except PermissionError:
            log.warning("%s is readable by others and not ours to chmod; run `chmod 600 %s`", p, p)


class HeldKeys:
    """The material of keys a master took and its slave has not fetched yet: one 0600 file per key.

    A round takes all its pair keys before any is fetched (``n·k/2`` keys of
    up to a few hundred KB at scale), so they wait outside the database: its
    file stays the size of the ledger. A file is written before the
    transaction that records its key commits (a rollback wipes it) and wiped
    (overwritten with zeros, then unlinked) after the transaction that
    delivers or expires the key commits. The files are not fsync'd: a crash
    may lose a waiting key, which only makes its slave's fetch fail
    (:class:`UnknownKey`) — its bits stay spent in the ledger, and a crashed
    round's keys are expired anyway — and saves two disk syncs per key. A
    crash between a commit and a wipe leaves a file no waiting key owns;
    :meth:`KeyStore.scrub` wipes those.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _path(self, key_id: str) -> Path:
        if not key_id or "/" in key_id or key_id.startswith("."):
            raise UnknownKey(f"no key {key_id!r} is waiting")
        return self.folder / key_id

    def write(self, key_id: str, material: bytes) -> None:
        self.folder.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.folder, 0o700)
        fd = os.open(self._path(key_id), os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            os.write(fd, material)
        finally:
            os.close(fd)

    def read(self, key_id: str) -> bytes | None:
        try:
            return self._path(key_id).read_bytes()
        except (FileNotFoundError, UnknownKey):
            return None

    def wipe(self, key_ids: list[str]) -> None:
        for key_id in key_ids:
            path = self._path(key_id)
            try:
                with open(path, "r+b") as f:
                    f.write(bytes(os.fstat(f.fileno()).st_size))
                path.unlink()
            except FileNotFoundError:
                continue

    def ids(self, older_than: float | None = None) -> list[str]:
        if not self.folder.is_dir():
            return []
        return [p.name for p in self.folder.iterdir()
                if older_than is None or p.stat().st_mtime < older_than]


class KeyStore:
    """Key pools of QKD links in one SQLite file (see the module docstring for schema and guarantees)."""

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> None:
        self.path = Path(path)
        self._busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _private_files(self.path)
        self.held = HeldKeys(Path(f"{self.path}.held"))
        with self._tx() as tx:  # (executescript would COMMIT on its own; run the statements one by one)
            con = tx._con
            has_meta = con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
            row = con.execute("SELECT v FROM meta WHERE k = 'schema_version'").fetchone() if has_meta else None
            if row is not None and row[0] != str(SCHEMA_VERSION):
                raise StoreOutdated(
                    f"{self.path}: key store schema_version {row[0]}, this qfl reads {SCHEMA_VERSION} (which adds "
                    "deposit digests and the durable QKD clock; an older store cannot be given them). Move the file "
                    f"aside (mv {self.path} {self.path}.v{row[0]}): a new store is made on the next open, and a "
                    "resumed run continues with fresh key and a new simulated QKD clock"
                )
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    con.execute(statement)
            if row is None:
                con.execute("INSERT INTO meta (k, v) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    # -- connections -----------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        pid = os.getpid()
        held = getattr(self._local, "con", None)
        if held is not None:
            if held[0] == pid:
                return held[1]
            # Inherited through fork: the parent's connection. Never use or close it in the child
            # (SQLite forbids both); keep it referenced so that it is never finalised here.
            _INHERITED.append(held[1])
        con = sqlite3.connect(self.path, timeout=self._busy_timeout_ms / 1000, isolation_level=None,
                              check_same_thread=True)
        con.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
        mode = con.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            con.close()
            raise StoreCorrupt(f"{self.path}: could not switch to WAL mode (got {mode!r})")
        con.execute("PRAGMA synchronous = FULL")
        con.execute("PRAGMA secure_delete = ON")
        con.execute("PRAGMA foreign_keys = ON")
        self._local.con = (pid, con)
        return con

    def close(self) -> None:
        """Close the calling thread's connection (a later call opens a new one)."""
        held = getattr(self._local, "con", None)
        self._local.con = None
        if held is not None and held[0] == os.getpid():
            held[1].close()

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {"path": str(self.path), "busy_timeout_ms": self._busy_timeout_ms}

    def __setstate__(self, state: dict) -> None:
        self.path = Path(state["path"])
        self._busy_timeout_ms = state["busy_timeout_ms"]
        self._local = threading.local()
        self.held = HeldKeys(Path(f"{self.path}.held"))

    def __repr__(self) -> str:
        return f"KeyStore({str(self.path)!r})"

    @contextmanager
    def _tx(self, *, write: bool = True) -> Iterator[StoreTransaction]:
        """One transaction: BEGIN IMMEDIATE (the write lock, taken before the first read) or, for
        ``write=False``, a deferred BEGIN (a consistent read snapshot that blocks no writer)."""
        con = self._connection()
        con.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        tx = StoreTransaction(con, self.held)
        try:
            yield tx
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            self.held.wipe(tx.written)
            raise
        try:
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            self.held.wipe(tx.written)
            raise
        self.held.wipe(tx.released)

    def transaction(self) -> AbstractContextManager[StoreTransaction]:
        """``with store.transaction() as tx:`` — several pool operations as one atomic transaction.

        Used by :mod:`qfl.quantum.qkd.network` (a clock tick deposits into every
        link at once; a relay takes from two links and deposits into a third).
        An exception inside the block rolls everything back.
        """
        return self._tx()

    # -- links -----------------------------------------------------------------------------------

    def add_link(self, a: str, b: str) -> str:
        """Create the link joining a and b (idempotent); return its name."""
        name = link_name(a, b)
        lo, hi = sorted((a, b))
        with self._tx() as tx:
            tx._con.execute("INSERT OR IGNORE INTO links (name, a, b) VALUES (?, ?, ?)", (name, lo, hi))
        return name

    def add_links(self, pairs: list[tuple[str, str]]) -> None:
        """Create the links joining each pair (idempotent), in one transaction."""
        rows = []
        for a, b in pairs:
            lo, hi = sorted((a, b))
            rows.append((link_name(a, b), lo, hi))
        with self._tx() as tx:
            tx._con.executemany("INSERT OR IGNORE INTO links (name, a, b) VALUES (?, ?, ?)", rows)

    def links(self) -> list[str]:
        """Names of all links, sorted."""
        rows = self._connection().execute("SELECT name FROM links ORDER BY name").fetchall()
        return [r[0] for r in rows]

    def has_link(self, a: str, b: str) -> bool:
        name = link_name(a, b)
        return self._connection().execute("SELECT 1 FROM links WHERE name = ?", (name,)).fetchone() is not None

    # -- pools -----------------------------------------------------------------------------------

    def deposit(self, a: str, b: str, key: bytes) -> int:
        """Append key made on link a~b to its pool; return the link's made_bits afterwards."""
        with self._tx() as tx:
            return tx.deposit(a, b, key)

    def enc_keys(self, master: str, slave: str, number: int, size_bits: int) -> list[KeyContainer]:
        """Take ``number`` fresh keys of ``size_bits`` for master→slave, atomically.

        Raises ValueError for a bad request, UnknownLink if no link joins the
        two, KeyExhausted (taking nothing) if the pool holds fewer than
        ``number · size_bits`` bits.
        """
        _check_request(number, size_bits)
        with self._tx() as tx:
            return tx.take_keys(master, slave, number, size_bits)

    def enc_key_each(self, master: str, slaves: list[str], size_bits: int) -> dict[str, KeyContainer]:
        """One fresh key of ``size_bits`` for master→slave for each slave, in one transaction (all or nothing)."""
        _check_request(1, size_bits)
        with self._tx() as tx:
            return {slave: tx.take_keys(master, slave, 1, size_bits)[0] for slave in slaves}

    def dec_key_each(self, slave: str, key_ids: dict[str, str]) -> dict[str, KeyContainer]:
        """The key with id ``key_ids[master]`` from each master, each once, in one transaction (all or nothing)."""
        with self._tx() as tx:
            return {master: self._deliver(tx, slave, master, [key_id])[0] for master, key_id in key_ids.items()}

    def dec_keys(self, slave: str, master: str, key_ids: list[str]) -> list[KeyContainer]:
        """The keys with these ids, for the slave they were made for, each exactly once (all or nothing).

        UnknownKey if any id does not exist, was already delivered, was made
        for another master/slave pair, or repeats within the request; then
        nothing is delivered. UnknownLink if no link joins the two SAEs.
        """
        if isinstance(key_ids, str):
            raise TypeError("key_ids is a list of key_id strings, not one string")
        key_ids = list(key_ids)
        if len(set(key_ids)) != len(key_ids):
            raise UnknownKey("a key_id appears twice in one request; each key is delivered once")
        with self._tx() as tx:
            return self._deliver(tx, slave, master, key_ids)

    def _deliver(self, tx: StoreTransaction, slave: str, master: str, key_ids: list[str]) -> list[KeyContainer]:
        """The body of :meth:`dec_keys`, inside ``tx``."""
        link_id = tx.link_row(slave, master)[0]
        out = []
        now = time.time()
        for key_id in key_ids:
            row = tx._con.execute(
                "SELECT link_id, master, slave, state, material FROM keys WHERE key_id = ?", (str(key_id),)
            ).fetchone()
            if row is not None and row[3] == STATE_DELIVERED and row[4] is None:
                row = (*row[:4], self.held.read(str(key_id)))
                tx.released.append(str(key_id))
            if (
                row is None
                or row[0] != link_id
                or row[1] != master
                or row[2] != slave
                or row[3] != STATE_DELIVERED
                or row[4] is None
            ):
                # Same message for every case: do not tell a prober which ids exist.
                raise UnknownKey(f"no key {key_id!r} is waiting for slave {slave!r} from master {master!r}")
            tx._con.execute(
                "UPDATE keys SET state = ?, material = NULL, delivered_at = ? WHERE key_id = ?",
                (STATE_CONSUMED, now, key_id),
            )
            out.append(KeyContainer(key_id, row[4]))
        return out

    def expire_undelivered(self, taken_before: float) -> int:
        """Wipe every key a master took before ``taken_before`` (a ``time.time()``) that no slave fetched.

        Such a key belongs to a round that is over (a client crashed between
        taking and using it, or an upload came too late to be opened): its
        material is deleted, its id can never be fetched again, and its bits
        stay spent. Returns how many keys were wiped.
        """
        with self._tx() as tx:
            tx.released += [r[0] for r in tx._con.execute(
                "SELECT key_id FROM keys WHERE state = ? AND created_at < ? AND material IS NULL",
                (STATE_DELIVERED, float(taken_before)),
            )]
            cur = tx._con.execute(
                "UPDATE keys SET state = ?, material = NULL WHERE state = ? AND created_at < ?",
                (STATE_EXPIRED, STATE_DELIVERED, float(taken_before)),
            )
            return int(cur.rowcount)

    def status(self, master: str, slave: str) -> LinkStatus:
        """made/used/left bits of the link joining master and slave (UnknownLink if none)."""
        # One SELECT is its own read transaction (a consistent snapshot); no write lock needed.
        return StoreTransaction(self._connection()).status(master, slave)

    def ledger(self, link: str) -> list[LedgerEntry]:
        """Every interval ever taken from ``link``'s pool (keys and relay takes), sorted by offset."""
        with self._tx(write=False) as tx:
            con = tx._con
            row = con.execute("SELECT id FROM links WHERE name = ?", (link,)).fetchone()
            if row is None:
                raise UnknownLink(f"no link named {link!r}")
            rows = con.execute(
                "SELECT offset_bits, size_bits, key_id, state FROM keys WHERE link_id = ? ORDER BY offset_bits",
                (row[0],),
            ).fetchall()
        return [LedgerEntry(*r) for r in rows]

    def pending_keys(self, master: str, slave: str) -> int:
        """How many keys master took for slave that the slave has not fetched yet."""
        con = self._connection()
        row = con.execute("SELECT id FROM links WHERE name = ?", (link_name(master, slave),)).fetchone()
        if row is None:
            raise UnknownLink(f"no link joins {master!r} and {slave!r}")
        return con.execute(
            "SELECT count(*) FROM keys WHERE link_id = ? AND master = ? AND slave = ? AND state = ?",
            (row[0], master, slave, STATE_DELIVERED),
        ).fetchone()[0]

    def clock(self) -> float:
        """The simulated QKD clock saved in this store, in seconds."""
        return StoreTransaction(self._connection()).clock()

    def generator(self, a: str, b: str) -> GeneratorState:
        """The saved clock state of link a~b."""
        return StoreTransaction(self._connection()).generator(a, b)

    def blocks(self, link: str) -> list[Block]:
        """Every block that entered ``link``'s stream, in stream order."""
        with self._tx(write=False) as tx:
            row = tx._con.execute("SELECT id FROM links WHERE name = ?", (link,)).fetchone()
            if row is None:
                raise UnknownLink(f"no link named {link!r}")
            rows = tx._con.execute(
                "SELECT offset_bits, size_bits, kind, sha256 FROM deposits WHERE link_id = ? ORDER BY offset_bits",
                (row[0],),
            ).fetchall()
        return [Block(*r) for r in rows]

    def verify(self) -> list[str]:
        """Check the invariants of every link; return a list of problems (empty when consistent).

        Per link: the deposited blocks tile ``[0, mat_bits)`` and the ledger
        intervals tile ``[0, used_bits)`` exactly (no overlap, no gap), the pool
        holds ``mat_bits − used_bits`` bits, and only undelivered keys keep
        material. Over all links: no two deposited blocks share a digest (the
        same key was made twice).
        """
        problems = []
        with self._tx(write=False) as tx:
            con = tx._con
            if con.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
                problems.append("sqlite integrity_check failed")
            links = con.execute("SELECT id, name, made_bits, mat_bits, used_bits FROM links").fetchall()
            for link_id, name, _made, mat, used in links:
                pool = con.execute(
                    "SELECT coalesce(sum(length(data)), 0) FROM chunks WHERE link_id = ?", (link_id,)
                ).fetchone()[0]
                if 8 * pool != mat - used:
                    problems.append(f"{name}: pool holds {8 * pool} bits, counters say {mat - used}")
                for table, what, total in (("deposits", "deposits", mat), ("keys", "ledger", used)):
                    end = 0
                    for off, size in con.execute(
                        f"SELECT offset_bits, size_bits FROM {table} WHERE link_id = ? ORDER BY offset_bits", (link_id,)
                    ):
                        if off != end:
                            problems.append(f"{name}: {what} {'overlap' if off < end else 'gap'} at bit {off}")
                        end = max(end, off + size)
                    if end != total:
                        problems.append(f"{name}: {what} end at bit {end}, "
                                        f"{'mat_bits' if table == 'deposits' else 'used_bits'} is {total}")
            for digest, count, names in con.execute(
                "SELECT d.sha256, count(*), group_concat(l.name, ', ') FROM deposits d JOIN links l ON l.id = d.link_id"
                " WHERE d.sha256 IS NOT NULL GROUP BY d.sha256 HAVING count(*) > 1"
            ):
                problems.append(f"{count} deposited blocks share SHA-256 {digest[:16]}… (links {names}): "
                                "the same key was made more than once")
            waiting = {r[0]: r[1] for r in con.execute(
                "SELECT key_id, material IS NOT NULL FROM keys WHERE state = ?", (STATE_DELIVERED,))}
            files = set(self.held.ids())
            bad = con.execute(
                "SELECT count(*) FROM keys WHERE state != ? AND material IS NOT NULL", (STATE_DELIVERED,)
            ).fetchone()[0] + sum(1 for key_id, inline in waiting.items() if not inline and key_id not in files)
            if bad:
                problems.append(f"{bad} keys keep material they should not (or lack material they should have)")
            stray = files - set(waiting)
            if stray:
                problems.append(f"{len(stray)} held-key files belong to no waiting key")
        return problems

    def audit(self) -> dict[str, object]:
        """Integrity figures of the whole store (what ``qfl keys audit`` prints).

        ``links``; ``bits_made`` (credited + materialised), ``bits_deposited``
        (materialised blocks), ``bits_used``, ``bits_left``; ``blocks`` and
        ``duplicate_blocks`` (blocks whose digest equals another's; 0 unless
        key was made twice); ``problems`` (:meth:`verify`) and ``ledger_ok``;
        ``fingerprints``: link → hex SHA-256 of its first deposited block (None
        if it has none, or it is under DIGEST_MIN_BITS); ``clock_s``.
        """
        problems = self.verify()
        with self._tx(write=False) as tx:
            con = tx._con
            n, made, used = con.execute(
                "SELECT count(*), coalesce(sum(made_bits), 0), coalesce(sum(used_bits), 0) FROM links"
            ).fetchone()
            blocks, deposited = con.execute(
                "SELECT count(*), coalesce(sum(size_bits), 0) FROM deposits"
            ).fetchone()
            duplicates = con.execute(
                "SELECT coalesce(sum(c), 0) FROM (SELECT count(*) AS c FROM deposits WHERE sha256 IS NOT NULL"
                " GROUP BY sha256 HAVING count(*) > 1)"
            ).fetchone()[0]
            fingerprints = dict(con.execute(
                "SELECT l.name, (SELECT d.sha256 FROM deposits d WHERE d.link_id = l.id ORDER BY d.offset_bits"
                " LIMIT 1) FROM links l ORDER BY l.name"
            ).fetchall())
            clock = tx.clock()
        return {
            "path": str(self.path), "schema_version": SCHEMA_VERSION, "links": n, "clock_s": clock,
            "bits_made": made, "bits_deposited": deposited, "bits_used": used, "bits_left": made - used,
            "blocks": blocks, "duplicate_blocks": duplicates, "ledger_ok": not problems, "problems": problems,
            "fingerprints": fingerprints,
        }

    def scrub(self, idle: bool = False) -> None:
        """Checkpoint and truncate the WAL, so page images of deleted key material leave the WAL file;
        wipe held-key files that no waiting key owns (left by a crash between a commit and its wipe).

        A file younger than twice the busy timeout may belong to a transaction still open elsewhere, so it
        is kept unless ``idle`` says no other process uses the store (the end of a run)."""
        self._connection().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        quiet_before = None if idle else time.time() - 2 * self._busy_timeout_ms / 1000
        with self._tx(write=False) as tx:
            waiting = {r[0] for r in tx._con.execute("SELECT key_id FROM keys WHERE state = ?", (STATE_DELIVERED,))}
        self.held.wipe([k for k in self.held.ids(older_than=quiet_before) if k not in waiting])
