"""Quality of an embedding: held-out kNN accuracy, kNN recall and trustworthiness.

Neighbour searches go through FAISS (exact flat indexes), so the metrics run on
100k points; trustworthiness ranks are counted exactly, block by block.
"""

from __future__ import annotations

import numpy as np
import torch

from ptsne.knn import exact_neighbors, recall_at_k


def _f32(X: np.ndarray, name: str) -> np.ndarray:
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {X.shape}")
    return X


def knn_accuracy(
    train_embedding: np.ndarray,
    train_labels: np.ndarray,
    test_embedding: np.ndarray,
    test_labels: np.ndarray,
    k: int = 10,
) -> float:
    """Share of test points whose label wins the vote of their ``k`` nearest train points.

    Ties go to the label of the nearest neighbour among the tied labels.
    """
    train_embedding = _f32(train_embedding, "train_embedding")
    test_embedding = _f32(test_embedding, "test_embedding")
    train_labels = np.asarray(train_labels)
    test_labels = np.asarray(test_labels)
    if k < 1 or k > len(train_embedding):
        raise ValueError(f"knn_accuracy: k must be in [1, {len(train_embedding)}], got {k}")
    idx = exact_neighbors(train_embedding, test_embedding, k)
    classes, coded = np.unique(train_labels, return_inverse=True)
    votes = coded[idx]  # (m, k), nearest first
    counts = np.zeros((len(idx), len(classes)), dtype=np.float64)
    np.add.at(counts, (np.arange(len(idx))[:, None], votes), 1.0)
    # Tie-break towards nearer neighbours with a tiny rank bonus.
    bonus = np.zeros_like(counts)
    np.maximum.at(bonus, (np.arange(len(idx))[:, None], votes), 1.0 / (2.0 + np.arange(k))[None, :] * 1e-3)
    pred = classes[np.argmax(counts + bonus, axis=1)]
    return float(np.mean(pred == test_labels))


def knn_recall(X: np.ndarray, embedding: np.ndarray, k: int = 10) -> float:
    """Mean share of each point's ``k`` nearest neighbours in ``X`` kept in the embedding."""
    X = _f32(X, "X")
    embedding = _f32(embedding, "embedding")
    _check_pair(X, embedding, k)
    ids = np.arange(len(X), dtype=np.int64)
    return recall_at_k(exact_neighbors(X, X, k, ids), exact_neighbors(embedding, embedding, k, ids))


def trustworthiness(X: np.ndarray, embedding: np.ndarray, k: int = 12) -> float:
    """Trustworthiness ``T(k)`` (Venna & Kaski), as in scikit-learn, in ``O(n)`` memory.

    ``T = 1 - 2 / (n k (2n - 3k - 1)) * sum_i sum_{j in U_i} (r(i, j) - k)``, where
    ``U_i`` are the embedding's ``k`` neighbours of ``i`` that are not among its
    ``k`` input-space neighbours and ``r(i, j)`` is ``j``'s rank among ``i``'s
    neighbours in the input space.
    """
    X = _f32(X, "X")
    embedding = _f32(embedding, "embedding")
    n = len(X)
    _check_pair(X, embedding, k)
    if k >= n / 2:
        raise ValueError(f"trustworthiness: k must be < n / 2 = {n / 2}, got {k}")
    ids = np.arange(n, dtype=np.int64)
    low = exact_neighbors(embedding, embedding, k, ids)
    Xt = torch.from_numpy(X).double()
    sq_norm = (Xt * Xt).sum(dim=1)
    low_t = torch.from_numpy(low)
    block = max(1, min(1024, 2**26 // (k * n)))  # bounds the (block, k, n) comparison
    penalty = 0.0
    for start in range(0, n, block):
        stop = min(n, start + block)
        rows = torch.arange(start, stop)
        # Distances from each row to all points, in float64 so ties stay ties.
        d = sq_norm[rows, None] - 2.0 * Xt[rows] @ Xt.T + sq_norm[None, :]
        d[torch.arange(stop - start), rows] = -np.inf  # self is closer than everyone
        dj = d.gather(1, low_t[rows])  # (b, k) distance to each embedding neighbour
        # r(i, j) = 1 + number of other points strictly closer to i than j.
        rank = (d[:, None, :] < dj[:, :, None]).sum(dim=2)
        penalty += float(torch.clamp(rank - k, min=0).sum())
    return 1.0 - 2.0 / (n * k * (2.0 * n - 3.0 * k - 1.0)) * penalty


def kl_divergence(edges, embedding: np.ndarray, dof: float = 1.0, block: int = 2048) -> float:
    """Exact t-SNE objective KL(P || Q) of ``embedding`` for sparse joint ``edges``.

    ``Q`` is normalised over all ``n (n - 1)`` ordered pairs, summed block by block
    (``O(n^2)`` time, ``O(block * n)`` memory); ``P`` must sum to one.
    """
    from ptsne.loss import log_kernel

    Y = torch.from_numpy(_f32(embedding, "embedding"))
    n = len(Y)
    head, tail = torch.from_numpy(edges.head), torch.from_numpy(edges.tail)
    p = torch.from_numpy(edges.weight).double()
    sq = (Y[head] - Y[tail]).double().pow(2).sum(1)
    cross = float((p * log_kernel(sq, dof)).sum())
    entropy = float((p[p > 0] * p[p > 0].log()).sum())
    z = 0.0
    for start in range(0, n, block):
        # float32 kernel values (relative error ~1e-7), summed in float64.
        d = torch.cdist(Y[start : start + block], Y).pow_(2)
        w = torch.exp(log_kernel(d, dof)) if dof != 1.0 else torch.reciprocal(d.add_(1.0))
        z += float(w.sum(dtype=torch.float64)) - min(block, n - start)  # less the diagonal, w = 1
    return entropy - cross + float(np.log(z))


def _check_pair(X: np.ndarray, embedding: np.ndarray, k: int) -> None:
    if len(X) != len(embedding):
        raise ValueError(
            f"X and embedding must have the same number of rows, got {len(X)} and {len(embedding)}"
        )
    if k < 1 or k >= len(X):
        raise ValueError(f"k must be in [1, {len(X) - 1}], got {k}")
