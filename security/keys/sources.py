"""Open the key source a run is configured with: the in-process store or the KMS.

    key_source = "store"   →  KeyStore(key_store)             (SQLite file; simulations)
    key_source = "kms"     →  KmsKeySource(kms_url, …)        (ETSI GS QKD 014 over mTLS; deployments)

Both implement :class:`qfl.security.keys.source.KeySource`, so code that uses keys
never knows which one it has. A KMS source speaks for one SAE (the CN of its
certificate ``<kms_certs>/<sae>.pem``), so each process opens its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qfl.security.keys.source import KeySource

KEY_SOURCES = ("store", "kms")


@dataclass(frozen=True)
class KeySourceConfig:
    key_source: str = "store"
    key_store: str = "keys.db"  # SQLite file, for key_source="store"
    kms_url: str = ""  # https://host:port, for key_source="kms"
    kms_certs: str = ""  # a `qfl certs` directory: ca.pem, <sae>.pem, <sae>.key

    def check(self) -> None:
        if self.key_source not in KEY_SOURCES:
            raise ValueError(f"key_source must be one of {', '.join(KEY_SOURCES)}, got {self.key_source!r}")
        if self.key_source == "kms" and not (self.kms_url.startswith("https://") and self.kms_certs):
            raise ValueError("key_source='kms' needs kms_url='https://host:port' and kms_certs=DIR (from `qfl certs`)")


def open_key_source(cfg: KeySourceConfig, sae: str) -> KeySource:
    """The KeySource through which SAE ``sae`` gets its keys."""
    cfg.check()
    if cfg.key_source == "store":
        from qfl.security.keys.store import KeyStore

        return KeyStore(cfg.key_store)
    from qfl.security.keys.kms_client import KmsKeySource

    certs = Path(cfg.kms_certs)
    missing = [p for p in (certs / "ca.pem", certs / f"{sae}.pem", certs / f"{sae}.key") if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"KMS credentials for SAE {sae!r} not found: {', '.join(map(str, missing))}; "
            f"make them with `qfl certs --out {certs} --sae {sae} ...`"
        )
    return KmsKeySource(cfg.kms_url, certs / f"{sae}.pem", certs / f"{sae}.key", certs / "ca.pem")
