"""Optional PCA stage: fitted on a row sample drawn across shards, applied per shard.

Each shard contributes a Bernoulli sample of its valid rows whose random
stream depends only on ``(seed, shard index)``, so the fitted projection does
not depend on how the shards are scheduled. The fit itself is
:class:`ptsne.pca.PCA` (one implementation for the estimator and the pipeline).
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow.fs as pafs
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from pipeline.storage import write_bytes_atomic
from ptsne.pca import PCA

log = logging.getLogger(__name__)


def sample_rate(n_valid: int, max_samples: int) -> float:
    """Fraction of rows to sample so that about ``max_samples`` rows are drawn."""
    if n_valid <= 0:
        return 0.0
    return min(1.0, float(max_samples) / float(n_valid))


def sample_rows(X: np.ndarray, rate: float, seed: int, shard_index: int) -> np.ndarray:
    """A deterministic Bernoulli sample of the rows of ``X`` (m, dim) at ``rate``."""
    if rate >= 1.0:
        return np.asarray(X, dtype=np.float32)
    rng = np.random.default_rng([int(seed), int(shard_index)])
    keep = rng.random(X.shape[0]) < rate
    return np.asarray(X[keep], dtype=np.float32)


def fit_pca(samples: list[np.ndarray], n_components: int, seed: int = 0) -> PCA:
    """Fit :class:`ptsne.pca.PCA` on the concatenated per-shard samples."""
    sample = np.concatenate([s for s in samples if s.size], axis=0) if samples else np.zeros((0, 0))
    if sample.shape[0] < 2:
        raise ValueError(f"PCA: need at least 2 sampled rows to fit, got {sample.shape[0]}")
    if n_components > sample.shape[1]:
        raise ValueError(
            f"pca_components={n_components} exceeds the input dimension {sample.shape[1]}"
        )
    log.info("PCA: fitting %d components on %d sampled rows", n_components, sample.shape[0])
    return PCA(n_components, random_state=seed).fit(sample)


def save_pca(fs: pafs.FileSystem, path: str, pca: PCA) -> str:
    """Write ``mean`` and ``components`` as safetensors through a temp name; return sha256."""
    return write_bytes_atomic(fs, path, st_save({k: np.ascontiguousarray(v) for k, v in pca.state().items()}))


def load_pca(fs: pafs.FileSystem, path: str) -> PCA:
    """Read a projection written by :func:`save_pca`."""
    with fs.open_input_stream(path) as f:
        return PCA.from_state(st_load(f.read()))
