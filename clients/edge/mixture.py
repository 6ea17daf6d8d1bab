"""Streaming diagonal Gaussian mixture over embeddings, and virtual negatives drawn from it.

The mixture has C components with weights π_c, means μ_c and diagonal
variances σ²_c in R^d. It is updated by *stepwise* EM (Cappé & Moulines 2009):
for a batch z_1..z_B the responsibilities are γ_ic ∝ π_c·N(z_i; μ_c, diag σ²_c)
(computed in log space), and the sufficient statistics move by an EMA of rate ρ,

    s0_c ← (1−ρ)·s0_c + ρ·mean_i γ_ic
    s1_c ← (1−ρ)·s1_c + ρ·mean_i γ_ic z_i
    s2_c ← (1−ρ)·s2_c + ρ·mean_i γ_ic z_i²

from which π_c = s0_c / Σ s0, μ_c = s1_c / s0_c and σ²_c = s2_c / s0_c − μ_c² (floored
at ``var_floor``). A component whose weight falls below ``min_weight``/C is
re-seeded at a recent embedding, so the mixture keeps covering the data.
Memory is O(C·d): no embedding is stored. In fp16 the synced state is
2·(2·C·d + C) bytes (means, variances, weights): 32,896 B for C = 64, d = 128.

**Virtual negatives** for an anchor z: its component c* = argmax_c p(c|z); another
component c ≠ c* is drawn with probability ∝ π_c·exp(−‖μ_c* − μ_c‖² / 2τ²) (nearby
components are hard negatives), then z̃ ~ N(μ_c, σ²_c), L2-normalised. They are
used at once and never stored; by construction none comes from c*.

**Uncertainty** U(z) = H(p(·|z)) = −Σ_c p(c|z) log p(c|z) ∈ [0, log C].
"""

from __future__ import annotations

import math

import numpy as np
import torch

STATE_NAMES = ("gmm.s0", "gmm.s1", "gmm.s2", "gmm.seen")


class StreamingGMM:
    """Diagonal GMM with stepwise-EM updates; its state is four arrays (``STATE_NAMES``) that federate."""

    def __init__(
        self, components: int, dim: int, rate: float = 0.01, var_floor: float = 1e-4, min_weight: float = 1e-3,
        seed: int = 0,
    ) -> None:
        self.components, self.dim, self.rate = components, dim, rate
        self.var_floor, self.min_weight = var_floor, min_weight
        self.generator = torch.Generator().manual_seed(seed)
        means = torch.nn.functional.normalize(torch.randn(components, dim, generator=self.generator), dim=1)
        self.s0 = torch.full((components,), 1.0 / components)
        self.s1 = self.s0[:, None] * means
        self.s2 = self.s0[:, None] * (means.square() + 1.0 / dim)
        self.seen = torch.zeros(1)

    # -- parameters --------------------------------------------------------------------------------------
    @property
    def weights(self) -> torch.Tensor:
        return self.s0 / self.s0.sum()

    @property
    def means(self) -> torch.Tensor:
        return self.s1 / self.s0[:, None]

    @property
    def variances(self) -> torch.Tensor:
        return (self.s2 / self.s0[:, None] - self.means.square()).clamp_min(self.var_floor)

    def state(self) -> dict[str, np.ndarray]:
        return {name: t.numpy().astype(np.float32, copy=True) for name, t in zip(STATE_NAMES, self._tensors())}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.s0, self.s1, self.s2, self.seen = (torch.from_numpy(np.array(arrays[n], dtype=np.float32)) for n in STATE_NAMES)
        self.s0 = self.s0.clamp_min(1e-12)

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return self.s0, self.s1, self.s2, self.seen

    def sync_arrays(self) -> dict[str, np.ndarray]:
        """What the server pushes down: weights, means, variances (send them in fp16)."""
        return {"weights": self.weights.numpy(), "means": self.means.numpy(), "variances": self.variances.numpy()}

    # -- inference ---------------------------------------------------------------------------------------
    def log_posterior(self, z: torch.Tensor) -> torch.Tensor:
        """log p(c|z), ``[B, C]``."""
        var = self.variances
        diff2 = (z[:, None, :] - self.means[None]).square() / var[None]
        log_norm = -0.5 * (diff2.sum(-1) + var.log().sum(-1)[None] + self.dim * math.log(2 * math.pi))
        joint = log_norm + self.weights.clamp_min(1e-30).log()[None]
        return joint - torch.logsumexp(joint, dim=1, keepdim=True)

    def uncertainty(self, z: torch.Tensor) -> torch.Tensor:
        """H(p(·|z)) per row, in nats, in [0, log C]."""
        log_p = self.log_posterior(z)
        return -(log_p.exp() * log_p).sum(dim=1)

    # -- learning ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, z: torch.Tensor) -> None:
        """One stepwise-EM step on the batch ``z`` ``[B, d]`` (detached)."""
        z = z.detach().float()
        gamma = self.log_posterior(z).exp()
        rho = self.rate
        self.s0 = (1 - rho) * self.s0 + rho * gamma.mean(0)
        self.s1 = (1 - rho) * self.s1 + rho * (gamma.T @ z) / len(z)
        self.s2 = (1 - rho) * self.s2 + rho * (gamma.T @ z.square()) / len(z)
        self.seen += len(z)
        self._reseed(z)

    def _reseed(self, z: torch.Tensor) -> None:
        total = float(self.s0.sum())
        dead = torch.nonzero(self.s0 < self.min_weight * total / self.components).flatten()
        if len(dead) == 0:
            return
        picks = torch.randint(len(z), (len(dead),), generator=self.generator)
        spread = float(self.variances.median())
        mass = self.min_weight * total / self.components
        means = z[picks] + math.sqrt(spread) * 0.1 * torch.randn(len(dead), self.dim, generator=self.generator)
        self.s0[dead] = mass
        self.s1[dead] = mass * means
        self.s2[dead] = mass * (means.square() + spread)

    def initialise_from(self, z: torch.Tensor) -> None:
        """Farthest-point seeding of the means from a sample ``z`` (at least C rows), equal weights."""
        z = z.detach().float()
        first = int(torch.randint(len(z), (1,), generator=self.generator))
        chosen = [first]
        dist = (z - z[first]).square().sum(1)
        for _ in range(1, self.components):
            nxt = int(dist.argmax())
            chosen.append(nxt)
            dist = torch.minimum(dist, (z - z[nxt]).square().sum(1))
        means = z[chosen]
        var = z.var(0).mean().clamp_min(self.var_floor) / self.components
        self.s0 = torch.full((self.components,), 1.0 / self.components)
        self.s1 = self.s0[:, None] * means
        self.s2 = self.s0[:, None] * (means.square() + var)

    # -- negatives ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def virtual_negatives(
        self, anchors: torch.Tensor, count: int, tau: float = 0.1
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(negatives ``[B, count, d]`` on the unit sphere, their components ``[B, count]``, anchor components ``[B]``)."""
        anchor_c = self.log_posterior(anchors.detach().float()).argmax(dim=1)
        means, var = self.means, self.variances
        dist2 = (means[anchor_c][:, None, :] - means[None]).square().sum(-1)  # [B, C]
        logits = self.weights.clamp_min(1e-30).log()[None] - dist2 / (2 * tau * tau)
        logits[torch.arange(len(anchor_c)), anchor_c] = -math.inf
        comps = torch.multinomial(torch.softmax(logits, dim=1), count, replacement=True, generator=self.generator)
        noise = torch.randn(*comps.shape, self.dim, generator=self.generator)
        samples = means[comps] + var[comps].sqrt() * noise
        return torch.nn.functional.normalize(samples, dim=-1), comps, anchor_c
