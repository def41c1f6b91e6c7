"""End-to-end scale benchmark: import -> kNN -> P -> train -> register -> embed, at several N.

For each N the script generates a deterministic data set (N training rows plus one
held-out shard), then runs the pipeline stages through their library entry points,
exactly as the ``ptsne`` subcommands do. The data (``--data``):

* ``gaussian``: a Gaussian mixture from ``pipeline.synth`` (20 centres in 50-D, whose
  intrinsic dimension is the full 50: the worst case for an IVF index, unlike real embeddings);
* ``deformed-mnist``: MNIST digits under random affine and elastic deformations
  (``benchmarks/datasets.py``; 784 pixels, PCA to 50-D in the import stage), the held-out
  shard deformed from the MNIST test digits. MNIST is read from ``--mnist`` or ``$PTSNE_MNIST``.

The stages:

* **import** (``validate`` + ``features`` of ``build_affinities``): read and check
  the shards, fit/apply PCA, write the features;
* **knn** (``knn_index`` + ``knn_affinities``): build the FAISS index(es), search,
  and calibrate the conditional P rows (calibration runs inside the search tasks);
* **affinities** (``symmetrize``): the shuffle that writes the joint P edges;
* **train**: Ray Train DDP (``pipeline.train.train_distributed``);
* **register**: log the pyfunc model to MLflow and register a version with an alias;
* **embed**: resolve ``models:/NAME@ALIAS`` and batch-embed the held-out shard
  with Ray Data (``pipeline.embed.embed_shards``).

Measured per N: wall seconds per stage, peak resident memory per Ray worker
process per stage (sampled with psutil for every process of the local Ray
this script starts, the largest and each process's own; with ``--ray-address`` only
the per-task peaks that the affinity stages report), per training worker its
peak resident memory (``ru_maxrss``, reported by the worker itself), the edge
bytes it read against all of them, its owned edges and its sampler's bytes per
edge (``TrainResult``), and quality on a held-out sample (kNN accuracy of held-out
points among embedded training points, and trustworthiness of the held-out
embedding); the reference stage (inside **train**, in the driver: its seconds, points,
MB and the train stage's driver peak memory), the registered artifact's size, and embed
rows/s in both modes (the held-out shard embedded again with ``method="network"``);
and, against openTSNE on a subsample (``--compare-sample`` training rows, default 100k, and
``--compare-test`` held-out rows): the protocol of ``benchmarks/compare.py`` (openTSNE fitted
on the subsample's features, ptsne's model of all N rows placing the same rows), its 1-NN /
10-NN accuracy, T(12), recall@10, and the train maps' exact KL and recall@10.
Results go to ``<out>/scale.json``, ``<out>/scale.md`` and a plot of
time against N, ``<out>/scale.png``.

Usage::

    python benchmarks/scale.py                       # N = 100k, 300k, 1M
    python benchmarks/scale.py --data deformed-mnist --mnist mnist.npz --n 100000 300000 1000000
    python benchmarks/scale.py --n 5000 10000 20000 --out benchmarks/results/small

This is a benchmark, not a test: the default sizes need a machine of their own
(about 8 cores, 32 GB); on a shared machine keep N small.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks import compare, datasets
from pipeline.train import DistributedTrainConfig
from ptsne.reference import ReferenceConfig
from ptsne.train import TrainConfig, default_epochs

log = logging.getLogger("benchmarks.scale")

#: Pipeline stage -> the ``build_affinities`` timing keys it sums.
AFFINITY_STAGES = {
    "import": ("validate", "pca", "features"),
    "knn": ("knn_index", "knn_affinities"),
    "affinities": ("symmetrize",),
}
STAGES = ("import", "knn", "affinities", "train", "register", "embed")
MODEL_NAME = "ptsne-scale"
ALIAS = "bench"
DATA = ("gaussian", "deformed-mnist")
#: PCA components before the kNN when --pca is not given.
DATA_PCA = {"gaussian": None, "deformed-mnist": 50}


# --------------------------------------------------------------------------- memory


def _rss_mb(process: psutil.Process) -> float:
    """Resident memory of ``process`` in MB; 0 for one that has ended."""
    try:
        return process.memory_info().rss / 2**20
    except psutil.Error:
        return 0.0


def _name(process: psutil.Process) -> str:
    """The first word of ``process``'s command line (a Ray worker's title, ``ray::<task or actor>``)."""
    try:
        cmdline = process.cmdline()
    except psutil.Error:
        return ""
    return cmdline[0] if cmdline else ""


def ray_worker_rss_mb(process: psutil.Process) -> dict[int, tuple[float, str]]:
    """Resident memory (MB) and title of each Ray worker process descending from ``process``, by pid."""
    try:
        children = process.children(recursive=True)
    except psutil.Error:
        return {}
    named = ((child, _name(child)) for child in children)
    return {child.pid: (_rss_mb(child), name) for child, name in named if name.startswith("ray::")}


class RssMonitor:
    """Samples, in a thread, the resident memory of this process and of its
    descendants (the processes of a local Ray started here).

    A Ray worker process names itself ``ray::<task or actor>``; the peak of the
    largest one is the "peak memory per worker" of a stage.
    """

    def __init__(self, interval_s: float = 0.5):
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._current: dict | None = None
        self._peaks: dict[str, float] = {}
        self.stages: dict[str, dict] = {}
        self._thread = threading.Thread(target=self._run, name="rss-monitor", daemon=True)

    def __enter__(self) -> RssMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(self.interval_s):
            with self._lock:
                if self._current is None:
                    continue
            sample = {"driver": _rss_mb(me), "workers": ray_worker_rss_mb(me)}
            with self._lock:
                cur = self._current
                if cur is None:
                    continue
                cur["driver_rss_mb"] = max(cur["driver_rss_mb"], sample["driver"])
                total = sum(r for r, _ in sample["workers"].values())
                cur["workers_total_rss_mb"] = max(cur["workers_total_rss_mb"], total)
                for pid, (rss, name) in sample["workers"].items():
                    if rss > cur["max_worker_rss_mb"]:
                        cur["max_worker_rss_mb"], cur["max_worker"] = rss, name
                    key = f"{name} [{pid}]"
                    self._peaks[key] = max(self._peaks.get(key, 0.0), rss)

    @contextlib.contextmanager
    def stage(self, name: str):
        with self._lock:
            self._current = {"max_worker_rss_mb": 0.0, "max_worker": None, "workers_total_rss_mb": 0.0,
                             "driver_rss_mb": 0.0}
            self._peaks = {}
        try:
            yield
        finally:
            time.sleep(self.interval_s)  # one more sample after the stage's tasks end
            with self._lock:
                cur, self._current = self._current, None
                peaks, self._peaks = self._peaks, {}
            self.stages[name] = {k: (round(v, 1) if isinstance(v, float) else v) for k, v in cur.items()}
            # Each Ray worker process's own peak in the stage, largest first.
            self.stages[name]["worker_rss_mb"] = {
                k: round(v, 1) for k, v in sorted(peaks.items(), key=lambda kv: -kv[1])
            }


# --------------------------------------------------------------------------- stages


def generate(n: int, holdout: int, args: argparse.Namespace, shard_rows: int, work: Path) -> tuple[Path, Path]:
    """``n`` training rows in ``work/train`` and one held-out shard of ``holdout`` rows in ``work/holdout``,
    of the data set ``args.data``."""
    if n % shard_rows:
        raise ValueError(f"--shard-rows={shard_rows} must divide every N, got N={n}")
    train_dir, holdout_dir = work / "train", work / "holdout"
    for d in (train_dir, holdout_dir):
        d.mkdir(parents=True, exist_ok=True)
    if args.data == "deformed-mnist":
        generate_deformed_mnist(n, holdout, args.mnist, args.seed, shard_rows, train_dir, holdout_dir)
    else:
        generate_gaussian(n, holdout, args.dim, args.centers, args.spread, args.seed, shard_rows, train_dir,
                          holdout_dir)
    return train_dir, holdout_dir


def generate_deformed_mnist(n: int, holdout: int, mnist: str | None, seed: int, shard_rows: int,
                            train_dir: Path, holdout_dir: Path) -> None:
    """Deformed MNIST shards, one Ray task each: train rows from the MNIST train digits, the held-out
    shard from the test digits (ids after the training rows')."""
    import pyarrow as pa
    import ray

    from pipeline import schema
    from pipeline.storage import resolve, write_parquet_atomic

    digits = datasets.load_mnist_digits(mnist)
    sources = {"train": ray.put((digits["X_train"], digits["y_train"])),
               "test": ray.put((digits["X_test"], digits["y_test"]))}
    fs, _ = resolve(str(train_dir))

    @ray.remote(num_cpus=1)
    def write(source, split: str, start: int, stop: int, first_id: int, index: int, directory: str) -> int:
        X, y = datasets.deformed_mnist_rows(*source, start, stop, seed, split)
        table = pa.table({schema.ID: pa.array(np.arange(first_id, first_id + len(X), dtype=np.int64)),
                          schema.VECTOR: schema.vectors_to_arrow(X), schema.LABEL: pa.array(y)})
        write_parquet_atomic(fs, str(Path(directory) / schema.part_name(index)), table)
        return table.num_rows

    n_shards = n // shard_rows
    refs = [write.remote(sources["train"], "train", i * shard_rows, (i + 1) * shard_rows, i * shard_rows, i,
                         str(train_dir)) for i in range(n_shards)]
    refs.append(write.remote(sources["test"], "test", 0, holdout, n, n_shards, str(holdout_dir)))
    rows = sum(ray.get(refs))
    if rows != n + holdout:
        raise RuntimeError(f"generated {rows} rows, expected {n + holdout}")


def generate_gaussian(n: int, holdout: int, dim: int, centers: int, spread: float, seed: int, shard_rows: int,
                      train_dir: Path, holdout_dir: Path) -> None:
    """One synthetic mixture of ``n + holdout`` rows with its last shard moved aside, so the
    held-out rows come from the same mixture but were never trained on."""
    from pipeline.synth import SynthConfig, generate_shard
    from pipeline.schema import part_name
    from pipeline.storage import resolve, write_parquet_atomic

    config = SynthConfig(n=n + holdout, dim=dim, centers=centers, seed=seed, shard_rows=shard_rows, spread=spread)
    fs, _ = resolve(str(train_dir))
    import ray

    @ray.remote(num_cpus=1)
    def write(index: int, directory: str) -> int:
        table = generate_shard(config, index)
        write_parquet_atomic(fs, str(Path(directory) / part_name(index)), table)
        return table.num_rows

    n_train_shards = n // shard_rows
    refs = [write.remote(i, str(train_dir if i < n_train_shards else holdout_dir)) for i in range(config.n_shards)]
    rows = sum(ray.get(refs))
    if rows != n + holdout:
        raise RuntimeError(f"generated {rows} rows, expected {n + holdout}")


def _read(directory: Path, limit: int | None, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, vectors, labels) of up to ``limit`` rows sampled from the shards in ``directory``.

    Shard by shard, so that only the sample and one shard are in memory (1M rows of 784
    pixels are 3 GB).
    """
    import pyarrow.parquet as pq

    from pipeline.schema import arrow_to_vectors

    files = sorted(directory.glob("*.parquet"))
    sizes = np.array([pq.ParquetFile(f).metadata.num_rows for f in files])
    total = int(sizes.sum())
    pick = (np.arange(total) if limit is None or total <= limit
            else np.sort(np.random.default_rng(seed).choice(total, size=limit, replace=False)))
    starts = np.concatenate([[0], np.cumsum(sizes)])
    parts = []
    for f, lo, hi in zip(files, starts[:-1], starts[1:]):
        rows = pick[(pick >= lo) & (pick < hi)] - lo
        if len(rows):
            parts.append(pq.read_table(f, columns=["id", "vector", "label"]).take(rows))
    ids = np.concatenate([t.column("id").to_numpy() for t in parts])
    X = np.concatenate([arrow_to_vectors(t.column("vector")) for t in parts])
    y = np.concatenate([t.column("label").to_numpy() for t in parts])
    return ids, X, y


def quality(estimator, train_dir: Path, holdout_dir: Path, embedded_dir: Path, sample: int, seed: int) -> dict:
    """Held-out quality: kNN accuracy against embedded training points, and trustworthiness."""
    from pipeline.embed import load_output
    from pipeline.schema import arrow_to_vectors
    from ptsne.metrics import knn_accuracy, trustworthiness

    _, X_train, y_train = _read(train_dir, 4 * sample, seed)
    emb_train = estimator.transform(X_train)
    ids, X_test, y_test = _read(holdout_dir, sample, seed + 1)
    out = load_output(embedded_dir)
    out_ids = out.column("id").to_numpy()
    order = np.argsort(out_ids)
    pos = order[np.searchsorted(out_ids, ids, sorter=order)]
    if not np.array_equal(out_ids[pos], ids):
        raise RuntimeError("embedded output lacks held-out ids")
    emb_test = arrow_to_vectors(out.column("embedding"))[pos]
    # The batch path and the in-process transform must agree.
    drift = float(np.max(np.abs(emb_test - estimator.transform(X_test))))
    n_tw = min(len(X_test), 2000)
    return {
        "holdout_rows_scored": int(len(ids)),
        "knn_accuracy_k10": round(knn_accuracy(emb_train, y_train, emb_test, y_test, k=10), 4),
        "trustworthiness_k12": round(trustworthiness(X_test[:n_tw], emb_test[:n_tw], k=12), 4),
        "batch_vs_transform_max_abs_diff": drift,
    }


def versus_opentsne(estimator, train_dir: Path, holdout_dir: Path, args: argparse.Namespace) -> dict:
    """The protocol of ``benchmarks/compare.py`` on a subsample: openTSNE fitted on ``--compare-sample``
    training rows (the model's own PCA features), ptsne's model of all N rows placing the same rows;
    both transform ``--compare-test`` held-out rows. Figures per method, without the maps."""
    _, X_train, y_train = _read(train_dir, args.compare_sample, args.seed + 2)
    _, X_test, y_test = _read(holdout_dir, args.compare_test, args.seed + 3)
    pca = estimator.pca_
    Z_train, Z_test = (pca.transform(X_train), pca.transform(X_test)) if pca is not None else (X_train, X_test)
    results = {}
    for name, method in (("ptsne", "auto"), ("ptsne network", "network")):
        t = time.perf_counter()
        Y_test = estimator.transform(X_test, method=method)
        seconds = time.perf_counter() - t
        results[name] = {"Ytr": estimator.transform(X_train, method=method), "Yte": Y_test, "transform_s": seconds}
    if not args.skip_opentsne:
        results.update(compare.run_opentsne(Z_train, Z_test, args.seed, args.num_cpus))
    compare.score(results, Z_train, y_train, Z_test, y_test)
    return {"train_rows": len(Z_train), "test_rows": len(Z_test), "methods": compare.figures(results)}


def train_share(aff_dir: Path, workers: int, args: argparse.Namespace, work: Path,
                monitor: RssMonitor | None) -> dict:
    """Train again on the same affinities with ``workers`` workers (network only, ``--more-epochs``):
    what each worker read of the edges, held, and its peak memory."""
    from pipeline.train import train_distributed

    stage = monitor.stage if monitor else (lambda name: contextlib.nullcontext())
    t = time.perf_counter()
    with stage(f"train-{workers}-workers"):
        result = train_distributed(
            aff_dir,
            DistributedTrainConfig.from_settings(n_epochs=args.more_epochs, batch_size=args.batch_size, seed=args.seed,
                                   reference_size=0),
            num_workers=workers, use_gpu=args.gpu, storage_path=work / f"ray_results-{workers}",
            resume=False, cpus_per_worker=args.task_cpus,
        )
    return {"workers": workers, "epochs": args.more_epochs, "seconds": round(time.perf_counter() - t, 2),
            "epoch_seconds": round(sum(float(h.get("seconds", 0.0)) for h in result.history), 2),
            "worker_peak_rss_mb": result.worker_peak_rss_mb, "edges_bytes_read": result.edges_bytes_read,
            "edges_bytes_total": result.edges_bytes_total, "owned_edges": result.owned_edges,
            "sampler_bytes_per_edge": [round(b / max(1, e), 2)
                                       for b, e in zip(result.sampler_bytes, result.owned_edges)]}


def run_one(n: int, args: argparse.Namespace, monitor: RssMonitor | None) -> dict:
    import mlflow

    from jobs.flavor import log_model
    from jobs.registry import register, resolve_model
    from jobs.tracking import configure_mlflow
    from pipeline.affinity import AffinityJobConfig, build_affinities
    from pipeline.embed import EmbedConfig, ModelSpec, embed_shards
    from pipeline.train import train_distributed

    work = Path(args.out) / "work" / f"n{n}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    shard_rows = args.shard_rows or min(100_000, max(1000, n // 4))
    holdout = shard_rows
    stage = monitor.stage if monitor else (lambda name: contextlib.nullcontext())
    seconds: dict[str, float] = {}

    t = time.perf_counter()
    train_dir, holdout_dir = generate(n, holdout, args, shard_rows, work)
    seconds["generate"] = time.perf_counter() - t

    aff_dir = work / "affinities"
    with stage("import+knn+affinities"):
        manifest = build_affinities(AffinityJobConfig(
            input=str(train_dir), output=str(aff_dir), id_col="id", label_col="label",
            perplexity=args.perplexity, pca_components=pca_components(args), knn_method=args.knn_method,
            task_cpus=args.task_cpus, seed=args.seed,
        ))
    timings = manifest["timings_s"]
    for name, keys in AFFINITY_STAGES.items():
        seconds[name] = sum(float(timings.get(k, 0.0)) for k in keys)

    epochs = args.epochs or default_epochs(n, args.batch_size)
    t = time.perf_counter()
    with stage("train"):
        result = train_distributed(
            aff_dir,
            DistributedTrainConfig.from_settings(n_epochs=epochs, batch_size=args.batch_size, seed=args.seed,
                                   reference_size=args.reference_size),
            num_workers=args.train_workers, use_gpu=args.gpu, storage_path=work / "ray_results",
            resume=False, cpus_per_worker=args.task_cpus,
        )
    seconds["train"] = time.perf_counter() - t

    t = time.perf_counter()
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{Path(args.out).resolve() / 'mlflow.db'}")
    configure_mlflow("ptsne-scale")
    with mlflow.start_run(run_name=f"scale-n{n}"):
        mlflow.log_params({"n": n, "dim": args.dim, "epochs": epochs})
        info = log_model(result.estimator)
        ref = register(info.model_uri, MODEL_NAME, alias=ALIAS)
    seconds["register"] = time.perf_counter() - t

    t = time.perf_counter()
    with stage("embed"):
        estimator, resolved = resolve_model(f"models:/{MODEL_NAME}@{ALIAS}", dst=work / "model")
        summary = embed_shards(
            holdout_dir, work / "embedded",
            ModelSpec(str(resolved.path), resolved.name, resolved.version, f"v{resolved.version}"),
            EmbedConfig(progress=False, cpus_per_actor=args.embed_cpus),
        )
    seconds["embed"] = time.perf_counter() - t
    if summary.rows != holdout:
        raise RuntimeError(f"embedded {summary.rows} rows, expected {holdout}")
    artifact_mb = sum(f.stat().st_size for f in Path(resolved.path).rglob("*") if f.is_file()) / 2**20
    network_rows_per_s = None
    if estimator.reference_ is not None:
        # The same shard again through the fast path, into a directory of its own.
        t = time.perf_counter()
        net_summary = embed_shards(
            holdout_dir, work / "embedded-network",
            ModelSpec(str(resolved.path), resolved.name, resolved.version, f"v{resolved.version}"),
            EmbedConfig(progress=False, cpus_per_actor=args.embed_cpus, method="network"),
        )
        seconds["embed_network"] = time.perf_counter() - t
        network_rows_per_s = round(net_summary.rows_per_s, 1)

    q = quality(estimator, train_dir, holdout_dir, work / "embedded" / f"v{resolved.version}",
                args.quality_sample, args.seed)
    versus = versus_opentsne(estimator, train_dir, holdout_dir, args) if args.compare_sample else None
    record = {
        "n": n,
        "data": args.data,
        "holdout": holdout,
        "shard_rows": shard_rows,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "pipeline_seconds": round(sum(seconds[s] for s in STAGES), 2),
        "affinity_timings_s": timings,
        "affinity_peak_task_rss_mb": manifest.get("peak_worker_rss_mb"),
        "peak_memory": dict(monitor.stages) if monitor else None,
        "knn": {"method": manifest["knn_method"], "recall": manifest["knn_recall"], "k": manifest["k"],
                "n_edges": manifest["n_edges"]},
        "train": {"epochs": epochs, "workers": args.train_workers,
                  # Time inside the epochs; the rest of "train" is Ray Train start-up and checkpoints.
                  "epoch_seconds": round(sum(float(h.get("seconds", 0.0)) for h in result.history), 2),
                  "final_loss": result.history[-1].get("loss") if result.history else None,
                  # Per training worker (rank order): what it read of the edges and what it held.
                  "worker_peak_rss_mb": result.worker_peak_rss_mb,
                  "edges_bytes_read": result.edges_bytes_read,
                  "edges_bytes_total": result.edges_bytes_total,
                  "owned_edges": result.owned_edges,
                  "sampler_bytes_per_edge": [round(b / max(1, e), 2)
                                             for b, e in zip(result.sampler_bytes, result.owned_edges)]},
        "train_other_workers": [train_share(aff_dir, workers, args, work, monitor)
                                for workers in args.more_train_workers],
        "model": {"name": ref.name, "version": ref.version, "artifact_mb": round(artifact_mb, 1)},
        # The reference stage runs in the driver inside "train": its memory is the
        # train stage's driver peak.
        "reference": {
            "points": len(estimator.reference_) if estimator.reference_ is not None else 0,
            "mb": round(estimator.reference_.nbytes / 2**20, 1) if estimator.reference_ is not None else 0.0,
            "seconds": round(result.reference_seconds, 2),
            "driver_peak_rss_mb": (monitor.stages.get("train", {}).get("driver_rss_mb") if monitor else None),
        },
        "embed_rows_per_s": round(summary.rows_per_s, 1),
        "embed_network_rows_per_s": network_rows_per_s,
        "quality": q,
        "vs_opentsne": versus,
    }
    if monitor:
        monitor.stages.clear()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return record


# --------------------------------------------------------------------------- report


def write_report(out: Path, results: dict) -> None:
    compare.write_atomic(out / "scale.json", json.dumps(results, indent=2))
    rows = results["runs"]
    lines = [
        "| N | " + " | ".join(STAGES) + " | total (s) | of which epochs (s) | peak worker RSS (MB) "
        "| train worker peak RSS (MB) | edges read per train worker (MB) | kNN acc. | trust. "
        "| reference (s) | reference points | driver peak RSS (MB) | artifact (MB) | embed rows/s "
        "| network embed rows/s | kNN (recall) |",
        "|---" * (len(STAGES) + 15) + "|",
    ]
    for r in rows:
        mem = r["peak_memory"] or {}
        peak = max((m["max_worker_rss_mb"] for m in mem.values()), default=None)
        if peak is None:
            peak = max((r["affinity_peak_task_rss_mb"] or {}).values(), default=float("nan"))
        lines.append(
            f"| {r['n']:,} | " + " | ".join(f"{r['seconds'][s]:.1f}" for s in STAGES)
            + f" | {r['pipeline_seconds']:.1f} | {r['train']['epoch_seconds']:.1f} | {peak:.0f}"
            f" | {max(r['train'].get('worker_peak_rss_mb') or [float('nan')]):.0f}"
            f" | {max(r['train'].get('edges_bytes_read') or [float('nan')]) / 2**20:.1f}"
            f" of {r['train'].get('edges_bytes_total', 0) / 2**20:.1f}"
            f" | {r['quality']['knn_accuracy_k10']:.3f}"
            f" | {r['quality']['trustworthiness_k12']:.3f}"
            f" | {r['reference']['seconds']:.1f} | {r['reference']['points']:,}"
            f" | {r['reference']['driver_peak_rss_mb'] or float('nan'):.0f} | {r['model']['artifact_mb']:.1f}"
            f" | {r['embed_rows_per_s']:,.0f} | {r['embed_network_rows_per_s'] or float('nan'):,.0f}"
            f" | {r['knn']['method']} ({_recall(r['knn']['recall'])}) |"
        )
    for r in rows:
        versus = r.get("vs_opentsne")
        if versus:
            lines += ["", f"N = {r['n']:,}: against openTSNE on {versus['train_rows']:,} training rows "
                          f"(ptsne: the N-row model placing them) and {versus['test_rows']:,} held-out rows", "",
                      compare.markdown(versus["methods"], versus["test_rows"])]
    compare.write_atomic(out / "scale.md", "\n".join(lines) + "\n")
    log.info("results:\n%s", "\n".join(lines))
    plot(out / "scale.png", rows, results["machine"])


def _recall(recall) -> str:
    """The kNN recall of a manifest (none for an exact search)."""
    return "–" if recall is None else f"{float(recall):.3f}"


def plot(path: Path, rows: list[dict], machine: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["n"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in STAGES:
        ax.plot(ns, [max(r["seconds"][s], 1e-2) for r in rows], marker="o", label=s)
    ax.plot(ns, [max(r["train"]["epoch_seconds"], 1e-2) for r in rows], marker="o", linestyle="--",
            color="tab:red", alpha=0.6, label="train epochs only")
    ax.plot(ns, [r["pipeline_seconds"] for r in rows], marker="s", color="black", linewidth=2, label="total")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("N (training points)")
    ax.set_ylabel("seconds")
    ax.set_title(f"ptsne end to end, {machine['cpus']} CPUs" + (f", {machine['gpu']}" if machine.get("gpu") else ""))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def machine_info(ray) -> dict:
    import torch

    res = ray.cluster_resources()
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": int(res.get("CPU", 0)),
        "gpus": int(res.get("GPU", 0)),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "ray_nodes": len([n for n in ray.nodes() if n["Alive"]]),
        "ray": ray.__version__,
        "torch": torch.__version__,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[100_000, 300_000, 1_000_000], help="training sizes")
    p.add_argument("--data", choices=DATA, default="gaussian", help="the data set (see above)")
    p.add_argument("--mnist", default=None, help=f"MNIST .npz for deformed-mnist (default ${datasets.MNIST_ENV})")
    p.add_argument("--dim", type=int, default=50, help="gaussian: dimension")
    p.add_argument("--centers", type=int, default=20, help="gaussian: mixture components")
    p.add_argument("--spread", type=float, default=6.0, help="std of the mixture means (smaller: classes overlap more)")
    p.add_argument("--pca", type=int, default=None,
                   help="PCA components before the kNN (default: 50 for deformed-mnist, none for gaussian; "
                        "0: none)")
    p.add_argument("--perplexity", type=float, default=30.0)
    p.add_argument("--knn-method", default="auto", choices=["auto", "exact", "ivf"])
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs (default: the product's choice for N, ptsne.train.default_epochs)")
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--train-workers", type=int, default=1)
    p.add_argument("--more-train-workers", type=int, nargs="*", default=[],
                   help="also train on the same affinities with each of these worker counts (network only, "
                        "--more-epochs epochs), recording what each worker reads and holds")
    p.add_argument("--more-epochs", type=int, default=2, help="epochs of the --more-train-workers runs")
    p.add_argument("--reference-size", type=int, default=ReferenceConfig.size,
                   help="reference points (0: network-only models)")
    p.add_argument("--task-cpus", type=int, default=1, help="CPUs per Ray task / train worker / embed actor")
    p.add_argument("--embed-cpus", type=int, default=1,
                   help="CPUs per embed actor; keep one CPU free for Ray Data's read tasks")
    p.add_argument("--gpu", action="store_true", help="train on GPUs (one per worker)")
    p.add_argument("--shard-rows", type=int, default=None, help="rows per shard (default: N/4, at most 100k)")
    p.add_argument("--quality-sample", type=int, default=2000, help="held-out rows scored")
    p.add_argument("--compare-sample", type=int, default=100_000,
                   help="training rows of the comparison with openTSNE (at most N; 0: no comparison)")
    p.add_argument("--compare-test", type=int, default=10_000, help="held-out rows of the comparison")
    p.add_argument("--skip-opentsne", action="store_true",
                   help="score ptsne on the comparison's rows without fitting openTSNE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray started here")
    p.add_argument("--ray-address", dest="address", default=None,
                   help="existing Ray cluster (memory is then reported per task only; --out must be on "
                        "storage that every node mounts)")
    p.add_argument("--address", dest="address", default=None, help=argparse.SUPPRESS)  # the old name
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale"))
    p.add_argument("--keep", action="store_true", help="keep the generated data and outputs")
    p.add_argument("--warmup", type=int, default=2000,
                   help="first run the whole pipeline at this N, unrecorded, so that one-time start-up "
                        "costs (imports, Ray Train and Ray Data set-up, the MLflow schema) do not land on "
                        "the first N (0: no warm-up)")
    args = p.parse_args(argv)
    for flag, value, low in (("--compare-sample", args.compare_sample, 0), ("--compare-test", args.compare_test, 20),
                             ("--pca", args.pca if args.pca is not None else 0, 0)):
        if value < low:
            p.error(f"{flag} must be at least {low}, got {value}")
    return args


def pca_components(args: argparse.Namespace) -> int | None:
    """``--pca``, or the data set's default; 0 means none."""
    n = DATA_PCA[args.data] if args.pca is None else args.pca
    return n or None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("ray", "mlflow", "alembic", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    if args.data == "deformed-mnist":
        datasets.load_mnist_digits(args.mnist)  # a missing file fails here, before any work
    # The local Ray's workers import this checkout's benchmarks package (the generators).
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    import ray

    # Absolute: Ray workers do not run in this directory.
    out = Path(args.out).resolve()
    args.out = str(out)
    out.mkdir(parents=True, exist_ok=True)
    from pipeline.session import RaySession

    RaySession(args.address, args.num_cpus, log_to_driver=False).start()
    results = {"machine": machine_info(ray), "settings": vars(args), "runs": []}
    try:
        with (RssMonitor() if not args.address else contextlib.nullcontext()) as monitor:
            if args.warmup:
                log.info("warm-up at N = %d (not recorded)", args.warmup)
                warmup = {**vars(args), "epochs": args.epochs or 2, "more_train_workers": [], "compare_sample": 0}
                run_one(args.warmup, argparse.Namespace(**warmup), monitor)
            for n in args.n:
                log.info("N = %d", n)
                t = time.perf_counter()
                results["runs"].append(run_one(n, args, monitor))
                log.info("N = %d done in %.1f s", n, time.perf_counter() - t)
                write_report(out, results)  # after every N, so a long run keeps what it measured
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
