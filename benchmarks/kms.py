"""Throughput of the ETSI GS QKD 014 KME over loopback with concurrent mutual-TLS clients.

``bench_kms()`` builds a throw-away PKI and SQLite key store, starts
:class:`qfl.security.keys.kms.KmsServer` on a free port and runs ``n_clients``
threads, each one SAE with its own :class:`~qfl.security.keys.kms_client.KmsKeySource`
(so its own kept-alive TLS connection; the handshake happens before the clock
starts). Each thread makes ``requests_per_client`` requests of one kind:

* ``"enc_keys"``: take one key of ``size_bits`` (a durable SQLite transaction each)
* ``"pair"``: the client takes a key as master, then the ``hub`` SAE fetches it
  with dec_keys over its own connection (two requests counted)
* ``"status"``: read the link's Status (no write)

Clients and server share one Python process (and its GIL), as in a simulation.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

OPS = ("enc_keys", "pair", "status")


def bench_kms(
    n_clients: int = 8,
    requests_per_client: int = 200,
    *,
    op: str = "enc_keys",
    size_bits: int = 256,
    work_dir: str | Path | None = None,
) -> float:
    """Requests per second over all clients (wall clock from the first request to the last answer)."""
    from qfl.security.keys.certs import make_pki
    from qfl.security.keys.kms import KmsServer
    from qfl.security.keys.kms_client import KmsKeySource
    from qfl.security.keys.store import KeyStore

    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if n_clients < 1 or requests_per_client < 1:
        raise ValueError("n_clients and requests_per_client must be at least 1")
    with tempfile.TemporaryDirectory(prefix="qfl-bench-kms-", dir=work_dir) as tmp:
        saes = [f"c{i}" for i in range(n_clients)]
        pki = make_pki(Path(tmp) / "pki", ["hub", *saes])
        store = KeyStore(Path(tmp) / "keys.db")
        need = 0 if op == "status" else requests_per_client * size_bits // 8
        for sae in saes:
            store.add_link(sae, "hub")
            store.deposit(sae, "hub", bytes(need + 64))
        server = KmsServer(store, pki.dir).start()

        def source(sae: str) -> KmsKeySource:
            return KmsKeySource(server.url, pki.sae_cert(sae), pki.sae_key(sae), pki.ca_cert)

        barrier = threading.Barrier(n_clients + 1)
        errors: list[BaseException] = []

        def worker(sae: str) -> None:
            mine, hub = source(sae), source("hub")
            try:
                mine.status(sae, "hub")  # handshakes outside the timed part
                hub.status("hub", sae)
                barrier.wait()
                for _ in range(requests_per_client):
                    if op == "status":
                        mine.status(sae, "hub")
                    else:
                        keys = mine.enc_keys(sae, "hub", 1, size_bits)
                        if op == "pair":
                            got = hub.dec_keys("hub", sae, [keys[0].key_id])
                            if got != keys:
                                raise AssertionError("dec_keys returned other key material than enc_keys")
            except BaseException as e:  # noqa: BLE001 - reported after the run
                errors.append(e)
                barrier.abort()
            finally:
                mine.close()
                hub.close()

        threads = [threading.Thread(target=worker, args=(s,), daemon=True) for s in saes]
        try:
            for t in threads:
                t.start()
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                pass
            start = time.perf_counter()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - start
        finally:
            server.stop()
            store.close()
        if errors:
            raise RuntimeError(f"bench_kms: a client failed: {errors[0]!r}") from errors[0]
    per_round = 2 if op == "pair" else 1
    return n_clients * requests_per_client * per_round / elapsed
