"""The settings of the Ray stages, declared once and importable without torch, FAISS or Ray.

:class:`AffinityJobConfig` (``ptsne affinities`` and the kNN group of ``ptsne train``)
and :class:`DistributedTrainConfig` (``ptsne train``'s training options, which hold the
core configs of :mod:`ptsne.configs`). ``pipeline.affinity`` and ``pipeline.train``
export them too; they live here so that the command line is built without loading
the stages themselves.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np

from pipeline.shards import ColumnSpec
from pipeline.storage import check_disjoint
from ptsne.affinity import as_perplexities
from ptsne.configs import DEVICES, EXACT_MAX_POINTS, KNN_METHODS, ModelConfig, ReferenceConfig, TrainConfig, check_size
from ptsne.settings import public_name, setting, settings_of, spec, validate

#: Default number of kNN search tasks that share one GPU (each asks Ray for ``1 / 4`` GPU).
DEFAULT_SEARCHES_PER_GPU = 4


@dataclass(frozen=True)
class AffinityJobConfig:
    """Settings of :func:`pipeline.affinity.build_affinities`.

    The user's settings (columns, perplexity, kNN, PCA, task sizes, device, seed) are
    declared below with :func:`ptsne.settings.setting`: their defaults, bounds and help
    are those of ``ptsne affinities``' options (:mod:`jobs.affinities`). ``n_neighbors``
    may stay ``"auto"`` (:func:`ptsne.affinity.default_k`); a list of perplexities
    averages the conditional rows (multiscale); ``feature_cols`` replaces ``vector_col``.

    Parameters
    ----------
    input : str
        Directory, file or URI (``s3://``, ``gs://``, ...) of Parquet shards.
    output : str
        Affinity directory to create (local path or URI).
    max_retries : int
        Ray retries of a failed task.
    overwrite : bool
        Replace an existing, non-empty output that was built with other settings.
    ray_address : str, optional
        Cluster to connect to when Ray is not initialised yet (``None``: local).
    inject_failure : str, optional
        For retry tests: a local marker path; the first kNN task that finds it
        absent creates it and fails once.
    inject_failure_mode : {"raise", "crash"}
        How that task fails: raise :class:`pipeline.affinity.TransientTaskError`, or end its
        worker process abruptly (as a lost node or an out-of-memory kill would).
    knn_searches_per_gpu : int
        On a GPU cluster, kNN search tasks that share one GPU (each asks Ray
        for ``1 / knn_searches_per_gpu`` GPU); their perplexity calibration runs
        in CPU tasks. Does not change the result.
    """

    input: str
    output: str
    vector_col: str | None = setting(
        "vector", "column of fixed-size lists or lists of numbers holding the vectors")
    feature_cols: tuple[str, ...] | None = setting(
        None, "comma-separated numeric columns that form the vectors (instead of --vector-col)")
    id_col: str | None = setting(None, "int or string id column; without it, rows are numbered by input position")
    label_col: str | None = setting(None, "column copied to the features as 'label'")
    perplexity: float | tuple[float, ...] = setting(
        30.0, "perplexity, or several for multiscale affinities", gt=1)
    n_neighbors: int | str = setting("auto", "neighbours per point", ge=1, auto="3 x the largest perplexity")
    pca_components: int | None = setting(
        None, "project to this many dimensions before the kNN search; without it, no PCA",
        ge=1, flag="--pca", dest="pca_components")
    pca_samples: int = setting(100_000, "rows sampled (over all shards) to fit the PCA", ge=2)
    knn_method: str = setting(
        "auto", f"kNN index: 'auto' is exact up to {EXACT_MAX_POINTS} points, IVF beyond", choices=KNN_METHODS)
    target_recall: float = setting(0.95, "IVF recall@k target; nprobe is raised until a sample reaches it",
                                   gt=0, le=1)
    batch_rows: int = setting(50_000, "rows per features part, i.e. per kNN task", ge=1)
    edge_partitions: int | None = setting(
        None, "edges output parts (head ranges); without it, from the edge count", ge=1)
    max_index_bytes: int | None = setting(
        None, "largest index shipped whole through the object store; larger ones are sharded; without it, "
        "min(2 GiB, 1/4 of the smallest node's object store)", ge=1)
    drop_invalid: bool = setting(
        False, "drop NaN/Inf/missing vectors into rejects.parquet instead of rejecting the input")
    device: str = setting("auto", "where kNN tasks search: 'auto' requests GPUs when the Ray cluster has them",
                          choices=DEVICES)
    task_cpus: int = setting(1, "CPUs per Ray task (and FAISS/torch threads inside it)", ge=1)
    max_retries: int = 3
    seed: int = setting(0, "seed of the PCA sample and the IVF index (in ptsne train, of training too)")
    overwrite: bool = False
    ray_address: str | None = None
    inject_failure: str | None = None
    inject_failure_mode: str = "raise"
    knn_searches_per_gpu: int = setting(
        DEFAULT_SEARCHES_PER_GPU, "kNN search tasks sharing one GPU (each asks Ray for that fraction of a GPU)", ge=1)

    def __post_init__(self) -> None:
        for name in ("input", "output"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                object.__setattr__(self, name, os.fspath(value))
            elif not isinstance(value, str) or not value:
                raise TypeError(f"AffinityJobConfig: {name} must be a path or URI, got {value!r}")
        if self.feature_cols is not None:
            object.__setattr__(self, "vector_col", None)
        # Validates the column names (raises with the parameter named).
        object.__setattr__(self, "feature_cols", self.spec.feature_cols)
        validate(self)
        perps = as_perplexities(self.perplexity)
        object.__setattr__(self, "perplexity", perps[0] if len(perps) == 1 else perps)
        r = self.max_retries
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 0:
            raise ValueError(f"AffinityJobConfig: max_retries must be an integer >= 0, got {r!r}")
        if self.inject_failure_mode not in ("raise", "crash"):
            raise ValueError(
                f"AffinityJobConfig: inject_failure_mode must be 'raise' or 'crash', got {self.inject_failure_mode!r}"
            )
        try:
            check_disjoint(self.input, self.output)
        except ValueError as exc:
            raise ValueError(f"AffinityJobConfig: {exc}") from None
        validate(self)

    @property
    def spec(self) -> ColumnSpec:
        return ColumnSpec(self.vector_col, self.feature_cols, self.id_col, self.label_col)

    @property
    def perplexities(self) -> tuple[float, ...]:
        return as_perplexities(self.perplexity)

    def hash_fields(self) -> dict:
        """Settings that change the result (not where or how fast it is computed)."""
        skip = {"input", "output", "device", "task_cpus", "max_retries", "overwrite", "ray_address",
                "inject_failure", "inject_failure_mode", "batch_rows", "edge_partitions", "knn_searches_per_gpu"}
        d = {k: v for k, v in asdict(self).items() if k not in skip}
        d["perplexity"] = list(self.perplexities)
        d["feature_cols"] = list(self.feature_cols) if self.feature_cols else None
        return d


# -- training -----------------------------------------------------------------------------

#: Features up to this many bytes go through the object store (one copy per node).
DEFAULT_OBJECT_STORE_MAX_BYTES = 2 * 1024**3
FEATURE_SOURCES = ("auto", "object_store", "scan")
#: Default seconds between progress reports (each with a checkpoint). Ray Train takes one
#: report off a worker per poll (every 2 s): reports closer than that hold the worker up,
#: and one per epoch cost 2.5 s each on 2 cores, 100 of the 111 s of the digits quickstart.
DEFAULT_REPORT_SECONDS = 5.0


@dataclass(frozen=True)
class DistributedTrainConfig:
    """Settings of distributed training: the core's settings plus the data path.

    Parameters
    ----------
    train : TrainConfig
        Optimisation. ``batch_size`` counts the anchors of a step over all workers
        together; each worker takes ``batch_size // num_workers`` of them, so a step
        sees the same number of anchors whatever the worker count.
    model : ModelConfig
        Architecture of the MLP; its ``n_inputs`` comes from the data (leave it None).
    reference : ReferenceConfig
        The reference fitted on the driver after training (``size`` 0: a network-only
        model; otherwise more than ``transform_k`` points).
    feature_source : {"auto", "object_store", "scan"}
        How workers get neighbour features; ``"auto"`` uses the object store up
        to ``object_store_max_bytes`` and streaming gathers beyond.
    object_store_max_bytes : int
        Threshold of ``"auto"``.
    report_seconds, report_steps : float or None, int or None
        Training runs in epochs of optimisation steps; after the first epoch that ends
        ``report_seconds`` or more after the last report, or ``report_steps`` or more
        steps after it, rank 0 reports the metrics of the steps since then (one
        history entry) and writes a checkpoint; so it does at the end of the early
        exaggeration and of training. None turns a criterion off; ``report_steps=1``
        reports every epoch. Neither changes the trained model.

    :meth:`from_settings` builds one from flat settings by their public names
    (``n_epochs=40, hidden_layers=(64, 64), reference_size=0``), as the command
    line and :meth:`settings` name them.
    """

    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    feature_source: str = setting(
        "auto", "how workers read neighbour features: the object store, streaming scans of the feature shards, "
        "or 'auto' (the object store up to object_store_max_bytes)", choices=FEATURE_SOURCES)
    object_store_max_bytes: int = setting(
        DEFAULT_OBJECT_STORE_MAX_BYTES, "features up to this many bytes go through the object store", ge=0)
    report_seconds: float | None = setting(
        DEFAULT_REPORT_SECONDS, "report progress and checkpoint after the first epoch that ends this many seconds "
        "after the last report (and at the end of the early exaggeration and of training)", gt=0)
    report_steps: int | None = setting(
        None, "... or this many optimisation steps after it (1: after every epoch); without it, by time only", ge=1)

    def __post_init__(self) -> None:
        for name, cls in _PARTS.items():
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"DistributedTrainConfig: {name} must be a {cls.__name__}, "
                                f"got {type(getattr(self, name)).__name__}")
        validate(self)
        check_size(self.reference, "DistributedTrainConfig")  # fails before training, not in placement

    @classmethod
    def from_settings(cls, **settings) -> DistributedTrainConfig:
        """A config from flat settings named as :meth:`settings` names them; the others keep their defaults."""
        return cls().with_settings(**settings)

    def with_settings(self, **settings) -> DistributedTrainConfig:
        """A copy with the flat settings ``settings`` (named as :meth:`settings` names them) changed."""
        parts: dict[str, dict] = {name: {} for name in (*_PARTS, "")}
        for name, value in settings.items():
            try:
                part, field_name = _FLAT[name]
            except KeyError:
                raise TypeError(f"DistributedTrainConfig: unknown setting {name!r}; known: {sorted(_FLAT)}") from None
            parts[part][field_name] = value
        own = parts.pop("")
        changed = {name: replace(getattr(self, name), **values) for name, values in parts.items() if values}
        return replace(self, **changed, **own)

    def settings(self) -> dict:
        """Every setting by its public name (the command line's, with underscores), JSON-ready."""
        out = {}
        for name, (owner, field_name) in _FLAT.items():
            value = getattr(getattr(self, owner) if owner else self, field_name)
            out[name] = list(value) if isinstance(value, tuple) else value
        return out

    def model_config(self, n_inputs: int) -> ModelConfig:
        return self.model.with_inputs(n_inputs)

    def to_dict(self) -> dict:
        """The whole config, nested like the dataclass (what checkpoints record)."""
        d = asdict(self)
        d["model"].pop("n_inputs")
        d["model"]["hidden_layers"] = list(self.model.hidden_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DistributedTrainConfig:
        """Inverse of :meth:`to_dict`; also reads the flat settings that checkpoints recorded before."""
        if not isinstance(d.get("train"), dict):
            return cls.from_settings(**d)
        d = dict(d)
        return cls(**{name: part(**d.pop(name, {})) for name, part in _PARTS.items()}, **d)

    def fingerprint(self, reference: bool = True) -> str:
        """Hash of the settings that change the trained model (not the data path).

        ``reference=False`` leaves the reference settings out: the hash of what
        changes the trained network, which names the Ray Train run, so that a
        finished run is reused when only the reference settings change. Settings
        that joined later are hashed only when they differ from their defaults,
        so that a run keeps its name across versions.
        """
        d = self.settings()
        for f in settings_of(type(self)):
            d.pop(f.name)
        for name, default in _LATER_SETTINGS.items():
            if d.get(name) == default:
                d.pop(name)
        tuned = {f"reference.{f.name}": getattr(self.reference, f.name) for f in fields(ReferenceConfig)
                 if spec(f) is None and getattr(self.reference, f.name) != f.default}
        if not reference:
            for f in settings_of(ReferenceConfig):
                d.pop(public_name(f))
        elif tuned:
            d["reference"] = tuned
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


#: The configs that :class:`DistributedTrainConfig` holds, by field.
_PARTS = {"train": TrainConfig, "model": ModelConfig, "reference": ReferenceConfig}
#: Public name of each flat setting -> (field of DistributedTrainConfig holding it, or "" for its own; field name).
_FLAT = {
    **{public_name(f): (part, f.name) for part, cls in _PARTS.items() for f in settings_of(cls)},
    **{public_name(f): ("", f.name) for f in settings_of(DistributedTrainConfig)},
}
#: Settings added after runs were named by the flat settings, with the default that leaves the name as it was.
_LATER_SETTINGS = {"layer_norm": False}
