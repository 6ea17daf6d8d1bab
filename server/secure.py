"""SecureFedAvg: QflFedAvg with QKD-keyed secure aggregation (the server half).

The protocol's steps are in :mod:`qfl.security.secagg`; the budget and the
network in :mod:`qfl.server.key_budget`. For ``security=masked-sum`` or
``expanded`` a round is a :class:`MaskedRound`, an explicit staged workflow
(the ``query.*`` messages are Flower query messages):

0. (SecureFedAvg) sample nodes; learn their partition ids once
   (``query.secagg_hello``); tick the QKD clock; build the round's plan once,
   price it per link and apply ``key_policy`` (clients whose links cannot pay
   are left out);
1. :meth:`MaskedRound.setup_keys`: ``query.secagg_setup``, each participant
   takes its pair keys as master and returns the key ids; participants that
   fail here are left out; the train messages carry the plan and the ids of
   the keys each client's lower peers took;
2. :meth:`MaskedRound.collect_uploads`: every upload's seal is verified and its
   size, its self-mask shares and its metrics checked; a client that fails any
   check is dropped with a :class:`DropReason`;
3. :meth:`MaskedRound.unmask`: the server fixes the survivors ``S`` (valid
   uploads) and the dropped ``D`` (everyone else, also a client whose upload
   arrived but failed a check), asks every survivor once
   (``query.secagg_reveal``) for its pair masks with ``D`` and (double
   masking) its shares of the survivors' self-masks, adds the uploads mod 2^B,
   removes the masks and decodes the *sum*. Fewer than
   ``max(secure_min_clients, t + 1)`` survivors, a survivor that does not
   reveal its pair masks with ``D``, or fewer than ``t`` shares of a
   survivor's self-mask leave the model unchanged for the round, with the
   reason. In single masking the unmask step runs only if someone dropped, and
   never for a client whose upload arrived in any form (such a round is not
   opened).

The workflow hands SecureFedAvg a :class:`RoundOutcome`: the decoded sum (or
why there is none), the drops, the byte and key accounting. SecureFedAvg then
applies the mean (sum / survivors; unweighted, since the server never sees one
client's update to weight it) with the server optimizer and adapts each
tensor's clip bound from the summed clip flags.

Every field a client sends (partition ids, key ids, tags, share blobs, reveal
bodies, metrics) is untrusted: a wrong type, size or value drops that client
with a reason; nothing a client sends raises out of ``aggregate_train``.

For ``security=channel-pad`` there is no workflow: the round is QflFedAvg's
(:class:`PaddedFedAvg`), and the pad is a transport step (:class:`ChannelPad`)
that verifies and unpads every reply before it is decoded. Both strategies
share :class:`KeyedFedAvg`'s key budget; :func:`secure_strategy` picks one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from logging import INFO, WARNING

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.supercore import log

from qfl.compression import encode_update, payload_bytes
from qfl.compression.summable import adapt_clip
from qfl.config import RunConfig
from qfl.security.keys.source import KeySource
from qfl.security.secagg import (
    MAC_KEY_BYTES,
    SERVER_SAE,
    MaskedSum,
    RoundPlan,
    SealedShare,
    SecAggError,
    SecAggReason,
    UnknownKeyId,
    UnmaskReply,
    client_sae,
    make_plan,
    open_pad,
    open_seal,
    shares_from_wire,
    unmask_requests,
    unmask_sum,
)
from qfl.server.key_budget import KeyBudget

from .strategy import MAX_ABS_LOSS, Drop, DropReason, QflFedAvg, weights_to_record
from .untrusted import UntrustedValue, capped_examples, finite_float, int_in_range

SETUP, REVEAL, HELLO = "query.secagg_setup", "query.secagg_reveal", "query.secagg_hello"
PAD_MARGIN = 1.25  # channel-pad: key reserved per upload, relative to the largest upload seen
MAX_KEY_ID = 256  # characters; a key id is a UUID (36)
MAX_ERROR_TEXT = 300  # characters of a client's error text kept in the drop reasons


class FailReason(Enum):
    """Why a masked round opens no sum (the text goes to logs and ``drop_reasons``)."""

    TOO_FEW_CLIENTS = "fewer clients admitted, set up or with a valid upload than a sum needs"
    BAD_PLAN = "the round's plan cannot run with the clients that set up keys"
    SINGLE_MASKING_RECEIVED = "single masking cannot open a sum around a received but invalid upload"
    UNMASK_FAILED = "the masked sum cannot be opened (pair masks or self-mask shares missing or malformed)"


@dataclass
class KeySplit:
    """Key bits a round spent, by use, end to end (what the server saw the protocol take).

    ``pair_masks``: pair masks (or expanded seeds); ``share_pads``: one-time
    pads of the self-mask shares; ``macs``: Wegman–Carter keys (two per pair in
    double masking, one per sealed upload and unmask reply). ``key_bits_used``
    is the ledger's figure over physical links (a relayed key counts per hop;
    a key taken by a client whose message never arrived counts there only).
    """

    pair_masks: int = 0
    share_pads: int = 0
    macs: int = 0

    def record(self) -> dict[str, int]:
        return {"key_bits_pair_masks": self.pair_masks, "key_bits_share_pads": self.share_pads,
                "key_bits_macs": self.macs}


@dataclass
class RoundOutcome:
    """What a masked round hands SecureFedAvg."""

    plan: RoundPlan | None
    total: MaskedSum | None = None
    failure: str | None = None  # why the model is unchanged, when it is
    fail_reason: FailReason | None = None
    drops: list[Drop] = field(default_factory=list)
    uploads: int = 0  # replies that carried an upload, valid or not
    uplink_bytes: int = 0
    downlink_bytes: int = 0
    train_loss: float | None = None
    keys: KeySplit = field(default_factory=KeySplit)

    def reasons(self) -> list[str]:
        return [d.text() for d in self.drops] + ([self.failure] if self.failure else [])


def _text(value: object) -> str:
    text = str(value)
    return text if len(text) <= MAX_ERROR_TEXT else text[: MAX_ERROR_TEXT - 3] + "..."


def _seal_fields(content: RecordDict, name: str) -> tuple[str, bytes]:
    """(key id, tag) of a sealed record, type-checked; SecAggError if missing or mistyped."""
    if name not in content.config_records:
        raise SecAggError(f"the reply lacks the {name!r} ConfigRecord", reason=SecAggReason.MALFORMED)
    record = content[name]
    key_id, tag = record.get("key-id"), record.get("tag")
    if not isinstance(key_id, str) or len(key_id) > MAX_KEY_ID or not isinstance(tag, bytes):
        raise SecAggError(f"the {name!r} record needs a key id (str) and a tag (bytes)", reason=SecAggReason.MALFORMED)
    return key_id, tag


def _pair(a: str, b: str) -> tuple[str, str]:
    """The link's two ends, sorted."""
    return (a, b) if a <= b else (b, a)


def _one_array(content: RecordDict, record: str, name: str) -> bytes:
    if record not in content.array_records:
        raise SecAggError(f"the reply lacks the {record!r} ArrayRecord", reason=SecAggReason.MALFORMED)
    arrays = content.array_records[record]
    exact = record == "update"  # the upload is one array; the shares record holds two
    if (exact and list(arrays.keys()) != [name]) or name not in arrays:
        raise SecAggError(f"the {record!r} ArrayRecord must hold the array {name!r}" + (" only" if exact else ""), reason=SecAggReason.MALFORMED)
    return bytes(arrays[name].data)


@dataclass
class _Upload:
    blob: bytes
    shares: dict[int, SealedShare]
    examples: int
    loss: float | None


class MaskedRound:
    """One masked round on the server, as explicit stages called in order.

    ``setup_keys`` → (the caller sends the train messages) → ``collect_uploads``
    → ``unmask``; :meth:`finish` runs the last two and returns the
    :class:`RoundOutcome`. All per-round state lives here, none on the
    strategy.
    """

    def __init__(
        self, cfg: RunConfig, source: KeySource, send: Callable[[list[Message]], list[Message]], config: ConfigRecord,
        plan: RoundPlan, nodes: Mapping[int, int], drops: list[Drop], example_cap: Callable[[int], int],
    ) -> None:
        self.cfg = cfg
        self.source = source
        self.send = send
        self.config = config
        self.plan = plan
        self.nodes = dict(nodes)  # node id -> partition id, of the participants
        self.example_cap = example_cap
        self.outcome = RoundOutcome(plan, drops=list(drops))
        self.uploads: dict[int, _Upload] = {}
        self.received: set[int] = set()  # partition ids whose upload arrived in any form
        self.failed: set[int] = set()  # partition ids dropped in this round's stages

    @property
    def min_survivors(self) -> int:
        return max(self.cfg.secure_min_clients, self.plan.min_survivors)

    def _drop(self, node: int | None, pid: int | None, reason: DropReason, detail: str = "") -> None:
        drop = Drop(node, pid, reason, detail)
        self.outcome.drops.append(drop)
        if pid is not None:
            self.failed.add(pid)
        log(WARNING, "round %s: %s", self.plan.round, drop.text())

    def _fail(self, reason: FailReason, why: str) -> None:
        self.outcome.fail_reason = reason
        self.outcome.failure = f"round {self.plan.round}: {why}; no masked sum this round (the model is unchanged)"
        log(WARNING, self.outcome.failure)

    # -- stage 1: keys ----------------------------------------------------------------------------
    def setup_keys(self, model: ArrayRecord) -> list[Message]:
        """Each participant takes its pair keys; return the train messages for those that did."""
        self.plan = setup_plan = self._viable(self.plan, self.nodes)
        if len(self.nodes) < self.min_survivors:
            self._fail(FailReason.TOO_FEW_CLIENTS, f"only {len(self.nodes)} clients admitted, fewer than the {self.min_survivors} a sum needs")
            return []
        record = ConfigRecord(setup_plan.to_config())
        setup = [Message(RecordDict({"config": self.config, "secagg": record}), dst_node_id=n, message_type=SETUP)
                 for n in sorted(self.nodes)]
        key_ids: dict[int, dict[int, str]] = {}  # master pid -> {slave pid: key id}
        for reply in self.send(setup):
            node = reply.metadata.src_node_id
            pid = self.nodes.get(node)
            if pid is None or pid in key_ids:
                continue
            try:
                key_ids[pid] = self._key_ids(reply, pid)
            except SecAggError as err:
                self._drop(node, pid, DropReason.SETUP_FAILED, str(err))
        taken = sum(len(ids) for ids in key_ids.values())
        layout = setup_plan.key_layout()
        self.outcome.keys = KeySplit(8 * layout.mask * taken, 8 * layout.share_pads * taken, 8 * layout.macs * taken)
        ready = {n: p for n, p in self.nodes.items() if p in key_ids
                 and all(q in key_ids[p] for q in setup_plan.peers(p) if q > p)}
        for node, pid in sorted(self.nodes.items()):
            if node not in ready and pid not in self.failed:
                self._drop(node, pid, DropReason.SETUP_FAILED, "no key ids for every higher peer")
        self.plan = plan = self._viable(setup_plan.with_participants(ready.values()), ready)
        ready = self.nodes
        if len(ready) < self.min_survivors:
            self._fail(FailReason.TOO_FEW_CLIENTS, f"only {len(ready)} clients set up keys, fewer than the {self.min_survivors} a sum needs")
            return []
        try:
            plan.check()
        except SecAggError as err:
            self._fail(FailReason.BAD_PLAN, str(err))
            return []
        self.outcome.downlink_bytes = payload_bytes(model) * len(ready)
        messages = []
        for node, pid in sorted(ready.items()):
            masters = {i: key_ids[i][pid] for i in plan.peers(pid) if i < pid}
            sec = ConfigRecord({**plan.to_config(), "masters": list(masters), "master-key-ids": list(masters.values())})
            messages.append(Message(RecordDict({"arrays": model, "config": self.config, "secagg": sec}),
                                    dst_node_id=node, message_type=MessageType.TRAIN))
        return messages

    def _viable(self, plan: RoundPlan, nodes: Mapping[int, int]) -> RoundPlan:
        """``plan.viable()``; drops the clients it leaves out (too few peers to share a self-mask with)."""
        viable = plan.viable()
        for node, pid in sorted(nodes.items()):
            if pid not in viable.participants:
                self._drop(node, pid, DropReason.SETUP_FAILED, f"only {len(plan.peers(pid))} of its masking peers remain")
        self.nodes = {n: p for n, p in nodes.items() if p in viable.participants}
        return viable

    def _key_ids(self, reply: Message, pid: int) -> dict[int, str]:
        if reply.has_error():
            raise SecAggError(_text(reply.error.reason), reason=SecAggReason.REFUSED)
        if "pair-keys" not in reply.content.config_records:
            raise SecAggError("no 'pair-keys' record", reason=SecAggReason.MALFORMED)
        rec = reply.content["pair-keys"]
        peers, ids = rec.get("peers"), rec.get("key-ids")
        if not isinstance(peers, list) or not isinstance(ids, list) or len(peers) != len(ids):
            raise SecAggError("'pair-keys' needs two lists of equal length, 'peers' and 'key-ids'", reason=SecAggReason.MALFORMED)
        out = {}
        for peer, key_id in zip(peers, ids):
            if (isinstance(peer, bool) or not isinstance(peer, int) or peer not in self.plan.peers(pid)
                    or peer <= pid or not isinstance(key_id, str) or len(key_id) > MAX_KEY_ID or peer in out):
                raise SecAggError(f"'pair-keys' names peer {_text(peer)!s} / key id {_text(key_id)!s}, "
                                  "not a key with a higher participant", reason=SecAggReason.MALFORMED)
            out[peer] = key_id
        return out

    # -- stage 2: uploads -------------------------------------------------------------------------
    def collect_uploads(self, replies: Iterable[Message]) -> None:
        """Check every reply; keep the valid uploads, drop the rest with a reason."""
        answered: set[int] = set()
        for msg in replies:
            node = msg.metadata.src_node_id
            pid = self.nodes.get(node)
            if pid is None:
                self._drop(node, None, DropReason.NOT_PARTICIPANT)
                continue
            if node in answered:  # a second reply from one node: trust neither
                self.uploads.pop(pid, None)
                self._drop(node, pid, DropReason.MALFORMED, "more than one reply")
                continue
            answered.add(node)
            if msg.has_error():
                self._drop(node, pid, DropReason.CLIENT_ERROR, _text(msg.error.reason))
                continue
            content = msg.content
            if "update" in content.array_records:
                self.received.add(pid)
            reason, detail = self._check_upload(pid, content)
            if reason is not None:
                self._drop(node, pid, reason, detail)
            if "shares" in content.array_records:  # the parsed shares view these bytes; the reply lets go of them
                del content["shares"]
        for node, pid in sorted(self.nodes.items()):
            if node not in answered:
                self._drop(node, pid, DropReason.NO_REPLY)
        self.outcome.uploads = len(self.received)

    def _check_upload(self, pid: int, content: RecordDict) -> tuple[DropReason | None, str]:
        plan = self.plan
        try:
            blob = _one_array(content, "update", "masked")
            ciphers = tags = b""
            if plan.double:
                ciphers, tags = _one_array(content, "shares", "ciphers"), _one_array(content, "shares", "tags")
            self.outcome.uplink_bytes += len(blob) + len(ciphers) + len(tags)
            key_id, tag = _seal_fields(content, "seal")
        except SecAggError as err:
            return DropReason.MALFORMED, str(err)
        try:
            open_seal(self.source, pid, plan.mode, "upload", plan.round, blob, key_id, tag)
        except UnknownKeyId as err:
            return DropReason.REPLAYED, str(err)
        except SecAggError as err:
            self.outcome.keys.macs += 8 * MAC_KEY_BYTES
            return DropReason.BAD_SEAL, str(err)
        self.outcome.keys.macs += 8 * MAC_KEY_BYTES
        if len(blob) != plan.upload_bytes():
            return DropReason.WRONG_SIZE, f"the upload has {len(blob)} bytes, the plan needs {plan.upload_bytes()}"
        try:
            shares = shares_from_wire(plan, pid, ciphers, tags)
        except SecAggError as err:
            return DropReason.WRONG_SIZE, str(err)
        try:
            metrics = content.metric_records["metrics"] if "metrics" in content.metric_records else MetricRecord()
            examples = capped_examples(metrics.get("num-examples"), self.example_cap(pid))
            loss = None
            if "train-loss" in metrics:
                loss = finite_float(metrics["train-loss"], "train-loss", -MAX_ABS_LOSS, MAX_ABS_LOSS)
        except UntrustedValue as err:
            return DropReason.BAD_METRICS, str(err)
        self.uploads[pid] = _Upload(blob, shares, examples, loss)
        return None, ""

    # -- stage 3: unmask --------------------------------------------------------------------------
    def unmask(self) -> RoundOutcome:
        """Fix ``S`` and ``D``, collect the unmask replies, open the sum."""
        plan, out = self.plan, self.outcome
        survivors = sorted(p for p in self.uploads if p not in self.failed)
        dropped = sorted(set(plan.participants) - set(survivors))
        with_loss = [(u.examples, u.loss) for u in (self.uploads[p] for p in survivors) if u.loss is not None]
        weight = sum(n for n, _ in with_loss)
        if weight:
            out.train_loss = sum(n * loss for n, loss in with_loss) / weight
        if len(survivors) < self.min_survivors:
            self._fail(FailReason.TOO_FEW_CLIENTS, f"only {len(survivors)} valid uploads, fewer than the {self.min_survivors} a sum needs")
            return out
        if not plan.double and set(dropped) & self.received:
            self._fail(
                FailReason.SINGLE_MASKING_RECEIVED,
                f"clients {sorted(set(dropped) & self.received)} sent an upload that was received but is invalid; "
                "single masking never asks for the pair masks of a client whose upload arrived (that would "
                "unmask it), so the others' sum cannot be opened. Use secure_masking=double"
            )
            return out
        replies: dict[int, UnmaskReply] = {}
        if plan.double or dropped:
            log(INFO, "round %s: unmasking, survivors %s, dropped %s", plan.round, survivors, dropped)
            replies = self._collect_unmask(survivors, dropped)
        try:
            out.total = unmask_sum(plan, {p: self.uploads[p].blob for p in survivors}, replies, dropped)
        except SecAggError as err:
            self._fail(FailReason.UNMASK_FAILED, f"the masked sum cannot be opened: {err}")
        return out

    def _collect_unmask(self, survivors: list[int], dropped: list[int]) -> dict[int, UnmaskReply]:
        plan = self.plan
        node_of = {p: n for n, p in self.nodes.items()}
        requests = unmask_requests(plan, {p: self.uploads[p].shares for p in survivors}, dropped)
        for upload in self.uploads.values():
            upload.shares = {}  # from here on the requests hold the shares each survivor gets
        messages, asked = [], set(requests)
        for pid in sorted(requests):  # each request's shares are joined into its message, then let go
            fields = requests.pop(pid).to_config()
            shares, tags = fields["shares"], fields["share-tags"]
            assert isinstance(shares, bytes) and isinstance(tags, bytes)  # UnmaskRequest.to_config joins them
            self.outcome.downlink_bytes += len(shares) + len(tags)
            messages.append(Message(RecordDict({"config": self.config, "secagg": ConfigRecord(fields)}),
                                    dst_node_id=node_of[pid], message_type=REVEAL))
        replies: dict[int, UnmaskReply] = {}
        heard: set[int] = set()
        for reply in self.send(messages):
            node = reply.metadata.src_node_id
            sender = self.nodes.get(node)
            if sender is None or sender not in asked or sender in heard:
                continue
            heard.add(sender)
            try:
                replies[sender] = self._open_unmask(reply, sender, survivors, dropped)
            except SecAggError as err:
                self._drop(node, sender, DropReason.NO_UNMASK, str(err))
        for pid in sorted(set(survivors) - heard):
            self._drop(node_of[pid], pid, DropReason.NO_UNMASK, "no reply in time")
        return replies

    def _open_unmask(self, reply: Message, pid: int, survivors: list[int], dropped: list[int]) -> UnmaskReply:
        if reply.has_error():
            raise SecAggError(_text(reply.error.reason), reason=SecAggReason.REFUSED)
        key_id, tag = _seal_fields(reply.content, "reveal")
        body = reply.content["reveal"].get("body")
        if not isinstance(body, bytes):
            raise SecAggError("the 'reveal' record needs a 'body' (bytes)", reason=SecAggReason.MALFORMED)
        self.outcome.uplink_bytes += len(body)
        try:
            open_seal(self.source, pid, self.plan.mode, "reveal", self.plan.round, body, key_id, tag)
        except UnknownKeyId:
            raise
        except SecAggError:
            self.outcome.keys.macs += 8 * MAC_KEY_BYTES
            raise
        self.outcome.keys.macs += 8 * MAC_KEY_BYTES
        answer = UnmaskReply.decode(self.plan, pid, body, survivors, dropped)
        if answer.rejected:
            log(WARNING, "round %s: client %s rejected the shares of %s (failed their MAC)", self.plan.round, pid,
                list(answer.rejected))
        return answer

    def finish(self, replies: Iterable[Message]) -> RoundOutcome:
        """Stages 2 and 3 on the train replies (nothing to do if setup already failed)."""
        if self.outcome.failure is None:
            self.collect_uploads(replies)
            self.unmask()
        self.uploads.clear()  # the uploads and their shares are not kept past the round
        return self.outcome


class ChannelPad:
    """channel-pad, the server half of a transport step: each reply's ``update`` arrives padded and
    sealed with a fresh key of link client~server (``clients.secure`` pads it); :meth:`open` checks
    the seal and strips the pad, so the strategy decodes and aggregates the update as without security.

    The budget reserves :meth:`link_bits` per client and round: the tag key plus a pad of
    ``PAD_MARGIN`` times the largest upload seen so far.
    """

    def __init__(self, source: KeySource) -> None:
        self.source = source
        self.max_upload = 0  # bytes of the largest padded upload so far

    def link_bits(self) -> int:
        return 8 * (MAC_KEY_BYTES + int(self.max_upload * PAD_MARGIN))

    def observe(self, replies: Iterable[Message]) -> None:
        """Before the first upload was seen, size the pad by this round's replies."""
        if not self.max_upload:
            self.max_upload = max((sum(len(a.data) for a in m.content.array_records["update"].values()) for m in replies
                                   if not m.has_error() and "update" in m.content.array_records), default=0)

    def open(self, msg: Message, pid: int | None, server_round: int) -> ArrayRecord:
        """The codec payloads of ``msg``, unpadded; SecAggError if the seal or the pad does not check out."""
        if pid is None:
            raise SecAggError(f"node {msg.metadata.src_node_id} has no known partition id", reason=SecAggReason.MALFORMED)
        key_id, tag = _seal_fields(msg.content, "seal")
        padded = msg.content.array_records["update"]  # QflFedAvg._check_reply has checked that it is one
        cipher = b"".join(bytes(a.data) for a in padded.values())
        self.max_upload = max(self.max_upload, len(cipher))
        plain = open_pad(self.source, pid, server_round, cipher, key_id, tag)
        out, start = ArrayRecord(), 0
        for name, array in padded.items():
            n = len(array.data)
            out[name] = type(array)(dtype="uint8", shape=(n,), stype=str(array.stype).removesuffix("+pad"),
                                    data=plain[start : start + n])
            start += n
        return out


class KeyedFedAvg(QflFedAvg):
    """QflFedAvg whose rounds take QKD key: the half both secure strategies share.

    Each round it samples, learns the nodes' partition ids, ticks the QKD clock,
    prices the round per link and applies ``key_policy`` (clients whose links
    cannot pay are left out), then hands the admitted clients to the subclass's
    round (:meth:`_start`, :meth:`_aggregate`) and accounts the key bits used.
    :func:`secure_strategy` picks the subclass for ``security``.

    Parameters (besides QflFedAvg's)
    --------------------------------
    cfg : RunConfig
        ``security``, ``secure_masking``, ``secure_threshold``, ``secure_clip``,
        ``secure_min_clients``, ``timeout_s`` and the codec.
    budget : KeyBudget
        The key source, QKD network and exhaustion policy of the run.
    """

    def __init__(self, *args, cfg: RunConfig, budget: KeyBudget, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.cfg = cfg
        self.mode = cfg.security
        self.budget = budget
        self.partition_of: dict[int, int] = {}  # node id -> partition id (unambiguous claims only)
        self.contested: dict[int, set[int]] = {}  # partition id -> nodes that all claim it
        self.key_usage_before: dict[str, int] = {}
        self.key_links: dict[str, int] = {}  # bits used this round per link (filled after aggregation)
        self.key_wait_s = 0.0

    # -- helpers --------------------------------------------------------------------------------
    def _send(self, grid: Grid, messages: list[Message]) -> list[Message]:
        return list(grid.send_and_receive(messages, timeout=self.cfg.timeout_s)) if messages else []

    def _learn_partitions(self, grid: Grid, nodes: list[int]) -> dict[int, Drop]:
        """Ask unknown nodes their partition id (validated); return the nodes left out, with the reason."""
        unknown = [n for n in nodes if n not in self.partition_of]
        messages = [Message(RecordDict({}), dst_node_id=n, message_type=HELLO) for n in unknown]
        bad: dict[int, Drop] = {}
        for reply in self._send(grid, messages):
            node = reply.metadata.src_node_id
            if node not in unknown or reply.has_error() or "metrics" not in reply.content.metric_records:
                continue
            try:
                pid = int_in_range(reply.content["metrics"].get("partition-id"), "partition-id", 0, self.cfg.clients - 1)
            except UntrustedValue as err:
                bad[node] = Drop(node, None, DropReason.NO_PARTITION_ID, str(err))
                continue
            holder = next((n for n, p in self.partition_of.items() if p == pid and n != node), None)
            if holder is not None or pid in self.contested:
                self.contested.setdefault(pid, set()).update({node} | ({holder} if holder is not None else set()))
                if holder is not None:
                    self.partition_of.pop(holder, None)
            else:
                self.partition_of[node] = pid
        for node in nodes:
            if node in bad:
                continue
            contested = next((p for p, claimants in self.contested.items() if node in claimants), None)
            if contested is not None:
                bad[node] = Drop(node, contested, DropReason.SHARED_PARTITION_ID, f"partition {contested}")
            elif node not in self.partition_of:
                bad[node] = Drop(node, None, DropReason.NO_PARTITION_ID)
        return bad

    def _needs(self, pids: list[int], server_bits: int, plan: RoundPlan | None = None) -> dict[tuple[str, str], int]:
        """Bits each link must supply this round, sorted pairs as keys: ``server_bits`` on every
        client~server link, and the pair keys of ``plan`` (a masked round) on the client~client links."""
        needs = {_pair(client_sae(i), SERVER_SAE): server_bits for i in pids}
        if plan is not None:
            pair_bits = 8 * plan.pair_key_bytes()
            sampled = plan.with_participants(pids)
            for i in pids:
                for j in sampled.peers(i):
                    if i < j:
                        needs[_pair(client_sae(i), client_sae(j))] = pair_bits
        return needs

    # -- the round ------------------------------------------------------------------------------
    def _price(self, server_round: int, pids: list[int]) -> tuple[RoundPlan | None, dict[tuple[str, str], int]]:
        """The round's plan (None without masking) and the bits each link must supply for ``pids``."""
        raise NotImplementedError

    def _start(
        self, server_round: int, model: ArrayRecord, config: ConfigRecord, plan: RoundPlan | None,
        nodes: dict[int, int], drops: list[Drop], grid: Grid,
    ) -> Iterable[Message]:
        """The train messages for the admitted ``nodes`` (node id -> partition id); ``drops`` are the left out."""
        raise NotImplementedError

    def _aggregate(self, server_round: int, replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        raise NotImplementedError

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.key_links = {}
        self.key_usage_before = self.budget.usage()
        super().configure_train(server_round, arrays, config, grid)  # samples, encodes the model
        self.budget.tick()
        bad = self._learn_partitions(grid, self.sampled)
        drops = list(bad.values())
        nodes = {n: self.partition_of[n] for n in self.sampled if n not in bad}
        plan, needs = self._price(server_round, sorted(nodes.values()))  # one plan: priced for all, narrowed to who can pay
        start = self.budget.clock_s
        admission = self.budget.admit(sorted(nodes.values()), needs)
        self.key_wait_s = self.budget.clock_s - start
        if admission.waited_s:
            log(INFO, "round %s waited %.1f simulated s for QKD key", server_round, admission.waited_s)
        admitted = set(admission.participants)
        for node, pid in sorted(nodes.items()):
            if pid not in admitted:
                drops.append(Drop(node, pid, DropReason.KEY_BUDGET, admission.left_out.get(pid, "not admitted")))
        nodes = {n: p for n, p in nodes.items() if p in admitted}
        self.excluded |= set(self.sampled) - set(nodes)
        for drop in drops:
            log(WARNING, "round %s: %s", server_round, drop.text())
        assert self.current_weights is not None  # configure_train has set the global model
        model = encode_update(self.current_weights, self.downlink_codec)
        return self._start(server_round, model, config, plan, nodes, drops, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        result = self._aggregate(server_round, list(replies))
        self._account(result[1])
        return result

    def _account(self, metrics: MetricRecord | None) -> None:
        after = self.budget.usage()
        self.key_links = {k: after[k] - self.key_usage_before.get(k, 0) for k in after if after[k] != self.key_usage_before.get(k, 0)}
        if metrics is not None:
            metrics["key-bits-used"] = self._key_bits_used()

    def _key_bits_used(self) -> int:
        return self.budget.physical(self.key_links) if self.key_links else 0


class PaddedFedAvg(KeyedFedAvg):
    """security=channel-pad: QflFedAvg's round; the only secure step is the transport (:class:`ChannelPad`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pad = ChannelPad(self.budget.source)
        self._round = 0  # the round being aggregated, for the seals

    def _price(self, server_round: int, pids: list[int]) -> tuple[RoundPlan | None, dict[tuple[str, str], int]]:
        return None, self._needs(pids, self.pad.link_bits())

    def _start(
        self, server_round: int, model: ArrayRecord, config: ConfigRecord, plan: RoundPlan | None,
        nodes: dict[int, int], drops: list[Drop], grid: Grid,
    ) -> Iterable[Message]:
        self.drops += drops
        self.drop_reasons += [d.text() for d in drops]
        self.downlink_bytes = payload_bytes(model) * len(nodes)
        record = RecordDict({"arrays": model, "config": config, "secagg": ConfigRecord({"mode": self.mode})})
        return self._construct_messages(record, sorted(nodes), MessageType.TRAIN)

    def _update_record(self, msg: Message) -> ArrayRecord:
        return self.pad.open(msg, self.partition_of.get(msg.metadata.src_node_id), self._round)

    def _aggregate(self, server_round: int, replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self._round = server_round
        self.pad.observe(replies)
        return QflFedAvg.aggregate_train(self, server_round, replies)


class SecureFedAvg(KeyedFedAvg):
    """security=masked-sum or expanded: each round is a :class:`MaskedRound`; this strategy applies
    the mean of the sum the round hands it (:class:`RoundOutcome`) and adapts the clip bounds.

    Parameters (besides KeyedFedAvg's)
    ----------------------------------
    round_seed : callable
        ``round_seed(server_round)``: the seed all clients of a round share (rand-k supports).
    clips : dict[str, float] | None
        The clip bound per tensor to start from (a resumed run's last one).
    """

    def __init__(self, *args, round_seed, clips=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.round_seed = round_seed
        self.clips: dict[str, float] = dict(clips or {name: self.cfg.secure_clip for name in self.shapes})
        self.masked: MaskedRound | None = None  # the current round's workflow
        self.key_split = KeySplit()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.masked, self.key_split = None, KeySplit()
        return super().configure_train(server_round, arrays, config, grid)

    def _price(self, server_round: int, pids: list[int]) -> tuple[RoundPlan | None, dict[tuple[str, str], int]]:
        plan = make_plan(self.cfg, server_round, pids, self.shapes, self.clips, self.round_seed(server_round))
        return plan, self._needs(pids, 8 * 2 * MAC_KEY_BYTES, plan)  # an upload tag and an unmask-reply tag

    def _start(
        self, server_round: int, model: ArrayRecord, config: ConfigRecord, plan: RoundPlan | None,
        nodes: dict[int, int], drops: list[Drop], grid: Grid,
    ) -> Iterable[Message]:
        assert plan is not None  # _price made it
        self.masked = MaskedRound(
            self.cfg, self.budget.source, lambda messages: self._send(grid, messages), config,
            plan.with_participants(nodes.values()), nodes, drops, self._example_cap,
        )
        return self.masked.setup_keys(model)

    def _aggregate(self, server_round: int, replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self.masked is not None, "configure_train runs before aggregate_train"
        outcome = self.masked.finish(replies)
        self.key_split = outcome.keys
        self.drops = list(outcome.drops)
        self.drop_reasons = outcome.reasons()
        result = outcome.total
        metrics = MetricRecord({
            "uplink-bytes": outcome.uplink_bytes, "uploads": outcome.uploads, "downlink-bytes": outcome.downlink_bytes,
            "clients": 0, "sampled": len(self.sampled), "dropped": len(self.sampled), "key-bits-used": 0,
        })
        self.downlink_bytes = outcome.downlink_bytes
        if outcome.train_loss is not None:
            metrics["train-loss"] = outcome.train_loss
        if result is None:
            return None, metrics
        mean = {name: result.total[name] / result.clients for name in self.shapes}
        saved = {slot: dict(tensors) for slot, tensors in self.optimizer.state.items()}  # step replaces arrays
        new_weights = None
        assert self.current_weights is not None  # configure_train has set the global model
        if all(np.isfinite(v).all() for v in mean.values()):
            with np.errstate(over="ignore", invalid="ignore"):
                new_weights = self.optimizer.step(self.current_weights, mean)
            if not (all(np.isfinite(w).all() for w in new_weights.values())
                    and all(np.isfinite(a).all() for a in self.optimizer.state_arrays().values())):
                new_weights = None
        if new_weights is None:
            self.optimizer.state = saved
            text = f"round {server_round}: the decoded sum or the new model is not finite; the model is unchanged"
            self.drop_reasons.append(text)
            log(WARNING, text)
            return None, metrics
        for name in self.shapes:
            self.clips[name] = adapt_clip(self.clips[name], result.over[name], result.under[name], result.clients)
        metrics["clients"] = result.clients
        metrics["dropped"] = len(self.sampled) - result.clients
        return weights_to_record(new_weights), metrics

    def checkpoint_state(self) -> dict[str, float]:
        """What a resumed run needs: the clip bounds (stored in the round's metrics)."""
        return dict(self.clips)


def secure_strategy(*args, cfg: RunConfig, budget: KeyBudget, round_seed, clips=None, **kwargs) -> KeyedFedAvg:
    """The strategy for ``cfg.security`` (not none): channel-pad pads the transport, the masked modes mask."""
    if cfg.security == "channel-pad":
        return PaddedFedAvg(*args, cfg=cfg, budget=budget, **kwargs)
    return SecureFedAvg(*args, cfg=cfg, budget=budget, round_seed=round_seed, clips=clips, **kwargs)
