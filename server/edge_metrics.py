"""A round's split-learning figures, summed from the edge clients' replies.

Edge clients (``model = "streamsplit"``, :mod:`qfl.clients.edge.task`) report
in their train reply's metrics what crossed the split during the round:
``edge-windows``, ``edge-split-uplink-bytes`` (activation payloads, device →
server), ``edge-split-downlink-bytes`` (gradient payloads back),
``edge-split-hist`` (windows per split point 0..L), ``edge-latency-ms`` and
``edge-energy-mj`` (sums over the windows). Like every client value they are
untrusted: a reply whose figures are not integers/finite numbers in range, or
whose histogram does not have L + 1 entries summing to its window count, is
left out of the sums (the reason is logged). Every answering client counts,
also one whose update is later dropped: its bytes crossed the network anyway.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING
from typing import Any

from flwr.app import Message
from flwr.supercore import log

from .untrusted import UntrustedReason, UntrustedValue, finite_float, int_in_range

MAX_BYTES = 2**53
MAX_WINDOWS = 2**31


def _one(metrics: Any, depth: int) -> tuple[int, int, int, list[int], float, float]:
    windows = int_in_range(metrics.get("edge-windows"), "edge-windows", 0, MAX_WINDOWS)
    up = int_in_range(metrics.get("edge-split-uplink-bytes"), "edge-split-uplink-bytes", 0, MAX_BYTES)
    down = int_in_range(metrics.get("edge-split-downlink-bytes"), "edge-split-downlink-bytes", 0, MAX_BYTES)
    raw = metrics.get("edge-split-hist")
    if not isinstance(raw, list) or len(raw) != depth + 1:
        raise UntrustedValue(f"'edge-split-hist' must be a list of {depth + 1} counts", reason=UntrustedReason.WRONG_TYPE, key="edge-split-hist")
    hist = [int_in_range(v, "edge-split-hist", 0, windows) for v in raw]
    if sum(hist) != windows:
        raise UntrustedValue("'edge-split-hist' does not sum to 'edge-windows'", reason=UntrustedReason.INCONSISTENT, key="edge-split-hist")
    latency = finite_float(metrics.get("edge-latency-ms"), "edge-latency-ms", 0.0, 1e15)
    energy = finite_float(metrics.get("edge-energy-mj"), "edge-energy-mj", 0.0, 1e15)
    return windows, up, down, hist, latency, energy


def split_round_metrics(replies: Iterable[Message], depth: int) -> dict[str, Any]:
    """``split_uplink_bytes``, ``split_downlink_bytes``, ``split_hist``, ``edge_windows``,
    ``latency_ms_per_window`` and ``energy_mj_per_window`` of one round (None per window without windows)."""
    windows, up, down, latency, energy = 0, 0, 0, 0.0, 0.0
    hist = [0] * (depth + 1)
    for msg in replies:
        if msg.has_error() or "metrics" not in msg.content.metric_records:
            continue
        metrics = msg.content.metric_records["metrics"]
        if "edge-windows" not in metrics:
            continue
        try:
            w, u, d, h, lat, en = _one(metrics, depth)
        except UntrustedValue as err:
            log(WARNING, "edge figures of node %s left out: %s", msg.metadata.src_node_id, err)
            continue
        windows, up, down, latency, energy = windows + w, up + u, down + d, latency + lat, energy + en
        hist = [a + b for a, b in zip(hist, h)]
    return {
        "split_uplink_bytes": up,
        "split_downlink_bytes": down,
        "split_hist": hist,
        "edge_windows": windows,
        "latency_ms_per_window": latency / windows if windows else None,
        "energy_mj_per_window": energy / windows if windows else None,
    }
