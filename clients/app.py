"""The Flower ClientApp (Message API).

A train message carries ``arrays`` (the global weights, encoded by the run's
``downlink_codec``) and ``config`` (the flat run configuration plus
``server-round``). The reply carries ``update`` (Δ encoded by the run's
``codec``, see qfl.compression.payload) and ``metrics`` (``num-examples``,
``train-loss``, ``partition-id``, and the task's ``round_metrics``: the edge
task's ``edge-*`` split traffic, choices, latency and energy).

Stateful codecs (error feedback residuals, PowerSGD's warm start) keep their
per-tensor state between the rounds a client trains: in files under the run's
``client_state_dir`` (simulations) or an edge daemon's state directory, else in
the node's ``context.state`` (see :mod:`qfl.clients.state`).

On an edge daemon's node (node config ``qfl-state``, set by ``qfl edge run``) a
``streamsplit`` round trains on the daemon's own stream (``--data``) instead:
the next windows not yet consumed (:mod:`qfl.clients.edge.spool`), and the
per-node records that must outlive the SuperNode are kept in the daemon's
state (:func:`qfl.clients.daemon.edge_state_mod`).

The node's ``partition-id`` and ``num-partitions`` come from its node config:
the simulation engine sets them; on the deployment engine pass them with
``flower-supernode --node-config "partition-id=0 num-partitions=2"``.

Secure aggregation is the mod :func:`qfl.clients.secure.secagg_mod`, installed
on the app. It answers the workflow's ``query.secagg_*`` messages itself and
wraps the train handler, whose only part in it is one check: under a masked
mode the mod marks the train message (:func:`qfl.clients.secure.wants_raw_delta`)
and the handler replies with the raw Δ under the record ``"delta"``
(float32, :func:`qfl.clients.secure.raw_delta_record`) instead of ``update``;
the mod masks and seals it, and Δ itself never leaves the node. Under
channel-pad the handler replies as usual and the mod pads the ``update``.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from qfl.compression import decode_update, encode_update, make_codec
from qfl.compression.downlink import SYNC_RECORD, client_replica, make_downlink_codec
from qfl.config import RunConfig, resolve_config
from qfl.records import as_int
from qfl.seeds import round_seed, task_seed

from . import secure
from .daemon import MIXTURE_STATE, edge_state_mod, node_spool
from .state import CodecStates, load_in_memory, save_in_memory, state_files
from .tasks import ClientTask, task_for

REPLICA, REPLICA_VERSION = "downlink-replica", "downlink-version"

app = ClientApp(mods=[edge_state_mod, secure.secagg_mod])  # edge_state_mod: a no-op outside `qfl edge`
secure.route_queries(app)  # the query.secagg_* messages reach secagg_mod, which answers them


def _run_config(record: ConfigRecord):
    values = {k: v for k, v in record.items() if k != "server-round"}
    return resolve_config(values), as_int(record["server-round"])


def _partition(context: Context) -> tuple[int, int]:
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as err:
        raise RuntimeError(
            f"node config lacks {err}; start the SuperNode with "
            '--node-config "partition-id=<i> num-partitions=<n>"'
        ) from None


def _global_weights(msg: Message, cfg: RunConfig, context: Context) -> dict[str, np.ndarray]:
    """The model to train or evaluate: the decoded global model, or (``downlink_mode = "delta"``) the
    node's replica after this message's sync, kept in ``context.state`` for the next one."""
    codec = make_downlink_codec(cfg.downlink_codec, cfg.downlink_codec_params, cfg.downlink_mode)
    task = task_for(cfg)
    arrays = msg.content.array_records["arrays"]
    if cfg.downlink_mode != "delta":
        return decode_update(arrays, codec, task.shapes())
    held = None
    if REPLICA in context.state.array_records and REPLICA_VERSION in context.state.config_records:
        replica = {k: a.numpy() for k, a in context.state.array_records[REPLICA].items()}
        held = (as_int(context.state.config_records[REPLICA_VERSION]["version"]), replica)
    version, weights = client_replica(
        msg.content.config_records[SYNC_RECORD], arrays, held, task.initial_weights, codec, task.shapes()
    )
    context.state[REPLICA] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in weights.items()})
    context.state[REPLICA_VERSION] = ConfigRecord({"version": version})
    return weights


def load_codec_state(context: Context, cfg: RunConfig, partition_id: int, server_round: int) -> CodecStates:
    """This client's codec state as of the last round it trained before ``server_round`` (see clients.state)."""
    files = state_files(context, cfg.client_state_dir, partition_id)
    return files.load(server_round)[0] if files is not None else load_in_memory(context)


def save_codec_state(context: Context, cfg: RunConfig, partition_id: int, server_round: int, states: CodecStates) -> None:
    files = state_files(context, cfg.client_state_dir, partition_id)
    if files is None:
        save_in_memory(context, states)
    else:
        files.save(server_round, states)


def _local_update(
    task: ClientTask, msg: Message, context: Context, cfg: RunConfig, partition_id: int, num_partitions: int,
    server_round: int,
) -> tuple[dict[str, np.ndarray], int, float]:
    """The task's local update. On an edge daemon's node (``qfl edge run``) a StreamSplit round trains on the
    next windows of the daemon's stream, leased to this round (committed or released by ``edge_state_mod``
    once the reply is made), and the device's mixture afterwards goes into ``context.state``."""
    from .edge.task import EdgeTask

    weights = _global_weights(msg, cfg, context)
    spool = node_spool(context) if isinstance(task, EdgeTask) else None
    if spool is None:
        return task.local_update(weights, partition_id, num_partitions, server_round)
    assert isinstance(task, EdgeTask)
    try:
        lease = spool.lease(context.run_id, server_round, task.window, cfg.edge_windows, multiple=cfg.edge_batch)
    finally:
        spool.close()
    result = task.train_on(weights, lease.windows(), partition_id, server_round, lease.first_window)
    context.state[MIXTURE_STATE] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in task.last_mixture.items()})
    return result


@app.train()
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    cfg, server_round = _run_config(msg.content.config_records["config"])
    partition_id, num_partitions = _partition(context)
    task = task_for(cfg)
    delta, num_examples, loss = _local_update(task, msg, context, cfg, partition_id, num_partitions, server_round)
    metrics = MetricRecord({"num-examples": num_examples, "train-loss": loss, "partition-id": partition_id,
                            **task.round_metrics()})
    if secure.wants_raw_delta(msg):  # a masked mode: secagg_mod masks Δ; it never leaves the node
        return Message(RecordDict({secure.RAW_DELTA: secure.raw_delta_record(delta), "metrics": metrics}), reply_to=msg)
    codec = make_codec(cfg.codec, cfg.codec_params, seed=task_seed(cfg.seed, server_round, partition_id))
    states = load_codec_state(context, cfg, partition_id, server_round) if codec.traits.stateful else None
    update = encode_update(delta, codec, round_seed(cfg.seed, server_round), states)
    if states is not None:
        save_codec_state(context, cfg, partition_id, server_round, states)
    return Message(RecordDict({"update": update, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    cfg, _ = _run_config(msg.content.config_records["config"])
    partition_id, num_partitions = _partition(context)
    loss, accuracy, n = task_for(cfg).local_evaluate(_global_weights(msg, cfg, context), partition_id, num_partitions)
    metrics = MetricRecord({"num-examples": n, "eval-loss": loss, "eval-accuracy": accuracy, "partition-id": partition_id})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
