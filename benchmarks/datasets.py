"""Benchmark data sets of any size, generated from a seed: deformed MNIST and simulated single-cell counts.

Two kinds of data, unlike each other, for judging t-SNE maps at sizes no stored set reaches:

* **deformed MNIST** (``deformed_mnist``), in the style of the infinite-MNIST generators:
  every row is an MNIST digit under a random affine map (rotation, scale, shear, shift) and a
  random elastic deformation (Simard et al. 2003: a uniform displacement field smoothed by a
  Gaussian and scaled by ``alpha``), resampled bilinearly with torch. Train rows come from the
  MNIST train digits and test rows from the MNIST test digits, so the splits never share a
  source image. Pixels in [0, 1], 784 columns; labels are the digits.
* **simulated scRNA-seq** (``scrna``), in the style of Splatter's path model: a tree of
  differentiation paths, genes whose log-means move along each path's pseudotime (linearly,
  and for some genes with a bump), per-cell library sizes, gamma-Poisson (negative binomial)
  counts with a per-gene dispersion, then ``log1p`` of counts per 10k. Labels are the path
  (branch) of each cell.

Rows are generated in blocks of fixed size, each block from a random stream seeded by
``(seed, split, block)``: any row range equals the same rows of the whole, a smaller data set
is the first rows of a larger one, and memory stays at the output plus one block.
Every function returns ``(X_train, y_train, X_test, y_test)``: ``X`` float32 ``(n, d)``,
``y`` int64 ``(n,)``.

    python benchmarks/datasets.py deformed-mnist --mnist mnist.npz --n-train 1000000 --out dm.npz
    python benchmarks/datasets.py scrna --n-train 200000 --out scrna.npz --preview scrna.png

The ``.npz`` it writes (``X_train``, ``y_train``, ``X_test``, ``y_test``) is what
``ptsne data import`` reads. MNIST is read from ``--mnist`` or ``$PTSNE_MNIST``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("benchmarks.datasets")

#: Environment variable naming the MNIST ``.npz`` (keys X_train, y_train, X_test, y_test).
MNIST_ENV = "PTSNE_MNIST"
#: Rows per random stream. Fixed, so a row's values do not depend on how many rows are asked for.
IMAGE_BLOCK = 2048
CELL_BLOCK = 1024
SPLITS = {"train": 1, "test": 2}
DATASETS = ("deformed-mnist", "scrna")


def _split_id(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    return SPLITS[split]


def _check_count(name: str, value, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _blocks(start: int, stop: int, block: int) -> Iterator[tuple[int, int, int]]:
    """``(block index, first row wanted in it, end of the rows wanted in it)``, block-relative, for rows [start, stop)."""
    for b in range(start // block, -(-stop // block)):
        lo, hi = b * block, (b + 1) * block
        yield b, max(start, lo) - lo, min(stop, hi) - lo


# --------------------------------------------------------------------------- deformed MNIST


@dataclass(frozen=True)
class DeformConfig:
    """Ranges of the random deformations; each image draws its own values uniformly.

    Parameters
    ----------
    rotation_deg : float
        Rotation in [-rotation_deg, rotation_deg] degrees.
    scale : tuple of float
        Isotropic scale in [scale[0], scale[1]].
    shear : float
        Horizontal shear factor in [-shear, shear].
    shift_px : float
        Translation in [-shift_px, shift_px] pixels along each axis.
    elastic_sigma : float
        Standard deviation, in pixels, of the Gaussian that smooths the displacement field.
    elastic_alpha : float
        Scale of the smoothed field (pixels per unit of the uniform [-1, 1] noise); 0 turns it off.
    """

    rotation_deg: float = 15.0
    scale: tuple[float, float] = (0.85, 1.15)
    shear: float = 0.3
    shift_px: float = 2.0
    elastic_sigma: float = 5.0
    elastic_alpha: float = 34.0

    def __post_init__(self) -> None:
        for name in ("rotation_deg", "shear", "shift_px", "elastic_alpha"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0:
                raise ValueError(f"DeformConfig: {name} must be a number >= 0, got {v!r}")
        if not self.elastic_sigma > 0:
            raise ValueError(f"DeformConfig: elastic_sigma must be > 0, got {self.elastic_sigma!r}")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"DeformConfig: scale must be (low, high) with 0 < low <= high, got {self.scale!r}")


def load_mnist_digits(path: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """MNIST as uint8 images ``(n, 28, 28)`` and int64 labels: keys X_train, y_train, X_test, y_test.

    ``path`` defaults to ``$PTSNE_MNIST``.
    """
    path = path or os.environ.get(MNIST_ENV)
    if not path:
        raise ValueError(f"MNIST path not given: pass --mnist PATH (an .npz with X_train, y_train, X_test, "
                         f"y_test) or set ${MNIST_ENV}")
    if not Path(path).is_file():
        raise FileNotFoundError(f"MNIST file {str(path)!r} does not exist")
    with np.load(path) as d:
        missing = {"X_train", "y_train", "X_test", "y_test"} - set(d.files)
        if missing:
            raise ValueError(f"MNIST file {str(path)!r} lacks the keys {sorted(missing)}; it has {d.files}")
        return {k: (d[k].reshape(len(d[k]), 28, 28) if k.startswith("X") else d[k].astype(np.int64))
                for k in ("X_train", "y_train", "X_test", "y_test")}


def _smoothing_matrix(sigma: float, h: int):
    """``(K, radius)``: ``K @ F @ K.T`` is the Gaussian filter of an ``(h + 2 radius)``-square field
    ``F``, cut to the ``h x h`` centre, with no padding (a banded matrix: one matrix product
    per axis is far faster on a CPU than a 2-D convolution of this width)."""
    import torch

    radius = int(math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    K = torch.zeros(h, h + 2 * radius)
    for i in range(h):
        K[i, i:i + 2 * radius + 1] = k / k.sum()
    return K, radius


def deform_images(images: np.ndarray, rng: np.random.Generator, config: DeformConfig = DeformConfig()) -> np.ndarray:
    """Random affine + elastic deformation of square images, bilinear, zero outside.

    Parameters
    ----------
    images : ndarray (b, h, h)
        uint8 (scaled by 1/255) or float images.
    rng : numpy.random.Generator
        Source of every random value (the transform parameters and the noise fields).
    config : DeformConfig

    Returns
    -------
    ndarray float32 (b, h * h)
        The deformed images, flattened, clipped to [0, 1] for uint8 input.
    """
    import torch
    import torch.nn.functional as F

    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must be (b, h, h), got shape {images.shape}")
    b, h, _ = images.shape
    scale = 1 / 255.0 if images.dtype == np.uint8 else 1.0
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32) * np.float32(scale))[:, None]

    angle = np.deg2rad(rng.uniform(-config.rotation_deg, config.rotation_deg, b))
    zoom = rng.uniform(config.scale[0], config.scale[1], b)
    shear = rng.uniform(-config.shear, config.shear, b)
    shift = rng.uniform(-config.shift_px, config.shift_px, (b, 2)) * (2.0 / h)  # pixels -> [-1, 1] units
    cos, sin = np.cos(angle), np.sin(angle)
    # Forward map A = rotation @ shear @ zoom; grid_sample needs, per output pixel, where to read: A^-1 (p - t).
    forward = np.stack([np.stack([cos, cos * shear - sin], -1), np.stack([sin, sin * shear + cos], -1)], -2)
    forward = forward * zoom[:, None, None]
    inverse = np.linalg.inv(forward)
    theta = np.concatenate([inverse, -(inverse @ shift[:, :, None])], axis=2)
    grid = F.affine_grid(torch.from_numpy(theta.astype(np.float32)), (b, 1, h, h), align_corners=False)

    if config.elastic_alpha > 0:
        K, radius = _smoothing_matrix(config.elastic_sigma, h)
        # Noise on a margin of one kernel radius, filtered without padding: no boundary effect.
        side = h + 2 * radius
        noise = rng.random((2 * b, side, side), dtype=np.float32)
        noise *= 2
        noise -= 1
        field = K @ torch.from_numpy(noise) @ K.T
        grid = grid + field.view(b, 2, h, h).permute(0, 2, 3, 1) * (config.elastic_alpha * 2.0 / h)

    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = out.reshape(b, h * h).numpy()
    return np.clip(out, 0.0, 1.0, out=out) if scale != 1.0 else out


@contextlib.contextmanager
def _torch_threads(torch, n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def deformed_mnist_rows(
    images: np.ndarray, labels: np.ndarray, start: int, stop: int, seed: int, split: str,
    config: DeformConfig = DeformConfig(),
) -> tuple[np.ndarray, np.ndarray]:
    """Rows [start, stop) of one split of deformed MNIST, drawn from the source ``images``.

    Row ``i`` deforms source image ``perm[i % n_source]``, ``perm`` a seeded permutation, so
    the first ``n_source`` rows use every source image once.

    Returns
    -------
    X : ndarray float32 (stop - start, h * h)
    y : ndarray int64 (stop - start,)
    """
    start, stop = _check_count("start", start), _check_count("stop", stop)
    if stop < start:
        raise ValueError(f"stop must be >= start, got start={start}, stop={stop}")
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"images and labels must be non-empty and of one length, got {len(images)} and {len(labels)}")
    import torch

    sid = _split_id(split)
    perm = np.random.default_rng([seed, sid, 0]).permutation(len(images))
    d = images.shape[1] * images.shape[2]
    X = np.empty((stop - start, d), np.float32)
    y = np.empty(stop - start, np.int64)
    at = 0
    # One thread per block: the caller (a Ray task, a test) owns the parallelism, and the
    # values do not depend on it.
    with _torch_threads(torch, 1):
        for block, lo, hi in _blocks(start, stop, IMAGE_BLOCK):
            rows = block * IMAGE_BLOCK + np.arange(IMAGE_BLOCK)
            src = perm[rows % len(images)]
            out = deform_images(images[src], np.random.default_rng([seed, sid, 1, block]), config)
            X[at:at + hi - lo], y[at:at + hi - lo] = out[lo:hi], labels[src[lo:hi]]
            at += hi - lo
    return X, y


def deformed_mnist(
    n_train: int, n_test: int = 20_000, seed: int = 0, mnist: str | os.PathLike | dict | None = None,
    config: DeformConfig = DeformConfig(),
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Deformed MNIST: ``n_train`` rows from the MNIST train digits, ``n_test`` from the test digits.

    ``mnist`` is the path of the MNIST ``.npz`` (default ``$PTSNE_MNIST``) or what
    :func:`load_mnist_digits` returns.
    """
    n_train, n_test = _check_count("n_train", n_train, 1), _check_count("n_test", n_test)
    digits = mnist if isinstance(mnist, dict) else load_mnist_digits(mnist)
    Xtr, ytr = deformed_mnist_rows(digits["X_train"], digits["y_train"], 0, n_train, seed, "train", config)
    Xte, yte = deformed_mnist_rows(digits["X_test"], digits["y_test"], 0, n_test, seed, "test", config)
    return Xtr, ytr, Xte, yte


# --------------------------------------------------------------------------- simulated scRNA-seq


@dataclass(frozen=True)
class ScrnaConfig:
    """Settings of the simulated differentiation (Splatter's path model, its defaults where it has one).

    Parameters
    ----------
    n_genes : int
    parents : tuple of int
        Parent path of each path; -1 for a path that starts at the root state. The default
        tree: a stem (0) splitting into three lineages (1, 2, 3); 1 and 2 split again
        (4, 5 and 6, 7); 3 goes on as 8; and a separate population (9) off the root.
    path_probs : tuple of float, optional
        Share of cells on each path (normalised); default uneven, drawn from the seed.
    mean_shape, mean_rate : float
        Gamma distribution of the genes' base means.
    outlier_prob, outlier_loc, outlier_scale : float
        Share of genes whose mean is multiplied by a log-normal factor (highly expressed genes).
    de_prob, de_loc, de_scale : float
        Per path, share of genes that change along it and the log-normal factor of the change
        (half of them down).
    bump_prob, bump_scale : float
        Share of the changing genes that also rise or fall in the middle of the path
        (``sin(pi t)`` times a normal of this scale, in log space).
    lib_loc, lib_scale : float
        Log-normal library size (total counts per cell).
    bcv_common, bcv_df : float
        Biological coefficient of variation: per gene, dispersion ``bcv_common**2 * df / chi2(df)``.
    """

    n_genes: int = 2000
    parents: tuple[int, ...] = (-1, 0, 0, 0, 1, 1, 2, 2, 3, -1)
    path_probs: tuple[float, ...] | None = None
    mean_shape: float = 0.6
    mean_rate: float = 0.3
    outlier_prob: float = 0.05
    outlier_loc: float = 4.0
    outlier_scale: float = 0.5
    de_prob: float = 0.1
    de_loc: float = 0.3
    de_scale: float = 0.5
    bump_prob: float = 0.2
    bump_scale: float = 0.7
    lib_loc: float = 8.5
    lib_scale: float = 0.3
    bcv_common: float = 0.2
    bcv_df: float = 60.0

    def __post_init__(self) -> None:
        _check_count("ScrnaConfig: n_genes", self.n_genes, 2)
        for i, p in enumerate(self.parents):
            if not -1 <= p < i:
                raise ValueError(f"ScrnaConfig: parents[{i}] must be -1 or an earlier path (< {i}), got {p!r}")
        if self.path_probs is not None and (len(self.path_probs) != len(self.parents)
                                            or min(self.path_probs) < 0 or sum(self.path_probs) <= 0):
            raise ValueError(f"ScrnaConfig: path_probs must be {len(self.parents)} numbers >= 0 with a positive "
                             f"sum, got {self.path_probs!r}")

    @property
    def n_paths(self) -> int:
        return len(self.parents)


@dataclass(frozen=True)
class ScrnaModel:
    """The simulated tissue, fixed by the seed: per path, the log-means at its start and its change.

    ``start`` and ``change`` are float64 ``(paths, genes)``, ``bump`` the mid-path amplitude,
    ``probs`` the share of cells per path, ``dispersion`` float64 ``(genes,)``.
    """

    start: np.ndarray
    change: np.ndarray
    bump: np.ndarray
    probs: np.ndarray
    dispersion: np.ndarray
    config: ScrnaConfig


def scrna_model(seed: int = 0, config: ScrnaConfig = ScrnaConfig()) -> ScrnaModel:
    """Draw the gene means, the paths' changes and the dispersions from ``seed``."""
    c = config
    rng = np.random.default_rng([seed, 0])
    g, n_paths = c.n_genes, c.n_paths
    base = rng.gamma(c.mean_shape, 1 / c.mean_rate, g)
    outlier = rng.random(g) < c.outlier_prob
    base[outlier] *= rng.lognormal(c.outlier_loc, c.outlier_scale, int(outlier.sum()))
    log_base = np.log(np.maximum(base, 1e-12))
    change = np.zeros((n_paths, g))
    bump = np.zeros((n_paths, g))
    for p in range(n_paths):
        de = rng.random(g) < c.de_prob
        sign = np.where(rng.random(g) < 0.5, -1.0, 1.0)
        change[p] = np.where(de, sign * np.log(rng.lognormal(c.de_loc, c.de_scale, g)), 0.0)
        has_bump = de & (rng.random(g) < c.bump_prob)
        bump[p] = np.where(has_bump, rng.normal(0.0, c.bump_scale, g), 0.0)
    start = np.empty((n_paths, g))
    for p, parent in enumerate(c.parents):
        # A path starts where its parent ends; a root path where the undifferentiated state is.
        start[p] = log_base if parent < 0 else start[parent] + change[parent]
    probs = (np.asarray(c.path_probs, float) if c.path_probs is not None
             else rng.dirichlet(np.full(n_paths, 3.0)))
    dispersion = c.bcv_common**2 * c.bcv_df / rng.chisquare(c.bcv_df, g)
    return ScrnaModel(start, change, bump, probs / probs.sum(), dispersion, c)


def simulate_cells(model: ScrnaModel, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` cells: raw counts float32 ``(n, genes)``, path int64 ``(n,)``, pseudotime in [0, 1) along it."""
    path = rng.choice(model.config.n_paths, size=n, p=model.probs)
    t = rng.random(n)
    log_mean = model.start[path] + t[:, None] * model.change[path] + np.sin(np.pi * t)[:, None] * model.bump[path]
    mean = np.exp(log_mean - log_mean.max(axis=1, keepdims=True))
    library = rng.lognormal(model.config.lib_loc, model.config.lib_scale, n)
    mean *= (library / mean.sum(axis=1))[:, None]
    # Gamma-Poisson = negative binomial with mean `mean` and dispersion phi: var = mean + phi mean^2.
    phi = model.dispersion[None, :]
    counts = rng.poisson(rng.gamma(1.0 / phi, mean * phi))
    return counts.astype(np.float32), path.astype(np.int64), t


def normalize_counts(counts: np.ndarray, target: float = 1e4) -> np.ndarray:
    """``log1p`` of counts per ``target`` (CP10k), float32; a cell without counts stays 0."""
    total = counts.sum(axis=1, keepdims=True, dtype=np.float64)
    scale = (target / np.maximum(total, 1.0)).astype(np.float32)
    return np.log1p(counts * scale, dtype=np.float32)


def scrna_rows(model: ScrnaModel, start: int, stop: int, seed: int, split: str,
               pseudotime: bool = False) -> tuple[np.ndarray, ...]:
    """Rows [start, stop) of one split: log1p(CP10k) float32 ``(n, genes)``, path int64 ``(n,)``
    (and pseudotime float32 ``(n,)`` with ``pseudotime=True``)."""
    start, stop = _check_count("start", start), _check_count("stop", stop)
    if stop < start:
        raise ValueError(f"stop must be >= start, got start={start}, stop={stop}")
    sid = _split_id(split)
    X = np.empty((stop - start, model.config.n_genes), np.float32)
    y = np.empty(stop - start, np.int64)
    t = np.empty(stop - start, np.float32)
    at = 0
    for block, lo, hi in _blocks(start, stop, CELL_BLOCK):
        counts, path, time_ = simulate_cells(model, CELL_BLOCK, np.random.default_rng([seed, sid, 1, block]))
        k = hi - lo
        X[at:at + k], y[at:at + k], t[at:at + k] = normalize_counts(counts[lo:hi]), path[lo:hi], time_[lo:hi]
        at += k
    return (X, y, t) if pseudotime else (X, y)


def scrna(n_train: int, n_test: int = 20_000, seed: int = 0,
          config: ScrnaConfig = ScrnaConfig()) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Simulated scRNA-seq, log1p(CP10k): ``n_train`` and ``n_test`` cells of one tissue, labels the paths."""
    n_train, n_test = _check_count("n_train", n_train, 1), _check_count("n_test", n_test)
    model = scrna_model(seed, config)
    return (*scrna_rows(model, 0, n_train, seed, "train"), *scrna_rows(model, 0, n_test, seed, "test"))


def make(name: str, n_train: int, n_test: int, seed: int = 0, mnist: str | os.PathLike | None = None):
    """The data set ``name`` (one of ``DATASETS``) as ``(X_train, y_train, X_test, y_test)``."""
    if name == "deformed-mnist":
        return deformed_mnist(n_train, n_test, seed, mnist)
    if name == "scrna":
        return scrna(n_train, n_test, seed)
    raise ValueError(f"data set must be one of {DATASETS}, got {name!r}")


# --------------------------------------------------------------------------- CLI


def preview(path: Path, name: str, X: np.ndarray, y: np.ndarray, seed: int = 0) -> None:
    """A grid of deformed digits, or for the cells a 2-D PCA coloured by path, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if name == "deformed-mnist":
        fig, axes = plt.subplots(8, 16, figsize=(16, 8))
        for ax, img in zip(axes.ravel(), X[:128]):
            ax.imshow(img.reshape(28, 28), cmap="gray_r")
            ax.axis("off")
    else:
        from ptsne.pca import PCA

        Z = PCA(2, random_state=seed).fit(X).transform(X)
        fig, ax = plt.subplots(figsize=(7, 7))
        ax.scatter(Z[:, 0], Z[:, 1], c=y, cmap="tab10", s=1, rasterized=True)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=70)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", choices=DATASETS)
    p.add_argument("--n-train", type=int, default=60_000)
    p.add_argument("--n-test", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mnist", default=None, help=f"MNIST .npz for deformed-mnist (default ${MNIST_ENV})")
    p.add_argument("--out", type=Path, default=None, help="write X_train, y_train, X_test, y_test to this .npz")
    p.add_argument("--preview", type=Path, default=None, help="write a PNG of the training rows")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("n_train", "n_test"):
        if getattr(args, name) < (1 if name == "n_train" else 0):
            p.error(f"--{name.replace('_', '-')} must be >= {1 if name == 'n_train' else 0}, got {getattr(args, name)}")
    t = time.perf_counter()
    Xtr, ytr, Xte, yte = make(args.data, args.n_train, args.n_test, args.seed, args.mnist)
    log.info("%s: %d + %d rows x %d columns in %.1f s", args.data, len(Xtr), len(Xte), Xtr.shape[1],
             time.perf_counter() - t)
    if args.out:
        tmp = args.out.with_name(f".{args.out.name}.tmp.npz")
        np.savez(tmp, X_train=Xtr, y_train=ytr, X_test=Xte, y_test=yte)
        os.replace(tmp, args.out)
        log.info("wrote %s", args.out)
    if args.preview:
        preview(args.preview, args.data, Xtr[:20_000], ytr[:20_000], args.seed)
    return 0


if __name__ == "__main__":
    ROOT = Path(__file__).resolve().parents[1]
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    sys.exit(main())
