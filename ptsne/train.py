"""Training a mapper on sparse joint affinities.

One epoch visits every point once as an *anchor*, in a fresh random order.
Each anchor ``i`` draws ``positives_per_anchor`` neighbours ``j``, each with
probability ``P_ij / P_i`` (``P_i`` the row sum), so an edge has probability
``P_ij / (n P_i)`` and gets importance weight ``n P_i`` in the attraction; the
anchors of a batch are a uniform sample of the data and their pairs estimate
the normaliser ``Z``. The same :func:`run_epoch` (and :func:`train_step` in it) runs in a single
process here and in every data-parallel worker of ``pipeline.train``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ptsne.affinity import Edges
from ptsne.configs import MIN_EPOCHS, MIN_STEPS, TARGET_STEPS, TrainConfig  # noqa: F401 (exported)
from ptsne.device import resolve_precision, training_precision
from ptsne.loss import TSNELoss

log = logging.getLogger(__name__)

#: A callback gets ``(epoch, metrics)`` after each epoch and returns True to stop.
Callback = Callable[[int, dict], bool | None]


def default_epochs(n: int, batch_size: int = TrainConfig.batch_size) -> int:
    """Epochs for ``n`` points at ``batch_size`` anchors per step.

    About :data:`TARGET_STEPS` steps, within ``[MIN_EPOCHS, TrainConfig.n_epochs]``
    epochs (30 for MNIST's 60k points at 512, 10 from about 180k points on), and never
    fewer than :data:`MIN_STEPS` steps (small datasets need more passes). 3500 steps is
    the length the network-only figures were set at before the reference existed: cut to
    2400 on MNIST's seed spread, the network alone lost 3 points of held-out 1-NN accuracy
    on an image set that was not tuned on (0.703 to 0.672), while the reference's own
    figures do not depend on it.
    """
    steps_per_epoch = max(1, n // max(1, min(batch_size, n)))
    epochs = min(TrainConfig.n_epochs, max(MIN_EPOCHS, math.ceil(TARGET_STEPS / steps_per_epoch)))
    return max(epochs, math.ceil(MIN_STEPS / steps_per_epoch))


class NeighborSampler:
    """Draws one neighbour per anchor from the rows of a sparse joint P (on any device).

    Holds P as CSR: ``indptr`` int64 (n + 1,), ``tail`` int32 (int64 for
    ``n >= 2**31`` columns) and the running sum of the weights in float64 (E,),
    plus ``row_sum`` and ``importance`` per row: at most 12 bytes per edge and
    20 per row. A draw for anchor ``i`` is a binary search of
    ``cumw[indptr[i] - 1] + u * row_sum[i]`` in ``cumw``.

    Parameters
    ----------
    edges : Edges
        Joint affinities; need not be sorted.
    n : int
        Number of points (rows).
    device : torch.device

    :meth:`from_csr` builds one from rows already grouped (no sort, no copy).
    """

    def __init__(self, edges: Edges, n: int, device: torch.device | str = "cpu"):
        head = np.asarray(edges.head)
        if head.size and (head.min() < 0 or head.max() >= n):
            raise ValueError(f"NeighborSampler: edge heads must lie in [0, {n}), got [{head.min()}, {head.max()}]")
        order = np.lexsort((edges.tail, head))
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(head, minlength=n), out=indptr[1:])
        tail = np.asarray(edges.tail)[order].astype(_index_dtype(int(np.max(edges.tail, initial=0)) + 1), copy=False)
        weight = np.asarray(edges.weight)[order].astype(np.float64)
        del order
        self._build(indptr, tail, weight, device)

    @classmethod
    def from_csr(
        cls, indptr: np.ndarray, tail: np.ndarray, weight: np.ndarray, device: torch.device | str = "cpu"
    ) -> NeighborSampler:
        """A sampler of the rows ``0..len(indptr) - 2`` of a CSR matrix, without sorting or copying.

        Parameters
        ----------
        indptr : int64 (m + 1,)
            Row ``i``'s edges are ``tail[indptr[i]:indptr[i + 1]]``.
        tail : int32 or int64 (E,)
            Column of each edge (any index space: a neighbour's global row, say).
        weight : float64 (E,)
            ``P_ij`` of each edge; **overwritten** with the running sum (the sampler keeps it).
        device : torch.device
        """
        sampler = cls.__new__(cls)
        sampler._build(np.asarray(indptr, dtype=np.int64), np.asarray(tail), weight, device)
        return sampler

    def _build(self, indptr: np.ndarray, tail: np.ndarray, weight: np.ndarray, device) -> None:
        n = len(indptr) - 1
        if not (isinstance(weight, np.ndarray) and weight.dtype == np.float64 and weight.ndim == 1):
            raise TypeError(f"NeighborSampler: weight must be a 1-D float64 array, got {getattr(weight, 'dtype', type(weight))}")
        if tail.shape != weight.shape or indptr[0] != 0 or indptr[-1] != weight.size:
            raise ValueError(
                f"NeighborSampler: indptr (ending at {indptr[-1]}), tail {tail.shape} and weight {weight.shape} disagree"
            )
        empty = indptr[1:] == indptr[:-1]
        row_sum = np.zeros(n)
        if weight.size and not empty.all():
            row_sum[~empty] = np.add.reduceat(weight, indptr[:-1][~empty])
        if np.any(row_sum <= 0):
            bad = np.flatnonzero(row_sum <= 0)[:5].tolist()
            raise ValueError(f"NeighborSampler: points without neighbours in P, e.g. ids {bad}")
        np.cumsum(weight, out=weight)
        self.n = int(n)
        self.device = torch.device(device)
        self.indptr = torch.as_tensor(indptr, device=self.device)
        self.tail = torch.as_tensor(tail, device=self.device)
        self.cumw = torch.as_tensor(weight, device=self.device)
        self.row_sum = torch.as_tensor(row_sum, device=self.device)
        # Importance weight n * P_i makes the anchor-uniform draw unbiased for P.
        self.importance = (self.row_sum * self.n).float()

    @property
    def n_edges(self) -> int:
        return int(self.tail.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of the sampler's tensors."""
        return sum(t.element_size() * t.nelement()
                   for t in (self.indptr, self.tail, self.cumw, self.row_sum, self.importance))

    def sample(
        self, anchors: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One neighbour per anchor (int64) and its importance weight."""
        start = self.indptr[anchors]
        stop = self.indptr[anchors + 1]
        base = torch.where(start > 0, self.cumw[(start - 1).clamp(min=0)], torch.zeros_like(self.row_sum[anchors]))
        u = torch.rand(anchors.shape[0], generator=generator, device=self.device, dtype=torch.float64)
        target = base + u * self.row_sum[anchors]
        pos = torch.searchsorted(self.cumw, target, right=True)
        pos = torch.minimum(torch.maximum(pos, start), stop - 1)
        return self.tail[pos].long(), self.importance[anchors]


def _index_dtype(n: int) -> np.dtype:
    """int32 for indices below ``n < 2**31``, else int64."""
    return np.dtype(np.int32) if n < 2**31 else np.dtype(np.int64)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: TSNELoss,
    x_anchor: torch.Tensor,
    x_neighbor: torch.Tensor,
    weight: torch.Tensor | None,
    n_total: int,
    exaggeration: float,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """One optimisation step on a batch of anchors and their sampled neighbours.

    With ``autocast_dtype`` (see :func:`ptsne.device.resolve_precision`) the
    forward pass runs under autocast; the loss is computed in float32. Returns
    ``loss``, ``attraction`` and ``log_z`` as detached 0-d tensors on the model's
    device: reading them is left to the caller, so a GPU step never waits for the host.
    """
    b = x_anchor.shape[0]
    m = x_neighbor.shape[0] // b  # neighbours per anchor, anchor-major order
    x = torch.cat([x_anchor, x_neighbor])
    with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        y = model(x)
    y = y.float()
    y_anchor, y_neighbor = y[:b], y[b:]
    y_head = y_anchor if m == 1 else y_anchor.repeat_interleave(m, dim=0)
    loss, parts = loss_fn(y_head, y_neighbor, y_anchor, n_total, weight, exaggeration)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": loss.detach(), **parts}


#: The per-step figures that :func:`run_epoch` averages, in order.
STEP_METRICS = ("loss", "attraction", "log_z")

#: A batch of one step: anchor features, neighbour features (anchor-major), importance weights.
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def run_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: TSNELoss,
    batches: Iterable[Batch],
    n_total: int,
    exaggeration: float,
    autocast_dtype: torch.dtype | None = None,
    on_step: Callable[[], None] | None = None,
) -> torch.Tensor:
    """One epoch of :func:`train_step` over ``batches``, used by :func:`fit_mapper` and the Ray workers.

    Returns the mean of :data:`STEP_METRICS` over the steps as a float64 tensor (3,)
    on the model's device; the sums stay there, so the host reads them once an epoch.
    """
    sums = None
    steps = 0
    for x_anchor, x_neighbor, weight in batches:
        out = train_step(model, optimizer, loss_fn, x_anchor, x_neighbor, weight, n_total, exaggeration,
                         autocast_dtype)
        scheduler.step()
        step = torch.stack([out[key] for key in STEP_METRICS]).double()
        sums = step if sums is None else sums + step
        steps += 1
        if on_step is not None:
            on_step()
    if sums is None:
        raise ValueError("run_epoch: no batches")
    return sums / steps


def epoch_metrics(epoch: int, means: Sequence[float], config: TrainConfig, learning_rate: float,
                  seconds: float) -> dict:
    """The per-epoch record of :func:`fit_mapper` and the Ray workers (keys in its docstring)."""
    return {
        **{key: float(v) for key, v in zip(STEP_METRICS, means)},
        "epoch": epoch,
        "exaggeration": float(config.exaggeration_at(epoch)),
        "phase": "early_exaggeration" if epoch < config.early_epochs else "embedding",
        "learning_rate": float(learning_rate),
        "seconds": float(seconds),
    }


def to_device(array: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A float32 or index array as a tensor on ``device``: zero-copy on CPU, pinned and asynchronous to a GPU."""
    t = torch.as_tensor(array)
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam: fused into one kernel on a GPU; ``foreach`` on CPU (torch's CPU default updates parameters one by one)."""
    on_cuda = next(model.parameters()).device.type == "cuda"
    return torch.optim.Adam(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay,
        **({"fused": True} if on_cuda else {"foreach": True}),
    )


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine decay from the peak learning rate to 1% of it over all steps."""
    total = max(1, config.n_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total))
    )


def fit_mapper(
    model: nn.Module,
    X: np.ndarray | torch.Tensor,
    edges: Edges,
    config: TrainConfig,
    device: torch.device | str = "cpu",
    callbacks: Sequence[Callback] = (),
    verbose: bool = False,
) -> list[dict]:
    """Train ``model`` in place so that ``model(X)`` minimises KL(P || Q).

    Parameters
    ----------
    model : nn.Module
        Maps float32 ``(b, dim)`` to ``(b, n_components)``.
    X : array (n, dim)
        Features of every point of P.
    edges : Edges
        Joint affinities over the ``n`` points.
    config : TrainConfig
    device : torch.device or str
    callbacks : sequence of Callback
        Called after each epoch with ``(epoch, metrics)``; returning True stops.
    verbose : bool
        Show a progress bar.

    Returns
    -------
    list of dict
        Per-epoch metrics: ``epoch``, ``loss``, ``attraction``, ``log_z``,
        ``exaggeration``, ``phase``, ``learning_rate``, ``seconds``.
    """
    device = torch.device(device)
    Xt = torch.as_tensor(np.asarray(X, dtype=np.float32) if not torch.is_tensor(X) else X)
    Xt = Xt.to(device=device, dtype=torch.float32)
    n = Xt.shape[0]
    if n < 2:
        raise ValueError(f"fit_mapper: need at least 2 points, got {n}")
    model.to(device).train()
    sampler = NeighborSampler(edges, n, device)
    loss_fn = TSNELoss(config.dof)
    optimizer = make_optimizer(model, config)
    autocast_dtype = resolve_precision(config.precision, device)
    batch = min(config.batch_size, n)
    m = config.positives_per_anchor
    steps = n // batch  # the partial last batch is dropped: Z needs full batches
    scheduler = make_scheduler(optimizer, config, steps)
    gen = torch.Generator(device=device).manual_seed(config.seed)
    history: list[dict] = []
    # TF32 on CUDA for float32 products while training only (restored after).
    bar = tqdm(total=config.n_epochs * steps, desc="ptsne fit", unit="step", disable=not verbose)
    with training_precision(device, autocast_dtype), bar:
        for epoch in range(config.n_epochs):
            t0 = time.perf_counter()
            exaggeration = config.exaggeration_at(epoch)
            order = torch.randperm(n, generator=gen, device=device)

            def batches(order=order):
                for s in range(steps):
                    anchors = order[s * batch : (s + 1) * batch]
                    heads = anchors if m == 1 else anchors.repeat_interleave(m)
                    tails, weight = sampler.sample(heads, gen)
                    yield Xt[anchors], Xt[tails], weight

            means = run_epoch(model, optimizer, scheduler, loss_fn, batches(), n, exaggeration, autocast_dtype,
                              on_step=lambda: bar.update(1))
            metrics = epoch_metrics(epoch, means.tolist(), config, scheduler.get_last_lr()[0],
                                    time.perf_counter() - t0)
            history.append(metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", exag=exaggeration)
            log.debug("epoch %d: %s", epoch, metrics)
            if any(cb(epoch, metrics) for cb in callbacks):
                log.info("training stopped by a callback after epoch %d", epoch)
                break
    model.eval()
    return history
