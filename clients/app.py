"""The Flower ClientApp (Message API).

A train message carries ``arrays`` (the global weights, encoded by the run's
``downlink_codec``) and ``config`` (the flat run configuration plus
``server-round``). The reply carries ``update`` (Δ encoded by the run's
``codec``, see qfl.compression.payload) and ``metrics`` (``num-examples``,
``train-loss``, ``partition-id``).

Stateful codecs (error feedback residuals, PowerSGD's warm start) keep their
per-tensor state in the node's ``context.state`` under ``codec-state``, which
Flower keeps for the node across rounds (the simulation engine's ClientApps are
short-lived; the context is not).

The node's ``partition-id`` and ``num-partitions`` come from its node config:
the simulation engine sets them; on the deployment engine pass them with
``flower-supernode --node-config "partition-id=0 num-partitions=2"``.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from qfl.compression import decode_update, encode_update, make_codec
from qfl.config import RunConfig, resolve_config
from qfl.records import as_int
from qfl.security.secagg import MASKED_MODES
from qfl.seeds import round_seed, task_seed

from . import secure
from .tasks import task_for

CODEC_STATE = "codec-state"

app = ClientApp()


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


def _global_weights(msg: Message, cfg: RunConfig) -> dict[str, np.ndarray]:
    codec = make_codec(cfg.downlink_codec, cfg.downlink_codec_params)
    return decode_update(msg.content.array_records["arrays"], codec, task_for(cfg).shapes())


def load_codec_state(context: Context) -> dict[str, dict[str, np.ndarray]]:
    states: dict[str, dict[str, np.ndarray]] = {}
    record = context.state.array_records.get(CODEC_STATE)
    for key, array in (record or {}).items():
        tensor, _, slot = key.rpartition("/")
        states.setdefault(tensor, {})[slot] = array.numpy()
    return states


def save_codec_state(context: Context, states: dict[str, dict[str, np.ndarray]]) -> None:
    context.state[CODEC_STATE] = ArrayRecord(
        {f"{tensor}/{slot}": Array(np.ascontiguousarray(arr)) for tensor, slots in states.items() for slot, arr in slots.items()}
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    cfg, server_round = _run_config(msg.content.config_records["config"])
    partition_id, num_partitions = _partition(context)
    delta, num_examples, loss = task_for(cfg).local_update(_global_weights(msg, cfg), partition_id, num_partitions, server_round)
    metrics = MetricRecord({"num-examples": num_examples, "train-loss": loss, "partition-id": partition_id})
    seed = task_seed(cfg.seed, server_round, partition_id)
    mode = msg.content["secagg"]["mode"] if "secagg" in msg.content.config_records else "none"
    if mode in MASKED_MODES:
        content = secure.masked_reply(msg, context, cfg, partition_id, delta, seed)
        content["metrics"] = metrics
        return Message(content, reply_to=msg)
    codec = make_codec(cfg.codec, cfg.codec_params, seed=seed)
    states = load_codec_state(context) if codec.traits.stateful else None
    update = encode_update(delta, codec, round_seed(cfg.seed, server_round), states)
    if states is not None:
        save_codec_state(context, states)
    if mode == "channel-pad":
        content = secure.padded_reply(cfg, partition_id, server_round, update)
        content["metrics"] = metrics
        return Message(content, reply_to=msg)
    return Message(RecordDict({"update": update, "metrics": metrics}), reply_to=msg)


@app.query("secagg_hello")
def secagg_hello(msg: Message, context: Context) -> Message:
    return secure.hello(msg, _partition(context)[0])


@app.query("secagg_setup")
def secagg_setup(msg: Message, context: Context) -> Message:
    cfg, _ = _run_config(msg.content.config_records["config"])
    return secure.setup(msg, context, cfg, _partition(context)[0])


@app.query("secagg_reveal")
def secagg_reveal(msg: Message, context: Context) -> Message:
    cfg, _ = _run_config(msg.content.config_records["config"])
    return secure.reveal(msg, context, cfg, _partition(context)[0])


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    cfg, _ = _run_config(msg.content.config_records["config"])
    partition_id, num_partitions = _partition(context)
    loss, accuracy, n = task_for(cfg).local_evaluate(_global_weights(msg, cfg), partition_id, num_partitions)
    metrics = MetricRecord({"num-examples": n, "eval-loss": loss, "eval-accuracy": accuracy, "partition-id": partition_id})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
