"""Every exception qfl raises on purpose, in one hierarchy under :class:`QflError`.

Base layer: this module imports nothing from qfl, so every folder may use it
(``tests/test_layering.py``). Each class is defined here once; the module it
belongs to imports it, so ``from qfl.compression.codec import CodecError`` and
the like keep working. A class keeps the builtin base it had before the
hierarchy (``CodecError`` is still a ``ValueError``), so existing ``except
ValueError`` handlers still catch it. ``qfl`` on the command line prints a
:class:`QflError` as one line, ``qfl: <message>``, and exits with status 2.

Where one class covers several causes it is a :class:`ReasonedError` and
carries ``reason``, a member of its own enum (``CodecError.reason`` is a
:class:`CodecReason`); ``ConfigError.key`` and ``UntrustedValue.key`` name the
value at fault. Code and tests branch on those fields, never on the message:
the message is for people (the cause and the fix) and may be reworded.

::

    QflError
    ├── ConfigError (ValueError)              qfl.config: an invalid configuration key or value
    ├── data (qfl.clients)
    │   ├── DatasetNotFound (FileNotFoundError)   a dataset's files are not where expected
    │   ├── PartitionError (ValueError)           an impossible split                     reason: PartitionReason
    │   └── EdgeDataError (ValueError)            an edge daemon's --data source or its buffered stream
    │                                                                                     reason: EdgeDataReason
    ├── compression (qfl.compression)
    │   ├── CodecError (ValueError)               a payload that cannot be decoded        reason: CodecReason
    │   ├── PayloadError (ValueError)             an update record with missing/foreign/non-finite arrays
    │   │                                                                                 reason: PayloadReason
    │   └── DownlinkOutOfSync (RuntimeError)      a client's model replica disagrees with the server's
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
    │   │                                                                                 reason: SecAggReason
    │   └── UnknownKeyId                          reason: always REPLAYED
    └── server (qfl.server)
        ├── UntrustedValue (ValueError)           a client-sent value of wrong type or out of range
        │                                                                                 reason: UntrustedReason, key
        ├── ResumeError (RuntimeError)            a run directory that cannot be resumed  reason: ResumeReason
        ├── NotEnoughNodes (RuntimeError)         too few nodes connected in time         connected, needed
        ├── KeyBudgetExceeded (RuntimeError)      key_policy=abort and a link cannot pay for the round
        ├── DeploymentError (RuntimeError)        a process of `qfl deploy local` failed  reason: DeploymentReason
        └── RunInterrupted                        Ctrl-C or SIGTERM stopped a run between rounds (exit 130)
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Generic, TypeVar

__all__ = [
    "ApiError",
    "CodecError",
    "CodecReason",
    "ConfigError",
    "DatasetNotFound",
    "DeploymentError",
    "DeploymentReason",
    "DownlinkOutOfSync",
    "EdgeDataError",
    "EdgeDataReason",
    "KeyBudgetExceeded",
    "KeyExhausted",
    "KeyLayerError",
    "KmsBadRequest",
    "KmsError",
    "KmsUnauthorized",
    "KmsUnavailable",
    "NotEnoughNodes",
    "PartitionError",
    "PartitionReason",
    "PayloadError",
    "PayloadReason",
    "QflError",
    "ReasonedError",
    "ResumeError",
    "ResumeReason",
    "RunInterrupted",
    "SecAggError",
    "SecAggReason",
    "StoreCorrupt",
    "StoreOutdated",
    "UnknownKey",
    "UnknownKeyId",
    "UnknownLink",
    "UntrustedReason",
    "UntrustedValue",
    "WrongSae",
]


class QflError(Exception):
    """The root of every exception qfl raises on purpose (the module docstring draws the tree)."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickle (Ray, multiprocessing) without calling __init__ again: several subclasses take
        # keyword fields (``reason``, ``key``) or several arguments that ``args`` alone does not hold.
        return _restore, (type(self), self.args, self.__dict__)


def _restore(cls: type[QflError], args: tuple[Any, ...], state: dict[str, Any]) -> QflError:
    err = cls.__new__(cls, *args)
    err.args = args
    err.__dict__.update(state)
    return err


R = TypeVar("R", bound=Enum)


class ReasonedError(QflError, Generic[R]):
    """An error type that covers several causes; ``reason`` names which one (tests and callers
    branch on it, never on the message, which is for people: the cause and the fix)."""

    def __init__(self, message: str, *, reason: R) -> None:
        super().__init__(message)
        self.reason = reason


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


class PartitionReason(Enum):
    BAD_ARGUMENT = "alpha or the client count is out of range"
    TOO_FEW_SAMPLES = "more clients than training samples"
    NO_SPLIT = "no draw gave every client its minimum size"


class PartitionError(ReasonedError[PartitionReason], ValueError):
    """The requested split is impossible (more clients than samples, ...)."""


class EdgeDataReason(str, Enum):
    """Why an edge daemon's data cannot be used (:attr:`EdgeDataError.reason`)."""

    NO_SUCH_SOURCE = "no-such-source"  # --data names a path that does not exist
    NOT_A_SOURCE = "not-a-source"  # --data names a path that is neither a folder nor a named pipe
    NOT_ENOUGH_AUDIO = "not-enough-audio"  # a round found less than one batch of windows buffered


class EdgeDataError(QflError, ValueError):
    """An edge daemon's ``--data`` source cannot be used, or its stream holds too little audio for a round;
    ``reason`` is an :class:`EdgeDataReason`, the message names the fix."""

    def __init__(self, message: str, reason: EdgeDataReason) -> None:
        super().__init__(message)
        self.reason = reason


# --------------------------------------------------------------------------- compression


class CodecReason(Enum):
    NOT_BYTES = "the payload is not bytes"
    BAD_MAGIC = "the payload does not start with the qfl magic"
    VERSION = "a wire version this qfl does not read"
    WRONG_CODEC = "written by another codec, entropy method or inner codec"
    BAD_HEADER = "a header field out of range (dtype code, dimensions)"
    OVERSIZE = "claims or expands to more than any tensor qfl sends"
    SHAPE_MISMATCH = "a shape other than the one expected"
    TRUNCATED = "shorter than its fields need"
    WRONG_LENGTH = "a body longer than its fields, or bytes after the last value"
    BAD_PARAMETER = "a parameter field out of range (bits, bucket, k, rank, Rice parameter)"
    BAD_VALUE = "a value the encoder never writes (negative scale, invalid code, padding bits)"
    CORRUPT = "a compressed stream that does not decompress"
    UNENCODABLE = "a tensor the wire format cannot carry (encode side)"


class CodecError(ReasonedError[CodecReason], ValueError):
    """A payload cannot be decoded (malformed, truncated, tampered or foreign)."""


class PayloadReason(Enum):
    TENSOR_MISMATCH = "tensors missing, unexpected or of the wrong shape"
    FOREIGN_ARRAY = "an array that is not a qfl payload"
    UNDECODABLE = "a tensor's payload the codec refuses (``__cause__`` is the CodecError)"
    NON_FINITE = "a tensor holding NaN or Inf"


class PayloadError(ReasonedError[PayloadReason], ValueError):
    """An update record is missing tensors, has foreign arrays, or non-finite values."""


class DownlinkOutOfSync(QflError, RuntimeError):
    """Under ``downlink_mode = "delta"``, a client's replica of the model is not the one the server's
    message builds on (another version, or a digest that differs); the server sends it the whole replica next."""


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


class SecAggReason(Enum):
    BAD_PLAN = "a round plan that cannot run (mode, masking, participants, threshold, ring size, graph)"
    UNSUMMABLE_CODEC = "the round's codec, or one of its parameters, has no ring form"
    MALFORMED = "a message or record of the wrong form"
    WRONG_SIZE = "an upload, share or reveal of the wrong size"
    BAD_MAC = "fails its MAC: tampered in transit or sealed for another round"
    REPLAYED = "a key id spent or unknown, or a second upload or answer in one round"
    BAD_REQUEST = "an unmask request inconsistent with the round (round, survivors, dropped)"
    TOO_FEW = "too few peers, survivors or shares to unmask"
    NO_KEYS = "the pair keys or the key store the round needs are missing"
    REFUSED = "the other side answered with an error"
    SETUP = "the node is not set up for it (no secagg_mod, no partition-id, no key store, a plan weaker than the node pins)"


class SecAggError(ReasonedError[SecAggReason], ValueError):
    """An upload, share or reveal that must not be used: tampered, replayed, malformed or refused."""


class UnknownKeyId(SecAggError):
    """A sealed message names a key id the key layer does not (or no longer) hold: replayed or forged."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason=SecAggReason.REPLAYED)


# --------------------------------------------------------------------------- server


class UntrustedReason(Enum):
    WRONG_TYPE = "not a number, or not an integer"
    NOT_FINITE = "NaN or Inf, or too large for a float"
    OUT_OF_RANGE = "outside its allowed interval"
    INCONSISTENT = "does not agree with the other values sent"


class UntrustedValue(ReasonedError[UntrustedReason], ValueError):
    """A client-sent value is of the wrong type, non-finite or out of range; ``key`` names it."""

    def __init__(self, message: str, *, reason: UntrustedReason, key: str) -> None:
        super().__init__(message, reason=reason)
        self.key = key


class ResumeReason(Enum):
    NO_CONFIG = "the directory holds no run config"
    MODEL_MISMATCH = "the checkpoint is of another model"


class ResumeError(ReasonedError[ResumeReason], RuntimeError):
    """A run directory cannot be resumed."""


class NotEnoughNodes(QflError, RuntimeError):
    """Fewer nodes connected than the run needs, within the timeout."""

    def __init__(self, message: str, *, connected: int, needed: int) -> None:
        super().__init__(message)
        self.connected, self.needed = connected, needed


class KeyBudgetExceeded(QflError, RuntimeError):
    """key_policy = abort and a link cannot pay for the round."""


class DeploymentReason(Enum):
    NOT_INSTALLED = "no source checkout, or a program missing from the virtual environment"
    BAD_REQUEST = "a deployment the processes cannot form (too few nodes)"
    EXITED = "a process exited or a command failed"
    TIMEOUT = "a process or run did not come up or finish in time"
    NO_RUN_ID = "`flwr run` printed no run id"
    SURVIVED_KILL = "processes survived SIGKILL"


class DeploymentError(ReasonedError[DeploymentReason], RuntimeError):
    """A process of `qfl deploy local` (SuperLink, KMS, edge daemon, `flwr`) failed or did not come up in time."""


class RunInterrupted(QflError):
    """Ctrl-C or SIGTERM stopped a run between rounds; ``run_dir``'s checkpoint holds every complete round."""

    def __init__(self, message: str, run_dir: Any = None) -> None:
        super().__init__(message)
        self.run_dir = run_dir
