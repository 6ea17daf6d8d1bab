"""A run switches between the in-process store and the KMS by configuration."""

import pytest

from qfl.security.keys.certs import make_pki
from qfl.security.keys.kms import KmsServer
from qfl.security.keys.kms_client import KmsKeySource
from qfl.security.keys.sources import KeySourceConfig, open_key_source
from qfl.security.keys.store import KeyStore


def test_store_and_kms_by_config_give_the_same_keys(tmp_path):
    db = tmp_path / "keys.db"
    with KeyStore(db) as store:
        store.add_link("server", "c0")
        store.deposit("server", "c0", bytes(range(256)) * 4)
    local = open_key_source(KeySourceConfig(key_source="store", key_store=str(db)), "server")
    assert isinstance(local, KeyStore)
    first = local.enc_keys("server", "c0", 1, 256)

    make_pki(tmp_path / "certs", ["server", "c0"])
    server = KmsServer(KeyStore(db), tmp_path / "certs").start()
    try:
        cfg = KeySourceConfig(key_source="kms", kms_url=server.url, kms_certs=str(tmp_path / "certs"))
        master, slave = open_key_source(cfg, "server"), open_key_source(cfg, "c0")
        assert isinstance(master, KmsKeySource)
        second = master.enc_keys("server", "c0", 1, 256)
        assert slave.dec_keys("c0", "server", [second[0].key_id]) == second
        assert local.dec_keys("c0", "server", [first[0].key_id]) == first
        assert first[0].key != second[0].key  # consecutive, never the same bits
        assert master.status("server", "c0") == local.status("server", "c0")
    finally:
        server.stop()


def test_bad_key_source_configs_are_named(tmp_path):
    with pytest.raises(ValueError):  # an unknown key source
        open_key_source(KeySourceConfig(key_source="vault"), "a")
    with pytest.raises(ValueError):  # kms without kms_url
        open_key_source(KeySourceConfig(key_source="kms"), "a")
    with pytest.raises(FileNotFoundError) as err:
        open_key_source(KeySourceConfig(key_source="kms", kms_url="https://127.0.0.1:1", kms_certs=str(tmp_path)), "a")
    assert "qfl certs" in str(err.value)  # the message names the command that makes the certificates
