"""Perplexity-calibrated input affinities on a kNN graph.

Each row ``i`` gets a Gaussian precision ``beta_i`` found by vectorised,
bracketed root finding (bisection safeguarding Newton steps) so that the entropy of ``p_{j|i}`` over its ``k`` neighbours equals
``log(perplexity)`` within ``tol`` nats. A list of perplexities averages the
conditional rows (multiscale). The joint distribution is the symmetrised
``P = (P_cond + P_cond^T) / (2 n)``, which sums to one and has no self terms.
It is returned as edges ``(head, tail, weight)``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:  # annotations only: scipy and the kNN stage (FAISS) load where they run
    import scipy.sparse as sp

    from ptsne.knn import KNNGraph

log = logging.getLogger(__name__)

#: Bisection stops when ``|H - log(perplexity)|`` is below this (nats).
DEFAULT_TOL = 1e-5
MAX_BISECTION_STEPS = 200


class Edges(NamedTuple):
    """Sparse joint affinities: ``P[head[e], tail[e]] = weight[e]``."""

    head: np.ndarray  # int64 (m,)
    tail: np.ndarray  # int64 (m,)
    weight: np.ndarray  # float32 (m,)

    def to_csr(self, n: int) -> sp.csr_matrix:
        """The ``(n, n)`` sparse matrix, float64."""
        import scipy.sparse as sp

        return sp.csr_matrix(
            (self.weight.astype(np.float64), (self.head, self.tail)), shape=(n, n)
        )


def as_perplexities(perplexity: float | Sequence[float]) -> tuple[float, ...]:
    """Validate a perplexity or a list of them and return a tuple of floats."""
    if isinstance(perplexity, (str, bytes)) or perplexity is None:
        raise TypeError(f"perplexity must be a number or a list of numbers, got {perplexity!r}")
    try:
        values = (perplexity,) if np.isscalar(perplexity) else tuple(perplexity)
    except TypeError:
        raise TypeError(
            f"perplexity must be a number or a list of numbers, got {perplexity!r}"
        ) from None
    if len(values) == 0:
        raise ValueError("perplexity: an empty list was given; pass a number or a non-empty list")
    out = []
    for p in values:
        if isinstance(p, (bool, np.bool_)) or not isinstance(p, (int, float, np.number)):
            raise TypeError(f"perplexity must be a number or a list of numbers, got {p!r}")
        if not math.isfinite(float(p)) or float(p) <= 1.0:
            raise ValueError(f"perplexity must be a finite number > 1, got {p!r}")
        out.append(float(p))
    return tuple(out)


def default_k(perplexity: float | Sequence[float], n: int) -> int:
    """Neighbours per point: ``min(n - 1, floor(3 * max perplexity))``."""
    return int(min(n - 1, math.floor(3 * max(as_perplexities(perplexity)))))


def calibrate(
    distances: np.ndarray,
    perplexity: float,
    tol: float = DEFAULT_TOL,
    chunk_size: int = 65536,
) -> tuple[np.ndarray, np.ndarray]:
    """Conditional affinities ``p_{j|i}`` of each row for one perplexity.

    Parameters
    ----------
    distances : ndarray (n, k)
        Euclidean distances to each row's neighbours (self excluded).
    perplexity : float
        Target perplexity, ``1 < perplexity <= k`` for it to be reachable.
    tol : float
        Allowed ``|entropy - log(perplexity)|`` in nats.

    Returns
    -------
    P : ndarray, float32 (n, k)
        Rows sum to one.
    beta : ndarray, float64 (n,)
        Gaussian precision of each row, ``p_{j|i} ∝ exp(-beta_i d_ij^2)``.
    """
    distances = np.asarray(distances)
    if distances.ndim != 2:
        raise ValueError(f"distances must be 2-D (n, k), got shape {distances.shape}")
    n, k = distances.shape
    if not np.all(np.isfinite(distances)):
        raise ValueError("distances contain NaN or Inf")
    if perplexity > k:
        raise ValueError(
            f"perplexity={perplexity} cannot be reached with k={k} neighbours; "
            f"use k >= perplexity (3 * perplexity recommended)"
        )
    P = np.empty((n, k), dtype=np.float32)
    beta = np.empty(n, dtype=np.float64)
    for start in range(0, n, chunk_size):
        stop = min(n, start + chunk_size)
        P[start:stop], beta[start:stop] = _calibrate_block(
            distances[start:stop].astype(np.float64), math.log(perplexity), tol
        )
    return P, beta


def _calibrate_block(d: np.ndarray, target: float, tol: float) -> tuple[np.ndarray, np.ndarray]:
    # Work on squared distances shifted by the row minimum (which leaves p_{j|i}
    # unchanged) and scaled by the row mean, so beta starts near 1 in every row.
    d2 = d * d
    d2 -= d2.min(axis=1, keepdims=True)
    scale = d2.mean(axis=1)
    scale[scale <= 0] = 1.0  # all neighbours at one distance: any beta gives uniform p
    d2 /= scale[:, None]

    m = d2.shape[0]
    beta = np.ones(m)
    lo = np.zeros(m)
    hi = np.full(m, np.inf)
    P = np.empty_like(d2)
    active = np.arange(m)
    for _ in range(MAX_BISECTION_STEPS):
        x = d2[active]
        w = np.exp(-beta[active, None] * x)
        s = w.sum(axis=1)
        p = w / s[:, None]
        H = np.log(s) + beta[active] * (p * x).sum(axis=1)
        P[active] = p
        err = H - target
        done = np.abs(err) < tol
        # Entropy falls as beta grows: too flat (H above target) -> raise beta.
        up = err > 0
        b = beta[active]
        lo[active] = np.where(up, b, lo[active])
        hi[active] = np.where(up, hi[active], b)
        # Newton step on H(beta) (dH/dbeta = -beta Var_p[x]); bisection whenever
        # Newton leaves the bracket, so convergence is guaranteed.
        var = (p * x * x).sum(axis=1) - ((p * x).sum(axis=1)) ** 2
        with np.errstate(divide="ignore", invalid="ignore"):
            newton = b + err / (b * var)
        bisect = np.where(np.isinf(hi[active]), b * 2.0, 0.5 * (lo[active] + hi[active]))
        inside = np.isfinite(newton) & (newton > lo[active]) & (newton < hi[active])
        new_b = np.where(inside, newton, bisect)
        keep = ~done
        beta[active[keep]] = new_b[keep]
        active = active[keep]
        if active.size == 0:
            break
    if active.size:
        # Unreachable targets (many exact ties at the minimum): p stays at its last value.
        log.debug("calibrate: %d rows did not reach the target entropy", active.size)
    return P.astype(np.float32), beta / scale


def conditional_probabilities(
    distances: np.ndarray,
    perplexity: float | Sequence[float],
    tol: float = DEFAULT_TOL,
) -> np.ndarray:
    """``p_{j|i}`` (float32 ``(n, k)``, rows sum to one), averaged over a list of perplexities."""
    perplexities = as_perplexities(perplexity)
    P = None
    for perp in perplexities:
        Pi, _ = calibrate(distances, perp, tol)
        P = Pi.astype(np.float64) if P is None else P + Pi
    P /= len(perplexities)
    return P.astype(np.float32)


def symmetrize(indices: np.ndarray, P_cond: np.ndarray, n: int | None = None) -> Edges:
    """Joint ``P = (P_cond + P_cond^T) / (2 n)`` as edges sorted by ``(head, tail)``.

    Parameters
    ----------
    indices : ndarray, int64 (n, k)
        Neighbour ids of each row.
    P_cond : ndarray (n, k)
        Conditional affinities, rows summing to one.
    n : int, optional
        Number of points (default ``indices.shape[0]``).
    """
    import scipy.sparse as sp

    rows, k = indices.shape
    n = rows if n is None else int(n)
    head = np.repeat(np.arange(rows, dtype=np.int64), k)
    C = sp.csr_matrix(
        (P_cond.ravel().astype(np.float64), (head, indices.ravel())), shape=(n, n)
    )
    J = (C + C.T).tocsr()
    J.sum_duplicates()
    J.sort_indices()
    J.data /= 2.0 * n
    coo = J.tocoo()
    return Edges(coo.row.astype(np.int64), coo.col.astype(np.int64), coo.data.astype(np.float32))


def joint_probabilities(
    graph: KNNGraph,
    perplexity: float | Sequence[float] = 30.0,
    tol: float = DEFAULT_TOL,
) -> Edges:
    """Symmetric joint affinities from a kNN graph.

    Parameters
    ----------
    graph : KNNGraph
        Neighbours and Euclidean distances of every point (self excluded).
    perplexity : float or list of float
        A list averages the conditional rows of each perplexity (multiscale).

    Returns
    -------
    Edges
        ``sum(weight) == 1``; ``P`` is symmetric and has no diagonal.
    """
    P_cond = conditional_probabilities(graph.distances, perplexity, tol)
    return symmetrize(graph.indices, P_cond)
