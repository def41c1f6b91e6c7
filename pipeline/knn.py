"""Distributed kNN stage: FAISS indexes in the Ray object store, searched by batch tasks.

The index type follows :func:`ptsne.knn.resolve_method` (exact flat up to
``ptsne.knn.EXACT_MAX_POINTS`` points, IVF with ``nprobe`` tuned for the target
recall beyond). An index whose vectors fit in ``max_index_bytes`` is built once
in a Ray task and shipped to every search task through the object store; a
larger one is split into index shards over contiguous row ranges, each search
task queries every shard in turn and merges the per-shard top-k by distance
(shard ids are offset by the shard's first row).

The search itself is :func:`ptsne.knn.search` (one implementation for the
single-process and the distributed driver). Tasks ask Ray for a GPU when the
cluster has one and search with FAISS GPU there.
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import schema
from ptsne.device import faiss_gpu_count, set_num_threads
from ptsne.knn import (
    KNNGraph, build_index, is_gpu_index, ivf_nlist, max_nprobe, resolve_method, search, set_nprobe, tune_nprobe,
)

log = logging.getLogger(__name__)

#: Default largest index (bytes of float32 vectors) shipped whole through the object store.
DEFAULT_MAX_INDEX_BYTES = 2 << 30


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
    X: np.ndarray, method: str, k: int, target_recall: float, seed: int
) -> tuple[np.ndarray, dict]:
    """Build (and for IVF tune) a CPU index over ``X``; return it serialised and its settings.

    Returns
    -------
    blob : ndarray, uint8
        ``faiss.serialize_index`` of the index.
    info : dict
        ``method``, ``rows``, ``nprobe`` (IVF) and ``recall`` (IVF sampled recall@k, else None).
    """
    info = {"method": method, "rows": int(X.shape[0]), "nprobe": None, "recall": None}
    # Built on CPU: the blob must be serialisable; search tasks move it to a GPU.
    index = build_index(X, method, "cpu", seed)
    if method == "ivf":
        nprobe, recall = tune_nprobe(index, X, k, target_recall, seed)
        info.update(nprobe=int(nprobe), recall=float(recall))
    return faiss.serialize_index(index), info


def load_index(blob: np.ndarray, info: dict, use_gpu: bool) -> faiss.Index:
    """Deserialise an index blob, set its ``nprobe`` and move it to a GPU if asked.

    Each task loads its own copy and drops it when done (no per-worker cache),
    so idle workers do not hold an index after the stage. A task told to use a
    GPU raises when FAISS here sees none (a CPU build, no visible device) instead
    of searching on CPU while holding a GPU slot. On a GPU, ``nprobe`` is capped
    at 2048 (:func:`ptsne.knn.set_nprobe`).
    """
    index = faiss.deserialize_index(np.asarray(blob))
    if use_gpu:
        if faiss_gpu_count() == 0:
            raise RuntimeError(
                "kNN: this task was given a GPU but FAISS here sees none (a CPU build of FAISS, or "
                "CUDA_VISIBLE_DEVICES empty); install faiss-gpu on every GPU node or run with device='cpu'"
            )
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, 0, index)
        index._gpu_resources = res  # keep the resources alive with the index
    if info.get("nprobe"):
        set_nprobe(index, info["nprobe"])
    return index


def merge_topk(candidates: Sequence[KNNGraph], k: int) -> KNNGraph:
    """Merge per-shard neighbour lists (global ids) into the ``k`` nearest, ties by id."""
    if len(candidates) == 1:
        return candidates[0]
    idx = np.concatenate([c.indices for c in candidates], axis=1)
    dist = np.concatenate([c.distances for c in candidates], axis=1)
    order = np.lexsort((idx, dist), axis=1)[:, :k]
    return KNNGraph(
        np.take_along_axis(idx, order, axis=1), np.take_along_axis(dist, order, axis=1)
    )


def search_index_shards(
    indexes: Sequence[tuple[int, faiss.Index]], queries: np.ndarray, query_rows: np.ndarray, k: int
) -> KNNGraph:
    """``k`` nearest neighbours (global rows, self excluded) over all index shards.

    Each shard returns its own ``k`` nearest other than the query (the query's
    own row is only in one shard; elsewhere the ``k + 1``-th candidate is
    dropped), so the merged top ``k`` is the global top ``k``.
    """
    found = []
    for offset, index in indexes:
        qids = np.asarray(query_rows, dtype=np.int64) - offset
        g = search(index, queries, k, query_ids=qids, allow_missing=True)
        missing = (g.indices < 0).any(axis=1)
        if missing.any():
            g = _fill_missing(index, queries, k, qids, g, missing)
        found.append(KNNGraph(g.indices + offset, g.distances))
    return merge_topk(found, k)


def _fill_missing(
    index: faiss.Index, queries: np.ndarray, k: int, qids: np.ndarray, g: KNNGraph, missing: np.ndarray
) -> KNNGraph:
    """Search again, probing every IVF cell, the rows that found fewer than ``k`` neighbours.

    IVF returns fewer hits when the probed cells hold fewer than ``k`` points;
    probing all cells is an exact search, and the search task holds only the
    index, not the indexed vectors. A GPU probes at most 2048 cells
    (:func:`ptsne.knn.max_nprobe`); rows still short after that are searched over
    all cells on a CPU copy of the index.
    """
    nlist = ivf_nlist(index)
    if nlist is None:
        raise RuntimeError(f"kNN search returned {int(missing.sum())} rows with fewer than k={k} neighbours")
    rows = np.flatnonzero(missing)
    try:
        old = int(faiss.extract_index_ivf(index).nprobe)
    except (RuntimeError, AttributeError):
        old = int(getattr(index, "nprobe", 1))
    probe = max_nprobe(index)
    set_nprobe(index, probe)
    try:
        redo = search(index, queries[rows], k, query_ids=qids[rows], allow_missing=probe < nlist)
    finally:
        set_nprobe(index, old)
    log.debug("kNN: %d rows searched again over %d of %d IVF cells", rows.size, probe, nlist)
    short = (redo.indices < 0).any(axis=1)
    if short.any():
        log.warning("kNN: %d rows short of k=%d neighbours after %d of %d IVF cells (the GPU's cap); "
                    "searching them over all cells on CPU", int(short.sum()), k, probe, nlist)
        cpu = faiss.index_gpu_to_cpu(index)
        faiss.extract_index_ivf(cpu).nprobe = nlist  # a CPU index: no cap
        again = rows[short]
        exact = search(cpu, queries[again], k, query_ids=qids[again])
        redo.indices[short], redo.distances[short] = exact.indices, exact.distances
    indices, distances = g.indices.copy(), g.distances.copy()
    indices[rows], distances[rows] = redo.indices, redo.distances
    return KNNGraph(indices, distances)


def method_for(method: str, n: int) -> str:
    """The index type used for ``n`` points (``"auto"`` resolved)."""
    return resolve_method(method, n)


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB (Linux ``ru_maxrss`` is in KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def index_task(fs, parts: list[FeaturePart], method: str, k: int, target_recall: float, seed: int, n_threads: int):
    """Ray task body: build one index shard; returns ``(blob, info)`` (run with ``num_returns=2``)."""
    set_num_threads(n_threads)
    X = read_vectors(fs, parts)
    blob, info = build_index_blob(X, method, k, target_recall, seed)
    info["peak_rss_mb"] = peak_rss_mb()
    return blob, info


def search_part(fs, part: FeaturePart, index_refs: list, k: int, use_gpu: bool) -> KNNGraph:
    """kNN of the rows of one features part over every index shard.

    ``index_refs`` holds ``(first_row, [blob_ref], info)`` per index shard; the
    ref is wrapped in a list so that Ray does not fetch it before the task runs.
    """
    import ray

    queries = read_vectors(fs, [part])
    rows = np.arange(part.start, part.stop, dtype=np.int64)
    indexes = []
    for offset, ref, info in index_refs:
        blob = ray.get(ref[0])
        indexes.append((offset, load_index(blob, info, use_gpu)))
        del blob
    log.info("kNN: rows %d-%d searched on %s over %d index shard(s)", part.start, part.stop - 1,
             index_device(indexes[0][1]), len(indexes))
    return search_index_shards(indexes, queries, rows, k)


def index_device(index: faiss.Index) -> str:
    """``"cuda"`` for a FAISS GPU index, else ``"cpu"`` (what a kNN task reports it searched on)."""
    return "cuda" if is_gpu_index(index) else "cpu"


def _search_task(fs, part: FeaturePart, index_refs: list, k: int, use_gpu: bool, n_threads: int) -> KNNGraph:
    set_num_threads(n_threads)
    return search_part(fs, part, index_refs, k, use_gpu)


def build_indexes(
    fs, parts: Sequence[FeaturePart], dim: int, k: int, method: str = "auto", target_recall: float = 0.95,
    seed: int = 0, max_index_bytes: int = DEFAULT_MAX_INDEX_BYTES, task_options: dict | None = None,
    n_threads: int = 1,
) -> tuple[str, list[tuple[int, list, dict]]]:
    """Build the index shards in Ray tasks; return the method and ``(first_row, [ref], info)`` each."""
    import ray

    n = sum(p.rows for p in parts)
    method = method_for(method, n)
    shards = plan_index_shards(parts, dim, max_index_bytes, min_rows=k + 1)
    task = ray.remote(index_task).options(num_returns=2, **(task_options or {}))
    out = [(s, *task.remote(fs, list(s.parts), method, k, target_recall, seed, n_threads)) for s in shards]
    infos = ray.get([o[2] for o in out])
    return method, [(s.start, [blob], info) for (s, blob, _), info in zip(out, infos)]


def distributed_knn(
    fs, parts: Sequence[FeaturePart], dim: int, k: int, method: str = "auto", target_recall: float = 0.95,
    seed: int = 0, max_index_bytes: int = DEFAULT_MAX_INDEX_BYTES, use_gpu: bool = False, n_threads: int = 1,
) -> tuple[KNNGraph, list[dict]]:
    """The kNN graph of all rows of ``parts`` computed in Ray tasks, gathered (small data, tests).

    Returns the graph (rows in row order) and the info of each index shard.
    """
    import ray

    _, refs = build_indexes(fs, parts, dim, k, method, target_recall, seed, max_index_bytes, n_threads=n_threads)
    task = ray.remote(_search_task).options(num_gpus=1 if use_gpu else 0)
    graphs = ray.get([task.remote(fs, p, refs, k, use_gpu, n_threads) for p in parts])
    return (
        KNNGraph(np.concatenate([g.indices for g in graphs]), np.concatenate([g.distances for g in graphs])),
        [info for _, _, info in refs],
    )
