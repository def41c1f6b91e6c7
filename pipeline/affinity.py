"""Distributed affinities: Parquet shards -> joint-P edges on Ray.

Stages (each a set of Ray tasks, each with a progress bar and a log line of
its wall time and the peak RSS of its workers):

1. **validate**: every shard is read and checked before anything is written
   (missing or mixed-dimension vectors, non-numeric values, NaN/Inf rows,
   duplicate ids); a rejected input raises :class:`InvalidInputError`.
2. **pca** (optional): fitted on a row sample, see :mod:`pipeline.pca`.
3. **features**: per input shard, drop rejected rows, apply the PCA, number
   the rows densely and write ``features/part-SSSSS-BBBB.parquet`` parts of at
   most ``batch_rows`` rows.
4. **knn + calibration**: one task per features part searches its rows in the
   index (:mod:`pipeline.knn`), calibrates ``p_{j|i}`` to the perplexity with
   :func:`ptsne.affinity.conditional_probabilities`, and emits the edges
   ``(i, j, p_{j|i} / 2n)`` and their transposes ``(j, i, p_{j|i} / 2n)``,
   already split by head range (the map side of a shuffle). On a GPU the
   search and the calibration are two tasks (:func:`plan_knn_tasks`): the
   search holds a share of a GPU (``knn_searches_per_gpu`` searches per GPU)
   and the calibration runs on CPUs from the search's result, so the GPU is
   free for the next search while the previous part is calibrated.
5. **symmetrize**: one task per head range sums duplicate ``(head, tail)``
   pairs in float64 and writes ``edges/part-RRRRR.parquet`` with one row group
   per head bucket, sorted by ``(bucket, head, tail)``
   (:func:`pipeline.affinity_dir.write_edges_file`), so that each training
   worker reads only its own rows; no process ever holds all edges.

Input and output may be local paths or URIs (``s3://bucket/prefix``, see
:mod:`pipeline.storage`). The output directory is built in a hidden sibling
(``.NAME.partial-HASH``) and moved into place at the end (copied, the manifest
last, on object stores; see :class:`pipeline.storage.StagedDir`); its
``manifest.json`` (:class:`pipeline.affinity_dir.AffinityManifest`) carries a
``config_hash`` so that a second run with the same input and settings returns
at once, and a run interrupted after the features stage resumes from the
partial directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import posixpath
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
from tqdm.auto import tqdm

from pipeline import schema
from pipeline.configs import AffinityJobConfig
from pipeline.affinity_dir import (
    AffinityDir,
    AffinityManifest,
    DataFile,
    EdgesFile,
    RowGroup,
    manifest_json,
    read_manifest,
    write_edges_file,
)
from pipeline.knn import (
    DEFAULT_MAX_INDEX_BYTES, DEFAULT_SEARCHES_PER_GPU, FeaturePart, build_indexes, gpu_share, gpu_task_options,
    method_for, peak_rss_mb, search_part,
)
from pipeline.pca import fit_pca, sample_rate, sample_rows, save_pca
from pipeline.session import quiet_init_kwargs, start_ray
from pipeline.shards import MAX_REPORT, ColumnSpec, InvalidInputError, duplicate_ids, list_parquet, read_shard, row_ids
from pipeline.storage import (
    StagedDir,
    exists,
    fingerprint,
    is_ours,
    join,
    read_json,
    resolve,
    write_bytes_atomic,
    write_parquet_atomic,
)
from ptsne.affinity import conditional_probabilities, default_k
from ptsne.device import faiss_gpu_build, set_num_threads
from ptsne.knn import check_gpu_k
from ptsne.pca import PCA

log = logging.getLogger(__name__)

#: Edges per symmetrisation partition when ``edge_partitions`` is automatic.
EDGES_PER_PARTITION = 8_000_000
_FEATURES_MARKER = "_features.json"


class TransientTaskError(RuntimeError):
    """A task failure worth retrying (Ray retries tasks that raise it)."""


#: Exceptions after which Ray re-runs a task (I/O hiccups and injected faults).
RETRY_EXCEPTIONS = [OSError, TransientTaskError]


def config_hash(config: AffinityJobConfig, input_fingerprint: list) -> str:
    """sha256 of the result-defining settings, the input files and the format version."""
    payload = {
        "format_version": schema.FORMAT_VERSION,
        "config": config.hash_fields(),
        "input": input_fingerprint,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


# --------------------------------------------------------------------------- Ray helpers


def _wait(refs: Sequence, desc: str) -> None:
    """Wait for ``refs`` with a progress bar."""
    import ray

    pending = list(refs)
    with tqdm(total=len(pending), desc=desc, unit="task", leave=False) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            bar.update(len(done))


@dataclass
class _Stage:
    name: str
    t0: float = field(default_factory=time.perf_counter)

    def done(self, stats: Sequence[dict], timings: dict, memory: dict) -> None:
        dt = time.perf_counter() - self.t0
        peak = max((s.get("peak_rss_mb", 0.0) for s in stats), default=0.0)
        timings[self.name] = round(dt, 3)
        memory[self.name] = round(peak, 1)
        log.info("stage %s: %.2f s, %d tasks, peak worker RSS %.0f MB, driver RSS %.0f MB",
                 self.name, dt, len(stats), peak, peak_rss_mb())


def _ensure_ray(address: str | None) -> None:
    start_ray(address, **quiet_init_kwargs(address))


# --------------------------------------------------------------------------- tasks


def _check_task(fs, path: str, spec: ColumnSpec, want_ids: bool, n_threads: int) -> dict:
    set_num_threads(n_threads)
    d = read_shard(fs, path, spec)
    bad = np.flatnonzero(d.bad) if d.X is not None else np.zeros(0, np.int64)
    out = {
        "path": path, "rows": d.rows, "dim": d.dim, "errors": d.errors, "dims": d.dims,
        "first_of_dim": d.first_of_dim, "bad": bad.astype(np.int64),
        "bad_ids": d.ids.take(pa.array(bad[:MAX_REPORT])) if d.ids is not None and not d.errors else None,
        "ids": d.ids.filter(pa.array(~d.bad)) if (want_ids and d.ids is not None and not d.errors) else None,
        "peak_rss_mb": peak_rss_mb(),
    }
    return out


def _sample_task(fs, path: str, spec: ColumnSpec, rate: float, seed: int, shard_index: int, n_threads: int):
    set_num_threads(n_threads)
    d = read_shard(fs, path, spec)
    X = d.X[~d.bad] if d.rows else np.zeros((0, 0), np.float32)
    return sample_rows(X, rate, seed, shard_index) if d.rows else X, {"peak_rss_mb": peak_rss_mb()}


def _features_task(
    fs, path: str, spec: ColumnSpec, shard_index: int, input_offset: int, row_offset: int,
    pca_state: dict | None, out_dir: str, batch_rows: int, n_threads: int,
) -> dict:
    set_num_threads(n_threads)
    d = read_shard(fs, path, spec)
    keep = ~d.bad
    parts = []
    rejects = None
    if d.rows:
        ids = row_ids(d, input_offset)
        if d.bad.any():
            pos = np.flatnonzero(d.bad)
            rejects = {"id": ids.take(pa.array(pos)), "position": pos}
        X = d.X[keep]
        ids = ids.filter(pa.array(keep))
        labels = d.labels.filter(pa.array(keep)) if d.labels is not None else None
        if pca_state is not None:
            X = PCA.from_state(pca_state).transform(X)
        for j, start in enumerate(range(0, X.shape[0], batch_rows)):
            stop = min(X.shape[0], start + batch_rows)
            name = f"part-{shard_index:05d}-{j:04d}.parquet"
            table = schema.features_table(
                np.arange(row_offset + start, row_offset + stop), ids[start:stop], X[start:stop],
                labels[start:stop] if labels is not None else None,
            )
            sha = write_parquet_atomic(fs, join(out_dir, name), table)
            parts.append({"path": f"{schema.FEATURES_DIR}/{name}", "rows": stop - start,
                          "sha256": sha, "start": row_offset + start})
    return {"parts": parts, "rejects": rejects, "peak_rss_mb": peak_rss_mb()}


def _inject_failure(marker: str | None, mode: str) -> None:
    if not marker:
        return
    try:
        with open(marker, "x") as f:
            f.write(f"failed once ({mode})\n")
    except FileExistsError:
        return
    if mode == "crash":
        os._exit(1)  # the worker dies without cleanup; Ray re-runs the task elsewhere
    raise TransientTaskError(f"injected failure (marker {marker})")


@dataclass(frozen=True)
class KnnTaskPlan:
    """Ray options of the kNN stage's tasks.

    ``split``: a search task (options ``search``) feeds a calibration task
    (options ``calibrate``) through the object store; otherwise one task
    (options ``search``) searches and calibrates.
    """

    split: bool
    search: dict
    calibrate: dict | None = None


def plan_knn_tasks(use_gpu: bool, task_cpus: int, searches_per_gpu: int = DEFAULT_SEARCHES_PER_GPU) -> KnnTaskPlan:
    """The tasks of the kNN stage and their resources.

    On CPUs one task per features part searches and calibrates (no round trip of
    the kNN graph through the object store). On a GPU the search holds
    ``1 / searches_per_gpu`` of a GPU (several searches share it: one search
    alone leaves it idle while it reads Parquet and merges shards) and
    ``task_cpus`` CPUs, and the calibration is a CPU task of ``task_cpus`` CPUs,
    so the GPU is released as soon as the neighbours are found; its worker exits
    after it (:func:`pipeline.knn.gpu_task_options`), with its CUDA context and
    FAISS GPU resources.
    """
    if isinstance(task_cpus, bool) or not isinstance(task_cpus, (int, np.integer)) or task_cpus < 1:
        raise ValueError(f"plan_knn_tasks: task_cpus must be an integer >= 1, got {task_cpus!r}")
    if not use_gpu:
        return KnnTaskPlan(split=False, search={"num_cpus": task_cpus})
    search = gpu_task_options({"num_cpus": task_cpus, "num_gpus": gpu_share(searches_per_gpu)})
    return KnnTaskPlan(split=True, search=search, calibrate={"num_cpus": task_cpus})


def max_concurrent(intervals: Sequence[tuple[float, float]]) -> int:
    """The most of the ``(start, end)`` intervals open at one time (an end before an equal start)."""
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals], key=lambda e: (e[0], e[1]))
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def _knn_search_task(
    fs, part: FeaturePart, index_refs: list, k: int, use_gpu: bool, n_threads: int, fail_marker: str | None,
    fail_mode: str = "raise",
) -> tuple:
    """kNN of one features part; returns ``(graph, stats)``."""
    set_num_threads(n_threads)
    _inject_failure(fail_marker, fail_mode)
    started = time.time()
    t = time.perf_counter()
    graph = search_part(fs, part, index_refs, k, use_gpu)
    # load_index raises rather than search on CPU when a GPU was asked for, so use_gpu is the device.
    stats = {"search_s": time.perf_counter() - t, "started": started, "finished": time.time(),
             "peak_rss_mb": peak_rss_mb(), "device": "cuda" if use_gpu else "cpu"}
    return graph, stats


def _calibration_task(
    found: tuple, part: FeaturePart, k: int, perplexities: tuple[float, ...], n: int, bounds: np.ndarray,
    n_threads: int,
):
    """Calibration of one features part from its search's ``(graph, stats)``: one edge block per head range + stats."""
    set_num_threads(n_threads)
    graph, search_stats = found
    t = time.perf_counter()
    *blocks, stats = _edge_blocks(graph, part, k, perplexities, n, bounds)
    stats.update(search_s=search_stats["search_s"], total_s=search_stats["search_s"] + time.perf_counter() - t,
                 peak_rss_mb=max(search_stats["peak_rss_mb"], peak_rss_mb()), device=search_stats["device"],
                 started=search_stats["started"], finished=search_stats["finished"])
    return (*blocks, stats)


def _knn_task(
    fs, part: FeaturePart, index_refs: list, k: int, perplexities: tuple[float, ...], n: int,
    bounds: np.ndarray, use_gpu: bool, n_threads: int, fail_marker: str | None, fail_mode: str = "raise",
):
    """kNN + calibration of one features part in one task; returns one edge block per head range + stats."""
    found = _knn_search_task(fs, part, index_refs, k, use_gpu, n_threads, fail_marker, fail_mode)
    return _calibration_task(found, part, k, perplexities, n, bounds, n_threads)


def _edge_blocks(graph, part: FeaturePart, k: int, perplexities: tuple[float, ...], n: int, bounds: np.ndarray):
    """Calibrated edges of one part and their transposes, one block per head range, then ``{rows, edges}``."""
    rows = np.arange(part.start, part.stop, dtype=np.int64)
    P = conditional_probabilities(graph.distances, perplexities)
    w = P.reshape(-1).astype(np.float64) / (2.0 * n)
    head = np.repeat(rows, k)
    tail = graph.indices.reshape(-1)
    nz = w > 0  # zero affinities (underflow) are not edges, as in the sparse sum
    head, tail, w = head[nz], tail[nz], w[nz]
    # Each conditional edge and its transpose: P = (C + C^T) / 2n after summing.
    H = np.concatenate([head, tail])
    T = np.concatenate([tail, head])
    W = np.concatenate([w, w])
    which = np.searchsorted(bounds[1:-1], H, side="right")
    order = np.argsort(which, kind="stable")
    counts = np.bincount(which, minlength=len(bounds) - 1)
    splits = np.cumsum(counts)[:-1]
    blocks = [
        (h, t_, w_)
        for h, t_, w_ in zip(np.split(H[order], splits), np.split(T[order], splits), np.split(W[order], splits))
    ]
    return (*blocks, {"rows": int(rows.size), "edges": int(H.size)})


def _reduce_task(fs, path: str, lo: int, hi: int, n: int, *blocks) -> dict:
    """Sum duplicate (head, tail) pairs of one head range and write its edges part."""
    H = np.concatenate([b[0] for b in blocks])
    T = np.concatenate([b[1] for b in blocks])
    W = np.concatenate([b[2] for b in blocks])
    key = (H - lo) * np.int64(n) + T
    del H, T
    order = np.argsort(key, kind="stable")
    key, W = key[order], W[order]
    del order
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if key.size else np.zeros(0, np.int64)
    w = np.add.reduceat(W, starts) if key.size else np.zeros(0)
    uk = key[starts]
    del key, W, starts
    head = uk // n + lo
    tail = uk % n
    written = write_edges_file(fs, path, head, tail, w)
    return {**written, "weight_sum": float(w.sum()), "head_start": int(lo), "head_stop": int(hi),
            "peak_rss_mb": peak_rss_mb()}


# --------------------------------------------------------------------------- driver


def _validate(config: AffinityJobConfig, fs, files: list[str], timings: dict, memory: dict) -> dict:
    import ray

    stage = _Stage("validate")
    spec = config.spec
    task = ray.remote(_check_task).options(
        num_cpus=config.task_cpus, max_retries=config.max_retries, retry_exceptions=RETRY_EXCEPTIONS
    )
    refs = [task.remote(fs, p, spec, config.id_col is not None, config.task_cpus) for p in files]
    _wait(refs, "validate")
    checks = ray.get(refs)
    stage.done(checks, timings, memory)

    problems = [f"{c['path']}: {e}" for c in checks for e in c["errors"]]
    dims = {c["dim"] for c in checks if c["dim"] is not None}
    if len(dims) > 1:
        by_dim = {}
        for c in checks:
            if c["dim"] is not None:
                by_dim.setdefault(c["dim"], []).append(c["path"])
        problems.append("shards have different vector dimensions: " + "; ".join(
            f"dim {d}: {len(p)} shard(s), first {p[0]}" for d, p in sorted(by_dim.items())))
    if len(problems) == 1:
        raise InvalidInputError(f"input rejected: {problems[0]}")
    if problems:
        raise InvalidInputError("input rejected:\n  " + "\n  ".join(problems))
    offsets = np.cumsum([0] + [c["rows"] for c in checks])
    n_bad = sum(int(c["bad"].size) for c in checks)
    if n_bad and not config.drop_invalid:
        first = []
        for c, off in zip(checks, offsets):
            if c["bad"].size:
                ids = c["bad_ids"] if c["bad_ids"] is not None else pa.array(off + c["bad"][:MAX_REPORT])
                first.extend(ids.to_pylist())
        raise InvalidInputError(
            f"input rejected: {n_bad} rows have NaN, Inf or missing vector values "
            f"(first ids: {', '.join(map(repr, first[:MAX_REPORT]))}); "
            f"fix them or drop them into a rejects file with drop_invalid / --drop-invalid"
        )
    if config.id_col is not None:
        ids = [c["ids"] for c in checks if c["ids"] is not None and len(c["ids"])]
        if ids:
            types = {a.type for a in ids}
            if len(types) > 1:
                raise InvalidInputError(f"input rejected: id column {config.id_col!r} has mixed types {sorted(map(str, types))}")
            count, first = duplicate_ids(pa.concat_arrays(ids))
            if count:
                raise InvalidInputError(
                    f"input rejected: {count} ids occur more than once in column "
                    f"{config.id_col!r} (first: {', '.join(map(repr, first))})"
                )
    n = int(offsets[-1]) - n_bad
    if n == 0:
        raise InvalidInputError(f"input rejected: no valid rows in {len(files)} shard(s)")
    return {"checks": checks, "offsets": offsets, "n": n, "n_bad": n_bad,
            "input_dim": int(next(iter(dims))), "n_input_rows": int(offsets[-1])}


def _resolve_k(config: AffinityJobConfig, n: int) -> int:
    perps = config.perplexities
    k = default_k(perps, n) if config.n_neighbors == "auto" else int(config.n_neighbors)
    if k > n - 1:
        raise ValueError(f"n_neighbors={k} needs at least {k + 1} valid rows, got n={n}")
    if max(perps) > k:
        raise ValueError(
            f"perplexity={max(perps)} cannot be reached with k={k} neighbours (n={n}); "
            f"use fewer perplexity or more points"
        )
    return k


def _max_index_bytes(config: AffinityJobConfig) -> int:
    """The configured limit, or min(2 GiB, 1/4 of the smallest alive node's object store)."""
    import ray

    if config.max_index_bytes is not None:
        return int(config.max_index_bytes)
    stores = [n["Resources"].get("object_store_memory", 0) for n in ray.nodes() if n.get("Alive")]
    stores = [s for s in stores if s > 0]
    return int(min(DEFAULT_MAX_INDEX_BYTES, min(stores) // 4)) if stores else DEFAULT_MAX_INDEX_BYTES


def knn_on_gpu(device: str, cluster_gpus: float, faiss_gpu: bool, method: str) -> bool:
    """Whether the kNN tasks ask for GPUs.

    ``device`` is the job's (``"auto"``, ``"cpu"``, ``"cuda"``), ``cluster_gpus`` what
    the Ray cluster has, ``faiss_gpu`` whether FAISS here is a GPU build and
    ``method`` the index type the GPU would search (``"exact"`` or ``"ivf"``, as
    :func:`pipeline.knn.method_for` resolves it for a GPU). FAISS's GPU build searches
    either; beside a CPU build a flat index is searched exactly in torch on the GPU
    (:class:`ptsne.flat.TorchFlatIndex`), and IVF, which torch has not, stays on
    CPUs. ``device="cuda"`` that no GPU can serve is refused (``ValueError``).
    """
    searchable = cluster_gpus > 0 and (faiss_gpu or method == "exact")
    if device == "cuda" and not searchable:
        raise ValueError(
            f"device='cuda' was asked for but the Ray cluster has {cluster_gpus:g} GPUs and FAISS "
            f"{'is' if faiss_gpu else 'is not'} a GPU build (torch searches a flat index only; "
            f"the index here is {method!r})"
        )
    if device == "auto" and cluster_gpus > 0 and not searchable:
        log.warning("kNN: the cluster has GPUs but FAISS is a CPU build and the index is IVF, which torch does not "
                    "search; searching on CPUs (install ptsne[gpu-cu12] or ptsne[gpu-cu13])")
    return device != "cpu" and searchable


def _use_gpu(config: AffinityJobConfig, n: int) -> bool:
    """:func:`knn_on_gpu` for the connected cluster and ``n`` points."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    return knn_on_gpu(config.device, gpus, faiss_gpu_build(),
                      method_for(config.knn_method, n, use_gpu=True))


def build_affinities(config: AffinityJobConfig) -> dict:
    """Build an affinity directory (features, joint-P edges, manifest) with Ray.

    Parameters
    ----------
    config : AffinityJobConfig

    Returns
    -------
    dict
        The manifest (also written to ``<output>/manifest.json``). When the
        output already holds a manifest with the same ``config_hash`` it is
        returned without recomputing.

    Raises
    ------
    InvalidInputError
        The input was rejected; nothing was written.
    FileExistsError
        The output holds something else and ``overwrite`` is false.
    """
    import ray

    if not isinstance(config, AffinityJobConfig):
        raise TypeError(f"build_affinities: config must be an AffinityJobConfig, got {type(config).__name__}")
    t_start = time.perf_counter()
    fs_in, in_path = resolve(config.input)
    files = list_parquet(fs_in, in_path)
    fs, out = resolve(config.output)
    chash = config_hash(config, fingerprint(fs_in, files))
    existing = read_manifest(config.output)
    if existing is not None and existing.get("config_hash") == chash:
        log.info("affinities: %s is up to date (config_hash %s), nothing to do", config.output, chash[:12])
        return existing
    if existing is not None and existing.get("format_version") != schema.FORMAT_VERSION and not config.overwrite:
        raise FileExistsError(
            f"output {config.output!r} holds an affinity directory of format_version "
            f"{existing.get('format_version')!r} (this version writes {schema.FORMAT_VERSION}); "
            "pass overwrite (--overwrite) to rebuild it"
        )
    staged = StagedDir(fs, out, staging=_staging_path(config.output, out, chash), keep_on_error=True,
                       overwrite=config.overwrite, commit=(schema.MANIFEST_FILE,))
    staged.check_target()
    _ensure_ray(config.ray_address)
    timings: dict = {}
    memory: dict = {}
    opts = dict(num_cpus=config.task_cpus, max_retries=config.max_retries, retry_exceptions=RETRY_EXCEPTIONS)
    log.info("affinities: %d shard(s) from %s -> %s", len(files), config.input, config.output)

    marker_path = join(staged.staging, _FEATURES_MARKER)
    feat = read_json(fs, marker_path)
    resumed = feat is not None
    if resumed:
        log.info("affinities: reusing the features of an interrupted run in %s", staged.staging)
        k = _resolve_k(config, feat["n"])
    else:
        v = _validate(config, fs_in, files, timings, memory)
        k = _resolve_k(config, v["n"])
        if config.pca_components is not None and config.pca_components > v["input_dim"]:
            raise ValueError(f"pca_components={config.pca_components} exceeds the input dimension {v['input_dim']}")
    use_gpu = _use_gpu(config, feat["n"] if resumed else v["n"])
    if use_gpu and faiss_gpu_build():
        check_gpu_k(k)  # FAISS GPU selects at most 2048: refused before features and index are built

    with staged as stage_dir:
        if not resumed:
            feat = _features_stage(config, fs_in, files, v, fs, stage_dir, opts, timings, memory)
            write_bytes_atomic(fs, marker_path, json.dumps(feat).encode())
        n, dim = feat["n"], feat["dim"]
        parts = [FeaturePart(join(stage_dir, p["path"]), p["start"], p["rows"]) for p in feat["parts"]]

        # kNN index: whole through the object store, or sharded by row range.
        stage = _Stage("knn_index")
        max_index_bytes = _max_index_bytes(config)
        method, nested = build_indexes(fs, parts, dim, k, config.knn_method, config.target_recall, config.seed,
                                       max_index_bytes, opts, config.task_cpus, use_gpu)
        infos = [info for _, _, info in nested]
        n_index_shards = len(nested)
        stage.done(infos, timings, memory)
        recall = None if method == "exact" else min(i["recall"] for i in infos)
        log.info("kNN: n=%d dim=%d k=%d method=%s index shards=%d recall=%s gpu=%s",
                 n, dim, k, method, len(nested), recall, use_gpu)

        # kNN search + calibration + map side of the shuffle.
        stage = _Stage("knn_affinities")
        n_parts = config.edge_partitions or max(1, math.ceil(2 * n * k / EDGES_PER_PARTITION))
        n_parts = int(min(n_parts, n))
        bounds = np.linspace(0, n, n_parts + 1).round().astype(np.int64)
        plan = plan_knn_tasks(use_gpu, config.task_cpus, config.knn_searches_per_gpu)
        retry = dict(max_retries=config.max_retries, retry_exceptions=RETRY_EXCEPTIONS)
        if plan.split:
            search_task = ray.remote(_knn_search_task).options(**retry, **plan.search)
            calibration_task = ray.remote(_calibration_task).options(num_returns=n_parts + 1, **retry,
                                                                     **plan.calibrate)
        else:
            knn_task = ray.remote(_knn_task).options(num_returns=n_parts + 1, **retry, **plan.search)
        edge_dir = join(stage_dir, schema.EDGES_DIR)
        if exists(fs, edge_dir):
            fs.delete_dir_contents(edge_dir)
        fs.create_dir(edge_dir, recursive=True)
        blocks, stat_refs = [], []
        for p in parts:
            if plan.split:
                found = search_task.remote(fs, p, nested, k, use_gpu, config.task_cpus, config.inject_failure,
                                           config.inject_failure_mode)
                out_refs = calibration_task.remote(found, p, k, config.perplexities, n, bounds, config.task_cpus)
            else:
                out_refs = knn_task.remote(fs, p, nested, k, config.perplexities, n, bounds, use_gpu,
                                           config.task_cpus, config.inject_failure, config.inject_failure_mode)
            blocks.append(out_refs[:-1])
            stat_refs.append(out_refs[-1])
        _wait(stat_refs, "knn + calibration")
        knn_stats = ray.get(stat_refs)
        log.info("kNN: %d part(s) searched on %s, at most %d searches at once%s", len(knn_stats),
                 ", ".join(sorted({s["device"] for s in knn_stats})),
                 max_concurrent([(s["started"], s["finished"]) for s in knn_stats]),
                 f" ({plan.search.get('num_gpus', 0):g} GPU each)" if plan.split else "")
        stage.done(knn_stats, timings, memory)
        del nested  # the index can leave the object store

        stage = _Stage("symmetrize")
        reduce_task = ray.remote(_reduce_task).options(**opts)
        red_refs = []
        for r in range(n_parts):
            path = join(edge_dir, schema.part_name(r))
            red_refs.append(reduce_task.remote(fs, path, int(bounds[r]), int(bounds[r + 1]), n, *[b[r] for b in blocks]))
        _wait(red_refs, "symmetrize")
        reduced = ray.get(red_refs)
        del blocks
        stage.done(reduced, timings, memory)
        total = math.fsum(r["weight_sum"] for r in reduced)
        log.info("symmetrize: %d edges in %d parts, weight sum %.9f", sum(r["rows"] for r in reduced), n_parts, total)

        timings["total"] = round(time.perf_counter() - t_start, 3)
        manifest = AffinityManifest(
            n=int(n), input_dim=int(feat["input_dim"]), dim=int(dim), k=int(k),
            perplexities=config.perplexities,
            features=tuple(DataFile(p["path"], p["rows"], p["sha256"]) for p in feat["parts"]),
            edges=tuple(
                EdgesFile(f"{schema.EDGES_DIR}/{schema.part_name(r)}", red["rows"], red["sha256"], red["bytes"],
                          red["head_start"], red["head_stop"], tuple(RowGroup(b, c) for b, c in red["row_groups"]))
                for r, red in enumerate(reduced)
            ),
            edge_buckets=schema.EDGE_BUCKETS,
            config_hash=chash,
            n_edges=int(sum(r["rows"] for r in reduced)),
            weight_sum=total,
            knn_method=method,
            knn_recall=recall,
            knn_index_shards=n_index_shards,
            knn_nprobe=infos[0]["nprobe"],
            max_index_bytes=max_index_bytes,
            vector_col=config.vector_col,
            feature_cols=config.feature_cols,
            id_col=config.id_col,
            label_col=config.label_col,
            pca_components=config.pca_components,
            pca_file=DataFile(schema.PCA_FILE, 0, feat["pca_sha256"]) if feat.get("pca_sha256") else None,
            n_input_rows=int(feat["n_input_rows"]),
            n_rejected=int(feat["n_rejected"]),
            rejects=schema.REJECTS_FILE if feat["n_rejected"] else None,
            input=config.input,
            timings_s=timings if not resumed else {**feat.get("timings_s", {}), **timings},
            peak_worker_rss_mb=memory if not resumed else {**feat.get("peak_worker_rss_mb", {}), **memory},
            created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        fs.delete_file(marker_path)
        write_bytes_atomic(fs, join(stage_dir, schema.MANIFEST_FILE), manifest_json(manifest))
    _remove_stale_partials(fs, out)
    log.info("affinities: wrote %s in %.1f s", config.output, time.perf_counter() - t_start)
    return manifest.to_dict()


def _staging_path(output: str, out: str, chash: str) -> str:
    """The partial build of ``out`` for a config hash: ``.NAME.partial-HASH`` next to it."""
    parent, name = posixpath.split(out.rstrip("/"))
    if not parent or not name:
        raise ValueError(
            f"output {output!r} is the root of its filesystem or bucket; give a directory inside it "
            f"(e.g. {output.rstrip('/')}/affinities)"
        )
    return join(parent, f".{name}.partial-{chash[:16]}")


def _remove_stale_partials(fs: pafs.FileSystem, out: str) -> None:
    """Delete partial builds of ``out`` (``.NAME.partial-*``) left by interrupted runs with other settings."""
    parent, name = posixpath.split(out.rstrip("/"))
    prefix = f".{name}.partial-"
    for info in fs.get_file_info(pafs.FileSelector(parent, recursive=False)):
        base = posixpath.basename(info.path)
        if info.type == pafs.FileType.Directory and base.startswith(prefix) and is_ours(base):
            log.info("affinities: removing the stale partial build %s", info.path)
            fs.delete_dir(info.path)


def _features_stage(config, fs_in, files, v, fs, stage_dir, opts, timings, memory) -> dict:
    import ray

    spec = config.spec
    checks, offsets = v["checks"], v["offsets"]
    pca_state = None
    pca_sha = None
    if config.pca_components is not None:
        stage = _Stage("pca")
        rate = sample_rate(v["n"], config.pca_samples)
        task = ray.remote(_sample_task).options(num_returns=2, **opts)
        refs = [task.remote(fs_in, p, spec, rate, config.seed, i, config.task_cpus) for i, p in enumerate(files)]
        _wait([r[1] for r in refs], "pca sample")
        samples = ray.get([r[0] for r in refs])
        pca = fit_pca(samples, int(config.pca_components), config.seed)
        pca_state = pca.state()
        pca_sha = save_pca(fs, join(stage_dir, schema.PCA_FILE), pca)
        stage.done(ray.get([r[1] for r in refs]), timings, memory)

    stage = _Stage("features")
    feat_dir = join(stage_dir, schema.FEATURES_DIR)
    fs.create_dir(feat_dir, recursive=True)
    task = ray.remote(_features_task).options(**opts)
    row_offsets = np.cumsum([0] + [c["rows"] - c["bad"].size for c in checks])
    refs = [
        task.remote(fs_in, p, spec, i, int(offsets[i]), int(row_offsets[i]), pca_state, feat_dir,
                    config.batch_rows, config.task_cpus)
        for i, p in enumerate(files)
    ]
    _wait(refs, "features")
    results = ray.get(refs)
    stage.done(results, timings, memory)
    parts = [p for r in results for p in r["parts"]]
    rejected = [(files[i], r["rejects"]) for i, r in enumerate(results) if r["rejects"] is not None]
    n_rejected = 0
    if rejected:
        table = pa.table({
            "id": pa.concat_arrays([r["id"] for _, r in rejected]),
            "shard": pa.array([f for f, r in rejected for _ in range(len(r["position"]))]),
            "position": pa.array(np.concatenate([r["position"] for _, r in rejected]).astype(np.int64)),
            "reason": pa.array(["nan, inf or missing vector values"] * sum(len(r["position"]) for _, r in rejected)),
        })
        n_rejected = table.num_rows
        write_parquet_atomic(fs, join(stage_dir, schema.REJECTS_FILE), table)
        log.warning("affinities: dropped %d invalid rows into %s", n_rejected, schema.REJECTS_FILE)
    dim = config.pca_components or v["input_dim"]
    return {"n": v["n"], "dim": int(dim), "input_dim": v["input_dim"], "n_input_rows": v["n_input_rows"],
            "n_rejected": n_rejected, "parts": parts, "pca_sha256": pca_sha,
            "timings_s": dict(timings), "peak_worker_rss_mb": dict(memory)}


def load_edges(output: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All edges of an affinity directory as ``(head, tail, weight)`` sorted by ``(head, tail)`` (small data, tests)."""
    edges = AffinityDir(output).read_edges()
    return edges.head, edges.tail, edges.weight


def load_features(output: str) -> pa.Table:
    """All features of an affinity directory in row order (small data, tests)."""
    return AffinityDir(output).read_features()


def load_pca_of(output: str):
    """The PCA of an affinity directory, or ``None`` when none was applied."""
    return AffinityDir(output).load_pca()
