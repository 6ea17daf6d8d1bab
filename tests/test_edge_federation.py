"""StreamSplit edge clients federated: config keys, the edge task, the round's split figures, `qfl run`."""

import json

import numpy as np
import pytest
import soundfile
from flwr.app import Message, MetricRecord, RecordDict
from helpers import run_qfl

from qfl.clients.tasks import task_for
from qfl.config import ConfigError, resolve_config
from qfl.server.edge_metrics import split_round_metrics
from qfl.server.preflight import check_components

SMALL = {
    "model": "streamsplit", "clients": 2, "rounds": 1, "security": "none", "codec": "fp32", "edge_blocks": 4,
    "edge_windows": 16, "edge_batch": 8, "edge_components": 8, "edge_virtual_negatives": 16, "edge_mels": 32,
    "edge_dim": 16, "edge_probe_windows": 40, "edge_split": "static", "edge_split_k": 2,
}


@pytest.mark.parametrize("key, bad", [
    ("edge_blocks", 3), ("edge_split_k", 7), ("edge_negatives", "memory-bank"), ("edge_split", "always"),
    ("edge_batch", 1), ("edge_lambda_sw", -0.1), ("edge_classes", 11), ("edge_windows", 4),
])
def test_bad_edge_keys_name_the_key(key, bad):
    with pytest.raises(ConfigError) as err:
        resolve_config({**SMALL, key: bad})
    assert err.value.key == key


def test_edge_codec_is_checked_before_a_run():
    with pytest.raises(ConfigError) as err:
        check_components(resolve_config({**SMALL, "edge_codec": "zip"}))
    assert err.value.key == "edge_codec"
    with pytest.raises(ConfigError) as err:
        check_components(resolve_config({**SMALL, "edge_codec": "qsgd", "edge_codec.bits": 99}))
    assert err.value.key == "edge_codec"


def test_edge_task_trains_device_and_server_blocks_and_reports_the_split():
    cfg = resolve_config({**SMALL, "edge_codec": "qsgd", "edge_codec.bits": 4})
    task = task_for(cfg)
    weights = task.initial_weights()
    assert {k: v.shape for k, v in weights.items()} == task.shapes()
    delta, examples, loss = task.local_update(weights, 1, 2, 1)
    assert set(delta) == set(weights) and examples == 16 and np.isfinite(loss)
    assert all(np.isfinite(d).all() for d in delta.values())
    assert np.abs(delta["stem.conv.weight"]).sum() > 0 and np.abs(delta["head.linear.weight"]).sum() > 0
    assert float(delta["gmm.seen"][0]) == 16  # the mixture saw every anchor window
    m = task.round_metrics()
    assert m["edge-windows"] == 16 and m["edge-split-hist"] == [0, 0, 16, 0, 0]
    assert m["edge-split-uplink-bytes"] > 0 and m["edge-split-downlink-bytes"] > 0
    assert m["edge-latency-ms"] > 0 and m["edge-energy-mj"] > 0
    loss, accuracy = task.central_evaluate(weights)
    assert 0 <= accuracy <= 1 and np.isfinite(loss)


def test_edge_task_reads_a_folder_of_the_users_audio(tmp_path):
    t = np.arange(3 * 16000) / 16000
    for label, freq in (("hum", 200.0), ("whistle", 3000.0)):
        (tmp_path / label).mkdir()
        for i in range(4):
            soundfile.write(tmp_path / label / f"{i}.flac", (0.3 * np.sin(2 * np.pi * freq * (1 + 0.05 * i) * t)).astype(np.float32), 16000)
    cfg = resolve_config({**SMALL, "edge_audio": str(tmp_path), "edge_probe_windows": 20})
    task = task_for(cfg)
    assert task.train_size() == 6 and task.training_sizes(2) == [16, 16]
    weights = task.initial_weights()
    delta, examples, _ = task.local_update(weights, 0, 2, 1)
    assert examples == 16 and all(np.isfinite(d).all() for d in delta.values())
    _, accuracy = task.central_evaluate(weights)  # 2 held-out files x 3 windows
    assert 0 <= accuracy <= 1
    with pytest.raises(ValueError):
        task.check_partition(7)


def _reply(node: int, **metrics) -> Message:
    record = MetricRecord({})
    record.__dict__["_data"].update(metrics)  # a hostile peer is not bound by Flower's checks
    msg = Message(RecordDict({"metrics": MetricRecord({})}), dst_node_id=node, message_type="train")
    return Message(RecordDict({"metrics": record}), reply_to=msg)


def test_split_figures_are_summed_and_hostile_ones_left_out(task_identity):
    good = {"edge-windows": 16, "edge-split-uplink-bytes": 1000, "edge-split-downlink-bytes": 900,
            "edge-split-hist": [0, 16, 0], "edge-latency-ms": 800.0, "edge-energy-mj": 32.0}
    replies = [
        _reply(1, **good),
        _reply(2, **{**good, "edge-split-hist": [0, 8, 8]}),
        _reply(3, **{**good, "edge-split-hist": [0, 99, 0]}),  # does not sum to its windows
        _reply(4, **{**good, "edge-split-uplink-bytes": -5}),
        _reply(5, **{**good, "edge-latency-ms": float("nan")}),
        _reply(6, **{**good, "edge-split-hist": "lots"}),
        _reply(7, **{"num-examples": 3}),  # not an edge reply
    ]
    figures = split_round_metrics(replies, depth=2)
    assert figures["edge_windows"] == 32 and figures["split_hist"] == [0, 24, 8]
    assert figures["split_uplink_bytes"] == 2000 and figures["split_downlink_bytes"] == 1800
    assert figures["latency_ms_per_window"] == pytest.approx(50.0) and figures["energy_mj_per_window"] == pytest.approx(2.0)


def test_qfl_run_trains_edge_clients_through_flower(tmp_path):
    out = tmp_path / "edge"
    args = ["run", "--config", "simulations/configs/edge-streamsplit.toml", "--out", str(out)]
    overrides = {k: v for k, v in SMALL.items() if k != "codec"}  # the file's 8-bit QSGD updates
    for key, value in {**overrides, "rounds": 2, "edge_split": "heuristic"}.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    result = run_qfl(args, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:]
    history = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in history] == [1, 2]
    for r in history:
        assert r["edge_windows"] == 2 * 16 and sum(r["split_hist"]) == 32 and len(r["split_hist"]) == 5
        assert r["split_hist"][0] == 0 and r["split_hist"][4] == 0  # the heuristic keeps 1 <= k <= L-1
        assert r["split_uplink_bytes"] > 0 and r["latency_ms_per_window"] > 0 and r["energy_mj_per_window"] > 0
        assert r["linear_probe_accuracy"] == r["accuracy"] and 0 <= r["accuracy"] <= 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["total_split_uplink_bytes"] == sum(r["split_uplink_bytes"] for r in history)
    assert "split up B" in result.stdout
