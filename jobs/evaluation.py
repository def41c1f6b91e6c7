"""Quality of a trained map for ``ptsne train``: trustworthiness, kNN recall@10 and kNN accuracy.

The points are held-out Parquet shards (``--eval-input``) or, without them, a
seeded sample of the training features stored in the affinity directory
(:func:`sample_features`, also the rows of the plot). No MLflow here: the job
logs what :func:`evaluate` returns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: Neighbours of the quality figures.
K = 10


@dataclass(frozen=True)
class EvalSettings:
    """Where the held-out points come from and how many are used.

    ``input`` is ``--eval-input`` as given (None: a sample of the training rows);
    the columns are those of the training input.
    """

    input: str | None = None
    samples: int = 5000
    seed: int = 0
    vector_col: str | None = "vector"
    feature_cols: tuple[str, ...] | None = None
    label_col: str | None = None

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"EvalSettings: samples must be >= 1, got {self.samples}")


def sample_features(affinity_dir: str, max_rows: int, seed: int):
    """A seeded sample of the stored features: (rows (m,), X (m, dim), labels (m,) or None)."""
    import numpy as np

    from pipeline import schema
    from pipeline.affinity_dir import AffinityDir

    directory = AffinityDir(affinity_dir)
    n = directory.manifest.n
    rng = np.random.default_rng(seed)
    take_all = max_rows >= n
    cols = [schema.ROW, schema.VECTOR] + ([schema.LABEL] if directory.manifest.label_col else [])
    rows, X, labels = [], [], []
    for i in range(len(directory.manifest.features)):
        t = directory.read_features_file(i, columns=cols)
        keep = np.arange(t.num_rows)
        if not take_all:
            m = int(round(max_rows * t.num_rows / n))
            keep = np.sort(rng.choice(t.num_rows, size=min(m, t.num_rows), replace=False))
        t = t.take(keep)
        rows.append(t.column(schema.ROW).to_numpy())
        X.append(schema.arrow_to_vectors(t.column(schema.VECTOR)))
        if schema.LABEL in t.column_names:
            labels.append(t.column(schema.LABEL).to_numpy(zero_copy_only=False))
    lab = np.concatenate(labels) if labels else None
    return np.concatenate(rows), np.concatenate(X), lab


def read_eval_input(settings: EvalSettings, max_rows: int, seed: int):
    """Raw held-out vectors (m, input_dim) and labels (or None) from the Parquet shards ``settings.input``."""
    import numpy as np

    from pipeline.shards import ColumnSpec, list_parquet, read_shard
    from pipeline.storage import resolve

    feature_cols = settings.feature_cols
    spec = ColumnSpec(None if feature_cols else settings.vector_col, feature_cols, None, settings.label_col)
    fs, path = resolve(settings.input)
    Xs, ys = [], []
    for f in list_parquet(fs, path):
        data = read_shard(fs, f, spec)
        if data.errors:
            raise ValueError(f"--eval-input {f}: {'; '.join(data.errors)}")
        good = ~data.bad
        Xs.append(data.X[good])
        if data.labels is not None:
            ys.append(data.labels.to_numpy(zero_copy_only=False)[good])
    X = np.concatenate(Xs)
    y = np.concatenate(ys) if ys else None
    if len(X) > max_rows:
        keep = np.sort(np.random.default_rng(seed).choice(len(X), max_rows, replace=False))
        X, y = X[keep], (y[keep] if y is not None else None)
    return X, y


def evaluate(settings: EvalSettings, estimator, affinity_dir: str, manifest: dict) -> dict:
    """Quality on held-out points: trustworthiness and kNN recall@10, and kNN accuracy with labels.

    The figures of the default mode (``transform``'s ``"auto"``) carry the plain
    names; a model with a reference also gets those of its network alone,
    prefixed ``network_``.
    """
    k = K
    metrics: dict = {}
    methods = {"": "auto"}
    if getattr(estimator, "reference_", None) is not None:
        methods["network_"] = "network"
    if settings.input:
        X_eval, y_eval = read_eval_input(settings, settings.samples, settings.seed)
        emb_eval = {p: estimator.transform(X_eval, method=m) for p, m in methods.items()}
        metrics["eval_source"] = "held_out"
        ref_rows, ref_X, ref_y = sample_features(affinity_dir, max(settings.samples, 10_000), settings.seed)
        ref_emb = {p: embed_features(estimator, ref_X, m) for p, m in methods.items()}
    else:
        # Without held-out shards: half of a training sample is the reference, half the query.
        _, X, y = sample_features(affinity_dir, 2 * settings.samples, settings.seed)
        emb = {p: embed_features(estimator, X, m) for p, m in methods.items()}
        half = len(X) // 2
        X_eval = X[half:]
        emb_eval, ref_emb = {p: e[half:] for p, e in emb.items()}, {p: e[:half] for p, e in emb.items()}
        y_eval, ref_y = (y[half:], y[:half]) if y is not None else (None, None)
        metrics["eval_source"] = "training_sample"
    metrics["eval_points"] = int(len(X_eval))
    for prefix in methods:
        metrics.update(quality(X_eval, emb_eval[prefix], y_eval, ref_emb[prefix], ref_y, k, prefix))
    if manifest.get("label_col") and y_eval is None:
        log.warning("no labels in the held-out data; kNN accuracy is not computed")
    return metrics


def quality(X_eval, emb_eval, y_eval, ref_emb, ref_y, k: int, prefix: str) -> dict:
    """Trustworthiness and kNN recall of ``emb_eval`` (m, d) against ``X_eval`` (m, dim), and kNN
    accuracy of its labels against the reference map ``ref_emb`` with labels ``ref_y``; names prefixed."""
    from ptsne.metrics import knn_accuracy, knn_recall, trustworthiness

    out = {}
    if len(X_eval) > 2 * k + 1:
        out[f"{prefix}trustworthiness"] = trustworthiness(X_eval, emb_eval, k=k)
        out[f"{prefix}knn_recall"] = knn_recall(X_eval, emb_eval, k=k)
    if y_eval is not None and ref_y is not None and len(ref_emb) >= k:
        out[f"{prefix}knn_accuracy"] = knn_accuracy(ref_emb, ref_y, emb_eval, y_eval, k=k)
    return out


def embed_features(estimator, Z, method: str):
    """The map of stored features ``Z`` (already in the network's input space, after any PCA)."""
    from ptsne.transform import transform

    Y = transform(estimator.model_, Z)
    reference = getattr(estimator, "reference_", None)
    return reference.place(Z, Y) if method == "auto" and reference is not None else Y
