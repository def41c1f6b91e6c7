"""t-SNE's KL(P || Q) with a heavy-tailed Student-t Q, exact and mini-batch.

With kernel ``w_ij = (1 + d_ij^2 / alpha)^(-(alpha + 1) / 2)`` and
``q_ij = w_ij / Z``, ``Z = sum_{k != l} w_kl``:

    KL = sum_ij p_ij log p_ij - sum_ij p_ij log w_ij + log Z

The mini-batch estimator keeps the same three terms: the attraction
``-sum p log w`` is averaged over edges sampled from P (with importance
weights), and ``log Z`` is estimated from all ordered pairs among the batch's
uniformly sampled points, scaled by ``n (n - 1)``. With the whole dataset as
one batch and every edge weighted by ``p_ij`` it equals the exact KL.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def log_kernel(sq_dist: torch.Tensor, dof: float = 1.0) -> torch.Tensor:
    """``log w = -(dof + 1) / 2 * log(1 + d^2 / dof)``."""
    return -0.5 * (dof + 1.0) * torch.log1p(sq_dist / dof)


def pairwise_sq_dist(Y: torch.Tensor) -> torch.Tensor:
    """All squared Euclidean distances between rows of ``Y`` (b, dim) -> (b, b)."""
    if Y.shape[1] > 3:
        return torch.cdist(Y, Y).pow(2)
    return (Y[:, None, :] - Y[None, :, :]).pow(2).sum(-1)


def kernel(sq_dist: torch.Tensor, dof: float = 1.0) -> torch.Tensor:
    """``w = (1 + d^2 / dof)^(-(dof + 1) / 2)``; ``1 / (1 + d^2)`` for ``dof = 1``."""
    if dof == 1.0:
        return torch.reciprocal(1.0 + sq_dist)
    return torch.pow(1.0 + sq_dist / dof, -0.5 * (dof + 1.0))


def log_z_estimate(Y_neg: torch.Tensor, n_total: int, dof: float = 1.0) -> torch.Tensor:
    """Estimate ``log Z`` from all ordered pairs ``k != l`` among the rows of ``Y_neg``.

    ``Z`` sums ``w_kl`` over the ``n_total (n_total - 1)`` ordered pairs of the
    whole dataset; the rows of ``Y_neg`` are a uniform sample of it.
    """
    b = Y_neg.shape[0]
    if b < 2:
        raise ValueError(f"log Z needs at least 2 points in the batch, got {b}")
    w = kernel(pairwise_sq_dist(Y_neg), dof)
    off_diagonal = w.sum() - w.diagonal().sum()
    # w <= 1 everywhere, so the plain sum cannot overflow.
    log_mean = torch.log(off_diagonal) - math.log(b * (b - 1))
    return log_mean + math.log(n_total) + math.log(n_total - 1)


class TSNELoss(nn.Module):
    """Mini-batch estimate of t-SNE's KL(P || Q) up to the constant ``sum p log p``.

    Parameters
    ----------
    dof : float
        Degrees of freedom ``alpha`` of the Student-t kernel (1 is standard t-SNE;
        below 1 is heavier-tailed and separates clusters more).

    The forward pass takes the embeddings of the edge endpoints, the edges'
    importance weights (``None`` for uniform), the uniformly sampled points used
    for the normaliser, the dataset size ``n_total`` and the exaggeration factor
    that multiplies the attraction.
    """

    def __init__(self, dof: float = 1.0):
        super().__init__()
        if not dof > 0:
            raise ValueError(f"TSNELoss: dof must be > 0, got {dof!r}")
        self.dof = float(dof)

    def forward(
        self,
        y_head: torch.Tensor,
        y_tail: torch.Tensor,
        y_neg: torch.Tensor,
        n_total: int,
        weight: torch.Tensor | None = None,
        exaggeration: float = 1.0,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        sq = (y_head - y_tail).pow(2).sum(dim=1)
        nlogw = -log_kernel(sq, self.dof)
        if weight is None:
            attraction = nlogw.mean()
        else:
            attraction = (weight * nlogw).sum() / weight.sum()
        log_z = log_z_estimate(y_neg, n_total, self.dof)
        loss = exaggeration * attraction + log_z
        return loss, {"attraction": attraction.detach(), "log_z": log_z.detach()}


def exact_kl(P: torch.Tensor, Y: torch.Tensor, dof: float = 1.0) -> torch.Tensor:
    """Exact KL(P || Q) from a dense joint ``P`` (n, n; zero diagonal, sums to 1)."""
    n = Y.shape[0]
    logw = log_kernel(pairwise_sq_dist(Y), dof)
    mask = ~torch.eye(n, dtype=torch.bool, device=Y.device)
    log_z = torch.logsumexp(logw[mask], dim=0)
    logq = logw - log_z
    nz = (P > 0) & mask
    return (P[nz] * (torch.log(P[nz]) - logq[nz])).sum()


def exact_kl_gradient(P: torch.Tensor, Y: torch.Tensor, dof: float = 1.0) -> torch.Tensor:
    """Closed-form gradient of :func:`exact_kl` with respect to ``Y``.

    ``dKL/dy_i = (2 (alpha + 1) / alpha) sum_j (p_ij - q_ij) (y_i - y_j) / (1 + d_ij^2 / alpha)``
    """
    diff = Y[:, None, :] - Y[None, :, :]
    sq = diff.pow(2).sum(-1)
    w = (1.0 + sq / dof).pow(-(dof + 1.0) / 2.0)
    w.fill_diagonal_(0.0)
    Q = w / w.sum()
    inv = 1.0 / (1.0 + sq / dof)
    coef = (P - Q) * inv
    coef.fill_diagonal_(0.0)
    return (2.0 * (dof + 1.0) / dof) * (coef[:, :, None] * diff).sum(dim=1)
