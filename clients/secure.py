"""The client half of secure aggregation (see qfl.security.secagg and qfl.server.secure).

Pair keys live in the node's ``context.state`` under ``secagg-keys`` between
the setup, the train message and a possible reveal of the same round; the
next round's setup replaces them. Every key is taken from the run's key
source (``key_source``: the SQLite pools of a simulation, or the KMS).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from qfl.config import RunConfig
from qfl.security.keys import KeySource
from qfl.security.secagg import (
    SEALED_STYPE,
    RoundPlan,
    SecAggError,
    client_sae,
    fetch_pair_keys,
    masked_upload,
    pad_and_seal,
    reveal_masks,
    seal,
    take_pair_keys,
)
from qfl.security.sources import KeySourceConfig, open_key_source

KEYS_STATE = "secagg-keys"
PADDED_SUFFIX = "+pad"


def key_source(cfg: RunConfig, partition_id: int) -> KeySource:
    if cfg.key_source == "store" and not cfg.key_store:
        raise SecAggError("the server did not say where the key store is (key_store is empty)")
    return open_key_source(
        KeySourceConfig(cfg.key_source, cfg.key_store, cfg.kms_url, cfg.kms_certs), client_sae(partition_id)
    )


def _save_keys(context: Context, server_round: int, keys: dict[int, bytes]) -> None:
    context.state[KEYS_STATE] = ArrayRecord(
        {f"{server_round}/{peer}": Array(np.frombuffer(key, dtype=np.uint8).copy()) for peer, key in keys.items()}
    )


def _load_keys(context: Context, server_round: int) -> dict[int, bytes]:
    record = context.state.array_records.get(KEYS_STATE) or {}
    out = {}
    for name, array in record.items():
        rnd, _, peer = name.partition("/")
        if int(rnd) == server_round:
            out[int(peer)] = array.numpy().tobytes()
    return out


def hello(msg: Message, partition_id: int) -> Message:
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": partition_id})}), reply_to=msg)


def setup(msg: Message, context: Context, cfg: RunConfig, partition_id: int) -> Message:
    """Take this client's pair keys as master; reply with their ids."""
    plan = RoundPlan.from_config(msg.content["secagg"])
    taken = take_pair_keys(key_source(cfg, partition_id), plan, partition_id)
    _save_keys(context, plan.round, {peer: c.key for peer, c in taken.items()})
    ids = ConfigRecord({"peers": list(taken), "key-ids": [c.key_id for c in taken.values()]})
    return Message(RecordDict({"pair-keys": ids}), reply_to=msg)


def masked_reply(
    msg: Message, context: Context, cfg: RunConfig, partition_id: int, delta: dict[str, np.ndarray], seed: int
) -> RecordDict:
    """Mask, pack and seal Δ for a masked-sum / expanded round."""
    sec = msg.content["secagg"]
    plan = RoundPlan.from_config(sec)
    source = key_source(cfg, partition_id)
    keys = _load_keys(context, plan.round)
    masters = dict(zip((int(p) for p in sec["masters"]), (str(k) for k in sec["master-key-ids"])))
    keys.update(fetch_pair_keys(source, partition_id, masters))
    _save_keys(context, plan.round, keys)  # kept for a reveal
    blob = masked_upload(plan, partition_id, delta, keys, np.random.default_rng([seed, 7]))  # rounding noise
    key_id, tag = seal(source, partition_id, plan.mode, "upload", plan.round, blob)
    update = ArrayRecord({"masked": Array(dtype="uint8", shape=(len(blob),), stype=SEALED_STYPE, data=blob)})
    return RecordDict({"update": update, "seal": ConfigRecord({"key-id": key_id, "tag": tag})})


def padded_reply(cfg: RunConfig, partition_id: int, server_round: int, update: ArrayRecord) -> RecordDict:
    """channel-pad: XOR the codec payloads with one fresh key of the link to the server, and seal."""
    names = list(update.keys())
    plain = b"".join(bytes(update[n].data) for n in names)
    cipher, key_id, tag = pad_and_seal(key_source(cfg, partition_id), partition_id, server_round, plain)
    out, start = ArrayRecord(), 0
    for name in names:
        n = len(update[name].data)
        out[name] = Array(dtype="uint8", shape=(n,), stype=update[name].stype + PADDED_SUFFIX,
                          data=cipher[start : start + n])
        start += n
    return RecordDict({"update": out, "seal": ConfigRecord({"key-id": key_id, "tag": tag})})


def reveal(msg: Message, context: Context, cfg: RunConfig, partition_id: int) -> Message:
    """Recovery: reveal the masks shared with the dropped clients, sealed."""
    sec = msg.content["secagg"]
    plan = RoundPlan.from_config(sec)
    dropped = [int(k) for k in sec["dropped"]]
    keys = _load_keys(context, plan.round)
    if not set(dropped) <= set(keys):
        raise SecAggError(f"client {partition_id} holds no round-{plan.round} keys with {sorted(set(dropped) - set(keys))}")
    blob = reveal_masks(plan, partition_id, keys, dropped)
    key_id, tag = seal(key_source(cfg, partition_id), partition_id, plan.mode, "reveal", plan.round, blob)
    return Message(RecordDict({"reveal": ConfigRecord({"masks": blob, "key-id": key_id, "tag": tag})}), reply_to=msg)
