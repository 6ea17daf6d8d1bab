"""QflFedAvg: Flower's message-based FedAvg, for compressed update replies.

Clients reply with Δ (not weights), encoded by the run's codec. The strategy

1. samples ``fraction`` of the connected nodes with a RNG seeded by
   (seed, round), and sends each the global model (encoded by the downlink
   codec) and the run ``config``;
2. checks every reply: an error reply, missing records, an undecodable or
   mis-shaped payload, NaN/Inf, or a bad example count drops that client from
   the round (counted in ``dropped``, the reason logged), and a node that never
   answers is dropped too;
3. averages the surviving Δ weighted by example count, in float64 and in
   partition order (so the result does not depend on reply arrival order);
4. hands Δ̄ to the server optimizer (FedAvg / FedAvgM / FedAdam) for the new
   global weights. With no surviving reply the model is left unchanged.

The returned MetricRecord carries the round's accounting: ``uplink-bytes``,
``downlink-bytes``, ``clients`` (updates used), ``sampled``, ``dropped``,
``train-loss`` and ``key-bits-used``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from qfl.compression import Codec, PayloadError, decode_update, encode_update, payload_bytes
from qfl.security.secagg import SecAggError

from .optimizers import ServerOptimizer


class NotEnoughNodes(RuntimeError):
    """Fewer nodes connected than the run needs, within the timeout."""


def weights_to_record(weights: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in weights.items()})


def record_to_weights(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in record.items()}


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
        Whether to run federated evaluation on all nodes each round.
    wait_timeout : float
        Seconds to wait for ``min_nodes`` to connect.
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
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=1.0 if fed_eval else 0.0,
            min_train_nodes=1,
            min_evaluate_nodes=1 if fed_eval else 0,
            min_available_nodes=min_nodes,
        )
        self.codec = codec
        self.downlink_codec = downlink_codec
        self.shapes = shapes
        self.optimizer = optimizer
        self.seed = seed
        self.wait_timeout = wait_timeout
        self.current_weights: dict[str, np.ndarray] | None = None
        self.sampled: list[int] = []
        self.downlink_bytes = 0
        self.eval_downlink_bytes = 0
        self.drop_reasons: list[str] = []
        self.excluded: set[int] = set()  # sampled nodes not sent a train message (a subclass's choice)

    # -- sampling ---------------------------------------------------------
    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        deadline = time.monotonic() + self.wait_timeout
        while len(nodes := sorted(grid.get_node_ids())) < self.min_available_nodes:
            if time.monotonic() > deadline:
                raise NotEnoughNodes(
                    f"only {len(nodes)} of {self.min_available_nodes} nodes connected after "
                    f"{self.wait_timeout:.0f}s; start more SuperNodes or set clients={len(nodes)}"
                )
            time.sleep(0.5)
        return nodes

    def _sample(self, grid: Grid, server_round: int, fraction: float) -> list[int]:
        nodes = self._wait_for_nodes(grid)
        count = max(1, int(round(len(nodes) * fraction)))
        rng = np.random.default_rng([self.seed, server_round])
        picks = rng.choice(len(nodes), size=count, replace=False)  # indices: node ids overflow int64
        return sorted(nodes[int(i)] for i in picks)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current_weights = record_to_weights(arrays)
        self.drop_reasons = []
        self.excluded = set()
        self.sampled = self._sample(grid, server_round, self.fraction_train)
        model = encode_update(self.current_weights, self.downlink_codec)
        self.downlink_bytes = payload_bytes(model) * len(self.sampled)
        config["server-round"] = server_round
        record = RecordDict({"arrays": model, "config": config})
        return self._construct_messages(record, self.sampled, MessageType.TRAIN)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0:
            self.eval_downlink_bytes = 0
            return []
        nodes = self._wait_for_nodes(grid)
        model = encode_update(record_to_weights(arrays), self.downlink_codec)
        self.eval_downlink_bytes = payload_bytes(model) * len(nodes)
        config["server-round"] = server_round
        record = RecordDict({"arrays": model, "config": config})
        return self._construct_messages(record, nodes, MessageType.EVALUATE)

    # -- aggregation ------------------------------------------------------
    def _drop(self, msg: Message, reason: str) -> None:
        text = f"round reply from node {msg.metadata.src_node_id} dropped: {reason}"
        self.drop_reasons.append(text)
        log(WARNING, text)

    def _check_reply(self, msg: Message) -> tuple[int, int, float, dict[str, np.ndarray]] | None:
        """(partition id, examples, loss, Δ) of a usable reply, else None (dropped)."""
        if msg.has_error():
            self._drop(msg, f"the client failed: {msg.error.reason}")
            return None
        content = msg.content
        if "update" not in content.array_records or "metrics" not in content.metric_records:
            self._drop(msg, "reply lacks the 'update' ArrayRecord or the 'metrics' MetricRecord")
            return None
        metrics = content["metrics"]
        examples = metrics.get("num-examples")
        if not isinstance(examples, (int, float)) or not np.isfinite(examples) or examples <= 0:
            self._drop(msg, f"'num-examples' must be a positive number, got {examples!r}")
            return None
        try:
            delta = decode_update(self._update_record(msg), self.codec, self.shapes)
        except (PayloadError, SecAggError) as err:
            self._drop(msg, str(err))
            return None
        partition = int(metrics.get("partition-id", msg.metadata.src_node_id))
        loss = float(metrics.get("train-loss", float("nan")))
        return partition, int(examples), loss, delta

    def _update_record(self, msg: Message) -> ArrayRecord:
        """The codec payloads of a reply (a subclass may first unwrap a channel pad)."""
        return msg.content["update"]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        uplink = sum(
            payload_bytes(m.content["update"]) for m in replies if not m.has_error() and "update" in m.content.array_records
        )
        uploads = sum(1 for m in replies if not m.has_error() and "update" in m.content.array_records)
        answered = {m.metadata.src_node_id for m in replies}
        for node in self.sampled:
            if node not in answered and node not in self.excluded:
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
        total = sum(r[1] for r in accepted)
        mean_delta = {
            name: sum(r[1] * r[3][name].astype(np.float64) for r in accepted) / total for name in self.shapes
        }
        metrics["train-loss"] = sum(r[1] * r[2] for r in accepted) / total
        new_weights = self.optimizer.step(self.current_weights, mean_delta)
        return weights_to_record(new_weights), metrics

    def _key_bits_used(self) -> int:
        """Key bits this round consumed (none without security)."""
        return 0

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        rows = []
        for msg in replies:
            if msg.has_error() or "metrics" not in msg.content.metric_records:
                continue
            m = msg.content["metrics"]
            n, loss, acc = m.get("num-examples"), m.get("eval-loss"), m.get("eval-accuracy")
            if all(isinstance(v, (int, float)) and np.isfinite(v) for v in (n, loss, acc)) and n > 0:
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
