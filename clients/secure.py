"""The client half of secure aggregation (see qfl.security.secagg and qfl.server.secure).

State, in the node's ``context.state`` (Flower keeps it across the messages of
a run):

- ``secagg-keys``: the pair keys of the current round, between the setup, the
  train message and the unmask request; wiped once the client has answered.
- ``secagg-plan``: the plan this client uploaded under. An unmask request is
  judged against it, never against a plan the request carries.
- ``secagg-log``: the last round this client uploaded in and the last round it
  answered an unmask request for. A client sets up keys and uploads once per
  round, in increasing rounds, and answers at most **one** unmask request per
  round: a second request for the same round (say, the same client first told
  it dropped, then that it survived) is refused with an error. That rule is
  what keeps a lying server from collecting both a client's self-mask shares
  and its pair masks.

Every key is taken from the run's key source (``key_source``: the SQLite pools
of a simulation, or the KMS).

The masking form (``secure_masking``) comes with the server's plan. A node
whose operator does not trust the server to keep double masking sets
``secure-masking="double"`` in its node config; it then refuses single-masking
plans.
"""

from __future__ import annotations

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)

from qfl.config import RunConfig
from qfl.records import as_int, as_iterable
from qfl.security.keys.source import KeySource
from qfl.security.keys.sources import KeySourceConfig, open_key_source
from qfl.security.secagg import (
    SEALED_STYPE,
    RoundPlan,
    SecAggError,
    UnmaskRequest,
    answer_unmask,
    check_unmask_request,
    client_sae,
    fetch_pair_keys,
    masked_upload,
    pad_and_seal,
    seal,
    take_pair_keys,
)

KEYS_STATE = "secagg-keys"
PLAN_STATE = "secagg-plan"
LOG_STATE = "secagg-log"
PADDED_SUFFIX = "+pad"
PIN_MASKING = "secure-masking"  # node config key: "double" refuses single-masking plans


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
    record = context.state.array_records.get(KEYS_STATE) or ArrayRecord()
    out = {}
    for name, array in record.items():
        rnd, _, peer = name.partition("/")
        if int(rnd) == server_round:
            out[int(peer)] = array.numpy().tobytes()
    return out


def _log(context: Context) -> tuple[int, int]:
    """(last round uploaded, last round answered); 0 when none."""
    record = context.state.config_records.get(LOG_STATE)
    if record is None:
        return 0, 0
    return as_int(record["uploaded"]), as_int(record["answered"])


def _set_log(context: Context, uploaded: int, answered: int) -> None:
    context.state[LOG_STATE] = ConfigRecord({"uploaded": int(uploaded), "answered": int(answered)})


def _plan(msg: Message, context: Context) -> RoundPlan:
    """The plan a setup or train message carries, checked, and refused if the node pins double masking."""
    plan = RoundPlan.from_config(msg.content["secagg"])
    pinned = context.node_config.get(PIN_MASKING)
    if pinned is not None and str(pinned) != plan.masking:
        raise SecAggError(f"this node pins secure_masking={pinned}; the server asked for {plan.masking!r}")
    return plan


def hello(msg: Message, partition_id: int) -> Message:
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": partition_id})}), reply_to=msg)


def setup(msg: Message, context: Context, cfg: RunConfig, partition_id: int) -> Message:
    """Take this client's pair keys as master; reply with their ids."""
    plan = _plan(msg, context)
    uploaded, answered = _log(context)
    if plan.round <= max(uploaded, answered):
        raise SecAggError(f"client {partition_id} already took part in round {max(uploaded, answered)}; "
                          f"refusing keys for round {plan.round}")
    taken = take_pair_keys(key_source(cfg, partition_id), plan, partition_id)
    _save_keys(context, plan.round, {peer: c.key for peer, c in taken.items()})
    ids = ConfigRecord({"peers": list(taken), "key-ids": [c.key_id for c in taken.values()]})
    return Message(RecordDict({"pair-keys": ids}), reply_to=msg)


def masked_reply(
    msg: Message, context: Context, cfg: RunConfig, partition_id: int, delta: dict[str, np.ndarray], seed: int
) -> RecordDict:
    """Mask, pack and seal Δ for a masked-sum / expanded round; the self-mask shares travel beside it."""
    sec = msg.content["secagg"]
    plan = _plan(msg, context)
    uploaded, answered = _log(context)
    if plan.round <= max(uploaded, answered):
        raise SecAggError(f"client {partition_id} already uploaded in round {uploaded}; refusing a second upload "
                          f"for round {plan.round}")
    source = key_source(cfg, partition_id)
    keys = _load_keys(context, plan.round)
    try:
        masters = dict(zip((as_int(p) for p in as_iterable(sec["masters"])), (str(k) for k in as_iterable(sec["master-key-ids"]))))
    except (KeyError, TypeError, ValueError) as err:
        raise SecAggError(f"the train message lacks the key ids of the lower peers: {err}") from None
    keys.update(fetch_pair_keys(source, partition_id, masters))
    upload = masked_upload(plan, partition_id, delta, keys, np.random.default_rng([seed, 7]))  # rounding noise
    _save_keys(context, plan.round, keys)  # kept for the unmask request
    context.state[PLAN_STATE] = ConfigRecord(plan.to_config())
    _set_log(context, plan.round, answered)
    key_id, tag = seal(source, partition_id, plan.mode, "upload", plan.round, upload.blob)
    blob = upload.blob
    update = ArrayRecord({"masked": Array(dtype="uint8", shape=(len(blob),), stype=SEALED_STYPE, data=blob)})
    content = RecordDict({"update": update, "seal": ConfigRecord({"key-id": key_id, "tag": tag})})
    if plan.double:
        ciphers, tags = upload.share_wire()
        content["shares"] = ArrayRecord({
            "ciphers": Array(dtype="uint8", shape=(len(ciphers),), stype=SEALED_STYPE, data=ciphers),
            "tags": Array(dtype="uint8", shape=(len(tags),), stype=SEALED_STYPE, data=tags),
        })
    return content


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
    """Answer one unmask request for the round this client uploaded in (at most once), sealed.

    Raises SecAggError (an error reply) if the request breaks a rule of
    :func:`qfl.security.secagg.check_unmask_request`, is for another round, or
    comes after this client already answered for the round.
    """
    stored = context.state.config_records.get(PLAN_STATE)
    if stored is None:
        raise SecAggError(f"client {partition_id} has not uploaded in this run; nothing to unmask")
    plan = RoundPlan.from_config(stored)
    uploaded, answered = _log(context)
    request = UnmaskRequest.from_config(plan, msg.content["secagg"])
    if request.round <= answered:
        raise SecAggError(
            f"client {partition_id} already answered an unmask request for round {answered}; "
            "a client answers once per round (a second request could ask for both masks of one client)"
        )
    if request.round != uploaded:
        raise SecAggError(f"client {partition_id} uploaded in round {uploaded}, not in round {request.round}")
    check_unmask_request(plan, partition_id, request)
    keys = _load_keys(context, plan.round)
    _set_log(context, uploaded, request.round)  # answered: whatever follows, no second answer for this round
    context.state[KEYS_STATE] = ArrayRecord()  # the round's keys are spent
    answer = answer_unmask(plan, partition_id, keys, request)
    body = answer.body()
    key_id, tag = seal(key_source(cfg, partition_id), partition_id, plan.mode, "reveal", plan.round, body)
    return Message(RecordDict({"reveal": ConfigRecord({"body": body, "key-id": key_id, "tag": tag})}), reply_to=msg)
