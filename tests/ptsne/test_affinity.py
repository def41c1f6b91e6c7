import math

import numpy as np
import pytest

from ptsne.affinity import (
    as_perplexities,
    calibrate,
    conditional_probabilities,
    default_k,
    joint_probabilities,
    symmetrize,
)
from ptsne.knn import knn_graph


def dense_reference_p(X, perplexity, k):
    """Dense joint P computed independently: bisection per row in float64 over exact kNN."""
    n = len(X)
    D = ((X[:, None, :].astype(np.float64) - X[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(D, np.inf)
    P = np.zeros((n, n))
    for i in range(n):
        nb = np.argsort(D[i], kind="stable")[:k]
        d = D[i, nb]
        lo, hi, beta = 0.0, np.inf, 1.0
        for _ in range(200):
            w = np.exp(-beta * (d - d.min()))
            p = w / w.sum()
            H = -(p * np.log(np.maximum(p, 1e-300))).sum()
            if abs(H - math.log(perplexity)) < 1e-10:
                break
            if H > math.log(perplexity):
                lo = beta
                beta = beta * 2 if hi == np.inf else (lo + hi) / 2
            else:
                hi = beta
                beta = (lo + hi) / 2
        P[i, nb] = p
    return (P + P.T) / (2 * n)


def test_joint_matches_dense_reference(rng):
    X = rng.normal(size=(120, 5))
    k = 30
    edges = joint_probabilities(knn_graph(X, n_neighbors=k, method="exact"), 10.0)
    P = edges.to_csr(120).toarray()
    ref = dense_reference_p(X, 10.0, k)
    np.testing.assert_allclose(P, ref, atol=1e-6, rtol=1e-4)


def test_joint_is_normalised_symmetric_without_self(rng):
    X = rng.normal(size=(200, 6))
    edges = joint_probabilities(knn_graph(X, n_neighbors=45, method="exact"), 15.0)
    P = edges.to_csr(200)
    assert P.sum() == pytest.approx(1.0, abs=1e-6)
    assert abs(P - P.T).max() < 1e-9
    assert P.diagonal().sum() == 0.0
    assert edges.head.dtype == np.int64 and edges.tail.dtype == np.int64
    assert edges.weight.dtype == np.float32


def test_calibration_hits_target_entropy(rng):
    d = np.sort(rng.gamma(2.0, size=(2000, 90)), axis=1)
    P, beta = calibrate(d, 30.0)
    P64 = P.astype(np.float64)
    H = -(P64 * np.log(np.maximum(P64, 1e-300))).sum(axis=1)
    # float32 storage of P adds ~1e-6 to the entropy error
    assert np.abs(H - math.log(30.0)).max() < 2e-5
    np.testing.assert_allclose(P.sum(axis=1), 1.0, atol=1e-5)
    assert (beta > 0).all()


def test_duplicate_rows_do_not_make_nan():
    d = np.zeros((4, 9))  # every neighbour at distance 0
    d[1, 5:] = 1.0  # five duplicates then farther points
    P, _ = calibrate(d, 3.0)
    assert np.isfinite(P).all()
    np.testing.assert_allclose(P[0], 1 / 9, rtol=1e-6)
    np.testing.assert_allclose(P.sum(axis=1), 1.0, atol=1e-6)


def test_multiscale_is_mean_of_scales(rng):
    d = np.sort(rng.gamma(2.0, size=(100, 60)), axis=1)
    multi = conditional_probabilities(d, [5.0, 20.0])
    single = (calibrate(d, 5.0)[0].astype(np.float64) + calibrate(d, 20.0)[0]) / 2
    np.testing.assert_allclose(multi, single, atol=1e-7)


def test_symmetrize_sums_both_directions():
    idx = np.array([[1], [0], [0]])
    P = np.ones((3, 1))
    e = symmetrize(idx, P)
    M = e.to_csr(3).toarray()
    expected = np.array([[0, 2, 1], [2, 0, 0], [1, 0, 0]]) / 6.0
    np.testing.assert_allclose(M, expected, atol=1e-7)


def test_default_k():
    assert default_k(30, 10_000) == 90
    assert default_k([10, 50], 10_000) == 150
    assert default_k(30, 50) == 49


@pytest.mark.parametrize("bad", [1.0, 0.5, -3, float("nan"), float("inf")])
def test_bad_perplexity_value(bad):
    with pytest.raises(ValueError, match="perplexity must be"):
        as_perplexities(bad)


@pytest.mark.parametrize("bad", ["30", [30, "x"], None])
def test_bad_perplexity_type(bad):
    with pytest.raises(TypeError, match="perplexity"):
        as_perplexities(bad)


def test_unreachable_perplexity():
    with pytest.raises(ValueError, match="cannot be reached with k=10"):
        calibrate(np.ones((3, 10)), 30.0)
