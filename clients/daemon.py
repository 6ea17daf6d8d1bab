"""The edge daemon: a long-lived Flower SuperNode running qfl's ClientApp, supervised by qfl.

``qfl edge run`` starts Flower's own ``flower-supernode`` (not a fork) with the
node's TLS root, authentication key and node config, and watches it:

- **Connection.** Flower retries a lost SuperLink itself, ``flower_retries``
  times with its own exponential backoff; past that the SuperNode exits and the
  daemon starts it again after a capped exponential backoff with full jitter:
  attempt *a* (0 after every connection) waits U(0, min(cap, base·2^a)) s, so
  the mean wait doubles per failure up to cap/2 and restarts of many nodes
  after one outage spread out instead of arriving together. A refused
  activation (exit code 305) is retried the same way: the node key may not be
  enrolled yet, or the SuperLink may still count the node online from a
  SuperNode that was killed (Flower activates a node only once it is offline,
  a few heartbeat intervals later).
- **State.** A SQLite file ``STATE/edge.db`` (WAL, written by the daemon and by
  :func:`edge_state_mod` inside the ClientApp processes) holds one row per
  field: connection state, node ID, SuperNode PID, reconnects, restarts, last
  round and message, last sit-out reason, key handles (SAE ID, KMS URL,
  fingerprints of the certificates; never key material). ``qfl edge status``
  reads it.
- **Data.** ``--data SOURCE`` (:mod:`qfl.clients.edge.ingest`: the generated
  stream, a watched folder of audio files, a named pipe or stdin of 16 kHz
  s16le PCM) is read by the daemon's ingest thread into the stream of the
  same file (:mod:`qfl.clients.edge.spool`): every chunk of samples is
  committed with the source position after it. The SuperNode's ClientApp
  finds the file through the node config (``qfl-state``) and trains a
  StreamSplit round on the next windows not yet consumed; a window is consumed
  when the reply of the round that trained on it is made (the spool's module
  docstring states the rule). Before its SuperNode starts, the daemon releases
  the leases of rounds a killed ClientApp never answered.
- **ClientApp records.** Flower's per-node ``context.state`` lives in the
  SuperNode's memory and dies with it. On a daemon's node
  :func:`edge_state_mod` restores the records listed in
  :data:`PERSISTED_RECORDS` from the spool before each message and stores them
  after it, with the round's commit: error-feedback residuals
  (``codec-state``), the secure-aggregation log and plan (``secagg-log``:
  after a restart a node still uploads at most once and answers at most one
  unmask request per round), and the device's mixture after its last round
  (``edge-mixture``: what its last upload carried, kept for inspection; each
  round trains from the mixture the server synced down with the model). The round's pair keys (``secagg-keys``) are key
  material and are never written: a restart in the middle of a masked round
  forfeits that round's answer.
- **Logs.** One JSON object a line, ``STATE/edge.log``, rotated at
  ``log_bytes`` with ``log_backups`` old files: the daemon's events and every
  line the SuperNode prints (``event: supernode``).
- **Stopping.** SIGTERM or SIGINT: the SuperNode's process tree gets SIGTERM,
  ``drain_s`` to finish the message it is on (Flower's SuperNode exits after its
  current ClientApp reply), then SIGKILL, each process by PID; the daemon exits
  0 within ``drain_s`` + 1 s.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import logging.handlers
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from qfl.records import as_int

from .edge.ingest import GENERATED, Ingest, describe, open_source
from .edge.spool import STATE_DB, StreamSpool
from .secure import parse_pins

LOG_FILE = "edge.log"
NODE_KEY = "node.key"
CA_FILE = "ca.pem"
# Node config keys the daemon sets on its SuperNode (read by the ClientApp).
STATE_KEY = "qfl-state"  # the daemon's state directory: edge_state_mod records rounds there
KMS_URL_KEY = "kms-url"  # this node's KMS address; overrides the run's kms_url
KMS_CERTS_KEY = "kms-certs"  # this node's KMS credentials (ca.pem, <sae>.pem/.key); overrides kms_certs
DATA_KEY = "qfl-data"  # the kind of the daemon's --data (informative; the ClientApp reads the stream of qfl-state)
# context.state records a daemon's node keeps in its spool across SuperNode restarts (the names of
# qfl.clients.app.CODEC_STATE, qfl.clients.secure.LOG_STATE / PLAN_STATE and MIXTURE_STATE)
MIXTURE_STATE = "edge-mixture"
PERSISTED_RECORDS = ("codec-state", "secagg-log", "secagg-plan", MIXTURE_STATE)
EXIT_ACTIVATION_REFUSED = 305  # flower-supernode: "Failed to activate SuperNode" (key not registered, or node still online)

# What Flower's SuperNode prints, and what the daemon makes of it.
_CONNECTED = re.compile(r"SuperNode ID: (\d+)")
_RECONNECTED = re.compile(r"Connection successful after")
_RETRYING = re.compile(r"Connection attempt failed")
_REFUSED = re.compile(r"Failed to activate SuperNode|Exit Code: 305")
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # the colours of Flower's log lines


@dataclass(frozen=True)
class EdgeConfig:
    """One edge daemon. ``certs`` is the node's bundle from ``qfl certs --node``: TLS root, node key, KMS
    credentials. ``insecure``: plain HTTP to the SuperLink and no node authentication (the bundle, if any,
    still serves the KMS); for loopback tests only."""

    superlink: str
    state_dir: Path
    certs: Path | None = None
    insecure: bool = False
    partition_id: int = 0
    num_partitions: int = 1
    sae: str = ""  # its SAE ID for the KMS; empty = client-<partition_id>
    kms_url: str = ""
    runtime_port: int = 0  # the SuperNode's local Runtime API port; 0 = a free one
    flower_retries: int = 5  # Flower's own reconnect attempts before the SuperNode exits
    stall_s: float = 60.0  # a SuperNode unconnected this long (neither reconnecting nor exiting) is restarted
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 30.0
    drain_s: float = 6.0  # SIGTERM to SIGKILL; with 1 s for stragglers and 2 s after SIGKILL, under 10 s
    log_bytes: int = 1 << 20
    log_backups: int = 5
    data: str = GENERATED  # --data: "generated", a folder, a named pipe, or "-" (stdin); see qfl.clients.edge.ingest
    buffer_s: float = 300.0  # ingest pauses while this many seconds of audio wait to be trained on
    seed: int = 0  # the generated stream's seed
    settle_s: float = 1.0  # a folder's new file is read once unchanged this long
    pins: tuple[str, ...] = ()  # --pin KEY=VALUE: the least protection this node takes part under (secure.NodePins)

    def __post_init__(self) -> None:
        describe(self.data)  # EdgeDataError (a ValueError) for a --data that names no source
        parse_pins(self.pins)  # ValueError naming a pin that is not one
        if self.buffer_s <= 0:
            raise ValueError(f"--buffer must be positive seconds of audio, got {self.buffer_s}")
        if not 0 <= self.partition_id < self.num_partitions:
            raise ValueError(f"partition id {self.partition_id} is not in [0, {self.num_partitions})")
        if self.certs is None and not self.insecure:
            raise ValueError("an edge daemon needs its certificate bundle: pass --certs DIR (DIR/nodes/NAME of `qfl certs --node NAME`)")
        if self.certs is not None:
            missing = [p.name for p in (self.certs / CA_FILE, self.certs / NODE_KEY) if not p.is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{self.certs} lacks {', '.join(missing)}; pass the node's bundle made by "
                    f"`qfl certs --node NAME` (DIR/nodes/NAME)"
                )

    @property
    def sae_id(self) -> str:
        return self.sae or f"client-{self.partition_id}"


def backoff_delay(attempt: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff: U(0, min(cap, base·2^attempt)) seconds."""
    return rng.uniform(0.0, min(cap_s, base_s * (2.0 ** min(attempt, 32))))


# --------------------------------------------------------------------------- durable state


class EdgeState:
    """The daemon's SQLite state: a key/value table, shared by the daemon and its ClientApp processes."""

    def __init__(self, state_dir: str | os.PathLike) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / STATE_DB
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL)")

    def update(self, **fields: Any) -> None:
        """Set fields (JSON values) in one transaction, with ``updated_at``."""
        rows = [(k, json.dumps(v)) for k, v in {**fields, "updated_at": time.time()}.items()]
        with self._lock:
            self._db.executemany("INSERT INTO state(key, value) VALUES(?, ?) "
                                 "ON CONFLICT(key) DO UPDATE SET value = excluded.value", rows)

    def increment(self, key: str, by: int = 1) -> int:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
                value = (json.loads(row[0]) if row else 0) + by
                self._db.execute("INSERT INTO state(key, value) VALUES(?, ?) "
                                 "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, json.dumps(value)))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return value

    def read(self) -> dict[str, Any]:
        with self._lock:
            return {k: json.loads(v) for k, v in self._db.execute("SELECT key, value FROM state ORDER BY key")}

    def close(self) -> None:
        self._db.close()


def read_status(state_dir: str | os.PathLike) -> dict[str, Any]:
    """What ``qfl edge status`` prints: the state table, the stream (``stream``: position, buffered and
    consumed seconds, rounds committed, the open lease), and whether the daemon's PID is alive."""
    path = Path(state_dir) / STATE_DB
    if not path.is_file():
        raise FileNotFoundError(f"{state_dir} holds no {STATE_DB}; pass the --state DIR of `qfl edge run`")
    state = EdgeState(state_dir)
    try:
        status = state.read()
    finally:
        state.close()
    with StreamSpool(state_dir) as spool:
        status["stream"] = spool.summary()
    pid = status.get("daemon_pid")
    status["daemon_alive"] = isinstance(pid, int) and _alive(pid) and status.get("connection") != "stopped"
    return status


def key_left(status: dict[str, Any], peer: str = "server", timeout_s: float = 5.0) -> int | str:
    """Bits left on the link from this node's SAE to ``peer``, asked of its KMS with its own certificate
    (ETSI GS QKD 014 ``status``); a short reason instead when there is no KMS or it cannot be asked."""
    from qfl.errors import KeyLayerError
    from qfl.security.keys.kms_client import KmsKeySource

    keys = status.get("keys") or {}
    sae, url, certs = keys.get("sae"), keys.get("kms_url"), Path(keys.get("certs") or ".")
    if not (sae and url and (certs / f"{sae}.pem").is_file()):
        return "no KMS configured"
    try:
        source = KmsKeySource(url, certs / f"{sae}.pem", certs / f"{sae}.key", certs / CA_FILE, timeout=timeout_s)
        return source.status(sae, peer).left_bits
    except (KeyLayerError, OSError, ValueError) as err:
        return f"KMS not reachable ({type(err).__name__})"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fingerprint(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else ""


# --------------------------------------------------------------------------- the ClientApp side


def dump_record(record: ArrayRecord | ConfigRecord) -> tuple[str, bytes]:
    """A ``context.state`` record as (kind, bytes) for the spool: arrays as ``.npz``, config values as JSON
    (bytes values base64-tagged)."""
    if isinstance(record, ArrayRecord):
        buffer = io.BytesIO()
        arrays: dict[str, Any] = {name: array.numpy() for name, array in record.items()}
        np.savez(buffer, **arrays)
        return "array", buffer.getvalue()

    def encode(value: Any) -> Any:
        if isinstance(value, bytes):
            return {"b64": base64.b64encode(value).decode()}
        return [encode(v) for v in value] if isinstance(value, list) else value

    return "config", json.dumps({k: encode(v) for k, v in record.items()}).encode()


def load_record(kind: str, blob: bytes) -> ArrayRecord | ConfigRecord:
    """The inverse of :func:`dump_record`."""
    if kind == "array":
        with np.load(io.BytesIO(blob), allow_pickle=False) as arrays:
            return ArrayRecord({name: Array(np.ascontiguousarray(arrays[name])) for name in arrays.files})

    def decode(value: Any) -> Any:
        if isinstance(value, dict):
            return base64.b64decode(value["b64"])
        return [decode(v) for v in value] if isinstance(value, list) else value

    return ConfigRecord({k: decode(v) for k, v in json.loads(blob).items()})


def _persisted(context: Context) -> dict[str, tuple[str, bytes]]:
    out = {}
    for name in PERSISTED_RECORDS:
        if name in context.state:
            record = context.state[name]
            if isinstance(record, (ArrayRecord, ConfigRecord)):
                out[name] = dump_record(record)
    return out


def _restore(spool: StreamSpool, context: Context) -> None:
    """Put the spool's records back into a ``context.state`` that lacks them (a SuperNode started afresh)."""
    for name, (kind, blob) in spool.records().items():
        if name in PERSISTED_RECORDS and name not in context.state:
            context.state[name] = load_record(kind, blob)


def node_spool(context: Context) -> StreamSpool | None:
    """The stream of the daemon this node runs under (node config ``qfl-state``); None elsewhere."""
    state_dir = context.node_config.get(STATE_KEY)
    return StreamSpool(str(state_dir)) if state_dir else None


def edge_state_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A Flower mod, the ClientApp's outermost: on a daemon's node (node config ``qfl-state``), make the node's
    state durable and record each message it answers. Elsewhere (simulations) it only passes the message on.

    Before the message: the :data:`PERSISTED_RECORDS` the spool holds are restored into a ``context.state``
    that lacks them. After it (before Flower sends the reply), in one transaction: a train reply commits
    the round's lease of stream windows (they are consumed) with the records; an error reply, or a handler
    that raised, releases it (the windows are buffered again); other messages store the records. A train
    reply whose commit fails is replaced by an error reply: windows not recorded as consumed must not be
    uploaded, or they would be trained on again.
    Fields of the state table: ``last_round`` / ``last_message`` / ``last_message_at``, ``last_lease``
    (the committed windows), and on an error reply ``last_sit_out`` (round and reason: the client sat the
    round out, e.g. its KMS was unreachable or the stream held too little audio).
    """
    spool = node_spool(context)
    if spool is None:
        return call_next(msg, context)
    fields: dict[str, Any] = {"last_message": msg.metadata.message_type, "last_message_at": time.time()}
    config = msg.content.config_records.get("config")
    server_round = as_int(config["server-round"]) if config is not None and "server-round" in config else 0
    if server_round:
        fields["last_round"] = server_round
    try:
        _restore(spool, context)
        try:
            reply = call_next(msg, context)
        except Exception as err:  # noqa: BLE001 -- Flower would make the same error reply; the lease is released
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(err).__name__}: {err}"),
                            reply_to=msg)
        records = _persisted(context)
        if msg.metadata.message_type == MessageType.TRAIN and not reply.has_error():
            try:
                lease = spool.commit(context.run_id, server_round, records)
            except sqlite3.Error as err:  # not recorded as consumed: not sent either (it would be trained on twice)
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                      reason=f"the round's windows could not be committed ({err}); reply withheld"),
                                reply_to=msg)
                lease = None
            if lease is not None:
                fields["last_lease"] = {"run_id": lease.run_id, "round": lease.round, "start": lease.start,
                                        "end": lease.end}
        elif msg.metadata.message_type == MessageType.TRAIN:
            spool.release(records)
        else:
            spool.save(records)
    finally:
        spool.close()
    if reply.has_error():
        fields["last_sit_out"] = {"round": fields.get("last_round"), "message": msg.metadata.message_type,
                                  "reason": reply.error.reason}
        logging.getLogger("qfl.edge").warning("round %s: sat out (%s)", fields.get("last_round"), reply.error.reason)
    try:
        state = EdgeState(spool.dir)
        try:
            state.update(**fields)
        finally:
            state.close()
    except sqlite3.Error as err:  # the reply matters more than the bookkeeping
        logging.getLogger("qfl.edge").warning("edge state %s not updated: %s", spool.dir, err)
    return reply


# --------------------------------------------------------------------------- the supervisor


class _JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname.lower(), "event": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        return json.dumps(entry, default=str)


def free_port() -> int:
    """A loopback TCP port that is free now (bind to port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


MARKER_VAR = "QFL_EDGE_MARKER"  # set in the environment of every process a daemon starts; children inherit it


def marked_processes(marker: str, var: str = MARKER_VAR) -> list[int]:
    """PIDs of the live processes whose environment holds ``var=marker`` (from /proc).

    Children inherit the environment, so this finds what a SuperNode spawned
    (SuperExec, ClientApp processes), also in other sessions or after it died.
    Zombies and processes of other users have no readable environment.
    """
    needle = f"{var}={marker}".encode()
    found: list[int] = []
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit() and int(e) != os.getpid()]
    except OSError:
        return found
    for entry in entries:
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if needle in fh.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def stop_marked(marker: str, grace_s: float, first: Sequence[int] = (), var: str = MARKER_VAR) -> list[int]:
    """SIGTERM ``first``, then every process marked ``var=marker``; SIGKILL what is left after ``grace_s``; by PID.

    ``first`` get ``grace_s`` alone before the rest are signalled, so a
    supervisor can drain its own children. Returns the PIDs still alive after
    SIGKILL (normally none).
    """
    def live() -> list[int]:
        return [p for p in dict.fromkeys([*first, *marked_processes(marker, var)]) if is_running(p)]

    def wait(pids: Any, until: float) -> None:
        while time.monotonic() < until and any(is_running(p) for p in pids()):
            time.sleep(0.1)

    end = time.monotonic() + grace_s
    for pid in first:
        _signal(pid, signal.SIGTERM)
    wait(lambda: first, end)
    for pid in live():
        _signal(pid, signal.SIGTERM)
    wait(live, max(end, time.monotonic() + 1.0))
    for pid in live():
        _signal(pid, signal.SIGKILL)
    wait(live, time.monotonic() + 2.0)
    return live()


class EdgeDaemon:
    """Runs and supervises one SuperNode until :meth:`stop` (or SIGTERM under :meth:`run_forever`)."""

    def __init__(self, cfg: EdgeConfig, executable: str | None = None) -> None:
        self.cfg = cfg
        self.state = EdgeState(cfg.state_dir)
        self.log = self._logger()
        self.executable = executable or str(Path(sys.executable).parent / "flower-supernode")
        self._stop = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._connected = False
        self._unconnected_since = time.monotonic()
        self._ever_connected = bool(self.state.read().get("node_id"))
        self._rng = random.Random()
        self.marker = f"{os.getpid()}-{self._rng.getrandbits(64):016x}"

    def _logger(self) -> logging.Logger:
        logger = logging.getLogger(f"qfl.edge.{self.cfg.state_dir.resolve()}")
        logger.propagate = False
        logger.setLevel(logging.INFO)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        handler = logging.handlers.RotatingFileHandler(
            self.cfg.state_dir / LOG_FILE, maxBytes=self.cfg.log_bytes, backupCount=self.cfg.log_backups
        )
        handler.setFormatter(_JsonLines())
        logger.addHandler(handler)
        return logger

    def _event(self, event: str, level: int = logging.INFO, **fields: Any) -> None:
        self.log.log(level, event, extra={"fields": fields})

    # -- the SuperNode process -------------------------------------------------------------

    def command(self, runtime_port: int) -> list[str]:
        cfg = self.cfg
        node_config = [f"partition-id={cfg.partition_id}", f"num-partitions={cfg.num_partitions}",
                       f'{STATE_KEY}="{cfg.state_dir.resolve()}"', f'{DATA_KEY}="{describe(cfg.data)}"']
        if cfg.kms_url:
            node_config.append(f'{KMS_URL_KEY}="{cfg.kms_url}"')
        if cfg.certs is not None:
            node_config.append(f'{KMS_CERTS_KEY}="{cfg.certs.resolve()}"')
        for key, value in parse_pins(cfg.pins).items():  # TOML values: a share unquoted, a form quoted
            node_config.append(f"{key}={value}" if isinstance(value, float) else f'{key}="{value}"')
        if cfg.insecure or cfg.certs is None:
            tls = ["--insecure"]
        else:
            certs = cfg.certs.resolve()
            tls = ["--root-certificates", str(certs / CA_FILE), "--auth-supernode-private-key", str(certs / NODE_KEY)]
        return [self.executable, *tls, "--superlink", cfg.superlink, "--max-retries", str(cfg.flower_retries),
                "--host", "127.0.0.1", "--port", str(runtime_port), "--node-config", " ".join(node_config)]

    def _start(self) -> subprocess.Popen:
        port = self.cfg.runtime_port or free_port()
        env = {**os.environ, MARKER_VAR: self.marker, "FLWR_HOME": str(self.cfg.state_dir / "flwr-home"),
               "PYTHONUNBUFFERED": "1",
               "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
               "PATH": f"{Path(self.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        work = self.cfg.state_dir / "work"
        work.mkdir(exist_ok=True)
        proc = subprocess.Popen(self.command(port), cwd=work, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        refused = self.state.read().get("connection") == "refused"  # stays so until a connection succeeds
        self.state.update(supernode_pid=proc.pid, connection="refused" if refused else "connecting")
        self._event("supernode started", pid=proc.pid, runtime_port=port)
        return proc

    def _watch(self, proc: subprocess.Popen) -> bool:
        """Log and interpret the SuperNode's output until it exits; True if it was refused (not enrolled)."""
        refused = False
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = ANSI_ESCAPE.sub("", raw.decode(errors="replace")).rstrip()
            if not line:
                continue
            self._event("supernode", line=line)
            if m := _CONNECTED.search(line):
                self._on_connected(node_id=int(m.group(1)))
            elif _RECONNECTED.search(line):
                self._on_connected()
            elif _RETRYING.search(line) and self._connected:
                self._connected = False
                self._unconnected_since = time.monotonic()
                self.state.update(connection="reconnecting")
                self._event("connection lost", level=logging.WARNING)
            elif _REFUSED.search(line):
                refused = True
        return refused

    def _on_connected(self, node_id: int | None = None) -> None:
        if self._connected:
            return
        fields: dict[str, Any] = {"connection": "connected", "connected_at": time.time()}
        if node_id is not None:
            fields["node_id"] = node_id
        if self._ever_connected:
            fields["reconnects"] = self.state.increment("reconnects")
        self._connected = self._ever_connected = True
        self.state.update(**fields)
        self._event("connected", **fields)

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> int:
        """Supervise until :meth:`stop`; returns 0."""
        cfg = self.cfg
        certs = cfg.certs
        self.state.update(
            daemon_pid=os.getpid(), superlink=cfg.superlink, partition_id=cfg.partition_id,
            num_partitions=cfg.num_partitions, started_at=time.time(), connection="starting",
            tls=not cfg.insecure, node_auth=not cfg.insecure,
            keys={"sae": cfg.sae_id, "kms_url": cfg.kms_url, "certs": str(certs.resolve()) if certs else "",
                  "ca_sha256": _fingerprint(certs / CA_FILE) if certs else "",
                  "node_key_sha256": _fingerprint(certs / NODE_KEY) if certs else "",
                  "sae_cert_sha256": _fingerprint(certs / f"{cfg.sae_id}.pem") if certs else ""},
        )
        self._event("daemon started", superlink=cfg.superlink, state=str(cfg.state_dir), data=cfg.data)
        self._stop_previous()
        ingest = self._start_ingest()
        attempt = 0
        while not self._stop.is_set():
            self._proc = proc = self._start()
            verdict: dict[str, bool] = {}
            reader = threading.Thread(target=lambda: verdict.update(refused=self._watch(proc)), daemon=True)
            reader.start()
            self._unconnected_since = time.monotonic()
            rc = self._wait_or_unstall(proc)
            stop_marked(self.marker, grace_s=2.0)  # what it spawned and left behind
            reader.join(timeout=5.0)
            refused = verdict.get("refused", False)
            was_connected, self._connected = self._connected, False
            if self._stop.is_set():
                break
            attempt = 0 if was_connected else attempt + 1
            delay = backoff_delay(attempt, cfg.backoff_base_s, cfg.backoff_cap_s, self._rng)
            refused = refused or rc == EXIT_ACTIVATION_REFUSED % 256
            if refused:
                reason = "activation refused (node key not enrolled, or the node still online from a killed session)"
            else:
                reason = "connection lost" if was_connected else "SuperLink unreachable"
            restarts = self.state.increment("restarts")
            self.state.update(connection="refused" if refused else "backoff", last_exit=rc, last_exit_reason=reason,
                              next_attempt_at=time.time() + delay, supernode_pid=None)
            self._event("supernode exited", level=logging.WARNING, exit_code=rc, reason=reason,
                        retry_in_s=round(delay, 2), restarts=restarts)
            self._stop.wait(delay)
        ingest.stop()
        self.state.update(connection="stopped", supernode_pid=None, stopped_at=time.time())
        self._event("daemon stopped")
        return 0

    def _start_ingest(self) -> Ingest:
        """Release the leases no ClientApp will answer any more (this daemon's SuperNode has not started; a
        previous one's was stopped), then start reading ``--data`` into the stream."""
        cfg = self.cfg
        spool = StreamSpool(cfg.state_dir)
        released = spool.release()
        summary = spool.summary()
        self._event("stream resumed", released_leases=released, buffered_s=round(summary["buffered_s"], 3),
                    consumed_s=round(summary["consumed_s"], 3), source=summary["source"])
        ingest = Ingest(spool, open_source(cfg.data, cfg.partition_id, cfg.num_partitions, cfg.seed, cfg.settle_s),
                        cfg.buffer_s, self.log)
        ingest.start()
        return ingest

    def _stop_previous(self) -> None:
        """A daemon killed with SIGKILL leaves its SuperNode running (its own session): stop that tree, by PID,
        before this daemon starts one with the same node key."""
        previous = self.state.read().get("marker")
        self.state.update(marker=self.marker)
        if not previous or previous == self.marker:
            return
        orphans = marked_processes(previous)
        if orphans:
            left = stop_marked(previous, self.cfg.drain_s)
            self._event("stopped the SuperNode of a previous daemon", level=logging.WARNING, pids=orphans, left=left)

    def _wait_or_unstall(self, proc: subprocess.Popen) -> int:
        """Wait for the SuperNode to exit; stop it (by PID) if it stays unconnected longer than ``stall_s``.

        Flower's SuperNode is meant to exit once its ``--max-retries`` are spent; one that lost the
        SuperLink and then neither reconnected nor exited was observed once in these tests (after a
        SuperLink restart in the middle of a round). The daemon restarts such a one like one that exited.
        """
        while True:
            try:
                return proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
            if self._stop.is_set() or self._connected:
                continue
            if time.monotonic() - self._unconnected_since > self.cfg.stall_s:
                self._event("supernode stalled", level=logging.WARNING, unconnected_s=round(self.cfg.stall_s, 1))
                stop_marked(self.marker, grace_s=2.0, first=[proc.pid])
                return proc.wait()

    def stop(self) -> None:
        """Drain and stop: SIGTERM to the SuperNode and all it spawned, SIGKILL after ``drain_s``, by PID."""
        self._stop.set()
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        self._event("stopping", pid=proc.pid)
        left = stop_marked(self.marker, self.cfg.drain_s, first=[proc.pid])
        try:
            proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
        if left:
            self._event("processes survived SIGKILL", level=logging.ERROR, pids=left)

    def run_forever(self) -> int:
        """:meth:`run` with SIGTERM / SIGINT wired to :meth:`stop` (the process's main thread only)."""
        worker = threading.Thread(target=self.run, name="edge-daemon", daemon=True)

        def on_signal(signum: int, frame: Any) -> None:
            threading.Thread(target=self.stop, name="edge-stop", daemon=True).start()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        worker.start()
        while worker.is_alive():
            worker.join(0.2)
        self.state.close()
        return 0


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def is_running(pid: int) -> bool:
    """Alive and not a zombie (a zombie of ours is reaped by its Popen)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False
