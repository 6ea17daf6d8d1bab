"""A compressed downlink that stays exact: model deltas against the clients' replica.

``downlink_mode = "model"`` (the default) sends the global model itself each
round, encoded by a stateless ``downlink_codec``. ``downlink_mode = "delta"``
sends only what changed, compressed by any codec, and stays exact in the sense
that clients and server agree bit for bit on the weights the clients hold.

The server keeps the **replica** r, the weights every synced client holds: r₀
is the task's initial model (every client builds it itself from the run seed),
and each sync towards the server's weights w sends

    p   = C(w − r)                (float32 difference, the downlink codec C)
    r  ← r + decode(p)            (float32 addition, the same on both ends)

so r is exactly what the server has sent, and w − r is the downlink's error
feedback residual: what C held back is sent in later rounds, never lost (as
in STC's server-side residual, Sattler et al. 2019). Clients train from r and
reply Δ = w_local − r; the server adds the mean Δ to its exact w.

Versions. Each sync makes version v + 1. The server remembers which version
each node holds (the one it last sent it, forgotten when the node fails or
does not answer) and sends, per node, one of three messages:

- ``delta``: p, for a node at version v − 1 (the usual case);
- ``same``: no arrays, for a node already at v (e.g. an evaluate message);
- ``full``: r itself as fp32, for a node it knows nothing about (a new or
  restarted node, one that missed a round, every node after a resume).

Every message carries the version and an 8-byte BLAKE2b digest of r after
applying it, counted as :data:`SYNC_FIELD_BYTES` downlink bytes; a client whose
result differs raises :class:`~qfl.errors.DownlinkOutOfSync`, and the server
then sends it the full replica. Only train messages sync; evaluate messages
carry ``same`` (or ``full``), so ``fed_*`` metrics measure the replicas the
clients hold, one sync behind the server's newest weights.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from qfl.errors import DownlinkOutOfSync

from .codec import Codec
from .payload import decode_update, encode_update, payload_bytes
from .registry import make_codec

DOWNLINK_MODES = ("model", "delta")
FULL, DELTA, SAME = "full", "delta", "same"
SYNC_FIELD_BYTES = 12  # a uint32 version and an 8-byte digest per message
SYNC_RECORD = "downlink"  # the message's ConfigRecord holding the three fields below
MODE_KEY, VERSION_KEY, DIGEST_KEY = "mode", "version", "digest"


def make_downlink_codec(name: str, params: Mapping[str, Any], mode: str, seed: int | None = None) -> Codec:
    """The codec of the downlink's payloads.

    ``mode = "model"``: ``make_codec(name, params)``, which must be stateless.
    ``mode = "delta"``: the codec without error feedback (the replica is the
    downlink's residual), so sparsifiers and sign work here; it must be
    contractive (``traits.contractive``), as any codec under error feedback.
    Raises ValueError naming the fix on an unknown mode, a stateful codec in
    model mode, ``feedback`` / DGC options in delta mode, or a non-contractive
    codec (qsgd, ternary, randk) in delta mode.
    """
    if mode not in DOWNLINK_MODES:
        raise ValueError(f"downlink_mode must be one of {', '.join(DOWNLINK_MODES)}, got {mode!r}")
    params = dict(params)
    if mode == "model":
        codec = make_codec(name, params, seed)
        if codec.traits.stateful:
            raise ValueError(
                f"downlink_codec {name!r} keeps state (error feedback / warm start), but the server broadcasts one "
                "model to clients that were not all there last round; set downlink_mode=delta (the server keeps "
                "the clients' replica and its residual), downlink_codec.feedback=false, or a stateless codec"
            )
        return codec
    if str(params.get("feedback", False)).lower() == "true":
        raise ValueError(
            "downlink_mode=delta keeps the clients' replica, which is the downlink's error feedback; "
            "remove downlink_codec.feedback"
        )
    params["feedback"] = False  # DGC options are then refused by make_codec, naming the key
    codec = make_codec(name, params, seed)
    if not codec.traits.contractive:
        raise ValueError(
            f"downlink_mode=delta is error feedback (the replica carries what the codec held back), which needs a "
            f"contractive codec, ||C(x) − x|| < ||x||; {name!r} is unbiased but not contractive (its noise can exceed "
            "the change itself, and the residual then grows: STC-3% up with a ternary+zstd delta down diverged to "
            "chance on 3 of 3 seeds); use stc, topk, sign, fp16 or bf16 for downlink_codec"
        )
    return codec


def weights_digest(weights: Mapping[str, np.ndarray]) -> str:
    """BLAKE2b-64 (hex) over the tensors' names, shapes and float32 bytes, in name order."""
    h = hashlib.blake2b(digest_size=8)
    for name in sorted(weights):
        array = np.ascontiguousarray(weights[name], dtype="<f4")
        h.update(name.encode() + b"\0" + repr(array.shape).encode() + b"\0")
        h.update(array.tobytes())
    return h.hexdigest()


def apply_delta(replica: Mapping[str, np.ndarray], decoded: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """r + decode(p), tensor by tensor, in float32 (what both ends compute)."""
    return {k: np.add(replica[k], decoded[k], dtype=np.float32) for k in replica}


@dataclass
class SyncMessage:
    """One kind of downlink message and the nodes that get it."""

    mode: str  # FULL | DELTA | SAME
    nodes: list[int]
    arrays: ArrayRecord
    version: int
    digest: str

    @property
    def bytes_per_node(self) -> int:
        return payload_bytes(self.arrays) + SYNC_FIELD_BYTES

    def config(self) -> dict[str, Any]:
        return {MODE_KEY: self.mode, VERSION_KEY: self.version, DIGEST_KEY: self.digest}


class DownlinkReplica:
    """The server's side of ``downlink_mode = "delta"`` (module docstring).

    ``codec_for(version)`` builds the downlink codec of the sync that makes
    ``version`` (a stochastic codec seeded per version, so a resumed run
    draws the same noise). ``weights``: the initial model, r₀.
    """

    def __init__(self, codec_for: Any, weights: Mapping[str, np.ndarray]) -> None:
        self.codec_for = codec_for
        self.shapes = {k: tuple(v.shape) for k, v in weights.items()}
        self.replica = {k: np.array(v, dtype=np.float32) for k, v in weights.items()}
        self.target: dict[str, np.ndarray] | None = None  # the weights the last sync moved towards
        self.version = 0
        self.delta: ArrayRecord | None = None  # the payload from version − 1 to version
        self.node_versions: dict[int, int] = {}
        self._digest = weights_digest(self.replica)

    def sync(self, weights: Mapping[str, np.ndarray]) -> None:
        """Move the replica towards ``weights`` (one new version), unless the last sync already aimed there."""
        if self.target is not None and all(np.array_equal(self.target[k], weights[k]) for k in self.shapes):
            return
        diff = {k: np.subtract(weights[k], self.replica[k], dtype=np.float32) for k in self.shapes}
        codec = self.codec_for(self.version + 1)
        record = encode_update(diff, codec, round_seed=self.version + 1)
        self.replica = apply_delta(self.replica, decode_update(record, codec, self.shapes))
        self.target = {k: np.array(weights[k], dtype=np.float32) for k in self.shapes}
        self.version += 1
        self.delta = record
        self._digest = weights_digest(self.replica)

    def messages(self, nodes: Iterable[int]) -> list[SyncMessage]:
        """Group ``nodes`` by what each needs, and mark them as holding the current version."""
        groups: dict[str, list[int]] = {FULL: [], DELTA: [], SAME: []}
        for node in nodes:
            held = self.node_versions.get(node, 0)  # a node never seen builds r₀ itself
            if held == self.version:
                groups[SAME].append(node)
            elif held == self.version - 1 and self.delta is not None:
                groups[DELTA].append(node)
            else:
                groups[FULL].append(node)
            self.node_versions[node] = self.version
        out = []
        for mode, group in groups.items():
            if not group:
                continue
            if mode == FULL:
                arrays = encode_update(self.replica, make_codec("fp32"))
            else:
                arrays = self.delta if mode == DELTA and self.delta is not None else ArrayRecord()
            out.append(SyncMessage(mode, group, arrays, self.version, self._digest))
        return out

    def forget(self, nodes: Iterable[int]) -> None:
        """These nodes may not hold what they were sent (they failed or did not answer): send them the full replica next."""
        for node in nodes:
            self.node_versions[node] = -1

    def state_arrays(self) -> dict[str, np.ndarray]:
        """What a checkpoint keeps: the replica, the last target and the version (node versions are not kept:
        after a resume every node gets the full replica once)."""
        out = {f"replica/{k}": v for k, v in self.replica.items()}
        if self.target is not None:
            out.update({f"target/{k}": v for k, v in self.target.items()})
        out["version"] = np.array([self.version], dtype=np.int64)
        return out

    def load_state_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Restore :meth:`state_arrays` (bit for bit); the next sync to a node is a full one."""
        if "version" not in arrays:
            return  # a checkpoint from a run in model mode, or before the first round
        self.replica = {k: np.array(arrays[f"replica/{k}"], dtype=np.float32) for k in self.shapes}
        has_target = all(f"target/{k}" in arrays for k in self.shapes)
        self.target = {k: np.array(arrays[f"target/{k}"], dtype=np.float32) for k in self.shapes} if has_target else None
        self.version = int(arrays["version"][0])
        self.delta = None
        self.node_versions = {}
        self._digest = weights_digest(self.replica)


def client_replica(
    config: Mapping[str, Any],
    arrays: ArrayRecord,
    held: tuple[int, dict[str, np.ndarray]] | None,
    initial: Any,
    codec: Codec,
    shapes: Mapping[str, tuple[int, ...]],
) -> tuple[int, dict[str, np.ndarray]]:
    """The client's side: (version, replica) after applying one downlink message.

    ``held``: the (version, replica) the node kept from earlier messages, or
    None; ``initial()``: r₀, built when the node holds nothing. Raises
    :class:`DownlinkOutOfSync` when the message does not build on what the
    node holds or the result's digest differs from the server's, and
    PayloadError on an undecodable payload.
    """
    mode, version, digest = config[MODE_KEY], int(config[VERSION_KEY]), str(config[DIGEST_KEY])
    if held is None:
        held = (0, {k: np.asarray(v, dtype=np.float32) for k, v in initial().items()})
    if mode == FULL:
        replica = decode_update(arrays, make_codec("fp32"), shapes)
    elif mode == DELTA:
        if held[0] != version - 1:
            raise DownlinkOutOfSync(
                f"downlink delta builds on version {version - 1}, this node holds {held[0]}; "
                "the server sends the full replica next round"
            )
        replica = apply_delta(held[1], decode_update(arrays, codec, shapes))
    elif mode == SAME:
        if held[0] != version:
            raise DownlinkOutOfSync(f"server says the node holds version {version}, it holds {held[0]}")
        replica = held[1]
    else:
        raise DownlinkOutOfSync(f"unknown downlink message mode {mode!r}; client and server run different qfl versions")
    if weights_digest(replica) != digest:
        raise DownlinkOutOfSync(
            f"replica version {version} differs from the server's (digest mismatch); "
            "the server sends the full replica next round"
        )
    return version, replica
