"""A :class:`~qfl.security.keys.source.KeySource` that asks a KME over ETSI GS QKD 014 (HTTPS + mutual TLS).

One ``KmsKeySource`` speaks for one SAE: the one named in its client
certificate's subject CN (:attr:`KmsKeySource.sae_id`). It can therefore be
the master of ``enc_keys`` and ``status`` and the slave of ``dec_keys`` only
for that SAE; asking for another raises :class:`WrongSae` before anything is
sent (the KME would ignore the name anyway and use the certificate).

HTTP answers map back to the key-layer errors with the server's message:
503 with ``key_exhausted`` -> :class:`~qfl.security.keys.source.KeyExhausted`
(same link and bit counts), 400 ``unknown_key`` ->
:class:`~qfl.security.keys.source.UnknownKey`, 400 ``unknown_link`` ->
:class:`~qfl.security.keys.source.UnknownLink`, other 400 -> :class:`KmsBadRequest`
(also a ValueError), 401 -> :class:`KmsUnauthorized`; a connection or TLS
failure -> :class:`KmsUnavailable` (its ``__cause__`` is the ``ssl.SSLError``
or ``OSError``).

Connections are kept alive and pooled: a call borrows an idle connection (or
opens one) and gives it back, so one source can be used from several threads
and sequential calls pay for one TLS handshake only.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
import threading
from typing import Any
from urllib.parse import quote, urlsplit

from qfl.errors import KmsBadRequest, KmsError, KmsUnauthorized, KmsUnavailable, WrongSae
from qfl.security.keys.certs import certificate_common_name
from qfl.security.keys.source import KeyContainer, KeyExhausted, LinkStatus, UnknownKey, UnknownLink

API_PREFIX = "/api/v1/keys/"


#: The TLS 1.2 cipher suites the KME and its clients negotiate (OpenSSL cipher string): ECDHE
#: key exchange (forward secrecy) with an AEAD cipher, AES-GCM or ChaCha20-Poly1305. CBC suites
#: (MAC-then-encrypt, the Lucky-13 / padding-oracle family), static RSA and DHE are left out. TLS 1.3
#: suites are all AEAD and are not governed by this string (OpenSSL sets them apart).
TLS12_AEAD_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def restrict_to_aead(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """Limit ``ctx`` to TLS >= 1.2 and AEAD cipher suites (:data:`TLS12_AEAD_CIPHERS`); return it.

    Raises ``ssl.SSLError`` if the OpenSSL build offers none of them (then upgrade OpenSSL), and
    ``RuntimeError`` if a non-AEAD suite would still be negotiable.
    """
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_AEAD_CIPHERS)
    loose = [c["name"] for c in ctx.get_ciphers() if not c.get("aead")]
    if loose:
        raise RuntimeError(f"non-AEAD TLS suites still enabled: {loose}; check the OpenSSL cipher configuration")
    return ctx


def client_context(cert: str | os.PathLike, key: str | os.PathLike, ca: str | os.PathLike) -> ssl.SSLContext:
    """TLS ≥ 1.2 with AEAD suites only, the server checked against ``ca`` and its hostname, our certificate presented."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED by default
    restrict_to_aead(ctx)
    ctx.load_verify_locations(ca)
    ctx.load_cert_chain(cert, key)
    return ctx


class KmsKeySource:
    """Keys from a KME at ``base_url`` (``https://host:port``) for the SAE named in ``cert``."""

    def __init__(
        self,
        base_url: str,
        cert: str | os.PathLike,
        key: str | os.PathLike,
        ca: str | os.PathLike,
        *,
        timeout: float = 30.0,
        max_idle: int = 8,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"KMS URL {base_url!r}: expected https://host:port")
        self.base_url = base_url.rstrip("/")
        self._host, self._port = parts.hostname, parts.port or 443
        self._prefix = parts.path.rstrip("/") + API_PREFIX
        self._ctx = client_context(cert, key, ca)
        self.sae_id = certificate_common_name(cert)
        self.timeout, self._max_idle = timeout, max_idle
        self._files = (os.fspath(cert), os.fspath(key), os.fspath(ca))
        self._idle: list[http.client.HTTPSConnection] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()

    # Pickling (Ray / multiprocessing workers) sends the URL and file paths only;
    # the copy builds its own TLS context and connections.
    def __getstate__(self) -> dict[str, Any]:
        return {"base_url": self.base_url, "files": self._files, "timeout": self.timeout, "max_idle": self._max_idle}

    def __setstate__(self, state: dict[str, Any]) -> None:
        cert, key, ca = state["files"]
        self.__init__(state["base_url"], cert, key, ca, timeout=state["timeout"], max_idle=state["max_idle"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"KmsKeySource({self.base_url!r}, sae_id={self.sae_id!r})"

    # -- KeySource -----------------------------------------------------------
    def enc_keys(self, master: str, slave: str, number: int, size_bits: int) -> list[KeyContainer]:
        self._check_self(master, "master of enc_keys")
        body = {"number": number, "size": size_bits}
        return self._keys(self._request("POST", slave, "enc_keys", body, link=(master, slave)))

    def dec_keys(self, slave: str, master: str, key_ids: list[str]) -> list[KeyContainer]:
        self._check_self(slave, "slave of dec_keys")
        body = {"key_IDs": [{"key_ID": k} for k in key_ids]}
        return self._keys(self._request("POST", master, "dec_keys", body, link=(master, slave)))

    def status(self, master: str, slave: str) -> LinkStatus:
        self._check_self(master, "master of status")
        obj = self._request("GET", slave, "status", None, link=(master, slave))
        ext = obj.get("status_extension") or {}
        try:
            return LinkStatus(
                link=ext["qfl_link"], master=ext["qfl_master"], slave=ext["qfl_slave"],
                made_bits=int(ext["made_bits"]), used_bits=int(ext["used_bits"]), left_bits=int(ext["left_bits"]),
            )
        except (KeyError, TypeError, ValueError):
            # Another vendor's KME: only whole default-size keys are known.
            size = int(obj["key_size"])
            left = int(obj["stored_key_count"]) * size
            made = max(int(obj.get("max_key_count", 0)) * size, left)
            return LinkStatus(f"{master}->{slave}", obj["master_SAE_ID"], obj["slave_SAE_ID"], made, made - left, left)

    def etsi_status(self, slave: str) -> dict[str, Any]:
        """The raw Status object (6.1) for the link from this SAE to ``slave``."""
        return self._request("GET", slave, "status", None, link=(self.sae_id, slave))

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def __enter__(self) -> "KmsKeySource":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- HTTP ------------------------------------------------------------------
    def _check_self(self, sae: str, role: str) -> None:
        if sae != self.sae_id:
            raise WrongSae(0, f"this KMS client holds the certificate of SAE {self.sae_id!r}; it cannot act as {role} {sae!r}")

    @staticmethod
    def _keys(obj: dict[str, Any]) -> list[KeyContainer]:
        try:
            return [KeyContainer(k["key_ID"], base64.b64decode(k["key"], validate=True)) for k in obj["keys"]]
        except (KeyError, TypeError, ValueError) as e:
            raise KmsError(200, f"malformed Key container from the KME: {e}") from None

    def _connection(self) -> tuple[http.client.HTTPSConnection, bool]:
        with self._lock:
            if self._pid != os.getpid():  # forked: the pooled TLS sessions belong to the parent
                self._idle, self._pid = [], os.getpid()
            if self._idle:
                return self._idle.pop(), True
        return http.client.HTTPSConnection(self._host, self._port, context=self._ctx, timeout=self.timeout), False

    def _release(self, conn: http.client.HTTPSConnection) -> None:
        with self._lock:
            if len(self._idle) < self._max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def _request(self, method: str, sae: str, action: str, body: Any, *, link: tuple[str, str]) -> dict[str, Any]:
        path = f"{self._prefix}{quote(sae, safe='')}/{action}"
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json", "Accept": "application/json"} if data is not None else {"Accept": "application/json"}
        for attempt in (0, 1):
            conn, reused = self._connection()
            try:
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ssl.SSLEOFError, ssl.SSLZeroReturnError) as e:
                conn.close()
                # A kept-alive connection the KME had already closed: the request never
                # reached it, so one retry on a fresh connection is safe.
                if reused and attempt == 0:
                    continue
                raise KmsUnavailable(0, f"KME at {self.base_url} closed the connection: {e}") from e
            except (OSError, http.client.HTTPException) as e:  # ssl.SSLError is an OSError
                conn.close()
                raise KmsUnavailable(0, f"cannot reach the KME at {self.base_url}: {e}") from e
            if resp.will_close:
                conn.close()
            else:
                self._release(conn)
            return self._decode(resp.status, raw, link)
        raise AssertionError("unreachable")

    @staticmethod
    def _decode(status: int, raw: bytes, link: tuple[str, str]) -> dict[str, Any]:
        try:
            obj = json.loads(raw) if raw else {}
        except ValueError:
            obj = {"message": raw[:200].decode("utf-8", "replace")}
        if status == 200:
            if not isinstance(obj, dict):
                raise KmsError(status, "the KME answered with something other than a JSON object")
            return obj
        message = str(obj.get("message", "")) if isinstance(obj, dict) else str(obj)
        details = obj.get("details") if isinstance(obj, dict) and isinstance(obj.get("details"), list) else []
        first = details[0] if details and isinstance(details[0], dict) else {}
        code = first.get("qfl_error")
        if status == 503 and code == "key_exhausted":
            try:
                exc = KeyExhausted(str(first["link"]), int(first["requested_bits"]), int(first["available_bits"]))
            except (KeyError, TypeError, ValueError):
                exc = KeyExhausted(f"{link[0]}->{link[1]}", -1, -1)
            raise exc
        if status == 400 and code == "unknown_key":
            raise UnknownKey(message)
        if status == 400 and code == "unknown_link":
            raise UnknownLink(message)
        if status == 400:
            raise KmsBadRequest(status, message, details)
        if status == 401:
            raise KmsUnauthorized(status, message, details)
        raise KmsError(status, message or f"HTTP {status}", details)

