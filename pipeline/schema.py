"""Column names, Arrow types and array conversions of the pipeline's Parquet files.

The affinity directory (see ``docs/pipeline.md``) holds two kinds of shards:

* ``features/part-*.parquet``: ``row`` int64 (dense ``0..n-1``), ``id`` (int64
  or string), ``vector`` ``fixed_size_list<float32>[dim]`` and optionally
  ``label``;
* ``edges/part-*.parquet``: ``head`` int64, ``tail`` int64, ``weight`` float32.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

#: Version of the affinity directory layout written in ``manifest.json``.
FORMAT_VERSION = 1

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
