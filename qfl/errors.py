"""Every exception qfl raises on purpose, in one hierarchy under :class:`QflError`.

Base layer: this module imports nothing from qfl, so every folder may use it
(``tests/test_layering.py``). Each class is defined here once; the module it
belongs to imports it, so ``from qfl.compression.codec import CodecError`` and
the like keep working. A class keeps the builtin base it had before the
hierarchy (``CodecError`` is still a ``ValueError``), so existing ``except
ValueError`` handlers still catch it. ``qfl`` on the command line prints a
:class:`QflError` as one line, ``qfl: <message>``, and exits with status 2.

::

    QflError
    ├── ConfigError (ValueError)              qfl.config: an invalid configuration key or value
    ├── data (qfl.clients)
    │   ├── DatasetNotFound (FileNotFoundError)   a dataset's files are not where expected
    │   └── PartitionError (ValueError)           an impossible split
    ├── compression (qfl.compression)
    │   ├── CodecError (ValueError)               a payload that cannot be decoded
    │   └── PayloadError (ValueError)             an update record with missing/foreign/non-finite arrays
    ├── KeyLayerError                         qfl.security.keys: the QKD key layer
    │   ├── KeyExhausted                          a pool holds fewer bits than requested
    │   ├── UnknownKey                            a key id that does not exist or was delivered
    │   ├── UnknownLink                           no link joins the two SAEs
    │   ├── StoreCorrupt                          a key store whose counters and content disagree
    │   │   └── StoreOutdated                     a key store of an older schema
    │   ├── KmsError                              the KME answered an error (client side)
    │   │   ├── KmsBadRequest (ValueError)
    │   │   ├── KmsUnauthorized
    │   │   ├── KmsUnavailable (ConnectionError)
    │   │   └── WrongSae (ValueError)
    │   └── ApiError                              the KME's answer to a bad request (server side)
    ├── SecAggError (ValueError)              qfl.security.secagg: an upload, share or reveal refused
    │   └── UnknownKeyId
    └── server (qfl.server)
        ├── UntrustedValue (ValueError)           a client-sent value of wrong type or out of range
        ├── ResumeError (RuntimeError)            a run directory that cannot be resumed
        ├── NotEnoughNodes (RuntimeError)         too few nodes connected in time
        ├── KeyBudgetExceeded (RuntimeError)      key_policy=abort and a link cannot pay for the round
        └── RunInterrupted                        Ctrl-C or SIGTERM stopped a run between rounds (exit 130)
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ApiError",
    "CodecError",
    "ConfigError",
    "DatasetNotFound",
    "KeyBudgetExceeded",
    "KeyExhausted",
    "KeyLayerError",
    "KmsBadRequest",
    "KmsError",
    "KmsUnauthorized",
    "KmsUnavailable",
    "NotEnoughNodes",
    "PartitionError",
    "PayloadError",
    "QflError",
    "ResumeError",
    "RunInterrupted",
    "SecAggError",
    "StoreCorrupt",
    "StoreOutdated",
    "UnknownKey",
    "UnknownKeyId",
    "UnknownLink",
    "UntrustedValue",
    "WrongSae",
]


class QflError(Exception):
    """The root of every exception qfl raises on purpose (the module docstring draws the tree)."""


# --------------------------------------------------------------------------- configuration


class ConfigError(QflError, ValueError):
    """A configuration key or value is invalid; the message names the fix, ``key`` the config key at fault
    (None where no single key is: an unreadable file, a ``--set`` without ``=``)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


# --------------------------------------------------------------------------- data (qfl.clients)


class DatasetNotFound(QflError, FileNotFoundError):
    """The files of a dataset are not where they were expected."""


class PartitionError(QflError, ValueError):
    """The requested split is impossible (more clients than samples, ...)."""


# --------------------------------------------------------------------------- compression


class CodecError(QflError, ValueError):
    """A payload cannot be decoded (malformed, truncated, tampered or foreign)."""


class PayloadError(QflError, ValueError):
    """An update record is missing tensors, has foreign arrays, or non-finite values."""


# --------------------------------------------------------------------------- key layer (qfl.security.keys)


class KeyLayerError(QflError):
    """Base class of key-layer errors."""


class KeyExhausted(KeyLayerError):
    """A link's pool holds fewer bits than requested; nothing was taken."""

    def __init__(self, link: str, requested_bits: int, available_bits: int) -> None:
        self.link, self.requested_bits, self.available_bits = link, requested_bits, available_bits
        super().__init__(
            f"link {link!r} has {available_bits} key bits left, {requested_bits} requested; "
            "wait for the link to make more key, lower the key cost (a smaller codec), or change the exhaustion policy"
        )


class UnknownKey(KeyLayerError):
    """A key_id that does not exist, belongs to another link/SAE, or was already delivered."""


class UnknownLink(KeyLayerError):
    """No link joins the two SAEs named."""


class StoreCorrupt(KeyLayerError):
    """The store's counters and its pool content disagree (never expected; the file was edited or damaged)."""


class StoreOutdated(StoreCorrupt):
    """The file was written by an older qfl with another schema; the message names the fix."""


class KmsError(KeyLayerError):
    """The KME answered with an error that is not one of the key-layer errors."""

    def __init__(self, status: int, message: str, details: list[Any] | None = None) -> None:
        self.status, self.message, self.details = status, message, details or []
        super().__init__(f"KME answered {status}: {message}" if status else message)


class KmsBadRequest(KmsError, ValueError):
    """400: the KME found the request malformed (size not a multiple of 8, too many keys...)."""


class KmsUnauthorized(KmsError):
    """401: the client certificate carries no usable SAE identity."""


class KmsUnavailable(KmsError, ConnectionError):
    """The KME could not be reached, or the TLS handshake failed."""


class WrongSae(KmsError, ValueError):
    """The call names an SAE other than the one this source's certificate speaks for."""


class ApiError(KeyLayerError):
    """The KME's refusal of a request, answered with the Error data format (ETSI GS QKD 014, 6.5)."""

    def __init__(self, status: int, code: str, message: str, **detail: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.detail = status, code, message, detail

    def body(self) -> dict[str, Any]:
        """The Error JSON object: the message, and ``code`` with the details under ``qfl_error``."""
        return {"message": self.message, "details": [{"qfl_error": self.code, **self.detail}]}


# --------------------------------------------------------------------------- secure aggregation


class SecAggError(QflError, ValueError):
    """An upload, share or reveal that must not be used: tampered, replayed, malformed or refused."""


class UnknownKeyId(SecAggError):
    """A sealed message names a key id the key layer does not (or no longer) hold: replayed or forged."""


# --------------------------------------------------------------------------- server


class UntrustedValue(QflError, ValueError):
    """A client-sent value is of the wrong type, non-finite or out of range."""


class ResumeError(QflError, RuntimeError):
    """A run directory cannot be resumed."""


class NotEnoughNodes(QflError, RuntimeError):
    """Fewer nodes connected than the run needs, within the timeout."""


class KeyBudgetExceeded(QflError, RuntimeError):
    """key_policy = abort and a link cannot pay for the round."""


class DeploymentError(QflError, RuntimeError):
    """A process of `qfl deploy local` (SuperLink, KMS, edge daemon, `flwr`) failed or did not come up in time."""


class RunInterrupted(QflError):
    """Ctrl-C or SIGTERM stopped a run between rounds; ``run_dir``'s checkpoint holds every complete round."""

    def __init__(self, message: str, run_dir: Any = None) -> None:
        super().__init__(message)
        self.run_dir = run_dir
