"""A small PKI for the KMS: one CA, a server certificate for the KME, a client certificate per SAE.

ETSI GS QKD 014 (clause 5.1) has SAEs and the KME authenticate each other over
HTTPS with mutual TLS. :func:`make_pki` writes everything ``qfl kms serve`` and
its clients need into one folder:

==================  ==========================================================
``ca.pem``          the CA certificate (self-signed); both sides trust only it
``kme.pem/.key``    the KME's server certificate and key; SAN = IP 127.0.0.1,
                    DNS localhost, plus ``kme_host`` when it is another name
``<SAE>.pem/.key``  one client certificate and key per SAE; subject CN = SAE ID
==================  ==========================================================

For a Flower deployment (``superlink_host`` and ``nodes`` given) it also writes

===========================  =================================================
``superlink.pem/.key``       the SuperLink's TLS server certificate (serverAuth,
                             SAN = 127.0.0.1, localhost, ``superlink_host``):
                             ``flower-superlink --ssl-certfile/--ssl-keyfile``,
                             ``--ssl-ca-certfile ca.pem``
``nodes/<NODE>/``            one bundle per SuperNode, everything that machine
                             needs and nothing of anyone else's: ``ca.pem``
                             (``flower-supernode --root-certificates``),
                             ``node.key`` / ``node.pub`` (its authentication key
                             pair, EC P-384 in OpenSSH format:
                             ``--auth-supernode-private-key node.key``; the
                             SuperLink operator enrols ``node.pub`` with
                             ``flwr supernode register``), and, when NODE is
                             also an SAE, ``<NODE>.pem/.key`` (its KMS client
                             certificate), so the bundle is its ``kms_certs``
``nodes.json``               NODE -> OpenSSH public key: the enrolment list
===========================  =================================================

Flower 1.41 authenticates a SuperNode by an ECDSA signature over a timestamp
with its node key (NIST curve); the SuperLink (``--enable-supernode-auth``)
accepts only public keys registered through its Control API. TLS alone proves
the server to the node; the node key proves the node to the server.

Keys are EC P-256 in unencrypted PKCS#8 PEM, written with mode 0600;
certificates with 0644. Every file is written atomically (temporary file in the
same folder, fsync, rename), so a crash never leaves a half-written key.

The CA's private key is *not* written: nobody can mint further identities from
the folder. :func:`make_pki` returns it in memory (:attr:`Pki.ca_key`) so a
caller, a test for instance, can issue more certificates with
:func:`issue_certificate` in the same process.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from qfl.files import atomic_write_bytes, atomic_write_json

CA_FILE = "ca.pem"
KME_CERT_FILE = "kme.pem"
KME_KEY_FILE = "kme.key"
SUPERLINK_STEM = "superlink"
NODES_DIR = "nodes"
NODES_INDEX = "nodes.json"
NODE_KEY_FILE = "node.key"
NODE_PUB_FILE = "node.pub"
_RESERVED = {"ca", "kme", SUPERLINK_STEM, NODES_DIR}
# SAE IDs become file names and certificate CNs: keep them to a safe alphabet.
_SAE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Pki:
    """Where :func:`make_pki` put its files, and the CA key it kept in memory."""

    dir: Path
    ca_cert: Path
    kme_cert: Path
    kme_key: Path
    sae: dict[str, tuple[Path, Path]]  # SAE ID -> (certificate, key)
    ca_key: ec.EllipticCurvePrivateKey = field(repr=False)
    superlink: tuple[Path, Path] | None = None  # (certificate, key) of the SuperLink, when asked for
    nodes: dict[str, Path] = field(default_factory=dict)  # node name -> its bundle folder

    def sae_cert(self, sae_id: str) -> Path:
        return self.sae[sae_id][0]

    def sae_key(self, sae_id: str) -> Path:
        return self.sae[sae_id][1]


def check_sae_id(sae_id: str) -> str:
    """Return ``sae_id`` if it is usable as a CN and a file name; raise ValueError otherwise."""
    if not isinstance(sae_id, str) or not _SAE_ID.match(sae_id):
        raise ValueError(
            f"SAE ID {sae_id!r}: use 1-64 characters from A-Z a-z 0-9 . _ - , starting with a letter or digit"
        )
    if sae_id.lower() in _RESERVED:
        raise ValueError(f"SAE ID {sae_id!r} is reserved (its files would clash with {sae_id.lower()}.pem)")
    return sae_id


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str | None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "qfl")]
    if common_name is not None:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def _validity(days: int) -> tuple[_dt.datetime, _dt.datetime]:
    now = _dt.datetime.now(_dt.timezone.utc)
    # A little back-dating tolerates clock skew between machines.
    return now - _dt.timedelta(minutes=5), now + _dt.timedelta(days=days)


def make_ca(common_name: str = "qfl QKD CA", days: int = 3650) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA certificate and its key (in memory)."""
    key = _new_key()
    not_before, not_after = _validity(days)
    name = _name(common_name)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue_certificate(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str | None,
    *,
    server_names: list[str] | None = None,
    client: bool = True,
    days: int = 825,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf certificate signed by the CA.

    ``client=True`` gives a TLS client certificate (EKU clientAuth) whose subject
    CN is ``common_name`` (``None``: no CN at all, which the KMS answers with 401).
    ``server_names`` (IP addresses or DNS names) makes it a server certificate
    (EKU serverAuth) with those names as subjectAltName.
    """
    key = _new_key()
    not_before, not_after = _validity(days)
    ekus = []
    if client:
        ekus.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if server_names:
        ekus.append(ExtendedKeyUsageOID.SERVER_AUTH)
        sans: list[x509.GeneralName] = []
        for name in dict.fromkeys(server_names):  # keep order, drop repeats
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if not ekus:
        raise ValueError("a certificate needs client=True or server_names")
    builder = builder.add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_pair(out_dir: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    """Write ``<stem>.pem`` (0644) and ``<stem>.key`` (0600) atomically; return their paths."""
    out_dir = Path(out_dir)
    cert_path, key_path = out_dir / f"{stem}.pem", out_dir / f"{stem}.key"
    atomic_write_bytes(key_path, _key_pem(key), 0o600)
    atomic_write_bytes(cert_path, _cert_pem(cert), 0o644)
    return cert_path, key_path


def write_node_key(bundle: Path) -> str:
    """A fresh SuperNode authentication key pair in ``bundle``: ``node.key`` (0600) and ``node.pub``.

    EC P-384 (Flower accepts NIST curves), OpenSSH encodings, which is what
    ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode
    register`` read. Returns the public key line.
    """
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    atomic_write_bytes(bundle / NODE_KEY_FILE, private, 0o600)
    atomic_write_bytes(bundle / NODE_PUB_FILE, public + b"\n", 0o644)
    return public.decode()


def _unique(kind: str, names: list[str]) -> list[str]:
    checked = [check_sae_id(n) for n in names]
    dupes = sorted({n for n in checked if checked.count(n) > 1})
    if dupes:
        raise ValueError(f"{kind} given more than once: {', '.join(dupes)}")
    return checked


def make_pki(
    out_dir: str | os.PathLike,
    sae_ids: list[str],
    kme_host: str = "127.0.0.1",
    *,
    days: int = 825,
    superlink_host: str | None = None,
    nodes: Sequence[str] = (),
) -> Pki:
    """Create the CA, the KME's server certificate and one client certificate per SAE in ``out_dir``.

    With ``superlink_host`` also the SuperLink's server certificate; with
    ``nodes`` one bundle per SuperNode (see the module docstring). Existing
    files of the same names are replaced (each atomically). Returns a
    :class:`Pki` with the paths and the CA key (kept in memory only).
    """
    ids = _unique("SAE IDs", list(sae_ids))
    if not ids:
        raise ValueError("make_pki needs at least one SAE ID")
    node_names = _unique("node names", list(nodes))
    if not kme_host:
        raise ValueError("kme_host must be an IP address or a DNS name")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    ca_cert, ca_key = make_ca(days=max(days, 1) * 2)
    kme_cert, kme_key = issue_certificate(
        ca_cert, ca_key, "qfl-kme", server_names=["127.0.0.1", "localhost", kme_host], client=False, days=days
    )
    kme_cert_path, kme_key_path = write_pair(out, "kme", kme_cert, kme_key)
    sae: dict[str, tuple[Path, Path]] = {}
    for sae_id in ids:
        cert, key = issue_certificate(ca_cert, ca_key, sae_id, days=days)
        sae[sae_id] = write_pair(out, sae_id, cert, key)
    superlink = None
    if superlink_host is not None:
        names = ["127.0.0.1", "localhost", superlink_host]
        link_cert, link_key = issue_certificate(ca_cert, ca_key, "qfl-superlink", server_names=names, client=False, days=days)
        superlink = write_pair(out, SUPERLINK_STEM, link_cert, link_key)
    bundles: dict[str, Path] = {}
    enrolment: dict[str, str] = {}
    for node in node_names:
        bundle = out / NODES_DIR / node
        enrolment[node] = write_node_key(bundle)
        if node in sae:
            for src in sae[node]:
                atomic_write_bytes(bundle / src.name, src.read_bytes(), src.stat().st_mode & 0o777)
        atomic_write_bytes(bundle / CA_FILE, _cert_pem(ca_cert), 0o644)
        bundles[node] = bundle
    if enrolment:
        atomic_write_json(out / NODES_INDEX, enrolment)
    # The CA certificate goes last: a folder with a ca.pem is a complete one.
    ca_path = out / CA_FILE
    atomic_write_bytes(ca_path, _cert_pem(ca_cert), 0o644)
    return Pki(dir=out, ca_cert=ca_path, kme_cert=kme_cert_path, kme_key=kme_key_path, sae=sae, ca_key=ca_key,
               superlink=superlink, nodes=bundles)


def certificate_common_name(cert_path: str | os.PathLike) -> str:
    """The subject CN of a PEM certificate (the SAE ID of a client certificate)."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        raise ValueError(f"{cert_path}: expected exactly one subject CN, found {len(cns)}")
    value = cns[0].value
    return value if isinstance(value, str) else value.decode()
