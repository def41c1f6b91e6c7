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

One ``ptsne train`` per workdir at a time: a second one is refused (exit 1, naming the
holder ``host:pid``) by ``WORKDIR/.ptsne-train.lock``, a ``flock`` locally and a lease object
on object stores, as ``ptsne embed`` locks its output.

Exit codes: 0 ok; 1 another run holds the workdir, or an unexpected error; 2 usage (bad option or config file, an
input and a location this job writes of which one contains the other, a model
location holding something else); 3 bad input data; 4 input, config file or
affinity directory not found.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from jobs.cli import EXIT_OK, Report, add_ray_arguments
from jobs.evaluation import EvalSettings, evaluate, sample_features
from jobs.stamp import STAMP_FILE, read_stamp, stamp_bytes, stamp_key_before, write_stamp
from ptsne.settings import public_name, setting, settings_of, validate

if TYPE_CHECKING:  # imported where used: Ray stays out of `ptsne --help`
    from pipeline.configs import AffinityJobConfig, DistributedTrainConfig

log = logging.getLogger(__name__)

REPORT = Report("train", output="--workdir")

DEFAULT_WORKDIR = "ptsne-work"
MODEL_DIR = "model"
AFFINITY_DIR = "affinities"
RAY_RESULTS_DIR = "ray_results"
PLOT_FILE = "embedding.png"
#: One writer per workdir (:func:`pipeline.storage.lock`).
LOCK_FILE = ".ptsne-train.lock"
#: Name prefix of the run's temporary directories in the system temp directory (:mod:`jobs.tempdirs`).
TEMP_PREFIX = "ptsne-run-"
#: Phases logged as the numeric ``phase`` metric.
PHASES = {"early_exaggeration": 0, "embedding": 1}


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Every option of ``ptsne train`` (also the keys of its config file)."""
    from jobs.affinities import add_affinity_arguments
    from jobs.settings import add_setting_arguments

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
    add_setting_arguments(src, TrainSampling)
    aff = p.add_argument_group("kNN and affinities (see `ptsne affinities`)")
    add_affinity_arguments(aff)
    tr = p.add_argument_group("training")
    TrainConfig, ModelConfig, ReferenceConfig, DistributedTrainConfig = training_classes()
    add_setting_arguments(tr, TrainConfig, skip={"seed"})  # --seed is an affinity option, shared by both stages
    add_setting_arguments(tr, ModelConfig)
    add_setting_arguments(tr, DistributedTrainConfig)
    ref = p.add_argument_group("reference (t-SNE-grade map of training points, fitted after training)")
    add_setting_arguments(ref, ReferenceConfig)
    sc = p.add_argument_group("scaling")
    add_setting_arguments(sc, TrainScaling)
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


@dataclass(frozen=True)
class TrainScaling:
    """How ``ptsne train`` spreads training over Ray: its ``scaling`` options, declared once."""

    workers: int = setting(1, "data-parallel training workers", ge=1)
    cpus_per_worker: int = setting(1, "CPUs (torch threads) per worker", ge=1)
    gpus_per_worker: float | str = setting(
        "auto", "GPUs per worker; > 0 trains on GPUs with NCCL, and with --workers above 1 it must be >= 1: "
        "workers cannot share a GPU (0: CPU with gloo)", ge=0,
        auto="1 (NCCL, one GPU per worker) where the Ray cluster has a GPU for every worker, else 0")
    max_failures: int = setting(1, "worker-group restarts, each resuming from the last epoch checkpoint", ge=0)

    def __post_init__(self) -> None:
        validate(self)


@dataclass(frozen=True)
class TrainSampling:
    """How many points ``ptsne train`` evaluates and plots, declared once."""

    eval_samples: int = setting(5000, "held-out rows used for metrics", ge=1)
    plot_points: int = setting(
        1_000_000, "training rows drawn in the plot; beyond 200000 it is a density image", ge=1)

    def __post_init__(self) -> None:
        validate(self)


def training_classes() -> tuple[type, ...]:
    """The configs whose settings are the training options (:class:`pipeline.train.DistributedTrainConfig`'s parts)."""
    from pipeline.configs import DistributedTrainConfig
    from ptsne.configs import ModelConfig, ReferenceConfig, TrainConfig

    return TrainConfig, ModelConfig, ReferenceConfig, DistributedTrainConfig


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Merge ``--config`` into ``args`` and check the combination."""
    from jobs.config import apply_config, load_config_file
    from jobs.settings import check_options

    if args.config:
        apply_config(args._parser, args, load_config_file(args.config, section="train"), source=str(args.config))
    if (args.input is None) == (args.affinities is None):
        raise UsageError("give exactly one of --input (Parquet shards) and --affinities (an affinity directory)")
    try:
        check_options(args, TrainSampling, TrainScaling, *training_classes())
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    from pipeline.train import check_gpu_workers

    try:
        if args.gpus_per_worker != "auto":  # "auto" gives each worker a whole GPU or none
            check_gpu_workers(args.workers, args.gpus_per_worker > 0, args.gpus_per_worker)
    except ValueError as exc:
        raise UsageError(f"--workers {args.workers} --gpus-per-worker {args.gpus_per_worker:g}: {exc}") from None
    if args.alias and not args.register:
        raise UsageError("--alias needs --register NAME")
    if args.register is not None:  # refused before training, not after it
        from jobs.registry import check_name

        check_name(args.register, "--register")
    return args


def _json_ready(value):
    return list(value) if isinstance(value, tuple) else value


def _declared_values(config) -> dict:
    """The settings of dataclass instance ``config`` by their public names."""
    return {public_name(f): _json_ready(getattr(config, f.name)) for f in settings_of(type(config))}


#: Fields of the affinity stage that say where it reads, writes and runs, or how a test breaks it: not params.
_AFFINITY_NOT_PARAMS = frozenset({"input", "output", "overwrite", "ray_address", "max_retries"})


def affinity_params(config: AffinityJobConfig | None) -> dict:
    """The settings of the affinity stage by field name, JSON-ready; ``{}`` for an existing directory."""
    if config is None:
        return {}
    out = {f.name: _json_ready(getattr(config, f.name)) for f in dataclasses.fields(config)
           if f.name not in _AFFINITY_NOT_PARAMS and not f.name.startswith("inject_failure")}
    if "perplexity" in out and not isinstance(out["perplexity"], list):
        out["perplexity"] = [out["perplexity"]]  # one perplexity or several: always the list runs have recorded
    return out


def training_params(config: DistributedTrainConfig) -> dict:
    """The training settings by their public names, and also by their options' names where those differ
    (``epochs`` beside ``n_epochs``: the name runs recorded before)."""
    from jobs.settings import dest

    out = config.settings()
    for cls in training_classes():
        for f in settings_of(cls):
            out.setdefault(dest(f), out[public_name(f)])
    return out


@dataclass(frozen=True)
class TrainJobSpec:
    """One ``ptsne train``, parsed once: what :func:`train_job` and its steps read instead of ``args``.

    Built by :meth:`from_args` from resolved arguments (:func:`resolve_args`).
    ``config`` holds ``--epochs auto`` as the core default (``epochs_auto`` set);
    :meth:`train_config` resolves it for the number of points. ``affinity`` is the
    kNN and P stage writing ``locations.affinities``, None when ``--affinities``
    names an existing directory. :meth:`params` are the run's MLflow params and
    its ``resolved_config.json``.
    """

    locations: TrainLocations
    config: DistributedTrainConfig
    affinity: AffinityJobConfig | None
    eval: EvalSettings
    scaling: TrainScaling = field(default_factory=TrainScaling)
    sampling: TrainSampling = field(default_factory=TrainSampling)
    epochs_auto: bool = False
    fresh: bool = False
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
        from jobs.affinities import config_from_args as affinity_config
        from jobs.settings import config_from_args, settings_from_args
        from pipeline.configs import DistributedTrainConfig
        from ptsne.configs import TrainConfig

        settings = settings_from_args(args, *training_classes())
        epochs_auto = settings["n_epochs"] == "auto"
        if epochs_auto:
            settings["n_epochs"] = TrainConfig.n_epochs
        config = DistributedTrainConfig.from_settings(**settings)
        sampling = config_from_args(args, TrainSampling)
        where = TrainLocations.from_args(args)
        where.check()
        feature_cols = tuple(c.strip() for c in args.feature_cols.split(",")) if args.feature_cols else None
        return cls(
            locations=where,
            config=config,
            # The affinity directory belongs to this job's workdir: rebuilt when the settings change.
            affinity=None if where.affinities_given else affinity_config(
                args, output=where.affinities, overwrite=True),
            eval=EvalSettings(input=args.eval_input, samples=sampling.eval_samples, seed=args.seed,
                              vector_col=args.vector_col, feature_cols=feature_cols, label_col=args.label_col),
            scaling=config_from_args(args, TrainScaling), sampling=sampling, epochs_auto=epochs_auto,
            fresh=args.fresh, seed=args.seed, experiment=args.experiment, run_name=args.run_name,
            register=args.register, alias=args.alias,
            ray_address=getattr(args, "ray_address", None), num_cpus=getattr(args, "num_cpus", None),
        )

    def train_config(self, n: int) -> DistributedTrainConfig:
        """The training settings for ``n`` points: ``--epochs auto`` is :func:`ptsne.train.default_epochs`."""
        if not self.epochs_auto:
            return self.config
        from ptsne.train import default_epochs

        return self.config.with_settings(n_epochs=default_epochs(n, self.config.train.batch_size))

    def params(self, config: DistributedTrainConfig) -> dict:
        """Every setting of the job, resolved and JSON-ready: the run's MLflow params and ``resolved_config.json``.

        ``config`` is the training config resolved for the data (:meth:`train_config`).
        The training settings come by their public names (:func:`training_params`),
        the affinity stage's by field (:func:`affinity_params`), then the job's own:
        its locations, scaling and sampling, and MLflow names.
        """
        where = self.locations
        out = {**affinity_params(self.affinity), **training_params(config)}
        for name in ("vector_col", "feature_cols", "label_col"):  # the held-out input's columns
            out.setdefault(name, _json_ready(getattr(self.eval, name)))
        out.update(input=where.input, affinities=where.affinities, workdir=where.workdir,
                   eval_input=where.eval_input, storage_path=where.storage_path)
        out.update(_declared_values(self.scaling))
        out.update(_declared_values(self.sampling))
        out.update(experiment=self.experiment, run_name=self.run_name, register=self.register, alias=self.alias,
                   fresh=self.fresh, ray_address=self.ray_address, num_cpus=self.num_cpus)
        return dict(sorted(out.items()))


# -- stages ------------------------------------------------------------------------------------


def _init_ray(spec: TrainJobSpec) -> bool:
    from pipeline.session import RaySession

    return RaySession(spec.ray_address, spec.num_cpus).start()


def training_gpus(gpus_per_worker: float | str, workers: int, cluster_gpus: float) -> float:
    """GPUs per training worker: ``gpus_per_worker`` as given, or for ``"auto"`` 1 where the cluster has
    ``cluster_gpus >= workers`` (NCCL, one GPU per worker: workers cannot share one), else 0 (CPU, gloo).

    ``cluster_gpus`` is what ``ray.cluster_resources()`` counts now: an autoscaling
    cluster whose GPU nodes are not up yet trains on CPU unless told ``--gpus-per-worker 1``.
    """
    if gpus_per_worker != "auto":
        return float(gpus_per_worker)
    if cluster_gpus >= workers:
        return 1.0
    if cluster_gpus > 0:
        log.warning("train: the Ray cluster has %g GPU(s) for %d workers (one each); training on CPUs "
                    "(--gpus-per-worker 1 waits for GPU nodes, --workers %d trains on the GPUs there are)",
                    cluster_gpus, workers, int(cluster_gpus))
    return 0.0


def _resolve_scaling(spec: TrainJobSpec) -> TrainJobSpec:
    """``spec`` with ``--gpus-per-worker auto`` resolved for the connected cluster (:func:`training_gpus`)."""
    import ray

    scaling = spec.scaling
    gpus = training_gpus(scaling.gpus_per_worker, scaling.workers, ray.cluster_resources().get("GPU", 0))
    if gpus > 0 and scaling.gpus_per_worker == "auto":
        log.info("train: %d worker(s) on a GPU each, NCCL", scaling.workers)
    return dataclasses.replace(spec, scaling=dataclasses.replace(scaling, gpus_per_worker=gpus))


def _plot(spec: TrainJobSpec, estimator, affinity_dir: str, path: Path) -> Path:
    from jobs.plot import plot_embedding
    from ptsne.transform import transform

    _, X, y = sample_features(affinity_dir, spec.sampling.plot_points, spec.seed)
    Y = transform(estimator.model_, X)
    name = spec.register or "ptsne"
    return plot_embedding(Y, path, labels=y, title=f"{name}: {len(Y):,} training points")


def _epoch_metrics(h: dict) -> dict[str, float]:
    """The MLflow metrics (step = epoch) of one history entry: the steps of one report, over ``epochs`` epochs."""
    metrics = {
        "loss": float(h["loss"]), "attraction": float(h["attraction"]), "log_z": float(h["log_z"]),
        "exaggeration": float(h["exaggeration"]), "learning_rate": float(h["learning_rate"]),
        "epoch_seconds": float(h["seconds"]) / h.get("epochs", 1), "phase": float(PHASES.get(h["phase"], -1)),
    }
    if "step" in h:  # entries of models trained before training was counted in steps have none
        metrics["optimizer_steps"] = float(h["step"])
    return metrics


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


def _log_params(params: dict, manifest: dict, train_key: str, workdir: str, feature_source: str | None,
                n_epochs: int) -> None:
    """Params (the job's resolved settings, :meth:`TrainJobSpec.params`, and data facts) and tags of the active run."""
    import mlflow

    params = {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in params.items()}
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


@dataclass(frozen=True)
class AffinityStage:
    """What the affinities step hands on: the directory's manifest, and whether it was already there."""

    manifest: dict
    skipped: bool
    seconds: float


@dataclass
class TrainedModel:
    """The model of one job, trained now or found in ``WORKDIR/model`` with its stamp.

    ``estimator`` is None until the train step trains it (a found one is loaded
    by the reuse step); ``seconds`` is the time the train stage took.
    """

    config: DistributedTrainConfig
    key: str
    feature_source: str | None
    stamp: dict | None = None
    estimator: object | None = None
    seconds: float = 0.0

    @property
    def reused(self) -> bool:
        return self.stamp is not None

    @property
    def history(self) -> list[dict]:
        return self.stamp["history"]

    @property
    def train_info(self) -> dict:
        return self.stamp["train_info"]


def _check_before_ray(spec: TrainJobSpec) -> dict | None:
    """Refuse what can be refused before Ray starts; the manifest of ``--affinities`` (None without it)."""
    from jobs.modelstore import check_saveable
    from pipeline.affinity import read_manifest
    from pipeline.storage import check_writable_dir, resolve

    if not isinstance(spec, TrainJobSpec):
        raise TypeError(f"train_job: spec must be a TrainJobSpec (TrainJobSpec.from_args(resolve_args(args))), "
                        f"got {type(spec).__name__}")
    where = spec.locations
    check_writable_dir(*resolve(where.workdir))
    check_saveable(where.model, (STAMP_FILE,))  # a model directory holding other files is left alone
    if not where.affinities_given:
        return None
    manifest = read_manifest(where.affinities)
    if manifest is None:
        raise FileNotFoundError(
            f"--affinities {where.affinities!r}: no manifest.json there (not an affinity directory "
            "written by `ptsne affinities`)"
        )
    return manifest


def _make_workdir(workdir: str) -> None:
    from pipeline.storage import is_local, makedirs, resolve

    fs, path = resolve(workdir)
    if is_local(fs):  # object stores have no directories to create
        makedirs(fs, path)


def affinities_step(spec: TrainJobSpec, given: dict | None) -> AffinityStage:
    """The affinity directory: ``--affinities`` as given (its manifest ``given``), else built or found up to date."""
    t = time.perf_counter()
    if given is not None:
        return AffinityStage(given, skipped=True, seconds=time.perf_counter() - t)
    from pipeline.affinity import build_affinities

    before = _manifest_hash(spec.locations.affinities)
    manifest = build_affinities(spec.affinity)
    skipped = before is not None and before == manifest.get("config_hash")
    return AffinityStage(manifest, skipped=skipped, seconds=time.perf_counter() - t)


def reuse_step(spec: TrainJobSpec, affinities: AffinityStage) -> TrainedModel:
    """The training settings for the data, and the model of those settings when ``WORKDIR/model`` holds it.

    A model counts as found when its stamp carries this job's key, or the key of
    before (:func:`jobs.stamp.stamp_key_before`); ``--fresh`` finds none.
    """
    from jobs.modelstore import load_model
    from pipeline.train import train_key

    where, manifest = spec.locations, affinities.manifest
    config = spec.train_config(int(manifest["n"]))
    key = train_key(where.affinities, config, spec.scaling.workers)
    stamp = None if spec.fresh else read_stamp(where.model)
    if stamp is None or stamp.get("key") not in (key, stamp_key_before(manifest, config, spec.scaling.workers)):
        return TrainedModel(config, key, _feature_source(config, manifest))
    t = time.perf_counter()
    log.info("train: %s already holds the model of these settings; skipping training", where.model)
    estimator = load_model(where.model, device="cpu")
    return TrainedModel(config, key, stamp["train_info"].get("feature_source"), stamp=stamp, estimator=estimator,
                        seconds=time.perf_counter() - t)


def logged_before(spec: TrainJobSpec, model: TrainedModel, tracking_uri: str) -> dict | None:
    """The record of the run that logged and registered a found model as this job would; None when there is none."""
    logged = (model.stamp or {}).get("logged")
    if logged and logged.get("register") == spec.register and logged.get("alias") == spec.alias \
            and logged.get("tracking_uri") == tracking_uri and _run_exists(logged.get("run_id")):
        return logged
    return None


def train_step(spec: TrainJobSpec, model: TrainedModel, affinities: AffinityStage,
               epochs: EpochLogger) -> TrainedModel:
    """Train the model unless :func:`reuse_step` found it; saves it with its stamp under ``WORKDIR/model``.

    Runs inside the job's MLflow run: ``epochs`` logs each epoch's metrics while the workers train.
    """
    if model.reused:
        return model
    from jobs.modelstore import save_model
    from pipeline.train import train_distributed

    where, scaling = spec.locations, spec.scaling
    t = time.perf_counter()
    result = train_distributed(
        where.affinities, model.config, num_workers=scaling.workers, use_gpu=scaling.gpus_per_worker > 0,
        storage_path=where.storage_path, resume=not spec.fresh, cpus_per_worker=scaling.cpus_per_worker,
        gpus_per_worker=scaling.gpus_per_worker or 1.0, max_failures=scaling.max_failures, on_epoch=epochs,
    )
    epoch_s = [h["seconds"] for h in result.history]
    epochs_run = sum(h.get("epochs", 1) for h in result.history)  # a history entry may span several epochs
    train_info = {
        "key": model.key, "resumed_from": result.resumed_from, "checkpoint": result.checkpoint_path,
        "feature_source": model.feature_source,
        "timings": {"train_seconds": result.seconds, "seconds_per_epoch": sum(epoch_s) / max(1, epochs_run),
                    "reference_seconds": result.reference_seconds},
    }
    stamp = {"key": model.key, "history": result.history, "train_info": train_info}
    # The model and its stamp appear together: a rerun never sees one without the other.
    save_model(result.estimator, where.model, extra={STAMP_FILE: stamp_bytes(stamp)})
    return dataclasses.replace(model, stamp=stamp, estimator=result.estimator, seconds=time.perf_counter() - t)


def log_and_register_step(spec: TrainJobSpec, model: TrainedModel, affinities: AffinityStage,
                          epochs: EpochLogger, tmp: str | os.PathLike) -> dict:
    """Evaluate and plot the model and log them, with the model, to the active run; register it.

    Returns the run's record: ``run_id``, ``model_uri``, ``registered``, ``plot``
    and ``metrics`` (the quality figures and the timings).
    """
    where = spec.locations
    timings = {"affinities_seconds": affinities.seconds, "train_stage_seconds": model.seconds}
    train_info = {**model.train_info, "timings": {**model.train_info.get("timings", {}), **timings}}
    metrics = evaluate(spec.eval, model.estimator, where.affinities, affinities.manifest)
    plot_file = _plot(spec, model.estimator, where.affinities, Path(tmp) / PLOT_FILE)
    _copy_file(plot_file, where.plot)
    model_uri, registered = _log_run(spec, model, affinities.manifest, metrics, plot_file, train_info, epochs,
                                    tmp)
    return {"run_id": epochs.run_id, "model_uri": model_uri, "registered": registered,
            "plot": where.plot, "metrics": {**metrics, **train_info.get("timings", {})}}


def _log_run(spec: TrainJobSpec, model: TrainedModel, manifest, metrics, plot_path, train_info,
             epochs: EpochLogger, tmp: str | os.PathLike) -> tuple[str | None, str | None]:
    """The rest of the active run: epochs not logged live, quality metrics, artifacts (written in ``tmp``), model."""
    import mlflow

    from jobs import registry

    epochs.log_history(model.history)
    mlflow.set_tag("ptsne.resumed_from", json.dumps(train_info.get("resumed_from", [])))
    numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    numeric.update({k: float(v) for k, v in train_info.get("timings", {}).items()})
    mlflow.log_metrics(numeric)
    mlflow.set_tag("eval_source", metrics.get("eval_source", ""))
    tmp = Path(tmp)
    (tmp / "resolved_config.json").write_text(json.dumps(spec.params(model.config), indent=2, sort_keys=True))
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    (tmp / "history.json").write_text(json.dumps(model.history, indent=2))
    for name in ("resolved_config.json", "manifest.json", "history.json"):
        mlflow.log_artifact(str(tmp / name))
    if plot_path is not None:
        mlflow.log_artifact(str(plot_path))
    info = registry.log_model(model.estimator, metadata={"train_key": train_info["key"]})
    registered = None
    if spec.register:
        ref = registry.register(info.model_uri, spec.register, alias=spec.alias)
        registered = f"models:/{ref.name}@{spec.alias}" if spec.alias else ref.uri
    return info.model_uri, registered


def train_job(spec: TrainJobSpec) -> TrainJobResult:
    """Run the whole job of ``spec``; raises on failure (see :func:`run` for exit codes).

    The workdir is locked for the whole job (:data:`LOCK_FILE`, taken before Ray
    starts): a second job on it raises :class:`pipeline.storage.LockedError`
    naming the holder. The steps: :func:`affinities_step`, :func:`reuse_step` (the end when
    :func:`logged_before` finds the run of the model), then, in one MLflow run,
    :func:`train_step` and :func:`log_and_register_step`. The run starts before
    training, so that the per-epoch metrics appear while the workers train, and
    ends after the model is registered (status FAILED when a step raises). A Ray
    started here is shut down at the end. Every location may be a local path or
    a URI (:class:`TrainLocations`).
    """
    from jobs import tempdirs
    from pipeline.storage import lock, resolve

    tempdirs.remove_stale(TEMP_PREFIX)  # left by runs killed with SIGKILL
    given = _check_before_ray(spec)
    with lock(*resolve(spec.locations.workdir), LOCK_FILE, what="another `ptsne train`"):
        return _train_job(spec, given)


def _train_job(spec: TrainJobSpec, given: dict | None) -> TrainJobResult:
    """:func:`train_job` once the workdir is locked (``given``: the manifest of ``--affinities``)."""
    import mlflow

    from jobs import tempdirs
    from jobs.tracking import configure_mlflow

    where = spec.locations
    started_ray = _init_ray(spec)
    try:
        spec = _resolve_scaling(spec)
        if started_ray:
            _check_local_resources(spec)
        location = configure_mlflow(spec.experiment)
        _make_workdir(where.workdir)
        out = TrainJobResult(
            workdir=where.workdir, affinity_dir=where.affinities, model_dir=where.model, plot=None, run_id=None,
            experiment_id=location.experiment_id, tracking_uri=location.tracking_uri, model_uri=None,
            registered=None,
        )
        affinities = affinities_step(spec, given)
        out.skipped += ["affinities"] if affinities.skipped else []
        model = reuse_step(spec, affinities)
        out.skipped += ["train"] if model.reused else []
        logged = logged_before(spec, model, location.tracking_uri)
        if logged is not None:
            log.info("register: run %s already logged and registered this model; skipping", logged["run_id"])
            out.skipped.append("register")
            return _result(out, logged)
        with mlflow.start_run(run_name=spec.run_name) as run, tempdirs.make(TEMP_PREFIX) as tmp:
            _log_params(spec.params(model.config), affinities.manifest, model.key, where.workdir,
                        model.feature_source, model.config.train.n_epochs)
            epochs = EpochLogger(run.info.run_id)
            model = train_step(spec, model, affinities, epochs)
            record = log_and_register_step(spec, model, affinities, epochs, tmp)
        stamp = dict(model.stamp)
        stamp["logged"] = {**record, "register": spec.register, "alias": spec.alias,
                           "tracking_uri": location.tracking_uri}
        write_stamp(where.model, stamp)
        return _result(out, record)
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def _result(out: TrainJobResult, logged: dict) -> TrainJobResult:
    """``out`` completed with what a run logged (:func:`log_and_register_step`'s record, or the stamp's)."""
    out.run_id, out.model_uri, out.registered = logged["run_id"], logged["model_uri"], logged["registered"]
    out.plot, out.metrics = logged.get("plot"), logged.get("metrics", {})
    return out


def _copy_file(local: Path, location: str) -> None:
    """Copy the local file ``local`` to ``location`` (a path or URI), whole or not at all."""
    from pipeline.storage import resolve, write_bytes_atomic

    fs, path = resolve(location)
    write_bytes_atomic(fs, path, Path(local).read_bytes())


def _check_local_resources(spec: TrainJobSpec) -> None:
    """A Ray started here cannot grow: more workers than it has CPUs/GPUs would wait forever."""
    import ray

    have = ray.cluster_resources()
    scaling = spec.scaling
    need_cpu = scaling.workers * scaling.cpus_per_worker
    if have.get("CPU", 0) < need_cpu:
        raise UsageError(
            f"--workers {scaling.workers} x --cpus-per-worker {scaling.cpus_per_worker} needs {need_cpu} CPUs, "
            f"but the local Ray has {int(have.get('CPU', 0))}; lower them or pass --ray-address of a cluster"
        )
    if scaling.gpus_per_worker > 0 and have.get("GPU", 0) < scaling.workers * scaling.gpus_per_worker:
        raise UsageError(
            f"--workers {scaling.workers} x --gpus-per-worker {scaling.gpus_per_worker} needs "
            f"{scaling.workers * scaling.gpus_per_worker:g} GPUs, but the local Ray has {have.get('GPU', 0):g}"
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
