"""Arrow conversions of the pipeline's Parquet columns."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline import schema


def test_vectors_round_trip_through_fixed_size_lists(rng):
    X = rng.normal(size=(7, 5)).astype(np.float32)
    arr = schema.vectors_to_arrow(X)
    assert arr.type == schema.vector_type(5)
    np.testing.assert_array_equal(schema.arrow_to_vectors(arr), X)
    # A sliced array keeps its own rows (values ignore the slice offset).
    np.testing.assert_array_equal(schema.arrow_to_vectors(arr.slice(2, 3)), X[2:5])
    chunked = pa.chunked_array([arr.slice(0, 3), arr.slice(3)])
    np.testing.assert_array_equal(schema.arrow_to_vectors(chunked), X)


def test_conversions_reject_wrong_shapes_and_types():
    with pytest.raises(ValueError, match="2-D"):
        schema.vectors_to_arrow(np.zeros(3))
    with pytest.raises(TypeError, match="fixed_size_list"):
        schema.arrow_to_vectors(pa.array([[1.0], [2.0, 3.0]]))


def test_tables_have_the_contract_types(rng):
    X = rng.normal(size=(4, 3))
    t = schema.features_table(np.arange(4), pa.array(["a", "b", "c", "d"]), X, pa.array([0, 1, 0, 1]))
    assert t.column_names == ["row", "id", "vector", "label"]
    assert t.schema.field("vector").type == pa.list_(pa.float32(), 3)
    e = schema.edges_table(np.array([0, 1]), np.array([1, 0]), np.array([0.5, 0.5]))
    assert e.schema == schema.EDGES_SCHEMA
    assert schema.part_name(12) == "part-00012.parquet"
