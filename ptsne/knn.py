"""k-nearest-neighbour graphs with FAISS.

The contract of this stage is a :class:`KNNGraph`: ``indices`` (int64, shape
``(n, k)``) and Euclidean ``distances`` (float32, shape ``(n, k)``), sorted by
distance, with each point's own row excluded even when it has exact duplicates.

Small inputs use an exact flat index; large inputs use an IVF index whose
``nprobe`` is raised until a sampled recall against exact search reaches the
requested target. A GPU searches when ``device`` asks for it (``"auto"`` or
``"cuda"``) and one is there, by :func:`search_backend`: FAISS's GPU indexes when
FAISS is a GPU build, else an exact search in torch on the GPU
(:class:`ptsne.flat.TorchFlatIndex`, the same neighbours as a flat FAISS index).
On a GPU exact search reaches further (:data:`EXACT_MAX_POINTS_GPU`); with FAISS
GPU the IVF quantizer is also trained on the GPU, the index lives on the device's
GPU (:func:`ptsne.device.gpu_index`) and every index of the process shares one
set of FAISS GPU resources (:func:`gpu_resources`). torch has no IVF: an IVF
index beside a CPU build of FAISS is built and searched on CPU.

FAISS GPU selects at most :data:`GPU_MAX_SELECTION_K` candidates per query and
probes at most as many IVF cells: on a GPU, ``k + 1`` above it is refused before
any work, and every ``nprobe`` set here is capped at ``min(nlist, 2048)``.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import faiss
import numpy as np
import torch

from ptsne.configs import EXACT_MAX_POINTS, KNNConfig
from ptsne.configs import KNN_METHODS as METHODS  # noqa: F401 (exported)
from ptsne.device import faiss_gpu_count, gpu_index, set_num_threads
from ptsne.flat import TorchFlatIndex

log = logging.getLogger(__name__)

#: What searches on a GPU: FAISS's GPU build, or torch (exact only) beside a CPU build of FAISS.
GPU_BACKENDS = ("faiss", "torch")
#: The same on a GPU: a flat search of 1M x 1M points of 50 dimensions takes seconds there.
EXACT_MAX_POINTS_GPU = 2_000_000
#: Largest k of a FAISS GPU search and largest nprobe of a FAISS GPU IVF index
#: (``GPU_MAX_SELECTION_K`` in faiss gpu/utils/DeviceDefs.cuh, checked by
#: ``validateKSelect`` / ``validateNProbe``; 2048 for builds without cuVS, as pip's faiss-gpu).
GPU_MAX_SELECTION_K = 2048


class KNNGraph(NamedTuple):
    """A kNN graph: row ``i`` lists the ``k`` nearest neighbours of point ``i``."""

    indices: np.ndarray  # int64 (n, k)
    distances: np.ndarray  # float32 (n, k), Euclidean, ascending

    @property
    def k(self) -> int:
        return int(self.indices.shape[1])


def exact_max_points(device: str = "cpu") -> int:
    """The most indexed points ``method="auto"`` searches exactly on ``device`` (``"cpu"`` or ``"cuda[:N]"``)."""
    return EXACT_MAX_POINTS_GPU if str(device).startswith("cuda") else EXACT_MAX_POINTS


def resolve_method(method: str, n: int, device: str = "cpu") -> str:
    """Resolve ``"auto"`` to ``"exact"`` or ``"ivf"`` by the number of indexed points and the search device.

    ``device`` is where the search runs (as :func:`resolve_knn_device` returns it):
    exact up to :func:`exact_max_points` points, IVF beyond.
    """
    if method != "auto":
        return method
    return "exact" if n <= exact_max_points(device) else "ivf"


def default_nlist(n: int) -> int:
    """IVF cell count: about ``4 sqrt(n)``, at least 1 and at most ``n // 39``."""
    return int(max(1, min(4 * math.isqrt(max(n, 1)), n // 39)))


def check_gpu_k(k: int, extra: int = 1) -> None:
    """Refuse a GPU search of ``k + extra`` candidates per query beyond :data:`GPU_MAX_SELECTION_K`.

    ``extra`` is 1 when each query's own row is searched for and dropped.
    """
    if k + extra > GPU_MAX_SELECTION_K:
        raise ValueError(
            f"kNN: k={k} needs {k + extra} candidates per query, but FAISS on a GPU selects at most "
            f"{GPU_MAX_SELECTION_K} (k <= {GPU_MAX_SELECTION_K - extra}, i.e. a perplexity below "
            f"{(GPU_MAX_SELECTION_K - extra + 1) / 3:.1f} with k = floor(3 * perplexity)); search on CPU "
            "(device='cpu') or lower k / perplexity"
        )


def search_backend(faiss_gpus: int, torch_gpu: bool) -> str | None:
    """What searches on a GPU: ``"faiss"`` (a GPU build of FAISS that sees ``faiss_gpus`` GPUs), else
    ``"torch"`` where torch sees a GPU (``torch_gpu``), else None (no GPU to search on)."""
    if faiss_gpus > 0:
        return "faiss"
    return "torch" if torch_gpu else None


def gpu_backend() -> str | None:
    """:func:`search_backend` of this process."""
    return search_backend(faiss_gpu_count(), torch.cuda.is_available())


def resolve_knn_device(device: str, k: int | None = None) -> str:
    """Where a ``k``-NN graph is searched: ``"cuda"`` or ``"cpu"`` for a ``KNNConfig.device``.

    ``"cuda"`` is refused when no GPU is there to search on (:func:`gpu_backend`), or
    when FAISS GPU searches and ``k + 1`` exceeds :data:`GPU_MAX_SELECTION_K`.
    ``"auto"`` takes the GPU when there is one (FAISS GPU where the search fits it,
    else torch's exact search beside a CPU build of FAISS), else the CPU, with a
    warning when a ``k`` too large for FAISS GPU sends it to the CPU. ``k=None`` (an
    index built before its ``k`` is known) skips the ``k`` checks.
    """
    if device == "cpu":
        return "cpu"
    backend = gpu_backend()
    if device == "cuda":
        if backend is None:
            raise ValueError("KNNConfig: device='cuda' was asked for but neither FAISS nor torch sees a GPU")
        if k is not None and backend == "faiss":
            check_gpu_k(k)
        return "cuda"
    if backend is None:
        return "cpu"
    if backend == "torch":
        log.info("kNN: FAISS is a CPU build; exact search runs in torch on the GPU")
    elif k is not None and k + 1 > GPU_MAX_SELECTION_K:
        log.warning("kNN: k=%d exceeds what FAISS on a GPU selects (k + 1 <= %d); searching on CPU",
                    k, GPU_MAX_SELECTION_K)
        return "cpu"
    return "cuda"


def torch_search_device(device: str) -> torch.device:
    """The torch device of an exact torch search for a ``"cuda"`` / ``"cuda:N"`` search device."""
    return torch.device("cuda", gpu_index(device))


_GPU_RESOURCES: list = []


def gpu_resources():
    """The process's one ``faiss.StandardGpuResources`` (created on first use, for every GPU).

    It lives as long as the process: GPU indexes keep a raw pointer to it, and
    each set reserves its own scratch memory on the GPU, so every index of the
    process (single-process search, Ray search tasks) is placed with this one.
    """
    if not _GPU_RESOURCES:
        _GPU_RESOURCES.append(faiss.StandardGpuResources())
    return _GPU_RESOURCES[0]


def to_gpu(index: faiss.Index, device: str = "cuda") -> faiss.Index:
    """A copy of CPU ``index`` on the GPU of ``device`` (``"cuda"``: the current one), with :func:`gpu_resources`."""
    return faiss.index_cpu_to_gpu(gpu_resources(), gpu_index(device), index)


def _as_float32(X: np.ndarray, name: str = "X") -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (n, dim), got shape {X.shape}")
    return np.ascontiguousarray(X, dtype=np.float32)


def build_index(
    data: np.ndarray, method: str = "exact", device: str = "cpu", seed: int = 0
) -> faiss.Index:
    """Build an L2 index over ``data`` (float32 ``(n, dim)``).

    On a GPU (``device`` ``"auto"``, ``"cuda"`` or ``"cuda:N"`` where :func:`resolve_knn_device`
    finds one) with a FAISS GPU build the empty index is copied to the GPU first, so
    the IVF k-means runs there too; ``faiss.index_gpu_to_cpu`` gives a CPU copy to
    serialise. Beside a CPU build of FAISS an exact index on a GPU is a
    :class:`ptsne.flat.TorchFlatIndex` there, and an IVF index stays on CPU.
    """
    data = _as_float32(data, "data")
    n, dim = data.shape
    nlist = default_nlist(n)
    on_gpu = resolve_knn_device("cuda" if str(device).startswith("cuda:") else device) == "cuda"
    if on_gpu and gpu_backend() == "torch":
        if method == "exact":
            index = TorchFlatIndex(dim, torch_search_device("cuda" if device == "auto" else device))
            index.add(data)
            return index
        log.warning("kNN: FAISS is a CPU build and torch has no IVF: the IVF index is built and searched on CPU")
        on_gpu = False
    if method == "exact":
        index = faiss.IndexFlatL2(dim)
    elif method == "ivf":
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, nlist, faiss.METRIC_L2)
        index.cp.seed = int(seed)
    else:
        raise ValueError(f"build_index: method must be 'exact' or 'ivf', got {method!r}")
    if on_gpu:
        index = to_gpu(index, device)
    if method == "ivf":
        if on_gpu and hasattr(index, "cp"):
            index.cp.seed = int(seed)
        index.train(ivf_training_sample(data, nlist, seed))
    index.add(data)
    return index


def ivf_training_sample(data: np.ndarray, nlist: int, seed: int = 0) -> np.ndarray:
    """The rows an IVF quantizer of ``nlist`` cells is trained on: all, or a seeded sample of ``64 nlist``."""
    n = data.shape[0]
    n_train = min(n, 64 * nlist)
    if n_train == n:
        return data
    rng = np.random.default_rng(seed)
    return data[np.sort(rng.choice(n, n_train, replace=False))]


def ivf_nlist(index: faiss.Index) -> int | None:
    """The cell count of a CPU or GPU IVF index, None for other indexes."""
    try:
        return int(faiss.extract_index_ivf(index).nlist)
    except (RuntimeError, AttributeError):
        nlist = getattr(index, "nlist", None)
        return None if nlist is None else int(nlist)


def max_nprobe(index: faiss.Index) -> int:
    """The largest useful ``nprobe`` of an IVF index: ``nlist``, and at most 2048 on a GPU."""
    nlist = ivf_nlist(index) or GPU_MAX_SELECTION_K
    return min(nlist, GPU_MAX_SELECTION_K) if is_gpu_index(index) else nlist


def set_nprobe(index: faiss.Index, nprobe: int) -> int:
    """Set ``nprobe`` on a CPU or GPU IVF index (no-op for flat indexes); returns the value set.

    On a GPU index it is capped at :func:`max_nprobe`, ``min(nlist, 2048)`` (FAISS GPU
    refuses more than :data:`GPU_MAX_SELECTION_K`), with a warning above 2048: recall
    may then fall short of what the uncapped value gave on CPU.
    """
    nprobe = int(nprobe)
    if is_gpu_index(index):
        cap = max_nprobe(index)
        if nprobe > GPU_MAX_SELECTION_K:
            log.warning("kNN: nprobe=%d capped at %d, the most FAISS probes on a GPU", nprobe, cap)
        nprobe = min(nprobe, cap)
    try:
        faiss.extract_index_ivf(index).nprobe = nprobe
    except (RuntimeError, AttributeError):
        ps = faiss.GpuParameterSpace() if hasattr(faiss, "GpuParameterSpace") else None
        if ps is not None:
            ps.set_index_parameter(index, "nprobe", nprobe)
    return nprobe


def search(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    query_ids: np.ndarray | None = None,
    batch_size: int = 65536,
    fallback_data: np.ndarray | None = None,
    allow_missing: bool = False,
) -> KNNGraph:
    """Search ``k`` neighbours of each query, excluding the query's own id.

    Parameters
    ----------
    index : faiss.Index
        Index over the reference points; returned ids are positions in it.
    queries : ndarray, float32 (m, dim)
    k : int
        Neighbours to return per query.
    query_ids : ndarray, int64 (m,), optional
        Position of each query in the index; that id is removed from its row.
        With duplicates the query itself may not come first, so it is removed
        wherever it appears, and the last of ``k + 1`` candidates is dropped when
        it does not appear at all.
    fallback_data : ndarray (n, dim), optional
        The indexed points: rows for which an approximate index found fewer
        than ``k`` neighbours are searched again exactly against them.
    allow_missing : bool
        Keep id ``-1`` for missing neighbours instead of raising.

    Returns
    -------
    KNNGraph
        ``indices`` int64 ``(m, k)``, ``distances`` float32 ``(m, k)`` (Euclidean).
    """
    queries = _as_float32(queries, "queries")
    m = queries.shape[0]
    extra = 0 if query_ids is None else 1
    if is_gpu_index(index):
        check_gpu_k(k, extra)
    out_i = np.empty((m, k), dtype=np.int64)
    out_d = np.empty((m, k), dtype=np.float32)
    for start in range(0, m, batch_size):
        stop = min(m, start + batch_size)
        d2, idx = index.search(queries[start:stop], k + extra)
        if query_ids is not None:
            idx, d2 = _drop_self(idx, d2, np.asarray(query_ids[start:stop], dtype=np.int64), k)
        out_i[start:stop] = idx
        out_d[start:stop] = np.sqrt(np.maximum(d2, 0.0))
    # IVF returns fewer than k hits when the probed cells hold fewer points.
    missing = (out_i < 0).any(axis=1)
    if missing.any() and fallback_data is not None:
        rows = np.flatnonzero(missing)
        flat = faiss.IndexFlatL2(queries.shape[1])
        flat.add(_as_float32(fallback_data, "fallback_data"))
        redo = search(flat, queries[rows], k, None if query_ids is None else query_ids[rows])
        out_i[rows], out_d[rows] = redo.indices, redo.distances
        missing[:] = False
    if missing.any() and not allow_missing:
        raise RuntimeError(
            f"kNN search returned {int(missing.sum())} rows with fewer than "
            f"k={k} neighbours; raise nprobe or use method='exact'"
        )
    return KNNGraph(out_i, out_d)


def _drop_self(
    idx: np.ndarray, d2: np.ndarray, self_ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    is_self = idx == self_ids[:, None]
    # Rows without self: drop the farthest candidate instead.
    no_self = ~is_self.any(axis=1)
    is_self[no_self, -1] = True
    # Exactly one True per row (ids are unique within a row).
    keep = ~is_self
    return idx[keep].reshape(-1, k), d2[keep].reshape(-1, k)


def knn_graph(X: np.ndarray, config: KNNConfig | None = None, **kwargs) -> KNNGraph:
    """kNN graph of the rows of ``X`` among themselves.

    Parameters
    ----------
    X : ndarray (n, dim)
    config : KNNConfig, optional
        Or its fields as keyword arguments.

    Returns
    -------
    KNNGraph
    """
    if config is None:
        config = KNNConfig(**kwargs)
    elif kwargs:
        raise TypeError("knn_graph: pass either config or keyword settings, not both")
    X = _as_float32(X)
    n = X.shape[0]
    k = config.n_neighbors
    if k > n - 1:
        raise ValueError(f"knn_graph: n_neighbors={k} needs at least n_neighbors + 1 points, got n={n}")
    if config.n_threads is not None:
        set_num_threads(config.n_threads)
    device = resolve_knn_device(config.device, k)  # before any work: k may not fit a GPU
    method = resolve_method(config.method, n, device)
    log.info("kNN: n=%d dim=%d k=%d method=%s device=%s", n, X.shape[1], k, method, device)
    index = build_index(X, method, device, config.seed)
    if method == "ivf":
        tune_nprobe(index, X, k, config.target_recall, config.seed)
    return search(index, X, k, query_ids=np.arange(n, dtype=np.int64), fallback_data=X)


def tune_nprobe(
    index: faiss.Index,
    X: np.ndarray,
    k: int,
    target_recall: float = 0.95,
    seed: int = 0,
    n_probe_queries: int = 1000,
) -> tuple[int, float]:
    """Raise ``nprobe`` (doubling) until sampled recall@k reaches ``target_recall``.

    The probe compares against exact search of a random sample of ``X`` (the
    indexed points), on the GPU of a GPU index (a task that holds a GPU may hold a
    single CPU thread), else on CPU with the process's threads. Returns
    ``(nprobe, recall)`` and leaves ``index`` set to it. ``nprobe`` stops at
    :func:`max_nprobe` (``nlist``; at most 2048 on a GPU).
    """
    n = X.shape[0]
    rng = np.random.default_rng(seed + 1)
    q_ids = np.sort(rng.choice(n, min(n_probe_queries, n), replace=False)).astype(np.int64)
    exact = exact_neighbors(X, X[q_ids], k, q_ids, device=index_device(index))
    nprobe, recall = 1, 0.0
    limit = max_nprobe(index)  # nlist, and at most GPU_MAX_SELECTION_K on a GPU
    while True:
        set_nprobe(index, nprobe)
        approx = search(index, X[q_ids], k, query_ids=q_ids, allow_missing=True)
        recall = recall_at_k(exact, approx.indices)
        if recall >= target_recall or nprobe >= limit:
            break
        nprobe = min(limit, nprobe * 2)
    log.info("kNN: IVF nprobe=%d gives sampled recall@%d=%.4f", nprobe, k, recall)
    return nprobe, recall


def is_gpu_index(index: faiss.Index) -> bool:
    """Whether ``index`` is a FAISS GPU index (its class is one of faiss's ``Gpu*``)."""
    return "Gpu" in type(index).__name__


def index_device(index) -> str:
    """``"cuda"`` for an index that searches on a GPU (FAISS GPU, or torch on a CUDA device), else ``"cpu"``."""
    if isinstance(index, TorchFlatIndex):
        return index.device.type
    return "cuda" if is_gpu_index(index) else "cpu"


def exact_neighbors(
    data: np.ndarray, queries: np.ndarray, k: int, query_ids: np.ndarray | None = None, device: str = "cpu"
) -> np.ndarray:
    """Exact kNN indices (int64 ``(m, k)``) of ``queries`` in ``data`` with a flat index on ``device``."""
    index = build_index(data, "exact", device) if device != "cpu" else faiss.IndexFlatL2(data.shape[1])
    if device == "cpu":
        index.add(_as_float32(data, "data"))
    return search(index, queries, k, query_ids=query_ids).indices


def search_all_cells(index: faiss.Index, queries: np.ndarray, k: int, query_ids: np.ndarray | None = None,
                     cells_per_call: int | None = None) -> KNNGraph:
    """``k`` neighbours of each query over every cell of an IVF index, ``cells_per_call`` cells a call.

    An exact search of the indexed points where the index itself holds them: a
    FAISS GPU index probes at most 2048 cells a search (default
    ``cells_per_call``: :func:`max_nprobe`), so the cells are searched in blocks
    (``search_preassigned``, on the index's own device: no copy of it leaves the
    GPU) and the blocks' neighbours merged by distance, ties by id. Rows are
    found short only where the index holds fewer than ``k`` other points.
    """
    queries = _as_float32(queries, "queries")
    ivf = index if is_gpu_index(index) else faiss.extract_index_ivf(index)
    nlist, m = int(ivf.nlist), queries.shape[0]
    block = int(cells_per_call or max_nprobe(index))
    extra = 0 if query_ids is None else 1
    old = int(ivf.nprobe)
    best = None
    try:
        ivf.nprobe = min(block, nlist)
        for start in range(0, nlist, block):
            cells = np.full((m, ivf.nprobe), -1, dtype=np.int64)  # -1: no cell (a short last block)
            cells[:, :min(block, nlist - start)] = np.arange(start, min(nlist, start + block))
            d2, idx = ivf.search_preassigned(queries, k + extra, cells, None)
            if query_ids is not None:
                idx, d2 = _drop_self(idx, d2, np.asarray(query_ids, dtype=np.int64), k)
            found = KNNGraph(idx, np.sqrt(np.maximum(d2, 0.0)).astype(np.float32))
            best = found if best is None else merge_topk([best, found], k)
    finally:
        ivf.nprobe = old
    return best


def merge_topk(candidates: list[KNNGraph], k: int) -> KNNGraph:
    """Merge neighbour lists of the same queries into the ``k`` nearest, equal distances by id (missing last)."""
    if len(candidates) == 1:
        return candidates[0]
    idx = np.concatenate([c.indices for c in candidates], axis=1)
    dist = np.concatenate([c.distances for c in candidates], axis=1)
    dist = np.where(idx < 0, np.inf, dist)
    order = np.lexsort((idx, dist), axis=1)[:, :k]
    return KNNGraph(np.take_along_axis(idx, order, axis=1), np.take_along_axis(dist, order, axis=1))


def recall_at_k(true_indices: np.ndarray, approx_indices: np.ndarray) -> float:
    """Mean fraction of each row of ``true_indices`` found in the same row of ``approx_indices``.

    FAISS's own measure (``faiss.contrib.evaluation.knn_intersection_measure``):
    both tables ``(n, k)``; a row's ids are distinct (as every kNN search returns
    them), missing neighbours (``-1``) of ``approx_indices`` count as misses.
    """
    from faiss.contrib.evaluation import knn_intersection_measure

    true_indices = np.asarray(true_indices)
    approx_indices = np.asarray(approx_indices)
    if true_indices.ndim != 2 or true_indices.shape != approx_indices.shape or true_indices.size == 0:
        raise ValueError(
            f"recall_at_k: both tables must have the same non-empty (n, k) shape, got {true_indices.shape} "
            f"and {approx_indices.shape}"
        )
    return float(knn_intersection_measure(true_indices, approx_indices))
