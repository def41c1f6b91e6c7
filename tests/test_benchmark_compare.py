"""The openTSNE comparison's figures (benchmarks/compare.py) and the scale benchmark's shard sampling."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from benchmarks import compare, scale
from pipeline import schema
from pipeline.storage import resolve, write_parquet_atomic


def test_evaluate_scores_labels_only_where_there_are_labels(rng):
    X = rng.normal(size=(120, 5)).astype(np.float32)
    Y = X[:, :2].copy()
    y = (X[:, 0] > 0).astype(np.int64)
    labelled = compare.evaluate(Y[:80], y[:80], Y[80:], y[80:], X[80:])
    unlabelled = compare.evaluate(Y[:80], None, Y[80:], None, X[80:])
    assert set(labelled) == {"knn_acc_1", "knn_acc_10", "trustworthiness_12", "recall_10"}
    assert set(unlabelled) == {"trustworthiness_12", "recall_10"}
    assert unlabelled["recall_10"] == labelled["recall_10"]
    # The first coordinate decides the label and is kept by the map: nearly every test point is right.
    assert labelled["knn_acc_10"] > 0.85
    table = compare.markdown({"m": {**unlabelled, "fit_s": 1.0}}, n_test=40)
    assert "| m | – | – |" in table and "transform 40 (s)" in table


def test_read_samples_rows_shard_by_shard(tmp_path, rng):
    fs, _ = resolve(str(tmp_path))
    X = rng.normal(size=(250, 4)).astype(np.float32)
    for i, (lo, hi) in enumerate(((0, 100), (100, 180), (180, 250))):
        table = pa.table({schema.ID: pa.array(np.arange(lo, hi, dtype=np.int64)),
                          schema.VECTOR: schema.vectors_to_arrow(X[lo:hi]),
                          schema.LABEL: pa.array(np.arange(lo, hi, dtype=np.int64) % 7)})
        write_parquet_atomic(fs, str(tmp_path / schema.part_name(i)), table)
    ids, vectors, labels = scale._read(tmp_path, 60, seed=3)
    assert len(ids) == 60 and len(set(ids)) == 60 and np.all(np.diff(ids) > 0)
    np.testing.assert_array_equal(vectors, X[ids])
    np.testing.assert_array_equal(labels, ids % 7)
    np.testing.assert_array_equal(scale._read(tmp_path, 60, seed=3)[0], ids)
    assert {0, 1, 2} == {int(np.searchsorted([100, 180, 250], i, side="right")) for i in ids}
    everything = scale._read(tmp_path, None, seed=3)
    np.testing.assert_array_equal(everything[0], np.arange(250))
    np.testing.assert_array_equal(everything[1], X)


def test_scale_pca_default_follows_the_data():
    assert scale.pca_components(scale.parse_args(["--data", "deformed-mnist"])) == 50
    assert scale.pca_components(scale.parse_args([])) is None
    assert scale.pca_components(scale.parse_args(["--data", "deformed-mnist", "--pca", "0"])) is None
    assert scale.pca_components(scale.parse_args(["--pca", "20"])) == 20
