"""The losses of split contrastive training.

- :func:`info_nce`: −log( e^{a·p/τ} / (e^{a·p/τ} + Σ_j e^{a·n_j/τ}) ), averaged over anchors. With explicit
  negatives ``[B, n, d]`` (virtual negatives from the mixture) each anchor has its own; with none, the
  other rows' positives of the batch are the negatives (in-batch, B − 1 each).
- :func:`sliced_wasserstein_to_uniform`: SW₂² between the embeddings and the uniform distribution on
  S^{d−1}: the mean over P random unit directions θ of the mean squared difference between the sorted
  projections θ·z_i and the sorted projections of N uniform reference points (Gaussian rows, normalised).
  It is 0 when the embeddings equal the reference, and grows as they collapse.
- :func:`temporal_laplacian`: Dirichlet energy of the temporal k-NN graph: each window i is joined to the
  next k windows (unit weights), energy = Σ_{0<j−i≤k} ‖z_i − z_j‖² / (number of edges) = tr(Zᵀ L Z)/|E|.
- :func:`hybrid_loss`: task (InfoNCE) + λ1·SW + λ2·Laplacian, each term switchable for the ablation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F


def info_nce(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor | None, tau: float = 0.1) -> torch.Tensor:
    """InfoNCE of unit vectors ``anchor``, ``positive`` ``[B, d]`` against ``negatives`` ``[B, n, d]`` (or in-batch)."""
    if negatives is None:
        logits = anchor @ positive.T / tau  # row i: its positive on the diagonal, the others' positives as negatives
        return F.cross_entropy(logits, torch.arange(len(anchor)))
    pos = (anchor * positive).sum(-1, keepdim=True)
    neg = torch.einsum("bd,bnd->bn", anchor, negatives)
    logits = torch.cat([pos, neg], dim=1) / tau
    return F.cross_entropy(logits, torch.zeros(len(anchor), dtype=torch.long))


def uniform_sphere(count: int, dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
    return F.normalize(torch.randn(count, dim, generator=generator), dim=1)


def sliced_wasserstein_to_uniform(
    z: torch.Tensor, projections: int = 50, generator: torch.Generator | None = None,
    reference: torch.Tensor | None = None, directions: torch.Tensor | None = None,
) -> torch.Tensor:
    """SW₂² between the rows of ``z`` ``[N, d]`` and ``reference`` (default: N uniform points on the sphere)."""
    n, d = z.shape
    ref = uniform_sphere(n, d, generator) if reference is None else reference
    theta = uniform_sphere(projections, d, generator) if directions is None else directions
    proj_z = torch.sort(z @ theta.T, dim=0).values
    proj_r = torch.sort(ref @ theta.T, dim=0).values
    return (proj_z - proj_r).square().mean()


def temporal_laplacian(z: torch.Tensor, neighbours: int = 5) -> torch.Tensor:
    """Mean ‖z_i − z_j‖² over the edges 0 < j − i ≤ ``neighbours`` of rows in temporal order."""
    terms = [(z[s:] - z[:-s]).square().sum(-1) for s in range(1, min(neighbours, len(z) - 1) + 1)]
    if not terms:
        return z.sum() * 0.0
    return torch.cat(terms).mean()


@dataclass(frozen=True)
class HybridWeights:
    task: float = 1.0
    sw: float = 0.1  # λ1
    laplacian: float = 0.01  # λ2


def hybrid_loss(
    anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor | None, history: torch.Tensor,
    weights: HybridWeights, tau: float = 0.1, projections: int = 50, neighbours: int = 5,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """task·InfoNCE + λ1·SW(history ∪ anchors) + λ2·Laplacian(history, anchors in time order).

    ``history``: recent anchors of the stream (detached, oldest first), so SW sees more than one tiny batch
    and the temporal graph spans batch boundaries. Returns the loss and each term's value.
    """
    window = torch.cat([history, anchor]) if len(history) else anchor
    terms = {
        "task": info_nce(anchor, positive, negatives, tau) if weights.task else anchor.sum() * 0.0,
        "sw": sliced_wasserstein_to_uniform(window, projections, generator) if weights.sw else anchor.sum() * 0.0,
        "laplacian": temporal_laplacian(window, neighbours) if weights.laplacian else anchor.sum() * 0.0,
    }
    total = weights.task * terms["task"] + weights.sw * terms["sw"] + weights.laplacian * terms["laplacian"]
    return total, {k: float(v.detach()) for k, v in terms.items()}
