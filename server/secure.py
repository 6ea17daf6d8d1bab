"""SecureFedAvg: QflFedAvg with QKD-keyed secure aggregation (the server half).

The protocol's steps are in :mod:`qfl.security.secagg`; the budget and the
network in :mod:`qfl.server.keys`. One round, for ``security=masked-sum`` or
``expanded`` (the ``query.*`` messages are Flower query messages):

1. sample nodes; learn their partition ids once (``query.secagg_hello``);
2. tick the QKD clock, price the round per link and apply ``key_policy``
   (clients whose links cannot pay are left out and counted as dropped);
3. ``query.secagg_setup``: each participant takes its pair keys as master and
   returns the key ids; participants that fail here are left out;
4. ``train``: each participant gets the plan and the ids of the keys its lower
   peers took, and uploads its masked, sealed codes;
5. the server verifies every seal (a tampered or replayed upload is dropped),
   fixes the dropped set, and if it is not empty asks the survivors for their
   masks with the dropped (``query.secagg_reveal``); uploads that come later
   are never used;
6. it adds the uploads mod 2^B, removes revealed masks, decodes the *sum*,
   and hands the mean (sum / survivors; unweighted, since the server never sees
   one client's update to weight it) to the server optimizer. Fewer than
   ``secure_min_clients`` survivors, or a survivor that does not reveal, leaves
   the model unchanged for the round;
7. it adapts each tensor's clip bound from the summed clip flags.

For ``security=channel-pad`` the round is QflFedAvg's, with every reply
verified and unpadded before it is decoded.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from qfl.compression import encode_update, payload_bytes
from qfl.compression.summable import adapt_clip
from qfl.config import RunConfig
from qfl.security.secagg import (
    MAC_KEY_BYTES,
    MASKED_MODES,
    SERVER_SAE,
    RoundPlan,
    SecAggError,
    client_sae,
    make_plan,
    open_pad,
    open_seal,
    unmask_sum,
)

from .keys import KeyBudget
from .strategy import QflFedAvg, weights_to_record

SETUP, REVEAL, HELLO = "query.secagg_setup", "query.secagg_reveal", "query.secagg_hello"
PAD_MARGIN = 1.25  # channel-pad: key reserved per upload, relative to the largest upload seen


class SecureFedAvg(QflFedAvg):
    """QflFedAvg whose uploads are masked (masked-sum, expanded) or padded (channel-pad) with QKD key.

    Parameters (besides QflFedAvg's)
    --------------------------------
    cfg : RunConfig
        ``security``, ``secure_clip``, ``secure_min_clients``, ``timeout_s`` and the codec.
    budget : KeyBudget
        The key source, QKD network and exhaustion policy of the run.
    round_seed : callable
        ``round_seed(server_round)``: the seed all clients of a round share (rand-k supports).
    clips : dict[str, float] | None
        The clip bound per tensor to start from (a resumed run's last one).
    """

    def __init__(self, *args, cfg: RunConfig, budget: KeyBudget, round_seed, clips=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.cfg = cfg
        self.mode = cfg.security
        self.budget = budget
        self.round_seed = round_seed
        self.clips: dict[str, float] = dict(clips or {name: cfg.secure_clip for name in self.shapes})
        self.partition_of: dict[int, int] = {}  # node id -> partition id
        self.plan: RoundPlan | None = None
        self.grid: Grid | None = None
        self.key_usage_before: dict[str, int] = {}
        self.key_links: dict[str, int] = {}  # bits used this round per link (filled after aggregation)
        self.key_wait_s = 0.0
        self.extra_uplink = 0  # setup and reveal bytes
        self.max_upload = 0  # channel-pad: the largest padded upload so far, for the budget

    # -- helpers --------------------------------------------------------------------------------
    def _send(self, grid: Grid, messages: list[Message]) -> list[Message]:
        return list(grid.send_and_receive(messages, timeout=self.cfg.timeout_s)) if messages else []

    def _learn_partitions(self, grid: Grid, nodes: list[int]) -> None:
        unknown = [n for n in nodes if n not in self.partition_of]
        messages = [Message(RecordDict({}), dst_node_id=n, message_type=HELLO) for n in unknown]
        for reply in self._send(grid, messages):
            if not reply.has_error() and "metrics" in reply.content.metric_records:
                pid = reply.content["metrics"].get("partition-id")
                if isinstance(pid, int) and 0 <= pid < self.cfg.clients:
                    self.partition_of[reply.metadata.src_node_id] = pid

    def _needs(self, pids: list[int], plan: RoundPlan | None) -> dict[tuple[str, str], int]:
        """Bits each link must supply this round, sorted pairs as keys."""
        needs: dict[tuple[str, str], int] = {}
        server_bits = 8 * 2 * MAC_KEY_BYTES  # an upload tag and a possible reveal tag
        if plan is None:  # channel-pad: the pad plus its tag key
            server_bits = 8 * (MAC_KEY_BYTES + int(self.max_upload * PAD_MARGIN))
        for i in pids:
            needs[tuple(sorted((client_sae(i), SERVER_SAE)))] = server_bits
        if plan is not None:
            for i in pids:
                for j in pids:
                    if i < j:
                        needs[tuple(sorted((client_sae(i), client_sae(j))))] = 8 * plan.pair_key_bytes()
        return needs

    def _leave_out(self, nodes: dict[int, int], pids: set[int], reason_of: dict[int, str]) -> dict[int, int]:
        kept = {}
        for node, pid in nodes.items():
            if pid in pids:
                kept[node] = pid
            else:
                self.excluded.add(node)
                text = f"client {pid} (node {node}) left out: {reason_of.get(pid, 'not admitted')}"
                self.drop_reasons.append(text)
                log(WARNING, text)
        return kept

    # -- configure ------------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.grid = grid
        self.config = config
        self.plan = None
        self.extra_uplink = 0
        self.key_links = {}
        self.key_usage_before = self.budget.usage()
        super().configure_train(server_round, arrays, config, grid)  # samples, encodes the model
        self.budget.tick()
        self._learn_partitions(grid, self.sampled)
        unknown = [n for n in self.sampled if n not in self.partition_of]
        nodes = {n: self.partition_of[n] for n in self.sampled if n in self.partition_of}
        for node in unknown:
            self.excluded.add(node)
            self.drop_reasons.append(f"node {node} did not tell its partition id; left out")
        plan = None
        if self.mode in MASKED_MODES:
            plan = make_plan(self.cfg, server_round, sorted(nodes.values()), self.shapes, self.clips,
                             self.round_seed(server_round))
        start = self.budget.clock_s
        admission = self.budget.admit(sorted(nodes.values()), self._needs(sorted(nodes.values()), plan))
        self.key_wait_s = self.budget.clock_s - start
        if admission.waited_s:
            log(INFO, "round %s waited %.1f simulated s for QKD key", server_round, admission.waited_s)
        nodes = self._leave_out(nodes, set(admission.participants), admission.left_out)
        model = encode_update(self.current_weights, self.downlink_codec)
        if plan is None:  # channel-pad
            self.downlink_bytes = payload_bytes(model) * len(nodes)
            record = RecordDict({"arrays": model, "config": config, "secagg": ConfigRecord({"mode": self.mode})})
            return self._construct_messages(record, sorted(nodes), MessageType.TRAIN)
        return self._setup_masked(server_round, config, model, nodes, grid)

    def _setup_masked(self, server_round, config, model, nodes: dict[int, int], grid: Grid) -> list[Message]:
        if len(nodes) < self.cfg.secure_min_clients:
            self._too_few(server_round, len(nodes), "admitted")
            return []
        plan = make_plan(self.cfg, server_round, sorted(nodes.values()), self.shapes, self.clips,
                         self.round_seed(server_round))
        setup = [
            Message(RecordDict({"config": config, "secagg": ConfigRecord(plan.to_config())}), dst_node_id=n,
                    message_type=SETUP)
            for n in sorted(nodes)
        ]
        key_ids: dict[int, dict[int, str]] = {}  # master pid -> {slave pid: key id}
        for reply in self._send(grid, setup):
            node = reply.metadata.src_node_id
            if reply.has_error() or "pair-keys" not in reply.content.config_records:
                why = reply.error.reason if reply.has_error() else "no 'pair-keys' record"
                self.drop_reasons.append(f"client {nodes.get(node)} failed the key setup: {why}")
                continue
            rec = reply.content["pair-keys"]
            key_ids[nodes[node]] = dict(zip((int(p) for p in rec["peers"]), (str(k) for k in rec["key-ids"])))
        ready = {n: p for n, p in nodes.items() if p in key_ids and all(
            q in key_ids[p] for q in nodes.values() if q > p)}
        for node in set(nodes) - set(ready):
            self.excluded.add(node)
            if not any(f"client {nodes[node]} failed" in r for r in self.drop_reasons):
                self.drop_reasons.append(f"client {nodes[node]} did not complete the key setup")
        if len(ready) < self.cfg.secure_min_clients:
            self._too_few(server_round, len(ready), "set up keys")
            return []
        self.plan = plan = make_plan(self.cfg, server_round, sorted(ready.values()), self.shapes, self.clips,
                                     self.round_seed(server_round))
        self.node_of = {p: n for n, p in ready.items()}
        self.downlink_bytes = payload_bytes(model) * len(ready)
        messages = []
        for node, pid in sorted(ready.items()):
            masters = {i: key_ids[i][pid] for i in plan.participants if i < pid}
            sec = ConfigRecord({**plan.to_config(), "masters": list(masters), "master-key-ids": list(masters.values())})
            messages.append(Message(RecordDict({"arrays": model, "config": config, "secagg": sec}),
                                    dst_node_id=node, message_type=MessageType.TRAIN))
        return messages

    def _too_few(self, server_round: int, count: int, stage: str) -> None:
        text = (f"round {server_round}: only {count} clients {stage}, fewer than secure_min_clients="
                f"{self.cfg.secure_min_clients}; no masked sum this round (the model is unchanged)")
        self.drop_reasons.append(text)
        log(WARNING, text)

    # -- channel-pad ----------------------------------------------------------------------------
    def _update_record(self, msg: Message) -> ArrayRecord:
        if self.mode != "channel-pad":
            return super()._update_record(msg)
        node = msg.metadata.src_node_id
        pid = self.partition_of.get(node)
        if pid is None or "seal" not in msg.content.config_records:
            raise SecAggError("the reply is not sealed (no 'seal' record)")
        seal = msg.content["seal"]
        padded = msg.content["update"]
        cipher = b"".join(bytes(a.data) for a in padded.values())
        self.max_upload = max(self.max_upload, len(cipher))
        plain = open_pad(self.budget.source, pid, self._round, cipher, str(seal["key-id"]), bytes(seal["tag"]))
        out, start = ArrayRecord(), 0
        for name, array in padded.items():
            n = len(array.data)
            out[name] = type(array)(dtype="uint8", shape=(n,), stype=array.stype.removesuffix("+pad"),
                                    data=plain[start : start + n])
            start += n
        return out

    # -- aggregate ------------------------------------------------------------------------------
    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        self._round = server_round
        replies = list(replies)
        if self.mode == "channel-pad":
            if not self.max_upload:
                self.max_upload = max((sum(len(a.data) for a in m.content["update"].values()) for m in replies
                                       if not m.has_error() and "update" in m.content.array_records), default=0)
            result = super().aggregate_train(server_round, replies)
        else:
            result = self._aggregate_masked(server_round, replies)
        self._account(result[1])
        return result

    def _account(self, metrics: MetricRecord | None) -> None:
        after = self.budget.usage()
        self.key_links = {k: after[k] - self.key_usage_before.get(k, 0) for k in after if after[k] != self.key_usage_before.get(k, 0)}
        if metrics is not None:
            metrics["key-bits-used"] = self._key_bits_used()
            metrics["uplink-bytes"] = int(metrics["uplink-bytes"]) + self.extra_uplink

    def _key_bits_used(self) -> int:
        return self.budget.physical(self.key_links) if self.key_links else 0

    def _aggregate_masked(self, server_round: int, replies: list[Message]):
        plan = self.plan
        uploads: dict[int, bytes] = {}
        losses: dict[int, tuple[int, float]] = {}
        uplink = 0
        answered = {m.metadata.src_node_id for m in replies}
        for msg in replies:
            node = msg.metadata.src_node_id
            pid = self.partition_of.get(node)
            if msg.has_error():
                self._drop(msg, f"the client failed: {msg.error.reason}")
                continue
            try:
                blob, seal, metrics = self._open_reply(msg)
                uplink += len(blob)
                if plan is None or pid not in plan.participants:
                    raise SecAggError(f"node {node} is not a participant of this round")
                if len(blob) != plan.upload_bytes():
                    raise SecAggError(f"masked upload has {len(blob)} bytes, the plan needs {plan.upload_bytes()}")
                open_seal(self.budget.source, pid, plan.mode, "upload", server_round, blob,
                          str(seal["key-id"]), bytes(seal["tag"]))
            except SecAggError as err:
                self._drop(msg, str(err))
                continue
            uploads[pid] = blob
            losses[pid] = (int(metrics.get("num-examples", 0)), float(metrics.get("train-loss", float("nan"))))
        if plan is not None:
            for node in (self.node_of[p] for p in plan.participants):
                if node not in answered:
                    self.drop_reasons.append(f"node {node} did not reply in time")
        metrics = MetricRecord({
            "uplink-bytes": uplink, "uploads": len(uploads), "downlink-bytes": self.downlink_bytes,
            "clients": 0, "sampled": len(self.sampled), "dropped": len(self.sampled), "key-bits-used": 0,
        })
        if plan is None or len(uploads) < self.cfg.secure_min_clients:
            if plan is not None:
                self._too_few(server_round, len(uploads), "uploaded a valid masked update")
            return None, metrics
        # The dropped set is fixed here, before any reveal; later uploads are never used.
        dropped = sorted(set(plan.participants) - set(uploads))
        reveals: dict[int, bytes] = {}
        if dropped:
            reveals = self._collect_reveals(server_round, plan, sorted(uploads), dropped)
            if reveals is None:
                return None, metrics
        try:
            result = unmask_sum(plan, uploads, reveals, dropped)
        except SecAggError as err:
            self.drop_reasons.append(f"round {server_round}: the masked sum cannot be opened: {err}")
            log(WARNING, self.drop_reasons[-1])
            return None, metrics
        mean = {name: result.total[name] / result.clients for name in self.shapes}
        if not all(np.isfinite(v).all() for v in mean.values()):
            self.drop_reasons.append(f"round {server_round}: the decoded sum is not finite; model unchanged")
            return None, metrics
        for name in self.shapes:
            self.clips[name] = adapt_clip(self.clips[name], result.over[name], result.under[name], result.clients)
        metrics["clients"] = result.clients
        metrics["dropped"] = len(self.sampled) - result.clients
        total = sum(n for n, _ in losses.values())
        if total:
            metrics["train-loss"] = sum(n * loss for n, loss in losses.values()) / total
        new_weights = self.optimizer.step(self.current_weights, mean)
        return weights_to_record(new_weights), metrics

    def _open_reply(self, msg: Message):
        content = msg.content
        if "update" not in content.array_records or "seal" not in content.config_records:
            raise SecAggError("reply lacks the 'update' ArrayRecord or the 'seal' ConfigRecord")
        arrays = list(content["update"].values())
        if len(arrays) != 1:
            raise SecAggError(f"a masked upload is one array, got {len(arrays)}")
        metrics = content["metrics"] if "metrics" in content.metric_records else {}
        return bytes(arrays[0].data), content["seal"], metrics

    def _collect_reveals(self, server_round: int, plan: RoundPlan, survivors: list[int], dropped: list[int]):
        log(INFO, "round %s: clients %s dropped; survivors reveal their masks with them", server_round, dropped)
        messages = [
            Message(RecordDict({"config": self.config,
                                "secagg": ConfigRecord({**plan.to_config(), "dropped": dropped})}),
                    dst_node_id=self.node_of[i], message_type=REVEAL)
            for i in survivors
        ]
        reveals: dict[int, bytes] = {}
        for reply in self._send(self.grid, messages):
            pid = self.partition_of.get(reply.metadata.src_node_id)
            if reply.has_error() or "reveal" not in reply.content.config_records or pid not in survivors:
                continue
            rec = reply.content["reveal"]
            blob = bytes(rec["masks"])
            self.extra_uplink += len(blob)
            try:
                open_seal(self.budget.source, pid, plan.mode, "reveal", server_round, blob, str(rec["key-id"]),
                          bytes(rec["tag"]))
            except SecAggError as err:
                self.drop_reasons.append(f"reveal of client {pid}: {err}")
                continue
            reveals[pid] = blob
        missing = sorted(set(survivors) - set(reveals))
        if missing:
            text = (f"round {server_round}: survivors {missing} did not reveal their masks with the dropped "
                    f"{dropped}; the sum cannot be opened and the model is unchanged this round")
            self.drop_reasons.append(text)
            log(WARNING, text)
            return None
        return reveals

    def checkpoint_state(self) -> dict[str, float]:
        """What a resumed run needs: the clip bounds (stored in the round's metrics)."""
        return dict(self.clips)

