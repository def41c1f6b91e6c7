"""Batch embedding of Parquet shards on a Ray actor pool, each input shard exactly once.

The driver plans, submits and commits; no embedded row passes through it. One
task is one input shard: an :class:`_Embedder` actor (the model, loaded once per
actor from files the driver put in Ray's object store once) streams the shard
from its filesystem in ``batch_size``-row batches, embeds them, streams the
output to the shard's final location (temporary name, then moved into place)
and returns a few numbers (:class:`_Task` in, a small dict out). The driver then
adds the shard's ledger line. Its memory grows with the number of shards, not
with the number of rows.

Input and output are local paths or URIs of any pyarrow filesystem
(``s3://...``, see :mod:`pipeline.storage`). A local ``OUTPUT`` on a cluster of
several machines must be one shared filesystem mounted at the same path on
every node: the driver checks that it sees each file a worker wrote.

Output layout::

    OUTPUT/_current.json                      which version directory is complete and current
    OUTPUT/.ptsne-embed.lock                  one writer at a time (flock; a lease object on object stores)
    OUTPUT/<tag>/<dir>/<stem>.<hash>.parquet  one file per input shard (tag: v3, run-<id>, local-<sha256>)
    OUTPUT/<tag>/_ledger.jsonl                one line per finished input shard
    OUTPUT/<tag>/_rejects/<dir>/<stem>.<hash>.parquet   rejected rows (``on_invalid="reject"``)

``<dir>/<stem>`` is the input shard's path relative to the input root without
``.parquet``, ``<hash>`` the first 10 hex digits of the sha256 of the shard's
full URI (:func:`output_name`): two inputs never share an output file, even
with the same relative path (``incoming/day1/a.parquet`` and
``incoming/day2/a.parquet`` embedded by two runs into one output).

Exactly once: the ledger is keyed by the input's full URI and records its size,
modification time and change token (:func:`pipeline.storage.change_tokens`: the
object's ETag on object stores, inode and ctime locally). A shard is pending
when the ledger has no line for its URI, its size, modification time or token
changed (lines written without a token compare size and time), or its output
file is gone. Its
output is written whole or not at all (:func:`pipeline.storage.parquet_writer`),
and only then is its ledger line added (the ledger is rewritten atomically).
A run killed at any point leaves temporary files, which the next run deletes
(the only files clean-up deletes: :func:`pipeline.storage.is_ours`), and maybe
complete outputs without a ledger line, each replaced when its input is
embedded again. So every input row ends up in the output exactly once. Files
the ledger does not name (a user's, or outputs listed by a ledger of the older
format, which was keyed by relative path) are never deleted.

One model per version directory, identified by its content: name, version
and the sha256 of its weights (``model_sha256`` in each ledger line and in
``_current.json``). A directory whose lines name another model, or the same
name and version with other weights (two local directories both called
``model``), is refused. Lines and pointers written before the sha256 was
recorded match on name and version, the only identity they hold, and are
upgraded with this model's sha256 (nothing is embedded again).

A damaged ledger line (not UTF-8, not a JSON object) is set aside: the ledger
as it was is kept as ``_ledger.jsonl.damaged-<time>``, the ledger is rewritten
without the line and its shard is embedded again, its output replaced under
the same name. A damaged ``_current.json`` is kept as
``_current.json.damaged-<time>`` and rebuilt from the one version directory
the output holds; an output of several version directories cannot tell which
was current and is refused (:class:`DamagedOutputError`) until a run names
the model to make current (``ptsne embed --reembed``).

Ids are checked for duplicates within each shard (the actor keeps the shard's
id column, not its rows): a warning with the count, or with
``on_duplicate_ids="error"`` the shard is not written. Ids of different
shards, or of shards embedded by earlier runs, are not compared: that would
need every id of the output in one place.

Nothing here needs Ray before some shard has rows to embed: the lock, the
input listing, the ledger and every pending shard's footer are read first, so a
run with nothing to do (or one refused) starts no Ray when given ``start_ray``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import posixpath
import queue
import resource
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import shards, storage
from ptsne.configs import PLACEMENT_METHODS as METHODS

log = logging.getLogger(__name__)

LEDGER_FILE = "_ledger.jsonl"
CURRENT_FILE = "_current.json"
#: Suffix of a damaged ledger or pointer kept aside (never deleted: no name of ours, see ``storage.is_ours``).
DAMAGED_MARK = ".damaged-"
LOCK_FILE = ".ptsne-embed.lock"
REJECTS_DIR = "_rejects"
#: 2: ledger lines keyed by the input's URI (``uri``), output names with the URI's hash.
#: 1: keyed by the path relative to the input root (not trusted for skipping any more).
FORMAT_VERSION = 2
#: Hex digits of sha256(input URI) in an output file's name.
HASH_CHARS = 10

EMBEDDING = "embedding"
MODEL_NAME = "model_name"
MODEL_VERSION = "model_version"
COORDS = ("x", "y", "z")
ON_INVALID = ("error", "reject")
ON_DUPLICATE_IDS = ("warn", "error")
#: Tasks queued on each actor: the next shard starts as soon as the previous one is written.
TASKS_PER_ACTOR = 2
#: Seconds the driver waits for a file a worker wrote to become visible to it (shared filesystems).
VISIBLE_TIMEOUT_S = 10.0

#: Row status codes computed by the actors.
OK, NULL_VECTOR, NON_FINITE, WRONG_DIM = 0, 1, 2, 3
REASONS = {NULL_VECTOR: "null vector", NON_FINITE: "NaN or Inf", WRONG_DIM: "wrong dimension"}


class DamagedOutputError(ValueError):
    """A ledger or ``_current.json`` that cannot be read and cannot be rebuilt; the message names the
    file and what repairs it."""


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
    sha256 : str, optional
        sha256 of the weights (``model.safetensors``), part of the model's
        identity; default: as the directory's ``SHA256SUMS`` records it (which
        every load checks), else computed.
    """

    path: str
    name: str
    version: str
    tag: str
    sha256: str = ""

    def __post_init__(self) -> None:
        for attr in ("path", "name", "version", "tag"):
            value = getattr(self, attr)
            if not isinstance(value, str) or not value:
                raise ValueError(f"ModelSpec: {attr} must be a non-empty string, got {value!r}")
        if "/" in self.tag or self.tag.startswith((".", "_")):
            raise ValueError(f"ModelSpec: tag must be a plain directory name, got {self.tag!r}")
        if not (Path(self.path) / "config.json").is_file():
            raise FileNotFoundError(f"ModelSpec: no config.json in model directory {self.path!r}")
        if not self.sha256:
            from ptsne.digest import recorded_sha256
            from ptsne.estimator import WEIGHTS_FILE

            object.__setattr__(self, "sha256", recorded_sha256(self.path, WEIGHTS_FILE))

    def describe(self) -> str:
        """The model's identity in words (messages)."""
        return _identity(self.name, self.version, self.sha256)

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
    batch_size : int, optional
        Rows per model call, and per batch read from the input and written to
        the output. Default :data:`CPU_BATCH_ROWS` (16384) for CPU actors, the
        fastest Parquet-to-Parquet rate with ``benchmarks/embed_throughput.py``
        on a 2-core CPU (64-D input, 256-256-256 network; see
        ``docs/embedding.md``), and :data:`GPU_BATCH_ROWS` for GPU actors, whose
        forward pass costs a few kernel launches per batch however large.
    num_actors : int, optional
        Size of the actor pool (at most one actor per shard to embed); default
        one per ``gpus_per_actor`` GPUs when actors use GPUs, else one per
        ``cpus_per_actor`` CPUs of the cluster. Each actor embeds one shard at
        a time, so shards are the unit of parallelism.
    cpus_per_actor : float
        CPUs of each actor: its torch threads and Arrow's decoding threads.
    gpus_per_actor : float, optional
        Default :data:`DEFAULT_GPUS_PER_ACTOR` (0.25: four actors share a GPU)
        when the cluster has GPUs and the model's work runs on one (the network;
        see :func:`plan_actors`), else 0: CPU actors. Parquet I/O, not the network, bounds
        an actor: on an H200 the forward pass ran 23.8M rows/s against 2.1M on
        16 CPU cores, while a Parquet-to-Parquet actor moves about 120k rows/s,
        so one actor uses a few percent of a GPU and several per GPU are needed
        to keep it busy (see :func:`plan_actors`).
    progress : bool
        Show a tqdm progress bar of rows (advanced as each shard is written).
    method : {"auto", "network", "refine"}
        ``ParametricTSNE.transform``'s method: ``"network"`` is the network's
        forward pass, ``"refine"`` places each point on the model's reference
        map, ``"auto"`` refines when the model has a reference. One output
        directory holds one method's map.
    """

    vector_col: str | None = None
    feature_cols: tuple[str, ...] | None = None
    id_col: str = "id"
    passthrough: tuple[str, ...] = ()
    on_invalid: str = "error"
    on_duplicate_ids: str = "warn"
    batch_size: int | None = None
    num_actors: int | None = None
    cpus_per_actor: float = 1.0
    gpus_per_actor: float | None = None
    progress: bool = True
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
        if self.batch_size is not None and (
            isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1
        ):
            raise ValueError(f"EmbedConfig: batch_size must be a positive integer or None, got {self.batch_size!r}")
        if self.num_actors is not None and (
            isinstance(self.num_actors, bool) or not isinstance(self.num_actors, int) or self.num_actors < 1
        ):
            raise ValueError(f"EmbedConfig: num_actors must be a positive integer or None, got {self.num_actors!r}")
        if not self.cpus_per_actor > 0:
            raise ValueError(f"EmbedConfig: cpus_per_actor must be > 0, got {self.cpus_per_actor!r}")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise ValueError(f"EmbedConfig: gpus_per_actor must be >= 0 or None, got {self.gpus_per_actor!r}")


@dataclass
class EmbedSummary:
    """What a run did. ``rows_per_s`` counts embedded rows over the run's wall time.

    ``stream_rows`` / ``stream_seconds``: the rows read by the actors and the
    time from the first model call in an actor to the last shard written, i.e.
    the rate without the start-up of the actors (``stream_rows_per_s``).
    ``model_seconds`` / ``actor_seconds``: summed over the actors, the time in
    the model's forward pass and in the whole per-batch work (conversion from
    and to Arrow and the write of the batch included); ``actor_seconds`` well
    below ``stream_seconds`` times the number of actors means the actors waited
    for input.
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


def output_name(rel: str, uri: str) -> str:
    """Path, relative to the version directory, of the output of the input shard at ``uri``.

    ``rel`` is the shard's path relative to the input root: ``day1/a.parquet``
    at ``s3://b/in/day1/a.parquet`` becomes ``day1/a.<h>.parquet``, where ``<h>``
    is the first :data:`HASH_CHARS` hex digits of ``sha256(uri)``.
    """
    head, name = posixpath.split(rel)
    stem = name[: -len(".parquet")] if name.endswith(".parquet") else name
    digest = hashlib.sha256(uri.encode()).hexdigest()[:HASH_CHARS]
    return posixpath.join(head, f"{stem}.{digest}.parquet")


@dataclass(frozen=True)
class _Shard:
    path: str  # as the input filesystem names it
    uri: str  # the full location: the ledger's key
    rel: str  # relative to the input root (messages, and the output's directory and stem)
    size: int
    mtime_ns: int | None
    rows: int = 0
    etag: str | None = None  # storage.change_tokens: the ETag of an object, inode and ctime of a local file

    @property
    def output(self) -> str:
        return output_name(self.rel, self.uri)

    @property
    def rejects(self) -> str:
        return posixpath.join(REJECTS_DIR, self.output)


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
        """Input columns to read."""
        vec = [self.vector_col] if self.vector_col is not None else list(self.feature_cols)
        return list(dict.fromkeys([self.id_col, *vec, *self.passthrough]))


# --------------------------------------------------------------------------- ledger & files


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Ledger:
    """Finished input shards of one version directory (``_ledger.jsonl``).

    Each line: ``format_version``, ``uri`` (the input's full location, the
    key), ``input`` (its path relative to the input root), ``size``,
    ``mtime_ns``, ``rows``, ``rejected``, ``output`` and ``rejects`` (paths
    relative to the directory, or null), ``sha256``, ``model_name``,
    ``model_version``, ``model_sha256`` (of the weights), ``columns``, ``method``
    (``network`` or ``refine``), ``etag`` (:func:`pipeline.storage.change_tokens`),
    ``finished``. Lines written before ``model_sha256`` and ``etag`` existed lack them.

    A line that is not UTF-8 or not a JSON object is *damaged*: left out of
    :attr:`entries`, its number in :attr:`damaged`, and warned about;
    :meth:`set_aside_damaged` (the writer's) keeps the file as it was and
    rewrites it without such lines.

    Lines of the older format (no ``uri``; keyed by the relative path, which
    two inputs may share) are kept in :attr:`legacy` and in the file, but never
    make a shard count as done, and :func:`load_output` does not read their files.
    """

    def __init__(self, fs: pafs.FileSystem, directory: str, entries: dict[str, dict] | None = None,
                 legacy: list[dict] | None = None, damaged: list[int] | None = None, raw: bytes = b""):
        self.fs = fs
        self.root = directory
        self.entries = entries or {}
        self.legacy = legacy or []
        #: Numbers of the lines that could not be read, and the file's bytes as read (kept when set aside).
        self.damaged = damaged or []
        self.raw = raw

    @property
    def directory(self) -> str:
        """The directory as a path or URI (for messages)."""
        return storage.uri(self.fs, self.root)

    @property
    def path(self) -> str:
        return storage.join(self.root, LEDGER_FILE)

    @classmethod
    def load(cls, location: str | os.PathLike, fs: pafs.FileSystem | None = None) -> Ledger:
        """The ledger of a version directory: a path or URI, or a path on ``fs``."""
        if fs is None:
            fs, directory = storage.resolve(location)
        else:
            directory = os.fspath(location)
        entries, legacy, damaged = {}, [], []
        try:
            raw = storage.read_bytes(fs, storage.join(directory, LEDGER_FILE))
        except FileNotFoundError:
            raw = b""
        # Lines are split on b"\n" alone: JSON lines hold no raw newline, and a damaged line must not
        # take its neighbours with it.
        for n, line in enumerate(raw.split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line.decode("utf-8"))
                if not isinstance(entry, dict):
                    raise TypeError(f"a JSON {type(entry).__name__}, not an object")
                if "uri" in entry:
                    entries[str(entry["uri"])] = entry
                else:
                    str(entry["input"])  # a line of the older format names at least its input
                    legacy.append(entry)
            except (UnicodeDecodeError, ValueError, KeyError, TypeError):
                damaged.append(n)
        if damaged:
            log.warning("ledger %s: line(s) %s are damaged (not UTF-8 JSON objects) and do not count; their "
                        "shards are embedded again by the next `ptsne embed`, which keeps the file as it was",
                        storage.uri(fs, storage.join(directory, LEDGER_FILE)), _numbers(damaged))
        return cls(fs, directory, entries, legacy, damaged, raw)

    def all_entries(self) -> list[dict]:
        """Every line, of either format: what the directory holds (model, method, columns)."""
        return [*self.legacy, *self.entries.values()]

    def is_done(self, shard: _Shard, present: set[str] | None = None) -> bool:
        """Whether ``shard`` (as listed now) has a line and its output file is there.

        ``present``: relative paths of the files in the directory, when known (saves a request per shard).
        """
        e = self.entries.get(shard.uri)
        if e is None or e.get("size") != shard.size or e.get("mtime_ns") != shard.mtime_ns:
            return False
        if e.get("etag") is not None and shard.etag is not None and e["etag"] != shard.etag:
            return False  # rewritten with the same size within the mtime's resolution (or the mtime set back)
        if present is not None:
            return e.get("output") in present
        return storage.exists(self.fs, storage.join(self.root, e["output"]))

    def record(self, entries: Iterable[dict]) -> None:
        """Add (or replace) shards' lines and rewrite the ledger atomically."""
        entries = list(entries)
        if not entries:
            return
        for entry in entries:
            self.entries[entry["uri"]] = entry
        self.write()

    def write(self) -> None:
        """Rewrite the ledger atomically from the lines held."""
        lines = [*self.legacy, *(self.entries[k] for k in sorted(self.entries))]
        text = "".join(json.dumps(e, sort_keys=True) + "\n" for e in lines)
        storage.write_bytes_atomic(self.fs, self.path, text.encode())

    def set_aside_damaged(self) -> str | None:
        """Keep the ledger as it was under ``_ledger.jsonl.damaged-<time>`` and rewrite it without its
        damaged lines; return the kept file's location (None when no line is damaged)."""
        if not self.damaged:
            return None
        aside = _aside_name(self.path)
        storage.write_bytes_atomic(self.fs, aside, self.raw)
        self.write()
        log.warning("ledger %s: line(s) %s were damaged; the file as it was is kept as %s, the ledger is "
                    "rewritten without them, and their shards are embedded again (each output is replaced "
                    "under its own name, never added twice)",
                    storage.uri(self.fs, self.path), _numbers(self.damaged), storage.uri(self.fs, aside))
        self.damaged, self.raw = [], b""
        return storage.uri(self.fs, aside)

    def upgrade(self, model: ModelSpec, listed: Iterable[_Shard], present: set[str]) -> int:
        """Add this model's sha256, and the change token of shards still done, to the lines written
        without them; returns the number of lines changed (the caller rewrites the ledger)."""
        shards = {s.uri: s for s in listed}
        changed = 0
        for uri, e in self.entries.items():
            before = dict(e)
            if e.get("model_sha256") is None and (e.get("model_name"), e.get("model_version")) == \
                    (model.name, model.version):
                e["model_sha256"] = model.sha256
            shard = shards.get(uri)
            if e.get("etag") is None and shard is not None and shard.etag is not None \
                    and self.is_done(shard, present):
                e["etag"] = shard.etag
            changed += e != before
        return changed


def _identity(name, version, sha256) -> str:
    sha = f" (weights sha256 {sha256[:12]})" if sha256 else " (weights not recorded)"
    return f"{name} version {version}{sha}"


def _numbers(lines: list[int]) -> str:
    return ", ".join(map(str, lines[:10])) + (f" and {len(lines) - 10} more" if len(lines) > 10 else "")


def _aside_name(path: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{path}{DAMAGED_MARK}{stamp}"


def read_current(output: str | os.PathLike) -> dict | None:
    """``_current.json`` of an output location (``dir``, ``model_name``, ``model_version``,
    ``model_sha256``), or None.

    Raises :class:`DamagedOutputError` (naming the file and the repair) when it
    is damaged; :func:`repair_current` sets it aside and rebuilds it.
    """
    fs, root = storage.resolve(output)
    return _read_current(fs, root)


def _read_current(fs: pafs.FileSystem, root: str) -> dict | None:
    path = storage.join(root, CURRENT_FILE)
    try:
        raw = storage.read_bytes(fs, path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    problem = None
    try:
        doc = json.loads(raw.decode("utf-8"))
        if not isinstance(doc, dict) or not isinstance(doc.get("dir"), str) or not doc["dir"]:
            problem = "not a JSON object naming a version directory ('dir')"
    except (UnicodeDecodeError, ValueError) as exc:
        problem = f"not UTF-8 JSON: {exc}"
    if problem is not None:
        raise DamagedOutputError(
            f"{storage.uri(fs, path)} is damaged ({problem}); `ptsne embed` on this output (or "
            "pipeline.embed.repair_current) keeps it aside and rebuilds it"
        )
    return doc


def repair_current(output: str | os.PathLike, reembed: bool = False) -> dict | None:
    """``_current.json`` of an output location, after setting a damaged one aside and rebuilding it.

    A readable pointer is returned as it is. A damaged one is handled under the
    output's lock: kept as ``_current.json.damaged-<time>`` and rebuilt from the
    one version directory the output holds (a pointer only ever names a complete
    directory), or left absent when there is none. With several version
    directories which one was current cannot be told: refused, unless
    ``reembed`` (the run's own directory becomes current once complete).

    Raises
    ------
    DamagedOutputError
        The pointer is damaged, the output holds several version directories and ``reembed`` is false.
    pipeline.storage.LockedError
        Another run holds the output (only asked when the pointer is damaged).
    """
    fs, root = storage.resolve(output)
    try:
        return _read_current(fs, root)
    except DamagedOutputError:
        pass
    with storage.lock(fs, root, LOCK_FILE, what="another `ptsne embed`"):
        return _repair_current(fs, root, reembed)


def _repair_current(fs: pafs.FileSystem, root: str, reembed: bool) -> dict | None:
    """:func:`repair_current` once the lock is held."""
    try:
        return _read_current(fs, root)
    except DamagedOutputError as exc:
        damage = str(exc)
    path = storage.join(root, CURRENT_FILE)
    dirs = _version_dirs(fs, root)
    if len(dirs) > 1 and not reembed:
        raise DamagedOutputError(
            f"{storage.uri(fs, path)} is damaged and the output holds {len(dirs)} version directories "
            f"({', '.join(sorted(dirs))}), so which one was current cannot be told; rerun `ptsne embed` with "
            "--reembed to make the one --model names current once it is complete (its shards already done "
            "are kept), or write the file naming one of them"
        )
    aside = _aside_name(path)
    fs.move(path, aside)
    doc = None
    if len(dirs) == 1:
        tag, ledger = next(iter(dirs.items()))
        owners = {(e.get("model_name"), e.get("model_version"), e.get("model_sha256"))
                  for e in ledger.entries.values()}
        if len(owners) == 1:
            name, version, sha = owners.pop()
            doc = _current_doc(tag, name, version, sha, len(ledger.entries))
            storage.write_bytes_atomic(fs, path, json.dumps(doc, indent=2).encode())
    log.warning("%s; kept as %s and %s", damage.split(";")[0], storage.uri(fs, aside),
                f"rebuilt naming {doc['dir']}/ (the output's one version directory)" if doc else
                "not rebuilt (no single version directory to name): the run's directory becomes current "
                "once complete")
    return doc


def _version_dirs(fs: pafs.FileSystem, root: str) -> dict[str, Ledger]:
    """The version directories of an output (those holding a ledger with lines), by name."""
    out = {}
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=False, allow_not_found=True)):
        name = posixpath.basename(info.path)
        if info.type != pafs.FileType.Directory or name.startswith((".", "_")):
            continue
        if storage.exists(fs, storage.join(info.path, LEDGER_FILE)):
            ledger = Ledger.load(info.path, fs)
            if ledger.entries:
                out[name] = ledger
    return out


def _current_doc(tag: str, name: str, version: str, sha256: str | None, shards: int) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "dir": tag,
        "model_name": name,
        "model_version": version,
        "model_sha256": sha256,
        "shards": shards,
        "updated": _now(),
    }


def _write_current(fs: pafs.FileSystem, root: str, model: ModelSpec, shards_total: int) -> None:
    doc = _current_doc(model.tag, model.name, model.version, model.sha256, shards_total)
    storage.write_bytes_atomic(fs, storage.join(root, CURRENT_FILE), json.dumps(doc, indent=2).encode())


def _scan(fs: pafs.FileSystem, target: str) -> tuple[set[str], int]:
    """Relative paths of the files under ``target``, after deleting the temporary files of ours there.

    A temporary file is what a killed run (or a worker killed with it) left; the
    caller holds the lock, so no live run of this output is writing it. No other
    file is deleted.
    """
    present, removed = set(), 0
    for info in fs.get_file_info(pafs.FileSelector(target, recursive=True, allow_not_found=True)):
        if info.type != pafs.FileType.File:
            continue
        if storage.is_ours(posixpath.basename(info.path)):
            with contextlib.suppress(FileNotFoundError):
                fs.delete_file(info.path)
            removed += 1
        else:
            present.add(posixpath.relpath(info.path, target))
    return present, removed


# --------------------------------------------------------------------------- input planning


def _list_input(fs: pafs.FileSystem, root: str) -> list[_Shard]:
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {storage.uri(fs, root)!r} does not exist")
    if info.type == pafs.FileType.File:
        infos, base = {root: info}, posixpath.dirname(root)
    else:
        listing = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        infos, base = {f.path: f for f in listing if f.type == pafs.FileType.File}, root
        if not any(p.endswith(".parquet") for p in infos):
            return []  # nothing has arrived yet: a normal state under --watch
    out = []
    paths = shards.list_parquet(fs, root)  # the rule of which files are shards
    for path, etag in zip(paths, storage.change_tokens(fs, paths)):
        f = infos[path] if path in infos else fs.get_file_info(path)
        out.append(_Shard(path=path, uri=storage.uri(fs, path), rel=posixpath.relpath(path, base),
                          size=int(f.size), mtime_ns=f.mtime_ns, etag=etag))
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
    reserved = set(_output_names(spec))
    clash = sorted(reserved & set(spec.passthrough)) + ([spec.id_col] if spec.id_col in reserved else [])
    if clash:
        raise EmbedInputError(
            f"column name(s) {clash} clash with the output columns {sorted(reserved)}; rename them in the input"
        )

def _columns_of(spec: _Spec) -> list[str]:
    return [spec.id_col, *_output_names(spec), *spec.passthrough]


def _check_method(ledger: Ledger, method: str) -> None:
    """Every shard of one output directory is placed by the same method (one map for readers)."""
    for e in ledger.all_entries():
        if e.get("method") is not None and e["method"] != method:
            raise ValueError(
                f"output {ledger.directory!r} holds embeddings placed by method {e['method']!r}, "
                f"this run would place them by {method!r}; use the same method or another output"
            )


def _check_columns(ledger: Ledger, spec: _Spec) -> None:
    """Every shard of one output directory has the same columns (one table for readers)."""
    wanted = _columns_of(spec)
    for e in ledger.all_entries():
        if e.get("columns") is not None and e["columns"] != wanted:
            raise ValueError(
                f"output {ledger.directory!r} was written with columns {e['columns']}, this run "
                f"would write {wanted}; use the same --id-col/--passthrough or another --output"
            )


def _plan(fs: pafs.FileSystem, pending: list[_Shard], config: EmbedConfig, model: ModelSpec):
    """Read each pending shard's footer: row counts, one column layout, schema problems."""
    spec = first_schema = None
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
        planned.append(dataclasses.replace(shard, rows=rows))
    if problems:
        head = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise EmbedInputError(
            f"{len(problems)} problem(s) in {len({p.split(':')[0] for p in problems})} input shard(s), "
            f"nothing was written:\n  {head}{more}"
        )
    return planned, spec, first_schema


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


def _minor_faults() -> int:
    """Page faults of the calling thread so far (of the process where the OS cannot tell)."""
    return resource.getrusage(getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)).ru_minflt


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




def _output_schema(schema: pa.Schema, spec: _Spec) -> pa.Schema:
    """Columns of a shard's output, given its input schema: id, embedding, coordinates, model, passthrough."""
    k = spec.n_components
    fields = [schema.field(spec.id_col), pa.field(EMBEDDING, pa.list_(pa.float32(), k))]
    fields += [pa.field(c, pa.float32()) for c in COORDS[: min(k, len(COORDS))]]
    fields += [pa.field(MODEL_NAME, pa.string()), pa.field(MODEL_VERSION, pa.string())]
    fields += [schema.field(c) for c in spec.passthrough]
    return pa.schema(fields)


def _rejects_schema(schema: pa.Schema, spec: _Spec) -> pa.Schema:
    return pa.schema([schema.field(spec.id_col), pa.field("row", pa.int64()), pa.field("reason", pa.string()),
                      pa.field("shard", pa.string())])


def _dictionary_columns(schema: pa.Schema, spec: _Spec) -> list[str]:
    # Dictionary encoding only where values repeat (model name/version, labels, reasons):
    # Parquet's default tries it on every column, and on the float embedding and the ids
    # it costs 4x the rest of the write for a larger file.
    repeated = {MODEL_NAME, MODEL_VERSION, "reason", "shard", *spec.passthrough} - {spec.id_col}
    return [c for c in schema.names if c in repeated]


def _output_table(table: pa.Table, emb: np.ndarray, schema: pa.Schema, spec: _Spec,
                  model_name: str, model_version: str) -> pa.Table:
    n = table.num_rows
    cols = [table.column(spec.id_col), *_output_columns(emb).values(),
            pa.repeat(pa.scalar(model_name, pa.string()), n), pa.repeat(pa.scalar(model_version, pa.string()), n)]
    cols += [table.column(c) for c in spec.passthrough]
    return pa.Table.from_arrays(cols, schema=schema)


def _rejects_table(table: pa.Table, status: np.ndarray, offset: int, uri: str, schema: pa.Schema,
                   spec: _Spec) -> pa.Table:
    rows = np.flatnonzero(status != OK)
    return pa.Table.from_arrays(
        [
            table.column(spec.id_col).take(pa.array(rows)),
            pa.array((rows + offset).astype(np.int64)),
            pa.array([REASONS[int(s)] for s in status[rows]], type=pa.string()),
            pa.repeat(pa.scalar(uri, pa.string()), rows.size),
        ],
        schema=schema,
    )


class _BadRows:
    """Counts of a shard's rows with bad vectors per reason, and the first few ids of each."""

    EXAMPLES = 5

    def __init__(self):
        self.counts = dict.fromkeys(REASONS, 0)
        self.examples: dict[int, list] = {code: [] for code in REASONS}

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, ids: pa.ChunkedArray, status: np.ndarray) -> None:
        for code in REASONS:
            rows = np.flatnonzero(status == code)
            if not rows.size:
                continue
            self.counts[code] += int(rows.size)
            need = self.EXAMPLES - len(self.examples[code])
            if need > 0:
                self.examples[code] += ids.take(pa.array(rows[:need])).to_pylist()

    def describe(self, rel: str, n_features: int) -> str:
        parts = [
            f"{self.counts[code]} rows with {reason} (first ids: {', '.join(repr(v) for v in self.examples[code])})"
            for code, reason in REASONS.items() if self.counts[code]
        ]
        if self.counts[WRONG_DIM]:
            parts.append(f"the model expects {n_features} values per vector")
        return f"{rel}: " + "; ".join(parts)


def _prefetch(items: Iterator, depth: int = 2) -> Iterator:
    """``items``, produced by a background thread up to ``depth`` ahead.

    Reading and decoding the next batch (Arrow and the filesystem release the
    GIL) overlaps the model's work on this one. Close the generator to stop the
    thread early; an exception of the producer is raised in the consumer.
    """
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(end)
        except BaseException as exc:  # handed to the consumer, raised there
            put(_Raised(exc))

    thread = threading.Thread(target=produce, name="ptsne-embed-read", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is end:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join()


@dataclass(frozen=True)
class _Raised:
    exc: BaseException


@dataclass(frozen=True)
class _Job:
    """What every task of a run shares, shipped once to each actor."""

    spec: _Spec
    model_name: str
    model_version: str
    in_fs: pafs.FileSystem
    out_fs: pafs.FileSystem
    batch_size: int
    on_invalid: str
    on_duplicate_ids: str


@dataclass(frozen=True)
class _Task:
    """One input shard to embed: where to read it and where its output goes (paths on the job's filesystems)."""

    input: str
    uri: str
    rel: str
    rows: int  # as its footer said when planned
    output: str
    rejects: str
    stale_rejects: bool  # a file is at the rejects name: delete it unless this task writes rejects


class _ShardFailed(Exception):
    """Raised inside the writers' blocks so that nothing of the shard is kept."""

    def __init__(self, problems: list[str], kinds: list[str]):
        super().__init__("; ".join(problems))
        self.problems, self.kinds = problems, kinds


class _Embedder:
    """Ray actor: one model, loaded once; :meth:`embed` embeds one whole input shard per call."""

    def __init__(self, files: dict[str, bytes], job: _Job, threads: int, device: str):
        from ptsne.device import set_num_threads
        from ptsne.estimator import ParametricTSNE

        # Ray workers start with one thread; use the CPUs this actor reserved, for torch and Arrow.
        set_num_threads(max(1, threads))
        pa.set_cpu_count(max(1, threads))
        with tempfile.TemporaryDirectory(prefix="ptsne-actor-") as tmp:
            for fname, data in files.items():
                Path(tmp, fname).write_bytes(data)
            self.estimator = ParametricTSNE.load(tmp, device=device)
        self.job = job
        self._last_end: float | None = None

    def embed(self, task: _Task) -> dict:
        """Embed ``task``'s shard into its output (and rejects) file, whole or not at all.

        Returns ``rows`` (written), ``rejected``, ``read``, ``sha256`` and ``bytes``
        of the output, ``rejects`` (whether a rejects file was written),
        ``duplicates`` ``[count, example id, its rows]``, ``problems`` and their
        ``kinds`` (non-empty: nothing was written), and the timings ``t_first``
        (wall clock of the first model call, or None), ``t_end``, ``model_s``, ``call_s``.
        """
        job, spec = self.job, self.job.spec
        result = {"rows": 0, "rejected": 0, "read": 0, "sha256": None, "bytes": 0, "rejects": False,
                  "duplicates": [0, None, 0], "problems": [], "kinds": [], "t_first": None, "t_end": None,
                  "model_s": 0.0, "call_s": 0.0}
        bad = _BadRows()
        ids: list[pa.Array] = []
        try:
            with contextlib.ExitStack() as stack:
                f = stack.enter_context(job.in_fs.open_input_file(task.input))
                parquet = pq.ParquetFile(f)
                schema = _output_schema(parquet.schema_arrow, spec)
                sink = stack.enter_context(storage.parquet_writer(
                    job.out_fs, task.output, schema, use_dictionary=_dictionary_columns(schema, spec)))
                rejects = None
                batches = stack.enter_context(contextlib.closing(_prefetch(
                    parquet.iter_batches(batch_size=job.batch_size, columns=spec.columns))))
                for batch in batches:
                    table = pa.Table.from_batches([batch])
                    ids.append(batch.column(spec.id_col))  # the ids only: the duplicate check needs no more
                    offset = result["read"]
                    result["read"] += table.num_rows
                    if bad.total and job.on_invalid == "error":
                        # The shard fails: only count its bad rows, embed nothing more.
                        bad.add(table.column(spec.id_col), _vectors(table, spec)[1])
                        continue
                    out, status = self._batch(table, schema, result)
                    if out.num_rows:
                        sink.write(out)
                    if out.num_rows < table.num_rows:
                        bad.add(table.column(spec.id_col), status)
                        if job.on_invalid == "reject":
                            if rejects is None:
                                rschema = _rejects_schema(parquet.schema_arrow, spec)
                                rejects = stack.enter_context(storage.parquet_writer(
                                    job.out_fs, task.rejects, rschema, use_dictionary=["reason", "shard"]))
                            rejects.write(_rejects_table(table, status, offset, task.uri, rschema, spec))
                result["rows"] = sink.rows
                result["rejected"] = bad.total
                result["rejects"] = rejects is not None
                self._check(task, bad, pa.chunked_array(ids, type=parquet.schema_arrow.field(spec.id_col).type),
                            result)
        except _ShardFailed as failed:
            result.update(rows=0, problems=failed.problems, kinds=failed.kinds, rejects=False)
            return result
        result["sha256"], result["bytes"] = sink.sha256, sink.bytes
        if task.stale_rejects and not result["rejects"]:
            with contextlib.suppress(FileNotFoundError):  # of an earlier version of this input
                job.out_fs.delete_file(task.rejects)
        result["t_end"] = time.time()
        return result

    def _batch(self, table: pa.Table, schema: pa.Schema, result: dict) -> tuple[pa.Table, np.ndarray]:
        """The output rows of one input batch (its good rows, embedded) and the status of every row."""
        t0 = time.time()  # wall clock: comparable across the processes of a node
        c0 = time.perf_counter()
        job, spec = self.job, self.job.spec
        X, status = _vectors(table, spec)
        c1, cpu1 = time.perf_counter(), time.thread_time()
        faults = _minor_faults()
        ok = status == OK
        if ok.all():
            emb = self.estimator.transform(X, method=spec.method)
        else:
            table = table.filter(pa.array(ok))
            emb = self.estimator.transform(X[ok], method=spec.method) if ok.any() else \
                np.zeros((0, spec.n_components), np.float32)
        c2, cpu2 = time.perf_counter(), time.thread_time()
        faults = _minor_faults() - faults
        out = _output_table(table, emb, schema, spec, job.model_name, job.model_version)
        c3 = time.perf_counter()
        if result["t_first"] is None:
            result["t_first"] = t0
        result["model_s"] += c2 - c1
        result["call_s"] += c3 - c0
        if log.isEnabledFor(logging.DEBUG):
            idle = c0 - self._last_end if self._last_end is not None else 0.0
            log.debug(
                "batch of %d rows: waited %.1f ms, to numpy %.1f ms, model %.1f ms (%.1f ms CPU, %d page faults), "
                "to Arrow %.1f ms",
                len(status), 1e3 * idle, 1e3 * (c1 - c0), 1e3 * (c2 - c1), 1e3 * (cpu2 - cpu1), faults,
                1e3 * (c3 - c2),
            )
        self._last_end = time.perf_counter()
        return out, status

    def _check(self, task: _Task, bad: _BadRows, ids: pa.ChunkedArray, result: dict) -> None:
        """Raise :class:`_ShardFailed` (inside the writers' blocks) when the shard may not be kept."""
        job, spec = self.job, self.job.spec
        n_dup, example, times = _duplicate_ids(ids)
        result["duplicates"] = [n_dup, example, times]
        problems, kinds = [], []
        if bad.total and job.on_invalid == "error":
            problems.append(bad.describe(task.rel, spec.n_features))
            kinds.append("invalid")
        if n_dup and job.on_duplicate_ids == "error":
            problems.append(
                f"{task.rel}: {n_dup} duplicate id(s) in id column {spec.id_col!r} (e.g. {example!r} on {times} rows)"
            )
            kinds.append("duplicates")
        if result["read"] != task.rows:
            problems.append(
                f"{task.rel}: read {result['read']} rows, its footer said {task.rows} when the run began; "
                "it was modified during the run"
            )
            kinds.append("changed")
        if problems:
            raise _ShardFailed(problems, kinds)


def _model_files(model: ModelSpec) -> dict[str, bytes]:
    # Bytes rather than a path, so that actors on other nodes need no shared disk for the model.
    return {p.name: p.read_bytes() for p in Path(model.path).iterdir() if p.is_file()}



# --------------------------------------------------------------------------- driver side

#: How to get past each kind of shard failure (for the final error).
_HINTS = {
    "invalid": f"--on-invalid reject writes rows with bad vectors to {REJECTS_DIR}/ and embeds the rest",
    "duplicates": "--on-duplicate-ids warn embeds shards with duplicate ids",
    "changed": "a shard modified during the run is embedded by the next run",
}


#: GPU share of an embedding actor when ``gpus_per_actor`` is not given, the cluster has GPUs
#: and the model's work runs on one.
DEFAULT_GPUS_PER_ACTOR = 0.25
#: Rows per batch of a CPU actor and of a GPU actor when ``batch_size`` is not given.
CPU_BATCH_ROWS = 16384
GPU_BATCH_ROWS = 131072


class ActorPlan(NamedTuple):
    """The embedding actors: how many, each one's CPUs and GPUs, and the rows of each batch."""

    actors: int
    cpus: float
    gpus: float
    batch_size: int


def _actor_resources(config: EmbedConfig, n_tasks: int, method: str) -> ActorPlan:
    """:func:`plan_actors` for ``n_tasks`` shards on the connected cluster."""
    import ray

    return plan_actors(config, n_tasks, ray.cluster_resources(), method)


def plan_actors(config: EmbedConfig, n_tasks: int, resources: dict, method: str,
                gpu_placement: bool = False) -> ActorPlan:
    """The actor pool for ``n_tasks`` shards on a cluster of ``resources``, embedding with ``method``.

    ``resources`` is what ``ray.cluster_resources()`` returns (``"CPU"``, ``"GPU"``);
    ``method`` is the model's resolved method (``"network"`` or ``"refine"``) and
    ``gpu_placement`` whether its placement of new points on the reference map
    runs on a GPU (it runs on CPU today: False). Without ``gpus_per_actor``, GPU
    actors embed only what a GPU computes: the network (or a GPU placement). Each
    takes :data:`DEFAULT_GPUS_PER_ACTOR` of a GPU and :data:`GPU_BATCH_ROWS` rows a
    batch: an actor is bound by Parquet I/O (about 120k rows/s) far below what
    the network does on a GPU (23.8M rows/s on an H200), so four actors per GPU
    embed about four times as fast as one. A CPU placement gets CPU actors, one
    per ``cpus_per_actor`` CPUs, as on a cluster without GPUs (a GPU would cut the
    pool to four actors a GPU while the CPUs do the work). Without ``num_actors``
    a GPU pool has ``GPUs / gpus_per_actor`` actors, at most ``CPUs / cpus_per_actor``;
    a CPU pool has ``CPUs / cpus_per_actor``; never more than ``n_tasks``.

    Raises ValueError when the actors would need more CPUs or GPUs than the
    cluster has (Ray would wait for them forever).
    """
    if method not in ("network", "refine"):
        raise ValueError(f"plan_actors: method must be 'network' or 'refine' (as resolved), got {method!r}")
    total_cpus, total_gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    gpus = config.gpus_per_actor
    if gpus is None:
        on_gpu = method == "network" or gpu_placement
        gpus = DEFAULT_GPUS_PER_ACTOR if total_gpus >= 1 and on_gpu else 0.0
    if config.num_actors is not None:
        n = config.num_actors
    elif gpus > 0:
        n = max(1, min(int(total_gpus // gpus), int(total_cpus // config.cpus_per_actor)))
    else:
        n = max(1, int(total_cpus // config.cpus_per_actor))
    n = max(1, min(n, n_tasks))
    if n * config.cpus_per_actor > total_cpus + 1e-9:
        raise ValueError(
            f"embed: {n} actor(s) x cpus_per_actor={config.cpus_per_actor:g} reserve "
            f"{n * config.cpus_per_actor:g} CPUs, the cluster has {total_cpus:g}: lower cpus_per_actor or num_actors"
        )
    if gpus > 0 and n * gpus > total_gpus + 1e-9:
        raise ValueError(
            f"embed: {n} actor(s) x gpus_per_actor={gpus:g} reserve {n * gpus:g} GPUs, the cluster has "
            f"{total_gpus:g}: lower gpus_per_actor or num_actors"
        )
    batch = config.batch_size or (GPU_BATCH_ROWS if gpus > 0 else CPU_BATCH_ROWS)
    return ActorPlan(n, float(config.cpus_per_actor), float(gpus), int(batch))


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
    output : path or URI
        Output location (any pyarrow filesystem; see the module docstring for
        the layout). Neither of ``input`` and ``output`` may contain the other.
    model : ModelSpec
        The model and the name/version written with each row.
    config : EmbedConfig
    make_current : bool
        Point ``_current.json`` at ``model.tag`` once every input shard is done.
    start_ray : callable, optional
        Called (without arguments) just before the first Ray call, only when
        some pending shard has rows: everything before it (output, lock, input
        listing, ledger, footers) runs without Ray. Default: nothing (Ray is
        connected already, or ``ray.put`` starts a default local one).

    Returns
    -------
    EmbedSummary

    Raises
    ------
    EmbedInputError
        Schema or dimension mismatch (nothing written), or NaN/Inf/null vectors
        with ``on_invalid="error"``, or duplicate ids with
        ``on_duplicate_ids="error"`` (those shards not written, others complete).
    ValueError
        ``input`` and ``output`` contain one another; the output holds another
        model's (name, version or weights), method's or columns' embeddings; the
        actors need more CPUs or GPUs than the cluster has.
    DamagedOutputError
        ``_current.json`` is damaged and the output holds several version
        directories (see :func:`repair_current`).
    pipeline.storage.OutputLocationError
        A local ``output`` cannot be written (not a directory, no permission).
    pipeline.storage.LockedError
        Another run holds the output's lock.
    FileNotFoundError
        ``input`` does not exist.
    RuntimeError
        A worker failed (shards finished before are complete and in the ledger).
    """
    check_output(output)
    storage.check_disjoint(input, output)
    t0 = time.perf_counter()
    in_fs, root = storage.resolve(input)
    if storage.is_local(in_fs):
        root = os.path.realpath(root)  # one URI per file, whichever link names the input
    out_fs, out_root = storage.resolve(output)
    target = storage.join(out_root, model.tag)
    summary = EmbedSummary(output=storage.uri(out_fs, target), model_name=model.name, model_version=model.version)
    with storage.lock(out_fs, out_root, LOCK_FILE, what="another `ptsne embed`"):
        storage.makedirs(out_fs, target)
        present, removed = _scan(out_fs, target)
        if removed:
            log.info("removed %d temporary file(s) of an interrupted run in %s", removed, summary.output)
        current = _repair_current(out_fs, out_root, reembed=False)
        ledger = Ledger.load(target, out_fs)
        _check_owner(ledger, model)
        _check_method(ledger, model.method(config.method))
        if ledger.legacy:
            _warn_legacy(ledger, present)
        found = _list_input(in_fs, root)
        _check_unrecorded(ledger, model, config, in_fs, found, present)
        ledger.set_aside_damaged()  # their shards are pending below
        if ledger.upgrade(model, found, present):  # older lines: no re-embedding, the identity recorded
            ledger.write()
        pending = [s for s in found if not ledger.is_done(s, present)]
        summary.shards_total = len(found)
        summary.shards_skipped = len(found) - len(pending)
        hints: set[str] = set()
        if pending:
            planned, spec, schema = _plan(in_fs, pending, config, model)
            _check_columns(ledger, spec)
            hints = _run(in_fs, out_fs, target, planned, spec, schema, ledger, present, model, config, summary,
                         start_ray)
        summary.seconds = time.perf_counter() - t0
        done = bool(found) and all(ledger.is_done(s, present) for s in found)
        if make_current and done and (current is None or current.get("dir") != model.tag
                                      or current.get("model_sha256") != model.sha256):
            _write_current(out_fs, out_root, model, len(found))
            log.info("%s is now the current output (%s version %s)", summary.output, model.name, model.version)
        summary.current = done and (_read_current(out_fs, out_root) or {}).get("dir") == model.tag
    if summary.failures:
        raise EmbedInputError(
            f"{summary.shards_failed} shard(s) were not written, the others are complete "
            f"(rerun: {'; '.join(sorted(hints))}):\n  " + "\n  ".join(summary.failures[:20]),
            summary,
        )
    return summary


def check_output(output: str | os.PathLike) -> None:
    """Raise unless ``output`` can be written: a local directory this user may write to (or create), or a URI.

    Object stores answer only when written to (``embed_shards`` writes the
    lock first).

    Raises
    ------
    ValueError
        ``output`` is not a path or a URI pyarrow knows.
    pipeline.storage.OutputLocationError
        A local ``output``, or the nearest existing ancestor of it, is not a
        writable directory.
    """
    fs, path = storage.resolve(output)
    storage.check_writable_dir(fs, path)


def _check_owner(ledger: Ledger, model: ModelSpec) -> None:
    """Refuse a version directory holding another model's rows: another name or version, or other weights.

    A line without ``model_sha256`` (written before it was recorded) holds no
    more than the name and version, and is compared on those.
    """
    others = set()
    for e in ledger.all_entries():
        sha = e.get("model_sha256")
        if (e.get("model_name"), e.get("model_version")) != (model.name, model.version) or \
                (sha is not None and sha != model.sha256):
            others.add(_identity(e.get("model_name"), e.get("model_version"), sha))
    if others:
        raise ValueError(
            f"output directory {ledger.directory!r} holds embeddings of {', '.join(sorted(others))}, not of "
            f"{model.describe()}; use another --output"
        )


#: Rows of one shard embedded again to tell whether lines without the weights' sha256 are this model's.
PROBE_ROWS = 16


def _check_unrecorded(ledger: Ledger, model: ModelSpec, config: EmbedConfig, in_fs: pafs.FileSystem,
                      found: list[_Shard], present: set[str]) -> None:
    """Refuse this model for lines written before the weights' sha256 was recorded, unless it wrote them.

    Such a line names the model by name and version alone, which two local
    directories (``model``, ``local``) share. The first rows of one of their
    shards whose input is unchanged are embedded again with this model and
    compared with the output: another model's map differs. Where no such shard
    is left (inputs gone or changed), name and version are all there is to
    compare, with a warning.
    """
    unrecorded = [e for e in ledger.entries.values() if e.get("model_sha256") is None]
    if not unrecorded:
        return
    verdict = _probe(ledger, model, config, in_fs, {s.uri: s for s in found}, present, unrecorded)
    if verdict is None:
        log.warning("%s: %d ledger line(s) record no weights' sha256 and none of their inputs is there as it "
                    "was; they are taken for %s on their name and version alone",
                    ledger.directory, len(unrecorded), model.describe())
    elif not verdict:
        raise ValueError(
            f"output directory {ledger.directory!r} holds embeddings of {unrecorded[0].get('model_name')} "
            f"version {unrecorded[0].get('model_version')} written before weights were recorded, and "
            f"{model.describe()} places their rows elsewhere: another model; use another --output"
        )


def _probe(ledger: Ledger, model: ModelSpec, config: EmbedConfig, in_fs: pafs.FileSystem, listed: dict,
           present: set[str], lines: list[dict]) -> bool | None:
    """Whether this model reproduces the first rows of a shard of ``lines``; None when none can be read."""
    from ptsne.estimator import ParametricTSNE

    for e in lines:
        shard = listed.get(e.get("uri"))
        columns = e.get("columns")
        if shard is None or not ledger.is_done(shard, present) or not e.get("rows") or not columns:
            continue
        try:
            with ledger.fs.open_input_file(storage.join(ledger.root, e["output"])) as f:
                out = next(pq.ParquetFile(f).iter_batches(batch_size=PROBE_ROWS, columns=[columns[0], EMBEDDING]))
            with in_fs.open_input_file(shard.path) as f:
                parquet = pq.ParquetFile(f)
                spec = _resolve_spec(parquet.schema_arrow, dataclasses.replace(config, id_col=columns[0]), model)
                table = pa.Table.from_batches([next(parquet.iter_batches(batch_size=64 * PROBE_ROWS,
                                                                         columns=spec.columns))])
        except (OSError, StopIteration, KeyError, ValueError, pa.ArrowException):
            continue
        X, status = _vectors(table, spec)
        first = {}
        for row, key in enumerate(table.column(spec.id_col).to_pylist()):
            first.setdefault(key, row)
        pairs = [(first[key], i) for i, key in enumerate(out.column(0).to_pylist())
                 if key in first and status[first[key]] == OK]
        if not pairs:
            continue
        rows, kept = (np.array(p) for p in zip(*pairs))
        est = ParametricTSNE.load(model.path, device="cpu")
        mine = est.transform(X[rows], method=e.get("method") or spec.method)
        theirs = np.stack(out.column(1).to_numpy(zero_copy_only=False)[kept])
        scale = max(1.0, float(np.abs(theirs).max()))
        return bool(np.allclose(mine, theirs, rtol=1e-3, atol=1e-3 * scale))
    return None


def _warn_legacy(ledger: Ledger, present: set[str]) -> None:
    files = sorted({e["output"] for e in ledger.legacy if e.get("output") in present})
    shown = ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
    log.warning(
        "%s: %d ledger line(s) of the older format (keyed by the path relative to the input, which two inputs "
        "may share) do not count as done: their inputs are embedded under names with the hash of their URI. "
        "The %d file(s) those lines name are kept, and load_output skips them (%s); delete them once the new "
        "outputs are complete, as readers of every Parquet file in the directory see their rows twice",
        ledger.directory, len(ledger.legacy), len(files), shown or "none left",
    )


def _entry(shard: _Shard, model: ModelSpec, spec: _Spec, rows: int, rejected: int, sha256: str,
           rejects: bool) -> dict:
    """The ledger line of a finished shard."""
    return {
        "format_version": FORMAT_VERSION,
        "uri": shard.uri,
        "input": shard.rel,
        "size": shard.size,
        "mtime_ns": shard.mtime_ns,
        "rows": rows,
        "rejected": rejected,
        "output": shard.output,
        "rejects": shard.rejects if rejects else None,
        "sha256": sha256,
        "model_name": model.name,
        "model_version": model.version,
        "model_sha256": model.sha256,
        "etag": shard.etag,
        "columns": _columns_of(spec),
        "method": spec.method,
        "finished": _now(),
    }


class _Commits:
    """The driver's side of finished tasks: checks, counts, and each shard's ledger line."""

    def __init__(self, out_fs: pafs.FileSystem, target: str, present: set[str], spec: _Spec,
                 model: ModelSpec, summary: EmbedSummary):
        self.fs, self.target, self.present = out_fs, target, present
        self.spec, self.model, self.summary = spec, model, summary
        self.bar = None
        #: Written shards with duplicate ids: (shard, duplicate rows, an example id, its rows).
        self.duplicates: list[tuple[str, int, object, int]] = []
        #: How to get past the kinds of failure met (for the final error).
        self.hints: set[str] = set()
        self.first: float | None = None  # wall clock of the first model call
        self.last: float | None = None  # of the last shard written

    def written(self, shard: _Shard, rows: int, rejected: int, sha256: str, rejects: bool) -> dict:
        self.summary.shards_written += 1
        self.summary.rows += rows
        self.summary.rows_rejected += rejected
        self.present.add(shard.output)
        if rejects:
            self.present.add(shard.rejects)
        else:
            self.present.discard(shard.rejects)
        return _entry(shard, self.model, self.spec, rows, rejected, sha256, rejects)

    def take(self, shard: _Shard, result: dict) -> dict | None:
        """Account for one finished task: its ledger line, or None when the shard failed."""
        s = self.summary
        n_dup, example, times = result["duplicates"]
        s.duplicate_ids += n_dup
        s.stream_rows += result["read"]
        s.model_seconds += result["model_s"]
        s.actor_seconds += result["call_s"]
        if result["t_first"] is not None:
            self.first = result["t_first"] if self.first is None else min(self.first, result["t_first"])
        if self.bar is not None:
            self.bar.update(result["read"])
        if result["problems"]:
            s.shards_failed += 1
            s.failures.extend(result["problems"])
            self.hints.update(_HINTS[k] for k in result["kinds"])
            return None
        self._check_visible(shard, result["bytes"])
        self.last = result["t_end"] if self.last is None else max(self.last, result["t_end"])
        if n_dup:
            self.duplicates.append((shard.rel, n_dup, example, times))
        if self.bar is not None:
            self.bar.set_postfix(shards=s.shards_written + 1, refresh=False)
        return self.written(shard, result["rows"], result["rejected"], result["sha256"], result["rejects"])

    def _check_visible(self, shard: _Shard, size: int) -> None:
        """Raise unless the driver sees the output a worker wrote (a local output not shared by the nodes)."""
        path = storage.join(self.target, shard.output)
        deadline = time.monotonic() + VISIBLE_TIMEOUT_S
        while True:
            info = self.fs.get_file_info(path)
            if info.type == pafs.FileType.File and info.size == size:
                return
            if time.monotonic() > deadline:
                seen = "no file" if info.type == pafs.FileType.NotFound else f"{info.size} bytes"
                raise RuntimeError(
                    f"the output of {shard.rel} that a Ray worker wrote to {storage.uri(self.fs, path)!r} "
                    f"({size} bytes) is not there for the driver ({seen}): on a cluster of several machines a "
                    "local --output must be one shared filesystem mounted at the same path on every node; "
                    "or use an object store URI (s3://...)"
                )
            time.sleep(0.5)

    def warn_duplicates(self) -> None:
        if self.duplicates:
            rel, _, example, times = self.duplicates[0]
            log.warning(
                "id column %r: %d duplicate id(s) in %d shard(s), embedded anyway (e.g. %r on %d rows of %s); "
                "ids are compared within each shard only. --on-duplicate-ids error refuses such shards",
                self.spec.id_col, sum(d[1] for d in self.duplicates), len(self.duplicates), example, times, rel,
            )


def _task(shard: _Shard, target: str, present: set[str]) -> _Task:
    return _Task(input=shard.path, uri=shard.uri, rel=shard.rel, rows=shard.rows,
                 output=storage.join(target, shard.output), rejects=storage.join(target, shard.rejects),
                 stale_rejects=shard.rejects in present)


def _run(in_fs, out_fs, target, planned, spec, schema, ledger, present, model, config, summary,
         start_ray=None) -> set[str]:
    """Embed the planned shards; returns the hints of the failures met (how to get past them)."""
    commits = _Commits(out_fs, target, present, spec, model, summary)
    work = sorted((s for s in planned if s.rows > 0), key=lambda s: -s.rows)  # the largest first: even finish
    if work:
        if start_ray is not None:
            start_ray()
        n_actors, cpus, gpus, batch_size = _actor_resources(config, len(work), spec.method)  # before any write
    entries = []
    for shard in [s for s in planned if s.rows == 0]:  # no Ray needed: the driver writes the empty file
        empty = _output_schema(schema, spec).empty_table()
        sha = storage.write_parquet_atomic(out_fs, storage.join(target, shard.output), empty,
                                           use_dictionary=_dictionary_columns(empty.schema, spec))
        if shard.rejects in present:
            out_fs.delete_file(storage.join(target, shard.rejects))
        entries.append(commits.written(shard, 0, 0, sha, False))
    ledger.record(entries)
    if not work:
        return commits.hints
    import ray
    from tqdm.auto import tqdm

    log.info(
        "embedding %d shard(s), %d rows with %d actor(s) (%g CPU, %g GPU each, batches of %d rows) into %s",
        len(work), sum(s.rows for s in work), n_actors, cpus, gpus, batch_size, summary.output,
    )
    job = _Job(spec=spec, model_name=model.name, model_version=model.version, in_fs=in_fs, out_fs=out_fs,
               batch_size=batch_size, on_invalid=config.on_invalid, on_duplicate_ids=config.on_duplicate_ids)
    files = ray.put(_model_files(model))  # once: every actor reads it from the object store
    actor_class = ray.remote(_Embedder).options(num_cpus=cpus, num_gpus=gpus)
    bar = tqdm(total=sum(s.rows for s in work), unit="rows", unit_scale=True, desc="embed",
               disable=not config.progress)
    commits.bar = bar
    actors = []
    try:
        actors = [actor_class.remote(files, job, max(1, int(cpus)), "cuda" if gpus > 0 else "cpu")
                  for _ in range(n_actors)]
        queued = deque(work)
        in_flight: dict = {}

        def submit(actor) -> None:
            shard = queued.popleft()
            in_flight[actor.embed.remote(_task(shard, target, present))] = (shard, actor)

        for _ in range(TASKS_PER_ACTOR):
            for actor in actors:
                if queued:
                    submit(actor)
        failure = None
        while in_flight:
            ready, rest = ray.wait(list(in_flight), num_returns=1)
            if rest:  # commit every finished shard with one ledger write
                ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
            entries = []
            for ref in ready:
                shard, actor = in_flight.pop(ref)
                try:
                    entry = commits.take(shard, ray.get(ref))
                except Exception as exc:  # a worker or the filesystem failed: finish the others, then report
                    failure = failure or (shard, exc)
                    continue
                if entry is not None:
                    entries.append(entry)
                if queued and failure is None:
                    submit(actor)
            ledger.record(entries)
        if commits.first is not None and commits.last is not None:
            summary.stream_seconds = max(0.0, commits.last - commits.first)
        commits.warn_duplicates()
        if failure is not None:
            shard, exc = failure
            cause = getattr(exc, "cause", None) or exc
            raise RuntimeError(f"embedding {shard.rel} failed: {type(cause).__name__}: {cause}") from exc
        return commits.hints
    finally:
        bar.close()
        for actor in actors:
            ray.kill(actor)


def load_output(directory: str | os.PathLike) -> pa.Table:
    """All finished output shards as one table, in the order of their inputs' URIs.

    ``directory`` (a path or URI) is a version directory (``OUTPUT/v3``) or an
    output location, in which case its current version directory
    (``_current.json``) is read. Only the files of current ledger lines are
    read: temporary and reject files, files the ledger does not name and those
    of lines of the older format are skipped.
    """
    fs, root = storage.resolve(directory)
    current = _read_current(fs, root)
    if current is not None and not storage.exists(fs, storage.join(root, LEDGER_FILE)):
        root = storage.join(root, current["dir"])
    ledger = Ledger.load(root, fs)
    tables = []
    for key in sorted(ledger.entries):
        with fs.open_input_file(storage.join(root, ledger.entries[key]["output"])) as f:
            tables.append(pq.read_table(f))
    if not tables:
        raise FileNotFoundError(f"no finished output shards in {storage.uri(fs, root)!r}")
    return pa.concat_tables(tables)
