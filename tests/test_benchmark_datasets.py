"""The benchmark data generators (benchmarks/datasets.py): shapes, seeds, row ranges, and what each row is."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import datasets as D

IDENTITY = D.DeformConfig(rotation_deg=0.0, scale=(1.0, 1.0), shear=0.0, shift_px=0.0, elastic_alpha=0.0)
SMALL_CELLS = D.ScrnaConfig(n_genes=300)


@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    """Distinct random 28x28 'digits' standing in for MNIST: 40 train and 15 test images."""
    rng = np.random.default_rng(7)
    images = (rng.random((55, 28, 28)) < 0.2).astype(np.uint8) * rng.integers(1, 256, (55, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 55)
    return {"X_train": images[:40], "y_train": labels[:40], "X_test": images[40:], "y_test": labels[40:]}


def test_deformed_mnist_shapes_dtypes_and_labels(digits):
    Xtr, ytr, Xte, yte = D.deformed_mnist(70, 30, seed=1, mnist=digits)
    assert Xtr.shape == (70, 784) and Xte.shape == (30, 784)
    assert Xtr.dtype == Xte.dtype == np.float32 and ytr.dtype == yte.dtype == np.int64
    assert Xtr.min() >= 0 and Xtr.max() <= 1 and Xtr.max() > 0.5
    assert set(ytr) <= set(digits["y_train"]) and set(yte) <= set(digits["y_test"])


def test_deformed_mnist_is_fixed_by_the_seed(digits):
    a, b, c = (D.deformed_mnist(50, 10, seed=s, mnist=digits) for s in (3, 3, 4))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])


def test_deformed_rows_equal_the_same_rows_of_the_whole(digits):
    # Across a block boundary, and a small set is the first rows of a larger one.
    X, y = D.deformed_mnist_rows(digits["X_train"], digits["y_train"], 0, D.IMAGE_BLOCK + 40, 5, "train")
    part, part_y = D.deformed_mnist_rows(digits["X_train"], digits["y_train"], D.IMAGE_BLOCK - 10,
                                         D.IMAGE_BLOCK + 25, 5, "train")
    np.testing.assert_array_equal(part, X[D.IMAGE_BLOCK - 10:D.IMAGE_BLOCK + 25])
    np.testing.assert_array_equal(part_y, y[D.IMAGE_BLOCK - 10:D.IMAGE_BLOCK + 25])
    small = D.deformed_mnist(20, 5, seed=5, mnist=digits)
    np.testing.assert_array_equal(small[0], X[:20])


def test_without_deformation_each_row_is_its_source_image_and_the_splits_do_not_mix(digits):
    Xtr, ytr, Xte, yte = D.deformed_mnist(80, 30, seed=2, mnist=digits, config=IDENTITY)
    train = digits["X_train"].reshape(40, -1) / np.float32(255)
    test = digits["X_test"].reshape(15, -1) / np.float32(255)
    # The first 40 rows use every train image once; every test row is a test image.
    match = np.abs(Xtr[:40, None] - train[None]).max(axis=2) < 1e-5
    assert (match.sum(axis=1) == 1).all() and (match.sum(axis=0) == 1).all()
    np.testing.assert_array_equal(ytr[:40], digits["y_train"][match.argmax(axis=1)])
    test_match = np.abs(Xte[:, None] - test[None]).max(axis=2) < 1e-5
    assert (test_match.sum(axis=1) == 1).all()
    np.testing.assert_array_equal(yte, digits["y_test"][test_match.argmax(axis=1)])
    assert not (np.abs(Xte[:, None] - train[None]).max(axis=2) < 1e-5).any()


def test_deformation_keeps_the_ink_and_moves_it(digits):
    X, _ = D.deformed_mnist_rows(digits["X_train"], digits["y_train"], 0, 40, 0, "train")
    # Each deformed row differs from its source, but the ink (area scale 0.72-1.32) stays close.
    perm = np.random.default_rng([0, 1, 0]).permutation(40)
    src = digits["X_train"][perm].reshape(40, -1) / 255.0
    assert (np.abs(X - src).max(axis=1) > 0.1).all()
    ratio = X.sum(axis=1) / src.sum(axis=1)
    assert 0.6 < ratio.min() and ratio.max() < 1.5


def test_smoothing_matrix_is_the_gaussian_filter():
    from scipy.ndimage import gaussian_filter
    import torch

    K, radius = D._smoothing_matrix(4.0, 28)
    field = np.random.default_rng(0).random((28 + 2 * radius,) * 2).astype(np.float32)
    ours = (K @ torch.from_numpy(field) @ K.T).numpy()
    ref = gaussian_filter(field.astype(np.float64), 4.0, truncate=radius / 4.0)[radius:-radius, radius:-radius]
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_scrna_shapes_normalisation_and_labels():
    Xtr, ytr, Xte, yte = D.scrna(300, 100, seed=0)
    assert Xtr.shape == (300, 2000) and Xte.shape == (100, 2000)
    assert Xtr.dtype == np.float32 and ytr.dtype == np.int64
    assert set(ytr) <= set(range(D.ScrnaConfig().n_paths)) and len(set(ytr)) > D.ScrnaConfig().n_paths // 2
    assert Xtr.min() == 0
    # log1p(CP10k): the counts of every cell sum to 10,000.
    np.testing.assert_allclose(np.expm1(Xtr.astype(np.float64)).sum(axis=1), 1e4, rtol=1e-4)
    zeros = (Xtr == 0).mean()
    assert 0.3 < zeros < 0.95  # sparse like droplet data, not empty


def test_scrna_is_fixed_by_the_seed_and_rows_equal_the_whole():
    model = D.scrna_model(3, SMALL_CELLS)
    X, y, t = D.scrna_rows(model, 0, D.CELL_BLOCK + 50, 3, "train", pseudotime=True)
    part, part_y = D.scrna_rows(model, D.CELL_BLOCK - 20, D.CELL_BLOCK + 30, 3, "train")
    np.testing.assert_array_equal(part, X[D.CELL_BLOCK - 20:D.CELL_BLOCK + 30])
    np.testing.assert_array_equal(part_y, y[D.CELL_BLOCK - 20:D.CELL_BLOCK + 30])
    assert t.dtype == np.float32 and 0 <= t.min() and t.max() < 1
    again = D.scrna(40, 10, seed=3, config=SMALL_CELLS)
    np.testing.assert_array_equal(again[0], X[:40])
    other = D.scrna(40, 10, seed=4, config=SMALL_CELLS)
    assert not np.array_equal(other[0], again[0])
    assert not np.array_equal(again[2], again[0][:10])  # the test split is its own cells


def test_counts_are_negative_binomial_with_the_gene_dispersion():
    cfg = D.ScrnaConfig(n_genes=50, parents=(-1,), path_probs=(1.0,), de_prob=0.0)
    model = D.scrna_model(1, cfg)
    counts, _, _ = D.simulate_cells(model, 20000, np.random.default_rng(0))
    # No change along the path: the mean of a gene is its share of each cell's library.
    share = np.exp(model.start[0]) / np.exp(model.start[0]).sum()
    lib_mean = np.exp(cfg.lib_loc + cfg.lib_scale**2 / 2)
    top = np.argsort(share)[-5:]
    np.testing.assert_allclose(counts[:, top].mean(axis=0), share[top] * lib_mean, rtol=0.03)
    # Variance: Poisson + dispersion (gene) + library size variation (lognormal).
    m = share[top] * lib_mean
    lib_cv2 = np.exp(cfg.lib_scale**2) - 1
    expected = m + m**2 * ((1 + model.dispersion[top]) * (1 + lib_cv2) - 1)
    np.testing.assert_allclose(counts[:, top].var(axis=0), expected, rtol=0.1)


@pytest.mark.parametrize("call, message", [
    (lambda: D.scrna(0, 10), "n_train must be an integer >= 1, got 0"),
    (lambda: D.scrna_rows(D.scrna_model(0, SMALL_CELLS), 0, 10, 0, "val"), "split must be one of"),
    (lambda: D.scrna_rows(D.scrna_model(0, SMALL_CELLS), 5, 2, 0, "train"), "stop must be >= start"),
    (lambda: D.ScrnaConfig(parents=(-1, 2)), r"parents\[1\] must be -1 or an earlier path"),
    (lambda: D.DeformConfig(scale=(1.2, 1.0)), "scale must be"),
    (lambda: D.make("cifar", 10, 10), "data set must be one of"),
])
def test_bad_values_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_mnist_path_is_asked_for(monkeypatch, tmp_path):
    monkeypatch.delenv(D.MNIST_ENV, raising=False)
    with pytest.raises(ValueError, match="pass --mnist PATH"):
        D.load_mnist_digits(None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.load_mnist_digits(tmp_path / "none.npz")
    np.savez(tmp_path / "m.npz", X_train=np.zeros((2, 784), np.uint8))
    with pytest.raises(ValueError, match="lacks the keys"):
        D.load_mnist_digits(tmp_path / "m.npz")


def test_cli_writes_an_npz_that_round_trips(tmp_path):
    out = tmp_path / "cells.npz"
    assert D.main(["scrna", "--n-train", "30", "--n-test", "10", "--seed", "2", "--out", str(out)]) == 0
    with np.load(out) as d:
        ref = D.scrna(30, 10, seed=2)
        for key, value in zip(("X_train", "y_train", "X_test", "y_test"), ref):
            np.testing.assert_array_equal(d[key], value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.npz"]
