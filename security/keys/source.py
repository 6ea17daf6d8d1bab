"""The key interface shared by the in-process key store and the KMS client.

Vocabulary (after ETSI GS QKD 014): a *link* joins two SAEs (secure
application entities: clients, the server). Key made on a link is deposited in
that link's pool. The *master* SAE asks for keys (``enc_keys``) and gets key
containers, each with a ``key_id``; it tells the *slave* the ids; the slave
fetches the same keys by id (``dec_keys``), once. A key is then gone: no bit is
ever handed out twice.

Both :class:`qfl.security.keys.store.KeyStore` (SQLite, in-process) and
:class:`qfl.security.keys.kms_client.KmsKeySource` (HTTPS + mTLS to ``qfl kms
serve``) implement :class:`KeySource`, so a run can switch between them by
config.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from qfl.errors import KeyExhausted as KeyExhausted
from qfl.errors import KeyLayerError as KeyLayerError
from qfl.errors import UnknownKey as UnknownKey
from qfl.errors import UnknownLink as UnknownLink


@dataclass(frozen=True)
class KeyContainer:
    key_id: str  # a UUID string, as in ETSI GS QKD 014
    key: bytes


@dataclass(frozen=True)
class LinkStatus:
    link: str
    master: str
    slave: str
    made_bits: int
    used_bits: int  # reserved by enc_keys (delivered to the master), never reused
    left_bits: int  # made − used


class KeySource(Protocol):
    """What the platform needs from a key provider."""

    def enc_keys(self, master: str, slave: str, number: int, size_bits: int) -> list[KeyContainer]:
        """Take ``number`` fresh keys of ``size_bits`` (multiple of 8) for master→slave; raise KeyExhausted."""

    def dec_keys(self, slave: str, master: str, key_ids: list[str]) -> list[KeyContainer]:
        """The keys with these ids, each exactly once; raise UnknownKey otherwise."""

    def status(self, master: str, slave: str) -> LinkStatus:
        """Counters of the link joining master and slave."""


def enc_key_each(source: KeySource, master: str, slaves: Sequence[str], size_bits: int) -> dict[str, KeyContainer]:
    """One fresh key of ``size_bits`` from ``master`` to each of ``slaves``.

    A source with an ``enc_key_each`` method of its own (the SQLite
    :class:`~qfl.security.keys.store.KeyStore`: one transaction, one disk sync,
    all or nothing) does it at once; otherwise one ``enc_keys`` per slave.
    """
    batch = getattr(source, "enc_key_each", None)
    if batch is not None:
        return dict(batch(master, list(slaves), size_bits))
    return {slave: source.enc_keys(master, slave, 1, size_bits)[0] for slave in slaves}


def dec_key_each(source: KeySource, slave: str, key_ids: Mapping[str, str]) -> dict[str, KeyContainer]:
    """The key with id ``key_ids[master]`` from each master, each once (see :func:`enc_key_each`)."""
    batch = getattr(source, "dec_key_each", None)
    if batch is not None:
        return dict(batch(slave, dict(key_ids)))
    return {master: source.dec_keys(slave, master, [key_id])[0] for master, key_id in key_ids.items()}
