"""QflFedAvg: Flower's message-based FedAvg, for compressed update replies.

Clients reply with Δ (not weights), encoded by the run's codec. The strategy

1. samples ``fraction`` of the connected nodes with a RNG seeded by
   (seed, round), and sends each the global model (encoded by the downlink
   codec) and the run ``config``;
2. checks every reply: an error reply, missing records, an undecodable or
   mis-shaped payload, NaN/Inf, or a bad metric drops that client from
   the round (counted in ``dropped``, the reason logged), and a node that never
   answers is dropped too;
3. averages the surviving Δ weighted by example count, in float64 and in
   partition order (so the result does not depend on reply arrival order);
4. hands Δ̄ to the server optimizer (FedAvg / FedAvgM / FedAdam) for the new
   global weights. With no surviving reply the model is left unchanged.

The returned MetricRecord carries the round's accounting: ``uplink-bytes``,
``downlink-bytes``, ``clients`` (updates used), ``sampled``, ``dropped``,
``train-loss`` and ``key-bits-used``.

Hostile clients. Everything in a reply is untrusted (``qfl.server.untrusted``):

- ``partition-id`` must be an int in [0, num_partitions) (or [0, 2**31) when
  the strategy is not told num_partitions); ``num-examples`` an int in
  [1, cap], where cap is the partition's training-set size when the server
  knows it (``example_caps``) and ``max_client_examples`` otherwise; so one
  client's share of the average is at most cap / (cap + the others' examples).
  ``train-loss``, when sent, must be finite with |loss| <= 1e15.
- the update is decoded with every allocation bounded by the model's shapes
  (``Codec.decode_as``) and refused if it holds NaN/Inf;
- any violation, or any unexpected error while decoding, drops that client
  with a reason; the round goes on with the others. An aggregate that is not
  finite in float32 (finite but huge updates) leaves the model unchanged.
- evaluate replies with bad metrics are left out of ``fed-*`` (reasons in
  ``eval_ignored``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from qfl.compression import Codec, PayloadError, decode_update, encode_update, payload_bytes
from qfl.compression.downlink import SYNC_RECORD, DownlinkReplica
from qfl.config import RunConfig
from qfl.errors import NotEnoughNodes
from qfl.security.secagg import SecAggError, SecAggReason

from .optimizers import ServerOptimizer, weighted_mean
from .untrusted import UntrustedValue, capped_examples, finite_float, int_in_range

MAX_PARTITION_ID = 2**31 - 1  # when the strategy is not told how many partitions there are
MAX_ABS_LOSS = 1e15  # a larger |loss| is no honest loss, and could overflow the weighted mean


def weights_to_record(weights: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in weights.items()})


def record_to_weights(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in record.items()}


class DropReason(Enum):
    """Why a client's update is not in a round's aggregate (the text goes to logs and ``drop_reasons``)."""

    NO_PARTITION_ID = "did not tell a valid partition id"
    SHARED_PARTITION_ID = "claims a partition id another node claims too"
    KEY_BUDGET = "left out by the key budget"
    SETUP_FAILED = "failed the key setup"
    CLIENT_ERROR = "the client failed"
    NO_REPLY = "did not reply in time"
    MALFORMED = "sent a malformed reply"
    NOT_PARTICIPANT = "is not a participant of this round"
    REPLAYED = "sent a seal whose key id is unknown or spent (replayed or forged)"
    BAD_SEAL = "sent an upload that fails its MAC"
    WRONG_SIZE = "sent an upload or shares of the wrong size"
    BAD_METRICS = "sent invalid metrics"
    UNDECODABLE = "sent an update that cannot be decoded"
    NO_UNMASK = "did not answer the unmask request"  # a survivor: its upload stays in the sum


@dataclass(frozen=True)
class Drop:
    """One client left out of (or, for NO_UNMASK, failing) a round, with the details."""

    node: int | None
    pid: int | None
    reason: DropReason
    detail: str = ""

    def text(self) -> str:
        who = f"client {self.pid} (node {self.node})" if self.pid is not None else f"node {self.node}"
        return f"{who}: {self.reason.value}" + (f": {self.detail}" if self.detail else "")


#: A channel pad that does not open (server.secure.ChannelPad), as a drop reason.
_PAD_DROPS = {SecAggReason.REPLAYED: DropReason.REPLAYED, SecAggReason.WRONG_SIZE: DropReason.WRONG_SIZE,
              SecAggReason.BAD_MAC: DropReason.BAD_SEAL}


class QflFedAvg(FedAvg):
    """FedAvg over codec-encoded updates with a pluggable server optimizer.

    Parameters
    ----------
    codec : Codec
        Decodes the ``update`` ArrayRecord of each reply.
    downlink_codec : Codec
        Encodes the global model sent to clients (stateless; the server keeps
        the exact float32 weights and applies updates to them).
    shapes : dict[str, tuple[int, ...]]
        The model's tensor names and shapes; replies must match exactly.
    optimizer : ServerOptimizer
        Turns the weighted mean update into new global weights.
    min_nodes : int
        Nodes that must be connected before a round starts.
    fraction_train : float
        Share of connected nodes sampled for training each round.
    seed : int
        Seeds the per-round sampling.
    fed_eval : bool
        Whether to run federated evaluation each round, on a sample of the
        nodes as large as the training sample (drawn independently of it).
    wait_timeout : float
        Seconds to wait for ``min_nodes`` to connect.
    max_client_examples : int
        Largest ``num-examples`` accepted from a client whose partition size
        the server does not know. The round config's ``max_client_examples``
        (the run config, sent each round) replaces it in ``configure_train``.
    example_caps : Mapping[int, int] | None
        Training-set size per partition id, where the server knows it: a
        client of that partition may claim at most that many examples.
    num_partitions : int | None
        Partition ids must lie in [0, num_partitions); None: [0, 2**31).
    downlink : DownlinkReplica | None
        ``downlink_mode = "delta"``: the clients' replica; train messages carry
        the compressed change of the model against it (``qfl.compression.downlink``)
        and ``downlink_codec`` is unused. None: the model itself, by ``downlink_codec``.
    """

    def __init__(
        self,
        codec: Codec,
        downlink_codec: Codec,
        shapes: dict[str, tuple[int, ...]],
        optimizer: ServerOptimizer,
        min_nodes: int,
        fraction_train: float = 1.0,
        seed: int = 0,
        fed_eval: bool = True,
        wait_timeout: float = 600.0,
        max_client_examples: int = RunConfig.max_client_examples,
        example_caps: Mapping[int, int] | None = None,
        num_partitions: int | None = None,
        downlink: DownlinkReplica | None = None,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_train if fed_eval else 0.0,
            min_train_nodes=1,
            min_evaluate_nodes=1 if fed_eval else 0,
            min_available_nodes=min_nodes,
        )
        self.codec = codec
        self.downlink_codec = downlink_codec
        self.downlink = downlink
        self.shapes = shapes
        self.optimizer = optimizer
        self.seed = seed
        self.wait_timeout = wait_timeout
        self.current_weights: dict[str, np.ndarray] | None = None
        self.sampled: list[int] = []
        self.downlink_bytes = 0
        self.eval_downlink_bytes = 0
        self.eval_nodes: list[int] = []  # the nodes sent the last evaluate messages
        self.drop_reasons: list[str] = []  # one line per drop (and per failed round), for logs and metrics
        self.drops: list[Drop] = []  # the same drops, with their DropReason
        self.eval_ignored: list[str] = []  # why evaluate replies were left out of the last fed-* metrics
        self.excluded: set[int] = set()  # sampled nodes not sent a train message (a subclass's choice)
        self.max_client_examples = _positive_int(max_client_examples, "max_client_examples")
        self.example_caps = {int(p): _positive_int(n, f"example_caps[{p}]") for p, n in (example_caps or {}).items()}
        if num_partitions is not None:
            num_partitions = _positive_int(num_partitions, "num_partitions")
        self.num_partitions = num_partitions

    # -- sampling ---------------------------------------------------------
    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        deadline = time.monotonic() + self.wait_timeout
        while len(nodes := sorted(grid.get_node_ids())) < self.min_available_nodes:
            if time.monotonic() > deadline:
                raise NotEnoughNodes(
                    f"only {len(nodes)} of {self.min_available_nodes} nodes connected after "
                    f"{self.wait_timeout:.0f}s; start more SuperNodes or set clients={len(nodes)}",
                    connected=len(nodes),
                    needed=self.min_available_nodes,
                )
            time.sleep(0.5)
        return nodes

    def _sample(self, grid: Grid, server_round: int, fraction: float, purpose: int = 0) -> list[int]:
        """``fraction`` of the connected nodes, drawn from (seed, round[, purpose]): 0 trains, 1 evaluates."""
        nodes = self._wait_for_nodes(grid)
        count = max(1, int(round(len(nodes) * fraction)))
        rng = np.random.default_rng([self.seed, server_round, purpose] if purpose else [self.seed, server_round])
        picks = rng.choice(len(nodes), size=count, replace=False)  # indices: node ids overflow int64
        return sorted(nodes[int(i)] for i in picks)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current_weights = record_to_weights(arrays)
        self.drop_reasons = []
        self.drops = []
        if "max_client_examples" in config:
            self.max_client_examples = _positive_int(config["max_client_examples"], "max_client_examples")
        self.excluded = set()
        self.sampled = self._sample(grid, server_round, self.fraction_train)
        config["server-round"] = server_round
        messages, self.downlink_bytes = self._model_messages(self.current_weights, self.sampled, config, MessageType.TRAIN)
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0:
            self.eval_downlink_bytes = 0
            return []
        nodes = self._sample(grid, server_round, self.fraction_evaluate, purpose=1)
        self.eval_nodes = nodes
        config["server-round"] = server_round
        messages, self.eval_downlink_bytes = self._model_messages(
            record_to_weights(arrays), nodes, config, MessageType.EVALUATE
        )
        return messages

    def _model_messages(
        self, weights: dict[str, np.ndarray], nodes: list[int], config: ConfigRecord, kind: str
    ) -> tuple[list[Message], int]:
        """The messages carrying ``weights`` (or, in delta mode, the replica's sync) to ``nodes``, and their bytes.

        Delta mode syncs the replica towards ``weights`` on train messages only;
        evaluate messages bring each node to the replica it should hold already.
        """
        if self.downlink is None:
            model = encode_update(weights, self.downlink_codec)
            record = RecordDict({"arrays": model, "config": config})
            return list(self._construct_messages(record, nodes, kind)), payload_bytes(model) * len(nodes)
        if kind == MessageType.TRAIN:
            self.downlink.sync(weights)
        messages: list[Message] = []
        sent = 0
        for group in self.downlink.messages(nodes):
            record = RecordDict({"arrays": group.arrays, "config": config, SYNC_RECORD: ConfigRecord(group.config())})
            messages += self._construct_messages(record, group.nodes, kind)
            sent += group.bytes_per_node * len(group.nodes)
        return messages, sent

    def _forget_unsynced(self, sent: Iterable[int], replies: list[Message]) -> None:
        """Delta mode: nodes sent a sync that failed or never answered may not hold it; they get the full replica next."""
        if self.downlink is None:
            return
        ok = {m.metadata.src_node_id for m in replies if not m.has_error()}
        self.downlink.forget(n for n in sent if n not in ok)

    # -- aggregation ------------------------------------------------------
    def _drop(self, msg: Message, reason: DropReason, detail: str) -> None:
        self.drops.append(Drop(msg.metadata.src_node_id, None, reason, detail))
        text = f"round reply from node {msg.metadata.src_node_id} dropped: {detail}"
        self.drop_reasons.append(text)
        log(WARNING, text)

    def _example_cap(self, partition: int | None) -> int:
        """Most examples a client of ``partition`` may claim: its known size, else the configured maximum."""
        if partition is not None and partition in self.example_caps:
            return self.example_caps[partition]
        return self.max_client_examples

    def _partition(self, metrics: MetricRecord) -> int | None:
        """The validated ``partition-id`` of a reply (None when it sends none)."""
        if "partition-id" not in metrics:
            return None
        top = self.num_partitions - 1 if self.num_partitions is not None else MAX_PARTITION_ID
        return int_in_range(metrics["partition-id"], "partition-id", 0, top)

    def _check_reply(self, msg: Message) -> tuple[tuple[int, int], int, float | None, dict[str, np.ndarray]] | None:
        """((partition id, node id), examples, loss, Δ) of a usable reply, else None (dropped).

        Every metric is validated before use and the update is decoded within
        the model's shapes; nothing a client sends can raise out of here.
        """
        if msg.has_error():
            self._drop(msg, DropReason.CLIENT_ERROR, f"the client failed: {msg.error.reason}")
            return None
        content = msg.content
        if "update" not in content.array_records or "metrics" not in content.metric_records:
            self._drop(msg, DropReason.MALFORMED, "reply lacks the 'update' ArrayRecord or the 'metrics' MetricRecord")
            return None
        metrics = content.metric_records["metrics"]
        node = msg.metadata.src_node_id
        try:
            partition = self._partition(metrics)
            examples = capped_examples(metrics.get("num-examples"), self._example_cap(partition))
            loss = None
            if "train-loss" in metrics:
                loss = finite_float(metrics["train-loss"], "train-loss", -MAX_ABS_LOSS, MAX_ABS_LOSS)
        except UntrustedValue as err:
            self._drop(msg, DropReason.BAD_METRICS, f"bad metric: {err}")
            return None
        try:
            delta = decode_update(self._update_record(msg), self.codec, self.shapes)
        except PayloadError as err:
            self._drop(msg, DropReason.UNDECODABLE, str(err))
            return None
        except SecAggError as err:  # a channel pad that does not open
            self._drop(msg, _PAD_DROPS.get(err.reason, DropReason.MALFORMED), str(err))
            return None
        except Exception as err:  # a decoder bug must not end the run; the client is left out
            self._drop(msg, DropReason.UNDECODABLE, f"its update could not be decoded ({type(err).__name__}: {err}); this is a qfl bug, please report it")
            return None
        # Sorted by (partition, node): duplicate partition ids (a lying client) stay in a fixed order.
        key = (partition if partition is not None else node, node)
        return key, examples, loss, delta

    def _update_record(self, msg: Message) -> ArrayRecord:
        """The codec payloads of a reply (a subclass may first unwrap a channel pad)."""
        return msg.content.array_records["update"]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self._forget_unsynced(set(self.sampled) - self.excluded, replies)
        uplink = sum(
            payload_bytes(m.content.array_records["update"]) for m in replies if not m.has_error() and "update" in m.content.array_records
        )
        uploads = sum(1 for m in replies if not m.has_error() and "update" in m.content.array_records)
        answered = {m.metadata.src_node_id for m in replies}
        for node in self.sampled:
            if node not in answered and node not in self.excluded:
                self.drops.append(Drop(node, None, DropReason.NO_REPLY))
                self.drop_reasons.append(f"node {node} did not reply in time")
                log(WARNING, "node %s did not reply in time; dropped from round %s", node, server_round)
        accepted = sorted(filter(None, (self._check_reply(m) for m in replies)), key=lambda r: r[0])
        dropped = len(self.sampled) - len(accepted)
        metrics = MetricRecord(
            {
                "uplink-bytes": uplink,
                "uploads": uploads,
                "downlink-bytes": self.downlink_bytes,
                "clients": len(accepted),
                "sampled": len(self.sampled),
                "dropped": dropped,
                "key-bits-used": self._key_bits_used(),
            }
        )
        if not accepted or self.current_weights is None:
            log(WARNING, "round %s: no usable update; the global model is unchanged", server_round)
            return None, metrics
        mean_delta = weighted_mean([(r[1], r[3]) for r in accepted], self.shapes)
        with_loss = [(r[1], r[2]) for r in accepted if r[2] is not None]
        loss_weight = sum(n for n, _ in with_loss)
        metrics["train-loss"] = sum(n * loss for n, loss in with_loss) / loss_weight if with_loss else float("nan")
        saved = {slot: dict(tensors) for slot, tensors in self.optimizer.state.items()}  # step replaces arrays
        with np.errstate(over="ignore", invalid="ignore"):
            new_weights = self.optimizer.step(self.current_weights, mean_delta)
            finite = all(np.isfinite(w).all() for w in new_weights.values()) and all(
                np.isfinite(a).all() for a in self.optimizer.state_arrays().values()
            )
        if not finite:
            # Every update was finite, but huge: the new weights overflow float32.
            # The model and the optimizer's state stay as they were.
            self.optimizer.state = saved
            text = f"round {server_round}: the aggregated model is not finite in float32; the global model is unchanged"
            self.drop_reasons.append(text)
            log(WARNING, text)
            return None, metrics
        return weights_to_record(new_weights), metrics

    def _key_bits_used(self) -> int:
        """Key bits this round consumed (none without security)."""
        return 0

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted ``fed-loss`` and ``fed-accuracy`` over the replies whose metrics check out.

        ``num-examples`` must be an int in [1, cap] (as for training), ``eval-loss``
        finite with |loss| <= 1e15 and ``eval-accuracy`` in [0, 1]; other replies
        are left out, with the reason in ``eval_ignored`` and the log.
        """
        self.eval_ignored = []
        replies = list(replies)
        self._forget_unsynced(self.eval_nodes, replies)
        rows = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error() or "metrics" not in msg.content.metric_records:
                continue  # a failed or empty evaluation: nothing to use, as before
            m = msg.content.metric_records["metrics"]
            if m.get("num-examples") == 0 and not isinstance(m.get("num-examples"), bool):
                continue  # an empty validation share (honest): nothing to average
            try:
                cap = self._example_cap(self._partition(m))
                n = capped_examples(m.get("num-examples"), cap)
                loss = finite_float(m.get("eval-loss"), "eval-loss", -MAX_ABS_LOSS, MAX_ABS_LOSS)
                acc = finite_float(m.get("eval-accuracy"), "eval-accuracy", 0.0, 1.0)
            except UntrustedValue as err:
                text = f"round {server_round}: evaluate reply from node {node} ignored: {err}"
                self.eval_ignored.append(text)
                log(WARNING, text)
                continue
            rows.append((n, loss, acc))
        total = sum(r[0] for r in rows)
        if not total:
            return None
        return MetricRecord(
            {
                "fed-loss": sum(r[0] * r[1] for r in rows) / total,
                "fed-accuracy": sum(r[0] * r[2] for r in rows) / total,
                "fed-clients": len(rows),
            }
        )


def _positive_int(value: object, name: str) -> int:
    """A server-side setting as an int >= 1; ValueError naming the fix otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)
