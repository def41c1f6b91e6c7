"""The affinity directory: its manifest (a typed contract) and the one reader of it.

Layout, on any filesystem :mod:`pipeline.storage` resolves (a local path or a
URI such as ``s3://bucket/prefix``)::

    manifest.json             AffinityManifest (written last)
    features/part-*.parquet   row int64, id, vector fixed_size_list<float32>[dim], label
    edges/part-RRRRR.parquet  head int64, tail int64, weight float32 (joint P)
    pca.safetensors           the PCA applied before the kNN search (optional)
    rejects.parquet           rows dropped as invalid (optional)

Each edges file holds one range of heads, and inside it one Parquet row group
per head bucket (``schema.bucket_of(head, edge_buckets)``), rows sorted by
``(bucket, head, tail)``: a row of P lies whole in one row group, and the
manifest lists each row group's bucket and rows. Training worker ``w`` of ``W``
owns the rows whose hash is ``w`` modulo ``W``; when ``W`` divides the bucket
count those are exactly the buckets ``b`` with ``b % W == w``, and
:meth:`AffinityDir.read_worker_edges` reads only their row groups.

:func:`pipeline.affinity.build_affinities` writes the directory (one edges file
with :func:`write_edges_file`); :class:`AffinityDir` is how everything else
reads it. :func:`read_manifest` gives the raw manifest (or None) for checks
that must not fail on an older directory, such as comparing its ``config_hash``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import schema, storage
from pipeline.pca import load_pca
from ptsne.affinity import Edges
from ptsne.pca import PCA

log = logging.getLogger(__name__)

#: Rows per batch of :meth:`AffinityDir.iter_features`.
FEATURE_BATCH_ROWS = 65536
_EDGE_COLUMNS = (schema.HEAD, schema.TAIL, schema.WEIGHT)


class AffinityFormatError(ValueError):
    """An affinity directory this version cannot read (older format, or files that disagree with the manifest)."""


def _rebuild_hint(where: str) -> str:
    return (f"rebuild it: `ptsne affinities --input ... --output {where} --overwrite` "
            "(`ptsne train --input` rebuilds its own workdir's affinities by itself)")


# --------------------------------------------------------------------------- the manifest


@dataclass(frozen=True)
class DataFile:
    """A file of the directory: ``path`` relative to it (POSIX), its rows, sha256 and size."""

    path: str
    rows: int
    sha256: str | None = None
    bytes: int | None = None

    def to_dict(self) -> dict:
        d = {"path": self.path, "rows": int(self.rows), "sha256": self.sha256}
        if self.bytes is not None:
            d["bytes"] = int(self.bytes)
        return d


@dataclass(frozen=True)
class RowGroup:
    """One Parquet row group of an edges file: the head bucket it holds and its rows."""

    bucket: int
    rows: int


@dataclass(frozen=True)
class EdgesFile(DataFile):
    """An edges file: heads in ``[head_start, head_stop)``, one row group per bucket."""

    head_start: int = 0
    head_stop: int = 0
    row_groups: tuple[RowGroup, ...] = ()

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.update(head_start=int(self.head_start), head_stop=int(self.head_stop),
                 row_groups=[[int(g.bucket), int(g.rows)] for g in self.row_groups])
        return d


@dataclass(frozen=True)
class AffinityManifest:
    """``manifest.json`` of an affinity directory, checked.

    Parameters
    ----------
    n, input_dim, dim, k : int
        Points, input dimension, stored dimension (after the PCA), neighbours per point.
    perplexities : tuple of float
    features : tuple of DataFile
        In row order: file ``i`` holds the rows after those of files ``< i``.
    edges : tuple of EdgesFile
        In head order.
    edge_buckets : int
        Head buckets of the edges files (``schema.EDGE_BUCKETS`` when written).
    config_hash : str or None
        Hash of the input and the result-defining settings (a rerun with the same is skipped).
    pca_file : DataFile or None
        ``pca.safetensors`` when a PCA was applied.
    The other fields describe how the directory was built (kNN method and recall,
    columns, rejected rows, timings); ``extra`` keeps keys this version does not know.
    """

    n: int
    input_dim: int
    dim: int
    k: int
    perplexities: tuple[float, ...]
    features: tuple[DataFile, ...]
    edges: tuple[EdgesFile, ...]
    edge_buckets: int = schema.EDGE_BUCKETS
    config_hash: str | None = None
    n_edges: int | None = None
    weight_sum: float | None = None
    knn_method: str | None = None
    knn_recall: float | None = None
    knn_index_shards: int | None = None
    knn_nprobe: int | None = None
    max_index_bytes: int | None = None
    vector_col: str | None = None
    feature_cols: tuple[str, ...] | None = None
    id_col: str | None = None
    label_col: str | None = None
    pca_components: int | None = None
    pca_file: DataFile | None = None
    n_input_rows: int | None = None
    n_rejected: int = 0
    rejects: str | None = None
    input: str | None = None
    timings_s: Mapping[str, float] = field(default_factory=dict)
    peak_worker_rss_mb: Mapping[str, float] = field(default_factory=dict)
    created_at: str | None = None
    extra: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("n", "input_dim", "dim", "k", "edge_buckets"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise AffinityFormatError(f"AffinityManifest: {name} must be an integer >= 1, got {v!r}")
        object.__setattr__(self, "perplexities", tuple(float(p) for p in self.perplexities))
        object.__setattr__(self, "features", tuple(self.features))
        object.__setattr__(self, "edges", tuple(self.edges))
        if self.feature_cols is not None:
            object.__setattr__(self, "feature_cols", tuple(self.feature_cols))
        if not self.features or not self.edges:
            raise AffinityFormatError(
                f"AffinityManifest: lists {len(self.features)} features and {len(self.edges)} edges files; "
                "both must be non-empty"
            )
        rows = sum(int(f.rows) for f in self.features)
        if rows != self.n:
            raise AffinityFormatError(f"AffinityManifest: the features files hold {rows} rows, n is {self.n}")
        for f in self.edges:
            bad = [g for g in f.row_groups if not 0 <= g.bucket < self.edge_buckets or g.rows < 0]
            if bad or sum(g.rows for g in f.row_groups) != f.rows:
                raise AffinityFormatError(
                    f"AffinityManifest: edges file {f.path!r} lists row groups {bad or list(f.row_groups)[:3]} "
                    f"that do not add up to its {f.rows} rows in buckets [0, {self.edge_buckets})"
                )

    @property
    def pca(self) -> bool:
        return self.pca_file is not None

    # -- JSON ------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The JSON document of ``manifest.json``."""
        d = {"format_version": schema.FORMAT_VERSION}
        for f in fields(self):
            if f.name in ("features", "edges", "pca_file", "extra"):
                continue
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else (dict(v) if isinstance(v, Mapping) else v)
        d["pca"] = self.pca
        d["files"] = {"features": [f.to_dict() for f in self.features],
                      "edges": [f.to_dict() for f in self.edges]}
        if self.pca_file is not None:
            d["files"]["pca"] = [{"path": self.pca_file.path, "sha256": self.pca_file.sha256}]
        d.update({k: v for k, v in self.extra.items() if k not in d})
        return d

    @classmethod
    def from_dict(cls, d: object, where: str = "affinity directory") -> AffinityManifest:
        """Check and convert a ``manifest.json`` document; ``where`` names the directory in errors.

        Raises
        ------
        AffinityFormatError
            Another format version (with how to rebuild), a missing key or a bad value.
        """
        if not isinstance(d, dict):
            raise AffinityFormatError(f"the manifest of {where!r} is not a JSON object; {_rebuild_hint(where)}")
        version = d.get("format_version")
        if version != schema.FORMAT_VERSION:
            raise AffinityFormatError(
                f"affinity directory {where!r} has format_version {version!r}; this version reads "
                f"format_version {schema.FORMAT_VERSION} (edges grouped by head bucket, so that each training "
                f"worker reads only its own edges); {_rebuild_hint(where)}"
            )
        files = d.get("files")
        missing = [key for key in ("n", "input_dim", "dim", "k", "perplexities", "edge_buckets") if key not in d]
        if not isinstance(files, dict) or "features" not in files or "edges" not in files:
            missing.append("files.features/files.edges")
        if missing:
            raise AffinityFormatError(f"the manifest of {where!r} lacks {', '.join(missing)}; {_rebuild_hint(where)}")
        try:
            features = tuple(DataFile(str(e["path"]), int(e["rows"]), e.get("sha256"), e.get("bytes"))
                             for e in files["features"])
            edges = tuple(
                EdgesFile(str(e["path"]), int(e["rows"]), e.get("sha256"), e.get("bytes"),
                          int(e["head_start"]), int(e["head_stop"]),
                          tuple(RowGroup(int(b), int(r)) for b, r in e["row_groups"]))
                for e in files["edges"]
            )
            pca = files.get("pca") or []
            pca_file = DataFile(str(pca[0]["path"]), 0, pca[0].get("sha256")) if pca else None
            known = {f.name for f in fields(cls)} - {"features", "edges", "pca_file", "extra"}
            kwargs = {k: d[k] for k in known if k in d}
            extra = {k: v for k, v in d.items() if k not in known and k not in ("format_version", "files", "pca")}
            return cls(features=features, edges=edges, pca_file=pca_file, extra=extra, **kwargs)
        except AffinityFormatError as exc:
            raise AffinityFormatError(f"the manifest of {where!r} is inconsistent: {exc}; {_rebuild_hint(where)}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise AffinityFormatError(
                f"the manifest of {where!r} has a malformed file entry ({type(exc).__name__}: {exc}); "
                f"{_rebuild_hint(where)}"
            ) from None


def read_manifest(location: str | os.PathLike) -> dict | None:
    """The raw ``manifest.json`` of an affinity directory (any format version), or None when there is none.

    For checks that must not fail on an older directory (is it up to date, which
    ``config_hash``); read the directory itself through :class:`AffinityDir`.
    """
    fs, path = storage.resolve(location)
    manifest = storage.read_json(fs, storage.join(path, schema.MANIFEST_FILE))
    return manifest if manifest is None or isinstance(manifest, dict) else None


# --------------------------------------------------------------------------- writing edges


def write_edges_file(
    fs, path: str, head: np.ndarray, tail: np.ndarray, weight: np.ndarray,
    num_buckets: int = schema.EDGE_BUCKETS,
) -> dict:
    """Write one edges file: a row group per head bucket, rows sorted by ``(bucket, head, tail)``.

    Parameters
    ----------
    fs, path : where (written whole or not at all, see :func:`pipeline.storage.parquet_writer`).
    head, tail, weight : arrays (E,)
        Sorted by ``(head, tail)``; int64, int64, float32 in the file.
    num_buckets : int

    Returns
    -------
    dict
        ``rows``, ``sha256``, ``bytes`` and ``row_groups`` (``[[bucket, rows], ...]`` in file order).
    """
    head = np.asarray(head, dtype=np.int64)
    if head.size and np.any(head[1:] < head[:-1]):
        raise ValueError("write_edges_file: head must be sorted (ascending)")
    # Runs of one head; bucket order of the runs (stable: heads ascending inside a bucket).
    starts = np.flatnonzero(np.r_[True, head[1:] != head[:-1]]) if head.size else np.zeros(0, np.int64)
    counts = np.diff(np.r_[starts, head.size])
    bucket = schema.bucket_of(head[starts], num_buckets)
    order = np.argsort(bucket, kind="stable")
    bounds = np.searchsorted(bucket[order], np.arange(num_buckets + 1))
    groups = []
    with storage.parquet_writer(fs, path, schema.EDGES_SCHEMA) as sink:
        for b in np.flatnonzero(np.diff(bounds)):
            runs = order[bounds[b]:bounds[b + 1]]
            idx = _ranges(starts[runs], counts[runs])
            sink.write(schema.edges_table(head[idx], np.asarray(tail)[idx], np.asarray(weight)[idx]),
                       row_group_size=max(1, idx.size))
            groups.append([int(b), int(idx.size)])
    return {"rows": int(head.size), "sha256": sink.sha256, "bytes": int(sink.bytes), "row_groups": groups}


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + c) for s, c in zip(starts, counts)])`` without the loop (int64)."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    offsets = np.arange(total, dtype=np.int64)
    offsets -= np.repeat(np.cumsum(counts) - counts, counts)
    offsets += np.repeat(np.asarray(starts, dtype=np.int64), counts)
    return offsets


# --------------------------------------------------------------------------- reading


@dataclass
class WorkerEdges:
    """The rows of P one training worker owns, as CSR, and what reading them cost.

    Attributes
    ----------
    rows : int64 (m,)
        The owned rows that have edges, ascending; local row ``i`` is ``rows[i]``.
    indptr : int64 (m + 1,)
        Local row ``i``'s edges are ``tail[indptr[i]:indptr[i + 1]]``.
    tail : int32 (E,), int64 when n >= 2**31
        Global row of each neighbour, ascending within a row.
    weight : float64 (E,)
        ``P_ij`` of each edge.
    bytes_read, bytes_total : int
        Compressed bytes of the row groups' column chunks read, and of every
        edges file's column chunks (what reading all edges would cost).
    row_groups_read, row_groups_total : int
    """

    rows: np.ndarray
    indptr: np.ndarray
    tail: np.ndarray
    weight: np.ndarray
    bytes_read: int
    bytes_total: int
    row_groups_read: int
    row_groups_total: int

    @property
    def n_edges(self) -> int:
        return int(self.tail.size)

    @property
    def nbytes(self) -> int:
        return int(self.rows.nbytes + self.indptr.nbytes + self.tail.nbytes + self.weight.nbytes)


def _chunk_sizes(md: pq.FileMetaData) -> list[dict[str, int]]:
    """Compressed bytes of each edge column chunk, per row group (from the footer)."""
    names = [md.schema.column(j).name for j in range(md.num_columns)]
    return [{names[j]: md.row_group(i).column(j).total_compressed_size for j in range(md.num_columns)
             if names[j] in _EDGE_COLUMNS} for i in range(md.num_row_groups)]


def index_dtype(n: int) -> np.dtype:
    """int32 for row indices of ``n < 2**31`` points, else int64."""
    return np.dtype(np.int32) if n < 2**31 else np.dtype(np.int64)


class AffinityDir:
    """An affinity directory on any filesystem, read through :mod:`pipeline.storage`.

    Parameters
    ----------
    location : str or path
        Local path or URI (``s3://bucket/prefix``, ``file://...``).
    manifest : AffinityManifest, optional
        Already read (a Ray worker gets the driver's); default: read and checked now.

    Raises
    ------
    FileNotFoundError
        No ``manifest.json`` at ``location``.
    AffinityFormatError
        Another format version (the message says how to rebuild) or a bad manifest.

    Pickles as its location and manifest; a worker resolves the filesystem again
    (credentials come from its own environment, never from the pickle).
    """

    def __init__(self, location: str | os.PathLike, manifest: AffinityManifest | None = None):
        self.location = os.fspath(location)
        self.fs, self.path = storage.resolve(self.location)
        if manifest is None:
            try:
                raw = storage.read_json(self.fs, storage.join(self.path, schema.MANIFEST_FILE))
            except ValueError as exc:  # not JSON
                raise AffinityFormatError(
                    f"the manifest of {self.location!r} is not valid JSON ({exc}); {_rebuild_hint(self.location)}"
                ) from None
            if raw is None:
                raise FileNotFoundError(
                    f"no {schema.MANIFEST_FILE} in affinity directory {self.location!r} "
                    "(build one with `ptsne affinities`)"
                )
            manifest = AffinityManifest.from_dict(raw, self.location)
        elif not isinstance(manifest, AffinityManifest):
            raise TypeError(f"AffinityDir: manifest must be an AffinityManifest, got {type(manifest).__name__}")
        self.manifest = manifest

    def __reduce__(self):
        return (AffinityDir, (self.location, self.manifest))

    def __repr__(self) -> str:
        return f"AffinityDir({self.location!r}, n={self.manifest.n}, dim={self.manifest.dim})"

    @property
    def uri(self) -> str:
        """The directory as one comparable string: an absolute local path or ``scheme://path``."""
        return storage.uri(self.fs, self.path)

    def file_path(self, entry: DataFile | str) -> str:
        """Path of a listed file on :attr:`fs`."""
        rel = entry.path if isinstance(entry, DataFile) else str(entry)
        return storage.join(self.path, rel)

    def check_files(self) -> None:
        """Raise :class:`FileNotFoundError` naming the listed files that are missing."""
        m = self.manifest
        entries = [*m.features, *m.edges, *([m.pca_file] if m.pca_file else [])]
        infos = self.fs.get_file_info([self.file_path(e) for e in entries])
        missing = [e.path for e, i in zip(entries, infos) if i.type == pafs.FileType.NotFound]
        if missing:
            raise FileNotFoundError(
                f"affinity directory {self.location!r}: {len(missing)} file(s) listed in the manifest are "
                f"missing, e.g. {missing[:3]}; {_rebuild_hint(self.location)}"
            )

    def _open(self, stack: contextlib.ExitStack, entry: DataFile) -> pq.ParquetFile:
        """A Parquet reader of a listed file, closed with ``stack``."""
        return pq.ParquetFile(stack.enter_context(self.fs.open_input_file(self.file_path(entry))))

    # -- features ---------------------------------------------------------------------------

    def read_features_file(self, entry: DataFile | int, columns: Sequence[str] | None = None) -> pa.Table:
        """One features file (``entry`` or its index in ``manifest.features``); absent columns are left out."""
        entry = self.manifest.features[entry] if isinstance(entry, (int, np.integer)) else entry
        with self.fs.open_input_file(self.file_path(entry)) as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            cols = None if columns is None else [c for c in columns if c in names]
            return pf.read(columns=cols)

    def iter_features(self, batch_rows: int = FEATURE_BATCH_ROWS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(rows int64 (b,), vectors float32 (b, dim))`` batches of every features file, in file order."""
        for entry in self.manifest.features:
            with self.fs.open_input_file(self.file_path(entry)) as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=[schema.ROW, schema.VECTOR]):
                    rows = batch.column(schema.ROW).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
                    yield rows, schema.arrow_to_vectors(batch.column(schema.VECTOR))

    def read_features(self, columns: Sequence[str] | None = None) -> pa.Table:
        """Every features file as one table, in row order (small data and tests)."""
        return pa.concat_tables([self.read_features_file(e, columns) for e in self.manifest.features])

    def features_array(self) -> np.ndarray:
        """The whole features array, float32 ``(n, dim)``, row ``r`` at index ``r``."""
        n, dim = self.manifest.n, self.manifest.dim
        X = np.empty((n, dim), dtype=np.float32)
        seen = np.zeros(n, dtype=bool)
        for rows, vectors in self.iter_features():
            if rows.size and (rows.min() < 0 or rows.max() >= n):
                raise AffinityFormatError(f"{self.location!r}: a features row lies outside [0, {n})")
            if vectors.shape[1] != dim:
                raise AffinityFormatError(f"{self.location!r}: features of dimension {vectors.shape[1]}, manifest dim {dim}")
            X[rows] = vectors
            seen[rows] = True
        if not seen.all():
            raise AffinityFormatError(f"{self.location!r}: {int((~seen).sum())} of {n} rows are missing from the features")
        return X

    # -- edges ------------------------------------------------------------------------------

    def read_edges(self) -> Edges:
        """Every edge, sorted by ``(head, tail)``: int64 head and tail, float32 weight (small data)."""
        heads, tails, weights = [], [], []
        for entry in self.manifest.edges:
            with contextlib.ExitStack() as stack:
                pf = self._open(stack, entry)
                self._check_row_groups(entry, pf)
                t = pf.read(columns=list(_EDGE_COLUMNS))
            h = t.column(schema.HEAD).to_numpy().astype(np.int64, copy=False)
            order = np.argsort(h, kind="stable")  # rows are whole and tail-sorted inside each row group
            heads.append(h[order])
            tails.append(t.column(schema.TAIL).to_numpy().astype(np.int64, copy=False)[order])
            weights.append(t.column(schema.WEIGHT).to_numpy().astype(np.float32, copy=False)[order])
        return Edges(np.concatenate(heads), np.concatenate(tails), np.concatenate(weights))

    def read_worker_edges(self, rank: int, world_size: int) -> WorkerEdges:
        """The rows of P that worker ``rank`` of ``world_size`` owns (``schema.bucket_of(row, world_size) == rank``).

        When ``world_size`` divides ``manifest.edge_buckets`` only the row groups
        of the owned buckets are read (about ``1 / world_size`` of the edges);
        otherwise every row group is read and filtered. Two passes over the
        chosen row groups, the ``head`` column first and then ``tail`` and
        ``weight``, so that the result is preallocated and filled in place: the
        peak while reading is the result (12 bytes per edge, plus 24 per row)
        plus one row group. Rows come out ascending and each row's tails in file
        order, so the result depends on P and the worker count only, not on
        how the edges were split into files.
        """
        for name, v, low in (("world_size", world_size, 1), ("rank", rank, 0)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
                raise ValueError(f"read_worker_edges: {name} must be an integer >= {low}, got {v!r}")
        if rank >= world_size:
            raise ValueError(f"read_worker_edges: rank must be < world_size={world_size}, got {rank}")
        m = self.manifest
        direct = m.edge_buckets % world_size == 0
        if not direct:
            log.info("edges: %d workers do not divide the %d edge buckets; worker %d reads every row group "
                     "and keeps the rows it owns", world_size, m.edge_buckets, rank)
        cost = {"read": 0, "total": 0, "groups": 0}
        # Pass 1: the heads of the chosen row groups -> the owned rows, their edge counts and places.
        chosen = []  # (file index, row group, run starts, run counts), file by file
        heads, counts = [], []
        for fi, entry in enumerate(m.edges):
            with contextlib.ExitStack() as stack:
                pf = self._open(stack, entry)
                md = self._check_row_groups(entry, pf)
                sizes = _chunk_sizes(md)
                cost["groups"] += md.num_row_groups
                cost["total"] += sum(sum(s.values()) for s in sizes)
                for gi, group in enumerate(entry.row_groups):
                    if group.rows == 0 or (direct and group.bucket % world_size != rank):
                        continue
                    h = pf.read_row_group(gi, columns=[schema.HEAD]).column(0).to_numpy()
                    cost["read"] += sizes[gi][schema.HEAD]
                    starts = np.flatnonzero(np.r_[True, h[1:] != h[:-1]])
                    run_heads = h[starts].astype(np.int64, copy=False)
                    mine = schema.bucket_of(run_heads, world_size) == rank
                    if direct and not mine.all():
                        raise AffinityFormatError(
                            f"{self.location!r}: row group {gi} of {entry.path!r} is listed as bucket "
                            f"{group.bucket} but holds heads of other buckets; {_rebuild_hint(self.location)}"
                        )
                    if mine.any():
                        run_counts = np.diff(np.r_[starts, h.size])
                        chosen.append((fi, gi, starts[mine], run_counts[mine]))
                        heads.append(run_heads[mine])
                        counts.append(run_counts[mine])
        run_heads = np.concatenate(heads) if heads else np.zeros(0, np.int64)
        run_counts = np.concatenate(counts).astype(np.int64) if counts else np.zeros(0, np.int64)
        del heads, counts
        order = np.argsort(run_heads, kind="stable")
        rows = run_heads[order]
        if rows.size > 1 and np.any(rows[1:] == rows[:-1]):
            dup = int(rows[1:][rows[1:] == rows[:-1]][0])
            raise AffinityFormatError(
                f"{self.location!r}: the edges of row {dup} lie in more than one row group; "
                f"{_rebuild_hint(self.location)}"
            )
        indptr = np.zeros(rows.size + 1, dtype=np.int64)
        np.cumsum(run_counts[order], out=indptr[1:])
        dest = np.empty(rows.size, dtype=np.int64)  # where each run goes, in pass-1 order
        dest[order] = indptr[:-1]
        del order, run_heads, run_counts
        # Pass 2: tails and weights of the same row groups, straight into their place.
        tail = np.empty(int(indptr[-1]), dtype=index_dtype(m.n))
        weight = np.empty(int(indptr[-1]), dtype=np.float64)
        at = 0
        for fi, group in itertools.groupby(chosen, key=lambda c: c[0]):
            with contextlib.ExitStack() as stack:
                pf = self._open(stack, m.edges[fi])
                sizes = _chunk_sizes(pf.metadata)
                for _, gi, starts, cnt in group:
                    t = pf.read_row_group(gi, columns=[schema.TAIL, schema.WEIGHT])
                    cost["read"] += sizes[gi][schema.TAIL] + sizes[gi][schema.WEIGHT]
                    src = _ranges(starts, cnt)
                    dst = _ranges(dest[at:at + cnt.size], cnt)
                    at += cnt.size
                    tail[dst] = t.column(schema.TAIL).to_numpy()[src]
                    weight[dst] = t.column(schema.WEIGHT).to_numpy()[src]
                    del t, src, dst
        return WorkerEdges(rows, indptr, tail, weight, cost["read"], cost["total"], len(chosen), cost["groups"])

    def _check_row_groups(self, entry: EdgesFile, pf: pq.ParquetFile):
        md = pf.metadata
        got = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        if got != [g.rows for g in entry.row_groups] or pf.schema_arrow.names[:3] != list(_EDGE_COLUMNS):
            raise AffinityFormatError(
                f"{self.location!r}: edges file {entry.path!r} has row groups of {got[:5]} rows and columns "
                f"{pf.schema_arrow.names}, the manifest lists {[g.rows for g in entry.row_groups][:5]}; the "
                f"directory changed after it was written; {_rebuild_hint(self.location)}"
            )
        return md

    # -- PCA --------------------------------------------------------------------------------

    def load_pca(self) -> PCA | None:
        """The PCA applied before the features were stored, or None."""
        if self.manifest.pca_file is None:
            return None
        return load_pca(self.fs, self.file_path(self.manifest.pca_file))


def manifest_json(manifest: AffinityManifest) -> bytes:
    """The bytes of ``manifest.json``."""
    return json.dumps(manifest.to_dict(), indent=2).encode()
