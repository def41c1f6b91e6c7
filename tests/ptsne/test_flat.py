"""The exact torch search (the GPU search beside a CPU build of FAISS), run on CPU tensors against FAISS."""

import faiss
import numpy as np
import pytest
import torch

from ptsne import flat
from ptsne.flat import TorchFlatIndex, smallest_by_id
from ptsne.knn import search


def faiss_flat(X):
    index = faiss.IndexFlatL2(X.shape[1])
    index.add(X)
    return index


def torch_flat(X, tile_bytes=flat.TILE_BYTES):
    index = TorchFlatIndex(X.shape[1], "cpu", tile_bytes=tile_bytes)
    index.add(X)
    return index


@pytest.mark.parametrize("tile_bytes", [flat.TILE_BYTES, 4 * 64 * 37])  # one tile; tiles of 37 data points
def test_search_equals_faiss_flat_search(rng, monkeypatch, tile_bytes):
    monkeypatch.setattr(flat, "QUERY_TILE", 64)  # several query tiles too
    X = rng.normal(size=(700, 16)).astype(np.float32)
    ids = np.arange(len(X))
    want = search(faiss_flat(X), X, 12, query_ids=ids)
    got = search(torch_flat(X, tile_bytes), X, 12, query_ids=ids)
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_allclose(got.distances, want.distances, rtol=1e-5, atol=1e-5)
    q = rng.normal(size=(30, 16)).astype(np.float32)  # queries that are not indexed points
    d_want, i_want = faiss_flat(X).search(q, 7)
    d_got, i_got = torch_flat(X, tile_bytes).search(q, 7)
    np.testing.assert_array_equal(i_got, i_want)
    np.testing.assert_allclose(d_got, d_want, rtol=1e-5, atol=1e-4)
    assert d_got.dtype == np.float32 and i_got.dtype == np.int64


@pytest.mark.parametrize("tile_bytes", [flat.TILE_BYTES, 4 * 300 * 11])
def test_ties_and_duplicates_are_ordered_by_id_as_faiss_orders_them(rng, tile_bytes):
    # 27 distinct points, each about 11 times: every row's distances tie, also at the k-th neighbour.
    X = rng.integers(0, 3, size=(300, 3)).astype(np.float32)
    ids = np.arange(len(X))
    want = search(faiss_flat(X), X, 10, query_ids=ids)
    got = search(torch_flat(X, tile_bytes), X, 10, query_ids=ids)
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_array_equal(got.distances, want.distances)
    assert not (got.indices == ids[:, None]).any()
    # The same order as a stable sort of the exact distances: equal distances by id.
    d = ((X[:, None, :].astype(np.float64) - X[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    np.testing.assert_array_equal(got.indices, np.argsort(d, axis=1, kind="stable")[:, :10])


def test_fewer_points_than_k_are_missing_as_in_faiss(rng):
    X = rng.normal(size=(5, 4)).astype(np.float32)
    d, i = torch_flat(X).search(X[:2], 8)
    d_want, i_want = faiss_flat(X).search(X[:2], 8)
    np.testing.assert_array_equal(i, i_want)
    assert (i[:, 5:] == -1).all() and np.isinf(d[:, 5:]).all()
    empty = TorchFlatIndex(4, "cpu")
    assert (empty.search(X, 3)[1] == -1).all() and empty.ntotal == 0


def test_add_appends_ids_and_reset_empties(rng):
    X = rng.normal(size=(60, 5)).astype(np.float32)
    index = TorchFlatIndex(5, "cpu")
    index.add(X[:25])
    index.add(torch.as_tensor(X[25:]))
    assert index.ntotal == 60
    np.testing.assert_array_equal(index.search(X[40:45], 1)[1][:, 0], np.arange(40, 45))
    index.reset()
    assert index.ntotal == 0


def test_smallest_by_id_resolves_boundary_ties_to_the_lowest_columns():
    d2 = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    vals, ids = smallest_by_id(d2, 3)
    assert ids.tolist() == [[4, 1, 2], [0, 1, 2]]
    assert vals.tolist() == [[0.0, 1.0, 1.0], [2.0, 2.0, 2.0]]


def test_bad_arguments_name_the_parameter(rng):
    with pytest.raises(ValueError, match="d must be >= 1, got 0"):
        TorchFlatIndex(0, "cpu")
    index = TorchFlatIndex(3, "cpu")
    with pytest.raises(ValueError, match=r"x must have shape \(n, 3\), got \(2, 4\)"):
        index.add(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        index.search(np.zeros((1, 3), np.float32), 0)


def test_the_search_leaves_the_float32_switches_as_they_were(rng):
    from ptsne.device import tf32_enabled

    before = tf32_enabled()
    torch_flat(rng.normal(size=(50, 4)).astype(np.float32)).search(np.zeros((3, 4), np.float32), 2)
    assert tf32_enabled() is before
