"""The ETSI GS QKD 014 KME over real HTTPS with mutual TLS on loopback, its client, and the PKI."""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import stat
import threading
import uuid

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from qfl.security.keys.certs import certificate_common_name, issue_certificate, make_pki, write_pair
from qfl.security.keys.kms import KmsLimits, KmsServer
from qfl.security.keys.kms_client import (
    KmsBadRequest,
    KmsKeySource,
    KmsUnauthorized,
    KmsUnavailable,
    WrongSae,
    client_context,
)
from qfl.security.keys.source import KeyContainer, KeyExhausted, UnknownKey, UnknownLink
from qfl.security.keys.store import KeyStore

POOL_BYTES = 4096  # per link
SAES = ["A", "B", "C"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"), SAES)


@pytest.fixture(scope="module")
def foreign_pki(tmp_path_factory):
    """Another CA issuing a certificate with the same CN: the KME must not trust it."""
    return make_pki(tmp_path_factory.mktemp("foreign"), ["A"])


@pytest.fixture
def store(tmp_path):
    s = KeyStore(tmp_path / "keys.db")
    for a, b in (("A", "B"), ("A", "C"), ("B", "C")):
        s.add_link(a, b)
        s.deposit(a, b, os.urandom(POOL_BYTES))
    yield s
    s.close()


@pytest.fixture
def kms(store, pki):
    server = KmsServer(store, pki.dir, limits=KmsLimits(max_key_per_request=64)).start()
    yield server
    server.stop()


@pytest.fixture
def client(kms, pki):
    """client("A") -> a KmsKeySource holding A's certificate; closed after the test."""
    made = []

    def make(sae: str) -> KmsKeySource:
        src = KmsKeySource(kms.url, pki.sae_cert(sae), pki.sae_key(sae), pki.ca_cert)
        made.append(src)
        return src

    yield make
    for src in made:
        src.close()


def call(kms, pki, sae, method, path, body=None, *, cert=None, key=None):
    """One raw HTTPS request as SAE ``sae``; returns (status, decoded JSON)."""
    ctx = client_context(cert or pki.sae_cert(sae), key or pki.sae_key(sae), pki.ca_cert)
    conn = http.client.HTTPSConnection("127.0.0.1", kms.port, context=ctx, timeout=10)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def assert_error(status, obj, expected):
    assert status == expected, obj
    assert isinstance(obj["message"], str) and obj["message"]
    assert isinstance(obj["details"], list) and isinstance(obj["details"][0], dict)


# -- the three methods ---------------------------------------------------------


def test_enc_keys_then_dec_keys_give_identical_keys(kms, client):
    a, b = client("A"), client("B")
    keys = a.enc_keys("A", "B", 3, 256)
    assert len(keys) == 3 and all(len(k.key) == 32 for k in keys)
    assert len({k.key_id for k in keys}) == 3
    for k in keys:
        uuid.UUID(k.key_id)
    assert b.dec_keys("B", "A", [k.key_id for k in keys]) == keys
    st = a.status("A", "B")
    assert (st.made_bits, st.used_bits, st.left_bits) == (8 * POOL_BYTES, 768, 8 * POOL_BYTES - 768)


def test_get_forms_and_status_object(kms, pki):
    status, obj = call(kms, pki, "A", "GET", "/api/v1/keys/B/enc_keys?number=2&size=64")
    assert status == 200 and len(obj["keys"]) == 2
    status, default = call(kms, pki, "A", "GET", "/api/v1/keys/B/enc_keys")  # number 1, size key_size
    assert status == 200 and len(default["keys"]) == 1
    kid = obj["keys"][0]["key_ID"]
    status, got = call(kms, pki, "B", "GET", f"/api/v1/keys/A/dec_keys?key_ID={kid}")
    assert status == 200 and got["keys"] == [obj["keys"][0]]

    status, st = call(kms, pki, "A", "GET", "/api/v1/keys/B/status")
    assert status == 200
    assert set(st) >= {
        "source_KME_ID", "target_KME_ID", "master_SAE_ID", "slave_SAE_ID", "key_size", "stored_key_count",
        "max_key_count", "max_key_per_request", "max_key_size", "min_key_size", "max_SAE_ID_count",
    }
    assert (st["master_SAE_ID"], st["slave_SAE_ID"]) == ("A", "B")
    used = 2 * 64 + 256
    assert st["stored_key_count"] == (8 * POOL_BYTES - used) // st["key_size"]
    assert st["max_key_per_request"] == 64 and st["max_SAE_ID_count"] == 0
    assert st["status_extension"]["used_bits"] == used


def test_second_dec_keys_of_same_id_is_400(kms, pki, client):
    keys = client("A").enc_keys("A", "B", 1, 128)
    body = {"key_IDs": [{"key_ID": keys[0].key_id}]}
    assert call(kms, pki, "B", "POST", "/api/v1/keys/A/dec_keys", body)[0] == 200
    status, obj = call(kms, pki, "B", "POST", "/api/v1/keys/A/dec_keys", body)
    assert_error(status, obj, 400)
    with pytest.raises(UnknownKey):
        client("B").dec_keys("B", "A", [keys[0].key_id])


def test_unknown_sae_is_400(kms, pki, client):
    for path in ("/api/v1/keys/NOBODY/status", "/api/v1/keys/NOBODY/enc_keys"):
        assert_error(*call(kms, pki, "A", "GET", path), 400)
    status, obj = call(kms, pki, "B", "POST", "/api/v1/keys/NOBODY/dec_keys", {"key_IDs": [{"key_ID": str(uuid.uuid4())}]})
    assert_error(status, obj, 400)
    with pytest.raises(UnknownLink):
        client("A").enc_keys("A", "NOBODY", 1, 64)


def test_key_id_of_another_pair_is_400_and_not_consumed(kms, pki, client):
    for_c = client("A").enc_keys("A", "C", 1, 64)[0]
    # B names the right master but the key was made for C; B also tries it as if from master C.
    for master in ("A", "C"):
        status, obj = call(kms, pki, "B", "GET", f"/api/v1/keys/{master}/dec_keys?key_ID={for_c.key_id}")
        assert_error(status, obj, 400)
    with pytest.raises(UnknownKey):
        client("B").dec_keys("B", "A", [for_c.key_id])
    assert client("C").dec_keys("C", "A", [for_c.key_id]) == [for_c]  # still there for its slave


def test_identity_comes_from_the_certificate(kms, pki, client):
    keys = client("A").enc_keys("A", "B", 2, 64)
    ids = [k.key_id for k in keys]
    # C asks for keys addressed to slave B: the KME reads "C" from the certificate, whatever C claims.
    body = {"key_IDs": [{"key_ID": k} for k in ids]}
    assert_error(*call(kms, pki, "C", "POST", "/api/v1/keys/A/dec_keys", body), 400)
    # A cannot fetch its own keys as if it were the slave either.
    assert_error(*call(kms, pki, "A", "POST", "/api/v1/keys/A/dec_keys", body), 400)
    # The client refuses to speak for an SAE whose certificate it does not hold.
    with pytest.raises(WrongSae):
        client("C").dec_keys("B", "A", ids)
    with pytest.raises(WrongSae):
        client("C").enc_keys("A", "B", 1, 64)
    assert client("B").dec_keys("B", "A", ids) == keys  # nothing was consumed by the attempts


def test_more_key_than_the_pool_is_503_and_takes_nothing(kms, pki, client, store):
    before = store.status("A", "B")
    status, obj = call(kms, pki, "A", "POST", "/api/v1/keys/B/enc_keys", {"number": 2, "size": 8 * POOL_BYTES})
    assert_error(status, obj, 503)
    assert obj["details"][0]["available_bits"] == before.left_bits
    with pytest.raises(KeyExhausted) as exc:
        client("A").enc_keys("A", "B", 1, 8 * POOL_BYTES + 8)
    assert (exc.value.requested_bits, exc.value.available_bits) == (8 * POOL_BYTES + 8, before.left_bits)
    assert exc.value.link == before.link
    assert store.status("A", "B") == before
    assert client("A").status("A", "B") == before
    assert len(client("A").enc_keys("A", "B", 1, 8 * POOL_BYTES)[0].key) == POOL_BYTES  # exactly all is fine


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("POST", "/api/v1/keys/B/enc_keys", {"number": 1, "size": 100}),  # not a multiple of 8
        ("GET", "/api/v1/keys/B/enc_keys?size=12", None),
        ("POST", "/api/v1/keys/B/enc_keys", {"number": 65, "size": 8}),  # > max_key_per_request
        ("POST", "/api/v1/keys/B/enc_keys", {"number": 0}),
        ("POST", "/api/v1/keys/B/enc_keys", {"number": True}),
        ("POST", "/api/v1/keys/B/enc_keys", {"number": "2"}),
        ("POST", "/api/v1/keys/B/enc_keys", {"size": 1 << 40}),  # > max_key_size
        ("POST", "/api/v1/keys/B/enc_keys", {"nuber": 2}),
        ("POST", "/api/v1/keys/B/enc_keys", {"additional_slave_SAE_IDs": ["C"]}),
        ("POST", "/api/v1/keys/B/enc_keys", {"extension_mandatory": [{"x": 1}]}),
        ("POST", "/api/v1/keys/B/enc_keys", b"{not json"),
        ("POST", "/api/v1/keys/B/enc_keys", [1, 2]),
        ("GET", "/api/v1/keys/B/enc_keys?number=two", None),
        ("GET", "/api/v1/keys/B/enc_keys?number=1&number=2", None),
        ("POST", "/api/v1/keys/A/dec_keys", {"key_IDs": "x"}),
        ("POST", "/api/v1/keys/A/dec_keys", {"key_IDs": []}),
        ("POST", "/api/v1/keys/A/dec_keys", {"key_IDs": [{"key_ID": "not-a-uuid"}]}),
        ("GET", "/api/v1/keys/A/dec_keys", None),
    ],
)
def test_malformed_requests_are_400_and_take_nothing(kms, pki, store, method, path, body):
    before = store.status("A", "B")
    sae = "B" if "dec_keys" in path else "A"
    assert_error(*call(kms, pki, sae, method, path, body), 400)
    assert store.status("A", "B") == before


def test_client_maps_bad_requests_to_value_error(kms, client):
    with pytest.raises(KmsBadRequest) as exc:  # 100 bits: not a multiple of 8
        client("A").enc_keys("A", "B", 1, 100)
    assert isinstance(exc.value, ValueError) and exc.value.status == 400
    with pytest.raises(UnknownKey):
        client("B").dec_keys("B", "A", ["not-a-uuid"])


def test_unknown_resource_and_method(kms, pki):
    assert_error(*call(kms, pki, "A", "GET", "/api/v1/keys/B/nothing"), 404)
    assert_error(*call(kms, pki, "A", "GET", "/elsewhere"), 404)
    assert_error(*call(kms, pki, "A", "POST", "/api/v1/keys/B/status", {}), 405)
    assert_error(*call(kms, pki, "A", "PUT", "/api/v1/keys/B/enc_keys", {}), 501)


def test_kms_client_pickles(kms, client):
    import pickle

    a = client("A")
    a.status("A", "B")
    copy = pickle.loads(pickle.dumps(a))
    try:
        assert copy.sae_id == "A" and copy.status("A", "B") == a.status("A", "B")
    finally:
        copy.close()


# -- TLS and identity ------------------------------------------------------------


def _raw_tls(kms, ctx):
    """Handshake and one request over a raw TLS socket; return the first bytes of the answer."""
    with socket.create_connection(("127.0.0.1", kms.port), timeout=10) as s:
        with ctx.wrap_socket(s, server_hostname="127.0.0.1") as t:
            t.sendall(b"GET /api/v1/keys/B/status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            return t.recv(64)


@pytest.mark.parametrize("tls", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_certificate_from_another_ca_is_refused_at_the_handshake(kms, pki, foreign_pki, tls):
    ctx = client_context(foreign_pki.sae_cert("A"), foreign_pki.sae_key("A"), pki.ca_cert)
    ctx.maximum_version = tls
    if tls == ssl.TLSVersion.TLSv1_2:  # fails inside the handshake, with the KME's alert
        with pytest.raises(ssl.SSLError) as exc:
            _raw_tls(kms, ctx)
        assert exc.value.reason == "TLSV1_ALERT_UNKNOWN_CA"  # OpenSSL's code for the alert
    else:
        # TLS 1.3: the client's side of the handshake ends before the KME checks its
        # certificate; the first read then gets the alert, or EOF / reset when the
        # KME's close overtakes it.
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            _raw_tls(kms, ctx)
    assert kms.handshakes == 0  # the request never reached HTTP


@pytest.mark.parametrize("tls", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_client_without_certificate_is_refused_at_the_handshake(kms, pki, tls):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki.ca_cert)
    ctx.maximum_version = tls
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        _raw_tls(kms, ctx)
    assert kms.handshakes == 0


def test_kms_client_reports_a_refused_handshake(kms, pki, foreign_pki):
    src = KmsKeySource(kms.url, foreign_pki.sae_cert("A"), foreign_pki.sae_key("A"), pki.ca_cert)
    with pytest.raises(KmsUnavailable) as exc:
        src.status("A", "B")
    assert isinstance(exc.value.__cause__, (ssl.SSLError, ConnectionResetError))


def test_client_checks_the_kme_certificate(kms, pki, foreign_pki):
    """A client trusting another CA refuses the KME (mutual authentication, both ways)."""
    src = KmsKeySource(kms.url, pki.sae_cert("A"), pki.sae_key("A"), foreign_pki.ca_cert)
    with pytest.raises(KmsUnavailable) as exc:
        src.status("A", "B")
    assert isinstance(exc.value.__cause__, ssl.SSLCertVerificationError)


CBC_TLS12 = "ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384:ECDHE-RSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA"


def test_only_aead_suites_are_negotiable_on_the_kme_and_its_client(pki):
    from qfl.security.keys.kms import server_context

    for ctx in (server_context(pki.dir), client_context(pki.sae_cert("A"), pki.sae_key("A"), pki.ca_cert)):
        suites = ctx.get_ciphers()
        tls12 = [c for c in suites if c["protocol"] == "TLSv1.2"]
        assert tls12, suites
        assert all(c["aead"] and c["kea"] == "kx-ecdhe" for c in tls12), [c["name"] for c in tls12]
        assert all(("GCM" in c["name"] or "CHACHA20" in c["name"]) for c in tls12)
        assert all("Mac=AEAD" in c["description"] and "CBC" not in c["description"] for c in tls12)
        assert all(c["aead"] for c in suites)  # TLS 1.3 suites too
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


def test_a_client_offering_only_cbc_suites_fails_the_handshake(kms, pki):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki.ca_cert)
    ctx.load_cert_chain(pki.sae_cert("A"), pki.sae_key("A"))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # TLS 1.3 would pick one of its own (AEAD) suites
    ctx.set_ciphers(CBC_TLS12)
    offered = [c for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]  # (get_ciphers lists TLS 1.3 too)
    assert offered and not any(c["aead"] for c in offered)
    with pytest.raises(ssl.SSLError) as exc:
        _raw_tls(kms, ctx)
    assert exc.value.reason in {"SSLV3_ALERT_HANDSHAKE_FAILURE", "NO_SHARED_CIPHER", "NO_CIPHERS_AVAILABLE"}
    assert kms.handshakes == 0
    # the same certificate over TLS 1.2 with the project's client context gets an AEAD suite
    good = client_context(pki.sae_cert("A"), pki.sae_key("A"), pki.ca_cert)
    good.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", kms.port), timeout=10) as s:
        with good.wrap_socket(s, server_hostname="127.0.0.1") as t:
            name, version, _ = t.cipher()
            assert version == "TLSv1.2" and name.startswith("ECDHE-") and ("GCM" in name or "CHACHA20" in name)


def test_certificate_without_cn_is_401(kms, pki, tmp_path):
    ca_cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    cert, key = issue_certificate(ca_cert, pki.ca_key, None)
    cert_path, key_path = write_pair(tmp_path, "nocn", cert, key)
    status, obj = call(kms, pki, None, "GET", "/api/v1/keys/B/status", cert=cert_path, key=key_path)
    assert_error(status, obj, 401)
    with pytest.raises(KmsUnauthorized):  # how the client reads that answer
        KmsKeySource._decode(status, json.dumps(obj).encode(), ("A", "B"))
    with pytest.raises(ValueError):  # a certificate without a CN
        KmsKeySource(kms.url, cert_path, key_path, pki.ca_cert)  # the client needs an identity too


# -- connections -------------------------------------------------------------------


def test_keep_alive_reuses_one_connection_and_survives_a_drop(kms, client):
    a = client("A")
    for _ in range(20):
        a.status("A", "B")
    assert kms.handshakes == 1
    kms.drop_connections()  # the KME closes idle connections (restart, idle timeout...)
    assert a.status("A", "B").link == "A~B"  # retried on a fresh connection
    assert kms.handshakes == 2


def test_concurrent_clients_get_disjoint_keys(kms, client, store):
    sources = {s: client(s) for s in ("A", "B", "C")}
    pairs = [("A", "B"), ("A", "C"), ("B", "C"), ("B", "A"), ("C", "A"), ("C", "B")]
    got: dict[tuple[str, str], list[KeyContainer]] = {p: [] for p in pairs}
    errors = []

    def work(master, slave):
        try:
            for _ in range(15):
                got[(master, slave)] += sources[master].enc_keys(master, slave, 2, 64)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=p) for p in pairs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    material = [k.key for keys in got.values() for k in keys]
    assert len(material) == 6 * 15 * 2 and len(set(material)) == len(material)
    for (master, slave), keys in got.items():
        assert sources[slave].dec_keys(slave, master, [k.key_id for k in keys]) == keys
    assert store.verify() == []


# -- the same KeySource contract, in-process and over the KME ------------------------


@pytest.fixture(params=["store", "kms"])
def source_for(request, store, pki):
    """source_for(sae) -> a KeySource acting for that SAE."""
    if request.param == "store":
        yield lambda sae: store
        return
    server = KmsServer(store, pki.dir).start()
    made = {}

    def make(sae):
        if sae not in made:
            made[sae] = KmsKeySource(server.url, pki.sae_cert(sae), pki.sae_key(sae), pki.ca_cert)
        return made[sae]

    yield make
    for src in made.values():
        src.close()
    server.stop()


def test_contract_round_trip_and_once_only(source_for):
    keys = source_for("A").enc_keys("A", "B", 2, 128)
    assert [len(k.key) for k in keys] == [16, 16]
    assert source_for("B").dec_keys("B", "A", [k.key_id for k in keys]) == keys
    with pytest.raises(UnknownKey):
        source_for("B").dec_keys("B", "A", [keys[0].key_id])
    st = source_for("A").status("A", "B")
    assert (st.link, st.master, st.slave, st.used_bits) == ("A~B", "A", "B", 256)


def test_contract_exhaustion_takes_nothing(source_for):
    a = source_for("A")
    before = a.status("A", "B")
    with pytest.raises(KeyExhausted) as exc:
        a.enc_keys("A", "B", 3, 8 * POOL_BYTES // 2)
    assert (exc.value.link, exc.value.requested_bits, exc.value.available_bits) == (
        "A~B", 12 * POOL_BYTES, 8 * POOL_BYTES,
    )
    assert a.status("A", "B") == before


def test_contract_errors(source_for):
    with pytest.raises(UnknownLink):
        source_for("A").enc_keys("A", "NOBODY", 1, 8)
    with pytest.raises(UnknownLink):
        source_for("A").status("A", "NOBODY")
    with pytest.raises(ValueError):
        source_for("A").enc_keys("A", "B", 1, 12)
    key = source_for("A").enc_keys("A", "C", 1, 64)[0]
    with pytest.raises(UnknownKey):  # made for C, asked by B
        source_for("B").dec_keys("B", "A", [key.key_id])
    with pytest.raises(UnknownKey):  # all or nothing: one unknown id delivers none
        source_for("C").dec_keys("C", "A", [key.key_id, str(uuid.uuid4())])
    assert source_for("C").dec_keys("C", "A", [key.key_id]) == [key]


# -- PKI ---------------------------------------------------------------------------------


def test_pki_files_modes_and_names(pki):
    names = sorted(p.name for p in pki.dir.iterdir())
    assert names == sorted(["ca.pem", "kme.pem", "kme.key"] + [f"{s}.{e}" for s in SAES for e in ("pem", "key")])
    for p in pki.dir.iterdir():
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o600 if p.suffix == ".key" else 0o644), p
    assert serialization.load_pem_private_key(pki.sae_key("A").read_bytes(), None)
    for sae in SAES:
        assert certificate_common_name(pki.sae_cert(sae)) == sae
    kme = x509.load_pem_x509_certificate(pki.kme_cert.read_bytes())
    san = kme.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.subject == ca.issuer and kme.issuer == ca.subject


def test_pki_rejects_bad_sae_ids(tmp_path):
    for bad in (["../x"], ["ca"], ["A", "A"], [], ["a b"]):
        with pytest.raises(ValueError):
            make_pki(tmp_path / "bad", bad)
    p = make_pki(tmp_path / "host", ["A"], kme_host="kme.example")
    kme = x509.load_pem_x509_certificate(p.kme_cert.read_bytes())
    san = kme.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "kme.example"]
    assert kme.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "qfl-kme"


def test_serve_runs_until_stopped(pki, tmp_path):
    from qfl.security.keys.kms import serve

    db = tmp_path / "serve.db"
    with KeyStore(db) as s:
        s.add_link("A", "B")
        s.deposit("A", "B", bytes(64))
    ready = threading.Event()
    servers = []

    def on_ready(server):
        servers.append(server)
        ready.set()

    t = threading.Thread(target=serve, args=(db, pki.dir, "127.0.0.1", 0, on_ready), daemon=True)
    t.start()
    assert ready.wait(10)
    src = KmsKeySource(servers[0].url, pki.sae_cert("A"), pki.sae_key("A"), pki.ca_cert)
    try:
        assert src.status("A", "B").made_bits == 512
    finally:
        src.close()
    servers[0].stop()
    t.join(10)
    assert not t.is_alive()


def test_bench_kms_runs():
    from qfl.benchmarks.kms import bench_kms

    assert bench_kms(n_clients=8, requests_per_client=10) > 0
