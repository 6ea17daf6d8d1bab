"""The Flower ClientApp (Message API).

A train message carries ``arrays`` (the global weights, plain numpy Arrays)
and ``config`` (the flat run configuration plus ``server-round``). The reply
carries ``update`` (Δ encoded by the run's codec, see qfl.compression.payload)
and ``metrics`` (``num-examples``, ``train-loss``, ``partition-id``).

The node's ``partition-id`` and ``num-partitions`` come from its node config:
the simulation engine sets them; on the deployment engine pass them with
``flower-supernode --node-config "partition-id=0 num-partitions=2"``.
"""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from qfl.compression import encode_update, make_codec
from qfl.config import resolve_config

from .classical import local_evaluate, local_update

app = ClientApp()


def _run_config(record: ConfigRecord):
    values = {k: v for k, v in record.items() if k != "server-round"}
    return resolve_config(values), int(record["server-round"])


def _partition(context: Context) -> tuple[int, int]:
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as err:
        raise RuntimeError(
            f"node config lacks {err}; start the SuperNode with "
            '--node-config "partition-id=<i> num-partitions=<n>"'
        ) from None


def _global_weights(msg: Message) -> dict:
    return {k: a.numpy() for k, a in msg.content["arrays"].items()}


@app.train()
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    cfg, server_round = _run_config(msg.content["config"])
    partition_id, num_partitions = _partition(context)
    delta, num_examples, loss = local_update(cfg, _global_weights(msg), partition_id, num_partitions, server_round)
    update = encode_update(delta, make_codec(cfg.codec, cfg.codec_params))
    metrics = MetricRecord({"num-examples": num_examples, "train-loss": loss, "partition-id": partition_id})
    return Message(RecordDict({"update": update, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    cfg, _ = _run_config(msg.content["config"])
    partition_id, num_partitions = _partition(context)
    loss, accuracy, n = local_evaluate(cfg, _global_weights(msg), partition_id, num_partitions)
    metrics = MetricRecord({"num-examples": n, "eval-loss": loss, "eval-accuracy": accuracy, "partition-id": partition_id})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
