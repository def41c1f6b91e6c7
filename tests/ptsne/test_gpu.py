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
    cpu = knn_graph(X, k=15, method="exact", device="cpu")
    gpu = knn_graph(X, k=15, method="exact", device="cuda")
    assert (cpu.indices == gpu.indices).mean() > 0.999
    np.testing.assert_allclose(cpu.distances, gpu.distances, rtol=1e-3, atol=1e-3)


def test_fit_on_cuda_matches_cpu_quality(digits):
    X, y = digits
    kw = dict(random_state=0, n_epochs=30, batch_size=256)
    gpu = ParametricTSNE(device="cuda", **kw).fit(X[:1400])
    cpu = ParametricTSNE(device="cpu", **kw).fit(X[:1400])
    acc = {name: knn_accuracy(m.embedding_, y[:1400], m.transform(X[1400:]), y[1400:], k=10)
           for name, m in (("gpu", gpu), ("cpu", cpu))}
    assert acc["gpu"] > 0.9
    assert abs(acc["gpu"] - acc["cpu"]) < 0.05
