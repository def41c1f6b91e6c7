import numpy as np
import pytest
from sklearn.manifold import trustworthiness as sk_trustworthiness
from sklearn.neighbors import KNeighborsClassifier

from ptsne.metrics import knn_accuracy, knn_recall, trustworthiness


@pytest.mark.parametrize("k", [1, 5, 12])
def test_trustworthiness_matches_sklearn(rng, k):
    X = rng.normal(size=(400, 10))
    Y = X[:, :2] + 0.5 * rng.normal(size=(400, 2))
    assert trustworthiness(X, Y, k) == pytest.approx(sk_trustworthiness(X, Y, n_neighbors=k), abs=1e-9)


def test_trustworthiness_of_identity_is_one(rng):
    X = rng.normal(size=(300, 3))
    assert trustworthiness(X, X, 10) == pytest.approx(1.0)


@pytest.mark.parametrize("k", [1, 10])
def test_knn_accuracy_matches_sklearn(rng, k):
    Ytr = rng.normal(size=(500, 2))
    ytr = (Ytr[:, 0] > 0).astype(int) + 2 * (rng.random(500) < 0.1)
    Yte = rng.normal(size=(200, 2))
    yte = (Yte[:, 0] > 0).astype(int)
    clf = KNeighborsClassifier(n_neighbors=k).fit(Ytr, ytr)
    expected = (clf.predict(Yte) == yte).mean()
    # Vote ties may break differently; they are rare with continuous data.
    assert knn_accuracy(Ytr, ytr, Yte, yte, k) == pytest.approx(expected, abs=0.011)


def test_knn_recall_bounds(rng):
    X = rng.normal(size=(300, 5))
    assert knn_recall(X, X, 10) == pytest.approx(1.0)
    shuffled = X[rng.permutation(300)]
    assert knn_recall(X, shuffled[:, :2], 10) < 0.2


def test_knn_recall_matches_bruteforce(rng):
    X = rng.normal(size=(200, 6))
    Y = X[:, :2]
    def nn(A):
        d = ((A[:, None] - A[None]) ** 2).sum(-1)
        np.fill_diagonal(d, np.inf)
        return np.argsort(d, axis=1)[:, :7]
    a, b = nn(X), nn(Y)
    expected = np.mean([len(set(a[i]) & set(b[i])) / 7 for i in range(200)])
    assert knn_recall(X, Y, 7) == pytest.approx(expected)


def test_metric_validation(rng):
    X = rng.normal(size=(50, 3))
    with pytest.raises(ValueError, match="same number of rows"):
        trustworthiness(X, X[:40], 5)
    with pytest.raises(ValueError, match="k must be"):
        knn_recall(X, X, 0)
    with pytest.raises(ValueError, match="k must be"):
        knn_accuracy(X, np.zeros(50), X, np.zeros(50), 100)
