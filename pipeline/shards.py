"""Parquet shards on any pyarrow filesystem: listing, reading vectors, checks.

Input vectors come from one column (``fixed_size_list`` or ``list`` of numbers)
or from a set of numeric columns; ids from an int64 or string column, or, when
there is none, from the row's position in the input (shards in path order).
Files are written through :mod:`pipeline.storage`.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import schema
from pipeline.storage import StagedDir, join, resolve, write_parquet_atomic

log = logging.getLogger(__name__)

#: Ids of offending rows quoted in error messages.
MAX_REPORT = 5


class InvalidInputError(ValueError):
    """The input shards were rejected; nothing was written."""


# --------------------------------------------------------------------------- listing


def list_parquet(fs: pafs.FileSystem, path: str) -> list[str]:
    """Parquet files under ``path`` (or ``path`` itself), sorted, skipping hidden names.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    InvalidInputError
        ``path`` holds no ``.parquet`` file.
    """
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {path!r} does not exist")
    if info.type == pafs.FileType.File:
        return [path]
    files = []
    for f in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        rel = posixpath.relpath(f.path, path)
        hidden = any(p.startswith((".", "_")) for p in rel.split("/"))
        if f.type == pafs.FileType.File and f.path.endswith(".parquet") and not hidden:
            files.append(f.path)
    if not files:
        raise InvalidInputError(f"input {path!r} holds no .parquet files")
    return sorted(files)



# --------------------------------------------------------------------------- reading vectors


@dataclass(frozen=True)
class ColumnSpec:
    """Which columns hold the vectors, ids and labels.

    Parameters
    ----------
    vector_col : str or None
        One column of ``fixed_size_list`` or ``list`` of numbers.
    feature_cols : tuple of str or None
        Numeric scalar columns that together form the vector (instead of ``vector_col``).
    id_col : str or None
        int or string ids; ``None`` numbers rows by their position in the input.
    label_col : str or None
        Copied to the ``label`` column of the features.
    """

    vector_col: str | None = "vector"
    feature_cols: tuple[str, ...] | None = None
    id_col: str | None = None
    label_col: str | None = None

    def __post_init__(self) -> None:
        if (self.vector_col is None) == (self.feature_cols is None):
            raise ValueError(
                f"ColumnSpec: give exactly one of vector_col and feature_cols, got "
                f"vector_col={self.vector_col!r}, feature_cols={self.feature_cols!r}"
            )
        if self.feature_cols is not None:
            if isinstance(self.feature_cols, str) or not all(isinstance(c, str) for c in self.feature_cols):
                raise TypeError(f"ColumnSpec: feature_cols must be a list of column names, got {self.feature_cols!r}")
            if len(self.feature_cols) == 0:
                raise ValueError("ColumnSpec: feature_cols is empty; name at least one column")
            object.__setattr__(self, "feature_cols", tuple(self.feature_cols))
        for name in ("vector_col", "id_col", "label_col"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise TypeError(f"ColumnSpec: {name} must be a column name or None, got {value!r}")

    @property
    def columns(self) -> list[str]:
        cols = [self.vector_col] if self.vector_col else list(self.feature_cols)
        cols += [c for c in (self.id_col, self.label_col) if c]
        return list(dict.fromkeys(cols))


@dataclass
class ShardData:
    """One input shard read by :func:`read_shard`.

    ``X`` float32 ``(rows, dim)`` (rows of ``bad`` hold garbage), ``bad`` bool
    ``(rows,)`` marks NaN/Inf/null vectors; ``errors`` lists fatal problems
    (then ``X`` may be ``None``). ``dims`` maps each vector length seen to its
    row count when lengths differ.
    """

    path: str
    rows: int
    X: np.ndarray | None
    bad: np.ndarray
    ids: pa.Array | None
    labels: pa.Array | None
    errors: list[str] = field(default_factory=list)
    dims: dict[int, int] = field(default_factory=dict)
    first_of_dim: dict[int, int] = field(default_factory=dict)

    @property
    def dim(self) -> int | None:
        return None if self.X is None or self.rows == 0 else int(self.X.shape[1])


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


def _list_vectors(col: pa.Array, name: str, data: ShardData) -> None:
    t = col.type
    if not _is_numeric(t.value_type):
        data.errors.append(f"vector column {name!r} holds non-numeric values ({t.value_type})")
        return
    n = len(col)
    if n == 0:  # empty shards are allowed
        data.X = np.zeros((0, t.list_size if pa.types.is_fixed_size_list(t) else 0), dtype=np.float32)
        return
    row_null = col.is_null().to_numpy(zero_copy_only=False)
    if pa.types.is_fixed_size_list(t):
        dim = t.list_size
        lengths = np.full(n, dim)
    else:
        lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False)
        present = lengths[~row_null]
        dim = int(present[0]) if present.size else 0
        if present.size and (present != dim).any():
            values, counts = np.unique(present, return_counts=True)
            data.dims = {int(v): int(c) for v, c in zip(values, counts)}
            pos = np.flatnonzero(~row_null)
            data.first_of_dim = {int(v): int(pos[np.argmax(present == v)]) for v in values}
            data.errors.append(
                f"vector column {name!r} mixes dimensions "
                + ", ".join(f"{c} rows of {v}" for v, c in data.dims.items())
            )
            return
    if dim == 0 and (~row_null).any():
        data.errors.append(f"vector column {name!r} holds zero-length vectors")
        return
    flat = col.flatten()
    value_null = flat.is_null().to_numpy(zero_copy_only=False)
    vals = pc.fill_null(flat, 0).to_numpy(zero_copy_only=False).astype(np.float32)
    # flatten() skips null rows, so the values fill the non-null rows in order.
    X = np.zeros((n, dim), dtype=np.float32)
    X[~row_null] = vals.reshape(-1, dim)
    bad_vals = np.zeros((n, dim), dtype=bool)
    bad_vals[~row_null] = value_null.reshape(-1, dim)
    data.X = X
    data.bad = row_null | bad_vals.any(axis=1) | ~np.isfinite(X).all(axis=1)


def _column_vectors(table: pa.Table, cols: Sequence[str], data: ShardData) -> None:
    n = table.num_rows
    X = np.empty((n, len(cols)), dtype=np.float32)
    bad = np.zeros(n, dtype=bool)
    for j, c in enumerate(cols):
        col = table.column(c)
        if not _is_numeric(col.type):
            data.errors.append(f"feature column {c!r} is not numeric ({col.type})")
            continue
        bad |= col.is_null().to_numpy(zero_copy_only=False)
        X[:, j] = pc.fill_null(col, 0).to_numpy(zero_copy_only=False).astype(np.float32)
    if data.errors:
        return
    data.X = X
    data.bad = bad | ~np.isfinite(X).all(axis=1)


def read_shard(fs: pafs.FileSystem, path: str, spec: ColumnSpec) -> ShardData:
    """Read one shard's vectors, ids and labels, recording every problem found.

    Problems that reject the whole input (missing or non-numeric columns, mixed
    dimensions, null or non-int/string ids) go to ``errors``; NaN/Inf/null
    vectors are flagged row by row in ``bad``.
    """
    data = ShardData(path=path, rows=0, X=None, bad=np.zeros(0, bool), ids=None, labels=None)
    try:
        schema = pq.read_schema(path, filesystem=fs)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, PermissionError, IsADirectoryError) as exc:
        # Not Parquet, or not readable by this user: retrying cannot help (other OSErrors are retried).
        data.errors.append(f"unreadable shard: {exc}")
        return data
    missing = [c for c in spec.columns if c not in schema.names]
    if missing:
        data.errors.append(f"missing column(s) {missing} (columns present: {schema.names})")
        return data
    try:
        table = pq.read_table(path, filesystem=fs, columns=spec.columns)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        data.errors.append(f"unreadable shard: {exc}")
        return data
    data.rows = table.num_rows
    data.bad = np.zeros(data.rows, dtype=bool)
    if spec.vector_col is not None:
        col = table.column(spec.vector_col)
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type):
            _list_vectors(col, spec.vector_col, data)
        elif _is_numeric(col.type) and data.rows:
            data.errors.append(
                f"vector column {spec.vector_col!r} is a scalar {col.type} column; "
                f"pass feature_cols to build vectors from scalar columns"
            )
        elif data.rows:
            data.errors.append(f"vector column {spec.vector_col!r} holds non-numeric values ({col.type})")
    else:
        _column_vectors(table, spec.feature_cols, data)
    if data.X is None and not data.errors:
        data.X = np.zeros((0, 0), dtype=np.float32)
    if spec.id_col is not None:
        ids = table.column(spec.id_col).combine_chunks()
        if pa.types.is_integer(ids.type):
            ids = ids.cast(pa.int64())
        elif pa.types.is_large_string(ids.type):
            ids = ids.cast(pa.string())
        elif not pa.types.is_string(ids.type):
            data.errors.append(f"id column {spec.id_col!r} must be integer or string, got {ids.type}")
        if ids.null_count:
            data.errors.append(f"id column {spec.id_col!r} has {ids.null_count} null ids")
        data.ids = ids
    if spec.label_col is not None:
        data.labels = table.column(spec.label_col).combine_chunks()
    return data


def row_ids(data: ShardData, offset: int) -> pa.Array:
    """The shard's ids: the id column, or ``offset + position`` when there is none."""
    if data.ids is not None:
        return data.ids
    return pa.array(np.arange(offset, offset + data.rows, dtype=np.int64))


def duplicate_ids(ids: pa.Array, limit: int = MAX_REPORT) -> tuple[int, list]:
    """Number of ids that occur more than once and the first few of them."""
    if len(ids) == 0:
        return 0, []
    if pa.types.is_integer(ids.type):
        values = ids.to_numpy(zero_copy_only=False)
        uniq, counts = np.unique(values, return_counts=True)
        dup = uniq[counts > 1]
        return int(dup.size), dup[:limit].tolist()
    counts = pc.value_counts(ids)
    dup = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    return len(dup), dup[:limit].to_pylist()


# --------------------------------------------------------------------------- importing arrays

#: Keys tried, in order, for the vectors and labels of an ``.npz`` file.
NPZ_X_KEYS = ("X", "x", "data", "X_train", "x_train")
NPZ_Y_KEYS = ("y", "labels", "label", "target", "y_train")


def _as_matrix(X: np.ndarray, source: str) -> np.ndarray:
    if X.dtype == object or not (np.issubdtype(X.dtype, np.number) or X.dtype == bool):
        raise InvalidInputError(f"{source}: vectors must be numeric, got dtype {X.dtype}")
    if np.issubdtype(X.dtype, np.complexfloating):
        raise InvalidInputError(f"{source}: vectors must be real numbers, got dtype {X.dtype}")
    if X.ndim < 2:
        raise InvalidInputError(f"{source}: vectors must be at least 2-D (n, dim), got shape {X.shape}")
    if X.shape[0] == 0:
        raise InvalidInputError(f"{source} has no rows (shape {X.shape}); give at least one vector")
    # Images (n, h, w[, c]) become flat vectors.
    return X.reshape(X.shape[0], -1)


def write_array_shards(
    output: str,
    X: np.ndarray,
    labels: np.ndarray | None = None,
    ids: np.ndarray | None = None,
    shard_rows: int = 100_000,
    overwrite: bool = False,
) -> list[dict]:
    """Write vectors (and labels, ids) as ``part-*.parquet`` shards of ``shard_rows`` rows.

    Columns: ``id`` (given ids, else the row number), ``vector``
    (fixed_size_list<float32>) and ``label`` when given.

    Returns
    -------
    list of dict
        ``path``, ``rows``, ``sha256`` of each shard.
    """
    if isinstance(shard_rows, bool) or not isinstance(shard_rows, (int, np.integer)) or shard_rows < 1:
        raise ValueError(f"shard_rows must be an integer >= 1, got {shard_rows!r}")
    X = _as_matrix(np.asarray(X), "X")
    n = X.shape[0]
    for name, arr in (("labels", labels), ("ids", ids)):
        if arr is not None and len(arr) != n:
            raise InvalidInputError(f"{name} has {len(arr)} rows but the vectors have {n}")
    fs, path = resolve(output)
    out = []
    with StagedDir(fs, path, overwrite=overwrite) as stage:
        for i, start in enumerate(range(0, max(n, 1), shard_rows)):
            stop = min(n, start + shard_rows)
            cols = {
                schema.ID: pa.array(ids[start:stop]) if ids is not None else pa.array(np.arange(start, stop, dtype=np.int64)),
                schema.VECTOR: schema.vectors_to_arrow(X[start:stop].astype(np.float32)),
            }
            if labels is not None:
                lab = np.asarray(labels[start:stop])
                cols[schema.LABEL] = pa.array(lab.astype(np.int64) if np.issubdtype(lab.dtype, np.integer) else lab)
            name = schema.part_name(i)
            sha = write_parquet_atomic(fs, join(stage, name), pa.table(cols))
            out.append({"path": name, "rows": stop - start, "sha256": sha})
    return out


def load_npy(path: str, x_key: str | None = None, y_key: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Vectors and labels of a ``.npy`` (vectors only) or ``.npz`` file.

    For ``.npz`` the first of :data:`NPZ_X_KEYS` / :data:`NPZ_Y_KEYS` present is
    used unless ``x_key`` / ``y_key`` name one (``y_key=""`` means no labels).
    """
    if path.endswith(".npy"):
        if y_key:
            raise ValueError(f"y_key={y_key!r} was given but a .npy file holds one array; use a .npz")
        return _as_matrix(np.load(path, mmap_mode="r", allow_pickle=False), path), None
    with np.load(path, allow_pickle=False) as d:
        keys = list(d.keys())
        xk = x_key or next((k for k in NPZ_X_KEYS if k in keys), None)
        if xk is None or xk not in keys:
            raise InvalidInputError(f"{path}: no vectors under {x_key or NPZ_X_KEYS} (keys: {keys}); pass x_key")
        if y_key == "":
            yk = None
        else:
            yk = y_key or next((k for k in NPZ_Y_KEYS if k in keys), None)
            if y_key and y_key not in keys:
                raise InvalidInputError(f"{path}: no labels under {y_key!r} (keys: {keys})")
        return _as_matrix(d[xk], f"{path}[{xk!r}]"), (d[yk] if yk else None)


def load_csv(
    path: str, label_col: str | None = None, id_col: str | None = None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Vectors (all columns but ``label_col`` / ``id_col``), labels and ids of a CSV with a header."""
    from pyarrow import csv

    try:
        table = csv.read_csv(path)
    except pa.ArrowInvalid as exc:
        raise InvalidInputError(f"{path}: not a readable CSV: {exc}") from exc
    for name, col in (("label_col", label_col), ("id_col", id_col)):
        if col is not None and col not in table.column_names:
            raise InvalidInputError(f"{path}: {name}={col!r} is not a column (columns: {table.column_names})")
    if table.num_rows == 0:
        raise InvalidInputError(f"{path} has no rows (only a header); give at least one vector")
    feats = [c for c in table.column_names if c not in (label_col, id_col)]
    if not feats:
        raise InvalidInputError(f"{path}: no feature columns besides the label and id")
    bad = [f"{c} ({table.column(c).type})" for c in feats if not _is_numeric(table.column(c).type)]
    if bad:
        raise InvalidInputError(f"{path}: non-numeric feature columns: {', '.join(bad)}")
    X = np.column_stack([pc.fill_null(table.column(c).cast(pa.float64()), np.nan).to_numpy() for c in feats])
    y = table.column(label_col).to_numpy(zero_copy_only=False) if label_col else None
    ids = table.column(id_col).to_numpy(zero_copy_only=False) if id_col else None
    return X, y, ids
