"""The GPU paths: the same code as on CPU, selected by device detection."""

import numpy as np
import pytest

from ptsne import ParametricTSNE
from ptsne.knn import knn_graph
from ptsne.metrics import knn_accuracy

pytestmark = pytest.mark.gpu


def test_faiss_gpu_search_matches_cpu(rng):
    from ptsne.device import faiss_gpu_count

    if faiss_gpu_count() == 0:
        pytest.skip("FAISS CPU build: install faiss-gpu (pip install 'ptsne[gpu]')")
    X = rng.normal(size=(2000, 16)).astype(np.float32)
    cpu = knn_graph(X, n_neighbors=15, method="exact", device="cpu")
    gpu = knn_graph(X, n_neighbors=15, method="exact", device="cuda")
    assert (cpu.indices == gpu.indices).mean() > 0.999
    np.testing.assert_allclose(cpu.distances, gpu.distances, rtol=1e-3, atol=1e-3)


def test_fit_on_cuda_matches_cpu_quality(digits):
    X, y = digits
    kw = dict(random_state=0, n_epochs=30, batch_size=256)
    gpu = ParametricTSNE(device="auto", **kw).fit(X[:1400])  # FAISS may be a CPU build
    cpu = ParametricTSNE(device="cpu", **kw).fit(X[:1400])
    assert gpu.device_.type == "cuda"
    acc = {name: knn_accuracy(m.embedding_, y[:1400], m.transform(X[1400:]), y[1400:], k=10)
           for name, m in (("gpu", gpu), ("cpu", cpu))}
    assert acc["gpu"] > 0.9
    assert abs(acc["gpu"] - acc["cpu"]) < 0.05


def _needs_faiss_gpu():
    from ptsne.device import faiss_gpu_count

    if faiss_gpu_count() == 0:
        pytest.skip("FAISS CPU build: install faiss-gpu (pip install 'ptsne[gpu]')")


def test_load_is_on_cpu_unless_cuda_is_asked_for(blobs, tmp_path):
    import torch

    X, _ = blobs
    # "auto": trains on the GPU, and searches on CPU should FAISS be a CPU build.
    est = ParametricTSNE(perplexity=10.0, n_epochs=2, batch_size=128, random_state=0, device="auto").fit(X)
    assert est.device_.type == "cuda"
    path = est.save(tmp_path / "m")
    cpu = ParametricTSNE.load(path)
    assert cpu.device_ == torch.device("cpu")
    gpu = ParametricTSNE.load(path, device="cuda")
    assert gpu.device_.type == "cuda" and next(gpu.model_.parameters()).is_cuda
    np.testing.assert_allclose(gpu.transform(X[:50]), cpu.transform(X[:50]), rtol=1e-3, atol=1e-3)


def test_bfloat16_detection_excludes_emulation():
    import torch

    from ptsne.device import native_bfloat16

    major = torch.cuda.get_device_properties(0).major
    assert native_bfloat16(torch.device("cuda")) is (major >= 8)


def test_gpu_ivf_nprobe_is_capped_at_the_selection_limit(rng):
    # nlist 4096 > 2048: nprobe = nlist would crash FAISS GPU.
    import faiss

    from ptsne.knn import GPU_MAX_SELECTION_K, gpu_resources, max_nprobe, set_nprobe, tune_nprobe

    _needs_faiss_gpu()
    from pipeline.knn import gpu_nprobe

    X = rng.normal(size=(4096 * 40, 8)).astype(np.float32)
    cpu = faiss.IndexIVFFlat(faiss.IndexFlatL2(8), 8, 4096)
    cpu.train(X)
    # A CPU-tuned nprobe of 4096 is capped before the copy: GpuIndexIVF::copyFrom refuses more than 2048.
    cpu.nprobe = gpu_nprobe(4096, 4096)
    index = faiss.index_cpu_to_gpu(gpu_resources(), 0, cpu)
    index.add(X)
    assert max_nprobe(index) == GPU_MAX_SELECTION_K
    assert set_nprobe(index, 4096) == GPU_MAX_SELECTION_K
    index.search(X[:10], 10)
    nprobe, _ = tune_nprobe(index, X, 10, target_recall=1.0, n_probe_queries=50)
    assert nprobe <= GPU_MAX_SELECTION_K


def test_gpu_ivf_blob_tuned_beyond_the_cap_loads_onto_the_gpu(rng):
    import faiss

    from pipeline.knn import load_index
    from ptsne.knn import GPU_MAX_SELECTION_K, is_gpu_index

    _needs_faiss_gpu()
    X = rng.normal(size=(4096 * 40, 8)).astype(np.float32)
    cpu = faiss.IndexIVFFlat(faiss.IndexFlatL2(8), 8, 4096)
    cpu.train(X)
    cpu.add(X)
    index = load_index(faiss.serialize_index(cpu), {"nprobe": 4096}, use_gpu=True)
    assert is_gpu_index(index) and index.nprobe == GPU_MAX_SELECTION_K
    index.search(X[:10], 10)


def test_gpu_short_rows_are_filled_beyond_the_cap(rng):
    # Only the two end clusters of a row of 4096 cells are indexed: 2048 probed cells hold 20 points, not 31.
    import faiss

    from pipeline.knn import search_index_shards
    from ptsne.knn import exact_neighbors, gpu_resources, set_nprobe

    _needs_faiss_gpu()
    centers = np.zeros((4096, 4), np.float32)
    centers[:, 0] = 10 * np.arange(4096)
    cpu = faiss.IndexIVFFlat(faiss.IndexFlatL2(4), 4, 4096)
    cpu.train((centers.repeat(40, axis=0) + rng.normal(size=(4096 * 40, 4))).astype(np.float32))
    X = np.concatenate([centers[0] + rng.normal(size=(20, 4)), centers[-1] + rng.normal(size=(20, 4))]).astype(np.float32)
    index = faiss.index_cpu_to_gpu(gpu_resources(), 0, cpu)
    index.add(X)
    set_nprobe(index, 1)
    g = search_index_shards([(0, index)], X, np.arange(len(X)), 30)
    np.testing.assert_array_equal(g.indices, exact_neighbors(X, X, 30, np.arange(len(X))))


def test_gpu_k_above_the_selection_limit_is_refused(rng):
    from ptsne.knn import GPU_MAX_SELECTION_K

    _needs_faiss_gpu()
    X = rng.normal(size=(GPU_MAX_SELECTION_K + 100, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="at most 2048"):
        knn_graph(X, n_neighbors=GPU_MAX_SELECTION_K, method="exact", device="cuda")
    g = knn_graph(X, n_neighbors=GPU_MAX_SELECTION_K, method="exact", device="auto")  # on CPU instead
    assert g.indices.shape == (len(X), GPU_MAX_SELECTION_K)


def test_gpu_knn_task_searches_on_the_gpu(rng):
    from pipeline.knn import build_index_blob, index_device, load_index

    _needs_faiss_gpu()
    X = rng.normal(size=(5000, 8)).astype(np.float32)
    blob, info = build_index_blob(X, "ivf", 10, 0.9, 0)
    assert index_device(load_index(blob, info, use_gpu=True)) == "cuda"


def test_gpu_checkpoint_resumes_on_cpu(tmp_path):
    import torch

    from pipeline.train import CHECKPOINT_OPTIMIZER, load_optimizer_state

    net = torch.nn.Linear(4, 2).cuda()
    opt = torch.optim.Adam(net.parameters())
    net(torch.ones(3, 4, device="cuda")).sum().backward()
    opt.step()
    torch.save({"optimizer": opt.state_dict(), "scheduler": {}}, tmp_path / CHECKPOINT_OPTIMIZER)
    state = load_optimizer_state(tmp_path)
    assert all(v.device.type == "cpu" for s in state["optimizer"]["state"].values() for v in s.values())
    torch.optim.Adam(torch.nn.Linear(4, 2).parameters()).load_state_dict(state["optimizer"])


def test_gpu_ivf_is_trained_on_the_gpu_and_serialised_from_a_cpu_copy(rng):
    import faiss

    from pipeline.knn import build_index_blob, index_device, load_index
    from ptsne.knn import build_index, exact_neighbors, is_gpu_index, recall_at_k, search, tune_nprobe

    _needs_faiss_gpu()
    X = rng.normal(size=(20000, 16)).astype(np.float32)
    index = build_index(X, "ivf", "cuda", seed=0)
    assert is_gpu_index(index) and index.is_trained and index.ntotal == len(X)
    tune_nprobe(index, X, 10, 0.9)
    q = np.arange(500)
    assert recall_at_k(exact_neighbors(X, X[q], 10, q), search(index, X[q], 10, query_ids=q).indices) >= 0.85
    blob, info = build_index_blob(X, "ivf", 10, 0.9, 0, device="cuda:0")
    cpu = faiss.deserialize_index(blob)
    assert not is_gpu_index(cpu) and cpu.ntotal == len(X) and info["recall"] >= 0.9
    assert index_device(load_index(blob, info, use_gpu=True)) == "cuda"


def test_gpu_index_is_placed_on_the_devices_gpu_with_one_set_of_resources(rng):
    from pipeline.knn import build_index_blob, load_index
    from ptsne import knn

    _needs_faiss_gpu()
    X = rng.normal(size=(1000, 8)).astype(np.float32)
    assert knn.build_index(X, "exact", "cuda:0").getDevice() == 0
    blob, info = build_index_blob(X, "exact", 5, 0.9, 0)
    load_index(blob, info, use_gpu=True)
    load_index(blob, info, use_gpu=True)
    assert len(knn._GPU_RESOURCES) == 1


def test_gpu_auto_searches_a_million_points_exactly():
    from ptsne.knn import resolve_knn_device, resolve_method

    _needs_faiss_gpu()
    assert resolve_method("auto", 1_000_000, resolve_knn_device("auto", 90)) == "exact"


def test_float32_training_on_cuda_uses_tf32(blobs):
    import torch

    from ptsne.affinity import joint_probabilities
    from ptsne.model import ModelConfig, build_mapper
    from ptsne.train import TrainConfig, fit_mapper

    X, _ = blobs
    edges = joint_probabilities(knn_graph(X, n_neighbors=15, method="exact", device="cpu"), 5.0)
    mapper = build_mapper(ModelConfig(X.shape[1], 2))
    mapper.standardize.fit(X)
    from ptsne.device import tf32_enabled

    before = torch.backends.cuda.matmul.fp32_precision
    seen = []
    fit_mapper(mapper, X, edges, TrainConfig(n_epochs=1, batch_size=64, precision="float32"), torch.device("cuda"),
               callbacks=[lambda epoch, metrics: seen.append(tf32_enabled())])
    assert seen == [True]  # while training
    assert torch.backends.cuda.matmul.fp32_precision == before  # and restored after it


def test_torch_exact_search_on_the_gpu_equals_faiss_flat(rng):
    import faiss

    from ptsne.flat import TorchFlatIndex
    from ptsne.knn import search

    X = rng.normal(size=(20000, 50)).astype(np.float32)
    cpu = faiss.IndexFlatL2(50)
    cpu.add(X)
    gpu = TorchFlatIndex(50, "cuda")
    gpu.add(X)
    q = np.arange(0, 20000, 10)
    want, got = search(cpu, X[q], 30, query_ids=q), search(gpu, X[q], 30, query_ids=q)
    assert (want.indices == got.indices).mean() > 0.999  # equal but for near-ties in float32 rounding
    np.testing.assert_allclose(got.distances, want.distances, rtol=1e-4, atol=1e-4)


def test_a_cuda_model_searches_its_knn_on_the_gpu_even_beside_cpu_faiss(blobs):
    from ptsne.knn import resolve_knn_device

    assert resolve_knn_device("auto", 90) == "cuda"  # FAISS GPU, or torch beside a CPU build
