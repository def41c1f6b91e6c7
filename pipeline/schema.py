"""Column names, Arrow types and array conversions of the pipeline's Parquet files.

The affinity directory (see ``docs/pipeline.md``; its manifest and reader are
:mod:`pipeline.affinity_dir`) holds two kinds of shards:

* ``features/part-*.parquet``: ``row`` int64 (dense ``0..n-1``), ``id`` (int64
  or string), ``vector`` ``fixed_size_list<float32>[dim]`` and optionally
  ``label``;
* ``edges/part-*.parquet``: ``head`` int64, ``tail`` int64, ``weight`` float32,
  one file per head range. Inside a file the edges are grouped by the *bucket*
  of their head (:func:`bucket_of`, a fixed hash of the row modulo
  :data:`EDGE_BUCKETS`): one Parquet row group per bucket, rows sorted by
  ``(bucket, head, tail)``, so every row of P lies whole in one row group and a
  training worker reads only the row groups of the buckets it owns.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

#: Version of the affinity directory layout written in ``manifest.json``
#: (2: edges grouped into one row group per head bucket).
FORMAT_VERSION = 2
#: Head buckets of the edges files: a multiple of many worker counts
#: (1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 16, 20, 24, 30, 40, 48, 60, 80, 120, 240),
#: each of which then reads only its own row groups.
EDGE_BUCKETS = 240

MANIFEST_FILE = "manifest.json"
FEATURES_DIR = "features"
EDGES_DIR = "edges"
PCA_FILE = "pca.safetensors"
REJECTS_FILE = "rejects.parquet"

ROW = "row"
ID = "id"
VECTOR = "vector"
LABEL = "label"
HEAD = "head"
TAIL = "tail"
WEIGHT = "weight"

EDGES_SCHEMA = pa.schema([(HEAD, pa.int64()), (TAIL, pa.int64()), (WEIGHT, pa.float32())])


def row_hash(rows: np.ndarray) -> np.ndarray:
    """A fixed 64-bit mix of each row index (the splitmix64 finaliser), uint64 of the same shape."""
    # uint64 arithmetic wraps, which is what the mix wants.
    z = np.asarray(rows, dtype=np.int64).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def bucket_of(rows: np.ndarray, num_buckets: int) -> np.ndarray:
    """``row_hash(rows) % num_buckets`` as int64: the edge bucket of a head, or the worker owning a row.

    For a ``w`` that divides ``num_buckets``, ``bucket_of(r, w) == bucket_of(r, num_buckets) % w``.
    """
    if isinstance(num_buckets, bool) or not isinstance(num_buckets, (int, np.integer)) or num_buckets < 1:
        raise ValueError(f"bucket_of: num_buckets must be an integer >= 1, got {num_buckets!r}")
    rows = np.asarray(rows, dtype=np.int64)
    if num_buckets == 1:
        return np.zeros(rows.shape, dtype=np.int64)
    return (row_hash(rows) % np.uint64(num_buckets)).astype(np.int64)


def vector_type(dim: int) -> pa.DataType:
    """``fixed_size_list<float32>[dim]``, the type of every stored vector column."""
    return pa.list_(pa.float32(), int(dim))


def part_name(index: int) -> str:
    """File name of shard ``index``: ``part-00000.parquet``."""
    return f"part-{int(index):05d}.parquet"


def vectors_to_arrow(X: np.ndarray) -> pa.FixedSizeListArray:
    """A float32 ``(n, dim)`` array as a ``fixed_size_list<float32>[dim]`` array."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"vectors must be 2-D (n, dim), got shape {X.shape}")
    return pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1), type=pa.float32()), X.shape[1])


def arrow_to_vectors(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A ``fixed_size_list`` column (no nulls) as a float32 ``(n, dim)`` array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if not pa.types.is_fixed_size_list(column.type):
        raise TypeError(f"expected a fixed_size_list column, got {column.type}")
    dim = column.type.list_size
    # ``values`` ignores the slice offset of the array; ``flatten`` honours it.
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(flat, dtype=np.float32).reshape(len(column), dim)


def features_table(
    rows: np.ndarray, ids: pa.Array, X: np.ndarray, labels: pa.Array | None = None
) -> pa.Table:
    """A features shard: ``row``, ``id``, ``vector`` and ``label`` when given."""
    cols = {
        ROW: pa.array(np.asarray(rows, dtype=np.int64)),
        ID: ids,
        VECTOR: vectors_to_arrow(X),
    }
    if labels is not None:
        cols[LABEL] = labels
    return pa.table(cols)


def edges_table(head: np.ndarray, tail: np.ndarray, weight: np.ndarray) -> pa.Table:
    """An edges shard with the :data:`EDGES_SCHEMA` types."""
    return pa.table(
        [
            pa.array(np.asarray(head, dtype=np.int64)),
            pa.array(np.asarray(tail, dtype=np.int64)),
            pa.array(np.asarray(weight, dtype=np.float32)),
        ],
        schema=EDGES_SCHEMA,
    )
