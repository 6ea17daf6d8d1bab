"""A run where some clients send NaN, truncated or missing updates goes on.

The faulty ClientApp lives in a script run as __main__, so Ray ships it to its
workers by value; it wraps qfl's real client and breaks partitions 0 and 1 in
round 1 only.
"""

import json
import textwrap

from helpers import REPO

SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import numpy as np
    from flwr.app import Array, Message, RecordDict
    from flwr.clientapp import ClientApp

    from qfl.clients import app as real
    from qfl.compression import PAYLOAD_STYPE
    from qfl.config import resolve_config
    from qfl.simulations.runner import run_simulation_job

    faulty = ClientApp()

    @faulty.train()
    def train(msg, context):
        reply = real.train(msg, context)
        pid = int(context.node_config["partition-id"])
        if int(msg.content["config"]["server-round"]) != 1 or pid > 2:
            return reply
        update = reply.content["update"]
        name = next(iter(update.keys()))
        if pid == 0:  # NaN in the update
            data = bytearray(update[name].data)
            data[-4:] = np.array([np.nan], dtype="<f4").tobytes()
            update[name] = Array(dtype="uint8", shape=(len(data),), stype=PAYLOAD_STYPE, data=bytes(data))
        elif pid == 1:  # truncated payload
            update[name] = Array(dtype="uint8", shape=(7,), stype=PAYLOAD_STYPE, data=update[name].data[:7])
        else:  # no update at all
            return Message(RecordDict({"metrics": reply.content["metrics"]}), reply_to=msg)
        return Message(RecordDict({"update": update, "metrics": reply.content["metrics"]}), reply_to=msg)

    faulty.evaluate()(real.evaluate)

    cfg = resolve_config({"rounds": 3, "clients": 5, "codec": "fp32", "security": "none"})
    run_simulation_job(cfg, Path(sys.argv[1]), client_app=faulty)
    """
)


def test_bad_replies_are_dropped_and_the_run_goes_on(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "faulty_run.py"
    script.write_text(SCRIPT)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(script), str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, start_new_session=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    history = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in history] == [1, 2, 3]
    first = history[0]
    assert first["dropped"] == 3 and first["clients"] == 2
    reasons = " | ".join(first["drop_reasons"])
    assert "NaN/Inf" in reasons and "cannot be decoded" in reasons and "lacks the 'update'" in reasons
    assert all(r["dropped"] == 0 and r["clients"] == 5 for r in history[1:])
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in history)
    assert history[-1]["accuracy"] > 0.3  # the model kept learning from the good updates


HOSTILE_SCRIPT = textwrap.dedent(
    """
    import struct
    import sys
    from pathlib import Path

    import numpy as np
    import zstandard
    from flwr.app import Array, Message, RecordDict
    from flwr.clientapp import ClientApp

    from qfl.clients import app as real
    from qfl.compression import PAYLOAD_STYPE
    from qfl.compression.wire import pack_header, unpack_header
    from qfl.config import resolve_config
    from qfl.simulations.runner import run_simulation_job

    hostile = ClientApp()
    F32 = np.dtype("<f4")

    @hostile.train()
    def train(msg, context):
        reply = real.train(msg, context)
        pid = int(context.node_config["partition-id"])
        metrics = reply.content["metrics"]
        if pid == 0:  # randk+zstd: an honest outer header around an inner header claiming 2**34 elements
            update = reply.content["update"]
            name = next(iter(update.keys()))
            outer = unpack_header(update[name].data, 10)
            inner = pack_header(8, F32, (1 << 17, 1 << 17)) + struct.pack("<QI", 7, 1) + np.float32(1).tobytes()
            frame = zstandard.ZstdCompressor(level=1, write_content_size=True).compress(inner)
            data = bytes(update[name].data[: outer.size]) + bytes((1, 8)) + frame
            update[name] = Array(dtype="uint8", shape=(len(data),), stype=PAYLOAD_STYPE, data=data)
            return Message(RecordDict({"update": update, "metrics": metrics}), reply_to=msg)
        if pid == 1:
            metrics["num-examples"] = float("nan")
        elif pid == 2:
            metrics["partition-id"] = float("nan")
        elif pid == 3:
            metrics["num-examples"] = 1.7e308  # would take the whole averaging weight
        return reply

    @hostile.evaluate()
    def evaluate(msg, context):
        reply = real.evaluate(msg, context)
        if int(context.node_config["partition-id"]) in (1, 2):
            reply.content["metrics"]["eval-accuracy"] = float("nan")
        return reply

    cfg = resolve_config({"rounds": 2, "clients": 6, "codec": "randk", "codec.ratio": 0.5, "codec.entropy": "zstd",
                          "security": "none"})
    run_simulation_job(cfg, Path(sys.argv[1]), client_app=hostile)
    """
)


def test_hostile_payloads_and_nan_metrics_never_end_the_run(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "hostile_run.py"
    script.write_text(HOSTILE_SCRIPT)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(script), str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, start_new_session=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    history = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in history] == [1, 2]
    for r in history:
        assert r["dropped"] == 4 and r["clients"] == 2
        reasons = " | ".join(r["drop_reasons"])
        assert "inner randk payload" in reasons and "'num-examples' must be an integer, got nan" in reasons
        assert "'partition-id' must be an integer, got nan" in reasons and "'num-examples' = 1.7e+308" in reasons
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["fed_accuracy"] <= 1.0  # the NaN accuracies were ignored
