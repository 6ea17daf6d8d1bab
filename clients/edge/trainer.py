"""Split contrastive training on one device's stream, and the linear probe.

One call of :func:`train_on_stream` is one device's share of a federated round:
it streams ``windows`` consecutive windows in batches of ``batch`` (consecutive
in time) and, for every batch,

1. reads the state (mean mixture uncertainty of the previous batch, the injected
   CPU load and uplink bandwidth now) and picks the split point k with the
   configured splitter;
2. makes the positive view (Gaussian noise of std 0.01 on the log-mel frames plus a
   mask of up to 10 mel bins) and runs stem + blocks 1..k on anchor and positive
   **on the device**;
3. sends both through the codec channel (each window its own payload; bytes counted).
   At k = 0 (server-centric) the device sends each window once, and the server
   makes the positive view from what it received: the strongest server-centric
   baseline, half the bytes of sending both views;
4. runs blocks k+1..L and the head **on the server side**. In this simulation the
   server side runs in the client's own process (the Flower ClientApp), on a
   per-device copy of the server blocks whose update is averaged with the
   others' at the end of the round (SplitFed-v1 style); in a deployment those
   blocks would run on the server and only activations and gradients would cross;
5. computes the hybrid loss (InfoNCE against virtual negatives from the device's
   mixture, or in-batch negatives, + λ1·SW + λ2·Laplacian over the last
   ``history`` anchors) and backpropagates it through the server blocks, back
   through the channel (gradient bytes counted as downlink), into the device blocks;
6. updates the mixture with the batch's anchors (stepwise EM).

A fresh mixture has nothing to sample from. Until it has seen max(``cold_start``, C)
windows the device uses in-batch negatives; at that point its means are seeded
from the recent anchors (farthest-point seeding, :meth:`StreamingGMM.initialise_from`),
and from then on the negatives are virtual. Without the seeding, stepwise EM at
rate 0.01 needs hundreds of steps to move the randomly placed components onto
the embeddings, and the early virtual negatives are random points on the sphere.

Latency and energy per window come from the :class:`~qfl.clients.edge.costs.CostModel`
at the state's load and bandwidth.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from .costs import CostModel
from .encoder import CodecChannel, SplitEncoder, Traffic
from .losses import HybridWeights, hybrid_loss
from .mixture import StreamingGMM
from .splitter import Policy, states


@dataclass(frozen=True)
class StreamTraining:
    """How a device trains (see the module docstring)."""

    batch: int = 8
    negatives: str = "virtual"  # virtual | in-batch
    virtual_negatives: int = 256
    tau: float = 0.1
    loss_weights: HybridWeights = HybridWeights()
    lr: float = 1e-3
    history: int = 96  # recent anchors kept (detached) for SW and the temporal graph
    neighbours: int = 5
    projections: int = 50
    cold_start: int = 50
    noise_std: float = 0.01
    max_mask_bins: int = 10


@dataclass
class StreamStats:
    """What one device's stream cost and chose."""

    windows: int = 0
    loss: float = float("nan")
    split_counts: Counter = field(default_factory=Counter)
    latency_ms: float = 0.0  # summed over windows
    energy_mj: float = 0.0
    uncertainty: float = 0.0
    traffic: Traffic = field(default_factory=Traffic)
    choices: list[tuple[int, float, float, int]] = field(default_factory=list)  # (window, load, Mbit/s, k)

    def split_hist(self, depth: int) -> list[int]:
        return [int(self.split_counts.get(k, 0)) for k in range(depth + 1)]


def augment(x: torch.Tensor, generator: torch.Generator, noise_std: float, max_bins: int) -> torch.Tensor:
    """Gaussian noise plus one frequency mask of 0..max_bins mel bins per window (x: [B, 1, mels, frames])."""
    out = x + noise_std * torch.randn(x.shape, generator=generator)
    mels = x.shape[-2]
    widths = torch.randint(0, max_bins + 1, (len(x),), generator=generator)
    starts = torch.randint(0, mels, (len(x),), generator=generator)
    bins = torch.arange(mels)
    mask = (bins[None] >= starts[:, None]) & (bins[None] < (starts + widths)[:, None])
    return out.masked_fill(mask[:, None, :, None], float(x.mean()))


class SplitTrainer:
    """One device's split training state: encoder, mixture, codec channel, optimizer and recent anchors."""

    def __init__(
        self, encoder: SplitEncoder, gmm: StreamingGMM, channel: CodecChannel, settings: StreamTraining, seed: int
    ) -> None:
        self.encoder, self.gmm, self.channel, self.settings = encoder, gmm, channel, settings
        self.generator = torch.Generator().manual_seed(seed)
        self.optimizer = torch.optim.Adam(encoder.parameters(), lr=settings.lr)
        self.history = torch.zeros(0, encoder.dim)
        self.uncertainty = 0.5 * math.log(gmm.components)  # of the last batch; the prior before any

    def step(self, x: torch.Tensor, k: int) -> float:
        """One training step on the batch ``x`` ``[B, 1, mels, frames]`` split at ``k``; returns the loss."""
        s, encoder, gmm = self.settings, self.encoder, self.gmm
        encoder.train()
        if k == 0:  # server-centric: the device sends its input once and the server makes the positive view
            received = self.channel(x, 0)
            positive = augment(received, self.generator, s.noise_std, s.max_mask_bins)
            z = encoder.server_forward(torch.cat([received, positive]), 0)
        else:  # the device runs blocks 1..k on both views and sends both
            positive = augment(x, self.generator, s.noise_std, s.max_mask_bins)
            sent = encoder.device_forward(torch.cat([x, positive]), k)
            z = encoder.server_forward(self.channel(sent, k), k)
        z = torch.nn.functional.normalize(z, dim=-1)  # at k = L the codec's rounding leaves the sphere
        anchor, pos = z[: len(x)], z[len(x) :]
        negatives = None
        if s.negatives == "virtual" and float(gmm.seen) >= self.seed_after:
            negatives = gmm.virtual_negatives(anchor, s.virtual_negatives, s.tau)[0]
        loss, _ = hybrid_loss(
            anchor, pos, negatives, self.history, s.loss_weights, s.tau, s.projections, s.neighbours, self.generator
        )
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            detached = anchor.detach()
            self.history = torch.cat([self.history, detached])[-s.history :]
            seen_before = float(gmm.seen)
            gmm.update(detached)
            if seen_before < self.seed_after <= float(gmm.seen) and len(self.history) >= gmm.components:
                gmm.initialise_from(self.history)
            self.uncertainty = float(gmm.uncertainty(detached).mean())
        return float(loss.detach())

    @property
    def seed_after(self) -> int:
        """Windows a mixture must have seen before it is seeded from the recent anchors and sampled from."""
        return max(self.settings.cold_start, self.gmm.components)


def train_on_stream(
    encoder: SplitEncoder, gmm: StreamingGMM, logmel: torch.Tensor, channel: CodecChannel, policy: Policy,
    costs: CostModel, load: np.ndarray, mbps: np.ndarray, settings: StreamTraining, seed: int,
    first_window: int = 0,
) -> StreamStats:
    """Train ``encoder`` and ``gmm`` in place on ``logmel`` ``[W, 1, mels, frames]`` (in temporal order).

    ``load``/``mbps`` hold one entry per batch (decision step). Returns the stream's statistics.
    """
    trainer = SplitTrainer(encoder, gmm, channel, settings, seed)
    stats = StreamStats(traffic=channel.traffic)
    log_c = math.log(gmm.components)
    losses = []
    for step, start in enumerate(range(0, len(logmel) - settings.batch + 1, settings.batch)):
        state = states(np.array([trainer.uncertainty]), log_c, load[step : step + 1], mbps[step : step + 1])
        k = int(policy(state)[0])
        losses.append(trainer.step(logmel[start : start + settings.batch], k))
        n = settings.batch
        stats.windows += n
        stats.split_counts[k] += n
        stats.latency_ms += n * costs.latency_ms(k, float(load[step]), float(mbps[step]))
        stats.energy_mj += n * costs.energy_mj(k)
        stats.uncertainty += n * trainer.uncertainty
        stats.choices.append((first_window + start, float(load[step]), float(mbps[step]), k))
    stats.loss = float(np.mean(losses)) if losses else float("nan")
    return stats


@torch.no_grad()
def embed(encoder: SplitEncoder, logmel: torch.Tensor, chunk: int = 256) -> np.ndarray:
    """Embeddings of ``logmel`` by the whole (unsplit) encoder, in eval mode."""
    encoder.eval()
    return torch.cat([encoder(logmel[i : i + chunk]) for i in range(0, len(logmel), chunk)]).numpy()


def linear_probe(features: np.ndarray, labels: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """(log loss, accuracy) of a logistic-regression probe trained on a stratified half, tested on the other."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 else None
    x_tr, x_te, y_tr, y_te = train_test_split(features, labels, test_size=0.5, random_state=seed, stratify=stratify)
    scaler = StandardScaler().fit(x_tr)
    probe = LogisticRegression(max_iter=500, C=1.0).fit(scaler.transform(x_tr), y_tr)
    classes = np.unique(labels)  # a class absent from the fitting half gets probability ~0
    proba = np.full((len(x_te), len(classes)), 1e-12)
    proba[:, np.searchsorted(classes, probe.classes_)] = probe.predict_proba(scaler.transform(x_te))
    proba /= proba.sum(1, keepdims=True)
    accuracy = float((classes[proba.argmax(1)] == y_te).mean())
    return float(log_loss(y_te, proba, labels=classes)), accuracy


def nearest_centroid_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy on the second half of nearest-class-mean classification fitted on the first half (cosine)."""
    half = len(labels) // 2
    train_x, train_y, test_x, test_y = features[:half], labels[:half], features[half:], labels[half:]
    classes = np.unique(train_y)
    if len(test_y) == 0 or len(classes) == 0:
        return 0.0
    centroids = np.stack([train_x[train_y == c].mean(0) for c in classes])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True) + 1e-12
    return float((classes[(test_x @ centroids.T).argmax(1)] == test_y).mean())
