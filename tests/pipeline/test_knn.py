"""Distributed kNN: whole and sharded indexes, and IVF recall on real data."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import schema
from pipeline.knn import FeaturePart, distributed_knn, merge_topk, plan_index_shards, search_index_shards
from pipeline.storage import resolve
from ptsne.knn import KNNGraph, build_index, exact_neighbors, knn_graph, recall_at_k
from tests.conftest import gaussian_blobs


def write_parts(directory, X, rows_per_part):
    directory.mkdir(parents=True, exist_ok=True)
    parts = []
    for i, start in enumerate(range(0, len(X), rows_per_part)):
        stop = min(len(X), start + rows_per_part)
        path = str(directory / schema.part_name(i))
        t = schema.features_table(np.arange(start, stop), pa.array(np.arange(start, stop)), X[start:stop])
        pq.write_table(t, path)
        parts.append(FeaturePart(path, start, stop - start))
    return parts


def test_plan_groups_parts_by_size():
    parts = [FeaturePart(f"p{i}", 10 * i, 10) for i in range(5)]
    assert len(plan_index_shards(parts, dim=4, max_index_bytes=10**9)) == 1
    shards = plan_index_shards(parts, dim=4, max_index_bytes=2 * 10 * 4 * 4)
    assert [s.rows for s in shards] == [20, 20, 10]
    assert [s.start for s in shards] == [0, 20, 40]
    # A shard holds at least min_rows rows (k + 1), and a short last one joins the previous.
    assert [s.rows for s in plan_index_shards(parts, dim=4, max_index_bytes=10 * 4 * 4, min_rows=16)] == [20, 30]


def test_sharded_search_merges_to_the_exact_graph(blobs):
    X, _ = blobs
    k = 15
    ref = knn_graph(X, n_neighbors=k, method="exact")
    bounds = [0, 100, 350, len(X)]
    indexes = [(lo, build_index(X[lo:hi], "exact", "cpu")) for lo, hi in zip(bounds[:-1], bounds[1:])]
    rows = np.arange(len(X))
    got = search_index_shards(indexes, X, rows, k)
    np.testing.assert_array_equal(got.indices, ref.indices)
    np.testing.assert_allclose(got.distances, ref.distances, rtol=1e-5, atol=1e-5)


def test_merge_topk_breaks_distance_ties_by_id():
    a = KNNGraph(np.array([[5, 9]]), np.array([[1.0, 2.0]], dtype=np.float32))
    b = KNNGraph(np.array([[3, 4]]), np.array([[1.0, 3.0]], dtype=np.float32))
    m = merge_topk([a, b], 3)
    assert m.indices.tolist() == [[3, 5, 9]]


def test_distributed_exact_graph_equals_single_process(ray_local, tmp_path):
    X, _ = gaussian_blobs(500, 6, 4, seed=3)
    parts = write_parts(tmp_path / "f", X, 200)
    fs, _ = resolve(str(tmp_path))
    for max_bytes in (10**9, 200 * 6 * 4):
        graph, infos = distributed_knn(fs, parts, 6, 20, method="exact", max_index_bytes=max_bytes)
        ref = knn_graph(X, n_neighbors=20, method="exact")
        np.testing.assert_array_equal(graph.indices, ref.indices)
        assert len(infos) == (1 if max_bytes > 10**6 else 3)


def _ivf_recall(ray_local, tmp_path, X, k, rows_per_part):
    parts = write_parts(tmp_path / "f", X, rows_per_part)
    fs, _ = resolve(str(tmp_path))
    graph, infos = distributed_knn(fs, parts, X.shape[1], k, method="ivf", target_recall=0.95)
    exact = exact_neighbors(X, X, k, np.arange(len(X)))
    return recall_at_k(exact, graph.indices), infos


def test_ivf_recall_on_digits(ray_local, tmp_path, digits):
    X, _ = digits
    recall, infos = _ivf_recall(ray_local, tmp_path, X, 30, 600)
    assert infos[0]["method"] == "ivf" and infos[0]["nprobe"] >= 1
    assert recall >= 0.95, f"measured recall@30 over all 1797 digits is {recall:.4f}"


def test_ivf_recall_on_mnist(ray_local, tmp_path, mnist_small):
    X, _ = mnist_small
    recall, infos = _ivf_recall(ray_local, tmp_path, X, 30, 2500)
    assert recall >= 0.95, f"measured recall@30 over 5000 MNIST images is {recall:.4f}"
    # The sampled estimate recorded in the manifest is close to the measured recall.
    assert abs(infos[0]["recall"] - recall) < 0.03


def test_rows_with_too_few_ivf_hits_are_searched_again(rng):
    # 100 tight clusters of 20 points: one probed cell holds fewer than k=30 points.
    X = np.concatenate([rng.normal(size=(20, 4)) + 10 * i for i in range(100)]).astype(np.float32)
    from ptsne.knn import set_nprobe

    index = build_index(X, "ivf", "cpu")
    set_nprobe(index, 1)
    g = search_index_shards([(0, index)], X, np.arange(len(X)), 30)
    assert (g.indices >= 0).all() and (g.indices != np.arange(len(X))[:, None]).all()


def test_rows_short_after_the_gpu_cap_of_cells_are_searched_over_all_cells_without_a_host_copy(monkeypatch, rng):
    # A faked GPU that probes at most 32 of 64 cells. Only the two end clusters of a row of
    # 64 are indexed, so a point probing its 32 nearest cells finds its own 20 points, not k + 1 = 31.
    import faiss

    import ptsne.knn as knn

    centers = np.zeros((64, 4), np.float32)
    centers[:, 0] = 10 * np.arange(64)
    train = (centers.repeat(40, axis=0) + rng.normal(size=(64 * 40, 4))).astype(np.float32)
    X = np.concatenate([centers[0] + rng.normal(size=(20, 4)), centers[63] + rng.normal(size=(20, 4))])
    X = X.astype(np.float32)
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(4), 4, 64)
    index.train(train)
    index.add(X)
    copies = []

    def to_cpu(gpu_index):
        copies.append(gpu_index)
        return faiss.clone_index(gpu_index)

    monkeypatch.setattr(knn, "is_gpu_index", lambda index: True)
    monkeypatch.setattr(knn, "GPU_MAX_SELECTION_K", 32)
    monkeypatch.setattr(faiss, "index_gpu_to_cpu", to_cpu, raising=False)
    knn.set_nprobe(index, 1)
    g = search_index_shards([(0, index)], X, np.arange(len(X)), 30)
    assert copies == []  # all 64 cells searched in blocks of 32 on the index itself, never copied to the host
    np.testing.assert_array_equal(g.indices, exact_neighbors(X, X, 30, np.arange(len(X))))
    assert faiss.extract_index_ivf(index).nprobe == 1  # the index keeps its own nprobe


def test_a_gpu_knn_task_without_a_gpu_search_raises_instead_of_searching_on_cpu(monkeypatch, rng):
    import pipeline.knn as pknn

    X = rng.normal(size=(2000, 4)).astype(np.float32)
    flat_blob, flat_info = pknn.build_index_blob(X[:100], "exact", 5, 0.9, 0)
    ivf_blob, ivf_info = pknn.build_index_blob(X, "ivf", 5, 0.9, 0)
    monkeypatch.setattr(pknn, "gpu_backend", lambda: None)
    with pytest.raises(RuntimeError, match="given a GPU but FAISS here sees none"):
        pknn.load_index(flat_blob, flat_info, use_gpu=True)
    assert pknn.index_device(pknn.load_index(flat_blob, flat_info, use_gpu=False)) == "cpu"
    monkeypatch.setattr(pknn, "gpu_backend", lambda: "torch")  # CUDA torch beside a CPU build of FAISS
    with pytest.raises(RuntimeError, match="torch searches flat indexes only"):
        pknn.load_index(ivf_blob, ivf_info, use_gpu=True)


def test_a_flat_index_goes_to_torch_beside_a_cpu_build_of_faiss(monkeypatch, rng):
    import pipeline.knn as pknn
    from ptsne.flat import TorchFlatIndex

    X = rng.normal(size=(300, 6)).astype(np.float32)
    blob, info = pknn.build_index_blob(X, "exact", 8, 0.9, 0)
    monkeypatch.setattr(pknn, "gpu_backend", lambda: "torch")
    monkeypatch.setattr(pknn, "TorchFlatIndex", lambda d, device: TorchFlatIndex(d, "cpu"))  # no GPU here
    index = pknn.load_index(blob, info, use_gpu=True)
    assert isinstance(index, TorchFlatIndex) and index.ntotal == 300
    rows = np.arange(300)
    g = search_index_shards([(0, index)], X, rows, 8)
    np.testing.assert_array_equal(g.indices, exact_neighbors(X, X, 8, rows))


def test_nprobe_is_capped_before_the_index_goes_to_a_gpu(monkeypatch, rng):
    # GpuIndexIVF::copyFrom refuses an nprobe above 2048: the CPU index carries the capped value to the copy.
    import faiss

    import pipeline.knn as pknn

    assert pknn.gpu_nprobe(4096, 4096) == pknn.gpu_nprobe(4096, None) == 2048
    assert pknn.gpu_nprobe(300, 100) == 100 and pknn.gpu_nprobe(7, 4096) == 7
    X = rng.normal(size=(2000, 4)).astype(np.float32)
    blob, info = pknn.build_index_blob(X, "ivf", 5, 0.9, 0)
    nlist = pknn.ivf_nlist(faiss.deserialize_index(blob))
    copied = []
    monkeypatch.setattr(pknn, "gpu_backend", lambda: "faiss")
    monkeypatch.setattr(pknn, "GPU_MAX_SELECTION_K", 8)
    monkeypatch.setattr(pknn, "to_gpu", lambda index, device: copied.append(faiss.extract_index_ivf(index).nprobe))
    pknn.load_index(blob, {**info, "nprobe": nlist}, use_gpu=True)
    assert copied == [8]
    cpu = pknn.load_index(blob, {**info, "nprobe": nlist}, use_gpu=False)
    assert faiss.extract_index_ivf(cpu).nprobe == nlist  # a CPU search keeps the tuned value


def test_gpu_tasks_end_their_worker_cpu_tasks_keep_it():
    from pipeline.knn import gpu_task_options

    assert gpu_task_options({"num_cpus": 2, "num_gpus": 0.25}) == {"num_cpus": 2, "num_gpus": 0.25, "max_calls": 1}
    assert gpu_task_options({"num_gpus": 1, "max_retries": 3})["max_calls"] == 1
    assert gpu_task_options({"num_cpus": 2}) == {"num_cpus": 2}
    assert gpu_task_options({"num_cpus": 1, "num_gpus": 0}) == {"num_cpus": 1, "num_gpus": 0}


def test_gpu_share_fits_that_many_tasks_on_one_gpu():
    from pipeline.knn import gpu_share

    assert gpu_share(1) == 1.0 and gpu_share(4) == 0.25 and gpu_share(3) == 0.3333
    assert all(n * gpu_share(n) <= 1.0 for n in range(1, 40))
    with pytest.raises(ValueError, match="per_gpu must be an integer >= 1, got 0"):
        gpu_share(0)


def test_method_for_a_gpu_search_reaches_further():
    from pipeline.knn import method_for

    assert method_for("auto", 1_000_000) == "ivf"
    assert method_for("auto", 1_000_000, use_gpu=True) == "exact"


def test_index_shards_are_loaded_and_searched_one_at_a_time(ray_local, tmp_path, monkeypatch):
    import weakref

    import pipeline.knn as pknn

    X, _ = gaussian_blobs(300, 6, 3, seed=4)
    parts = write_parts(tmp_path / "f", X, 60)
    fs, _ = resolve(str(tmp_path))
    shards = plan_index_shards(parts, 6, max_index_bytes=60 * 6 * 4, min_rows=11)
    assert len(shards) == 5
    refs = []
    for s in shards:
        blob, info = pknn.build_index_blob(pknn.read_vectors(fs, list(s.parts)), "exact", 10, 0.9, 0)
        refs.append((s.start, [ray_local.put(blob)], info))
    live, most = [], []
    load = pknn.load_index

    def counting_load(blob, info, use_gpu):
        most.append(sum(r() is not None for r in live) + 1)  # indexes resident while this one loads
        index = load(blob, info, use_gpu)
        live.append(weakref.ref(index))
        return index

    monkeypatch.setattr(pknn, "load_index", counting_load)
    g = pknn.search_part(fs, parts[2], refs, 10, use_gpu=False)
    assert max(most) == 1, "a shard's index was still resident when the next was loaded"
    rows = np.arange(parts[2].start, parts[2].stop)
    np.testing.assert_array_equal(g.indices, exact_neighbors(X, X[rows], 10, rows))


@pytest.mark.gpu
def test_gpu_search_tasks_share_a_gpu_and_match_the_exact_graph(ray_local, tmp_path):
    from ptsne.device import faiss_gpu_count

    if faiss_gpu_count() == 0 or ray_local.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("needs FAISS GPU and a GPU in Ray")
    X, _ = gaussian_blobs(2000, 16, 4, seed=5)
    parts = write_parts(tmp_path / "f", X, 250)
    fs, _ = resolve(str(tmp_path))
    g, _ = distributed_knn(fs, parts, 16, 20, method="exact", use_gpu=True, searches_per_gpu=4)
    ref = knn_graph(X, n_neighbors=20, method="exact", device="cpu")
    assert (g.indices == ref.indices).mean() > 0.999


def test_the_test_ray_has_no_gpu_unless_asked(ray_local):
    # On a CUDA host too the default suite searches on CPU, where its exact equalities hold.
    import os

    from tests.conftest import RAY_GPUS_ENV

    assert ray_local.cluster_resources().get("GPU", 0) == int(os.environ.get(RAY_GPUS_ENV, "0"))
