"""``ptsne train``: Parquet shards -> kNN -> P -> distributed training -> MLflow run and registry.

Examples
--------
Two CPU workers on a local Ray, registered as ``digits@champion``::

    ptsne train --input data/train --vector-col vector --id-col id --label-col label \\
        --perplexity 30 --epochs 40 --workers 2 --experiment digits \\
        --register digits --alias champion

The same settings from a file (command-line options win over the file)::

    ptsne train --config train.toml

Against a running cluster (``RAY_ADDRESS`` is set by ``ray job submit``)::

    ray job submit --working-dir . -- ptsne train --config train.toml --workers 8 --gpus-per-worker 1

Every location (``--input``, ``--workdir``, ``--affinities``, ``--eval-input``,
``--storage-path``) is a local path or a URI of a pyarrow filesystem
(``s3://bucket/prefix``); the workdir, say, can live on S3 with the input::

    ptsne train --input s3://bucket/vectors --workdir s3://bucket/ptsne/digits --register digits

Stages, each skipped when its output exists and matches the settings:
``affinities`` (``WORKDIR/affinities``, by the manifest's ``config_hash``),
``train`` (``WORKDIR/model``, by a stamp of the data hash, settings and worker
count; an interrupted run resumes from its last epoch checkpoint under
``--storage-path``), ``register`` (no new run when the stamp records one for the
same model name).

Exit codes: 0 ok; 1 unexpected error; 2 usage (bad option or config file, an
input and a location this job writes of which one contains the other, a model
location holding something else); 3 bad input data; 4 input, config file or
affinity directory not found.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from jobs.cli import EXIT_OK, Report, add_ray_arguments
from jobs.evaluation import EvalSettings, evaluate, sample_features
from jobs.stamp import STAMP_FILE, read_stamp, stamp_bytes, stamp_key_before, write_stamp

if TYPE_CHECKING:  # imported where used: Ray stays out of `ptsne --help`
    from pipeline.affinity import AffinityJobConfig
    from pipeline.train import DistributedTrainConfig

log = logging.getLogger(__name__)

REPORT = Report("train", output="--workdir")

DEFAULT_WORKDIR = "ptsne-work"
MODEL_DIR = "model"
AFFINITY_DIR = "affinities"
RAY_RESULTS_DIR = "ray_results"
PLOT_FILE = "embedding.png"
#: Phases logged as the numeric ``phase`` metric.
PHASES = {"early_exaggeration": 0, "embedding": 1}
#: Settings that describe where and how the job runs, not what it computes.
_NOT_PARAMS = {"func", "config", "_parser", "verbose", "quiet", "command"}


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Every option of ``ptsne train`` (also the keys of its config file)."""
    from jobs.affinities import add_affinity_arguments

    p.add_argument("--config", default=None, help="TOML or YAML file with any of these settings ([train] table or top level)")
    src = p.add_argument_group("input")
    src.add_argument("--input", default=None, help="directory, file or URI of Parquet shards to train on")
    src.add_argument("--affinities", default=None,
                     help="an existing affinity directory (path or URI) to train on instead of --input (skips kNN and P)")
    src.add_argument("--workdir", default=DEFAULT_WORKDIR,
                     help=f"directory or URI where the affinities, checkpoints, model and plot go (default: ./{DEFAULT_WORKDIR})")
    src.add_argument("--eval-input", default=None,
                     help="held-out Parquet shards (same columns; path or URI) for the quality metrics "
                     "(default: a sample of the training rows)")
    src.add_argument("--eval-samples", type=int, default=5000, help="held-out rows used for metrics (default: 5000)")
    src.add_argument("--plot-points", type=int, default=1_000_000,
                     help="training rows drawn in the plot; beyond 200000 it is a density image (default: 1000000)")
    aff = p.add_argument_group("kNN and affinities (see `ptsne affinities`)")
    add_affinity_arguments(aff)
    tr = p.add_argument_group("training")
    from jobs.settings import add_setting_arguments
    from pipeline.train import DistributedTrainConfig
    from ptsne.model import ModelConfig
    from ptsne.reference import ReferenceConfig
    from ptsne.train import TrainConfig

    add_setting_arguments(tr, TrainConfig, skip={"seed"})  # --seed is an affinity option, shared by both stages
    add_setting_arguments(tr, ModelConfig)
    add_setting_arguments(tr, DistributedTrainConfig)
    ref = p.add_argument_group("reference (t-SNE-grade map of training points, fitted after training)")
    add_setting_arguments(ref, ReferenceConfig)
    sc = p.add_argument_group("scaling")
    sc.add_argument("--workers", type=int, default=1, help="data-parallel training workers (default: 1)")
    sc.add_argument("--cpus-per-worker", type=int, default=1, help="CPUs (torch threads) per worker (default: 1)")
    sc.add_argument("--gpus-per-worker", type=float, default=0.0,
                    help="GPUs per worker; > 0 trains on GPUs with NCCL, and with --workers above 1 it must be "
                         ">= 1: workers cannot share a GPU (default: 0, CPU with gloo)")
    sc.add_argument("--max-failures", type=int, default=1,
                    help="worker-group restarts, each resuming from the last epoch checkpoint (default: 1)")
    sc.add_argument("--storage-path", default=None,
                    help="Ray Train storage for checkpoints (path or URI); shared storage (NFS, s3://...) on a "
                    "multi-node cluster (default: WORKDIR/ray_results)")
    sc.add_argument("--fresh", action="store_true", help="retrain even when a matching model or checkpoint exists")
    add_ray_arguments(sc)
    ml = p.add_argument_group("MLflow")
    ml.add_argument("--experiment", default="ptsne", help="MLflow experiment (default: ptsne)")
    ml.add_argument("--run-name", default=None, help="MLflow run name")
    ml.add_argument("--register", "--name", dest="register", default=None, help="register the model under this name")
    ml.add_argument("--alias", default=None, help="point this alias (e.g. champion) at the new version")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="kNN -> P -> distributed training -> MLflow run and registered model, in one command",
        description=__doc__.split("Exit codes")[0].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_train_arguments(p)
    p.set_defaults(func=run, _parser=p)


class UsageError(ValueError):
    """Settings that cannot work together (exit code 2)."""


@dataclass
class TrainJobResult:
    """What one ``ptsne train`` did: where its outputs are and what it measured."""

    workdir: str
    affinity_dir: str
    model_dir: str
    plot: str | None
    run_id: str | None
    experiment_id: str | None
    tracking_uri: str
    model_uri: str | None
    registered: str | None
    metrics: dict = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def location_arg(value: str | os.PathLike) -> str:
    """A location option's value: a local path made absolute, a URI as given without a trailing slash."""
    text = os.fspath(value)
    if "://" in text:
        scheme, rest = text.split("://", 1)
        return f"{scheme}://{rest.rstrip('/')}"
    return str(Path(text).expanduser().resolve())


@dataclass(frozen=True)
class TrainLocations:
    """Where one ``ptsne train`` reads and writes: absolute local paths or URIs.

    ``affinities`` is ``--affinities`` when given, else ``WORKDIR/affinities``
    (built there); ``model``, ``plot`` and the default ``storage_path`` lie under
    ``workdir``. Sub-locations are joined as strings, the same way for a path
    and a URI.
    """

    workdir: str
    affinities: str
    model: str
    plot: str
    storage_path: str
    input: str | None = None
    eval_input: str | None = None
    affinities_given: bool = False
    storage_path_given: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainLocations:
        from pipeline.storage import join

        workdir = location_arg(args.workdir)
        given = getattr(args, "storage_path", None)
        return cls(
            workdir=workdir,
            affinities=location_arg(args.affinities) if args.affinities else join(workdir, AFFINITY_DIR),
            model=join(workdir, MODEL_DIR),
            plot=join(workdir, PLOT_FILE),
            storage_path=location_arg(given) if given else join(workdir, RAY_RESULTS_DIR),
            input=location_arg(args.input) if args.input else None,
            eval_input=location_arg(args.eval_input) if getattr(args, "eval_input", None) else None,
            affinities_given=bool(args.affinities),
            storage_path_given=bool(given),
        )

    def check(self) -> None:
        """Raise :class:`ValueError` when an input and a location this job writes contain each other.

        A workdir inside its input is read back as input by every rerun; an input
        inside the workdir can be replaced by it. ``--affinities`` may lie inside
        the workdir (its ``affinities/``, say), but not where training writes.
        """
        from pipeline.storage import check_disjoint

        outputs = [("--workdir", self.workdir)]
        if self.storage_path_given:
            outputs.append(("--storage-path", self.storage_path))
        for option, value in (("--input", self.input), ("--eval-input", self.eval_input)):
            for output, where in outputs if value else ():
                check_disjoint(value, where, (option, output))
        if not self.affinities_given:
            return
        if self.storage_path_given:
            check_disjoint(self.affinities, self.storage_path, ("--affinities", "--storage-path"))
        written = [self.model, self.plot] + ([] if self.storage_path_given else [self.storage_path])
        for where in written:
            try:
                check_disjoint(self.affinities, where)
            except ValueError:
                raise ValueError(
                    f"--affinities {self.affinities!r} and --workdir {self.workdir!r} overlap where training "
                    f"writes ({where!r}); the affinity directory may lie inside --workdir, but must not be it, "
                    f"contain it or hold its {MODEL_DIR}/, {RAY_RESULTS_DIR}/ or {PLOT_FILE} "
                    "(choose another --workdir)"
                ) from None


# -- settings --------------------------------------------------------------------------------


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Merge ``--config`` into ``args`` and check the combination."""
    from jobs.config import apply_config, load_config_file

    if args.config:
        apply_config(args._parser, args, load_config_file(args.config, section="train"), source=str(args.config))
    if (args.input is None) == (args.affinities is None):
        raise UsageError("give exactly one of --input (Parquet shards) and --affinities (an affinity directory)")
    for name in ("workers", "cpus_per_worker", "epochs", "eval_samples", "plot_points"):
        if name == "epochs" and args.epochs == "auto":
            continue
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.gpus_per_worker < 0:
        raise UsageError(f"--gpus-per-worker must be >= 0, got {args.gpus_per_worker}")
    from pipeline.train import check_gpu_workers

    try:
        check_gpu_workers(args.workers, args.gpus_per_worker > 0, args.gpus_per_worker)
    except ValueError as exc:
        raise UsageError(f"--workers {args.workers} --gpus-per-worker {args.gpus_per_worker:g}: {exc}") from None
    if args.alias and not args.register:
        raise UsageError("--alias needs --register NAME")
    if args.register is not None:  # refused before training, not after it
        from jobs.registry import check_name

        check_name(args.register, "--register")
    return args


def train_config_from_args(args: argparse.Namespace, n: int | None = None):
    """The training settings; ``--epochs auto`` resolves for ``n`` points
    (:func:`ptsne.train.default_epochs`; the core default when ``n`` is not known yet)."""
    from jobs.settings import settings_from_args
    from pipeline.train import DistributedTrainConfig
    from ptsne.model import ModelConfig
    from ptsne.reference import ReferenceConfig
    from ptsne.train import TrainConfig, default_epochs

    settings = settings_from_args(args, TrainConfig, ModelConfig, ReferenceConfig, DistributedTrainConfig)
    if settings["n_epochs"] == "auto":
        settings["n_epochs"] = default_epochs(n, settings["batch_size"]) if n else TrainConfig.n_epochs
    return DistributedTrainConfig.from_settings(**settings)


def settings_dict(args: argparse.Namespace) -> dict:
    """The resolved settings (command line + config file + defaults), JSON-ready."""
    out = {}
    for key, value in sorted(vars(args).items()):
        if key in _NOT_PARAMS or key.startswith("_"):
            continue
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


@dataclass(frozen=True)
class TrainJobSpec:
    """One ``ptsne train``, parsed once: what :func:`train_job` and its steps read instead of ``args``.

    Built by :meth:`from_args` from resolved arguments (:func:`resolve_args`).
    ``config`` holds ``--epochs auto`` resolved to the core default;
    :meth:`train_config` resolves it for the number of points. ``affinity`` is the
    kNN and P stage writing ``locations.affinities``, None when ``--affinities``
    names an existing directory. ``settings`` are the resolved settings, the run's
    MLflow params and its ``resolved_config.json``.
    """

    locations: TrainLocations
    config: DistributedTrainConfig
    affinity: AffinityJobConfig | None
    eval: EvalSettings
    settings: dict = field(compare=False)
    epochs_auto: bool = False
    workers: int = 1
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0.0
    max_failures: int = 1
    fresh: bool = False
    plot_points: int = 1_000_000
    seed: int = 0
    experiment: str = "ptsne"
    run_name: str | None = None
    register: str | None = None
    alias: str | None = None
    ray_address: str | None = None
    num_cpus: int | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainJobSpec:
        """The spec of resolved ``args`` (:func:`resolve_args`), its settings and locations checked.

        Raises :class:`ValueError` or :class:`TypeError` on a bad setting, :class:`ValueError`
        when an input and a location this job writes overlap (:meth:`TrainLocations.check`).
        """
        from jobs.affinities import config_from_args

        config = train_config_from_args(args)
        where = TrainLocations.from_args(args)
        where.check()
        feature_cols = tuple(c.strip() for c in args.feature_cols.split(",")) if args.feature_cols else None
        return cls(
            locations=where,
            config=config,
            # The affinity directory belongs to this job's workdir: rebuilt when the settings change.
            affinity=None if where.affinities_given else config_from_args(
                args, output=where.affinities, overwrite=True),
            eval=EvalSettings(input=args.eval_input, samples=args.eval_samples, seed=args.seed,
                              vector_col=args.vector_col, feature_cols=feature_cols, label_col=args.label_col),
            settings=settings_dict(args),
            epochs_auto=args.epochs == "auto",
            workers=args.workers, cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
            max_failures=args.max_failures, fresh=args.fresh, plot_points=args.plot_points, seed=args.seed,
            experiment=args.experiment, run_name=args.run_name, register=args.register, alias=args.alias,
            ray_address=getattr(args, "ray_address", None), num_cpus=getattr(args, "num_cpus", None),
        )

    def train_config(self, n: int) -> DistributedTrainConfig:
        """The training settings for ``n`` points: ``--epochs auto`` is :func:`ptsne.train.default_epochs`."""
        if not self.epochs_auto:
            return self.config
        from ptsne.train import default_epochs

        return self.config.with_settings(n_epochs=default_epochs(n, self.config.train.batch_size))


# -- stages ------------------------------------------------------------------------------------


def _init_ray(spec: TrainJobSpec) -> bool:
    from pipeline.session import RaySession

    return RaySession(spec.ray_address, spec.num_cpus).start()


def _plot(spec: TrainJobSpec, estimator, affinity_dir: str, path: Path) -> Path:
    from jobs.plot import plot_embedding
    from ptsne.transform import transform

    _, X, y = sample_features(affinity_dir, spec.plot_points, spec.seed)
    Y = transform(estimator.model_, X)
    name = spec.register or "ptsne"
    return plot_embedding(Y, path, labels=y, title=f"{name}: {len(Y):,} training points")


def _epoch_metrics(h: dict) -> dict[str, float]:
    """The per-epoch MLflow metrics (step = epoch) of one history entry."""
    return {
        "loss": float(h["loss"]), "attraction": float(h["attraction"]), "log_z": float(h["log_z"]),
        "exaggeration": float(h["exaggeration"]), "learning_rate": float(h["learning_rate"]),
        "epoch_seconds": float(h["seconds"]), "phase": float(PHASES.get(h["phase"], -1)),
    }


class EpochLogger:
    """Logs per-epoch metrics to one MLflow run, each epoch once.

    Passed as ``on_epoch`` to :func:`pipeline.train.train_distributed`, it logs every
    epoch while training runs; :meth:`log_history` then adds the epochs it has not
    seen (a training stage skipped or resumed from a checkpoint).
    """

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.logged: set[int] = set()

    def __call__(self, metrics: dict) -> None:
        import mlflow

        step = int(metrics["epoch"])
        if step in self.logged:
            return
        mlflow.log_metrics(_epoch_metrics(metrics), step=step, run_id=self.run_id)
        self.logged.add(step)

    def log_history(self, history: list[dict]) -> None:
        for h in history:
            self(h)


def _log_params(settings: dict, manifest: dict, train_key: str, workdir: str, feature_source: str | None,
                n_epochs: int | None = None) -> None:
    """Params (resolved settings and data facts) and tags of the active run."""
    import mlflow

    params = {f"{k}": (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in settings.items()}
    params.update({
        "data.n": manifest["n"], "data.input_dim": manifest.get("input_dim"), "data.dim": manifest["dim"],
        "data.k": manifest["k"], "data.knn_method": manifest.get("knn_method"),
        "data.knn_recall": manifest.get("knn_recall"), "data.n_edges": manifest.get("n_edges"),
        "data.config_hash": manifest.get("config_hash"),
        "train.feature_source": feature_source,
        "train.n_epochs": n_epochs,
    })
    mlflow.log_params({k: ("" if v is None else v) for k, v in params.items()})
    mlflow.set_tags({"ptsne.train_key": train_key, "ptsne.workdir": workdir})


def _log_run(spec: TrainJobSpec, estimator, manifest, history, metrics, plot_path, train_info,
             epochs: EpochLogger) -> tuple[str | None, str | None]:
    """The rest of the active run: epochs not logged live, quality metrics, artifacts, model."""
    import mlflow

    from jobs import registry

    epochs.log_history(history)
    mlflow.set_tag("ptsne.resumed_from", json.dumps(train_info.get("resumed_from", [])))
    numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    numeric.update({k: float(v) for k, v in train_info.get("timings", {}).items()})
    mlflow.log_metrics(numeric)
    mlflow.set_tag("eval_source", metrics.get("eval_source", ""))
    with tempfile.TemporaryDirectory(prefix="ptsne-run-") as tmp:
        tmp = Path(tmp)
        (tmp / "resolved_config.json").write_text(json.dumps(spec.settings, indent=2, sort_keys=True))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        (tmp / "history.json").write_text(json.dumps(history, indent=2))
        for name in ("resolved_config.json", "manifest.json", "history.json"):
            mlflow.log_artifact(str(tmp / name))
    if plot_path is not None:
        mlflow.log_artifact(str(plot_path))
    info = registry.log_model(estimator, metadata={"train_key": train_info["key"]})
    registered = None
    if spec.register:
        ref = registry.register(info.model_uri, spec.register, alias=spec.alias)
        registered = f"models:/{ref.name}@{spec.alias}" if spec.alias else ref.uri
    return info.model_uri, registered


def train_job(spec: TrainJobSpec) -> TrainJobResult:
    """Run the whole job of ``spec``; raises on failure (see :func:`run` for exit codes).

    One MLflow run per job: it starts before training, so that the per-epoch metrics
    appear while the workers train, and ends after the model is registered (status
    FAILED when a stage raises). Every location may be a local path or a URI
    (:class:`TrainLocations`).
    """
    import mlflow

    from jobs import tempdirs
    from jobs.modelstore import check_saveable, load_model, save_model
    from jobs.tracking import configure_mlflow
    from pipeline.affinity import read_manifest
    from pipeline.storage import check_writable_dir, is_local, makedirs, resolve
    from pipeline.train import train_distributed, train_key

    if not isinstance(spec, TrainJobSpec):
        raise TypeError(f"train_job: spec must be a TrainJobSpec (TrainJobSpec.from_args(resolve_args(args))), "
                        f"got {type(spec).__name__}")
    where = spec.locations
    check_writable_dir(*resolve(where.workdir))  # before Ray starts, as the model check below
    check_saveable(where.model, (STAMP_FILE,))  # a model directory holding other files is left alone
    manifest = None
    if where.affinities_given:  # a missing affinity directory is reported before Ray starts
        manifest = read_manifest(where.affinities)
        if manifest is None:
            raise FileNotFoundError(
                f"--affinities {where.affinities!r}: no manifest.json there (not an affinity directory "
                "written by `ptsne affinities`)"
            )
    started_ray = _init_ray(spec)
    if started_ray:
        _check_local_resources(spec)
    try:
        location = configure_mlflow(spec.experiment)
    except BaseException:
        if started_ray:
            import ray

            ray.shutdown()
        raise
    fs, workdir_path = resolve(where.workdir)
    if is_local(fs):  # object stores have no directories to create
        makedirs(fs, workdir_path)
    skipped: list[str] = []
    timings: dict[str, float] = {}
    try:
        t = time.perf_counter()
        if manifest is not None:
            skipped.append("affinities")
        else:
            from pipeline.affinity import build_affinities

            before = _manifest_hash(where.affinities)
            manifest = build_affinities(spec.affinity)
            if before is not None and before == manifest.get("config_hash"):
                skipped.append("affinities")
        timings["affinities_seconds"] = time.perf_counter() - t
        config = spec.train_config(int(manifest["n"]))

        key = train_key(where.affinities, config, spec.workers)
        stamp = None if spec.fresh else read_stamp(where.model)
        out = TrainJobResult(
            workdir=where.workdir, affinity_dir=where.affinities, model_dir=where.model, plot=None, run_id=None,
            experiment_id=location.experiment_id, tracking_uri=location.tracking_uri, model_uri=None,
            registered=None, skipped=skipped,
        )
        t = time.perf_counter()
        if stamp is not None and stamp.get("key") in (key, stamp_key_before(manifest, config, spec.workers)):
            log.info("train: %s already holds the model of these settings; skipping training", where.model)
            estimator = load_model(where.model, device="cpu")
            history, train_info = stamp["history"], stamp["train_info"]
            skipped.append("train")
            timings["train_stage_seconds"] = time.perf_counter() - t
            logged = stamp.get("logged")
            if logged and logged.get("register") == spec.register and logged.get("alias") == spec.alias \
                    and logged.get("tracking_uri") == location.tracking_uri and _run_exists(logged.get("run_id")):
                log.info("register: run %s already logged and registered this model; skipping", logged["run_id"])
                out.run_id, out.model_uri, out.registered = logged["run_id"], logged["model_uri"], logged["registered"]
                out.plot, out.metrics = logged.get("plot"), logged.get("metrics", {})
                out.skipped.append("register")
                return out
            feature_source = train_info.get("feature_source")
        else:
            stamp = None
            feature_source = _feature_source(config, manifest)

        with mlflow.start_run(run_name=spec.run_name) as run, tempdirs.make("ptsne-run-") as tmp:
            _log_params(spec.settings, manifest, key, where.workdir, feature_source, config.train.n_epochs)
            epochs = EpochLogger(run.info.run_id)
            if stamp is None:
                # Per-epoch metrics reach the run while training goes on (on_epoch runs here, in the driver).
                result = train_distributed(
                    where.affinities, config, num_workers=spec.workers, use_gpu=spec.gpus_per_worker > 0,
                    storage_path=where.storage_path, resume=not spec.fresh, cpus_per_worker=spec.cpus_per_worker,
                    gpus_per_worker=spec.gpus_per_worker or 1.0, max_failures=spec.max_failures,
                    on_epoch=epochs,
                )
                estimator, history = result.estimator, result.history
                epoch_s = [h["seconds"] for h in history]
                train_info = {
                    "key": key, "resumed_from": result.resumed_from, "checkpoint": result.checkpoint_path,
                    "feature_source": feature_source,
                    "timings": {"train_seconds": result.seconds,
                                "seconds_per_epoch": sum(epoch_s) / max(1, len(epoch_s)),
                                "reference_seconds": result.reference_seconds},
                }
                stamp = {"key": key, "history": history, "train_info": train_info}
                # The model and its stamp appear together: a rerun never sees one without the other.
                save_model(estimator, where.model, extra={STAMP_FILE: stamp_bytes(stamp)})
                timings["train_stage_seconds"] = time.perf_counter() - t
            train_info = {**train_info, "timings": {**train_info.get("timings", {}), **timings}}

            metrics = evaluate(spec.eval, estimator, where.affinities, manifest)
            plot_file = _plot(spec, estimator, where.affinities, Path(tmp) / PLOT_FILE)
            _copy_file(plot_file, where.plot)
            model_uri, registered = _log_run(spec, estimator, manifest, history, metrics, plot_file, train_info, epochs)
            run_id = run.info.run_id
        out.run_id, out.model_uri, out.registered, out.plot = run_id, model_uri, registered, where.plot
        out.metrics = {**metrics, **train_info.get("timings", {})}
        stamp["logged"] = {"run_id": run_id, "model_uri": model_uri, "registered": registered,
                           "register": spec.register, "alias": spec.alias, "tracking_uri": location.tracking_uri,
                           "plot": where.plot, "metrics": out.metrics}
        write_stamp(where.model, stamp)
        return out
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def _copy_file(local: Path, location: str) -> None:
    """Copy the local file ``local`` to ``location`` (a path or URI), whole or not at all."""
    from pipeline.storage import resolve, write_bytes_atomic

    fs, path = resolve(location)
    write_bytes_atomic(fs, path, Path(local).read_bytes())


def _check_local_resources(spec: TrainJobSpec) -> None:
    """A Ray started here cannot grow: more workers than it has CPUs/GPUs would wait forever."""
    import ray

    have = ray.cluster_resources()
    need_cpu = spec.workers * spec.cpus_per_worker
    if have.get("CPU", 0) < need_cpu:
        ray.shutdown()
        raise UsageError(
            f"--workers {spec.workers} x --cpus-per-worker {spec.cpus_per_worker} needs {need_cpu} CPUs, "
            f"but the local Ray has {int(have.get('CPU', 0))}; lower them or pass --ray-address of a cluster"
        )
    if spec.gpus_per_worker > 0 and have.get("GPU", 0) < spec.workers * spec.gpus_per_worker:
        ray.shutdown()
        raise UsageError(
            f"--workers {spec.workers} x --gpus-per-worker {spec.gpus_per_worker} needs "
            f"{spec.workers * spec.gpus_per_worker:g} GPUs, but the local Ray has {have.get('GPU', 0):g}"
        )


def _manifest_hash(affinity_dir: str) -> str | None:
    from pipeline.affinity import read_manifest

    try:
        manifest = read_manifest(affinity_dir)
    except (OSError, ValueError):
        return None
    return manifest.get("config_hash") if isinstance(manifest, dict) else None


def _feature_source(config, manifest: dict) -> str:
    if config.feature_source != "auto":
        return config.feature_source
    return "object_store" if manifest["n"] * manifest["dim"] * 4 <= config.object_store_max_bytes else "scan"


def _run_exists(run_id: str | None) -> bool:
    if not run_id:
        return False
    import mlflow

    try:
        mlflow.MlflowClient().get_run(run_id)
        return True
    except Exception:
        return False


def run(args: argparse.Namespace) -> int:
    """Entry point of ``ptsne train``; returns an exit code and prints a JSON summary."""
    try:
        spec = TrainJobSpec.from_args(resolve_args(args))
    except (ValueError, TypeError, FileNotFoundError) as exc:
        return REPORT.refuse(exc)
    try:
        result = train_job(spec)
    except Exception as exc:
        return REPORT.fail(exc)
    sys.stdout.write(json.dumps(result.as_dict(), default=str) + "\n")
    sys.stdout.flush()
    return EXIT_OK
