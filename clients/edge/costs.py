"""What a split point costs: measured compute, real bytes, bandwidth traces and a linear energy model.

For one window and split point k (see :mod:`qfl.clients.edge.encoder`):

    device_ms(k)  = Σ_{parts on the device} t_part · device_slowdown / (1 − load)
    uplink_ms(k)  = 8 · bytes(k) / (bandwidth_Mbit/s · 1000) + rtt_ms
    server_ms(k)  = Σ_{parts on the server} t_part / server_speedup
    latency(k)    = device_ms + uplink_ms + server_ms
    energy_mJ(k)  = 1000 · (FLOPs_device(k) · J_per_FLOP + bytes(k) · J_per_byte)

``t_part`` is the forward time of the stem, each block and the head for one
window, **measured on this machine** (median of repeats, one thread);
``device_slowdown`` scales it to an edge device (default 8: a Raspberry-Pi-class
core against one x86 server core) and the injected ``load`` ∈ [0, 0.95] leaves
the share 1 − load of the core to us. ``bytes(k)`` is the length of the codec
payload of one window's tensor at k, measured by encoding it. The energy model
is linear: 1 nJ per FLOP (≈ 1 GFLOP/J, a Cortex-A72 class core) and 7 µJ per
byte sent (the ≈ 0.007 J/KB Wi-Fi transfer energy that Balasubramanian et al.,
IMC 2009, measured on phones, without the fixed per-transfer term). Receiving
and idle power are left out; every constant is a config key. The
figures are per inference window (forward only); training adds a backward pass
(≈ 2× forward) on whichever side holds the blocks.

``fidelity(k)`` is the task-quality proxy of split k: the mean cosine between the
embedding computed through the codec at k and the exact embedding, measured on
sample windows. Under qfl's split training every k trains the same encoder with
the same loss (gradients cross the split at every k), so the codec's distortion
is what k changes about quality.

Traces: :func:`client_conditions` gives each client its own CPU-load and
bandwidth trace (a seeded regime-switching process around a per-client level);
:func:`scripted_conditions` is a fixed schedule for the adaptation plot.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from .encoder import CodecChannel, SplitEncoder

MAX_LOAD = 0.95
BANDWIDTH_RANGE_MBPS = (0.25, 16.0)


@dataclass(frozen=True)
class CostModel:
    """Per-window costs of every split point k = 0..L (lists indexed by k, parts by [stem, blocks, head])."""

    part_ms: tuple[float, ...]  # measured forward ms of [stem, block 1..L, head] for one window
    part_flops: tuple[float, ...]
    bytes_by_k: tuple[int, ...]
    fidelity_by_k: tuple[float, ...]
    device_slowdown: float = 8.0
    server_speedup: float = 4.0
    rtt_ms: float = 50.0
    joule_per_flop: float = 1e-9
    joule_per_byte: float = 7e-6

    @property
    def depth(self) -> int:
        return len(self.bytes_by_k) - 1

    def device_parts(self, k: int) -> int:
        """How many of [stem, blocks..., head] the device runs at k: none at 0, stem + k blocks, all at L."""
        return 0 if k == 0 else (k + 1 if k < self.depth else k + 2)

    def device_ms(self, k: int, load: float) -> float:
        share = 1.0 - min(max(load, 0.0), MAX_LOAD)
        return sum(self.part_ms[: self.device_parts(k)]) * self.device_slowdown / share

    def uplink_ms(self, k: int, bandwidth_mbps: float) -> float:
        return 8.0 * self.bytes_by_k[k] / (bandwidth_mbps * 1000.0) + self.rtt_ms

    def server_ms(self, k: int) -> float:
        return sum(self.part_ms[self.device_parts(k) :]) / self.server_speedup

    def latency_ms(self, k: int, load: float, bandwidth_mbps: float) -> float:
        return self.device_ms(k, load) + self.uplink_ms(k, bandwidth_mbps) + self.server_ms(k)

    def energy_mj(self, k: int) -> float:
        flops = sum(self.part_flops[: self.device_parts(k)])
        return 1000.0 * (flops * self.joule_per_flop + self.bytes_by_k[k] * self.joule_per_byte)


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread (small tensors: more threads only contend on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def measure_part_ms(encoder: SplitEncoder, input_shape: tuple[int, int], repeats: int = 15) -> list[float]:
    """Median forward ms of [stem, block 1..L, head] for one window, on this machine, one thread."""
    with single_thread():
        parts = [encoder.stem, *encoder.blocks, encoder.head]
        times: list[list[float]] = [[] for _ in parts]
        with torch.no_grad():
            for _ in range(repeats):
                h = torch.randn(1, 1, *input_shape)
                for i, part in enumerate(parts):
                    t0 = time.perf_counter()
                    h = part(h)
                    times[i].append(1000.0 * (time.perf_counter() - t0))
        return [float(np.median(t)) for t in times]


@torch.no_grad()
def split_profile(encoder: SplitEncoder, channel: CodecChannel, logmel: torch.Tensor) -> tuple[list[int], list[float]]:
    """(payload bytes of one window at each k, mean cosine of the codec'd embedding to the exact one at each k)
    over the windows ``logmel`` ``[N, 1, n_mels, frames]``."""
    exact = encoder(logmel)
    sizes, fidelity = [], []
    for k in range(encoder.depth + 1):
        sent = encoder.device_forward(logmel, k)
        sizes.append(int(np.median([channel.payload_bytes(s) for s in sent])))
        received = torch.stack([torch.from_numpy(_roundtrip(channel, s)) for s in sent])
        cosine = torch.nn.functional.cosine_similarity(encoder.server_forward(received, k), exact, dim=-1)
        fidelity.append(float(cosine.mean()))
    return sizes, fidelity


def _roundtrip(channel: CodecChannel, x: torch.Tensor) -> np.ndarray:
    from .encoder import codec_roundtrip

    return codec_roundtrip(channel.codec, x.numpy())[0]


def build_cost_model(
    encoder: SplitEncoder, channel: CodecChannel, logmel: torch.Tensor, **settings: float
) -> CostModel:
    """Measure compute per part on this machine, bytes and fidelity per k on ``logmel``; ``settings`` override
    the device/network/energy constants of :class:`CostModel`."""
    shape = (int(logmel.shape[-2]), int(logmel.shape[-1]))
    sizes, fidelity = split_profile(encoder, channel, logmel)
    return CostModel(
        part_ms=tuple(measure_part_ms(encoder, shape)), part_flops=tuple(encoder.block_flops(shape)),
        bytes_by_k=tuple(sizes), fidelity_by_k=tuple(fidelity), **settings,
    )


def client_conditions(seed: int, client: int, steps: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(CPU load ∈ [0, 0.95], uplink Mbit/s) for decision steps start..start+steps−1 of one client.

    Each client has its own base load (uniform 0.05–0.8) and base bandwidth (log-uniform 0.5–8 Mbit/s);
    every step keeps the current regime with probability 0.9, otherwise jumps to a new one drawn around
    the base (load ± 0.3, bandwidth ×/÷ 4), plus small noise.
    """
    rng = np.random.default_rng([seed, client, 31])
    base_load = rng.uniform(0.05, 0.8)
    base_bw = float(np.exp(rng.uniform(np.log(0.5), np.log(8.0))))
    total = start + steps
    load, bw = np.empty(total), np.empty(total)
    cur_load, cur_bw = base_load, base_bw
    for t in range(total):
        if t and rng.random() >= 0.9:
            cur_load = float(np.clip(base_load + rng.uniform(-0.3, 0.3), 0.0, MAX_LOAD))
            cur_bw = float(np.clip(base_bw * 4 ** rng.uniform(-1, 1), *BANDWIDTH_RANGE_MBPS))
        load[t] = np.clip(cur_load + rng.normal(0, 0.02), 0.0, MAX_LOAD)
        bw[t] = np.clip(cur_bw * np.exp(rng.normal(0, 0.05)), *BANDWIDTH_RANGE_MBPS)
    return load[start:], bw[start:]


def scripted_conditions(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Four phases of (CPU load, Mbit/s): (0.1, 8) idle on a fast link, (0.85, 8) loaded on the fast link,
    (0.85, 0.25) loaded on a slow link, (0.1, 0.25) idle on the slow link. Phases 1→2 change only the load,
    2→3 only the bandwidth."""
    phase = np.minimum(np.arange(steps) * 4 // max(steps, 1), 3)
    load = np.array([0.1, 0.85, 0.85, 0.1])[phase]
    bw = np.array([8.0, 8.0, 0.25, 0.25])[phase]
    return load.astype(float), bw.astype(float)
