"""Secure aggregation inside real Flower rounds (simulation engine).

The faulty ClientApp lives in a script run as __main__ so Ray ships it to its
workers by value. It wraps qfl's real client (its train handler and evaluate, with
qfl's secagg_mod, plus an outer mod that plays the network): in round 2 three of ten clients
(30%) fail; in round 3 one client's masked upload is tampered with in transit
and another replays its round-2 upload (double masking, the default). The
dropped clients' pair masks and the survivors' self-masks are recovered,
the bad uploads are rejected and counted, and the ledger shows no key bit
used twice.
"""

import json
import subprocess
import sys
import textwrap

from helpers import REPO

from qfl.security.keys.store import KeyStore

SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
    from flwr.clientapp import ClientApp

    from qfl.clients import app as real
    from qfl.clients import secure
    from qfl.config import build_config
    from qfl.simulations.runner import run_simulation_job

    FAULTS = "security=masked-sum" in sys.argv  # captured by value when Ray ships train()


    def in_transit(msg, context, call_next):  # the network: tampers with and replays masked uploads
        reply = call_next(msg, context)
        if not FAULTS or msg.metadata.message_type != "train":
            return reply
        rnd = int(msg.content["config"]["server-round"])
        pid = int(context.node_config["partition-id"])
        if pid == 5 and rnd == 2:  # keep this upload to replay it next round
            context.state["old-update"] = reply.content["update"]
            context.state["old-seal"] = reply.content["seal"]
            context.state["old-shares"] = reply.content["shares"]
        if rnd != 3 or pid not in (2, 5):
            return reply
        content = RecordDict({"metrics": reply.content["metrics"], "shares": reply.content["shares"]})
        if pid == 2:  # flip one bit in transit
            array = reply.content["update"]["masked"]
            data = bytearray(array.data)
            data[len(data) // 2] ^= 0x10
            content["update"] = ArrayRecord({"masked": Array(dtype="uint8", shape=(len(data),), stype=array.stype,
                                                             data=bytes(data))})
            content["seal"] = reply.content["seal"]
        else:  # replay round 2
            content["update"] = context.state["old-update"]
            content["seal"] = context.state["old-seal"]
            content["shares"] = context.state["old-shares"]
        return Message(content, reply_to=msg)


    faulty = ClientApp(mods=[in_transit, secure.secagg_mod])  # in_transit sees what secagg_mod sends


    @faulty.train()
    def train(msg, context):
        rnd = int(msg.content["config"]["server-round"])
        pid = int(context.node_config["partition-id"])
        if FAULTS and rnd == 2 and pid in (1, 4, 7):
            raise RuntimeError("client crashed (test)")
        return real.train(msg, context)


    faulty.evaluate()(real.evaluate)
    secure.route_queries(faulty)

    cfg = build_config(None, [*sys.argv[2:], "rounds=3", "clients=10"])
    run_simulation_job(cfg, Path(sys.argv[1]), client_app=faulty)
    """
)


def _run(tmp_path, *settings):
    script = tmp_path / "faulty_secure_run.py"
    script.write_text(SCRIPT)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(script), str(out), *settings], cwd=REPO, capture_output=True,
                          text=True, timeout=600, start_new_session=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return out, json.loads((out / "metrics.json").read_text())


def test_masked_sum_survives_dropouts_tampering_and_replay(tmp_path):
    out, history = _run(tmp_path, "security=masked-sum", "codec=fp32", "local_epochs=1")
    first, second, third = history
    assert first["clients"] == 10 and first["dropped"] == 0
    # double masking (the default): the key split by use adds up to the ledger in a round without faults
    split = first["key_bits_pair_masks"] + first["key_bits_share_pads"] + first["key_bits_macs"]
    assert first["key_bits_pair_masks"] > 0 and split == first["key_bits_used"]
    # seeded self-masks (the default): each of the 45 pairs pads two 34-byte shares of a 32-byte seed
    assert first["key_bits_share_pads"] == 45 * 2 * 34 * 8
    # round 2: 30% dropped, their pair masks revealed by the 7 survivors (t = 5 shares of each
    # survivor's self-mask), the sum still opens
    assert second["clients"] == 7 and second["dropped"] == 3
    assert sum("client failed" in r for r in second["drop_reasons"]) == 3
    # round 3: a tampered and a replayed upload are rejected and recovered like dropouts (their self-masks
    # are never unmasked)
    assert third["clients"] == 8 and third["dropped"] == 2
    reasons = " | ".join(third["drop_reasons"])
    assert "fails its MAC" in reasons and "already used" in reasons
    assert third["loss"] < second["loss"] < first["loss"]  # the model keeps learning through the faults
    # key: every round spent pair keys for all 45 pairs; no bit was handed out twice
    assert all(r["key_bits_used"] > 0 for r in history)
    store = KeyStore(out / "keys.db")
    assert store.verify() == []
    assert len(store.ledger("client-1~client-2")) == 3  # one pair key per round, also in the dropout round


def test_channel_pad_with_topk_and_an_eavesdropped_link(tmp_path):
    _, history = _run(tmp_path, "security=channel-pad", "codec=topk", "codec.ratio=0.05", "local_epochs=1",
                      "qkd_eavesdropped=client-6~server")
    for record in history:
        assert record["clients"] == 9 and record["dropped"] == 1
        (reason,) = record["drop_reasons"]
        assert "client-6~server makes no key" in reason and "QBER" in reason
        # the pad costs exactly the upload's bits plus one 128-bit tag key per client
        assert record["key_bits_used"] == 8 * record["uplink_bytes"] + 9 * 128
    assert history[-1]["accuracy"] > history[0]["accuracy"]
