"""What the terminal and run.log get: qfl's and Flower's records with time stamps in the file, no
Flower records on the console without --verbose, one unwrapped line per round off a terminal, --quiet."""

from __future__ import annotations

import io
import logging
import re

import flwr.common.logger  # noqa: F401  (installs Flower's console handler, as a run's imports do)
from rich.console import Console

from qfl.config import build_config
from qfl.simulations.report import ConsoleReporter
from qfl.simulations.runlog import RUN_LOG_NAME, start_run_log

RECORD = {"round": 1, "accuracy": 0.5, "loss": 1.0, "fed_accuracy": None, "uplink_bytes": 10**9, "downlink_bytes": 10**9,
          "bits_per_param_up": 8.0, "key_bits_used": 10**12, "clients": 300, "dropped": 0, "wall_s": 1.0}
SUMMARY = {"final_accuracy": 0.5, "total_uplink_bytes": 10**9, "wall_s": 1.0}


def test_run_log_gets_qfl_and_flower_records_with_time_stamps(tmp_path):
    flwr = logging.getLogger("flwr")
    levels = [h.level for h in flwr.handlers]
    stop = start_run_log(tmp_path)
    try:
        logging.getLogger("qfl.server").info("round 1 done")
        flwr.warning("a node did not reply")
        consoles = [h for h in flwr.handlers if not isinstance(h, logging.FileHandler)]
        assert consoles and all(h.level > logging.CRITICAL for h in consoles)  # Flower's console: --verbose only
    finally:
        stop()
    lines = (tmp_path / RUN_LOG_NAME).read_text().splitlines()
    assert len(lines) == 2 and all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} ", line) for line in lines)
    assert "qfl.server" in lines[0] and "flwr" in lines[1]
    assert [h.level for h in flwr.handlers] == levels  # restored


def _reporter(quiet: bool) -> tuple[ConsoleReporter, io.StringIO]:
    out = io.StringIO()
    return ConsoleReporter(Console(file=out, width=1000, soft_wrap=True), quiet=quiet), out


def test_off_a_terminal_each_round_is_one_line(tmp_path):
    reporter, out = _reporter(quiet=False)
    cfg = build_config(overrides=["rounds=1"])
    reporter.announce(cfg, tmp_path, 1)
    reporter.start(cfg, tmp_path, 1)
    reporter.round(RECORD)
    reporter.finish(SUMMARY, [RECORD])
    lines = out.getvalue().splitlines()
    round_lines = [line for line in lines if line.startswith("round=")]
    assert len(round_lines) == 1 and "key bits=1,000,000,000,000" in round_lines[0]


def test_quiet_prints_the_result_line_only(tmp_path):
    reporter, out = _reporter(quiet=True)
    cfg = build_config(overrides=["rounds=1"])
    reporter.announce(cfg, tmp_path, 1)
    reporter.ray_starting("here")
    reporter.start(cfg, tmp_path, 1)
    reporter.round(RECORD)
    reporter.finish(SUMMARY, [RECORD])
    assert out.getvalue().splitlines() == [f"final accuracy 0.5000, uplink 1,000,000,000 B, 1.0 s -> {tmp_path}"]


def test_a_compressed_run_ends_with_its_reduction_against_fp32_both_ways(tmp_path):
    from qfl.server.federation import fp32_comparison

    history = [{"uploads": 4, "clients": 3, "sampled": 5}, {"uploads": 5, "clients": 5, "sampled": 5}]
    summary = {**SUMMARY, "codec": "stc", "total_uplink_bytes": 900, "total_downlink_bytes": 500}
    figures = fp32_comparison(summary, history, fp32_message_bytes=1000)
    assert figures == {"fp32_uplink_bytes": 9000, "fp32_downlink_bytes": 10000, "uplink_reduction_vs_fp32": 10.0,
                       "downlink_reduction_vs_fp32": 20.0, "total_reduction_vs_fp32": 19000 / 1400}
    reporter, out = _reporter(quiet=True)
    reporter.finish({**summary, **figures}, [RECORD])
    assert out.getvalue().splitlines()[-1] == (
        "against fp32 both ways: uplink 10.0× less, downlink 20.0× less, total 13.6× (1,400 B against 19,000 B)"
    )


def test_the_fp32_reference_message_is_what_an_fp32_client_sends():
    from qfl.compression import encode_update, make_codec, payload_bytes
    from qfl.server.federation import CentralEvaluator

    weights = CentralEvaluator(build_config(overrides=["rounds=1"])).initial_weights()
    assert payload_bytes(encode_update(weights, make_codec("fp32"))) == 153_240  # the experiment's fp32 arm, per message


def test_an_edge_runs_summary_names_its_audio_source_not_the_image_dataset():
    from qfl.server.federation import summarize

    edge = build_config(overrides=["model=streamsplit", "rounds=1"])
    assert summarize(edge, [], 10, 0.1, 2.0, 40)["dataset"] == "synthetic-audio"
    folder = build_config(overrides=["model=streamsplit", "edge_audio=/data/esc50.csv", "rounds=1"])
    assert summarize(folder, [], 10, 0.1, 2.0, 40)["dataset"] == "/data/esc50.csv"
    assert summarize(build_config(overrides=["rounds=1"]), [], 10, 0.1, 2.0, 40)["dataset"] == "digits"
