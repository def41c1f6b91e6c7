"""Batch embedding of Parquet shards with Ray Data, each input shard exactly once.

Ray Data reads the pending shards (``include_paths=True`` tags every row with
its shard), an actor pool of :class:`_Embedder` (the model, loaded once per
actor with ``ParametricTSNE.load``) maps the batches, and the driver collects
each shard's rows and writes one output file per input shard.

Output layout (``OUTPUT`` must be a local or shared POSIX directory, as the
exactly-once guarantee rests on ``os.replace``)::

    OUTPUT/_current.json              which version directory is complete and current
    OUTPUT/.ptsne-embed.lock          one writer at a time (flock)
    OUTPUT/<tag>/<relative input path>   one file per input shard (tag: v3, run-<id>, local)
    OUTPUT/<tag>/_ledger.jsonl        one line per finished input shard
    OUTPUT/<tag>/_rejects/<relative input path>   rejected rows (``on_invalid="reject"``)

Exactly once: a shard's output (and rejects) are written under a temporary name
and renamed into place, and only then is its ledger line added (the whole
ledger is rewritten to a temporary file and renamed). A shard is pending when
the ledger has no line for it, or its size or modification time changed, or its
output file is gone. At startup temporary files and outputs that have no ledger
line (left by a killed run) are deleted, so a run killed at any point and
rerun leaves each input row in the output exactly once.

Ids are checked for duplicates within each shard (the driver holds a shard's
rows anyway, so it costs one hash of the id column per shard): a warning with
the count, or with ``on_duplicate_ids="error"`` the shard is not written. Ids
of different shards, or of shards embedded by earlier runs, are not compared:
that would need every id of the output in one place.

Nothing here needs Ray before some shard has rows to embed: the lock, the
input listing, the ledger and every shard's footer are read first, so a run
with nothing to do (or one refused) starts no Ray when given ``start_ray``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import posixpath
import resource
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import shards, storage
from ptsne.reference import METHODS

log = logging.getLogger(__name__)

LEDGER_FILE = "_ledger.jsonl"
CURRENT_FILE = "_current.json"
LOCK_FILE = ".ptsne-embed.lock"
REJECTS_DIR = "_rejects"
FORMAT_VERSION = 1

EMBEDDING = "embedding"
MODEL_NAME = "model_name"
MODEL_VERSION = "model_version"
COORDS = ("x", "y", "z")
ON_INVALID = ("error", "reject")
ON_DUPLICATE_IDS = ("warn", "error")
#: Column that Ray Data's ``include_paths`` adds; it cannot be an input column.
RAY_PATH = "path"
_PATH = "__ptsne_path"
_STATUS = "__ptsne_status"
_T0 = "__ptsne_t0"
#: Per-row share of the actor's seconds in the model / in the whole call (summed by the driver).
_MODEL_S = "__ptsne_model_s"
_CALL_S = "__ptsne_call_s"
_INTERNAL = (_PATH, _STATUS, _T0, _MODEL_S, _CALL_S)

#: Row status codes computed by the actors.
OK, NULL_VECTOR, NON_FINITE, WRONG_DIM = 0, 1, 2, 3
REASONS = {NULL_VECTOR: "null vector", NON_FINITE: "NaN or Inf", WRONG_DIM: "wrong dimension"}


class EmbedInputError(ValueError):
    """Input shards the model cannot embed (schema, dimension, NaN/Inf rows).

    ``summary`` holds the :class:`EmbedSummary` of the run when shards were
    processed before the problem was found (those are complete and in the ledger).
    """

    def __init__(self, message: str, summary: EmbedSummary | None = None):
        super().__init__(message)
        self.summary = summary


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class ModelSpec:
    """The model to apply, already on local disk.

    Parameters
    ----------
    path : str
        A ``ParametricTSNE.save`` directory.
    name, version : str
        Written to the ``model_name`` / ``model_version`` columns and the ledger.
    tag : str
        Name of the versioned output directory (``v3``).
    """

    path: str
    name: str
    version: str
    tag: str

    def __post_init__(self) -> None:
        for attr in ("path", "name", "version", "tag"):
            value = getattr(self, attr)
            if not isinstance(value, str) or not value:
                raise ValueError(f"ModelSpec: {attr} must be a non-empty string, got {value!r}")
        if "/" in self.tag or self.tag.startswith((".", "_")):
            raise ValueError(f"ModelSpec: tag must be a plain directory name, got {self.tag!r}")
        if not (Path(self.path) / "config.json").is_file():
            raise FileNotFoundError(f"ModelSpec: no config.json in model directory {self.path!r}")

    def config(self) -> dict:
        return json.loads((Path(self.path) / "config.json").read_text())

    @property
    def has_reference(self) -> bool:
        """Whether the model keeps a reference (``transform`` can refine on it)."""
        return "reference" in self.config()

    def method(self, method: str) -> str:
        """``method`` as ``transform`` resolves it for this model: ``"network"`` or ``"refine"``.

        Raises ValueError for ``"refine"`` on a network-only model.
        """
        if method not in METHODS:
            raise ValueError(f"ModelSpec: method must be one of {METHODS}, got {method!r}")
        if method == "refine" and not self.has_reference:
            raise ValueError(
                f"method 'refine' needs a model with a reference; {self.name} version {self.version} "
                "is network-only (trained with reference_size 0): use method 'network' or 'auto'"
            )
        if method == "auto":
            return "refine" if self.has_reference else "network"
        return method

    @property
    def n_features(self) -> int:
        return int(self.config()["n_features_in"])

    @property
    def n_components(self) -> int:
        return int(self.config()["params"]["n_components"])


@dataclass(frozen=True)
class EmbedConfig:
    """How to read the shards and run the actors.

    Parameters
    ----------
    vector_col : str, optional
        Column of ``fixed_size_list`` / ``list`` of numbers. Default: ``vector``
        when present, unless ``feature_cols`` is given.
    feature_cols : sequence of str, optional
        Numeric columns that form the vector, in the model's feature order.
    id_col : str
        Id column copied to the output.
    passthrough : sequence of str
        Further input columns copied to the output.
    on_invalid : {"error", "reject"}
        Rows with null/NaN/Inf vectors or the wrong length: ``"error"`` fails
        their shard (nothing written for it, exit with counts); ``"reject"``
        writes them to ``_rejects/`` and embeds the rest.
    on_duplicate_ids : {"warn", "error"}
        Ids that occur more than once in a shard: ``"warn"`` embeds them and
        logs a warning with the count; ``"error"`` fails their shard (nothing
        written for it, exit with the count and an example id). Checked within
        each shard only (see the module docstring).
    batch_size : int
        Rows per model call. 16384 gave the fastest Parquet-to-Parquet rate
        with ``benchmarks/embed_throughput.py`` on a 2-core CPU (64-D input,
        256-256-256 network): the pipeline's per-batch costs weigh less than
        at 8192, where the bare forward pass alone is faster (see
        ``docs/embedding.md``).
    num_actors : int, optional
        Size of the actor pool; default one per GPU, or one per
        ``cpus_per_actor`` CPUs of the cluster leaving one CPU for reading.
    cpus_per_actor : float
        CPUs (and torch threads) of each actor.
    gpus_per_actor : float, optional
        Default 1 when the cluster has GPUs, else 0.
    progress : bool
        Show a tqdm progress bar of rows.
    method : {"auto", "network", "refine"}
        ``ParametricTSNE.transform``'s method: ``"network"`` is the network's
        forward pass, ``"refine"`` places each point on the model's reference
        map, ``"auto"`` refines when the model has a reference. One output
        directory holds one method's map.
    block_bytes : int
        Target size of Ray Data blocks during the run; each input block is one
        actor task. 32 MiB is about 100,000 rows of 64 float32 values: every
        task costs Ray Data work besides the model (4 MiB blocks measured
        about 10 points more overhead on a 2-core CPU). Ray's default
        (128 MiB) would hand a run's embeddings to the writer in a few large
        pieces; smaller blocks let finished shards stream out (and be in the
        ledger) sooner.
    """

    vector_col: str | None = None
    feature_cols: tuple[str, ...] | None = None
    id_col: str = "id"
    passthrough: tuple[str, ...] = ()
    on_invalid: str = "error"
    on_duplicate_ids: str = "warn"
    batch_size: int = 16384
    num_actors: int | None = None
    cpus_per_actor: float = 1.0
    gpus_per_actor: float | None = None
    progress: bool = True
    block_bytes: int = 32 << 20
    method: str = "auto"

    def __post_init__(self) -> None:
        if self.vector_col is not None and self.feature_cols is not None:
            raise ValueError(
                f"EmbedConfig: give vector_col or feature_cols, not both (got {self.vector_col!r} "
                f"and {self.feature_cols!r})"
            )
        for attr in ("feature_cols", "passthrough"):
            value = getattr(self, attr)
            if value is None:
                continue
            if isinstance(value, str) or not all(isinstance(c, str) and c for c in value):
                raise TypeError(f"EmbedConfig: {attr} must be a list of column names, got {value!r}")
            object.__setattr__(self, attr, tuple(value))
        if self.feature_cols is not None and not self.feature_cols:
            raise ValueError("EmbedConfig: feature_cols is empty; name at least one column")
        if not isinstance(self.id_col, str) or not self.id_col:
            raise ValueError(f"EmbedConfig: id_col must be a column name, got {self.id_col!r}")
        if self.on_invalid not in ON_INVALID:
            raise ValueError(f"EmbedConfig: on_invalid must be one of {ON_INVALID}, got {self.on_invalid!r}")
        if self.on_duplicate_ids not in ON_DUPLICATE_IDS:
            raise ValueError(
                f"EmbedConfig: on_duplicate_ids must be one of {ON_DUPLICATE_IDS}, got {self.on_duplicate_ids!r}"
            )
        if self.method not in METHODS:
            raise ValueError(f"EmbedConfig: method must be one of {METHODS}, got {self.method!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"EmbedConfig: batch_size must be a positive integer, got {self.batch_size!r}")
        if self.num_actors is not None and (
            isinstance(self.num_actors, bool) or not isinstance(self.num_actors, int) or self.num_actors < 1
        ):
            raise ValueError(f"EmbedConfig: num_actors must be a positive integer or None, got {self.num_actors!r}")
        if isinstance(self.block_bytes, bool) or not isinstance(self.block_bytes, int) or self.block_bytes < 1 << 16:
            raise ValueError(f"EmbedConfig: block_bytes must be an integer >= 65536, got {self.block_bytes!r}")
        if not self.cpus_per_actor > 0:
            raise ValueError(f"EmbedConfig: cpus_per_actor must be > 0, got {self.cpus_per_actor!r}")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise ValueError(f"EmbedConfig: gpus_per_actor must be >= 0 or None, got {self.gpus_per_actor!r}")


@dataclass
class EmbedSummary:
    """What a run did. ``rows_per_s`` counts embedded rows over the run's wall time.

    ``stream_rows`` / ``stream_seconds``: the rows embedded and the time from
    the first model call in an actor to the last shard written, i.e. the rate
    without the start-up of the actors (``stream_rows_per_s``).
    ``model_seconds`` / ``actor_seconds``: summed over the actors, the time in
    the model's forward pass and in the whole per-batch call (conversion from
    and to Arrow included); ``actor_seconds`` well below ``stream_seconds``
    times the number of actors means the actors waited for input.
    ``duplicate_ids``: rows of the shards processed whose id occurred before in
    the same shard (embedded with ``on_duplicate_ids="warn"``, their shards
    failed with ``"error"``).
    """

    output: str
    model_name: str
    model_version: str
    shards_total: int = 0
    shards_skipped: int = 0
    shards_written: int = 0
    shards_failed: int = 0
    rows: int = 0
    rows_rejected: int = 0
    duplicate_ids: int = 0
    seconds: float = 0.0
    current: bool = False
    failures: list[str] = field(default_factory=list)
    stream_rows: int = 0
    stream_seconds: float = 0.0
    model_seconds: float = 0.0
    actor_seconds: float = 0.0

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    @property
    def stream_rows_per_s(self) -> float:
        return self.stream_rows / self.stream_seconds if self.stream_seconds > 0 else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["rows_per_s"] = round(self.rows_per_s, 1)
        d["stream_rows_per_s"] = round(self.stream_rows_per_s, 1)
        d["seconds"] = round(self.seconds, 3)
        for k in ("stream_seconds", "model_seconds", "actor_seconds"):
            d[k] = round(d[k], 3)
        return d

    def line(self) -> str:
        return (
            f"{self.shards_written} shards written, {self.shards_skipped} already done, "
            f"{self.shards_failed} failed; {self.rows} rows ({self.rows_rejected} rejected) in "
            f"{self.seconds:.1f} s = {self.rows_per_s:,.0f} rows/s -> {self.output}"
        )


@dataclass(frozen=True)
class _Shard:
    path: str  # as the input filesystem names it
    rel: str  # relative to the input root; also the output's relative path
    size: int
    mtime_ns: int | None
    rows: int = 0


@dataclass(frozen=True)
class _Spec:
    """Resolved column layout, shipped to the actors."""

    vector_col: str | None
    feature_cols: tuple[str, ...] | None
    id_col: str
    passthrough: tuple[str, ...]
    n_features: int
    n_components: int
    method: str = "network"  # as resolved for the model: "network" or "refine"

    @property
    def columns(self) -> list[str]:
        cols = [self.vector_col] if self.vector_col else list(self.feature_cols)
        return list(dict.fromkeys([self.id_col, *cols, *self.passthrough]))


# --------------------------------------------------------------------------- ledger & files


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Ledger:
    """Finished input shards of one output directory (``_ledger.jsonl``).

    Each line: ``input`` (relative path), ``size``, ``mtime_ns``, ``rows``,
    ``rejected``, ``output``, ``rejects`` (or null), ``sha256``,
    ``model_name``, ``model_version``, ``columns``, ``method`` (``network`` or
    ``refine``), ``finished``.
    """

    def __init__(self, directory: Path, entries: dict[str, dict] | None = None):
        self.directory = Path(directory)
        self.entries = entries or {}

    @property
    def path(self) -> Path:
        return self.directory / LEDGER_FILE

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Ledger:
        directory = Path(directory)
        entries = {}
        path = directory / LEDGER_FILE
        if path.is_file():
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    entries[entry["input"]] = entry
                except (json.JSONDecodeError, KeyError, TypeError):
                    log.warning("ledger %s: skipping unreadable line %d", path, n)
        return cls(directory, entries)

    def is_done(self, shard: _Shard) -> bool:
        e = self.entries.get(shard.rel)
        return (
            e is not None
            and e.get("size") == shard.size
            and e.get("mtime_ns") == shard.mtime_ns
            and (self.directory / e["output"]).is_file()
        )

    def record(self, entry: dict) -> None:
        """Add (or replace) one shard's line and rewrite the ledger atomically."""
        self.entries[entry["input"]] = entry
        text = "".join(json.dumps(self.entries[k], sort_keys=True) + "\n" for k in sorted(self.entries))
        _write_text_atomic(self.path, text)

    def files(self) -> set[str]:
        """Relative paths of every file the ledger vouches for."""
        out = set()
        for e in self.entries.values():
            out.add(e["output"])
            if e.get("rejects"):
                out.add(e["rejects"])
        return out


def read_current(output: str | os.PathLike) -> dict | None:
    """``_current.json`` of an output location (``dir``, ``model_name``, ``model_version``), or None."""
    path = Path(output) / CURRENT_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _write_current(output: Path, model: ModelSpec, shards_total: int) -> None:
    _write_text_atomic(
        output / CURRENT_FILE,
        json.dumps(
            {
                "format_version": FORMAT_VERSION,
                "dir": model.tag,
                "model_name": model.name,
                "model_version": model.version,
                "shards": shards_total,
                "updated": _now(),
            },
            indent=2,
        ),
    )


@contextlib.contextmanager
def _locked(output: Path) -> Iterator[None]:
    """Hold an exclusive flock on the output location (released by the OS on kill)."""
    output.mkdir(parents=True, exist_ok=True)
    fd = os.open(output / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(
                f"another `ptsne embed` is writing to {str(output)!r} (lock {LOCK_FILE}); "
                "wait for it or stop it"
            ) from None
        yield
    finally:
        os.close(fd)


def _clean(target: Path, ledger: Ledger) -> int:
    """Delete temp files and outputs without a ledger line (left by a killed run)."""
    keep = ledger.files()
    removed = 0
    for path in sorted(target.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(target).as_posix()
        name = path.name
        if ".tmp-" in name and name.startswith("."):
            path.unlink()
            removed += 1
        elif name.endswith(".parquet") and rel not in keep:
            log.info("removing %s: no ledger entry (left by an interrupted run)", rel)
            path.unlink()
            removed += 1
    return removed


# --------------------------------------------------------------------------- input planning


def _list_input(fs: pafs.FileSystem, root: str) -> list[_Shard]:
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {root!r} does not exist")
    if info.type == pafs.FileType.Directory and not any(
        f.path.endswith(".parquet") for f in fs.get_file_info(pafs.FileSelector(root, recursive=True))
    ):
        return []  # nothing has arrived yet: a normal state under --watch
    paths = shards.list_parquet(fs, root)
    base = posixpath.dirname(root) if info.type == pafs.FileType.File else root
    out = []
    for path, size, mtime in storage.fingerprint(fs, paths):
        out.append(_Shard(path=path, rel=posixpath.relpath(path, base), size=int(size), mtime_ns=mtime))
    return out


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _resolve_spec(schema: pa.Schema, config: EmbedConfig, model: ModelSpec) -> _Spec:
    vector_col, feature_cols = config.vector_col, config.feature_cols
    if vector_col is None and feature_cols is None:
        if "vector" in schema.names:
            vector_col = "vector"
        else:
            lists = [f.name for f in schema if _is_list(f.type)]
            if len(lists) == 1:
                vector_col = lists[0]
            else:
                raise EmbedInputError(
                    f"cannot tell which column holds the vectors (columns: {schema.names}); "
                    "pass --vector-col NAME or --feature-cols A,B,..."
                )
    return _Spec(
        vector_col=vector_col,
        feature_cols=feature_cols,
        id_col=config.id_col,
        passthrough=config.passthrough,
        n_features=model.n_features,
        n_components=model.n_components,
        method=model.method(config.method),
    )


def _output_names(spec: _Spec) -> list[str]:
    return [EMBEDDING, *COORDS[: spec.n_components], MODEL_NAME, MODEL_VERSION]


def _check_schema(schema: pa.Schema, spec: _Spec) -> list[str]:
    """Problems that stop a shard from being embedded, from its schema alone."""
    problems = []
    missing = [c for c in spec.columns if c not in schema.names]
    if missing:
        return [f"missing column(s) {missing} (columns present: {schema.names})"]
    id_type = schema.field(spec.id_col).type
    if not (pa.types.is_integer(id_type) or pa.types.is_string(id_type) or pa.types.is_large_string(id_type)):
        problems.append(f"id column {spec.id_col!r} must be integer or string, got {id_type}")
    if spec.vector_col is not None:
        t = schema.field(spec.vector_col).type
        if not _is_list(t) or not _is_numeric(t.value_type):
            problems.append(f"vector column {spec.vector_col!r} must be a list of numbers, got {t}")
        elif pa.types.is_fixed_size_list(t) and t.list_size != spec.n_features:
            problems.append(
                f"vector column {spec.vector_col!r} has dimension {t.list_size}, "
                f"the model expects {spec.n_features}"
            )
    else:
        bad = [c for c in spec.feature_cols if not _is_numeric(schema.field(c).type)]
        if bad:
            problems.append(f"feature columns {bad} are not numeric")
        if len(spec.feature_cols) != spec.n_features:
            problems.append(
                f"{len(spec.feature_cols)} feature columns given, the model expects {spec.n_features}"
            )
    return problems


def _check_names(spec: _Spec) -> None:
    reserved = set(_output_names(spec)) | {RAY_PATH}
    clash = sorted(reserved & set(spec.passthrough)) + (
        [spec.id_col] if spec.id_col in reserved else []
    )
    if clash:
        raise EmbedInputError(
            f"column name(s) {clash} clash with the output columns {sorted(reserved - {RAY_PATH})} "
            f"or Ray's {RAY_PATH!r}; rename them in the input"
        )


def _columns_of(spec: _Spec) -> list[str]:
    return [spec.id_col, *_output_names(spec), *spec.passthrough]


def _check_method(ledger: Ledger, method: str) -> None:
    """Every shard of one output directory is placed by the same method (one map for readers)."""
    for e in ledger.entries.values():
        if e.get("method") is not None and e["method"] != method:
            raise ValueError(
                f"output {str(ledger.directory)!r} holds embeddings placed by method {e['method']!r}, "
                f"this run would place them by {method!r}; use the same method or another output"
            )


def _check_columns(ledger: Ledger, spec: _Spec) -> None:
    """Every shard of one output directory has the same columns (one table for readers)."""
    wanted = _columns_of(spec)
    for e in ledger.entries.values():
        if e.get("columns") is not None and e["columns"] != wanted:
            raise ValueError(
                f"output {str(ledger.directory)!r} was written with columns {e['columns']}, this run "
                f"would write {wanted}; use the same --id-col/--passthrough or another --output"
            )


def _plan(fs: pafs.FileSystem, pending: list[_Shard], config: EmbedConfig, model: ModelSpec):
    """Read each pending shard's footer: row counts, one column layout, schema problems."""
    spec = None
    planned, problems = [], []
    for shard in pending:
        try:
            with fs.open_input_file(shard.path) as f:
                meta = pq.ParquetFile(f)
                schema, rows = meta.schema_arrow, meta.metadata.num_rows
        except (OSError, pa.ArrowException) as exc:
            problems.append(f"{shard.rel}: not a readable Parquet file ({exc})")
            continue
        if spec is None:
            spec = _resolve_spec(schema, config, model)
            _check_names(spec)
            first_schema = schema
        for p in _check_schema(schema, spec):
            problems.append(f"{shard.rel}: {p}")
        planned.append(_Shard(shard.path, shard.rel, shard.size, shard.mtime_ns, rows))
    if problems:
        head = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise EmbedInputError(
            f"{len(problems)} problem(s) in {len({p.split(':')[0] for p in problems})} input shard(s), "
            f"nothing was written:\n  {head}{more}"
        )
    return planned, spec, (first_schema if spec is not None else None)


# --------------------------------------------------------------------------- per-batch work


def _vectors(table: pa.Table, spec: _Spec) -> tuple[np.ndarray, np.ndarray]:
    """Features float32 (n, D) and a status code per row (``OK``, ``NULL_VECTOR``, ...)."""
    n, D = table.num_rows, spec.n_features
    status = np.zeros(n, dtype=np.int8)
    if spec.vector_col is not None:
        col = table.column(spec.vector_col)
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
        null = col.is_null().to_numpy(zero_copy_only=False)
        if pa.types.is_fixed_size_list(col.type):
            lengths = np.where(null, 0, col.type.list_size)
        else:
            lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False)
        good_len = (lengths == D) & ~null
        status[null] = NULL_VECTOR
        status[~null & (lengths != D)] = WRONG_DIM
        # flatten() honours slice offsets and skips null rows. For float32 values without
        # nulls (the usual case) it is a read-only view of the Arrow buffer, copied once
        # because torch wants a writable array; no per-row Python objects either way.
        if good_len.all():
            X = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(n, D)
            if not X.flags.writeable:
                X = X.copy()
        else:
            X = np.zeros((n, D), dtype=np.float32)
            if good_len.any():
                vals = col.filter(pa.array(good_len)).flatten().to_numpy(zero_copy_only=False)
                X[good_len] = vals.astype(np.float32, copy=False).reshape(-1, D)
    else:
        X = np.empty((n, D), dtype=np.float32)
        for j, c in enumerate(spec.feature_cols):
            col = table.column(c)
            status[col.is_null().to_numpy(zero_copy_only=False) & (status == OK)] = NULL_VECTOR
            X[:, j] = col.to_numpy().astype(np.float32, copy=False)
    if not np.isfinite(X).all():  # whole-array test first: 5x faster than per row on clean batches
        bad = (status == OK) & ~np.isfinite(X).all(axis=1)
        status[bad] = NON_FINITE
    return X, status


def _output_columns(emb: np.ndarray) -> dict[str, pa.Array]:
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    cols = {EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])}
    for j in range(min(emb.shape[1], len(COORDS))):
        cols[COORDS[j]] = pa.array(emb[:, j])
    return cols


def _model_columns(table: pa.Table, spec: _Spec, model: ModelSpec) -> pa.Table:
    """``table`` with the ``model_name`` / ``model_version`` columns after the coordinates.

    Added by the driver per shard rather than by the actors per batch: two string
    columns less to serialize and ship for every row.
    """
    pos = table.schema.get_field_index(COORDS[min(spec.n_components, len(COORDS)) - 1]) + 1
    n = table.num_rows
    table = table.add_column(pos, MODEL_NAME, pa.repeat(pa.scalar(model.name, pa.string()), n))
    return table.add_column(pos + 1, MODEL_VERSION, pa.repeat(pa.scalar(model.version, pa.string()), n))


def _minor_faults() -> int:
    """Page faults of the calling thread so far (of the process where the OS cannot tell)."""
    return resource.getrusage(getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)).ru_minflt


class _Embedder:
    """Ray Data callable class: one model per actor, Arrow batches in and out.

    Output per row: the id, the embedding and its coordinates, the passthrough
    columns, and for the driver the row's shard (dictionary-encoded), its status
    code, when the batch started and the per-row share of the batch's seconds.
    """

    def __init__(self, files: dict[str, bytes], spec: _Spec, threads: int, device: str):
        from ptsne.device import set_num_threads
        from ptsne.estimator import ParametricTSNE

        # Ray workers start with one thread; use the CPUs this actor reserved.
        set_num_threads(max(1, threads))
        with tempfile.TemporaryDirectory(prefix="ptsne-actor-") as tmp:
            for fname, data in files.items():
                Path(tmp, fname).write_bytes(data)
            self.estimator = ParametricTSNE.load(tmp, device=device)
        self.spec = spec
        self._last_end: float | None = None

    def __call__(self, batch: pa.Table) -> pa.Table:
        t0 = time.time()  # wall clock: comparable across the processes of a node
        c0 = time.perf_counter()
        spec = self.spec
        n = batch.num_rows
        X, status = _vectors(batch, spec)
        c1, cpu1 = time.perf_counter(), time.thread_time()
        faults = _minor_faults()
        ok = status == OK
        if ok.all():
            emb = self.estimator.transform(X, method=spec.method)
        else:
            emb = np.full((n, spec.n_components), np.nan, dtype=np.float32)
            if ok.any():
                emb[ok] = self.estimator.transform(X[ok], method=spec.method)
        c2, cpu2 = time.perf_counter(), time.thread_time()
        faults = _minor_faults() - faults
        cols = {spec.id_col: batch.column(spec.id_col)}
        cols.update(_output_columns(emb))
        for c in spec.passthrough:
            cols[c] = batch.column(c)
        # One small dictionary instead of the path string on every row.
        cols[_PATH] = pc.dictionary_encode(batch.column(RAY_PATH))
        cols[_STATUS] = pa.array(status)
        cols[_T0] = pa.array(np.full(n, t0))
        c3 = time.perf_counter()
        # Per-row shares, so that the driver's sums are right however Ray re-blocks the rows.
        cols[_MODEL_S] = pa.array(np.full(n, (c2 - c1) / max(n, 1), dtype=np.float32))
        cols[_CALL_S] = pa.array(np.full(n, (c3 - c0) / max(n, 1), dtype=np.float32))
        if log.isEnabledFor(logging.DEBUG):
            idle = c0 - self._last_end if self._last_end is not None else 0.0
            log.debug(
                "batch of %d rows: waited %.1f ms, to numpy %.1f ms, model %.1f ms (%.1f ms CPU, %d page faults), "
                "to Arrow %.1f ms",
                n, 1e3 * idle, 1e3 * (c1 - c0), 1e3 * (c2 - c1), 1e3 * (cpu2 - cpu1), faults, 1e3 * (c3 - c2),
            )
        self._last_end = time.perf_counter()
        return pa.table(cols)


def _model_files(model: ModelSpec) -> dict[str, bytes]:
    # Bytes rather than a path, so that actors on other nodes need no shared disk.
    return {p.name: p.read_bytes() for p in Path(model.path).iterdir() if p.is_file()}


def _empty_output(schema: pa.Schema, spec: _Spec, model: ModelSpec) -> pa.Table:
    cols = {spec.id_col: pa.array([], type=schema.field(spec.id_col).type)}
    cols.update(_output_columns(np.zeros((0, spec.n_components), np.float32)))
    for c in spec.passthrough:
        cols[c] = pa.array([], type=schema.field(c).type)
    return _model_columns(pa.table(cols), spec, model)


# --------------------------------------------------------------------------- driver side


def _shard_codes(column: pa.ChunkedArray) -> tuple[np.ndarray, list[str]]:
    """Per row an index into the returned list of distinct paths, from the actors' path column.

    The chunks are dictionary arrays (each with its own dictionary) or, should Ray
    decode them on the way, plain strings.
    """
    index: dict[str, int] = {}
    parts = []
    for chunk in column.chunks:
        if not pa.types.is_dictionary(chunk.type):
            chunk = pc.dictionary_encode(chunk)
        to_global = np.array([index.setdefault(p, len(index)) for p in chunk.dictionary.to_pylist()], dtype=np.int64)
        parts.append(to_global[chunk.indices.to_numpy(zero_copy_only=False)] if len(to_global) else
                     np.zeros(len(chunk), dtype=np.int64))
    codes = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return codes, list(index)


class _Collector:
    """Gathers each shard's rows from the stream and writes the shard once complete."""

    def __init__(self, target: Path, ledger: Ledger, planned: list[_Shard], spec: _Spec,
                 model: ModelSpec, config: EmbedConfig, summary: EmbedSummary, bar):
        self.target, self.ledger, self.spec, self.model = target, ledger, spec, model
        self.config, self.summary, self.bar = config, summary, bar
        self.shards = {s.path: s for s in planned}
        self.parts: dict[str, list[pa.Table]] = {}
        self.counts: dict[str, int] = {}
        self.local = pafs.LocalFileSystem()
        #: Written shards with duplicate ids: (shard, duplicate rows, an example id, its rows).
        self.duplicates: list[tuple[str, int, object, int]] = []
        #: How to get past the kinds of failure met (for the final error).
        self.hints: set[str] = set()

    def add(self, batch: pa.Table) -> None:
        codes, paths = _shard_codes(batch.column(_PATH))
        unique = np.unique(codes)
        for code in unique:
            p = paths[code]
            part = batch if len(unique) == 1 else batch.filter(pa.array(codes == code))
            if p not in self.shards:
                raise RuntimeError(f"Ray Data returned rows of an unexpected file {p!r}")
            self.parts.setdefault(p, []).append(part)
            self.counts[p] = self.counts.get(p, 0) + part.num_rows
            if self.bar is not None:
                self.bar.update(part.num_rows)
            if self.counts[p] == self.shards[p].rows:
                self.finish(self.shards[p], pa.concat_tables(self.parts.pop(p)))

    def check_complete(self) -> None:
        for p, count in self.counts.items():
            if p in self.parts:
                raise RuntimeError(
                    f"shard {self.shards[p].rel}: got {count} rows, its footer says "
                    f"{self.shards[p].rows}; was it modified during the run?"
                )

    def finish(self, shard: _Shard, table: pa.Table) -> None:
        status = table.column(_STATUS).to_numpy()
        bad = status != OK
        n_bad = int(bad.sum())
        n_dup, example, times = _duplicate_ids(table.column(self.spec.id_col))
        self.summary.duplicate_ids += n_dup
        problems = []
        if n_bad and self.config.on_invalid == "error":
            problems.append(_describe_bad(shard, table, status, self.spec))
            self.hints.add(f"--on-invalid reject writes rows with bad vectors to {REJECTS_DIR}/ and embeds the rest")
        if n_dup and self.config.on_duplicate_ids == "error":
            problems.append(
                f"{shard.rel}: {n_dup} duplicate id(s) in id column {self.spec.id_col!r} "
                f"(e.g. {example!r} on {times} rows)"
            )
            self.hints.add("--on-duplicate-ids warn embeds shards with duplicate ids")
        if problems:
            self.summary.shards_failed += 1
            self.summary.failures.extend(problems)
            return
        if n_dup:
            self.duplicates.append((shard.rel, n_dup, example, times))
        rejects_rel = None
        if n_bad:
            rejects_rel = posixpath.join(REJECTS_DIR, shard.rel)
            rows = np.flatnonzero(bad)
            rejects = pa.table(
                {
                    self.spec.id_col: table.column(self.spec.id_col).take(pa.array(rows)),
                    "row": pa.array(rows.astype(np.int64)),
                    "reason": pa.array([REASONS[int(s)] for s in status[bad]], type=pa.string()),
                    "shard": pa.array([shard.rel] * n_bad, type=pa.string()),
                }
            )
            self._write(rejects_rel, rejects)
            table = table.filter(pa.array(~bad))
        out = _model_columns(table.drop_columns(list(_INTERNAL)), self.spec, self.model)
        sha = self._write(shard.rel, out)
        self.ledger.record(
            {
                "input": shard.rel,
                "size": shard.size,
                "mtime_ns": shard.mtime_ns,
                "rows": out.num_rows,
                "rejected": n_bad,
                "output": shard.rel,
                "rejects": rejects_rel,
                "sha256": sha,
                "model_name": self.model.name,
                "model_version": self.model.version,
                "columns": _columns_of(self.spec),
                "method": self.spec.method,
                "finished": _now(),
            }
        )
        self.summary.shards_written += 1
        self.summary.rows += out.num_rows
        self.summary.rows_rejected += n_bad
        if self.bar is not None:
            self.bar.set_postfix(shards=self.summary.shards_written, refresh=False)

    def _write(self, rel: str, table: pa.Table) -> str:
        path = self.target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        # Dictionary encoding only where values repeat (model name/version, labels, reasons):
        # Parquet's default tries it on every column, and on the float embedding and the ids
        # it costs 4x the rest of the write for a larger file.
        repeated = {MODEL_NAME, MODEL_VERSION, "reason", "shard", *self.spec.passthrough} - {self.spec.id_col}
        return storage.write_parquet_atomic(
            self.local, str(path), table, use_dictionary=[c for c in table.column_names if c in repeated]
        )


def _duplicate_ids(ids: pa.ChunkedArray) -> tuple[int, object, int]:
    """Rows whose (non-null) id occurred before in ``ids``; the first such id and its number of rows."""
    ids = pc.drop_null(ids)
    n_dup = len(ids) - pc.count_distinct(ids).as_py()
    if n_dup == 0:
        return 0, None, 0
    counts = pc.value_counts(ids)  # in order of first occurrence
    times = counts.field("counts").to_numpy()
    first = int(np.flatnonzero(times > 1)[0])
    return n_dup, counts.field("values")[first].as_py(), int(times[first])


def _describe_bad(shard: _Shard, table: pa.Table, status: np.ndarray, spec: _Spec) -> str:
    parts = []
    ids = table.column(spec.id_col)
    for code, reason in REASONS.items():
        rows = np.flatnonzero(status == code)
        if rows.size:
            first = ", ".join(repr(v) for v in ids.take(pa.array(rows[:5])).to_pylist())
            parts.append(f"{rows.size} rows with {reason} (first ids: {first})")
    if np.any(status == WRONG_DIM):
        parts.append(f"the model expects {spec.n_features} values per vector")
    return f"{shard.rel}: " + "; ".join(parts)


def _actor_resources(config: EmbedConfig, n_batches: int) -> tuple[int, float, float]:
    import ray

    resources = ray.cluster_resources()
    gpus = config.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
    if config.num_actors is not None:
        n = config.num_actors
    elif gpus > 0:
        n = max(1, int(resources.get("GPU", 0) // gpus))
    else:
        n = max(1, int((resources.get("CPU", 1) - 1) // config.cpus_per_actor))
    n = max(1, min(n, n_batches))
    total = float(resources.get("CPU", 0))
    if n * config.cpus_per_actor > total - 1:
        # The actors hold their CPUs for the whole run; Ray Data's read tasks need one more,
        # or the pipeline waits forever.
        raise ValueError(
            f"embed: {n} actor(s) x cpus_per_actor={config.cpus_per_actor:g} reserve "
            f"{n * config.cpus_per_actor:g} of the cluster's {total:g} CPUs; Ray Data's read tasks "
            f"need 1 CPU left over: lower cpus_per_actor or num_actors"
        )
    return n, float(config.cpus_per_actor), float(gpus)


def embed_shards(
    input: str | os.PathLike,
    output: str | os.PathLike,
    model: ModelSpec,
    config: EmbedConfig = EmbedConfig(),
    make_current: bool = True,
    start_ray: Callable[[], object] | None = None,
) -> EmbedSummary:
    """Embed every new or changed Parquet shard under ``input`` into ``output/<model.tag>/``.

    Parameters
    ----------
    input : path or URI
        A Parquet file or a directory of them (any pyarrow filesystem).
    output : path
        Local or shared POSIX directory (see the module docstring for the layout).
    model : ModelSpec
        The model and the name/version written with each row.
    config : EmbedConfig
    make_current : bool
        Point ``_current.json`` at ``model.tag`` once every input shard is done.
    start_ray : callable, optional
        Called (without arguments) just before the first Ray call, only when
        some pending shard has rows: everything before it (output, lock, input
        listing, ledger, footers) runs without Ray. Default: nothing (Ray is
        connected already, or Ray Data starts a default one).

    Returns
    -------
    EmbedSummary

    Raises
    ------
    EmbedInputError
        Schema or dimension mismatch (nothing written), or NaN/Inf/null vectors
        with ``on_invalid="error"``, or duplicate ids with
        ``on_duplicate_ids="error"`` (those shards not written, others complete).
    pipeline.storage.OutputLocationError
        ``output`` cannot be written (not a directory, no permission).
    RuntimeError
        Another run holds the output's lock.
    FileNotFoundError
        ``input`` does not exist.
    """
    check_output(output)
    t0 = time.perf_counter()
    fs, root = storage.resolve(input)
    out_root = Path(output).resolve()
    target = out_root / model.tag
    summary = EmbedSummary(output=str(target), model_name=model.name, model_version=model.version)
    with _locked(out_root):
        target.mkdir(parents=True, exist_ok=True)
        ledger = Ledger.load(target)
        owners = {(e.get("model_name"), e.get("model_version")) for e in ledger.entries.values()}
        if owners - {(model.name, model.version)}:
            raise ValueError(
                f"output directory {str(target)!r} holds embeddings of {sorted(owners)}, not of "
                f"{model.name} version {model.version}; use another --output"
            )
        removed = _clean(target, ledger)
        if removed:
            log.info("cleaned %d leftover file(s) of an interrupted run in %s", removed, target)
        _check_method(ledger, model.method(config.method))
        found = _list_input(fs, root)
        pending = [s for s in found if not ledger.is_done(s)]
        summary.shards_total = len(found)
        summary.shards_skipped = len(found) - len(pending)
        if pending:
            planned, spec, schema = _plan(fs, pending, config, model)
            _check_columns(ledger, spec)
            hints = _run(fs, planned, spec, schema, target, ledger, model, config, summary, start_ray)
        else:
            hints = set()
        summary.seconds = time.perf_counter() - t0
        done = found and all(ledger.is_done(s) for s in found)
        current = read_current(out_root)
        if make_current and done and (current is None or current.get("dir") != model.tag):
            _write_current(out_root, model, len(found))
            log.info("%s is now the current output (%s version %s)", target, model.name, model.version)
        summary.current = bool(done) and (read_current(out_root) or {}).get("dir") == model.tag
    if summary.failures:
        raise EmbedInputError(
            f"{summary.shards_failed} shard(s) were not written, the others are complete "
            f"(rerun: {'; '.join(sorted(hints))}):\n  " + "\n  ".join(summary.failures[:20]),
            summary,
        )
    return summary


def check_output(output: str | os.PathLike) -> None:
    """Raise unless ``output`` is a local directory (or can be made one) that this user may write to.

    Raises
    ------
    ValueError
        ``output`` is a URI: the exactly-once guarantee rests on POSIX renames.
    pipeline.storage.OutputLocationError
        It, or the nearest existing ancestor of it, is not a writable directory.
    """
    if "://" in os.fspath(output):
        raise ValueError(
            f"output must be a local or shared POSIX directory (atomic renames), got {os.fspath(output)!r}"
        )
    storage.check_writable_dir(pafs.LocalFileSystem(), os.fspath(output))


def _run(fs, planned, spec, schema, target, ledger, model, config, summary, start_ray=None) -> set[str]:
    """Embed the planned shards; returns the hints of the collector (how to get past failures)."""
    import ray
    from tqdm.auto import tqdm

    local = pafs.LocalFileSystem()
    for shard in [s for s in planned if s.rows == 0]:
        path = target / shard.rel
        path.parent.mkdir(parents=True, exist_ok=True)
        sha = storage.write_parquet_atomic(local, str(path), _empty_output(schema, spec, model))
        ledger.record(
            {
                "input": shard.rel, "size": shard.size, "mtime_ns": shard.mtime_ns, "rows": 0,
                "rejected": 0, "output": shard.rel, "rejects": None, "sha256": sha,
                "model_name": model.name, "model_version": model.version,
                "columns": _columns_of(spec), "method": spec.method, "finished": _now(),
            }
        )
        summary.shards_written += 1
    work = [s for s in planned if s.rows > 0]
    if not work:
        return set()
    if start_ray is not None:
        start_ray()
    total = sum(s.rows for s in work)
    n_batches = sum(-(-s.rows // config.batch_size) for s in work)
    n_actors, cpus, gpus = _actor_resources(config, n_batches)
    log.info(
        "embedding %d shard(s), %d rows with %d actor(s) (%g CPU, %g GPU each) into %s",
        len(work), total, n_actors, cpus, gpus, target,
    )
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.target_max_block_size)
    # Keep each shard's rows in input order; our own bar replaces Ray's.
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.target_max_block_size = config.block_bytes
    bar = tqdm(total=total, unit="rows", unit_scale=True, desc="embed", disable=not config.progress)
    try:
        ds = ray.data.read_parquet(
            [s.path for s in work],
            filesystem=fs,
            columns=spec.columns,
            include_paths=True,
            partitioning=None,
        )
        ds = ds.map_batches(
            _Embedder,
            fn_constructor_kwargs={
                "files": _model_files(model),
                "spec": spec,
                "threads": max(1, int(cpus)),
                "device": "cuda" if gpus > 0 else "cpu",
            },
            batch_size=config.batch_size,
            batch_format="pyarrow",
            zero_copy_batch=True,
            # Two calls per actor (a threaded actor): Ray Data slices and ships one task's blocks
            # while the model works on another's batch, and two batches' forward passes may
            # overlap; with one call, the actor idles 10-40 ms between tasks.
            compute=ray.data.ActorPoolStrategy(size=n_actors, max_concurrent_calls_per_actor=2),
            num_cpus=cpus,
            num_gpus=gpus,
        )
        collector = _Collector(target, ledger, work, spec, model, config, summary, bar)
        first = None
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=2):
            t = pc.min(batch.column(_T0)).as_py()
            first = t if first is None else min(first, t)
            summary.model_seconds += pc.sum(batch.column(_MODEL_S)).as_py() or 0.0
            summary.actor_seconds += pc.sum(batch.column(_CALL_S)).as_py() or 0.0
            collector.add(batch)
            summary.stream_rows += batch.num_rows
        if first is not None:
            summary.stream_seconds = time.time() - first
        collector.check_complete()
        if collector.duplicates:
            rel, _, example, times = collector.duplicates[0]
            log.warning(
                "id column %r: %d duplicate id(s) in %d shard(s), embedded anyway (e.g. %r on %d rows of %s); "
                "ids are compared within each shard only. --on-duplicate-ids error refuses such shards",
                spec.id_col, sum(d[1] for d in collector.duplicates), len(collector.duplicates), example, times, rel,
            )
        return collector.hints
    finally:
        bar.close()
        ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.target_max_block_size = saved


def load_output(directory: str | os.PathLike) -> pa.Table:
    """All finished output shards as one table (ledger, temp and reject files skipped).

    ``directory`` is a version directory (``OUTPUT/v3``) or an output location,
    in which case its current version directory (``_current.json``) is read.
    """
    directory = Path(directory)
    current = read_current(directory)
    if current is not None and not (directory / LEDGER_FILE).is_file():
        directory = directory / current["dir"]
    ledger = Ledger.load(directory)
    tables = [pq.read_table(directory / ledger.entries[k]["output"]) for k in sorted(ledger.entries)]
    if not tables:
        raise FileNotFoundError(f"no finished output shards in {str(directory)!r}")
    return pa.concat_tables(tables)
