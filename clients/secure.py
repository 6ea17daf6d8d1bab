"""The client half of secure aggregation (see qfl.security.secagg and qfl.server.secure).

It is one Flower mod, :func:`secagg_mod`, installed on the ClientApp
(``ClientApp(mods=[secagg_mod])``), as Flower's own SecAgg+ is. The mod answers
the workflow's queries (``query.secagg_hello|setup|reveal``) without calling
the app, and wraps the app's train handler:

- masked-sum / expanded: the mod marks the train message; seeing the mark
  (:func:`wants_raw_delta`), the train handler replies with the raw Δ as
  float32 arrays under the record name ``"delta"`` (:func:`raw_delta_record`)
  plus its ``metrics``, instead of a codec payload. The mod masks and seals Δ
  and replies with ``update``/``seal``/``shares`` and the ``metrics`` only; the
  raw Δ never leaves the node (a failure is an error reply, never Δ).
- channel-pad: the train handler encodes as usual; the mod pads and seals the
  ``update`` it returns (a transport step).
- security=none, evaluate: passed through untouched.

The train handler knows nothing of masking or padding beyond that one signal.
Message formats are those of qfl.server.secure.

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

The round's protection (masking form, self-mask form, masking graph,
colluder allowance) comes with the server's plan, so a lying server could ask
for less. A node whose operator does not trust it pins what it requires in its
node config (:class:`NodePins`; ``qfl edge run --pin KEY=VALUE``) and refuses
any weaker plan before it takes a key: ``secure-masking="double"``,
``secure-self-mask="vector"``, ``secure-corrupt=γ`` (with
``secure-dropout=δ``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from qfl.config import RunConfig, SecureMasking, SelfMask, resolve_config
from qfl.records import as_int, as_iterable
from qfl.security.keys.source import KeySource
from qfl.security.keys.sources import KeySourceConfig, open_key_source
from qfl.security.secagg import (
    MASKED_MODES,
    SEALED_STYPE,
    RoundPlan,
    SecAggError,
    SecAggReason,
    UnmaskRequest,
    answer_unmask,
    check_unmask_request,
    client_sae,
    colluders_for,
    fetch_pair_keys,
    least_degree,
    masked_upload,
    pad_and_seal,
    seal,
    take_pair_keys,
)
from qfl.seeds import task_seed

KEYS_STATE = "secagg-keys"
PLAN_STATE = "secagg-plan"
LOG_STATE = "secagg-log"
PADDED_SUFFIX = "+pad"
PIN_MASKING = "secure-masking"  # node config keys of NodePins
PIN_SELF_MASK = "secure-self-mask"
PIN_CORRUPT = "secure-corrupt"
PIN_DROPOUT = "secure-dropout"
PIN_KEYS = (PIN_MASKING, PIN_SELF_MASK, PIN_CORRUPT, PIN_DROPOUT)
# the query messages of qfl.server.secure's workflow (the same strings as there)
HELLO, SETUP, REVEAL = "query.secagg_hello", "query.secagg_setup", "query.secagg_reveal"
RAW_DELTA = "delta"  # the train handler's reply record under a masked mode: Δ as float32, never sent
RAW_DELTA_MARK = "secagg-raw-delta"  # set by secagg_mod only, on a masked-mode train message


def key_source(cfg: RunConfig, partition_id: int) -> KeySource:
    if cfg.key_source == "store" and not cfg.key_store:
        raise SecAggError("the server did not say where the key store is (key_store is empty)", reason=SecAggReason.SETUP)
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


@dataclass(frozen=True)
class NodePins:
    """The least protection a node takes part under, whatever the server's plan asks (its node config).

    - ``masking`` (``secure-masking``): ``"double"`` refuses single-masking
      plans, which only an honest server keeps private.
    - ``self_mask`` (``secure-self-mask``): ``"vector"`` refuses seed
      self-masks (a ChaCha20 keystream: computational, not one-time-pad)
      and single-masking plans.
    - ``corrupt`` = γ (``secure-corrupt``): the share of clients this node
      assumes collude with the server. For a round of n participants the plan
      must use the full graph or a degree k ≥ ``least_degree(n, δ, γ)`` (the
      least even degree whose failure bound is ≤ 2⁻⁴⁰, δ = ``secure-dropout``,
      default 0.1), and thresholds sized for at least ``colluders_for(γ, n, k)``
      colluding peers (⌊γ·n⌋ in the full graph, the 2⁻⁴⁰/n quantile of a
      neighbourhood's in a sparse one), so t = ⌊(d + c)/2⌋ + 1 cannot be
      lowered by sending c = 0 or a thin graph. These are the functions an
      honest server sizes its plan with (qfl.security.secagg).
    """

    masking: str | None = None
    self_mask: str | None = None
    corrupt: float | None = None
    dropout: float = RunConfig.secure_dropout  # the run config's default δ

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, object]) -> NodePins:
        """The pins of a node config; SecAggError (SETUP) naming the key for a value that cannot be a pin."""
        def text(key: str, allowed: tuple[str, ...]) -> str | None:
            value = node_config.get(key)
            if value is None:
                return None
            if str(value) not in allowed:
                raise SecAggError(f"this node's {key}={value!r} is not a pin: use one of {', '.join(allowed)}",
                                  reason=SecAggReason.SETUP)
            return str(value)

        def share(key: str) -> float | None:
            value = node_config.get(key)
            if value is None:
                return None
            try:
                number = float(str(value))
            except ValueError:
                number = float("nan")
            if not 0 <= number < 1:
                raise SecAggError(f"this node's {key}={value!r} must be a share in [0, 1), e.g. {key}=0.05",
                                  reason=SecAggReason.SETUP)
            return number

        dropout = share(PIN_DROPOUT)
        return cls(masking=text(PIN_MASKING, tuple(SecureMasking)), self_mask=text(PIN_SELF_MASK, tuple(SelfMask)),
                   corrupt=share(PIN_CORRUPT), dropout=cls.dropout if dropout is None else dropout)

    def check(self, plan: RoundPlan) -> None:
        """SecAggError (SETUP) naming what ``plan`` lacks against these pins; nothing if it meets them."""
        def refuse(what: str) -> SecAggError:
            return SecAggError(f"this node refuses round {plan.round}: {what}", reason=SecAggReason.SETUP)

        if self.masking is not None and plan.masking != self.masking:
            raise refuse(f"it pins {PIN_MASKING}={self.masking}; the server asked for {str(plan.masking)!r}")
        if self.self_mask is not None and not plan.double:  # a self-mask pin asks for double masking too
            raise refuse(f"it pins {PIN_SELF_MASK}={self.self_mask} (double masking); the server asked for "
                         f"{str(plan.masking)!r} masking")
        if self.self_mask is not None and plan.self_mask != self.self_mask:
            raise refuse(f"it pins {PIN_SELF_MASK}={self.self_mask}; the server asked for {str(plan.self_mask)!r}")
        if self.corrupt is None:
            return
        n = len(plan.participants)
        least = least_degree(n, self.dropout, self.corrupt)
        if plan.degree and (least == 0 or plan.degree < least):
            need = "the full graph" if least == 0 else f"degree >= {least}"
            raise refuse(f"it pins {PIN_CORRUPT}={self.corrupt}, which needs {need} for {n} clients; "
                         f"the server asked for degree {plan.degree}")
        colluders = colluders_for(self.corrupt, n, plan.degree)
        if plan.colluders < colluders:
            raise refuse(f"it pins {PIN_CORRUPT}={self.corrupt}, which means {colluders} colluding peers for "
                         f"this graph; the server's thresholds resist {plan.colluders}")


def parse_pins(items: Sequence[str]) -> dict[str, str | float]:
    """``KEY=VALUE`` pins (``qfl edge run --pin``) as node config values, checked as :class:`NodePins` does;
    ValueError naming the item otherwise."""
    pins: dict[str, str | float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip().strip("\"'")
        if not sep or key not in PIN_KEYS:
            raise ValueError(f"--pin {item!r}: expected KEY=VALUE with KEY one of {', '.join(PIN_KEYS)}")
        pins[key] = float(value) if key in (PIN_CORRUPT, PIN_DROPOUT) and _is_number(value) else value
    NodePins.from_node_config(pins)
    return pins


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _plan(msg: Message, context: Context) -> RoundPlan:
    """The plan a setup or train message carries, checked, and refused if it is weaker than the node pins."""
    plan = RoundPlan.from_config(msg.content["secagg"])
    NodePins.from_node_config(context.node_config).check(plan)
    return plan


def hello(msg: Message, partition_id: int) -> Message:
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": partition_id})}), reply_to=msg)


def setup(msg: Message, context: Context, cfg: RunConfig, partition_id: int) -> Message:
    """Take this client's pair keys as master; reply with their ids."""
    plan = _plan(msg, context)
    uploaded, answered = _log(context)
    if plan.round <= max(uploaded, answered):
        raise SecAggError(f"client {partition_id} already took part in round {max(uploaded, answered)}; "
                          f"refusing keys for round {plan.round}", reason=SecAggReason.REPLAYED)
    taken = take_pair_keys(key_source(cfg, partition_id), plan, partition_id)
    _save_keys(context, plan.round, {peer: c.key for peer, c in taken.items()})
    ids = ConfigRecord({"peers": list(taken), "key-ids": [c.key_id for c in taken.values()]})
    return Message(RecordDict({"pair-keys": ids}), reply_to=msg)


def _upload_plan(msg: Message, context: Context, partition_id: int) -> RoundPlan:
    """The plan of a masked train message; SecAggError if this client may not upload under it (one upload a round)."""
    plan = _plan(msg, context)
    uploaded, answered = _log(context)
    if plan.round <= max(uploaded, answered):
        raise SecAggError(f"client {partition_id} already uploaded in round {uploaded}; refusing a second upload "
                          f"for round {plan.round}", reason=SecAggReason.REPLAYED)
    return plan


def masked_reply(
    msg: Message, context: Context, cfg: RunConfig, partition_id: int, delta: dict[str, np.ndarray], seed: int
) -> RecordDict:
    """Mask, pack and seal Δ for a masked-sum / expanded round; the self-mask shares travel beside it."""
    sec = msg.content["secagg"]
    plan = _upload_plan(msg, context, partition_id)
    _, answered = _log(context)
    source = key_source(cfg, partition_id)
    keys = _load_keys(context, plan.round)
    try:
        masters = dict(zip((as_int(p) for p in as_iterable(sec["masters"])), (str(k) for k in as_iterable(sec["master-key-ids"]))))
    except (KeyError, TypeError, ValueError) as err:
        raise SecAggError(f"the train message lacks the key ids of the lower peers: {err}", reason=SecAggReason.MALFORMED) from None
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
        raise SecAggError(f"client {partition_id} has not uploaded in this run; nothing to unmask", reason=SecAggReason.BAD_REQUEST)
    plan = RoundPlan.from_config(stored)
    uploaded, answered = _log(context)
    request = UnmaskRequest.from_config(plan, msg.content["secagg"])
    if request.round <= answered:
        raise SecAggError(
            f"client {partition_id} already answered an unmask request for round {answered}; "
            "a client answers once per round (a second request could ask for both masks of one client)", reason=SecAggReason.REPLAYED
        )
    if request.round != uploaded:
        raise SecAggError(f"client {partition_id} uploaded in round {uploaded}, not in round {request.round}", reason=SecAggReason.BAD_REQUEST)
    check_unmask_request(plan, partition_id, request)
    keys = _load_keys(context, plan.round)
    _set_log(context, uploaded, request.round)  # answered: whatever follows, no second answer for this round
    context.state[KEYS_STATE] = ArrayRecord()  # the round's keys are spent
    answer = answer_unmask(plan, partition_id, keys, request)
    body = answer.body()
    key_id, tag = seal(key_source(cfg, partition_id), partition_id, plan.mode, "reveal", plan.round, body)
    return Message(RecordDict({"reveal": ConfigRecord({"body": body, "key-id": key_id, "tag": tag})}), reply_to=msg)


# --------------------------------------------------------------------------- the Flower mod


def wants_raw_delta(msg: Message) -> bool:
    """True if :func:`secagg_mod` asks the train handler for the raw Δ instead of a codec payload.

    The handler then replies with :func:`raw_delta_record` under the record name
    :data:`RAW_DELTA` (and its ``metrics``); the mod masks it and never sends it.
    Only the mod sets the mark (:data:`RAW_DELTA_MARK`), and it refuses a train
    message that arrives with one.
    """
    return RAW_DELTA_MARK in msg.content.config_records


def raw_delta_record(delta: dict[str, np.ndarray]) -> ArrayRecord:
    """Δ as the train handler hands it to :func:`secagg_mod`: one float32 array per tensor."""
    return ArrayRecord({name: Array(np.ascontiguousarray(arr, dtype=np.float32)) for name, arr in delta.items()})


def _mode(msg: Message) -> str:
    """The security mode a train message asks for (``none`` when it carries no ``secagg`` record)."""
    if "secagg" not in msg.content.config_records:
        return "none"
    return str(msg.content.config_records["secagg"]["mode"])


# Node config keys through which a deployed node names its own KMS and credentials, so that no node
# reads a path the server chose (set by `qfl edge run`, see qfl.clients.daemon).
NODE_KMS_URL, NODE_KMS_CERTS = "kms-url", "kms-certs"


def _run_config(msg: Message, context: Context) -> tuple[RunConfig, int]:
    """The run configuration a message carries (with this node's own KMS address and credentials, if its
    node config names them) and the server round."""
    record = msg.content.config_records["config"]
    values = {k: v for k, v in record.items() if k != "server-round"}
    for node_key, run_key in ((NODE_KMS_URL, "kms_url"), (NODE_KMS_CERTS, "kms_certs")):
        if context.node_config.get(node_key):
            values[run_key] = str(context.node_config[node_key])
    return resolve_config(values), as_int(record.get("server-round", 0))


def _partition_id(context: Context) -> int:
    try:
        return int(context.node_config["partition-id"])
    except KeyError:
        raise SecAggError('node config lacks partition-id; start the SuperNode with '
                          '--node-config "partition-id=<i> num-partitions=<n>"', reason=SecAggReason.SETUP) from None


def _refuse(msg: Message, err: Exception) -> Message:
    """The error reply the mod sends in place of an update it could not protect."""
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=f"{type(err).__name__}: {err}"), reply_to=msg)


def _answer_query(msg: Message, context: Context) -> Message:
    """Answer one of the workflow's queries (hello, setup, reveal); raises to send an error reply."""
    kind = msg.metadata.message_type
    if kind == HELLO:
        return hello(msg, _partition_id(context))
    cfg, _ = _run_config(msg, context)
    if kind == SETUP:
        return setup(msg, context, cfg, _partition_id(context))
    return reveal(msg, context, cfg, _partition_id(context))


def _with_metrics(content: RecordDict, reply: Message) -> RecordDict:
    """``content`` plus the ``metrics`` of the train handler's ``reply``, if any."""
    if "metrics" in reply.content.metric_records:
        content["metrics"] = reply.content.metric_records["metrics"]
    return content


def _masked_train(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """masked-sum / expanded: check the plan, let the app train for the raw Δ, mask and seal it."""
    try:
        cfg, server_round = _run_config(msg, context)
        partition_id = _partition_id(context)
        _upload_plan(msg, context, partition_id)  # refuse a bad plan or a second upload before training
    except Exception as err:  # noqa: BLE001 -- any failure is this node's error reply
        return _refuse(msg, err)
    msg.content[RAW_DELTA_MARK] = ConfigRecord({"by": "secagg_mod"})
    try:
        reply = call_next(msg, context)
    finally:
        del msg.content[RAW_DELTA_MARK]
    if reply.has_error():
        return reply
    if RAW_DELTA not in reply.content.array_records:
        return _refuse(msg, SecAggError(f"the train handler returned no {RAW_DELTA!r} record under a masked mode", reason=SecAggReason.MALFORMED))
    try:
        delta = {name: array.numpy() for name, array in reply.content.array_records[RAW_DELTA].items()}
        seed = task_seed(cfg.seed, server_round, partition_id)
        content = masked_reply(msg, context, cfg, partition_id, delta, seed)
    except Exception as err:  # noqa: BLE001 -- never the Δ: an error reply instead
        return _refuse(msg, err)
    return Message(_with_metrics(content, reply), reply_to=msg)


def _padded_train(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """channel-pad: let the app train and encode, then pad and seal its ``update`` (a transport step)."""
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    try:
        cfg, server_round = _run_config(msg, context)
        content = padded_reply(cfg, _partition_id(context), server_round, reply.content.array_records["update"])
    except Exception as err:  # noqa: BLE001 -- never the update in clear: an error reply instead
        return _refuse(msg, err)
    return Message(_with_metrics(content, reply), reply_to=msg)


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The client half of secure aggregation as a Flower mod (``ClientApp(mods=[secagg_mod])``).

    - The workflow's queries (:data:`HELLO`, :data:`SETUP`, :data:`REVEAL`) are
      answered here; the app is not called.
    - A train message under a masked mode (masked-sum, expanded) is marked
      (:func:`wants_raw_delta`) and passed to the app, whose train handler
      replies with the raw Δ (:data:`RAW_DELTA`) and ``metrics``. The mod masks
      and seals Δ and replies with ``update``, ``seal``, (double) ``shares`` and
      the ``metrics``; nothing else of the app's reply leaves the node. If it
      cannot mask, it replies with an error.
    - A train message under channel-pad goes to the app unchanged; the mod pads
      and seals the app's ``update`` (codec payload) before it leaves.
    - Anything else (``security=none``, evaluate, other queries) passes through
      untouched, except that a train reply carrying the raw Δ record is turned
      into an error, and a train message that arrives already marked is refused.
    """
    kind = msg.metadata.message_type
    if kind in (HELLO, SETUP, REVEAL):
        return _answer_query(msg, context)
    if kind != MessageType.TRAIN:
        return call_next(msg, context)
    if RAW_DELTA_MARK in msg.content.config_records:
        return _refuse(msg, SecAggError(f"a train message may not carry {RAW_DELTA_MARK!r}; only secagg_mod sets it", reason=SecAggReason.MALFORMED))
    mode = _mode(msg)
    if mode in MASKED_MODES:
        return _masked_train(msg, context, call_next)
    if mode == "channel-pad":
        return _padded_train(msg, context, call_next)
    reply = call_next(msg, context)
    if not reply.has_error() and RAW_DELTA in reply.content.array_records:
        return _refuse(msg, SecAggError(f"the train reply carries the raw {RAW_DELTA!r} record; not sent", reason=SecAggReason.MALFORMED))
    return reply


def _answered_by_mod(msg: Message, context: Context) -> Message:
    raise SecAggError(f"{msg.metadata.message_type} reached the app: install secagg_mod (ClientApp(mods=[secagg_mod]))", reason=SecAggReason.SETUP)


def route_queries(app: ClientApp) -> None:
    """Register the workflow's query actions on ``app`` so that Flower routes them through its mods.

    Flower hands a message to the mods only if a handler is registered for its
    type; :func:`secagg_mod` answers these queries, so the registered handler
    only raises (if the mod is missing).
    """
    for kind in (HELLO, SETUP, REVEAL):
        app.query(kind.partition(".")[2])(_answered_by_mod)
