"""Distributed kNN stage: FAISS indexes in the Ray object store, searched by batch tasks.

The index type follows :func:`ptsne.knn.resolve_method` (exact flat up to
:func:`ptsne.knn.exact_max_points` points of the search device, IVF with
``nprobe`` tuned for the target recall beyond). An index whose vectors fit in ``max_index_bytes`` is built once
in a Ray task and shipped to every search task through the object store; a
larger one is split into index shards over contiguous row ranges, each search
task loads, searches and drops one shard after the other (one index resident
at a time) and merges the per-shard top-k by distance (shard ids are offset by
the shard's first row).

The search itself is :func:`ptsne.knn.search` (one implementation for the
single-process and the distributed driver). Tasks ask Ray for a share of a GPU
(:func:`gpu_share`) when the cluster has one and search with FAISS GPU there;
the index is then also built (its IVF trained) on a GPU.
"""

from __future__ import annotations

import logging
import math
import resource
from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import schema
from pipeline.configs import DEFAULT_SEARCHES_PER_GPU
from ptsne.device import set_num_threads
from ptsne.flat import TorchFlatIndex
from ptsne.knn import (
    GPU_MAX_SELECTION_K, KNNGraph, build_index, gpu_backend, index_device, is_gpu_index, ivf_nlist, merge_topk,
    resolve_method, search, search_all_cells, set_nprobe, to_gpu, tune_nprobe,
)

log = logging.getLogger(__name__)

#: Default largest index (bytes of float32 vectors) shipped whole through the object store.
DEFAULT_MAX_INDEX_BYTES = 2 << 30


def gpu_share(per_gpu: int) -> float:
    """The GPU fraction each of ``per_gpu`` tasks asks Ray for, so that ``per_gpu`` of them fit one GPU.

    Rounded down to Ray's resource granularity (1e-4), so that ``per_gpu`` shares never exceed 1.
    """
    if isinstance(per_gpu, bool) or not isinstance(per_gpu, (int, np.integer)) or per_gpu < 1:
        raise ValueError(f"gpu_share: per_gpu must be an integer >= 1, got {per_gpu!r}")
    return 1.0 if per_gpu == 1 else math.floor(10_000 / per_gpu) / 10_000


def gpu_task_options(options: dict) -> dict:
    """Ray options of a task: with ``max_calls=1`` when it asks for a GPU, so that its worker exits after it.

    A worker Ray reuses keeps its CUDA context and the process's FAISS GPU
    resources (:func:`ptsne.knn.gpu_resources`, about 1.5 GiB of scratch memory)
    after the task; Ray applies its one-call default for GPU tasks only to the
    ``@ray.remote`` decorator, not to ``.options(num_gpus=...)``. CPU tasks keep
    their workers.
    """
    options = dict(options)
    if float(options.get("num_gpus", 0) or 0) > 0:
        options["max_calls"] = 1
    return options


@dataclass(frozen=True)
class FeaturePart:
    """One features shard: ``path`` holds rows ``start .. start + rows - 1``."""

    path: str
    start: int
    rows: int

    @property
    def stop(self) -> int:
        return self.start + self.rows


@dataclass(frozen=True)
class IndexShard:
    """The parts indexed together, their first row and size."""

    parts: tuple[FeaturePart, ...]

    @property
    def start(self) -> int:
        return self.parts[0].start

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts)


def plan_index_shards(
    parts: Sequence[FeaturePart], dim: int, max_index_bytes: int = DEFAULT_MAX_INDEX_BYTES, min_rows: int = 1
) -> list[IndexShard]:
    """Group consecutive parts into index shards of at most ``max_index_bytes`` of vectors.

    One shard (a single index shipped whole) when everything fits. A shard is
    never closed before it holds ``min_rows`` rows (``k + 1`` for a kNN search),
    and a short last shard joins the one before it.
    """
    shards: list[list[FeaturePart]] = [[]]
    size = rows = 0
    for p in parts:
        b = p.rows * dim * 4
        if shards[-1] and size + b > max_index_bytes and rows >= min_rows:
            shards.append([])
            size = rows = 0
        shards[-1].append(p)
        size += b
        rows += p.rows
    if len(shards) > 1 and rows < min_rows:
        shards[-2].extend(shards.pop())
    return [IndexShard(tuple(s)) for s in shards if s]


def read_vectors(fs: pafs.FileSystem, parts: Sequence[FeaturePart]) -> np.ndarray:
    """The ``vector`` column of ``parts`` (in order) as float32 ``(rows, dim)``."""
    blocks = [
        schema.arrow_to_vectors(pq.read_table(p.path, filesystem=fs, columns=[schema.VECTOR]).column(0))
        for p in parts
    ]
    return np.concatenate(blocks, axis=0) if len(blocks) > 1 else blocks[0]


def build_index_blob(
    X: np.ndarray, method: str, k: int, target_recall: float, seed: int, device: str = "cpu"
) -> tuple[np.ndarray, dict]:
    """Build (and for IVF tune) an index over ``X``; return it serialised and its settings.

    With ``device="cuda[:N]"`` an IVF index is trained, filled and tuned on the
    GPU (where it will be searched) and serialised from a CPU copy; a flat index
    has nothing to train and is always built on CPU.

    Returns
    -------
    blob : ndarray, uint8
        ``faiss.serialize_index`` of the index.
    info : dict
        ``method``, ``rows``, ``nprobe`` (IVF) and ``recall`` (IVF sampled recall@k, else None).
    """
    info = {"method": method, "rows": int(X.shape[0]), "nprobe": None, "recall": None}
    index = build_index(X, method, device if method == "ivf" else "cpu", seed)
    if method == "ivf":
        nprobe, recall = tune_nprobe(index, X, k, target_recall, seed)
        info.update(nprobe=int(nprobe), recall=float(recall))
    if is_gpu_index(index):
        index = faiss.index_gpu_to_cpu(index)  # only a CPU index serialises; search tasks move it back
    return faiss.serialize_index(index), info


def load_index(blob: np.ndarray, info: dict, use_gpu: bool) -> faiss.Index | TorchFlatIndex:
    """Deserialise an index blob, set its ``nprobe`` and move it to a GPU if asked.

    Each task loads its own copy and drops it when done (no per-worker cache),
    so idle workers do not hold an index after the stage. A task told to use a
    GPU raises when nothing here can search on it (:func:`check_gpu_search`)
    instead of searching on CPU while holding a GPU slot. ``nprobe`` is set on
    the CPU index, capped at 2048 when it goes to a FAISS GPU (:func:`gpu_nprobe`),
    before the copy: FAISS refuses to copy an index that probes more cells than
    it searches on a GPU. The GPU index uses the process's one set of FAISS GPU
    resources (:func:`ptsne.knn.gpu_resources`) on GPU 0, the one Ray makes
    visible to a task given a GPU; beside a CPU build of FAISS a flat index is
    searched exactly in torch on that GPU (:class:`ptsne.flat.TorchFlatIndex`).
    """
    index = faiss.deserialize_index(np.asarray(blob))
    backend = check_gpu_search(index) if use_gpu else None
    if info.get("nprobe"):
        nprobe = info["nprobe"]
        set_nprobe(index, gpu_nprobe(nprobe, ivf_nlist(index)) if backend == "faiss" else nprobe)
    if backend == "faiss":
        return to_gpu(index, "cuda:0")
    if backend == "torch":
        flat = TorchFlatIndex(index.d, "cuda:0")
        flat.add(index.reconstruct_n(0, index.ntotal))
        return flat
    return index


def gpu_nprobe(nprobe: int, nlist: int | None) -> int:
    """The ``nprobe`` an IVF index of ``nlist`` cells may carry to a FAISS GPU: at most ``min(nlist, 2048)``."""
    cap = GPU_MAX_SELECTION_K if nlist is None else min(int(nlist), GPU_MAX_SELECTION_K)
    if int(nprobe) > cap:
        log.warning("kNN: nprobe=%d capped at %d before the index goes to the GPU", int(nprobe), cap)
    return min(int(nprobe), cap)


def check_gpu_search(index: faiss.Index | None = None) -> str:
    """What searches ``index`` on the GPU a Ray task was given: ``"faiss"``, or ``"torch"`` (flat indexes only).

    Raises when FAISS here sees no GPU and torch cannot search ``index`` on one
    (no CUDA torch, or an IVF index: torch has no IVF). ``index=None``: any index.
    """
    backend = gpu_backend()
    if backend == "faiss" or (backend == "torch" and (index is None or ivf_nlist(index) is None)):
        return backend
    raise RuntimeError(
        "kNN: this task was given a GPU but FAISS here sees none (a CPU build of FAISS, or "
        "CUDA_VISIBLE_DEVICES empty)" + (" and torch searches flat indexes only" if backend == "torch" else "")
        + "; install a GPU build of FAISS on every GPU node (ptsne[gpu-cu12] or ptsne[gpu-cu13]) or run with "
        "device='cpu'"
    )


def search_index_shards(
    indexes: Sequence[tuple[int, faiss.Index]], queries: np.ndarray, query_rows: np.ndarray, k: int
) -> KNNGraph:
    """``k`` nearest neighbours (global rows, self excluded) over all index shards.

    Each shard returns its own ``k`` nearest other than the query (the query's
    own row is only in one shard; elsewhere the ``k + 1``-th candidate is
    dropped), so the merged top ``k`` is the global top ``k``.
    """
    best = None
    for offset, index in indexes:
        found = search_index_shard(offset, index, queries, query_rows, k)
        best = found if best is None else merge_topk([best, found], k)
    return best


def search_index_shard(offset: int, index: faiss.Index, queries: np.ndarray, query_rows: np.ndarray,
                       k: int) -> KNNGraph:
    """``k`` nearest neighbours (global rows, the query's own row excluded) in one index shard from ``offset``."""
    qids = np.asarray(query_rows, dtype=np.int64) - offset
    g = search(index, queries, k, query_ids=qids, allow_missing=True)
    missing = (g.indices < 0).any(axis=1)
    if missing.any():
        g = _fill_missing(index, queries, k, qids, g, missing)
    return KNNGraph(g.indices + offset, g.distances)


def _fill_missing(
    index: faiss.Index, queries: np.ndarray, k: int, qids: np.ndarray, g: KNNGraph, missing: np.ndarray
) -> KNNGraph:
    """Search again, over every IVF cell, the rows that found fewer than ``k`` neighbours.

    IVF returns fewer hits when the probed cells hold fewer than ``k`` points;
    probing all cells is an exact search, and the search task holds only the
    index, not the indexed vectors. A GPU probes at most 2048 cells a search, so
    the cells are searched in blocks on the index's own device
    (:func:`ptsne.knn.search_all_cells`): the index is never copied to the host.
    """
    nlist = ivf_nlist(index)
    if nlist is None:
        raise RuntimeError(f"kNN search returned {int(missing.sum())} rows with fewer than k={k} neighbours")
    rows = np.flatnonzero(missing)
    redo = search_all_cells(index, queries[rows], k, qids[rows])
    log.debug("kNN: %d rows searched again over all %d IVF cells", rows.size, nlist)
    indices, distances = g.indices.copy(), g.distances.copy()
    indices[rows], distances[rows] = redo.indices, redo.distances
    return KNNGraph(indices, distances)


def method_for(method: str, n: int, use_gpu: bool = False) -> str:
    """The index type used for ``n`` points (``"auto"`` resolved for a GPU or a CPU search)."""
    return resolve_method(method, n, "cuda" if use_gpu else "cpu")


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB (Linux ``ru_maxrss`` is in KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def index_task(fs, parts: list[FeaturePart], method: str, k: int, target_recall: float, seed: int, n_threads: int,
               use_gpu: bool = False):
    """Ray task body: build one index shard; returns ``(blob, info)`` (run with ``num_returns=2``).

    With ``use_gpu`` (a task given a GPU) the index is built and tuned on GPU 0.
    """
    set_num_threads(n_threads)
    if use_gpu:
        check_gpu_search()
    X = read_vectors(fs, parts)
    blob, info = build_index_blob(X, method, k, target_recall, seed, "cuda:0" if use_gpu else "cpu")
    info["peak_rss_mb"] = peak_rss_mb()
    return blob, info


def search_part(fs, part: FeaturePart, index_refs: list, k: int, use_gpu: bool) -> KNNGraph:
    """kNN of the rows of one features part over every index shard.

    ``index_refs`` holds ``(first_row, [blob_ref], info)`` per index shard; the
    ref is wrapped in a list so that Ray does not fetch it before the task runs.
    The shards are fetched, loaded, searched and dropped one after the other, so
    one index is resident at a time; the running top-k is merged as in
    :func:`search_index_shards` (same result).
    """
    import ray

    queries = read_vectors(fs, [part])
    rows = np.arange(part.start, part.stop, dtype=np.int64)
    best, device = None, "cpu"
    for offset, ref, info in index_refs:
        index = load_index(ray.get(ref[0]), info, use_gpu)
        device = index_device(index)
        found = search_index_shard(offset, index, queries, rows, k)
        del index
        best = found if best is None else merge_topk([best, found], k)
    log.info("kNN: rows %d-%d searched on %s over %d index shard(s)", part.start, part.stop - 1,
             device, len(index_refs))
    return best


def _search_task(fs, part: FeaturePart, index_refs: list, k: int, use_gpu: bool, n_threads: int) -> KNNGraph:
    set_num_threads(n_threads)
    return search_part(fs, part, index_refs, k, use_gpu)


def build_indexes(
    fs, parts: Sequence[FeaturePart], dim: int, k: int, method: str = "auto", target_recall: float = 0.95,
    seed: int = 0, max_index_bytes: int = DEFAULT_MAX_INDEX_BYTES, task_options: dict | None = None,
    n_threads: int = 1, use_gpu: bool = False,
) -> tuple[str, list[tuple[int, list, dict]]]:
    """Build the index shards in Ray tasks; return the method and ``(first_row, [ref], info)`` each.

    With ``use_gpu``, ``"auto"`` resolves by the GPU's threshold (:func:`method_for`)
    and each IVF task asks for one GPU (``task_options`` may say otherwise) and
    trains its index there; flat indexes are built on CPU.
    """
    import ray

    n = sum(p.rows for p in parts)
    method = method_for(method, n, use_gpu)
    shards = plan_index_shards(parts, dim, max_index_bytes, min_rows=k + 1)
    on_gpu = use_gpu and method == "ivf"
    options = {"num_gpus": 1, **(task_options or {})} if on_gpu else dict(task_options or {})
    task = ray.remote(index_task).options(num_returns=2, **gpu_task_options(options))
    out = [(s, *task.remote(fs, list(s.parts), method, k, target_recall, seed, n_threads, on_gpu)) for s in shards]
    infos = ray.get([o[2] for o in out])
    return method, [(s.start, [blob], info) for (s, blob, _), info in zip(out, infos)]


def distributed_knn(
    fs, parts: Sequence[FeaturePart], dim: int, k: int, method: str = "auto", target_recall: float = 0.95,
    seed: int = 0, max_index_bytes: int = DEFAULT_MAX_INDEX_BYTES, use_gpu: bool = False, n_threads: int = 1,
    searches_per_gpu: int = DEFAULT_SEARCHES_PER_GPU,
) -> tuple[KNNGraph, list[dict]]:
    """The kNN graph of all rows of ``parts`` computed in Ray tasks, gathered (small data, tests).

    Returns the graph (rows in row order) and the info of each index shard. On a
    GPU, ``searches_per_gpu`` search tasks share each GPU (:func:`gpu_share`).
    """
    import ray

    _, refs = build_indexes(fs, parts, dim, k, method, target_recall, seed, max_index_bytes, n_threads=n_threads,
                            use_gpu=use_gpu)
    task = ray.remote(_search_task).options(**gpu_task_options({"num_gpus": gpu_share(searches_per_gpu) if use_gpu
                                                                  else 0}))
    graphs = ray.get([task.remote(fs, p, refs, k, use_gpu, n_threads) for p in parts])
    return (
        KNNGraph(np.concatenate([g.indices for g in graphs]), np.concatenate([g.distances for g in graphs])),
        [info for _, _, info in refs],
    )
