"""An edge daemon's durable audio stream: samples in from the source, windows out to training rounds.

The stream lives in the daemon's SQLite file (``STATE/edge.db``, beside the
daemon's ``state`` table), shared by the daemon (which ingests) and the
ClientApp processes of its SuperNode (which train). It is one sequence of
16 kHz mono samples, numbered from 0, stored as signed 16-bit PCM:

- ``chunks(start, pcm)``: samples ``[start, start + len(pcm)/2)``, appended by
  :meth:`StreamSpool.append` in the **same transaction** as the source position
  that produced them (``stream.source``: generated windows made, files and the
  sample offset in the current file, pipe bytes read). A kill can thus never
  separate the two: after a restart the source continues exactly after the
  last committed chunk.
- ``stream``: ``ingested`` (samples appended) and ``consumed`` (samples whose
  training round was committed); ``ingested − consumed`` is the buffered,
  un-uploaded work.
- ``leases``: one row per round that took windows, ``[start, end)`` in
  samples, ``open``, ``committed`` or ``released``, with the SHA-256 of its
  PCM: the ledger. Run IDs are kept as text (Flower's are unsigned 64-bit,
  beyond SQLite's integers).
- ``records``: the ClientApp's per-node records that must survive a restart
  (error-feedback residuals, the secure-aggregation log, the device's mixture;
  see :mod:`qfl.clients.daemon`), written with the commit of the round that
  made them.

**When a window is consumed.** A train message of round *r* of run *u*
*leases* the next windows after ``consumed`` (:meth:`StreamSpool.lease`; the
same lease again if the message is seen twice). The lease is **committed**
when the node's reply to that message has been made, masked and sealed (the
ClientApp's outermost mod, just before Flower sends it): one transaction moves
``consumed`` to the lease's end and stores the records the round produced.
Anything else **releases** it, and its windows are the next round's again, in
the same order: an error reply (the node sat the round out), a kill before the
commit (a restarted daemon releases every open lease before its SuperNode
starts), or a train message of another round arriving while it is open. So
every sample is trained on in exactly one committed round, in stream order,
and the state (residuals, mixture) always matches the windows consumed. The
one gap: a kill after the commit and before Flower delivered the reply loses
that round's upload (the server drops the node for the round) while its
windows count as consumed; it is as wide as handing one message to the
SuperNode, and no window is ever trained on twice or skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qfl.errors import EdgeDataError, EdgeDataReason

from .frontend import SAMPLE_RATE

STATE_DB = "edge.db"  # the daemon's state file (qfl.clients.daemon uses the same name)
PCM_SCALE = 32767.0

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS chunks (start INTEGER PRIMARY KEY, pcm BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS stream (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS files (name TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, samples INTEGER, "
    "status TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS leases (id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, "
    "round INTEGER NOT NULL, start INTEGER NOT NULL, end INTEGER NOT NULL, state TEXT NOT NULL, "
    "sha256 TEXT NOT NULL, opened_at REAL NOT NULL, closed_at REAL)",
    "CREATE TABLE IF NOT EXISTS records (name TEXT PRIMARY KEY, kind TEXT NOT NULL, blob BLOB NOT NULL)",
)


def to_pcm(wave: np.ndarray) -> bytes:
    """float audio in [−1, 1] → s16le bytes (clipped)."""
    return (np.clip(np.asarray(wave, dtype=np.float32), -1.0, 1.0) * PCM_SCALE).round().astype("<i2").tobytes()


def from_pcm(data: bytes) -> np.ndarray:
    """s16le bytes → float32 audio."""
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / PCM_SCALE


@dataclass(frozen=True)
class Lease:
    """Windows ``[start, end)`` (in samples) of the stream, taken by round ``round`` of run ``run_id``."""

    run_id: int
    round: int
    start: int
    end: int
    window: int  # samples per window
    audio: np.ndarray  # float32 [end − start]

    @property
    def first_window(self) -> int:
        return self.start // self.window

    def windows(self) -> np.ndarray:
        """The audio as ``[windows, window]``."""
        return self.audio.reshape(-1, self.window)


class StreamSpool:
    """The durable stream of one daemon's state directory (see the module docstring)."""

    def __init__(self, state_dir: str | os.PathLike) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.dir / STATE_DB, timeout=60.0, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        for statement in _SCHEMA:
            self._db.execute(statement)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> StreamSpool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions ------------------------------------------------------------------------

    def _begin(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def _commit(self) -> None:
        self._db.execute("COMMIT")

    def _rollback(self) -> None:
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def _get(self, key: str, default: Any) -> Any:
        row = self._db.execute("SELECT value FROM stream WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def _set(self, key: str, value: Any) -> None:
        self._db.execute("INSERT INTO stream(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                         (key, json.dumps(value)))

    # -- the ingest side (the daemon) --------------------------------------------------------

    def append(self, pcm: bytes, position: dict[str, Any], file: dict[str, Any] | None = None) -> int:
        """Append s16le samples and, in the same transaction, the source ``position`` that follows them (and a
        finished ``file`` row: name, size, mtime_ns, samples, status). Returns the samples now ingested."""
        if len(pcm) % 2:
            raise ValueError("PCM chunks hold whole 16-bit samples")
        self._begin()
        try:
            ingested = int(self._get("ingested", 0))
            if pcm:
                self._db.execute("INSERT INTO chunks(start, pcm) VALUES(?, ?)", (ingested, pcm))
            ingested += len(pcm) // 2
            self._set("ingested", ingested)
            self._set("source", position)
            if file is not None:
                self._db.execute("INSERT OR REPLACE INTO files(name, size, mtime_ns, samples, status) VALUES(?, ?, ?, ?, ?)",
                                 (file["name"], file["size"], file["mtime_ns"], file["samples"], file["status"]))
            self._commit()
        except BaseException:
            self._rollback()
            raise
        return ingested

    def position(self) -> dict[str, Any]:
        """The source position of the last committed chunk ({} before the first)."""
        return dict(self._get("source", {}))

    def done_files(self) -> set[str]:
        return {row[0] for row in self._db.execute("SELECT name FROM files")}

    def buffered(self) -> int:
        """Samples ingested and not yet consumed (open leases included)."""
        return int(self._get("ingested", 0)) - int(self._get("consumed", 0))

    # -- the training side (the ClientApp) ---------------------------------------------------

    def lease(self, run_id: int, server_round: int, window: int, windows: int, multiple: int = 1) -> Lease:
        """The next ``windows`` windows of ``window`` samples after ``consumed`` for this round (fewer if fewer are
        buffered, a multiple of ``multiple``); the same lease if this round already holds one.

        Raises :class:`EdgeDataError` (``NOT_ENOUGH_AUDIO``) if fewer than ``multiple`` windows are buffered.
        Any other open lease is released first (its round is over for this node).
        """
        self._begin()
        try:
            row = self._db.execute("SELECT start, end FROM leases WHERE run_id = ? AND round = ? AND state = 'open'",
                                   (str(run_id), server_round)).fetchone()
            if row is None or (row[1] - row[0]) % window:
                self._release_open()
                consumed, ingested = int(self._get("consumed", 0)), int(self._get("ingested", 0))
                granted = min(windows, (ingested - consumed) // window) // multiple * multiple
                if granted < max(1, multiple):
                    raise EdgeDataError(
                        f"the stream holds {(ingested - consumed) / SAMPLE_RATE:.1f} s of audio not yet trained on; "
                        f"round {server_round} needs at least {max(1, multiple)} windows of {window / SAMPLE_RATE:g} s: "
                        "feed the daemon's --data source (or wait; the node sits this round out)",
                        EdgeDataReason.NOT_ENOUGH_AUDIO,
                    )
                row = (consumed, consumed + granted * window)
                pcm = self._read(row[0], row[1])
                self._db.execute("INSERT INTO leases(run_id, round, start, end, state, sha256, opened_at) "
                                 "VALUES(?, ?, ?, ?, 'open', ?, ?)", (str(run_id), server_round, row[0], row[1],
                                                                       hashlib.sha256(pcm).hexdigest(), time.time()))
            else:
                pcm = self._read(row[0], row[1])
            self._commit()
        except BaseException:
            self._rollback()
            raise
        return Lease(run_id, server_round, row[0], row[1], window, from_pcm(pcm))

    def _read(self, start: int, end: int) -> bytes:
        """The s16le PCM of samples ``[start, end)`` (all buffered)."""
        parts, filled = [], start
        rows = self._db.execute("SELECT start, pcm FROM chunks WHERE start < ? AND start + length(pcm) / 2 > ? "
                                "ORDER BY start", (end, start))
        for chunk_start, pcm in rows:
            lo, hi = max(start, chunk_start), min(end, chunk_start + len(pcm) // 2)
            if lo != filled:
                break
            parts.append(bytes(pcm[2 * (lo - chunk_start) : 2 * (hi - chunk_start)]))
            filled = hi
        if filled != end:
            raise RuntimeError(f"the stream lacks samples [{filled}, {end}) it counts as ingested (edge.db damaged?)")
        return b"".join(parts)

    def commit(self, run_id: int, server_round: int, records: dict[str, tuple[str, bytes]]) -> Lease | None:
        """The round's reply is made: its open lease (if any) becomes consumed and ``records`` (name → (kind,
        blob)) are stored, in one transaction. Returns the committed lease (without audio), or None."""
        self._begin()
        try:
            row = self._db.execute("SELECT start, end FROM leases WHERE run_id = ? AND round = ? AND state = 'open'",
                                   (str(run_id), server_round)).fetchone()
            if row is not None:
                if row[0] != int(self._get("consumed", 0)):
                    raise RuntimeError(f"lease [{row[0]}, {row[1]}) does not start at the consumed position")
                self._db.execute("UPDATE leases SET state = 'committed', closed_at = ? WHERE run_id = ? AND round = ? "
                                 "AND state = 'open'", (time.time(), str(run_id), server_round))
                self._set("consumed", row[1])
                self._db.execute("DELETE FROM chunks WHERE start + length(pcm) / 2 <= ?", (row[1],))
            self._save_records(records)
            self._commit()
        except BaseException:
            self._rollback()
            raise
        if row is None:
            return None
        return Lease(run_id, server_round, row[0], row[1], 0, np.zeros(0, np.float32))

    def release(self, records: dict[str, tuple[str, bytes]] | None = None) -> int:
        """Release every open lease (their windows are buffered again, first in line) and store ``records``;
        one transaction. Returns the number of leases released."""
        self._begin()
        try:
            released = self._release_open()
            self._save_records(records or {})
            self._commit()
        except BaseException:
            self._rollback()
            raise
        return released

    def save(self, records: dict[str, tuple[str, bytes]]) -> None:
        """Store ``records`` (name → (kind, blob)); leases untouched."""
        self._begin()
        try:
            self._save_records(records)
            self._commit()
        except BaseException:
            self._rollback()
            raise

    def _release_open(self) -> int:
        return self._db.execute("UPDATE leases SET state = 'released', closed_at = ? WHERE state = 'open'",
                                (time.time(),)).rowcount

    def _save_records(self, records: dict[str, tuple[str, bytes]]) -> None:
        self._db.executemany("INSERT OR REPLACE INTO records(name, kind, blob) VALUES(?, ?, ?)",
                             [(name, kind, blob) for name, (kind, blob) in records.items()])

    def records(self) -> dict[str, tuple[str, bytes]]:
        return {name: (kind, bytes(blob)) for name, kind, blob in self._db.execute("SELECT name, kind, blob FROM records")}

    # -- reading -----------------------------------------------------------------------------

    def ledger(self, state: str | None = None) -> list[dict[str, Any]]:
        """The leases in the order they were opened (``state`` filters)."""
        query = "SELECT run_id, round, start, end, state, sha256 FROM leases"
        rows = self._db.execute(query + (" WHERE state = ?" if state else "") + " ORDER BY id", (state,) if state else ())
        leases = [dict(zip(("run_id", "round", "start", "end", "state", "sha256"), (int(r[0]), *r[1:]))) for r in rows]
        return [{**lease, "seconds": (lease["end"] - lease["start"]) / SAMPLE_RATE} for lease in leases]

    def summary(self) -> dict[str, Any]:
        """What ``qfl edge status`` shows of the stream (sample counts, seconds at 16 kHz)."""
        ingested, consumed = int(self._get("ingested", 0)), int(self._get("consumed", 0))
        committed = self.ledger("committed")
        open_lease = self.ledger("open")
        return {
            "ingested_s": ingested / SAMPLE_RATE,
            "consumed_s": consumed / SAMPLE_RATE,
            "buffered_s": (ingested - consumed) / SAMPLE_RATE,
            "ingested_samples": ingested,
            "consumed_samples": consumed,
            "source": self.position(),
            "files_done": len(self.done_files()),
            "rounds_committed": len(committed),
            "last_committed": committed[-1] if committed else None,
            "open_lease": open_lease[-1] if open_lease else None,
            "released_leases": len(self.ledger("released")),
            "records": sorted(self.records()),
        }
