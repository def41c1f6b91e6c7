"""Distributed affinities on a real local Ray against the single-process ptsne result."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import schema
from pipeline.affinity import (
    AffinityJobConfig,
    KnnTaskPlan,
    build_affinities,
    config_hash,
    load_edges,
    load_features,
    load_pca_of,
    max_concurrent,
    plan_knn_tasks,
    read_manifest,
)
from pipeline import storage
from pipeline.shards import InvalidInputError
from pipeline.storage import resolve
from ptsne.affinity import joint_probabilities
from ptsne.knn import knn_graph
from tests.conftest import gaussian_blobs

PERPLEXITY = 8.0


def write_shards(directory: Path, X, y=None, ids=None, sizes=(150, 0, 130, 120), vector="fixed"):
    """Write X (and labels, ids) as shards of the given sizes (0: an empty shard)."""
    directory.mkdir(parents=True, exist_ok=True)
    start = 0
    for i, size in enumerate(sizes):
        stop = start + size
        block = X[start:stop]
        if vector == "fixed":
            col = schema.vectors_to_arrow(block)
        else:
            col = pa.array([list(map(float, r)) for r in block], type=pa.list_(pa.float64()))
        cols = {"vec": col}
        if y is not None:
            cols["y"] = pa.array(y[start:stop])
        if ids is not None:
            cols["key"] = pa.array(ids[start:stop])
        pq.write_table(pa.table(cols), directory / f"shard-{i:03d}.parquet")
        start = stop
    return directory


def reference_edges(X, k, perplexity=PERPLEXITY):
    return joint_probabilities(knn_graph(X, n_neighbors=k, method="exact"), perplexity)


def assert_same_edges(output, ref, atol=1e-6):
    head, tail, weight = load_edges(str(output))
    np.testing.assert_array_equal(head, ref.head)
    np.testing.assert_array_equal(tail, ref.tail)
    np.testing.assert_allclose(weight, ref.weight, rtol=0, atol=atol)


def assert_contract(output):
    """The affinity-directory contract, checked on disk."""
    m = read_manifest(str(output))
    for key in ("format_version", "n", "input_dim", "dim", "k", "perplexities", "knn_method", "knn_recall",
                "n_edges", "vector_col", "id_col", "label_col", "pca", "config_hash", "files"):
        assert key in m, key
    rows = 0
    for f in m["files"]["features"]:
        t = pq.read_table(Path(output) / f["path"])
        assert t.num_rows == f["rows"]
        assert t.schema.field("row").type == pa.int64()
        assert t.schema.field("vector").type == schema.vector_type(m["dim"])
        np.testing.assert_array_equal(t.column("row").to_numpy(), np.arange(rows, rows + t.num_rows))
        rows += t.num_rows
    assert rows == m["n"]
    prev_stop = 0
    total = 0.0
    assert m["format_version"] == schema.FORMAT_VERSION and m["edge_buckets"] == schema.EDGE_BUCKETS
    for f in m["files"]["edges"]:
        pf = pq.ParquetFile(Path(output) / f["path"])
        t = pf.read()
        assert t.schema == schema.EDGES_SCHEMA
        h, tl = t.column("head").to_numpy(), t.column("tail").to_numpy()
        assert h.min() >= prev_stop and h.max() < f["head_stop"]
        prev_stop = f["head_stop"]
        # One row group per head bucket, sorted by (bucket, head, tail), without duplicates.
        assert [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)] == \
            [rows for _, rows in f["row_groups"]]
        bucket = np.repeat([b for b, _ in f["row_groups"]], [rows for _, rows in f["row_groups"]])
        np.testing.assert_array_equal(bucket, schema.bucket_of(h, m["edge_buckets"]))
        key = (bucket * m["n"] + h) * m["n"] + tl
        assert np.all(np.diff(key) > 0), "each part is sorted by (bucket, head, tail) without duplicates"
        assert not np.any(h == tl)
        total += float(t.column("weight").to_numpy().astype(np.float64).sum())
    assert abs(total - 1.0) < 1e-5
    assert not [p for p in os.listdir(output) if ".tmp-" in p]
    return m


@pytest.fixture(scope="module")
def data():
    X, y = gaussian_blobs(400, 8, 3, seed=1)
    return X, y


@pytest.fixture(scope="module")
def ref(data):
    X, _ = data
    return reference_edges(X, k=24)


def config(tmp_path, input_dir, name="out", **kw):
    kw.setdefault("perplexity", PERPLEXITY)
    kw.setdefault("n_neighbors", 24)
    kw.setdefault("knn_method", "exact")
    kw.setdefault("batch_rows", 100)
    kw.setdefault("edge_partitions", 3)
    return AffinityJobConfig(input=str(input_dir), output=str(tmp_path / name), vector_col="vec", **kw)


def test_exact_matches_single_process(ray_local, tmp_path, data, ref):
    X, y = data
    inp = write_shards(tmp_path / "in", X, y)
    m = build_affinities(config(tmp_path, inp, label_col="y"))
    assert_same_edges(tmp_path / "out", ref)
    m2 = assert_contract(tmp_path / "out")
    assert m == m2
    assert (m["n"], m["dim"], m["input_dim"], m["k"]) == (400, 8, 8, 24)
    assert m["knn_method"] == "exact" and m["knn_recall"] is None
    assert len(m["files"]["edges"]) == 3
    feats = load_features(str(tmp_path / "out"))
    np.testing.assert_array_equal(schema.arrow_to_vectors(feats.column("vector")), X)
    np.testing.assert_array_equal(feats.column("id").to_numpy(), np.arange(400))
    np.testing.assert_array_equal(feats.column("label").to_numpy(), y)
    assert m["timings_s"]["knn_affinities"] >= 0 and "symmetrize" in m["peak_worker_rss_mb"]


def test_rerun_with_same_config_is_skipped(ray_local, tmp_path, data):
    X, _ = data
    inp = write_shards(tmp_path / "in", X, sizes=(200, 200))
    cfg = config(tmp_path, inp)
    m1 = build_affinities(cfg)
    manifest = tmp_path / "out" / "manifest.json"
    before = manifest.stat().st_mtime_ns
    assert build_affinities(cfg) == m1
    assert manifest.stat().st_mtime_ns == before
    # Other settings on a non-empty output are refused unless overwrite is asked for.
    with pytest.raises(FileExistsError, match="not empty"):
        build_affinities(config(tmp_path, inp, perplexity=6.0))
    m3 = build_affinities(config(tmp_path, inp, perplexity=6.0, overwrite=True))
    assert m3["perplexities"] == [6.0] and m3["config_hash"] != m1["config_hash"]


def test_multiscale_list_columns_and_string_ids(ray_local, tmp_path, data):
    X, _ = data
    ids = np.array([f"pt-{i}" for i in range(400)])
    inp = write_shards(tmp_path / "in", X, ids=ids, vector="list")
    build_affinities(config(tmp_path, inp, perplexity=(5.0, 8.0), id_col="key"))
    assert_same_edges(tmp_path / "out", joint_probabilities(knn_graph(X, n_neighbors=24, method="exact"), [5.0, 8.0]))
    feats = load_features(str(tmp_path / "out"))
    assert feats.column("id").to_pylist() == ids.tolist()


def test_sharded_index_gives_the_same_graph(ray_local, tmp_path, data, ref):
    X, _ = data
    inp = write_shards(tmp_path / "in", X)
    # 100 rows x 8 dims x 4 bytes per part: an index shard of at most two parts.
    m = build_affinities(config(tmp_path, inp, max_index_bytes=100 * 8 * 4 * 2))
    assert m["knn_index_shards"] >= 2
    assert_same_edges(tmp_path / "out", ref)


def test_pca_is_fitted_on_the_sample_and_applied_per_shard(ray_local, tmp_path):
    X, _ = gaussian_blobs(300, 20, 3, seed=2)
    inp = write_shards(tmp_path / "in", X, sizes=(100, 100, 100))
    m = build_affinities(config(tmp_path, inp, pca_components=5))
    assert m["pca"] and m["dim"] == 5 and m["input_dim"] == 20
    pca = load_pca_of(str(tmp_path / "out"))
    Z = pca.transform(X)
    feats = load_features(str(tmp_path / "out"))
    np.testing.assert_allclose(schema.arrow_to_vectors(feats.column("vector")), Z, atol=1e-5)
    assert_same_edges(tmp_path / "out", reference_edges(Z, k=24))
    assert_contract(tmp_path / "out")


@pytest.mark.parametrize("mode", ["raise", "crash"])
def test_injected_task_failure_is_retried_with_identical_output(ray_local, tmp_path, data, mode):
    X, _ = data
    inp = write_shards(tmp_path / "in", X)
    clean = build_affinities(config(tmp_path, inp, name="clean"))
    marker = tmp_path / "failed-once"
    retried = build_affinities(config(tmp_path, inp, name="retried", inject_failure=str(marker),
                                      inject_failure_mode=mode))
    assert marker.read_text() == f"failed once ({mode})\n", "the failure was injected"
    assert clean["files"] == retried["files"]  # same paths, rows and sha256 checksums


def test_interrupted_run_leaves_no_output_and_resumes(ray_local, tmp_path, data, ref):
    import ray

    X, _ = data
    inp = write_shards(tmp_path / "in", X)
    marker = tmp_path / "failed-once"
    with pytest.raises(ray.exceptions.RayTaskError, match="injected failure"):
        build_affinities(config(tmp_path, inp, inject_failure=str(marker), max_retries=0))
    assert not (tmp_path / "out").exists()
    partial = [p for p in os.listdir(tmp_path) if p.startswith(".out.partial-")]
    assert len(partial) == 1 and (tmp_path / partial[0] / "_features.json").exists()
    build_affinities(config(tmp_path, inp))
    assert_same_edges(tmp_path / "out", ref)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out.partial-")]


def test_knn_task_plan_splits_search_and_calibration_on_a_gpu_only():
    assert plan_knn_tasks(False, 2) == KnnTaskPlan(split=False, search={"num_cpus": 2})
    # A GPU search's worker exits after it (max_calls=1): its CUDA context and FAISS resources go with it.
    assert plan_knn_tasks(True, 2) == KnnTaskPlan(
        split=True, search={"num_cpus": 2, "num_gpus": 0.25, "max_calls": 1}, calibrate={"num_cpus": 2})
    assert plan_knn_tasks(True, 1, 1).search == {"num_cpus": 1, "num_gpus": 1.0, "max_calls": 1}
    assert plan_knn_tasks(True, 1, 3).search["num_gpus"] == 0.3333
    with pytest.raises(ValueError, match="task_cpus must be an integer >= 1, got 0"):
        plan_knn_tasks(True, 0)


def test_knn_searches_on_the_gpus_of_a_cluster_with_faiss_gpu_or_torch_for_a_flat_index(caplog):
    from pipeline.affinity import knn_on_gpu

    assert knn_on_gpu("auto", 4, True, "ivf") and knn_on_gpu("auto", 1, True, "exact")
    assert knn_on_gpu("auto", 1, False, "exact")  # a CPU build of FAISS: torch searches the flat index
    assert knn_on_gpu("cuda", 1, False, "exact")
    assert not knn_on_gpu("cpu", 4, True, "exact")
    assert not knn_on_gpu("auto", 0, True, "exact") and not knn_on_gpu("auto", 0, False, "exact")
    with caplog.at_level("WARNING", logger="pipeline.affinity"):
        assert not knn_on_gpu("auto", 1, False, "ivf")  # torch has no IVF
    assert "IVF, which torch does not search" in caplog.text
    for gpus, faiss_gpu, method in ((0, True, "exact"), (1, False, "ivf")):
        with pytest.raises(ValueError, match="device='cuda' was asked for but the Ray cluster has"):
            knn_on_gpu("cuda", gpus, faiss_gpu, method)


def test_max_concurrent_counts_overlapping_intervals():
    assert max_concurrent([]) == 0
    assert max_concurrent([(0, 1), (1, 2)]) == 1  # one ends as the next starts
    assert max_concurrent([(0, 3), (1, 2), (1.5, 4), (3.5, 5)]) == 3


def test_split_search_and_calibration_give_the_same_edges(ray_local, tmp_path, data, ref, monkeypatch):
    # The GPU plan's two tasks, on the CPUs of the test cluster.
    import pipeline.affinity as paff

    X, _ = data
    inp = write_shards(tmp_path / "in", X)
    split = KnnTaskPlan(split=True, search={"num_cpus": 1}, calibrate={"num_cpus": 1})
    monkeypatch.setattr(paff, "plan_knn_tasks", lambda use_gpu, task_cpus, per_gpu: split)
    marker = tmp_path / "failed-once"
    build_affinities(config(tmp_path, inp, inject_failure=str(marker)))
    assert marker.exists(), "the search task failed once and was retried"
    assert_same_edges(tmp_path / "out", ref)
    assert_contract(tmp_path / "out")


def test_knn_searches_per_gpu_is_validated_and_leaves_the_config_hash_alone():
    base = dict(input="in", output="out")
    with pytest.raises(ValueError, match="AffinityJobConfig: knn_searches_per_gpu must be an integer >= 1, got 0"):
        AffinityJobConfig(**base, knn_searches_per_gpu=0)
    assert AffinityJobConfig(**base).knn_searches_per_gpu == 4
    assert "knn_searches_per_gpu" not in AffinityJobConfig(**base).hash_fields()
    assert config_hash(AffinityJobConfig(**base), []) == config_hash(AffinityJobConfig(**base, knn_searches_per_gpu=2), [])


@pytest.mark.gpu
def test_gpu_tasks_match_the_exact_result(ray_local, tmp_path, data, ref):
    X, _ = data
    inp = write_shards(tmp_path / "in", X)
    build_affinities(config(tmp_path, inp, device="cuda"))
    assert_same_edges(tmp_path / "out", ref, atol=1e-5)


def test_rejected_nan_rows_leave_nothing_behind(ray_local, tmp_path, data):
    X, _ = data
    X = X.copy()
    X[[7, 210, 399]] = np.nan
    X[5, 2] = np.inf
    inp = write_shards(tmp_path / "in", X)
    with pytest.raises(InvalidInputError, match=r"4 rows have NaN, Inf.*first ids: 5, 7, 210, 399"):
        build_affinities(config(tmp_path, inp))
    assert sorted(os.listdir(tmp_path)) == ["in"]


def test_drop_invalid_writes_rejects(ray_local, tmp_path, data):
    X, _ = data
    X = X.copy()
    bad = [7, 210, 399]
    X[bad] = np.nan
    inp = write_shards(tmp_path / "in", X)
    m = build_affinities(config(tmp_path, inp, drop_invalid=True))
    assert m["n"] == 397 and m["n_rejected"] == 3 and m["n_input_rows"] == 400
    rejects = pq.read_table(tmp_path / "out" / m["rejects"])
    assert rejects.column("id").to_pylist() == bad
    keep = np.setdiff1d(np.arange(400), bad)
    feats = load_features(str(tmp_path / "out"))
    np.testing.assert_array_equal(feats.column("id").to_numpy(), keep)
    assert_same_edges(tmp_path / "out", reference_edges(X[keep], k=24))


@pytest.mark.parametrize(
    "case, message",
    [
        ("duplicate_ids", r"2 ids occur more than once.*first: 3, 9"),
        ("mixed_dims", r"mixes dimensions|different vector dimensions"),
        ("missing_column", r"missing column"),
        ("non_numeric", r"non-numeric"),
    ],
)
def test_invalid_inputs_are_rejected_before_any_work(ray_local, tmp_path, data, case, message):
    X, _ = data
    inp = tmp_path / "in"
    if case == "duplicate_ids":
        ids = np.arange(400)
        ids[100], ids[300] = 3, 9
        write_shards(inp, X, ids=ids)
        cfg = config(tmp_path, inp, id_col="key")
    elif case == "mixed_dims":
        write_shards(inp, X, sizes=(200, 200), vector="list")
        rows = [[1.0, 2.0]] * 5
        pq.write_table(pa.table({"vec": pa.array(rows)}), inp / "shard-999.parquet")
        cfg = config(tmp_path, inp)
    elif case == "missing_column":
        write_shards(inp, X, sizes=(400,))
        cfg = config(tmp_path, inp, label_col="no_such_column")
    else:
        inp.mkdir()
        pq.write_table(pa.table({"vec": pa.array([["a", "b"]] * 40)}), inp / "s.parquet")
        cfg = config(tmp_path, inp)
    with pytest.raises(InvalidInputError, match=message):
        build_affinities(cfg)
    assert sorted(os.listdir(tmp_path)) == ["in"]


def test_feature_columns_input(ray_local, tmp_path, data, ref):
    X, _ = data
    inp = tmp_path / "in"
    inp.mkdir()
    cols = {f"f{j}": X[:, j] for j in range(X.shape[1])}
    pq.write_table(pa.table(cols), inp / "table.parquet")
    m = build_affinities(AffinityJobConfig(
        input=str(inp), output=str(tmp_path / "out"), feature_cols=tuple(cols), perplexity=PERPLEXITY,
        n_neighbors=24, knn_method="exact", batch_rows=150))
    assert m["vector_col"] is None and m["feature_cols"] == list(cols)
    assert_same_edges(tmp_path / "out", ref)


def test_ivf_affinities_on_digits_record_their_recall(ray_local, tmp_path, digits):
    X, y = digits
    inp = write_shards(tmp_path / "in", X, y, sizes=(900, 897))
    m = build_affinities(config(tmp_path, inp, knn_method="ivf", n_neighbors=30, perplexity=10.0,
                                batch_rows=900, label_col="y"))
    assert m["knn_method"] == "ivf" and m["knn_nprobe"] >= 1
    assert m["knn_recall"] >= 0.95
    assert_contract(tmp_path / "out")


def test_config_is_validated():
    base = dict(input="in", output="out")
    with pytest.raises(ValueError, match="knn_method must be one of"):
        AffinityJobConfig(**base, knn_method="hnsw")
    with pytest.raises(ValueError, match="n_neighbors must be 'auto' or an integer >= 1, got 0"):
        AffinityJobConfig(**base, n_neighbors=0)
    with pytest.raises(ValueError, match="empty list"):
        AffinityJobConfig(**base, perplexity=[])
    with pytest.raises(ValueError, match="batch_rows must be an integer >= 1"):
        AffinityJobConfig(**base, batch_rows=0)
    with pytest.raises(ValueError, match="exactly one of vector_col and feature_cols"):
        AffinityJobConfig(**base, vector_col=None)
    with pytest.raises(TypeError, match="input must be a path"):
        AffinityJobConfig(input=3, output="out")
    cfg = AffinityJobConfig(**base, feature_cols=["a", "b"], perplexity=[10, 20])
    assert cfg.vector_col is None and cfg.feature_cols == ("a", "b") and cfg.perplexities == (10.0, 20.0)


def test_declared_settings_check_their_values():
    base = dict(input="in", output="out")
    for kw, message in [
        (dict(pca_components=0), "pca_components must be an integer >= 1 or None, got 0"),
        (dict(max_index_bytes=0), "max_index_bytes must be an integer >= 1 or None, got 0"),
        (dict(edge_partitions=True), "edge_partitions must be an integer >= 1 or None, got True"),
        (dict(target_recall=0.0), r"target_recall must be a finite number in \(0, 1\], got 0.0"),
        (dict(device="tpu"), r"device must be one of \('auto', 'cpu', 'cuda'\), got 'tpu'"),
        (dict(drop_invalid="yes"), "drop_invalid must be true or false, got 'yes'"),
        (dict(perplexity=0.5), "perplexity must be a finite number > 1 or a non-empty list of them, got 0.5"),
        (dict(max_retries=-1), "max_retries must be an integer >= 0, got -1"),
    ]:
        with pytest.raises(ValueError, match=f"^AffinityJobConfig: {message}$"):
            AffinityJobConfig(**base, **kw)


def test_user_settings_are_declared_and_the_others_plain_fields():
    from ptsne.settings import settings_of, spec

    plain = {"input", "output", "max_retries", "overwrite", "ray_address", "inject_failure", "inject_failure_mode"}
    declared = {f.name for f in settings_of(AffinityJobConfig)}
    assert declared.isdisjoint(plain) and declared | plain == set(AffinityJobConfig.__dataclass_fields__)
    assert all(spec(f)["help"] for f in settings_of(AffinityJobConfig))


def _old_hash_fields(vector_col="vector", feature_cols=None, id_col=None, label_col=None, perplexity=(30.0,),
                     n_neighbors="auto", pca_components=None, pca_samples=100_000, knn_method="auto",
                     target_recall=0.95, max_index_bytes=None, drop_invalid=False, seed=0):
    """The result-defining settings as affinity directories written so far hold them in their hash."""
    return dict(vector_col=None if feature_cols else vector_col, feature_cols=list(feature_cols) if feature_cols else None,
                id_col=id_col, label_col=label_col, perplexity=[float(p) for p in perplexity], n_neighbors=n_neighbors,
                pca_components=pca_components, pca_samples=pca_samples, knn_method=knn_method,
                target_recall=target_recall, max_index_bytes=max_index_bytes, drop_invalid=drop_invalid, seed=seed)


@pytest.mark.parametrize(
    "settings, old",
    [
        ({}, {}),
        (dict(perplexity=[10, 20], feature_cols=["a", "b"], id_col="id", label_col="y", n_neighbors=40,
              pca_components=5, pca_samples=900, knn_method="ivf", target_recall=0.9, max_index_bytes=1000,
              drop_invalid=True, seed=4, batch_rows=7, edge_partitions=3, device="cpu", task_cpus=2),
         dict(perplexity=(10, 20), feature_cols=("a", "b"), id_col="id", label_col="y", n_neighbors=40,
              pca_components=5, pca_samples=900, knn_method="ivf", target_recall=0.9, max_index_bytes=1000,
              drop_invalid=True, seed=4)),
        (dict(vector_col="vec", perplexity=[12.5]), dict(vector_col="vec", perplexity=(12.5,))),
    ],
)
def test_existing_affinity_directories_stay_current(settings, old):
    import hashlib

    from pipeline.affinity import config_hash

    config = AffinityJobConfig(input="in", output="out", **settings)
    assert config.hash_fields() == _old_hash_fields(**old)
    fingerprint = [["part-00000.parquet", 123, "etag"]]
    payload = {"format_version": schema.FORMAT_VERSION, "config": _old_hash_fields(**old), "input": fingerprint}
    want = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
    assert config_hash(config, fingerprint) == want


def test_settings_that_cannot_work_on_the_data_write_nothing(ray_local, tmp_path, data):
    X, _ = data
    inp = write_shards(tmp_path / "in", X)
    with pytest.raises(ValueError, match="pca_components=9 exceeds the input dimension 8"):
        build_affinities(config(tmp_path, inp, pca_components=9))
    with pytest.raises(ValueError, match="n_neighbors=400 needs at least 401"):
        build_affinities(config(tmp_path, inp, n_neighbors=400))
    with pytest.raises(ValueError, match="perplexity=30.0 cannot be reached with k=24"):
        build_affinities(config(tmp_path, inp, perplexity=30.0))
    import faiss
    import ray

    if ray.cluster_resources().get("GPU", 0) == 0 or not hasattr(faiss, "StandardGpuResources"):
        with pytest.raises(ValueError, match="device='cuda' was asked for"):
            build_affinities(config(tmp_path, inp, device="cuda"))
    assert sorted(os.listdir(tmp_path)) == ["in"]


def test_file_uri_input_and_output(ray_local, tmp_path, data, ref):
    X, _ = data
    inp = write_shards(tmp_path / "in", X)
    cfg = AffinityJobConfig(input=f"file://{inp}", output=f"file://{tmp_path / 'out'}", vector_col="vec",
                            perplexity=PERPLEXITY, n_neighbors=24, knn_method="exact")
    build_affinities(cfg)
    assert_same_edges(tmp_path / "out", ref)


def _upload(local_dir: Path, uri: str) -> str:
    """Copy a local directory's files to ``uri`` (an S3 prefix)."""
    import pyarrow.fs as pafs

    fs, path = resolve(uri)
    pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return uri


def _same_build(a: dict, b: dict) -> None:
    """Two manifests of one build: the same settings, the same files (paths, rows, bytes and sha256)."""
    where = {"input", "config_hash", "timings_s", "peak_worker_rss_mb", "created_at"}
    assert {k: v for k, v in a.items() if k not in where} == {k: v for k, v in b.items() if k not in where}


def test_affinities_on_s3_equal_the_local_build(ray_local, s3, tmp_path, data, ref):
    X, y = data
    local_in = write_shards(tmp_path / "in", X, y)
    bucket = s3.bucket()
    s3_in = _upload(local_in, f"{bucket}/data/in")
    local = build_affinities(config(tmp_path, local_in, label_col="y"))
    cfg = AffinityJobConfig(input=s3_in, output=f"{bucket}/work/affinities", vector_col="vec", label_col="y",
                            perplexity=PERPLEXITY, n_neighbors=24, knn_method="exact", batch_rows=100,
                            edge_partitions=3)
    remote = build_affinities(cfg)
    _same_build(local, remote)
    assert read_manifest(cfg.output) == remote
    assert_same_edges(cfg.output, ref)
    np.testing.assert_array_equal(load_edges(cfg.output)[2], load_edges(str(tmp_path / "out"))[2])
    feats = load_features(cfg.output)
    np.testing.assert_array_equal(feats.column("label").to_numpy(), y)
    keys = s3.keys(f"{bucket}/work")
    assert "work/affinities/manifest.json" in keys
    assert not [k for k in keys if ".tmp-" in k or ".partial-" in k], keys
    # Up to date: a second run returns the manifest without writing.
    assert build_affinities(cfg) == remote


def test_interrupted_build_on_s3_resumes_and_removes_only_its_partials(ray_local, s3, tmp_path, data, ref):
    import ray

    X, _ = data
    bucket = s3.bucket()
    s3_in = _upload(write_shards(tmp_path / "in", X), f"{bucket}/in")
    fs, _ = resolve(bucket)
    name = bucket[len("s3://"):]
    # A stale partial build of other settings (ours) and a neighbour's files (not ours).
    storage.write_bytes_atomic(fs, f"{name}/.out.partial-0123456789abcdef/_features.json", b"{}")
    storage.write_bytes_atomic(fs, f"{name}/.out.partial-kept.txt", b"a file, not a partial build")
    storage.write_bytes_atomic(fs, f"{name}/out-other/manifest.json", b"{}")
    kw = dict(input=s3_in, output=f"{bucket}/out", vector_col="vec", perplexity=PERPLEXITY, n_neighbors=24,
              knn_method="exact", batch_rows=100, edge_partitions=3)
    marker = tmp_path / "failed-once"
    with pytest.raises(ray.exceptions.RayTaskError, match="injected failure"):
        build_affinities(AffinityJobConfig(**kw, inject_failure=str(marker), max_retries=0))
    keys = s3.keys(bucket)
    assert not [k for k in keys if k.startswith("out/")], "nothing at the output before the build is whole"
    partial = {k.split("/")[0] for k in keys if k.startswith(".out.partial-") and k.endswith("/_features.json")}
    assert len(partial) == 2, keys  # the stale one and this run's
    build_affinities(AffinityJobConfig(**kw))
    assert_same_edges(f"{bucket}/out", ref)
    keys = s3.keys(bucket)
    assert [k for k in keys if k.startswith(".out.partial-")] == [".out.partial-kept.txt"], keys
    assert ".out.partial-kept.txt" in keys and "out-other/manifest.json" in keys
    assert "out/manifest.json" in keys and "out/_features.json" not in keys


def test_an_old_format_output_is_refused_unless_overwritten(ray_local, tmp_path, data):
    X, _ = data
    inp = write_shards(tmp_path / "in", X, sizes=(400,))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "manifest.json").write_text(json.dumps({"format_version": 1, "config_hash": "x"}))
    with pytest.raises(FileExistsError, match="format_version 1 .*pass overwrite"):
        build_affinities(config(tmp_path, inp))
    m = build_affinities(config(tmp_path, inp, overwrite=True))
    assert read_manifest(str(tmp_path / "out"))["format_version"] == m["format_version"] == schema.FORMAT_VERSION


def test_output_at_a_bucket_root_is_refused(ray_local, s3, tmp_path, data):
    X, _ = data
    inp = write_shards(tmp_path / "in", X, sizes=(400,))
    with pytest.raises(ValueError, match="root of its filesystem or bucket"):
        build_affinities(AffinityJobConfig(input=str(inp), output=s3.bucket(), vector_col="vec",
                                           perplexity=PERPLEXITY, n_neighbors=24))


@pytest.fixture
def two_node_cluster(ray_local):
    """A 2-node Ray cluster on this machine (1 CPU each); the session's Ray is restored after."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)


def test_two_node_cluster_gives_the_same_result(two_node_cluster, tmp_path, data, ref):
    import ray

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    X, _ = data
    inp = write_shards(tmp_path / "in", X)
    m = build_affinities(config(tmp_path, inp))
    assert_same_edges(tmp_path / "out", ref)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["config_hash"] == m["config_hash"]
