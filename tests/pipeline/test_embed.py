"""pipeline.embed on a real local Ray: exactly-once bookkeeping, outputs equal ParametricTSNE.transform."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.embed import (
    CURRENT_FILE,
    LEDGER_FILE,
    EmbedConfig,
    EmbedInputError,
    Ledger,
    ModelSpec,
    embed_shards,
    load_output,
    read_current,
)
from ptsne import ParametricTSNE
from tests.conftest import gaussian_blobs

DIM = 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    X, _ = gaussian_blobs(300, DIM, 3, seed=0)
    est = ParametricTSNE(n_epochs=2, perplexity=10, hidden_layers=(32, 32), random_state=0, device="cpu")
    est.fit(X)
    path = tmp_path_factory.mktemp("model") / "est"
    est.save(path)
    return path


def write_shard(path, ids, X, label=None, vector="fixed"):
    X = np.asarray(X, dtype=np.float32)
    if vector == "fixed":
        vec = pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), X.shape[1])
    else:  # variable-length list<float>
        vec = pa.array([row.tolist() for row in X], type=pa.list_(pa.float32()))
    cols = {"id": pa.array(ids, type=pa.int64()), "vector": vec}
    if label is not None:
        cols["label"] = pa.array(label)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path)


def shard_data(seed, n, start):
    X, y = gaussian_blobs(n, DIM, 3, seed=seed)
    return np.arange(start, start + n), X, y


def spec(model_dir, version="1"):
    return ModelSpec(path=str(model_dir), name="demo", version=version, tag=f"v{version}")


CFG = EmbedConfig(passthrough=("label",), batch_size=128, num_actors=1, progress=False)


def test_two_batches_then_nothing_new_matches_transform(ray_local, model_dir, tmp_path):
    est = ParametricTSNE.load(model_dir, device="cpu")
    inp, out = tmp_path / "in", tmp_path / "out"
    data = {f"a/part-{i}.parquet": shard_data(i, 150 + 10 * i, 1000 * i) for i in range(2)}
    for rel, (ids, X, y) in data.items():
        write_shard(inp / rel, ids, X, y)
    first = embed_shards(inp, out, spec(model_dir), CFG)
    assert (first.shards_written, first.shards_skipped, first.rows) == (2, 0, 310)
    assert read_current(out)["dir"] == "v1"

    # a second batch arrives, in another subdirectory
    later = {f"b/part-{i}.parquet": shard_data(10 + i, 120, 1000 * (10 + i)) for i in range(2)}
    for rel, (ids, X, y) in later.items():
        write_shard(inp / rel, ids, X, y)
    data.update(later)
    second = embed_shards(inp, out, spec(model_dir), CFG)
    assert (second.shards_written, second.shards_skipped, second.rows) == (2, 2, 240)

    third = embed_shards(inp, out, spec(model_dir), CFG)
    assert (third.shards_written, third.shards_skipped, third.rows) == (0, 4, 0)

    for rel, (ids, X, y) in data.items():
        table = pq.read_table(out / "v1" / rel)
        assert table.column("id").to_pylist() == ids.tolist()
        emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(emb, est.transform(X), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(table.column("x").to_numpy(), emb[:, 0])
        assert table.schema.field("embedding").type == pa.list_(pa.float32(), 2)
        assert set(table.column("model_version").to_pylist()) == {"1"}
        assert table.column("label").to_pylist() == y.tolist()
    ledger = Ledger.load(out / "v1")
    assert sorted(ledger.entries) == sorted(data)
    assert load_output(out).equals(load_output(out / "v1"))  # the location reads its current version


def test_output_schema_is_the_same_for_every_shard(ray_local, model_dir, tmp_path):
    """Batches that span shards are split per shard; empty shards get the same columns."""
    inp, out = tmp_path / "in", tmp_path / "out"
    sizes = {"a.parquet": 70, "b.parquet": 0, "c.parquet": 45, "d.parquet": 130}
    start = 0
    for i, (rel, n) in enumerate(sizes.items()):
        ids, X, y = shard_data(i, max(n, 3), start)
        write_shard(inp / rel, ids[:n], X[:n], y[:n])
        start += n
    cfg = EmbedConfig(passthrough=("label",), batch_size=64, num_actors=1, progress=False)
    summary = embed_shards(inp, out, spec(model_dir), cfg)
    assert (summary.shards_written, summary.rows, summary.stream_rows) == (4, 245, 245)
    assert 0 < summary.model_seconds <= summary.actor_seconds
    names = ["id", "embedding", "x", "y", "model_name", "model_version", "label"]
    schemas = {rel: pq.read_schema(out / "v1" / rel) for rel in sizes}
    for rel, schema in schemas.items():
        assert schema.names == names, rel
        assert schema.equals(schemas["a.parquet"]), rel
        assert pq.read_metadata(out / "v1" / rel).num_rows == sizes[rel]
    table = load_output(out)
    assert table.column("id").to_pylist() == list(range(245))
    assert set(table.column("model_name").to_pylist()) == {"demo"}


def test_vectors_from_sliced_and_chunked_batches():
    """The copy-free path honours slice offsets and chunking, and hands torch a writable array."""
    from pipeline.embed import NON_FINITE, NULL_VECTOR, OK, WRONG_DIM, _Spec, _vectors

    X = np.arange(40 * DIM, dtype=np.float32).reshape(40, DIM)
    col = pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), DIM)
    table = pa.table({"id": np.arange(40), "vector": col})
    s = _Spec("vector", None, "id", (), DIM, 2)
    chunked = pa.concat_tables([table.slice(5, 10), table.slice(20, 7)])
    got, status = _vectors(chunked, s)
    np.testing.assert_array_equal(got, np.concatenate([X[5:15], X[20:27]]))
    assert got.flags.writeable and got.dtype == np.float32 and (status == OK).all()

    rows = [X[0].tolist(), None, X[1, :3].tolist(), [*X[2, :-1].tolist(), float("nan")], X[3].tolist()]
    lists = pa.table({"id": np.arange(5), "vector": pa.array(rows, pa.list_(pa.float64()))}).slice(0, 5)
    got, status = _vectors(lists, s)
    assert status.tolist() == [OK, NULL_VECTOR, WRONG_DIM, NON_FINITE, OK]
    np.testing.assert_array_equal(got[[0, 4]], X[[0, 3]])


def test_changed_shard_is_reembedded_and_leftovers_removed(ray_local, model_dir, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    ids, X, y = shard_data(0, 100, 0)
    write_shard(inp / "part-0.parquet", ids, X, y)
    embed_shards(inp, out, spec(model_dir), CFG)
    # Leftovers of a killed run: a temp file and an output without a ledger line.
    (out / "v1" / ".part-9.parquet.tmp-abc").write_bytes(b"partial")
    pq.write_table(pa.table({"id": [1]}), out / "v1" / "orphan.parquet")
    ids2, X2, y2 = shard_data(5, 130, 500)
    write_shard(inp / "part-0.parquet", ids2, X2, y2)
    os.utime(inp / "part-0.parquet", ns=(1, 10**18))  # make the change visible even within one mtime tick
    summary = embed_shards(inp, out, spec(model_dir), CFG)
    assert summary.shards_written == 1 and summary.rows == 130
    assert sorted(p.name for p in (out / "v1").iterdir()) == [LEDGER_FILE, "part-0.parquet"]
    assert load_output(out / "v1").column("id").to_pylist() == ids2.tolist()


def test_list_column_feature_columns_and_rejects(ray_local, model_dir, tmp_path):
    est = ParametricTSNE.load(model_dir, device="cpu")
    ids, X, _ = shard_data(1, 90, 0)
    X_bad = X.copy()
    X_bad[[3, 40]] = np.nan
    X_bad[7, 2] = np.inf
    write_shard(tmp_path / "lists" / "p.parquet", ids, X_bad, vector="list")
    cfg = EmbedConfig(batch_size=32, num_actors=1, progress=False, on_invalid="reject")
    summary = embed_shards(tmp_path / "lists", tmp_path / "o1", spec(model_dir), cfg)
    assert (summary.rows, summary.rows_rejected) == (87, 3)
    good = np.setdiff1d(np.arange(90), [3, 7, 40])
    table = pq.read_table(tmp_path / "o1" / "v1" / "p.parquet")
    assert table.column("id").to_pylist() == ids[good].tolist()
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(emb, est.transform(X[good]), rtol=1e-5, atol=1e-5)
    rejects = pq.read_table(tmp_path / "o1" / "v1" / "_rejects" / "p.parquet")
    assert rejects.column("row").to_pylist() == [3, 7, 40]
    assert set(rejects.column("reason").to_pylist()) == {"NaN or Inf"}

    # scalar feature columns, named in the model's feature order
    names = [f"f{j}" for j in range(DIM)]
    cols = {"id": ids, **{n: X[:, j] for j, n in enumerate(names)}}
    (tmp_path / "cols").mkdir()
    pq.write_table(pa.table(cols), tmp_path / "cols" / "p.parquet")
    cfg = EmbedConfig(feature_cols=tuple(names), num_actors=1, progress=False)
    embed_shards(tmp_path / "cols", tmp_path / "o2", spec(model_dir), cfg)
    emb = np.stack(load_output(tmp_path / "o2" / "v1").column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(emb, est.transform(X), rtol=1e-5, atol=1e-5)


def test_nan_rows_fail_their_shard_only(ray_local, model_dir, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    ids, X, y = shard_data(0, 80, 0)
    write_shard(inp / "good.parquet", ids, X, y)
    X_bad = X.copy()
    X_bad[[5, 6]] = np.nan
    write_shard(inp / "bad.parquet", ids + 100, X_bad, y)
    with pytest.raises(EmbedInputError, match=r"bad.parquet: 2 rows with NaN or Inf \(first ids: 105, 106\)") as info:
        embed_shards(inp, out, spec(model_dir), CFG)
    assert info.value.summary.shards_written == 1
    assert sorted(Ledger.load(out / "v1").entries) == ["good.parquet"]
    assert not (out / "v1" / "bad.parquet").exists()
    assert not (out / CURRENT_FILE).exists()  # incomplete output is never made current


def test_duplicate_ids_are_counted_per_row_for_any_id_type():
    from pipeline.embed import _duplicate_ids

    assert _duplicate_ids(pa.chunked_array([[1, 2], [3]])) == (0, None, 0)
    # Nulls are no ids; the example is the first id, in order of appearance, that repeats.
    assert _duplicate_ids(pa.chunked_array([["b", "a", None], ["a", None, "b", "a"]])) == (3, "b", 2)


def test_duplicate_ids_warn_with_the_count_or_fail_their_shard(ray_local, model_dir, tmp_path, caplog):
    import dataclasses

    inp = tmp_path / "in"
    ids, X, y = shard_data(0, 60, 0)
    write_shard(inp / "a.parquet", ids, X, y)
    dup = ids + 100
    dup[[10, 11, 12]] = 107  # id 107 on 4 rows: 3 duplicate rows
    dup[20] = 130  # and id 130 on 2 rows: 1 more
    write_shard(inp / "b.parquet", dup, X, y)

    summary = embed_shards(inp, tmp_path / "warn", spec(model_dir), CFG)
    assert (summary.shards_written, summary.rows, summary.duplicate_ids) == (2, 120, 4)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "duplicate" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "id column 'id': 4 duplicate id(s) in 1 shard(s)" in warnings[0] and "107 on 4 rows of b.parquet" in warnings[0]
    assert load_output(tmp_path / "warn").column("id").to_pylist() == [*ids.tolist(), *dup.tolist()]

    strict = dataclasses.replace(CFG, on_duplicate_ids="error")
    with pytest.raises(EmbedInputError, match=r"b.parquet: 4 duplicate id\(s\) in id column 'id' \(e.g. 107 on 4 rows\)") as info:
        embed_shards(inp, tmp_path / "error", spec(model_dir), strict)
    assert "--on-duplicate-ids warn" in str(info.value)
    assert (info.value.summary.shards_written, info.value.summary.shards_failed) == (1, 1)
    assert sorted(Ledger.load(tmp_path / "error" / "v1").entries) == ["a.parquet"]
    assert not (tmp_path / "error" / "v1" / "b.parquet").exists()


@pytest.mark.parametrize(
    "problem, match",
    [
        ("missing", r"missing column\(s\) \['vector'\]"),
        ("dim", r"dimension 5, the model expects 8"),
        ("ids", r"id column 'id' must be integer or string"),
        ("corrupt", r"not a readable Parquet file"),
    ],
)
def test_schema_problems_write_nothing(model_dir, tmp_path, problem, match):
    inp, out = tmp_path / "in", tmp_path / "out"
    ids, X, y = shard_data(0, 20, 0)
    write_shard(inp / "ok.parquet", ids, X, y)
    if problem == "missing":
        pq.write_table(pa.table({"id": ids, "features": X[:, 0]}), inp / "z.parquet")
    elif problem == "dim":
        write_shard(inp / "z.parquet", ids, X[:, :5])
    elif problem == "corrupt":
        (inp / "z.parquet").write_bytes(b"PAR1 truncated")
    else:
        pq.write_table(pa.table({"id": ids.astype(float), "vector": pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), DIM)}), inp / "z.parquet")
    with pytest.raises(EmbedInputError, match=match) as info:
        embed_shards(inp, out, spec(model_dir), EmbedConfig(progress=False))
    assert "z.parquet" in str(info.value) and "nothing was written" in str(info.value)
    assert [p.name for p in (out / "v1").iterdir()] == []


def test_output_of_another_model_is_refused(model_dir, tmp_path):
    target = tmp_path / "out" / "v1"
    target.mkdir(parents=True)
    (target / LEDGER_FILE).write_text(json.dumps({"input": "a.parquet", "output": "a.parquet", "model_name": "other", "model_version": "1"}) + "\n")
    write_shard(tmp_path / "in" / "a.parquet", *shard_data(0, 10, 0))
    with pytest.raises(ValueError, match="holds embeddings of .*other"):
        embed_shards(tmp_path / "in", tmp_path / "out", spec(model_dir), CFG)


def test_method_network_matches_transform_and_one_output_holds_one_method(ray_local, model_dir, tmp_path):
    import dataclasses

    est = ParametricTSNE.load(model_dir, device="cpu")
    assert est.reference_ is not None and spec(model_dir).method("auto") == "refine"
    inp, out = tmp_path / "in", tmp_path / "out"
    ids, X, y = shard_data(0, 120, 0)
    write_shard(inp / "a.parquet", ids, X, y)
    network = dataclasses.replace(CFG, method="network")
    assert embed_shards(inp, out, spec(model_dir), network).shards_written == 1
    emb = np.stack(pq.read_table(out / "v1" / "a.parquet").column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(emb, est.transform(X, method="network"), rtol=1e-5, atol=1e-5)
    assert not np.allclose(emb, est.transform(X), atol=1e-3)  # the default mode refines
    assert Ledger.load(out / "v1").entries["a.parquet"]["method"] == "network"
    # New shards in that output may not be placed by another method: refused before any work.
    write_shard(inp / "b.parquet", *shard_data(1, 30, 500))
    with pytest.raises(ValueError, match="placed by method 'network', this run would place them by 'refine'"):
        embed_shards(inp, out, spec(model_dir), CFG)
    assert not (out / "v1" / "b.parquet").exists()


def test_refine_needs_a_model_with_a_reference(tmp_path):
    X, _ = gaussian_blobs(100, DIM, 3, seed=0)
    path = tmp_path / "plain"
    ParametricTSNE(n_epochs=1, perplexity=10, hidden_layers=(8,), random_state=0, device="cpu",
                   reference_size=0).fit(X).save(path)
    plain = ModelSpec(path=str(path), name="plain", version="1", tag="v1")
    assert not plain.has_reference and plain.method("auto") == "network"
    with pytest.raises(ValueError, match="method 'refine' needs a model with a reference; plain version 1"):
        plain.method("refine")
    write_shard(tmp_path / "in" / "a.parquet", *shard_data(0, 10, 0))
    with pytest.raises(ValueError, match="needs a model with a reference"):
        embed_shards(tmp_path / "in", tmp_path / "out", plain, EmbedConfig(method="refine", progress=False))


def test_config_validation():
    with pytest.raises(ValueError, match="method must be one of"):
        EmbedConfig(method="fast")
    with pytest.raises(ValueError, match="on_invalid must be one of"):
        EmbedConfig(on_invalid="drop")
    with pytest.raises(ValueError, match=r"on_duplicate_ids must be one of \('warn', 'error'\), got 'drop'"):
        EmbedConfig(on_duplicate_ids="drop")
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        EmbedConfig(batch_size=0)
    with pytest.raises(ValueError, match="not both"):
        EmbedConfig(vector_col="v", feature_cols=("a",))
    with pytest.raises(TypeError, match="passthrough must be a list"):
        EmbedConfig(passthrough="label")


def test_actors_that_leave_no_cpu_for_reading_are_refused(ray_local, model_dir, tmp_path):
    # On the 2-CPU test cluster, one actor of 2 CPUs would starve Ray Data's read tasks forever.
    inp, out = tmp_path / "in", tmp_path / "out"
    ids, X, y = shard_data(0, 40, 0)
    write_shard(inp / "a.parquet", ids, X, y)
    cfg = EmbedConfig(num_actors=1, cpus_per_actor=2, progress=False)
    with pytest.raises(ValueError, match=r"cpus_per_actor=2 reserve 2 of the cluster's 2 CPUs"):
        embed_shards(inp, out, spec(model_dir), cfg)
    assert not (out / "v1" / "a.parquet").exists()
