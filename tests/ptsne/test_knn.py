import numpy as np
import pytest

from ptsne.knn import KNNConfig, build_index, knn_graph, recall_at_k, search, tune_nprobe


def brute_force(X, k):
    d = ((X[:, None, :].astype(np.float64) - X[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return idx, np.sqrt(np.take_along_axis(d, idx, axis=1))


def test_exact_matches_brute_force(rng):
    X = rng.normal(size=(300, 8)).astype(np.float32)
    g = knn_graph(X, n_neighbors=10, method="exact")
    idx, dist = brute_force(X, 10)
    assert g.indices.dtype == np.int64 and g.distances.dtype == np.float32
    assert g.indices.shape == (300, 10)
    np.testing.assert_array_equal(g.indices, idx)
    np.testing.assert_allclose(g.distances, dist, rtol=1e-4, atol=1e-4)


def test_self_excluded_with_duplicates(rng):
    X = rng.normal(size=(50, 4)).astype(np.float32)
    X = np.concatenate([X, X, X])  # every point has two exact duplicates
    g = knn_graph(X, n_neighbors=5, method="exact")
    assert not (g.indices == np.arange(len(X))[:, None]).any()
    # The two duplicates are the nearest neighbours, at distance 0.
    np.testing.assert_allclose(g.distances[:, :2], 0.0, atol=1e-3)
    assert (np.diff(g.distances, axis=1) >= -1e-5).all()


def test_ivf_reaches_target_recall(mnist_small):
    from ptsne.pca import PCA

    X = PCA(30).fit(mnist_small[0]).transform(mnist_small[0])
    index = build_index(X, "ivf", "cpu", seed=0)
    nprobe, recall = tune_nprobe(index, X, 15, target_recall=0.95)
    approx = search(index, X, 15, query_ids=np.arange(len(X)), fallback_data=X)
    exact = knn_graph(X, n_neighbors=15, method="exact")
    measured = recall_at_k(exact.indices, approx.indices)
    assert measured >= 0.95
    assert nprobe >= 1 and recall >= 0.95
    assert (approx.indices >= 0).all()
    assert not (approx.indices == np.arange(len(X))[:, None]).any()


def test_recall_at_k_counts_overlap():
    true = np.array([[1, 2, 3], [4, 5, 6]])
    approx = np.array([[3, 2, 9], [7, 8, 9]])
    assert recall_at_k(true, approx) == pytest.approx(2 / 6)


def test_recall_at_k_equals_the_elementwise_count_with_missing_neighbours():
    rng = np.random.default_rng(0)
    true = np.stack([rng.choice(50, 8, replace=False) for _ in range(200)])
    approx = np.stack([rng.choice(50, 8, replace=False) for _ in range(200)])
    approx[rng.random(approx.shape) < 0.2] = -1  # an IVF search that found fewer than k
    elementwise = (true[:, :, None] == approx[:, None, :]).any(axis=2).mean()
    assert recall_at_k(true, approx) == pytest.approx(elementwise, abs=1e-12)
    with pytest.raises(ValueError, match="same non-empty"):
        recall_at_k(true, approx[:, :4])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_neighbors": 0}, r"^KNNConfig: n_neighbors must be an integer >= 1, got 0$"),
        ({"n_neighbors": 2.5}, r"^KNNConfig: n_neighbors must be an integer >= 1, got 2.5$"),
        ({"method": "hnsw"}, r"^KNNConfig: method must be one of \('auto', 'exact', 'ivf'\), got 'hnsw'$"),
        ({"target_recall": 1.5}, r"^KNNConfig: target_recall must be a finite number in \(0, 1\], got 1.5$"),
        ({"target_recall": 0.0}, r"^KNNConfig: target_recall must be a finite number in \(0, 1\], got 0.0$"),
        ({"device": "tpu"}, r"^KNNConfig: device must be one of \('auto', 'cpu', 'cuda'\), got 'tpu'$"),
        ({"n_threads": 0}, r"^KNNConfig: n_threads must be an integer >= 1 or None, got 0$"),
        ({"seed": 1.5}, r"^KNNConfig: seed must be an integer, got 1.5$"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KNNConfig(**kwargs)


def test_too_few_points():
    with pytest.raises(ValueError, match="n_neighbors=10 needs at least n_neighbors \\+ 1 points, got n=5"):
        knn_graph(np.zeros((5, 2), np.float32), n_neighbors=10)


def test_config_names_its_settings_like_the_rest_of_the_project():
    config = KNNConfig(n_neighbors=7, seed=3, n_threads=None)
    assert (config.n_neighbors, config.seed, config.n_threads) == (7, 3, None)
    with pytest.raises(TypeError):
        KNNConfig(k=7)
    with pytest.raises(TypeError):
        KNNConfig(random_state=3)


def test_the_seed_seeds_the_index_and_the_recall_probe(monkeypatch, rng):
    import ptsne.knn as knn

    seen = {}
    real_build, real_tune = knn.build_index, knn.tune_nprobe

    def build_index(data, method, device, seed):
        seen["index"] = seed
        return real_build(data, method, device, seed)

    def tune_nprobe(index, X, k, target_recall, seed):
        seen["probe"] = seed
        return real_tune(index, X, k, target_recall, seed)

    monkeypatch.setattr(knn, "build_index", build_index)
    monkeypatch.setattr(knn, "tune_nprobe", tune_nprobe)
    X = rng.normal(size=(400, 4)).astype(np.float32)
    g = knn_graph(X, KNNConfig(n_neighbors=5, method="ivf", device="cpu", seed=7))
    assert g.k == 5 and seen == {"index": 7, "probe": 7}


# -- GPU limits and fallbacks, against a faked FAISS GPU -------------------------------------


def test_gpu_k_above_the_selection_limit_is_refused_before_any_work(monkeypatch, rng):
    import ptsne.knn as knn

    def no_index(*args, **kwargs):
        raise AssertionError("an index was built before k was checked")

    monkeypatch.setattr(knn, "faiss_gpu_count", lambda: 1)
    monkeypatch.setattr(knn, "build_index", no_index)
    X = rng.normal(size=(knn.GPU_MAX_SELECTION_K + 10, 2)).astype(np.float32)
    with pytest.raises(ValueError, match=r"k=2048 needs 2049 candidates .* at most 2048 .*perplexity below 682\.7"):
        knn_graph(X, n_neighbors=knn.GPU_MAX_SELECTION_K, device="cuda")
    knn.check_gpu_k(knn.GPU_MAX_SELECTION_K - 1)  # k + 1 = 2048 fits
    knn.check_gpu_k(knn.GPU_MAX_SELECTION_K, extra=0)


def test_auto_searches_on_cpu_when_k_does_not_fit_the_gpu(monkeypatch, caplog):
    import ptsne.knn as knn

    monkeypatch.setattr(knn, "faiss_gpu_count", lambda: 1)
    assert knn.resolve_knn_device("auto", knn.GPU_MAX_SELECTION_K - 1) == "cuda"
    with caplog.at_level("WARNING", logger="ptsne.knn"):
        assert knn.resolve_knn_device("auto", knn.GPU_MAX_SELECTION_K) == "cpu"
    assert "searching on CPU" in caplog.text
    assert knn.resolve_knn_device("cpu", 10) == "cpu"


def test_the_gpu_search_is_faiss_where_it_is_a_gpu_build_else_torch():
    from ptsne.knn import search_backend

    assert search_backend(1, True) == search_backend(2, False) == "faiss"
    assert search_backend(0, True) == "torch"
    assert search_backend(0, False) is None


def test_cuda_torch_beside_cpu_faiss_searches_exactly_in_torch(monkeypatch, caplog, rng):
    # CUDA torch with the CPU build of FAISS: "auto" and "cuda" search on the GPU in torch (here
    # its tensors are placed on CPU), with no selection limit of FAISS GPU; IVF stays on CPU.
    import faiss
    import torch

    import ptsne.knn as knn
    from ptsne.flat import TorchFlatIndex

    monkeypatch.setattr(knn, "faiss_gpu_count", lambda: 0)
    monkeypatch.setattr(knn.torch.cuda, "is_available", lambda: True)
    assert knn.resolve_knn_device("auto", knn.GPU_MAX_SELECTION_K + 5) == "cuda"
    assert knn.resolve_knn_device("cuda", knn.GPU_MAX_SELECTION_K + 5) == "cuda"
    placed = []
    monkeypatch.setattr(knn, "torch_search_device", lambda device: placed.append(device) or torch.device("cpu"))
    X = rng.normal(size=(200, 4)).astype(np.float32)
    assert isinstance(build_index(X, "exact", "cuda:1"), TorchFlatIndex) and placed == ["cuda:1"]
    for device in ("auto", "cuda"):
        g = knn_graph(X, n_neighbors=10, method="exact", device=device)
        np.testing.assert_array_equal(g.indices, brute_force(X, 10)[0])
    # The exact reference of the IVF recall probe, on the device of a GPU index.
    np.testing.assert_array_equal(knn.exact_neighbors(X, X[:5], 4, np.arange(5), device="cuda"),
                                  brute_force(X, 4)[0][:5])
    assert knn.index_device(TorchFlatIndex(4, "cpu")) == knn.index_device(faiss.IndexFlatL2(4)) == "cpu"
    with caplog.at_level("WARNING", logger="ptsne.knn"):
        ivf = build_index(X, "ivf", "cuda")
    assert not isinstance(ivf, TorchFlatIndex) and "built and searched on CPU" in caplog.text


def test_cuda_without_a_gpu_is_refused(monkeypatch):
    import ptsne.knn as knn

    monkeypatch.setattr(knn, "faiss_gpu_count", lambda: 0)
    monkeypatch.setattr(knn.torch.cuda, "is_available", lambda: False)
    assert knn.resolve_knn_device("auto", 10) == "cpu"
    with pytest.raises(ValueError, match="device='cuda' was asked for but neither FAISS nor torch sees a GPU"):
        knn.resolve_knn_device("cuda", 10)


@pytest.mark.parametrize("cells_per_call", [3, 7, 1000])
def test_search_over_all_cells_in_blocks_is_exact(rng, cells_per_call):
    # A FAISS GPU index probes at most 2048 cells a search: all cells are searched in blocks instead.
    from ptsne.knn import exact_neighbors, ivf_nlist, search_all_cells

    X = rng.normal(size=(800, 6)).astype(np.float32)
    index = build_index(X, "ivf", "cpu", seed=0)
    assert ivf_nlist(index) == 20
    q = np.arange(0, 800, 7)
    g = search_all_cells(index, X[q], 9, q, cells_per_call=cells_per_call)
    np.testing.assert_array_equal(g.indices, exact_neighbors(X, X[q], 9, q))
    np.testing.assert_allclose(g.distances, brute_force(X, 9)[1][q], rtol=1e-4, atol=1e-4)
    assert faiss_nprobe(index) == 1  # the index's own nprobe is left as it was


def test_nprobe_is_capped_on_a_gpu_index(monkeypatch, caplog, rng):
    # A faked GPU with a selection limit of 8: every nprobe set on its index stops there.
    import ptsne.knn as knn

    X = rng.normal(size=(2000, 8)).astype(np.float32)
    index = build_index(X, "ivf", "cpu", seed=0)
    nlist = knn.ivf_nlist(index)
    assert nlist > 8 and knn.max_nprobe(index) == nlist
    monkeypatch.setattr(knn, "is_gpu_index", lambda index: True)
    monkeypatch.setattr(knn, "index_device", lambda index: "cpu")  # the recall probe's exact reference: no GPU here
    monkeypatch.setattr(knn, "GPU_MAX_SELECTION_K", 8)
    assert knn.max_nprobe(index) == 8
    with caplog.at_level("WARNING", logger="ptsne.knn"):
        assert knn.set_nprobe(index, nlist) == 8
    assert "nprobe=%d capped at 8" % nlist in caplog.text
    assert faiss_nprobe(index) == 8
    nprobe, _ = tune_nprobe(index, X, 5, target_recall=1.0)  # unreachable: the loop stops at the cap
    assert nprobe == 8 and faiss_nprobe(index) == 8
    with pytest.raises(ValueError, match="k=8 needs 9 candidates"):
        search(index, X[:3], 8, query_ids=np.arange(3))


def faiss_nprobe(index) -> int:
    import faiss

    return int(faiss.extract_index_ivf(index).nprobe)


# -- the GPU decisions, taken on CPU ------------------------------------------


def test_exact_threshold_depends_on_the_search_device():
    from ptsne.knn import EXACT_MAX_POINTS, EXACT_MAX_POINTS_GPU, exact_max_points, resolve_method

    assert exact_max_points("cpu") == EXACT_MAX_POINTS == 200_000
    assert exact_max_points("cuda") == exact_max_points("cuda:1") == EXACT_MAX_POINTS_GPU == 2_000_000
    assert resolve_method("auto", 1_000_000) == "ivf"
    assert resolve_method("auto", 1_000_000, "cuda") == "exact"
    assert resolve_method("auto", 3_000_000, "cuda") == "ivf"
    assert resolve_method("exact", 3_000_000, "cuda") == "exact"


def test_knn_graph_resolves_the_method_for_the_device_it_searches_on(monkeypatch):
    from ptsne import knn

    class Stop(Exception):
        pass

    def record(data, method, device, random_state):
        seen.append((method, device))
        raise Stop

    monkeypatch.setattr(knn, "EXACT_MAX_POINTS", 10)
    monkeypatch.setattr(knn, "EXACT_MAX_POINTS_GPU", 1000)
    monkeypatch.setattr(knn, "build_index", record)
    X = np.zeros((200, 2), np.float32)
    seen = []
    for gpus in (0, 1):
        monkeypatch.setattr(knn, "faiss_gpu_count", lambda: gpus)
        with pytest.raises(Stop):
            knn_graph(X, n_neighbors=5, device="auto")
    assert seen == [("ivf", "cpu"), ("exact", "cuda")]


def test_gpu_index_is_the_ordinal_of_the_device(monkeypatch):
    import torch

    from ptsne.device import gpu_index

    assert gpu_index("cuda:3") == 3
    assert gpu_index(torch.device("cuda", 2)) == 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_index("cuda") == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert gpu_index("cuda") == 1 and gpu_index("auto") == 1
    with pytest.raises(ValueError, match="must be a CUDA device, got 'cpu'"):
        gpu_index("cpu")


def test_ivf_training_sample_is_seeded_and_sized_by_nlist(rng):
    from ptsne.knn import ivf_training_sample

    X = rng.normal(size=(1000, 3)).astype(np.float32)
    assert ivf_training_sample(X, 20) is X  # 64 * 20 >= 1000
    a, b = ivf_training_sample(X, 5, 7), ivf_training_sample(X, 5, 7)
    assert a.shape == (320, 3)
    np.testing.assert_array_equal(a, b)


def test_one_set_of_gpu_resources_per_process(monkeypatch):
    import faiss

    from ptsne import knn

    made = []
    monkeypatch.setattr(knn, "_GPU_RESOURCES", [])
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: made.append(object()) or made[-1], raising=False)
    assert knn.gpu_resources() is knn.gpu_resources()
    assert len(made) == 1
