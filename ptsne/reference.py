"""The reference: training points with coordinates on a t-SNE-grade map, and new points placed on it.

A parametric mapper gives a smooth map that is coarser than t-SNE's; the
reference fixes that where it matters, on the training points and near them:

1. :func:`optimize_map` optimises the coordinates of the reference points to
   t-SNE's own objective, KL(P || Q) on the same sparse joint P, without
   exaggeration, starting from the network's map (openTSNE's FFT-accelerated
   gradient descent on CPU).
2. :func:`similarity_fit` finds the rotation, scale and shift that carry the
   network's map onto the reference map; :func:`fold_similarity` writes them
   into the network's output layer, so both modes share one frame.
3. :meth:`Reference.place` embeds new points: each point's neighbours among the
   reference points (FAISS), a perplexity-calibrated ``p_{j|i}`` over them, and a
   per-point optimisation of :func:`placement_objective` against the fixed
   reference map, started at the median of its neighbours' coordinates (or at the
   network's output, ``transform_init="network"``). A query that equals a
   reference point lands on its reference coordinate.

On MNIST (60k reference points, 10k new ones) the median start reaches a lower
placement objective than the network's output after the same iterations (5.67
against 5.79 nats per point after 30 iterations; 5.76 after 100): the network's
coarser map leaves points in worse local optima.

The placement objective of a new point ``y`` with neighbours ``j`` is

    L(y) = -rho * sum_j p_j log w(y, y_j) + log sum_{k in reference} w(y, y_k)

(KL(p || q) up to a constant, ``q_k = w(y, y_k) / sum w``). Points are placed
independently of each other. Its repulsion term needs the kernel sums over all
reference points; :class:`RepulsionField` evaluates them exactly for small
references and otherwise from a grid (cloud-in-cell density convolved with the
kernel by FFT, read back by multilinear interpolation).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.fft import next_fast_len
from torch import nn
from tqdm.auto import tqdm

from ptsne.affinity import Edges, calibrate
from ptsne.knn import build_index, search, tune_nprobe
from ptsne.loss import log_kernel
from ptsne.configs import (  # noqa: F401 (exported)
    FINE_ITER_PER_POINT, INITS, ITER_PER_POINT, MIN_FINE_ITER, MIN_ITER, ReferenceConfig, check_size,
)
from ptsne.configs import PLACEMENT_METHODS as METHODS  # noqa: F401 (exported)

log = logging.getLogger(__name__)

#: References up to this many points are repelled exactly (dense), larger ones by grid.
EXACT_REPULSION_MAX = 4096
#: The median start takes this many of a point's nearest reference points.
MEDIAN_NEIGHBORS = 10
#: References above this many points are searched with an IVF index ...
EXACT_SEARCH_MAX = 20_000
#: ... tuned to this sampled recall of a new point's reference neighbours (on MNIST,
#: 0.9 against 0.95 halves the probes: 0.076 s against 0.114 s for 10k points, test
#: 1-NN accuracy 0.962 against 0.964, T(12) 0.976 against 0.975).
SEARCH_RECALL = 0.9
#: ``learning_rate="auto"`` of the reference map: this many times the number of points.
LEARNING_RATE_PER_POINT = 4.0
#: The reference map's objective is evaluated (and convergence tested) every this many iterations.
CHECK_EVERY = 25


def default_iterations(n: int) -> tuple[int, int]:
    """First- and second-phase iterations of the reference map of ``n`` points (``"auto"``).

    Both grow linearly with ``n``: from the network's map at its best scale, t-SNE's
    objective of a larger map keeps falling for longer (its clusters are further apart
    and the network's map of them is coarser). 100 + 40 iterations give MNIST's 60k
    points KL 2.575 and train-split recall@10 0.397 against openTSNE's 2.715 and 0.392,
    but 200k deformed digits KL 4.314 and 0.280 against openTSNE's 4.233 and 0.282;
    300 + 80 there reach 4.223 and 0.297 (200 + 40: 4.269 and 0.288).
    """
    coarse = max(MIN_ITER, round(ITER_PER_POINT * n / CHECK_EVERY) * CHECK_EVERY)
    fine = max(MIN_FINE_ITER, round(FINE_ITER_PER_POINT * n / 10) * 10)
    return int(coarse), int(fine)


def resolve_iterations(config: ReferenceConfig, n: int) -> tuple[int, int]:
    """``config.n_iter`` and ``config.fine_iter`` with ``"auto"`` resolved for ``n`` points."""
    coarse, fine = default_iterations(n)
    return (coarse if config.n_iter == "auto" else int(config.n_iter),
            fine if config.fine_iter == "auto" else int(config.fine_iter))


# -- the reference map ---------------------------------------------------------------------


def optimize_map(
    edges: Edges,
    init: np.ndarray,
    config: ReferenceConfig = ReferenceConfig(),
    dof: float = 1.0,
    n_threads: int = 1,
    random_state: int = 0,
    verbose: bool = False,
) -> np.ndarray:
    """Coordinates that minimise KL(P || Q) (exaggeration 1), started at ``init``.

    ``config.n_iter`` coarse (or fewer, once converged) then ``config.fine_iter``
    fine iterations (:func:`resolve_iterations`) of openTSNE's gradient descent (FFT-interpolated repulsion for 2-D maps of 10k
    points or more, Barnes-Hut otherwise).

    Parameters
    ----------
    edges : Edges
        The joint P over ``len(init)`` points (sums to one).
    init : ndarray (n, n_components)
        Starting coordinates, e.g. the network's map of the points at its best scale.

    Returns
    -------
    ndarray, float32 (n, n_components)
    """
    from openTSNE import TSNEEmbedding
    from openTSNE.affinity import PrecomputedAffinities

    init = np.ascontiguousarray(init, dtype=np.float64)
    n, dim = init.shape
    n_coarse, n_fine = resolve_iterations(config, n)
    total = n_coarse + n_fine
    if total == 0:
        return init.astype(np.float32)
    # FFT interpolation exists for 1-D and 2-D maps; Barnes-Hut serves 3-D and small maps.
    method = "fft" if dim <= 2 and n >= 10_000 else "bh"
    embedding = TSNEEmbedding(
        init, PrecomputedAffinities(edges.to_csr(n), normalize=False), n_jobs=int(n_threads), dof=float(dof),
        random_state=int(random_state), negative_gradient_method=method, verbose=False,
    )
    bar = tqdm(total=total, desc="ptsne reference", unit="it", disable=not verbose)
    stop = Convergence(config.tol)

    def progress(iteration, error, _embedding):
        bar.update(CHECK_EVERY)
        bar.set_postfix(kl=f"{error:.3f}")

    learning_rate = LEARNING_RATE_PER_POINT * n if config.learning_rate == "auto" else float(config.learning_rate)
    t = time.perf_counter()
    ran = []
    try:
        for n_iter, interval, test in ((n_coarse, config.coarse_interval, config.tol > 0),
                                       (n_fine, config.fine_interval, False)):
            if not n_iter:
                continue
            callbacks = ([stop] if test else []) + ([progress] if verbose else [])
            stop.iterations = 0
            embedding.optimize(
                n_iter, exaggeration=1.0, momentum=0.8, learning_rate=learning_rate, inplace=True,
                ints_in_interval=float(interval), callbacks=callbacks or None,
                callbacks_every_iters=CHECK_EVERY,
            )
            ran.append(stop.iterations if test and stop.converged else n_iter)
    finally:
        bar.close()
    log.info("reference map: %d points, %s iterations%s in %.1f s", n, " + ".join(map(str, ran)),
             " (first phase converged)" if stop.converged else "", time.perf_counter() - t)
    return np.asarray(embedding, dtype=np.float32)


class Convergence:
    """openTSNE callback that stops the optimisation once its objective has converged.

    Called every :data:`CHECK_EVERY` iterations with openTSNE's estimate of KL(P || Q);
    returns True (stop) once the objective fell by less than ``tol`` of its value since
    the previous call. ``iterations`` and ``converged`` say where and whether it stopped.
    """

    def __init__(self, tol: float):
        self.tol = float(tol)
        self.last: float | None = None
        self.iterations = 0
        self.converged = False

    def __call__(self, iteration: int, error: float, _embedding=None) -> bool:
        self.iterations = int(iteration)
        error = float(error)
        self.converged = self.last is not None and self.last - error < self.tol * abs(self.last)
        self.last = error
        return self.converged


def best_scale(edges: Edges, Y: np.ndarray, dof: float = 1.0, n_pairs: int = 2_000_000,
               random_state: int = 0) -> float:
    """The factor ``s`` that minimises KL(P || Q) of the map ``s * Y``.

    The attraction is summed over every edge; ``Z`` is estimated from ``n_pairs``
    uniformly drawn pairs, the same pairs for every ``s``, so the 1-D objective is
    smooth. t-SNE expands a map slowly; starting the reference at its best scale
    spares the iterations of that expansion.
    """
    from scipy.optimize import minimize_scalar

    Y = np.asarray(Y, dtype=np.float64)
    n = len(Y)
    rng = np.random.default_rng(random_state)
    i = rng.integers(0, n, n_pairs)
    j = (i + rng.integers(1, n, n_pairs)) % n  # j != i
    pair_sq = ((Y[i] - Y[j]) ** 2).sum(1)
    edge_sq = ((Y[edges.head] - Y[edges.tail]) ** 2).sum(1)
    p = edges.weight.astype(np.float64)
    c = 0.5 * (dof + 1.0)

    def kl(log_s: float) -> float:
        s2 = math.exp(2.0 * log_s)
        attraction = c * float((p * np.log1p(s2 * edge_sq / dof)).sum())
        log_z = math.log(float(np.exp(-c * np.log1p(s2 * pair_sq / dof)).mean()))
        return attraction + log_z

    result = minimize_scalar(kl, bounds=(math.log(0.1), math.log(10.0)), method="bounded",
                             options={"xatol": 1e-3})
    return float(math.exp(result.x))


def similarity_fit(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``A, t`` minimising ``|| source @ A + t - target ||`` with ``A = s R`` (R orthogonal, s > 0).

    Returns ``A`` (d, d) and ``t`` (d,), float64.
    """
    source = np.asarray(source, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    mu_s, mu_t = source.mean(axis=0), target.mean(axis=0)
    S, T = source - mu_s, target - mu_t
    U, sigma, Vt = np.linalg.svd(S.T @ T)
    R = U @ Vt
    norm = float((S * S).sum())
    scale = float(sigma.sum()) / norm if norm > 0 else 1.0
    A = scale * R
    return A, mu_t - mu_s @ A


def fold_similarity(net: nn.Module, A: np.ndarray, t: np.ndarray) -> bool:
    """Write ``y -> y @ A + t`` into the last ``nn.Linear`` of a sequential ``net``.

    Returns False (and changes nothing) when ``net`` does not end in a linear layer.
    """
    last = net[-1] if isinstance(net, nn.Sequential) and len(net) else None
    if not isinstance(last, nn.Linear):
        return False
    with torch.no_grad():
        device = last.weight.device  # the network may sit on a GPU; A and t come from the host
        At = torch.as_tensor(A, dtype=torch.float64, device=device)
        W = last.weight.double()  # (out, in): y = x W^T + b
        last.weight.copy_((At.T @ W).to(last.weight.dtype))
        if last.bias is not None:
            tt = torch.as_tensor(t, dtype=torch.float64, device=device)
            last.bias.copy_((last.bias.double() @ At + tt).to(last.bias.dtype))
    return True


# -- placing new points ----------------------------------------------------------------------


def _kernel_parts(sq: torch.Tensor, dof: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``w = (1 + d^2/dof)^(-(dof+1)/2)`` and ``u = 1 / (1 + d^2/dof)``."""
    u = torch.reciprocal(1.0 + sq / dof)
    w = u if dof == 1.0 else u.pow(0.5 * (dof + 1.0))
    return w, u


class RepulsionField:
    """Kernel sums of a fixed map: ``Z(y) = sum_k w(y, y_k)`` and ``R(y) = sum_k w u (y - y_k)``.

    ``exact=True`` sums over every reference point (cost ``m * N``); otherwise
    the sums are read from a grid of spacing ``spacing`` that covers the map with
    a margin (queries beyond it are clamped to its border). The grid error falls
    with the square of the spacing: on a clustered 2-D map of 3000 points, 0.125
    gives ``Z`` to 0.1% and ``R`` to 0.4% on average (2% at most). Grids have at
    most ``max_cells`` cells a side (1024 in 2-D; 96 in 3-D, where a map wider
    than 96 spacings gets coarser cells and errors of about 1% in ``Z`` and 12% in
    ``R``).
    """

    def __init__(self, embedding: np.ndarray, dof: float = 1.0, spacing: float = 0.125,
                 exact: bool | None = None, max_cells: int | None = None):
        Y = torch.as_tensor(np.asarray(embedding, dtype=np.float32))
        self.n, self.dim = Y.shape
        self.dof = float(dof)
        # grid_sample interpolates 2-D and 3-D grids only: other dimensions sum exactly.
        self.exact = self.n <= EXACT_REPULSION_MAX or self.dim not in (2, 3) if exact is None else bool(exact)
        self.points = Y
        if not self.exact:
            self._build_grid(Y.double(), float(spacing), max_cells or (1024 if self.dim <= 2 else 96))

    def _build_grid(self, Y: torch.Tensor, spacing: float, max_cells: int) -> None:
        lo, hi = Y.min(dim=0).values, Y.max(dim=0).values
        margin = 0.1 * (hi - lo) + 4.0
        lo, hi = lo - margin, hi + margin
        cells = int(min(max_cells, math.ceil(float((hi - lo).max()) / spacing)))
        h = float((hi - lo).max()) / cells  # one spacing for every axis
        G = cells + 1  # nodes per axis
        self.lo, self.h, self.G = lo, h, G
        # Cloud-in-cell: each point's unit mass shared among its 2^dim surrounding nodes.
        density = torch.zeros((G,) * self.dim, dtype=torch.float64)
        pos = (Y - lo) / h
        base = pos.floor().long().clamp(0, G - 2)
        frac = pos - base
        flat = density.view(-1)
        strides = [G ** (self.dim - 1 - a) for a in range(self.dim)]
        for corner in range(2**self.dim):
            offs = [(corner >> a) & 1 for a in range(self.dim)]
            wgt = torch.ones(self.n, dtype=torch.float64)
            idx = torch.zeros(self.n, dtype=torch.long)
            for a, o in enumerate(offs):
                wgt = wgt * (frac[:, a] if o else 1.0 - frac[:, a])
                idx = idx + (base[:, a] + o) * strides[a]
            flat.index_add_(0, idx, wgt)
        # Kernel on the node offsets -(G-1)..(G-1), convolved with the density by FFT.
        offsets = torch.arange(-(G - 1), G, dtype=torch.float32) * h
        mesh = torch.meshgrid(*([offsets] * self.dim), indexing="ij")
        delta = torch.stack(mesh, dim=-1)
        w, u = _kernel_parts((delta * delta).sum(-1), self.dof)
        kernels = torch.stack([w] + [w * u * delta[..., a] for a in range(self.dim)])
        # A circular convolution of length L >= 2G - 1 is exact on the nodes read back: node
        # i takes kernel offsets i - j in [-(G-1), G-1] only, which never wrap. L is rounded
        # up to a length FFTs handle fast (2049 = 3 * 683 becomes 2160 = 2^4 3^3 5).
        size = [next_fast_len(2 * G - 1, real=True)] * self.dim
        dims = tuple(range(1, self.dim + 1))
        fd = torch.fft.rfftn(density.float().unsqueeze(0), s=size, dim=dims)
        full = torch.fft.irfftn(fd * torch.fft.rfftn(kernels, s=size, dim=dims), s=size, dim=dims)
        crop = (slice(None),) + tuple(slice(G - 1, 2 * G - 1) for _ in dims)
        # (1, 1 + dim, G, ..., G) for grid_sample; grid_sample's last coordinate is the first axis' last.
        self.grid = full[crop].float().contiguous().unsqueeze(0)
        log.debug("repulsion grid: %d^%d nodes, spacing %.3f", G, self.dim, h)

    def __call__(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``Z`` (m,) and ``R`` (m, dim) at the points ``y`` (m, dim)."""
        if self.exact:
            diff = y[:, None, :] - self.points[None, :, :]
            w, u = _kernel_parts((diff * diff).sum(-1), self.dof)
            return w.sum(1), ((w * u)[:, :, None] * diff).sum(1)
        # Node coordinates -> grid_sample's [-1, 1] (align_corners: -1 and 1 are the end nodes).
        norm = (y.double() - self.lo) / (self.h * (self.G - 1)) * 2.0 - 1.0
        coords = norm.flip(-1).float()  # grid_sample takes (x, y[, z]) = (last axis, ..., first)
        shape = (1,) + (1,) * (self.dim - 1) + (y.shape[0], self.dim)
        out = F.grid_sample(self.grid, coords.reshape(shape), mode="bilinear",
                            padding_mode="border", align_corners=True)
        out = out.reshape(1 + self.dim, -1).T
        return out[:, 0].clamp(min=1e-12), out[:, 1:]


def placement_objective(
    y: torch.Tensor, neighbors: torch.Tensor, p: torch.Tensor, reference: torch.Tensor,
    dof: float = 1.0, exaggeration: float = 1.0,
) -> torch.Tensor:
    """Exact per-point objective ``L(y)`` (m,), dense over every reference point (for checks)."""
    diff = y[:, None, :] - reference[neighbors]
    sq = (diff * diff).sum(-1)
    all_sq = torch.cdist(y.double(), reference.double()).pow(2)
    log_z = torch.logsumexp(log_kernel(all_sq, dof), dim=1)
    return -exaggeration * (p * log_kernel(sq, dof)).sum(1) + log_z.to(y.dtype)


def placement_gradient(
    y: torch.Tensor, neighbors: torch.Tensor, p: torch.Tensor, reference: torch.Tensor,
    field: RepulsionField, exaggeration: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of :func:`placement_objective` (repulsion from ``field``) and its curvature scale."""
    return _gradient(y, reference[neighbors], p, field, exaggeration)


def _gradient(
    y: torch.Tensor, targets: torch.Tensor, p: torch.Tensor, field: RepulsionField, exaggeration: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`placement_gradient` with the neighbours' coordinates ``targets`` (m, k, dim) gathered."""
    dof = field.dof
    c = (dof + 1.0) / dof
    diff = y[:, None, :] - targets
    _, u = _kernel_parts((diff * diff).sum(-1), dof)
    pu = p * u
    attract = (pu[:, :, None] * diff).sum(1)
    Z, R = field(y)
    grad = c * (exaggeration * attract - R / Z[:, None])
    curvature = c * exaggeration * pu.sum(1)
    return grad, curvature


def refine(
    y0: np.ndarray, neighbors: np.ndarray, p: np.ndarray, reference: np.ndarray, field: RepulsionField,
    n_iter: int = ReferenceConfig.transform_iter, exaggeration: float = 1.0,
    step: float = 0.5, momentum: float = 0.5, max_step: float = 2.0,
) -> np.ndarray:
    """Gradient descent on :func:`placement_objective` for each point, from ``y0``.

    Steps are preconditioned by each point's attraction curvature (so they are
    measured in map units whatever the data), with momentum and a cap on their
    length.
    """
    y = torch.as_tensor(np.asarray(y0, dtype=np.float32)).clone()
    targets = torch.as_tensor(np.asarray(reference, dtype=np.float32)[np.asarray(neighbors)])
    pt = torch.as_tensor(np.asarray(p, dtype=np.float32))
    velocity = torch.zeros_like(y)
    for _ in range(n_iter):
        grad, curv = _gradient(y, targets, pt, field, exaggeration)
        velocity = momentum * velocity - step * grad / curv.clamp(min=1e-6)[:, None]
        length = velocity.norm(dim=1, keepdim=True)
        velocity = velocity * torch.clamp(max_step / length.clamp(min=1e-12), max=1.0)
        y = y + velocity
    return y.numpy()


@dataclass
class Reference:
    """Reference points: input vectors (as the network sees them) and their map coordinates.

    Attributes
    ----------
    vectors : ndarray, float32 (N, D)
    embedding : ndarray, float32 (N, n_components)
    dof : float
    config : ReferenceConfig
    """

    vectors: np.ndarray
    embedding: np.ndarray
    dof: float = 1.0
    config: ReferenceConfig = ReferenceConfig()

    def __post_init__(self) -> None:
        self.vectors = np.ascontiguousarray(self.vectors, dtype=np.float32)
        self.embedding = np.ascontiguousarray(self.embedding, dtype=np.float32)
        if self.vectors.ndim != 2 or self.embedding.ndim != 2 or len(self.vectors) != len(self.embedding):
            raise ValueError(
                f"Reference: vectors {self.vectors.shape} and embedding {self.embedding.shape} "
                "must be 2-D with one row per point"
            )
        if len(self.vectors) <= self.config.transform_k:
            raise ValueError(
                f"Reference: {len(self.vectors)} points are too few for transform_perplexity="
                f"{self.config.transform_perplexity} (needs more than {self.config.transform_k})"
            )
        self._index = None
        self._field = None

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def nbytes(self) -> int:
        return int(self.vectors.nbytes + self.embedding.nbytes)

    def index(self):
        """FAISS index of the reference vectors (exact, or IVF tuned to recall 0.95 when large)."""
        if self._index is None:
            method = "exact" if len(self) <= EXACT_SEARCH_MAX else "ivf"
            self._index = build_index(self.vectors, method)
            if method == "ivf":
                tune_nprobe(self._index, self.vectors, self.config.transform_k, target_recall=SEARCH_RECALL)
        return self._index

    def prepare(self) -> Reference:
        """Build the search index and the repulsion field now rather than at the first ``place``."""
        self.index()
        self.field()
        return self

    def field(self) -> RepulsionField:
        if self._field is None:
            self._field = RepulsionField(self.embedding, self.dof, self.config.grid_spacing)
        return self._field

    def affinities(self, Z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Reference neighbours of each row of ``Z``, their distances and ``p_{j|i}``."""
        graph = search(self.index(), Z, self.config.transform_k)
        p, _ = calibrate(graph.distances, self.config.transform_perplexity)
        return graph.indices, graph.distances, p

    def place(self, Z: np.ndarray, network: np.ndarray | None = None) -> np.ndarray:
        """Coordinates of new points ``Z`` (m, D); ``network`` is the network's map of them.

        ``network`` is needed only with ``transform_init="network"``.
        """
        if len(Z) == 0:
            return np.zeros((0, self.embedding.shape[1]), dtype=np.float32)
        neighbors, distances, p = self.affinities(Z)
        if self.config.transform_init == "network":
            if network is None:
                raise ValueError("Reference.place: transform_init='network' needs the network's map of the points")
            init = network
        else:
            init = np.median(self.embedding[neighbors[:, :MEDIAN_NEIGHBORS]], axis=1)
        y = refine(init, neighbors, p, self.embedding, self.field(), self.config.transform_iter,
                   self.config.transform_exaggeration)
        # A query equal to a reference point lands on that point's coordinate.
        same = distances[:, 0] <= 1e-6 * (1.0 + np.linalg.norm(Z, axis=1))
        y[same] = self.embedding[neighbors[same, 0]]
        return y.astype(np.float32, copy=False)
