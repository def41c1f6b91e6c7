"""Principal component analysis fitted from the covariance matrix (exact, chunked)."""

from __future__ import annotations

import numpy as np


class PCA:
    """Project onto the top ``n_components`` principal axes.

    The covariance is accumulated in float64 over row blocks (optionally of a
    random sample of ``max_samples`` rows), so memory stays ``O(dim^2)``. Signs
    are fixed so that each component's largest coefficient is positive, which
    makes the result deterministic.

    Attributes
    ----------
    mean_ : ndarray, float32 (dim,)
    components_ : ndarray, float32 (n_components, dim)
    explained_variance_ : ndarray, float64 (n_components,)
    """

    def __init__(self, n_components: int, max_samples: int | None = None, random_state: int = 0):
        if isinstance(n_components, bool) or not isinstance(n_components, (int, np.integer)) or n_components < 1:
            raise ValueError(f"PCA: n_components must be a positive integer, got {n_components!r}")
        self.n_components = int(n_components)
        self.max_samples = max_samples
        self.random_state = random_state

    def fit(self, X: np.ndarray, block: int = 65536) -> PCA:
        X = np.asarray(X)
        n, dim = X.shape
        if self.n_components > dim:
            raise ValueError(f"PCA: n_components={self.n_components} exceeds the dimension {dim}")
        rows = np.arange(n)
        if self.max_samples is not None and n > self.max_samples:
            rng = np.random.default_rng(self.random_state)
            rows = np.sort(rng.choice(n, self.max_samples, replace=False))
        total = np.zeros(dim)
        gram = np.zeros((dim, dim))
        for s in range(0, len(rows), block):
            B = X[rows[s : s + block]].astype(np.float64)
            total += B.sum(axis=0)
            gram += B.T @ B
        m = len(rows)
        mean = total / m
        cov = gram / m - np.outer(mean, mean)
        values, vectors = np.linalg.eigh(cov)
        order = np.argsort(values)[::-1][: self.n_components]
        comps = vectors[:, order].T
        signs = np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(axis=1)])
        comps *= signs[:, None]
        self.mean_ = mean.astype(np.float32)
        self.components_ = comps.astype(np.float32)
        self.explained_variance_ = values[order]
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Project ``X`` (m, dim) to float32 (m, n_components)."""
        X = np.asarray(X, dtype=np.float32)
        return (X - self.mean_) @ self.components_.T

    def state(self) -> dict[str, np.ndarray]:
        """Arrays that define the projection (for saving)."""
        return {"mean": self.mean_, "components": self.components_}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> PCA:
        pca = cls(int(state["components"].shape[0]))
        pca.mean_ = np.asarray(state["mean"], dtype=np.float32)
        pca.components_ = np.asarray(state["components"], dtype=np.float32)
        return pca
