"""The KME: ETSI GS QKD 014 (V1.1.1) key delivery over HTTPS with mutual TLS.

Methods (clause 5), each under ``https://<host>:<port>/api/v1/keys/``:

* ``GET  {slave_SAE_ID}/status``    Get status (5.2); answer: Status (6.1)
* ``GET|POST {slave_SAE_ID}/enc_keys``  Get key (5.3); GET ``?number=&size=``,
  POST a Key request (6.2); answer: Key container (6.4)
* ``GET|POST {master_SAE_ID}/dec_keys``  Get key with key IDs (5.4); GET
  ``?key_ID=``, POST Key IDs (6.3); answer: Key container (6.4)

The calling SAE is the subject CN of its TLS client certificate, which must be
signed by the PKI's CA (:mod:`qfl.security.keys.certs`); nothing in the request can
name the caller. Status codes are the four the specification uses: 200; 400 for a
malformed request, an unknown SAE or link, an unknown / foreign / already
delivered key_ID, a size that is not a multiple of 8 or outside
[min_key_size, max_key_size], more keys than max_key_per_request; 401 when the
certificate carries no usable identity; 503 when the link's pool holds too little
key (:class:`~qfl.security.keys.source.KeyExhausted`) or the store fails. (Paths and
methods outside the API get plain HTTP 404, 405 or 501.) Error bodies
use the Error format (6.5): ``{"message": str, "details": [{...}]}``; the first
detail has a ``"qfl_error"`` code that :mod:`qfl.security.keys.kms_client` maps back to
the key-layer exceptions. Validation happens before the store is touched and
the store takes nothing when it raises, so a failed request takes no key.

TLS: version 1.2 or 1.3, and AEAD cipher suites only, on the KME and on its
client alike (:func:`qfl.security.keys.kms_client.restrict_to_aead`): on TLS 1.2
ECDHE with AES-GCM or ChaCha20-Poly1305; TLS 1.3 suites are all AEAD. A peer
that offers only CBC (or static-RSA) suites fails the handshake.

Not implemented: multicast keys (``additional_slave_SAE_IDs``; the status says
``max_SAE_ID_count = 0``) and extensions (a non-empty ``extension_mandatory`` is
refused with 400, as 6.2 asks of a KME that does not support one).
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import ssl
import threading
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, unquote, urlsplit

from qfl.errors import ApiError
from qfl.security.keys.certs import CA_FILE, KME_CERT_FILE, KME_KEY_FILE
from qfl.security.keys.kms_client import restrict_to_aead
from qfl.security.keys.source import KeyContainer, KeyExhausted, KeySource, LinkStatus, UnknownKey, UnknownLink

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1/keys/"
MAX_BODY_BYTES = 1 << 20


@dataclass(frozen=True)
class KmsLimits:
    """What the KME announces in Status (6.1) and enforces on requests (sizes in bits)."""

    key_size: int = 256  # default size when a request names none
    min_key_size: int = 8
    max_key_size: int = 1 << 26  # 8 MiB per key
    max_key_per_request: int = 1024

    def __post_init__(self) -> None:
        for name in ("key_size", "min_key_size", "max_key_size"):
            if getattr(self, name) % 8 or getattr(self, name) <= 0:
                raise ValueError(f"KmsLimits.{name} must be a positive multiple of 8")
        if not self.min_key_size <= self.key_size <= self.max_key_size:
            raise ValueError("KmsLimits needs min_key_size <= key_size <= max_key_size")
        if self.max_key_per_request < 1:
            raise ValueError("KmsLimits.max_key_per_request must be >= 1")


def _bad(message: str, code: str = "bad_request", **detail: Any) -> ApiError:
    return ApiError(400, code, message, **detail)


def _int_field(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{name} must be an integer, got {value!r}")
    return value


def _int_param(values: list[str], name: str) -> int:
    if len(values) != 1:
        raise _bad(f"query parameter {name} given {len(values)} times")
    text = values[0].strip()
    if not text.isdigit():
        raise _bad(f"query parameter {name} must be a non-negative integer, got {values[0]!r}")
    return int(text)


def _key_id(value: Any) -> str:
    if not isinstance(value, str):
        raise _bad(f"key_ID must be a string, got {value!r}")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise _bad(f"key_ID {value!r} is not a UUID", "unknown_key") from None


def _parse_json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(f"request body is not JSON: {e}") from None


def _container(keys: list[KeyContainer]) -> dict[str, Any]:
    return {"keys": [{"key_ID": k.key_id, "key": base64.b64encode(k.key).decode("ascii")} for k in keys]}


def status_object(st: LinkStatus, master: str, slave: str, kme_id: str, limits: KmsLimits) -> dict[str, Any]:
    """Status (6.1) from a LinkStatus; counts are of ``key_size``-bit keys.

    The pool has no fixed capacity, so ``max_key_count`` is the number of
    default-size keys the link has made in all. ``status_extension`` carries the
    exact bit counters (and the store's own link orientation) for qfl's client.
    """
    return {
        "source_KME_ID": kme_id,
        "target_KME_ID": kme_id,
        "master_SAE_ID": master,
        "slave_SAE_ID": slave,
        "key_size": limits.key_size,
        "stored_key_count": st.left_bits // limits.key_size,
        "max_key_count": st.made_bits // limits.key_size,
        "max_key_per_request": limits.max_key_per_request,
        "max_key_size": limits.max_key_size,
        "min_key_size": limits.min_key_size,
        "max_SAE_ID_count": 0,
        "status_extension": {
            "qfl_link": st.link,
            "qfl_master": st.master,
            "qfl_slave": st.slave,
            "made_bits": st.made_bits,
            "used_bits": st.used_bits,
            "left_bits": st.left_bits,
        },
    }


class KmsApi:
    """The protocol logic, independent of HTTP: (caller, method, path, query, body) -> (status, JSON)."""

    def __init__(self, store: KeySource, kme_id: str = "qfl-kme", limits: KmsLimits | None = None) -> None:
        self.store, self.kme_id, self.limits = store, kme_id, limits or KmsLimits()
        # The store is shared by every connection thread; one call at a time keeps
        # any KeySource safe (a SQLite store serialises its writes anyway).
        self._lock = threading.Lock()

    def handle(self, caller: str, method: str, sae_id: str, action: str, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        try:
            if action == "status":
                if method != "GET":
                    raise ApiError(405, "method_not_allowed", "status takes GET only")
                if query:
                    raise _bad(f"status takes no query parameters, got {sorted(query)}")
                return 200, self._status(caller, sae_id)
            if action == "enc_keys":
                number, size = self._key_request(method, query, body)
                return 200, self._enc_keys(caller, sae_id, number, size)
            if action == "dec_keys":
                ids = self._key_ids(method, query, body)
                return 200, self._dec_keys(caller, sae_id, ids)
            raise ApiError(404, "not_found", f"no method {action!r}; use status, enc_keys or dec_keys")
        except ApiError as e:
            return e.status, e.body()

    # -- requests ------------------------------------------------------------
    def _key_request(self, method: str, query: dict[str, list[str]], body: Any) -> tuple[int, int]:
        lim = self.limits
        if method == "GET":
            extra = sorted(set(query) - {"number", "size"})
            if extra:
                raise _bad(f"unknown query parameters {extra}; Get key takes number and size")
            number = _int_param(query["number"], "number") if "number" in query else 1
            size = _int_param(query["size"], "size") if "size" in query else lim.key_size
        else:
            if query:
                raise _bad("POST enc_keys takes its parameters in the JSON body, not the query")
            if not isinstance(body, dict):
                raise _bad("the Key request must be a JSON object")
            extra = sorted(set(body) - {"number", "size", "additional_slave_SAE_IDs", "extension_mandatory", "extension_optional"})
            if extra:
                raise _bad(f"unknown Key request fields {extra}")
            if body.get("additional_slave_SAE_IDs"):
                raise _bad("additional_slave_SAE_IDs: this KME delivers to one slave only (max_SAE_ID_count = 0)")
            if body.get("extension_mandatory"):
                raise _bad("extension_mandatory: this KME supports no extensions", "unsupported_extension")
            number = _int_field(body.get("number", 1), "number")
            size = _int_field(body.get("size", lim.key_size), "size")
        if number < 1:
            raise _bad(f"number must be at least 1, got {number}")
        if number > lim.max_key_per_request:
            raise _bad(f"number {number} exceeds max_key_per_request {lim.max_key_per_request}")
        if size % 8:
            raise _bad(f"size {size} is not a multiple of 8")
        if not lim.min_key_size <= size <= lim.max_key_size:
            raise _bad(f"size {size} is outside [{lim.min_key_size}, {lim.max_key_size}] bits")
        return number, size

    def _key_ids(self, method: str, query: dict[str, list[str]], body: Any) -> list[str]:
        if method == "GET":
            extra = sorted(set(query) - {"key_ID"})
            if extra:
                raise _bad(f"unknown query parameters {extra}; Get key with key IDs takes key_ID")
            values = query.get("key_ID", [])
            if len(values) != 1:
                raise _bad("GET dec_keys takes exactly one key_ID; POST Key IDs for several")
            ids = [_key_id(values[0])]
        else:
            if query:
                raise _bad("POST dec_keys takes its parameters in the JSON body, not the query")
            if not isinstance(body, dict) or not isinstance(body.get("key_IDs"), list):
                raise _bad('Key IDs must be a JSON object {"key_IDs": [{"key_ID": ...}, ...]}')
            extra = sorted(set(body) - {"key_IDs", "key_IDs_extension"})
            if extra:
                raise _bad(f"unknown Key IDs fields {extra}")
            ids = []
            for item in body["key_IDs"]:
                if not isinstance(item, dict) or "key_ID" not in item:
                    raise _bad(f'each entry of key_IDs must be {{"key_ID": ...}}, got {item!r}')
                ids.append(_key_id(item["key_ID"]))
        if not ids:
            raise _bad("key_IDs is empty")
        if len(ids) > self.limits.max_key_per_request:
            raise _bad(f"{len(ids)} key_IDs exceed max_key_per_request {self.limits.max_key_per_request}")
        if len(set(ids)) != len(ids):
            raise _bad("a key_ID is named twice", "unknown_key")
        return ids

    # -- store calls -----------------------------------------------------------
    def _call(self, fn: Callable[[], Any]) -> Any:
        try:
            with self._lock:
                return fn()
        except KeyExhausted as e:
            raise ApiError(
                503, "key_exhausted", str(e),
                link=e.link, requested_bits=e.requested_bits, available_bits=e.available_bits,
            ) from None
        except UnknownLink as e:
            raise _bad(str(e), "unknown_link") from None
        except UnknownKey as e:
            raise _bad(str(e), "unknown_key") from None
        except ValueError as e:  # the store's own argument checks
            raise _bad(str(e)) from None
        except Exception as e:  # noqa: BLE001 - a broken store is the server's side (503), never a crash
            log.exception("key store failed")
            raise ApiError(503, "store_error", f"key store error: {type(e).__name__}") from None

    def _status(self, caller: str, slave: str) -> dict[str, Any]:
        st = self._call(lambda: self.store.status(caller, slave))
        return status_object(st, caller, slave, self.kme_id, self.limits)

    def _enc_keys(self, caller: str, slave: str, number: int, size: int) -> dict[str, Any]:
        return _container(self._call(lambda: self.store.enc_keys(caller, slave, number, size)))

    def _dec_keys(self, caller: str, master: str, ids: list[str]) -> dict[str, Any]:
        return _container(self._call(lambda: self.store.dec_keys(caller, master, ids)))


def peer_identity(tls: ssl.SSLSocket) -> str | None:
    """The subject CN of a verified client certificate, or None (no certificate, no CN, several CNs)."""
    try:
        cert = tls.getpeercert()
    except (ValueError, OSError):
        return None
    if not cert:
        return None
    # subject: a tuple of RDNs, each a tuple of (name, value) pairs; typeshed types a value as str | tuple
    cns = [value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]  # type: ignore[str-unpack]
    if len(cns) != 1 or not cns[0]:
        return None
    return cns[0]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    server_version = "qfl-kme/1"
    sys_version = ""
    timeout = 120  # idle keep-alive connections close after this
    wbufsize = 1 << 16  # headers and body leave in one TLS record / TCP segment
    server: "_TlsHttpServer"

    def setup(self) -> None:
        super().setup()
        self.caller = peer_identity(self.connection)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("%s %s", self.address_string(), format % args)

    def _reply(self, status: int, payload: Any) -> None:
        data = json.dumps(payload, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")  # responses hold key material
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # http.server's own errors (bad request line, unsupported method...) in the 6.5 format too.
        self.close_connection = True
        try:
            self._reply(code, ApiError(code, "http_error", message or explain or "error").body())
        except OSError:
            pass

    def _dispatch(self, method: str) -> None:
        try:
            raw = self._read_body()
        except ApiError as e:  # the stream is out of step now: answer and close
            self.close_connection = True
            return self._reply(e.status, e.body())
        if self.caller is None:
            return self._reply(401, ApiError(401, "unauthorized", "the client certificate has no single subject CN (SAE ID)").body())
        parts = urlsplit(self.path)
        rest = parts.path[len(API_PREFIX):].split("/") if parts.path.startswith(API_PREFIX) else []
        if len(rest) != 2 or not rest[0]:
            return self._reply(404, ApiError(404, "not_found", f"no resource {parts.path!r}; use {API_PREFIX}<SAE_ID>/<status|enc_keys|dec_keys>").body())
        sae_id, action = unquote(rest[0]), rest[1]
        try:
            query = parse_qs(parts.query, keep_blank_values=True)
            body = _parse_json(raw) if method == "POST" else None
        except ApiError as e:
            return self._reply(e.status, e.body())
        try:
            status, payload = self.server.api.handle(self.caller, method, sae_id, action, query, body)
        except Exception:  # noqa: BLE001 - a bug here must still answer in the 6.5 format
            log.exception("KME failed on %s %s", method, parts.path)
            status, payload = 503, ApiError(503, "internal_error", "internal KME error").body()
        self._reply(status, payload)

    def _read_body(self) -> bytes:
        """The whole request body (also for GET, so the keep-alive stream stays in step)."""
        if self.headers.get("Transfer-Encoding"):
            raise _bad("chunked request bodies are not supported; send Content-Length")
        text = (self.headers.get("Content-Length") or "0").strip()
        if not text.isdigit():
            raise _bad(f"bad Content-Length {text!r}")
        n = int(text)
        if n > MAX_BODY_BYTES:
            raise _bad(f"request body of {n} bytes exceeds {MAX_BODY_BYTES}")
        data = self.rfile.read(n) if n else b""
        if len(data) != n:
            raise _bad("request body shorter than its Content-Length")
        return data

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")


class _TlsHttpServer(ThreadingHTTPServer):
    """A threading HTTP server that does each TLS handshake in the connection's own thread."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, addr: tuple[str, int], ctx: ssl.SSLContext, api: KmsApi, handshake_timeout: float) -> None:
        if ":" in addr[0]:
            self.address_family = socket.AF_INET6
        self.ssl_context, self.api, self.handshake_timeout = ctx, api, handshake_timeout
        self._live: set[socket.socket] = set()
        self._live_lock = threading.Lock()
        self.handshakes = 0  # completed TLS handshakes (connections that reached HTTP)
        super().__init__(addr, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the FQDN of the host, which can stall on DNS.
        import socketserver

        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def finish_request(self, request: socket.socket, client_address: Any) -> None:  # type: ignore[override]
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        request.settimeout(self.handshake_timeout)
        try:
            tls = self.ssl_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as e:
            # A certificate from another CA, no certificate, plain HTTP, a timeout...
            log.info("TLS handshake with %s refused: %s", client_address, e)
            return
        with self._live_lock:
            self._live.add(tls)
            self.handshakes += 1
        try:
            self.RequestHandlerClass(tls, client_address, self)  # type: ignore[arg-type]  # typeshed wants Self of BaseServer
        except (ssl.SSLError, OSError) as e:
            log.debug("connection from %s ended: %s", client_address, e)
        finally:
            with self._live_lock:
                self._live.discard(tls)
            try:
                tls.close()
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("error serving %s", client_address)

    def close_live_connections(self) -> None:
        with self._live_lock:
            live = list(self._live)
        for s in live:
            try:
                # The plain socket's shutdown: the handler thread blocked in a TLS read sees EOF.
                socket.socket.shutdown(s, socket.SHUT_RDWR)
            except OSError:
                pass


def server_context(certs_dir: str | Path) -> ssl.SSLContext:
    """TLS ≥ 1.2 with AEAD suites only (ECDHE + AES-GCM / ChaCha20-Poly1305 on TLS 1.2, see
    :data:`qfl.security.keys.kms_client.TLS12_AEAD_CIPHERS`), the KME's certificate, and client
    certificates required and checked against ca.pem."""
    d = Path(certs_dir)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    restrict_to_aead(ctx)
    ctx.load_cert_chain(d / KME_CERT_FILE, d / KME_KEY_FILE)
    ctx.load_verify_locations(d / CA_FILE)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class KmsServer:
    """The KME on a background thread: ``start()``, then ``url``; ``stop()`` closes every connection."""

    def __init__(
        self,
        store: KeySource,
        certs_dir: str | Path,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        kme_id: str = "qfl-kme",
        limits: KmsLimits | None = None,
        handshake_timeout: float = 10.0,
    ) -> None:
        self.api = KmsApi(store, kme_id, limits)
        self._httpd = _TlsHttpServer((host, port), server_context(certs_dir), self.api, handshake_timeout)
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()

    @property
    def host(self) -> str:
        return str(self._httpd.server_address[0])

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    def start(self) -> "KmsServer":
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="qfl-kms", daemon=True
            )
            self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Block until :meth:`stop` is called (True) or ``timeout`` seconds pass (False)."""
        return self._stopped.wait(timeout)

    def stop(self) -> None:
        """Stop serving, close every connection; idempotent, callable from any thread."""
        with self._stop_lock:
            if self._thread is not None:
                self._httpd.shutdown()  # returns once serve_forever has stopped
                self._thread.join(timeout=5)
                self._thread = None
            self.close()
            self._stopped.set()

    @property
    def handshakes(self) -> int:
        """How many TLS handshakes succeeded so far (a kept-alive client makes one)."""
        return self._httpd.handshakes

    def drop_connections(self) -> None:
        """Close every open client connection (clients reconnect on their next request)."""
        self._httpd.close_live_connections()

    def close(self) -> None:
        """Close the listening socket and every open connection."""
        self._httpd.close_live_connections()
        self._httpd.server_close()

    def __enter__(self) -> "KmsServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def serve(
    store_path: str | Path,
    certs_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8443,
    ready_callback: Callable[[KmsServer], None] | None = None,
    *,
    limits: KmsLimits | None = None,
) -> None:
    """Serve the SQLite key store at ``store_path`` until Ctrl-C, SIGTERM or ``server.stop()``.

    ``ready_callback(server)`` runs once the KME accepts connections
    (``server.url`` has the real port when ``port`` is 0); keep ``server`` to
    stop it from another thread.
    """
    import signal

    from qfl.security.keys.store import KeyStore

    store = KeyStore(store_path)
    server = KmsServer(store, certs_dir, host, port, limits=limits)

    def _term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGTERM, _term)
    try:
        server.start()
        if ready_callback is not None:
            ready_callback(server)
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        if old is not None:
            signal.signal(signal.SIGTERM, old)
        close = getattr(store, "close", None)
        if callable(close):
            close()
