"""Reading, checking and atomically writing Parquet shards."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import schema
from pipeline.shards import ColumnSpec, InvalidInputError, duplicate_ids, list_parquet, load_csv, load_npy, read_shard, write_array_shards
from pipeline.storage import StagedDir, resolve, write_parquet_atomic


def test_list_parquet_skips_hidden_files_and_sorts(tmp_path):
    for name in ("b.parquet", "a.parquet", ".hidden.parquet", "_meta.parquet", "notes.txt"):
        pq.write_table(pa.table({"x": [1]}), tmp_path / name) if name.endswith(".parquet") else (tmp_path / name).write_text("x")
    (tmp_path / "sub").mkdir()
    pq.write_table(pa.table({"x": [1]}), tmp_path / "sub" / "c.parquet")
    fs, path = resolve(str(tmp_path))
    assert [os.path.relpath(p, path) for p in list_parquet(fs, path)] == ["a.parquet", "b.parquet", "sub/c.parquet"]
    with pytest.raises(FileNotFoundError):
        list_parquet(fs, path + "/missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match="no .parquet"):
        list_parquet(fs, path + "/empty")


def test_read_shard_flags_bad_rows_in_every_vector_layout(tmp_path):
    fs, _ = resolve(str(tmp_path))
    rows = [[1.0, 2.0], None, [np.nan, 1.0], [3.0, None], [np.inf, 0.0], [5.0, 6.0]]
    # (pyarrow 25 cannot read back a fixed-size list with null rows from Parquet,
    # so the fixed layout has a null value instead of a null row.)
    fixed_rows = [[1.0, 2.0], [None, 1.0], [np.nan, 1.0], [3.0, None], [np.inf, 0.0], [5.0, 6.0]]
    for name, col in {
        "list": pa.array(rows, type=pa.list_(pa.float64())),
        "fixed": pa.array(fixed_rows, type=pa.list_(pa.float32(), 2)),
    }.items():
        path = str(tmp_path / f"{name}.parquet")
        pq.write_table(pa.table({"v": col, "k": list("abcdef")}), path)
        d = read_shard(fs, path, ColumnSpec(vector_col="v", id_col="k"))
        assert not d.errors
        assert d.bad.tolist() == [False, True, True, True, True, False], name
        np.testing.assert_array_equal(d.X[[0, 5]], [[1, 2], [5, 6]])
        assert d.ids.to_pylist() == list("abcdef")
    path = str(tmp_path / "cols.parquet")
    pq.write_table(pa.table({"a": [1, 2, None], "b": [0.5, np.nan, 1.0]}), path)
    d = read_shard(fs, path, ColumnSpec(vector_col=None, feature_cols=("a", "b")))
    assert d.bad.tolist() == [False, True, True] and d.X.shape == (3, 2)


def test_read_shard_reports_fatal_problems(tmp_path):
    fs, _ = resolve(str(tmp_path))
    path = str(tmp_path / "s.parquet")
    pq.write_table(pa.table({"v": pa.array([[1.0], [1.0, 2.0], [3.0, 4.0]]), "s": ["x", "y", "z"],
                             "f": [1.5, 2.5, None]}), path)
    assert "mixes dimensions" in read_shard(fs, path, ColumnSpec(vector_col="v")).errors[0]
    assert "missing column" in read_shard(fs, path, ColumnSpec(vector_col="w")).errors[0]
    assert "not numeric" in read_shard(fs, path, ColumnSpec(vector_col=None, feature_cols=("s",))).errors[0]
    assert "scalar" in read_shard(fs, path, ColumnSpec(vector_col="f")).errors[0]
    errors = read_shard(fs, path, ColumnSpec(vector_col="v", id_col="f")).errors
    assert any("must be integer or string" in e for e in errors) and any("1 null ids" in e for e in errors)


def test_column_spec_validates_its_arguments():
    with pytest.raises(ValueError, match="exactly one of vector_col and feature_cols"):
        ColumnSpec(vector_col="v", feature_cols=("a",))
    with pytest.raises(TypeError, match="feature_cols"):
        ColumnSpec(vector_col=None, feature_cols="abc")
    with pytest.raises(TypeError, match="id_col"):
        ColumnSpec(id_col=3)


def test_duplicate_ids_for_ints_and_strings():
    assert duplicate_ids(pa.array([3, 1, 3, 2, 1])) == (2, [1, 3])
    assert duplicate_ids(pa.array(["a", "b", "a"])) == (1, ["a"])
    assert duplicate_ids(pa.array([1, 2, 3])) == (0, [])


def test_staged_dir_moves_into_place_or_leaves_nothing(tmp_path):
    fs, out = resolve(str(tmp_path / "out"))
    with StagedDir(fs, out) as stage:
        write_parquet_atomic(fs, stage + "/a.parquet", pa.table({"x": [1]}))
    assert os.listdir(tmp_path / "out") == ["a.parquet"]
    fs2, out2 = resolve(str(tmp_path / "out2"))
    with pytest.raises(RuntimeError, match="boom"):
        with StagedDir(fs2, out2) as stage:
            write_parquet_atomic(fs2, stage + "/a.parquet", pa.table({"x": [1]}))
            raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["out"]
    with pytest.raises(FileExistsError, match="not empty"):
        with StagedDir(fs, out):
            pass
    with StagedDir(fs, out, overwrite=True) as stage:
        write_parquet_atomic(fs, stage + "/b.parquet", pa.table({"x": [2]}))
    assert os.listdir(tmp_path / "out") == ["b.parquet"]


def test_write_array_shards_and_loaders(tmp_path, rng):
    X = rng.normal(size=(25, 2, 3))  # images are flattened
    y = rng.integers(0, 3, size=25)
    np.savez(tmp_path / "d.npz", X_train=X, y_train=y, X_test=X[:2])
    Xl, yl = load_npy(str(tmp_path / "d.npz"))
    shards = write_array_shards(str(tmp_path / "out"), Xl, yl, shard_rows=10)
    assert [s["rows"] for s in shards] == [10, 10, 5]
    t = pa.concat_tables([pq.read_table(tmp_path / "out" / s["path"]) for s in shards])
    np.testing.assert_allclose(schema.arrow_to_vectors(t.column("vector")), X.reshape(25, 6).astype(np.float32))
    assert t.column("label").to_pylist() == y.tolist() and t.column("id").to_pylist() == list(range(25))
    with pytest.raises(InvalidInputError, match="labels has 3 rows"):
        write_array_shards(str(tmp_path / "bad"), Xl, yl[:3])
    with pytest.raises(InvalidInputError, match="numeric"):
        write_array_shards(str(tmp_path / "bad"), np.array([["a", "b"]]))
    assert not (tmp_path / "bad").exists()

    (tmp_path / "d.csv").write_text("id,a,b,label\n7,1.0,2.0,x\n8,3.0,,y\n")
    Xc, yc, ic = load_csv(str(tmp_path / "d.csv"), label_col="label", id_col="id")
    np.testing.assert_array_equal(Xc[0], [1.0, 2.0]) and np.isnan(Xc[1, 1])
    assert yc.tolist() == ["x", "y"] and ic.tolist() == [7, 8]
    with pytest.raises(InvalidInputError, match="non-numeric feature columns: label"):
        load_csv(str(tmp_path / "d.csv"), id_col="id")
