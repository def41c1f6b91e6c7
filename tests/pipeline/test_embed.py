"""pipeline.embed on a real local Ray (and a real S3-protocol server): exactly-once bookkeeping,
outputs equal ParametricTSNE.transform, nothing of anyone else's deleted."""

from __future__ import annotations

import hashlib
import json
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.embed import (
    CPU_BATCH_ROWS,
    CURRENT_FILE,
    GPU_BATCH_ROWS,
    LEDGER_FILE,
    ActorPlan,
    EmbedConfig,
    EmbedInputError,
    LOCK_FILE,
    Ledger,
    ModelSpec,
    embed_shards,
    load_output,
    output_name,
    plan_actors,
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


def uri_of(path):
    """The ledger's key of a local input file."""
    return os.path.realpath(path)


def out_file(out, inp, rel, tag="v1"):
    """The output file of input shard ``inp/rel``."""
    return out / tag / output_name(rel, uri_of(inp / rel))


def embeddings(table):
    return np.stack(table.column("embedding").to_numpy(zero_copy_only=False))


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
        table = pq.read_table(out_file(out, inp, rel))
        assert table.column("id").to_pylist() == ids.tolist()
        emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(emb, est.transform(X), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(table.column("x").to_numpy(), emb[:, 0])
        assert table.schema.field("embedding").type == pa.list_(pa.float32(), 2)
        assert set(table.column("model_version").to_pylist()) == {"1"}
        assert table.column("label").to_pylist() == y.tolist()
    ledger = Ledger.load(out / "v1")
    assert sorted(ledger.entries) == sorted(uri_of(inp / rel) for rel in data)  # keyed by the full location
    assert {e["input"] for e in ledger.entries.values()} == set(data)
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
    schemas = {rel: pq.read_schema(out_file(out, inp, rel)) for rel in sizes}
    for rel, schema in schemas.items():
        assert schema.names == names, rel
        assert schema.equals(schemas["a.parquet"]), rel
        assert pq.read_metadata(out_file(out, inp, rel)).num_rows == sizes[rel]
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


def test_changed_shard_is_reembedded_and_only_our_leftovers_removed(ray_local, model_dir, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    ids, X, y = shard_data(0, 100, 0)
    write_shard(inp / "part-0.parquet", ids, X, y)
    embed_shards(inp, out, spec(model_dir), CFG)
    mine = out_file(out, inp, "part-0.parquet")
    # Leftovers of a killed run: a temp file of ours, and an output at another shard's name without
    # a ledger line; and a user's own file, which is not ours to delete.
    (out / "v1" / ".part-9.parquet.tmp-abc").write_bytes(b"partial")
    write_shard(inp / "part-1.parquet", *shard_data(1, 20, 900))
    unknown = out_file(out, inp, "part-1.parquet")
    pq.write_table(pa.table({"id": [-1]}), unknown)
    pq.write_table(pa.table({"id": [1]}), out / "v1" / "orphan.parquet")
    ids2, X2, y2 = shard_data(5, 130, 500)
    write_shard(inp / "part-0.parquet", ids2, X2, y2)
    os.utime(inp / "part-0.parquet", ns=(1, 10**18))  # make the change visible even within one mtime tick
    summary = embed_shards(inp, out, spec(model_dir), CFG)
    assert (summary.shards_written, summary.rows) == (2, 150)
    assert sorted(p.name for p in (out / "v1").iterdir()) == sorted(
        [LEDGER_FILE, "orphan.parquet", mine.name, unknown.name])
    assert pq.read_table(out / "v1" / "orphan.parquet").column("id").to_pylist() == [1]
    assert pq.read_table(unknown).column("id").to_pylist() == list(range(900, 920))  # replaced
    assert load_output(out / "v1").column("id").to_pylist() == [*ids2.tolist(), *range(900, 920)]


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
    name = output_name("p.parquet", uri_of(tmp_path / "lists" / "p.parquet"))
    table = pq.read_table(tmp_path / "o1" / "v1" / name)
    assert table.column("id").to_pylist() == ids[good].tolist()
    np.testing.assert_allclose(embeddings(table), est.transform(X[good]), rtol=1e-5, atol=1e-5)
    rejects = pq.read_table(tmp_path / "o1" / "v1" / "_rejects" / name)
    assert rejects.column("row").to_pylist() == [3, 7, 40]  # rows counted across batches of 32
    assert set(rejects.column("reason").to_pylist()) == {"NaN or Inf"}
    assert set(rejects.column("shard").to_pylist()) == {uri_of(tmp_path / "lists" / "p.parquet")}
    (entry,) = Ledger.load(tmp_path / "o1" / "v1").entries.values()
    assert (entry["rows"], entry["rejected"], entry["rejects"]) == (87, 3, f"_rejects/{name}")

    # The shard is fixed: embedded again, and its old rejects go with the old version of it.
    write_shard(tmp_path / "lists" / "p.parquet", ids, X, vector="list")
    os.utime(tmp_path / "lists" / "p.parquet", ns=(1, 10**18))
    summary = embed_shards(tmp_path / "lists", tmp_path / "o1", spec(model_dir), cfg)
    assert (summary.rows, summary.rows_rejected) == (90, 0)
    assert not (tmp_path / "o1" / "v1" / "_rejects" / name).exists()
    assert Ledger.load(tmp_path / "o1" / "v1").entries[uri_of(tmp_path / "lists" / "p.parquet")]["rejects"] is None

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
    assert sorted(Ledger.load(out / "v1").entries) == [uri_of(inp / "good.parquet")]
    # nothing of the bad shard, not even a temporary file
    assert sorted(p.name for p in (out / "v1").iterdir()) == sorted(
        [LEDGER_FILE, out_file(out, inp, "good.parquet").name])
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
    assert sorted(Ledger.load(tmp_path / "error" / "v1").entries) == [uri_of(inp / "a.parquet")]
    assert not out_file(tmp_path / "error", inp, "b.parquet").exists()


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
    emb = embeddings(pq.read_table(out_file(out, inp, "a.parquet")))
    np.testing.assert_allclose(emb, est.transform(X, method="network"), rtol=1e-5, atol=1e-5)
    assert not np.allclose(emb, est.transform(X), atol=1e-3)  # the default mode refines
    assert Ledger.load(out / "v1").entries[uri_of(inp / "a.parquet")]["method"] == "network"
    # New shards in that output may not be placed by another method: refused before any work.
    write_shard(inp / "b.parquet", *shard_data(1, 30, 500))
    with pytest.raises(ValueError, match="placed by method 'network', this run would place them by 'refine'"):
        embed_shards(inp, out, spec(model_dir), CFG)
    assert not out_file(out, inp, "b.parquet").exists()


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
    with pytest.raises(ValueError, match="batch_size must be a positive integer or None, got 0"):
        EmbedConfig(batch_size=0)
    with pytest.raises(ValueError, match="not both"):
        EmbedConfig(vector_col="v", feature_cols=("a",))
    with pytest.raises(TypeError, match="passthrough must be a list"):
        EmbedConfig(passthrough="label")


@pytest.mark.parametrize("resources, config, want", [
    ({"CPU": 16.0}, {}, (16, 1.0, 0.0, CPU_BATCH_ROWS)),  # CPU cluster: one actor per CPU
    ({"CPU": 16.0, "GPU": 1.0}, {}, (4, 1.0, 0.25, GPU_BATCH_ROWS)),  # four actors share the GPU, large batches
    ({"CPU": 16.0, "GPU": 2.0}, {}, (8, 1.0, 0.25, GPU_BATCH_ROWS)),
    ({"CPU": 2.0, "GPU": 1.0}, {}, (2, 1.0, 0.25, GPU_BATCH_ROWS)),  # capped by the CPUs
    ({"CPU": 16.0, "GPU": 1.0}, {"cpus_per_actor": 8.0}, (2, 8.0, 0.25, GPU_BATCH_ROWS)),
    ({"CPU": 16.0, "GPU": 2.0}, {"gpus_per_actor": 1.0}, (2, 1.0, 1.0, GPU_BATCH_ROWS)),
    ({"CPU": 16.0, "GPU": 1.0}, {"gpus_per_actor": 0.0}, (16, 1.0, 0.0, CPU_BATCH_ROWS)),  # GPUs declined
    ({"CPU": 16.0, "GPU": 0.5}, {}, (16, 1.0, 0.0, CPU_BATCH_ROWS)),  # less than a whole GPU: CPU actors
    ({"CPU": 16.0, "GPU": 1.0}, {"num_actors": 2}, (2, 1.0, 0.25, GPU_BATCH_ROWS)),
    ({"CPU": 16.0, "GPU": 1.0}, {"batch_size": 512}, (4, 1.0, 0.25, 512)),  # a batch size given is kept
])
def test_actor_plan_of_the_network_shares_each_gpu_between_four_actors(resources, config, want):
    assert plan_actors(EmbedConfig(**config), 100, resources, "network") == want
    assert plan_actors(EmbedConfig(**config), 1, resources, "network").actors == 1  # never more actors than shards


@pytest.mark.parametrize("resources", [{"CPU": 16.0}, {"CPU": 16.0, "GPU": 1.0}, {"CPU": 16.0, "GPU": 4.0}])
def test_a_placement_on_cpu_gets_cpu_actors_however_many_gpus(resources):
    # The reference placement runs on CPU: a GPU must not cut the pool to four actors a GPU.
    plan = plan_actors(EmbedConfig(), 100, resources, "refine")
    assert plan == ActorPlan(16, 1.0, 0.0, CPU_BATCH_ROWS)
    assert plan.actors >= resources["CPU"]  # never fewer actors than CPUs because a GPU is present
    # A placement on the GPU (the parameter a GPU placement will set) gets GPU actors as the network does.
    on_gpu = plan_actors(EmbedConfig(), 100, resources, "refine", gpu_placement=True)
    assert on_gpu == plan_actors(EmbedConfig(), 100, resources, "network")
    # Asked for explicitly, GPUs are given whatever the method.
    if resources.get("GPU"):
        assert plan_actors(EmbedConfig(gpus_per_actor=0.5), 100, resources, "refine").gpus == 0.5


def test_actor_plan_refuses_more_gpus_than_the_cluster_has_and_an_unresolved_method():
    with pytest.raises(ValueError, match=r"5 actor\(s\) x gpus_per_actor=0.25 reserve 1.25 GPUs, the cluster has 1"):
        plan_actors(EmbedConfig(num_actors=5), 100, {"CPU": 16.0, "GPU": 1.0}, "network")
    with pytest.raises(ValueError, match="method must be 'network' or 'refine' \\(as resolved\\), got 'auto'"):
        plan_actors(EmbedConfig(), 100, {"CPU": 16.0}, "auto")


def test_actors_may_use_every_cpu_but_no_more(ray_local, model_dir, tmp_path):
    # No read tasks compete with the actors: one actor of both CPUs of the test cluster runs.
    inp, out = tmp_path / "in", tmp_path / "out"
    ids, X, y = shard_data(0, 40, 0)
    write_shard(inp / "a.parquet", ids, X, y)
    summary = embed_shards(inp, out, spec(model_dir), EmbedConfig(num_actors=1, cpus_per_actor=2, progress=False))
    assert summary.rows == 40
    write_shard(inp / "b.parquet", *shard_data(1, 40, 100))
    write_shard(inp / "c.parquet", *shard_data(2, 40, 200))
    with pytest.raises(ValueError, match=r"1 actor\(s\) x cpus_per_actor=3 reserve 3 CPUs, the cluster has 2"):
        embed_shards(inp, out, spec(model_dir), EmbedConfig(num_actors=1, cpus_per_actor=3, progress=False))
    assert not out_file(out, inp, "b.parquet").exists()
    with pytest.raises(ValueError, match=r"2 actor\(s\) x cpus_per_actor=1.5 reserve 3 CPUs"):
        embed_shards(inp, out, spec(model_dir), EmbedConfig(num_actors=2, cpus_per_actor=1.5, progress=False))
    assert not out_file(out, inp, "b.parquet").exists() and not out_file(out, inp, "c.parquet").exists()


def test_output_name_keeps_the_relative_path_and_hashes_the_full_uri():
    uri = "s3://bucket/incoming/day1/sub/a.parquet"
    digest = hashlib.sha256(uri.encode()).hexdigest()[:10]
    assert output_name("sub/a.parquet", uri) == f"sub/a.{digest}.parquet"
    assert output_name("a.parquet", "/data/day1/a.parquet") != output_name("a.parquet", "/data/day2/a.parquet")


def test_two_inputs_with_the_same_file_names_are_both_kept(ray_local, model_dir, tmp_path):
    """incoming/day1 and then incoming/day2, both holding a.parquet, into one output."""
    inp, out = tmp_path / "incoming", tmp_path / "out"
    day1 = {"a.parquet": shard_data(0, 50, 0), "b.parquet": shard_data(1, 30, 50)}
    day2 = {"a.parquet": shard_data(2, 40, 1000)}
    for day, data in (("day1", day1), ("day2", day2)):
        for rel, (ids, X, y) in data.items():
            write_shard(inp / day / rel, ids, X, y)
    first = embed_shards(inp / "day1", out, spec(model_dir), CFG)
    second = embed_shards(inp / "day2", out, spec(model_dir), CFG)
    assert (first.shards_written, second.shards_written, second.shards_skipped) == (2, 1, 0)
    again = embed_shards(inp / "day1", out, spec(model_dir), CFG)
    assert (again.shards_written, again.shards_skipped) == (0, 2)

    est = ParametricTSNE.load(model_dir, device="cpu")
    table = load_output(out / "v1")
    ids = table.column("id").to_pylist()
    expected = [*day1["a.parquet"][0], *day1["b.parquet"][0], *day2["a.parquet"][0]]
    assert sorted(ids) == sorted(expected) and len(set(ids)) == len(ids)
    X = {int(i): x for data in (day1, day2) for d in data.values() for i, x in zip(d[0], d[1])}
    np.testing.assert_allclose(embeddings(table), est.transform(np.stack([X[i] for i in ids])), rtol=1e-5, atol=1e-5)
    files = sorted(p.name for p in (out / "v1").glob("*.parquet"))
    assert len(files) == 3 and sum(f.startswith("a.") for f in files) == 2


def test_input_and_output_that_contain_each_other_are_refused_before_any_work(model_dir, tmp_path, s3):
    out = tmp_path / "out"
    inside = out / "v1" / "in"
    write_shard(inside / "a.parquet", *shard_data(0, 20, 0))
    before = (inside / "a.parquet").read_bytes()
    with pytest.raises(ValueError, match="must not contain each other"):
        embed_shards(inside, out, spec(model_dir), CFG)
    inp = tmp_path / "in"
    write_shard(inp / "a.parquet", *shard_data(0, 20, 0))
    with pytest.raises(ValueError, match="lies inside input"):
        embed_shards(inp, inp / "maps", spec(model_dir), CFG)
    assert (inside / "a.parquet").read_bytes() == before
    assert sorted(p.name for p in out.rglob("*")) == ["a.parquet", "in", "v1"]  # no lock, no ledger
    assert not (inp / "maps").exists()

    bucket = s3.bucket()
    with pytest.raises(ValueError, match="must not contain each other"):
        embed_shards(f"{bucket}/maps/v1/incoming", f"{bucket}/maps", spec(model_dir), CFG)
    assert s3.keys(bucket) == []


def _put_shard(uri, ids, X, y):
    from pipeline import storage

    X = np.asarray(X, dtype=np.float32)
    table = pa.table({"id": pa.array(ids, type=pa.int64()), "label": pa.array(y),
                      "vector": pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), X.shape[1])})
    fs, path = storage.resolve(uri)
    with fs.open_output_stream(path) as f:
        pq.write_table(table, f)


def test_input_and_output_on_s3(ray_local, model_dir, s3):
    from pipeline import storage

    bucket = s3.bucket()
    inp, out = f"{bucket}/incoming", f"{bucket}/maps"
    data = {"a.parquet": shard_data(0, 90, 0), "sub/b.parquet": shard_data(1, 70, 500)}
    for rel, (ids, X, y) in data.items():
        _put_shard(f"{inp}/{rel}", ids, X, y)
    cfg = EmbedConfig(passthrough=("label",), batch_size=32, num_actors=1, progress=False)
    first = embed_shards(inp, out, spec(model_dir), cfg)
    assert (first.shards_written, first.rows, first.current) == (2, 160, True)
    assert first.output == f"{out}/v1"
    again = embed_shards(inp, out, spec(model_dir), cfg)
    assert (again.shards_written, again.shards_skipped, again.rows) == (0, 2, 0)

    ledger = Ledger.load(f"{out}/v1")
    assert sorted(ledger.entries) == [f"{inp}/{rel}" for rel in sorted(data)]
    est = ParametricTSNE.load(model_dir, device="cpu")
    fs, _ = storage.resolve(out)
    for rel, (ids, X, y) in data.items():
        entry = ledger.entries[f"{inp}/{rel}"]
        assert entry["output"] == output_name(rel, f"{inp}/{rel}")
        with fs.open_input_file(f"{out}/v1/{entry['output']}"[len("s3://"):]) as f:
            table = pq.read_table(f)
        assert table.column("id").to_pylist() == ids.tolist()
        assert table.column("label").to_pylist() == y.tolist()
        np.testing.assert_allclose(embeddings(table), est.transform(X), rtol=1e-5, atol=1e-5)
    assert read_current(out)["dir"] == "v1"
    assert len(load_output(out)) == 160
    keys = [k for k in s3.keys(out) if not k.endswith("/")]  # pyarrow's directory markers aside
    names = [k.rsplit("/", 1)[-1] for k in keys]
    assert not [n for n in names if storage.is_ours(n)] and LOCK_FILE not in names  # lease given back
    assert sorted(names) == sorted([CURRENT_FILE, LEDGER_FILE, *(output_name(r, f"{inp}/{r}").rsplit("/", 1)[-1]
                                                                 for r in data)])


def test_ledger_lines_of_the_older_format_are_not_trusted_and_their_files_kept(ray_local, model_dir, tmp_path,
                                                                              caplog):
    inp, out = tmp_path / "in", tmp_path / "out"
    ids, X, y = shard_data(0, 60, 0)
    write_shard(inp / "a.parquet", ids, X, y)
    # What the older format wrote: the output under the input's relative path, keyed by it.
    (out / "v1").mkdir(parents=True)
    pq.write_table(pa.table({"id": pa.array(ids, pa.int64())}), out / "v1" / "a.parquet")
    old_bytes = (out / "v1" / "a.parquet").read_bytes()
    st = (inp / "a.parquet").stat()
    old = {"input": "a.parquet", "size": st.st_size, "mtime_ns": st.st_mtime_ns, "rows": 60, "output": "a.parquet",
           "model_name": "demo", "model_version": "1", "method": "refine"}
    (out / "v1" / LEDGER_FILE).write_text(json.dumps(old) + "\n")

    with caplog.at_level(logging.WARNING, logger="pipeline.embed"):
        summary = embed_shards(inp, out, spec(model_dir), CFG)
    assert (summary.shards_written, summary.rows) == (1, 60)
    (warning,) = [r.getMessage() for r in caplog.records if "older format" in r.getMessage()]
    assert "1 ledger line(s) of the older format" in warning and "a.parquet" in warning, warning
    assert (out / "v1" / "a.parquet").read_bytes() == old_bytes  # kept, untouched
    assert load_output(out).column("id").to_pylist() == ids.tolist()  # the old file is not read
    ledger = Ledger.load(out / "v1")
    assert ledger.legacy == [old] and list(ledger.entries) == [uri_of(inp / "a.parquet")]
    assert embed_shards(inp, out, spec(model_dir), CFG).shards_skipped == 1


# -- a model is its content: name, version and the sha256 of its weights -----------------------------


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    """Another model of the same shape, trained on other data: another map."""
    X, _ = gaussian_blobs(300, DIM, 3, seed=7)
    est = ParametricTSNE(n_epochs=2, perplexity=10, hidden_layers=(32, 32), random_state=7, device="cpu")
    path = tmp_path_factory.mktemp("other") / "est"
    est.fit(X).save(path)
    return path


def local(path):
    """The spec of a local model directory as every ``ptsne train`` names it: ``model``, version ``local``."""
    return ModelSpec(path=str(path), name="model", version="local", tag="local")


def _files_of(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()
            and p.name != LOCK_FILE}


def test_two_models_of_one_name_and_version_do_not_share_an_output(ray_local, model_dir, other_model_dir,
                                                                   tmp_path):
    a, b = local(model_dir), local(other_model_dir)
    assert a.sha256 != b.sha256 and a.sha256 == hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
    inp, out = tmp_path / "in", tmp_path / "out"
    write_shard(inp / "a.parquet", *shard_data(0, 40, 0))
    assert embed_shards(inp, out, a, CFG).shards_written == 1
    assert {e["model_sha256"] for e in Ledger.load(out / "local").entries.values()} == {a.sha256}
    assert read_current(out)["model_sha256"] == a.sha256
    before = _files_of(out)
    write_shard(inp / "b.parquet", *shard_data(1, 40, 100))  # a new shard: B's rows would join A's map
    with pytest.raises(ValueError, match=rf"holds embeddings of model version local \(weights sha256 "
                                         rf"{a.sha256[:12]}\), not of model version local \(weights sha256 "
                                         rf"{b.sha256[:12]}\)"):
        embed_shards(inp, out, b, CFG)
    assert _files_of(out) == before  # nothing written


def _strip(path, *keys):
    """Rewrite a ledger or pointer as a version before ``keys`` existed wrote it."""
    if path.name == LEDGER_FILE:
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({k: v for k, v in e.items() if k not in keys}) + "\n" for e in lines))
    else:
        path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k not in keys}))


def test_outputs_written_before_the_sha256_and_etag_are_read_and_upgraded_without_reembedding(
        ray_local, model_dir, other_model_dir, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    for i in range(2):
        write_shard(inp / f"p{i}.parquet", *shard_data(i, 30, 100 * i))
    spec_a = local(model_dir)
    assert embed_shards(inp, out, spec_a, CFG).shards_written == 2
    outputs = {p: p.read_bytes() for p in (out / "local").glob("*.parquet")}
    _strip(out / "local" / LEDGER_FILE, "model_sha256", "etag")
    _strip(out / CURRENT_FILE, "model_sha256")
    stripped = _files_of(out)

    # Another model of the same name and version: its placement of the shard's first rows tells it apart.
    with pytest.raises(ValueError, match=r"written before weights were recorded, and model version local "
                                         r"\(weights sha256 \w+\) places their rows elsewhere"):
        embed_shards(inp, out, local(other_model_dir), CFG)
    assert _files_of(out) == stripped
    again = embed_shards(inp, out, spec_a, CFG)
    assert (again.shards_written, again.shards_skipped) == (0, 2)  # old lines match on size and mtime
    entries = Ledger.load(out / "local").entries.values()
    assert {e["model_sha256"] for e in entries} == {spec_a.sha256}  # upgraded in place
    assert all(e["etag"] and e["etag"].startswith("ino:") for e in entries)
    assert read_current(out)["model_sha256"] == spec_a.sha256
    assert {p: p.read_bytes() for p in (out / "local").glob("*.parquet")} == outputs  # nothing embedded again
    with pytest.raises(ValueError, match="holds embeddings of model version local"):
        embed_shards(inp, out, local(other_model_dir), CFG)  # upgraded: now told apart by content


# -- damaged ledger lines and pointers -----------------------------------------------------------------


def test_damaged_ledger_lines_are_set_aside_and_their_shards_embedded_again(ray_local, model_dir, tmp_path,
                                                                            caplog):
    inp, out = tmp_path / "in", tmp_path / "out"
    data = {f"p{i}.parquet": shard_data(i, 25, 100 * i) for i in range(3)}
    for rel, (ids, X, y) in data.items():
        write_shard(inp / rel, ids, X, y)
    embed_shards(inp, out, spec(model_dir), CFG)
    path = out / "v1" / LEDGER_FILE
    lines = path.read_bytes().split(b"\n")
    lines[0] = b"\xff\xfe" + lines[0][2:]  # not UTF-8
    lines[1] = lines[1][: len(lines[1]) // 2]  # cut short: not JSON
    damaged = b"\n".join(lines)
    path.write_bytes(damaged)

    with caplog.at_level(logging.WARNING, logger="pipeline.embed"):
        assert len(load_output(out)) == 25  # a reader reads the readable line, writes nothing
    assert any(f"{path}: line(s) 1, 2 are damaged" in r.getMessage() for r in caplog.records)
    assert path.read_bytes() == damaged
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.embed"):
        rerun = embed_shards(inp, out, spec(model_dir), CFG)
    assert (rerun.shards_written, rerun.shards_skipped) == (2, 1)
    (aside,) = (out / "v1").glob(f"{LEDGER_FILE}.damaged-*")
    assert aside.read_bytes() == damaged  # kept as it was
    assert any(str(aside) in r.getMessage() and "line(s) 1, 2 were damaged" in r.getMessage()
               for r in caplog.records)
    table = load_output(out)
    ids = np.concatenate([d[0] for d in data.values()])
    assert sorted(table.column("id").to_pylist()) == sorted(ids.tolist())  # every row once: none lost, none twice
    assert len(list((out / "v1").glob("*.parquet"))) == 3
    assert not Ledger.load(out / "v1").damaged


def test_a_damaged_current_pointer_is_rebuilt_from_the_one_version_directory_or_refused(
        ray_local, model_dir, tmp_path):
    from pipeline.embed import DamagedOutputError, repair_current

    inp, out = tmp_path / "in", tmp_path / "out"
    write_shard(inp / "a.parquet", *shard_data(0, 30, 0))
    embed_shards(inp, out, spec(model_dir), CFG)
    good = json.loads((out / CURRENT_FILE).read_text())
    pointer = out / CURRENT_FILE
    pointer.write_bytes(b'{"dir": "v1", "model_name": "de\x01mo"')  # a control character, cut short
    with pytest.raises(DamagedOutputError, match=rf"{pointer} is damaged \(not UTF-8 JSON.*repair_current"):
        load_output(out)
    rerun = embed_shards(inp, out, spec(model_dir), CFG)
    assert (rerun.shards_written, rerun.shards_skipped, rerun.current) == (0, 1, True)
    rebuilt = read_current(out)
    assert {k: rebuilt[k] for k in ("dir", "model_name", "model_version", "model_sha256")} == \
        {k: good[k] for k in ("dir", "model_name", "model_version", "model_sha256")}
    (aside,) = out.glob(f"{CURRENT_FILE}.damaged-*")
    assert aside.read_bytes() == b'{"dir": "v1", "model_name": "de\x01mo"'

    # Two version directories: which was current cannot be told.
    embed_shards(inp, out, spec(model_dir, version="2"), CFG, make_current=False)
    pointer.write_bytes(b"\xff\xff\xff")
    with pytest.raises(DamagedOutputError, match=rf"{pointer} is damaged and the output holds 2 version "
                                                 r"directories \(v1, v2\).*--reembed"):
        embed_shards(inp, out, spec(model_dir), CFG)
    assert pointer.read_bytes() == b"\xff\xff\xff"  # left as it is: refused
    assert repair_current(out, reembed=True) is None  # a run naming its model: that one becomes current
    assert not pointer.exists() and len(list(out.glob(f"{CURRENT_FILE}.damaged-*"))) == 2
    assert embed_shards(inp, out, spec(model_dir, version="2"), CFG).current
    assert read_current(out)["dir"] == "v2"


# -- what counts as a changed shard ---------------------------------------------------------------------


BARE = EmbedConfig(batch_size=128, num_actors=1, progress=False)


def _same_size_shard(uri, ids, X):
    """A shard whose size depends on its row count only (no compression, dictionary or statistics)."""
    from pipeline import storage

    X = np.asarray(X, dtype=np.float32)
    table = pa.table({"id": pa.array(ids, type=pa.int64()),
                      "vector": pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), X.shape[1])})
    fs, path = storage.resolve(uri)
    with fs.open_output_stream(path) as f:
        pq.write_table(table, f, compression="none", use_dictionary=False, write_statistics=False)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_shard_rewritten_with_the_same_size_and_mtime_is_embedded_again(ray_local, model_dir, tmp_path, where,
                                                                         request):
    from pipeline import storage

    inp = str(tmp_path / "in") if where == "local" else request.getfixturevalue("s3").bucket() + "/in"
    out = tmp_path / "out"
    uri = f"{inp}/a.parquet"
    if where == "local":
        os.makedirs(inp)
    ids, X, _ = shard_data(0, 40, 0)
    _same_size_shard(uri, ids, X)
    fs, path = storage.resolve(uri)
    first = fs.get_file_info(path)
    assert embed_shards(inp, out, spec(model_dir), BARE).shards_written == 1
    (line,) = Ledger.load(out / "v1").entries.values()
    assert line["etag"].startswith("ino:" if where == "local" else "etag:")

    _, X2, _ = shard_data(9, 40, 0)
    _same_size_shard(uri, ids, X2)
    assert fs.get_file_info(path).size == first.size
    if where == "local":
        os.utime(path, ns=(first.mtime_ns, first.mtime_ns))  # as `cp -p` or `rsync -t` leave it
    else:
        # An object's mtime has whole seconds and the run took longer: the line gets the rewrite's
        # mtime, as a rewrite within the second of the first write would have left it.
        ledger = out / "v1" / LEDGER_FILE
        line["mtime_ns"] = fs.get_file_info(path).mtime_ns
        ledger.write_text(json.dumps(line) + "\n")
    assert Ledger.load(out / "v1").entries[line["uri"]]["mtime_ns"] == fs.get_file_info(path).mtime_ns
    rerun = embed_shards(inp, out, spec(model_dir), BARE)
    assert (rerun.shards_written, rerun.shards_skipped) == (1, 0)
    est = ParametricTSNE.load(model_dir, device="cpu")
    np.testing.assert_allclose(embeddings(load_output(out)), est.transform(X2), rtol=1e-5, atol=1e-5)
    assert embed_shards(inp, out, spec(model_dir), BARE).shards_skipped == 1  # unchanged since: done
