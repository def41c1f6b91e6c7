"""Data-parallel training of the mapper with Ray Train (``TorchTrainer`` + DDP).

The input is an affinity directory (``manifest.json``, ``features/``, ``edges/``,
optional ``pca.safetensors``), a local path or a URI (``s3://bucket/prefix``),
read through :class:`pipeline.affinity_dir.AffinityDir`; ``storage_path`` may be
a URI too. The same pieces as the
single-process :func:`ptsne.train.fit_mapper` do the work: ``NeighborSampler``
draws one neighbour per anchor, ``run_epoch`` runs the optimisation steps,
``make_optimizer`` / ``make_scheduler`` set up Adam and its cosine decay.

Sharding
    Worker ``w`` of ``W`` owns the rows ``r`` with ``shard_of(r, W) == w`` (a
    fixed integer hash). A hash rather than contiguous ranges keeps each
    worker's anchors a uniform sample of the whole dataset even when the input
    is sorted (by class, by date, ...), so the batch anchors still estimate the
    normaliser ``Z`` without bias, exactly as in a single process. The edges
    files group P's rows by the same hash modulo ``edge_buckets`` (240), one
    Parquet row group per bucket; when ``W`` divides it, each worker reads only
    the row groups of its buckets (about ``1 / W`` of the edges), straight from
    the filesystem of the affinity directory (local or ``s3://``), and fills
    its ``NeighborSampler`` in place: at most 16 bytes per owned edge
    (:meth:`pipeline.affinity_dir.AffinityDir.read_worker_edges`). Otherwise it
    reads every row group and keeps its rows.

Features
    Each epoch a worker needs the features of its anchors (fixed) and of the
    neighbours it sampled (any row). Up to ``object_store_max_bytes`` the whole
    features array is put in the Ray object store once and read zero-copy by
    every worker of a node. Beyond it, each worker gathers the rows it needs by
    streaming the features shards once per epoch through the directory's
    filesystem (a join of the sampled neighbours with the features on ``row``),
    so its memory holds its anchors and its sampled neighbours, never the whole
    array. ``docs/training.md`` gives the bound.

Reproducibility
    Every random draw comes from a generator seeded with ``(seed, rank,
    epoch)``, so the same seed and worker count give the same weights on CPU,
    and a run resumed from a checkpoint (written at the end of an epoch)
    continues exactly where the interrupted one left off.

Reference
    After training, :func:`fit_reference` gives the estimator a reference on the
    driver: up to ``reference_size`` training points (a seeded uniform sample
    beyond it, drawn as ``ParametricTSNE.fit`` draws it), with the affinity
    directory's P when every row is in the reference and a P of the sample
    otherwise (see ``ParametricTSNE.fit_reference``).

Progress
    Training is counted in optimisation steps, run in epochs. The workers report
    (rank 0 with a checkpoint) at the end of an epoch when :func:`report_due`
    says so: after ``report_seconds`` (default 5 s) or ``report_steps``, at the
    end of the early exaggeration and of training. Each report is one history
    entry, the mean of the steps since the previous one, so small data (epochs
    of one step) is not held up by a report per step: Ray Train takes a report
    off a worker every 2 s. A driver-side ``on_epoch`` callback receives them as
    they arrive (through a Ray Train ``UserCallback`` on the controller and a
    queue to the driver).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline import schema, storage
from pipeline.affinity_dir import AffinityDir, AffinityManifest
from pipeline.configs import (  # noqa: F401 (exported)
    DEFAULT_OBJECT_STORE_MAX_BYTES,
    FEATURE_SOURCES,
    DistributedTrainConfig,
)
from pipeline.knn import peak_rss_mb
from pipeline.session import start_ray
from ptsne.device import resolve_precision, set_num_threads, training_precision
from ptsne.estimator import ParametricTSNE, params_of
from ptsne.loss import TSNELoss
from ptsne.model import Mapper, build_mapper
from ptsne.pca import PCA
from ptsne.train import (
    NeighborSampler,
    epoch_metrics,
    make_optimizer,
    make_scheduler,
    run_epoch,
    to_device,
)

log = logging.getLogger(__name__)

CHECKPOINT_CONFIG = "config.json"
CHECKPOINT_WEIGHTS = "model.safetensors"
CHECKPOINT_OPTIMIZER = "optimizer.pt"
CHECKPOINT_STATE = "state.json"

#: Values ``train_distributed(edges_ingest=...)`` still accepts; it is ignored (each worker reads its own edges).
EDGES_INGEST = ("auto", "stream", "materialize")

#: A worker callback gets ``(epoch, metrics)`` at each report (epoch: the last one run) and returns True to stop.
WorkerCallback = Callable[[int, dict], bool | None]
#: A driver callback gets each report's metrics (a history entry) while training runs.
EpochCallback = Callable[[dict], None]

_SCAN_BATCH_ROWS = 65536


@dataclass
class TrainResult:
    """What :func:`train_distributed` returns.

    Attributes
    ----------
    estimator : ParametricTSNE
        The fitted estimator (PCA included when the affinities were built with it),
        ready for ``transform`` and ``save``.
    history : list of dict
        One entry per report, over all workers: ``loss``, ``attraction`` and ``log_z``
        averaged over the ``steps`` optimisation steps since the previous report (its
        ``epochs`` epochs, the last of which is ``epoch``), ``step`` (steps run so far),
        ``exaggeration``, ``phase``, ``learning_rate`` (after the last step), ``seconds``.
    checkpoint_path : str
        Directory of the last checkpoint.
    resumed_from : list of int
        Epochs at which a worker group started from a checkpoint (empty when the
        run was never interrupted).
    seconds : float
        Wall time of the Ray Train run.
    reference_seconds : float
        Wall time of the reference stage (reading the points included; 0 without one).
    edges_bytes_read : list of int
        Per rank: compressed bytes of the edges' column chunks the worker read.
    edges_bytes_total : int
        Compressed bytes of every edges file's column chunks (what one worker reading all would read).
    owned_edges, owned_rows : list of int
        Per rank: edges and rows of P the worker owns.
    sampler_bytes : list of int
        Per rank: bytes of the worker's ``NeighborSampler`` tensors.
    worker_peak_rss_mb : list of float
        Per rank: peak resident memory of the worker process up to its last epoch.

    The per-rank figures are those of the worker group that ran the last epoch.
    """

    estimator: ParametricTSNE
    history: list[dict]
    checkpoint_path: str
    resumed_from: list[int]
    seconds: float
    reference_seconds: float = 0.0
    edges_bytes_read: list[int] = field(default_factory=list)
    edges_bytes_total: int = 0
    owned_edges: list[int] = field(default_factory=list)
    owned_rows: list[int] = field(default_factory=list)
    sampler_bytes: list[int] = field(default_factory=list)
    worker_peak_rss_mb: list[float] = field(default_factory=list)


# -- rows, features and edges of a worker ----------------------------------------------


def shard_of(rows: np.ndarray, num_shards: int) -> np.ndarray:
    """Owner worker of each row: a fixed 64-bit mix of the row index, modulo ``num_shards``.

    The edges files bucket their heads with the same mix (``schema.bucket_of``),
    so for a ``num_shards`` that divides the bucket count a worker's rows are
    whole buckets.
    """
    return schema.bucket_of(rows, num_shards)


def feature_moments(batches: Iterator[np.ndarray], dim: int) -> tuple[np.ndarray, float]:
    """Mean (dim,) and the single scale of :class:`ptsne.model.Standardize`, in one pass."""
    total = np.zeros(dim)
    sq = 0.0
    count = 0
    for B in batches:
        B = B.astype(np.float64)
        total += B.sum(axis=0)
        sq += float((B * B).sum())
        count += len(B)
    if count == 0:
        raise ValueError("features: no rows")
    mean = total / count
    var = max(sq / count - float(mean @ mean), 0.0)
    return mean.astype(np.float32), math.sqrt(var) or 1.0


class SharedFeatures:
    """Features read from one array (the object store's zero-copy view on a node)."""

    def __init__(self, X: np.ndarray):
        self.X = X

    def fetch(self, rows: np.ndarray) -> np.ndarray:
        return self.X[rows]


class ScannedFeatures:
    """Features gathered by streaming the features files: memory holds only the rows asked for."""

    def __init__(self, affinity: AffinityDir):
        self.affinity = affinity
        self.dim = int(affinity.manifest.dim)

    def fetch(self, rows: np.ndarray) -> np.ndarray:
        uniq, inverse = np.unique(rows, return_inverse=True)
        out = np.empty((len(uniq), self.dim), dtype=np.float32)
        found = np.zeros(len(uniq), dtype=bool)
        for r, vectors in self.affinity.iter_features(_SCAN_BATCH_ROWS):
            pos = np.searchsorted(uniq, r)
            hit = pos < len(uniq)
            hit[hit] = uniq[pos[hit]] == r[hit]
            out[pos[hit]] = vectors[hit]
            found[pos[hit]] = True
        if not found.all():
            raise ValueError(f"features: {int((~found).sum())} requested rows are missing from the shards")
        return out[inverse]


# -- checkpoints ------------------------------------------------------------------------


def save_checkpoint(
    directory: Path,
    mapper: Mapper,
    optimizer: torch.optim.Optimizer,
    scheduler,
    state: dict,
    config: dict,
) -> None:
    """Write an epoch checkpoint: config JSON, safetensors weights, optimiser state, progress."""
    directory = Path(directory)
    (directory / CHECKPOINT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    weights = {k: v.detach().cpu().contiguous() for k, v in mapper.state_dict().items()}
    save_file(weights, str(directory / CHECKPOINT_WEIGHTS))
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
        directory / CHECKPOINT_OPTIMIZER,
    )
    (directory / CHECKPOINT_STATE).write_text(json.dumps(state, indent=2))


def load_checkpoint(directory: str | os.PathLike) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """``(config, state, mapper weights)`` of a checkpoint directory."""
    directory = Path(directory)
    config = json.loads((directory / CHECKPOINT_CONFIG).read_text())
    state = json.loads((directory / CHECKPOINT_STATE).read_text())
    return config, state, load_file(str(directory / CHECKPOINT_WEIGHTS))


def load_optimizer_state(directory: str | os.PathLike) -> dict:
    """The optimiser and scheduler state of a checkpoint, its tensors on CPU.

    A checkpoint written by a GPU worker resumes anywhere: ``load_state_dict`` of
    the optimiser moves each state tensor onto its parameter's device.
    """
    return torch.load(Path(directory) / CHECKPOINT_OPTIMIZER, map_location="cpu", weights_only=True)


def check_gpu_workers(num_workers: int, use_gpu: bool, gpus_per_worker: float) -> None:
    """Refuse training workers that could share a GPU (``ValueError``).

    With less than one GPU per worker Ray may place several workers on one GPU;
    they all train on its ``cuda:0`` and NCCL refuses duplicate GPUs at the first
    collective, so such a run could only crash.
    """
    if not use_gpu:
        return
    if not float(gpus_per_worker) > 0:
        raise ValueError(f"GPU training needs gpus_per_worker > 0, got {gpus_per_worker!r}")
    if num_workers > 1 and float(gpus_per_worker) < 1:
        raise ValueError(
            f"{num_workers} training workers with {float(gpus_per_worker):g} GPU each could share a GPU, "
            "which NCCL refuses (two ranks on one device); give each worker a whole GPU (1) or train "
            "with one worker"
        )


def mapper_from_checkpoint(directory: str | os.PathLike) -> tuple[Mapper, dict, dict]:
    """Rebuild the trained mapper from a checkpoint: ``(mapper, config, state)``."""
    config, state, weights = load_checkpoint(directory)
    train = DistributedTrainConfig.from_dict(config["train"])
    mapper = build_mapper(train.model_config(int(config["dim"])))
    mapper.load_state_dict(weights)
    return mapper.eval(), config, state


# -- the worker -------------------------------------------------------------------------


def _epoch_seed(seed: int, rank: int, epoch: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(rank), int(epoch)]).generate_state(1)[0])


def _all_reduce(values: torch.Tensor, op: str) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # NCCL reduces CUDA tensors only; gloo takes the CPU tensor as is.
        work = values.cuda() if dist.get_backend() == "nccl" else values.clone()
        dist.all_reduce(work, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
        values = work.cpu()
    return values


def _gather(value: float, rank: int, world: int, dtype=torch.float64) -> list:
    """``value`` of every rank, in rank order (an all-reduce of one slot per rank)."""
    slots = torch.zeros(world, dtype=dtype)
    slots[rank] = value
    return _all_reduce(slots, "sum").tolist()


def _hand_back_finished(checkpoint, state: dict, rank: int, n_epochs: int) -> None:
    """A finished run started again: report its last checkpoint as the result, without reading any data."""
    import ray.train

    history = state.get("history") or []
    last = history[-1] if history else {"epoch": n_epochs - 1}
    if rank != 0:
        ray.train.report(last)
        return
    with tempfile.TemporaryDirectory(prefix="ptsne-ckpt-") as d, checkpoint.as_directory() as src:
        shutil.copytree(src, d, dirs_exist_ok=True)
        final = {**state, "epoch": n_epochs - 1, "stopped": False}
        (Path(d) / CHECKPOINT_STATE).write_text(json.dumps(final, indent=2))
        ray.train.report(last, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=f"epoch-{n_epochs - 1:05d}-final")


def report_due(config: DistributedTrainConfig, epoch: int, steps: int, seconds: float) -> bool:
    """Whether the workers report (and rank 0 checkpoints) after ``epoch``.

    ``steps`` optimisation steps and ``seconds`` have passed since the last report.
    Due at the end of the early exaggeration and of training (so that no history
    entry mixes phases), and after ``config.report_steps`` steps or
    ``config.report_seconds`` seconds (each None: never by it).
    """
    tc = config.train
    if epoch in (tc.early_epochs - 1, tc.n_epochs - 1):
        return True
    if config.report_steps is not None and steps >= config.report_steps:
        return True
    return config.report_seconds is not None and seconds >= config.report_seconds


def _train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train worker: read this worker's rows of P, train with DDP, report and checkpoint per :func:`report_due`."""
    import ray
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    set_num_threads(loop_config["cpus_per_worker"])
    device = ray.train.torch.get_device()
    config = DistributedTrainConfig.from_dict(loop_config["train"])
    tc = config.train
    m = tc.positives_per_anchor
    affinity: AffinityDir = loop_config["affinity"]
    n, dim = affinity.manifest.n, affinity.manifest.dim

    start_epoch, history, resumed_from = 0, [], []
    checkpoint = ray.train.get_checkpoint()
    weights = optimizer_state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            _, state, weights = load_checkpoint(d)
            optimizer_state = load_optimizer_state(d)
        start_epoch = int(state["epoch"]) + 1
        if start_epoch >= tc.n_epochs:
            _hand_back_finished(checkpoint, state, rank, tc.n_epochs)
            return
        history = state["history"]
        resumed_from = state.get("resumed_from", []) + [start_epoch]
        log.info("worker %d: resuming at epoch %d", rank, start_epoch)

    if loop_config["features_ref"] is not None:
        source = SharedFeatures(ray.get(loop_config["features_ref"][0]))
    else:
        source = ScannedFeatures(affinity)

    # This worker's rows of P, read straight from their row groups: anchor sampling
    # needs every edge of a row on the worker that owns it.
    edges = affinity.read_worker_edges(rank, world)
    rows = edges.rows  # the anchors this worker owns, sorted
    X_anchor = source.fetch(rows)
    sampler = NeighborSampler.from_csr(edges.indptr, edges.tail, edges.weight, "cpu")
    read, total = edges.bytes_read, edges.bytes_total
    del edges
    log.info("worker %d of %d: %d rows, %d edges (sampler %.1f bytes per edge), read %.1f of %.1f MB of edges",
             rank, world, len(rows), sampler.n_edges, sampler.nbytes / max(1, sampler.n_edges),
             read / 2**20, total / 2**20)
    workers = {
        "edges_bytes_read": [int(v) for v in _gather(read, rank, world, torch.int64)],
        "edges_bytes_total": int(total),
        "owned_edges": [int(v) for v in _gather(sampler.n_edges, rank, world, torch.int64)],
        "owned_rows": [int(v) for v in _gather(len(rows), rank, world, torch.int64)],
        "sampler_bytes": [int(v) for v in _gather(sampler.nbytes, rank, world, torch.int64)],
    }

    # Every worker must run the same number of steps or DDP's all-reduce blocks.
    n_min = min(workers["owned_rows"])
    batch = min(max(2, tc.batch_size // world), n_min)
    steps = n_min // batch
    if batch < 2 or steps < 1:
        raise ValueError(f"worker {rank}: {n_min} anchors are too few for batches of {batch}")

    torch.manual_seed(tc.seed)
    mapper = build_mapper(config.model_config(dim))
    with torch.no_grad():
        mapper.standardize.mean.copy_(torch.as_tensor(np.asarray(loop_config["mean"], dtype=np.float32)))
        mapper.standardize.scale.fill_(float(loop_config["scale"]))
    if weights is not None:
        mapper.load_state_dict(weights)

    model = ray.train.torch.prepare_model(mapper)
    module = model.module if hasattr(model, "module") else model
    optimizer = make_optimizer(model, tc)
    scheduler = make_scheduler(optimizer, tc, steps)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state["optimizer"])
        scheduler.load_state_dict(optimizer_state["scheduler"])
    loss_fn = TSNELoss(tc.dof)
    autocast_dtype = resolve_precision(tc.precision, device)
    callbacks = loop_config.get("callbacks") or ()
    checkpoint_config = {key: loop_config[key] for key in ("train", "n", "dim", "num_workers")}

    X_anchor_t = to_device(X_anchor, device)  # once: this worker's anchors stay on the device
    # The steps since the last report: their summed metrics (on the device), count, first epoch and start.
    sums, round_steps, round_start, t0 = None, 0, start_epoch, time.perf_counter()
    with training_precision(device, autocast_dtype):  # TF32 on CUDA while training, restored after
        for epoch in range(start_epoch, tc.n_epochs):
            model.train()
            gen = torch.Generator().manual_seed(_epoch_seed(tc.seed, rank, epoch))
            anchors = torch.randperm(len(rows), generator=gen)[: steps * batch]
            heads = anchors if m == 1 else anchors.repeat_interleave(m)
            tails, importance = sampler.sample(heads, gen)
            # One gather and one upload per epoch: the neighbour features of all of this epoch's steps.
            X_tail = to_device(source.fetch(tails.numpy()), device)
            anchors_d, importance_d = to_device(anchors, device), to_device(importance, device)
            batches = ((X_anchor_t[anchors_d[s * batch:(s + 1) * batch]],
                        X_tail[s * batch * m:(s + 1) * batch * m],  # neighbours, anchor-major
                        importance_d[s * batch * m:(s + 1) * batch * m]) for s in range(steps))
            means = run_epoch(model, optimizer, scheduler, loss_fn, batches, n, tc.exaggeration_at(epoch),
                              autocast_dtype)
            del X_tail, batches
            sums = means * steps if sums is None else sums + means * steps
            round_steps += steps
            due = report_due(config, epoch, round_steps, time.perf_counter() - t0)
            if config.report_seconds is not None:  # each worker has its own clock: all report when one is due
                due = bool(_all_reduce(torch.tensor([int(due)]), "max")[0])
            if not due:
                continue
            means = _all_reduce((sums / round_steps).cpu(), "sum") / world
            metrics = epoch_metrics(epoch, means.tolist(), tc, scheduler.get_last_lr()[0], time.perf_counter() - t0)
            metrics.update(steps=round_steps, step=(epoch + 1) * steps, epochs=epoch + 1 - round_start)
            # The slowest worker's clock stands for the steps; all workers synchronise every step.
            metrics["seconds"] = float(_all_reduce(torch.tensor([metrics["seconds"]], dtype=torch.float64), "max")[0])
            workers["peak_rss_mb"] = [round(v, 1) for v in _gather(peak_rss_mb(), rank, world)]
            history.append(metrics)
            stop = any(bool(cb(epoch, metrics)) for cb in callbacks)
            stop = bool(_all_reduce(torch.tensor([int(stop)]), "max")[0])
            if rank == 0:
                state = {"epoch": epoch, "history": history, "resumed_from": resumed_from, "stopped": stop,
                         "workers": workers}
                with tempfile.TemporaryDirectory(prefix="ptsne-ckpt-") as d:
                    save_checkpoint(Path(d), module, optimizer, scheduler, state, checkpoint_config)
                    ray.train.report(
                        metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                        checkpoint_dir_name=f"epoch-{epoch:05d}",
                    )
            else:
                ray.train.report(metrics)
            if stop:
                log.info("worker %d: stopped by a callback after epoch %d", rank, epoch)
                break
            sums, round_steps, round_start, t0 = None, 0, epoch + 1, time.perf_counter()


# -- the driver ---------------------------------------------------------------------------


def train_key(
    affinity_dir: AffinityDir | str | os.PathLike, config: DistributedTrainConfig, num_workers: int,
    reference: bool = True,
) -> str:
    """The identity of a training run: its data, settings and worker count, hashed.

    The data are the affinity directory's ``config_hash`` and location, the settings
    those that change the model (:meth:`DistributedTrainConfig.fingerprint`).
    ``reference=False`` leaves the reference settings out: the identity of the
    trained network, which names the Ray Train run (:func:`run_name`); ``ptsne
    train`` stamps its model with the whole identity.
    """
    affinity = affinity_dir if isinstance(affinity_dir, AffinityDir) else AffinityDir(affinity_dir)
    key = json.dumps(
        [affinity.manifest.config_hash, affinity.uri, config.fingerprint(reference=reference), num_workers]
    )
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def run_name(
    affinity_dir: AffinityDir | str | os.PathLike, config: DistributedTrainConfig, num_workers: int
) -> str:
    """The Ray Train run of (data, network settings, worker count): same name, same run to resume."""
    return "ptsne-train-" + train_key(affinity_dir, config, num_workers, reference=False)[:12]


def train_distributed(
    affinity_dir: str | os.PathLike,
    config: DistributedTrainConfig,
    num_workers: int = 1,
    use_gpu: bool = False,
    storage_path: str | os.PathLike = "ray_results",
    resume: bool = True,
    cpus_per_worker: int = 1,
    gpus_per_worker: float = 1.0,
    max_failures: int = 1,
    name: str | None = None,
    callbacks: Sequence[WorkerCallback] = (),
    on_epoch: EpochCallback | None = None,
    edges_ingest: str = "auto",
) -> TrainResult:
    """Train a mapper on an affinity directory with ``num_workers`` DDP workers.

    Parameters
    ----------
    affinity_dir : path, URI or AffinityDir
        Written by ``pipeline.affinity.build_affinities``; a local path or a URI
        (``s3://bucket/prefix``) that every worker can read.
    config : DistributedTrainConfig
    num_workers : int
        Data-parallel workers (processes).
    use_gpu : bool
        One GPU per worker (``gpus_per_worker`` of it) and NCCL; gloo on CPU otherwise.
        Several workers need a whole GPU each (:func:`check_gpu_workers`).
    storage_path : path or URI
        Where Ray Train keeps the run and its epoch checkpoints: a local path
        (made absolute) or a URI such as ``s3://bucket/ray_results``; shared
        storage (NFS, S3) on a multi-node cluster.
    resume : bool
        Continue the run of the same data, settings and worker count from its
        last checkpoint when one exists; False starts a fresh run.
    cpus_per_worker : int
        CPUs reserved per worker; also its torch threads.
    max_failures : int
        Worker-group restarts allowed; each restart resumes from the last checkpoint.
    name : str, optional
        Run name (default: derived from the data, the settings and the worker count).
    callbacks : sequence of callables
        Picklable ``(epoch, metrics) -> bool`` called in every worker at each report
        (``epoch``: the last one run); True from any worker stops training after that
        report's checkpoint.
    on_epoch : callable, optional
        ``(metrics) -> None`` called in the calling thread of the driver with each
        report's metrics (the entries of ``TrainResult.history``) as rank 0 reports
        them, once per report and in epoch order, while training runs. Ray Train
        runs in a background thread meanwhile (so Ctrl-C interrupts the driver
        instead of asking Ray Train for a graceful abort). An exception from
        ``on_epoch`` is logged and does not stop training.
    edges_ingest : {"auto", "stream", "materialize"}
        Ignored: each worker reads its own rows of P from the edges files
        (a ``DeprecationWarning`` when it is not ``"auto"``).

    Returns
    -------
    TrainResult
    """
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    if not isinstance(config, DistributedTrainConfig):
        raise TypeError(f"train_distributed: config must be a DistributedTrainConfig, got {type(config).__name__}")
    for pname, v, lo in (("num_workers", num_workers, 1), ("cpus_per_worker", cpus_per_worker, 1), ("max_failures", max_failures, 0)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"train_distributed: {pname} must be an integer >= {lo}, got {v!r}")
    try:
        check_gpu_workers(num_workers, use_gpu, gpus_per_worker)
    except ValueError as exc:
        raise ValueError(
            f"train_distributed: num_workers={num_workers}, gpus_per_worker={gpus_per_worker!r}: {exc}"
        ) from None
    if edges_ingest not in EDGES_INGEST:
        raise ValueError(f"train_distributed: edges_ingest must be one of {EDGES_INGEST}, got {edges_ingest!r}")
    if edges_ingest != "auto":
        warnings.warn(
            f"train_distributed: edges_ingest={edges_ingest!r} is ignored; each worker reads its own rows of P "
            "from the edges files", DeprecationWarning, stacklevel=2,
        )
    if on_epoch is not None and not callable(on_epoch):
        raise TypeError(f"train_distributed: on_epoch must be callable, got {type(on_epoch).__name__}")
    affinity = affinity_dir if isinstance(affinity_dir, AffinityDir) else AffinityDir(affinity_dir)
    affinity.check_files()
    manifest = affinity.manifest
    n, dim = manifest.n, manifest.dim
    if config.train.batch_size // num_workers < 2:
        raise ValueError(
            f"train_distributed: batch_size={config.train.batch_size} leaves fewer than 2 anchors per worker "
            f"with num_workers={num_workers}"
        )
    source = config.feature_source
    if source == "auto":
        source = "object_store" if n * dim * 4 <= config.object_store_max_bytes else "scan"

    start_ray()  # joins a running Ray; else a private one on 127.0.0.1
    t0 = time.perf_counter()
    features_ref = None
    if source == "object_store":
        X = affinity.features_array()
        mean, scale = feature_moments((X[s : s + _SCAN_BATCH_ROWS] for s in range(0, n, _SCAN_BATCH_ROWS)), dim)
        # Wrapped in a list so that Ray passes the reference, not the array, to the workers.
        features_ref = [ray.put(X)]
        del X
    else:
        mean, scale = feature_moments((v for _, v in affinity.iter_features(_SCAN_BATCH_ROWS)), dim)
    whole = manifest.edge_buckets % num_workers == 0
    log.info(
        "training on n=%d dim=%d with %d worker(s) from %s; features via %s; each worker reads %s",
        n, dim, num_workers, affinity.location, source,
        f"the row groups of its {manifest.edge_buckets // num_workers} of {manifest.edge_buckets} edge buckets"
        if whole else f"every edge row group ({num_workers} does not divide {manifest.edge_buckets} buckets)",
    )

    loop_config = {
        "train": config.to_dict(),
        "n": n,
        "dim": dim,
        "num_workers": int(num_workers),
        "cpus_per_worker": int(cpus_per_worker),
        "features_ref": features_ref,
        "affinity": affinity,
        "mean": mean.tolist(),
        "scale": float(scale),
        "callbacks": list(callbacks),
    }
    resources = {"CPU": int(cpus_per_worker)}
    if use_gpu:
        resources["GPU"] = float(gpus_per_worker)
    name = name or run_name(affinity, config, num_workers)
    if not resume:
        name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    storage_path = os.fspath(storage_path)
    if "://" not in storage_path:
        storage_path = str(Path(storage_path).resolve())
    queue = _metrics_queue() if on_epoch is not None else None
    try:
        trainer = TorchTrainer(
            _train_loop_per_worker,
            train_loop_config=loop_config,
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(
                num_workers=int(num_workers), use_gpu=bool(use_gpu), resources_per_worker=resources
            ),
            run_config=ray.train.RunConfig(
                name=name,
                storage_path=storage_path,
                failure_config=ray.train.FailureConfig(max_failures=int(max_failures)),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                callbacks=[_epoch_relay(queue)] if queue is not None else None,
            ),
        )
        result = trainer.fit() if queue is None else _fit_relaying(trainer, queue, on_epoch)
    finally:
        if queue is not None:
            queue.shutdown(force=True)
    seconds = time.perf_counter() - t0
    if result.checkpoint is None:
        raise RuntimeError(f"train_distributed: run {name!r} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        mapper, ckpt_config, state = mapper_from_checkpoint(d)
    estimator = _estimator(mapper, manifest, config, affinity.load_pca())
    t = time.perf_counter()
    fit_reference(estimator, affinity, config)
    workers = state.get("workers", {})
    return TrainResult(
        estimator=estimator,
        history=state["history"],
        checkpoint_path=_checkpoint_uri(result.checkpoint),
        resumed_from=list(state.get("resumed_from", [])),
        seconds=seconds,
        reference_seconds=time.perf_counter() - t if config.reference.size > 0 else 0.0,
        edges_bytes_read=list(workers.get("edges_bytes_read", [])),
        edges_bytes_total=int(workers.get("edges_bytes_total", 0)),
        owned_edges=list(workers.get("owned_edges", [])),
        owned_rows=list(workers.get("owned_rows", [])),
        sampler_bytes=list(workers.get("sampler_bytes", [])),
        worker_peak_rss_mb=list(workers.get("peak_rss_mb", [])),
    )


def _checkpoint_uri(checkpoint) -> str:
    """Where a Ray Train checkpoint lies: a local path, or a URI on remote storage."""
    fs = getattr(checkpoint, "filesystem", None)
    if fs is None or storage.is_local(fs):
        return str(checkpoint.path)
    return storage.uri(fs, checkpoint.path)


# -- the reference ---------------------------------------------------------------------------


def reference_rows(n: int, size: int, seed: int) -> np.ndarray | None:
    """Rows of the reference: None for all ``n`` rows when ``n <= size``, else a sorted sample.

    The sample is the one ``ParametricTSNE.fit`` draws for the same ``n``, size and seed.
    """
    if n <= size:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def fit_reference(
    estimator: ParametricTSNE, affinity_dir: AffinityDir | str | os.PathLike, config: DistributedTrainConfig
) -> ParametricTSNE:
    """Give a distributed-trained estimator its reference, here on the driver.

    Reads the training features of the reference rows (:func:`reference_rows`)
    from the affinity directory (a path, a URI or an :class:`AffinityDir`); they
    are already in the network's input space (after the PCA). With every row in
    the reference, the directory's P (all its edges) is the reference's P; with
    a sample, P is computed on the sample. Memory: the reference points, their
    kNN graph or the edges, and openTSNE's optimisation of their map. The
    estimator takes the reference settings of ``config``;
    ``config.reference.size == 0`` leaves it without a reference.
    """
    estimator.set_params(**params_of(config.reference))
    estimator.reference_ = None
    if config.reference.size == 0:
        return estimator
    affinity = affinity_dir if isinstance(affinity_dir, AffinityDir) else AffinityDir(affinity_dir)
    n = affinity.manifest.n
    rows = reference_rows(n, config.reference.size, config.train.seed)
    if rows is None:
        Z, edges = affinity.features_array(), affinity.read_edges()
    else:
        Z, edges = ScannedFeatures(affinity).fetch(rows), None
    log.info("reference: %d of %d training points, %s iterations%s", len(Z), n, config.reference.n_iter,
             "" if edges is None else ", P from the affinity directory")
    return estimator.fit_reference(Z, edges, random_state=config.train.seed)


# -- live per-epoch metrics -----------------------------------------------------------------


def _metrics_queue():
    """A queue actor (no CPU reserved) that carries rank 0's epoch metrics to the driver."""
    from ray.util.queue import Queue

    return Queue(actor_options={"num_cpus": 0})


def _epoch_relay(queue):
    """A Ray Train ``UserCallback`` that puts rank 0's metrics of each report on ``queue``.

    Ray Train calls it on its controller actor, not on the driver, hence the queue.
    """
    from ray.train import UserCallback

    class EpochRelay(UserCallback):
        def __init__(self, queue):
            self.queue = queue

        def after_report(self, run_context, metrics, checkpoint):
            if not metrics:
                return
            try:
                self.queue.put(dict(metrics[0]), timeout=30)
            except Exception:  # metrics are a side channel: never fail training for them
                logging.getLogger(__name__).warning("could not relay epoch metrics to the driver", exc_info=True)

    return EpochRelay(queue)


def _fit_relaying(trainer, queue, on_epoch: EpochCallback):
    """``trainer.fit()`` in a background thread; ``on_epoch`` here with each epoch's metrics."""
    import threading

    from ray.util.queue import Empty

    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 -- re-raised in the calling thread
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="ptsne-train-fit", daemon=True)
    thread.start()
    last_epoch = -1

    def deliver(metrics: dict) -> None:
        nonlocal last_epoch
        epoch = int(metrics.get("epoch", -1))
        if epoch <= last_epoch:  # a report repeated after a restart: once per epoch
            return
        last_epoch = epoch
        try:
            on_epoch(metrics)
        except Exception:
            log.exception("train_distributed: on_epoch failed for epoch %d; training goes on", epoch)

    def receive(timeout: float | None) -> dict | None:
        """The next queued metrics; None when there are none (yet) or the queue is gone."""
        nonlocal relaying
        try:
            return queue.get(timeout=timeout) if timeout is not None else queue.get_nowait()
        except Empty:
            return None
        except Exception:  # the queue actor died: training goes on without live metrics
            log.warning("train_distributed: lost the epoch metrics queue; on_epoch stops", exc_info=True)
            relaying = False
            return None

    relaying = True
    while thread.is_alive():
        if not relaying:
            thread.join(0.5)
        elif (metrics := receive(0.5)) is not None:
            deliver(metrics)
    thread.join()
    # The controller puts each report before its run can end: what is left is queued now.
    while relaying and (metrics := receive(None)) is not None:
        deliver(metrics)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _estimator(
    mapper: Mapper, manifest: AffinityManifest, config: DistributedTrainConfig, pca: PCA | None
) -> ParametricTSNE:
    perplexities = list(manifest.perplexities)
    return ParametricTSNE.from_mapper(
        mapper,
        n_features_in=manifest.input_dim,
        n_neighbors=manifest.k,
        pca=pca,
        **params_of(config.train, config.model, config.reference),
        perplexity=perplexities[0] if len(perplexities) == 1 else perplexities,
        knn_method=manifest.knn_method or "auto",
        pca_components=manifest.dim if pca is not None else None,
        device="cpu",
    )
