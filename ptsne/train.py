"""Training a mapper on sparse joint affinities.

One epoch visits every point once as an *anchor*, in a fresh random order.
Each anchor ``i`` draws ``positives_per_anchor`` neighbours ``j``, each with
probability ``P_ij / P_i`` (``P_i`` the row sum), so an edge has probability
``P_ij / (n P_i)`` and gets importance weight ``n P_i`` in the attraction; the
anchors of a batch are a uniform sample of the data and their pairs estimate
the normaliser ``Z``. The same :func:`train_step` runs in a single process here
and in every data-parallel worker of ``pipeline.train``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ptsne.affinity import Edges
from ptsne.device import PRECISIONS, resolve_precision
from ptsne.loss import TSNELoss

log = logging.getLogger(__name__)

#: A callback gets ``(epoch, metrics)`` after each epoch and returns True to stop.
Callback = Callable[[int, dict], bool | None]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings.

    Parameters
    ----------
    n_epochs : int
        Passes over the points as anchors.
    batch_size : int
        Anchors per step; each step also embeds one sampled neighbour per anchor,
        and the anchors' ``batch_size * (batch_size - 1)`` pairs estimate ``Z``.
    learning_rate : float
        Peak Adam learning rate; it decays along a cosine to 1% at the end.
    early_exaggeration : float
        Attraction factor during the first ``early_exaggeration_fraction`` of the epochs
        (>= 1, like ``exaggeration``).
    early_exaggeration_fraction : float
        Share of the epochs run with early exaggeration, in ``[0, 1)``.
    exaggeration : float
        Attraction factor after the early phase (1 is plain t-SNE; the default 1.5
        separates clusters a little more, which the MNIST benchmark rewards). At least 1:
        with a factor ``rho < 1`` the loss falls like ``2 (rho - 1) log s`` as the map is
        scaled by ``s``, so it has no minimum.
    dof : float
        Degrees of freedom of the Student-t kernel.
    weight_decay : float
        Adam weight decay.
    positives_per_anchor : int
        Neighbours drawn per anchor for the attraction in each step.
    seed : int
        Seed of the anchor order, the neighbour draws and the initial weights.
    precision : str
        Forward pass of training: ``"auto"`` (bfloat16 autocast where the device
        has it in hardware, else float32), ``"float32"`` or ``"bfloat16"``. The
        loss, the optimiser state and ``transform`` stay in float32.
    """

    n_epochs: int = 60
    batch_size: int = 512
    learning_rate: float = 1e-2
    early_exaggeration: float = 4.0
    early_exaggeration_fraction: float = 0.25
    exaggeration: float = 1.5
    dof: float = 1.0
    weight_decay: float = 0.0
    positives_per_anchor: int = 4
    seed: int = 0
    precision: str = "auto"

    def __post_init__(self) -> None:
        _positive_int("n_epochs", self.n_epochs)
        _positive_int("batch_size", self.batch_size, minimum=2)
        _positive_int("positives_per_anchor", self.positives_per_anchor)
        for name in ("learning_rate", "dof"):
            v = getattr(self, name)
            if not (_finite_number(v) and v > 0):
                raise ValueError(f"TrainConfig: {name} must be a finite number > 0, got {v!r}")
        for name in ("early_exaggeration", "exaggeration"):
            v = getattr(self, name)
            if not (_finite_number(v) and v >= 1):
                raise ValueError(
                    f"TrainConfig: {name} must be a finite number >= 1, got {v!r} "
                    "(below 1 the loss decreases without bound as the map expands)"
                )
        if not 0.0 <= self.early_exaggeration_fraction < 1.0:
            raise ValueError(
                "TrainConfig: early_exaggeration_fraction must be in [0, 1), "
                f"got {self.early_exaggeration_fraction!r}"
            )
        if not self.weight_decay >= 0:
            raise ValueError(f"TrainConfig: weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig: precision must be one of {PRECISIONS}, got {self.precision!r}")

    @property
    def early_epochs(self) -> int:
        return int(round(self.n_epochs * self.early_exaggeration_fraction))

    def exaggeration_at(self, epoch: int) -> float:
        return self.early_exaggeration if epoch < self.early_epochs else self.exaggeration


#: ``n_epochs="auto"`` trains for at least this many optimisation steps.
MIN_STEPS = 2000
#: ... and aims at this many, in at most ``TrainConfig.n_epochs`` epochs.
TARGET_STEPS = 2400
#: ... and at least this many epochs, so that every point is an anchor a few times.
MIN_EPOCHS = 10


def default_epochs(n: int, batch_size: int = TrainConfig.batch_size) -> int:
    """Epochs for ``n`` points at ``batch_size`` anchors per step.

    About :data:`TARGET_STEPS` steps, within ``[MIN_EPOCHS, TrainConfig.n_epochs]``
    epochs (21 for MNIST's 60k points at 512, 10 from about 125k points on), and never
    fewer than :data:`MIN_STEPS` steps (small datasets need more passes). 2400 steps
    give the MNIST network the figures of 3500 within their seed spread (1-NN 0.943,
    T(12) 0.953) in two thirds of the time; the reference map does the fine work.
    """
    steps_per_epoch = max(1, n // max(1, min(batch_size, n)))
    epochs = min(TrainConfig.n_epochs, max(MIN_EPOCHS, math.ceil(TARGET_STEPS / steps_per_epoch)))
    return max(epochs, math.ceil(MIN_STEPS / steps_per_epoch))


def _finite_number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def _positive_int(name: str, v, minimum: int = 1) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise ValueError(f"TrainConfig: {name} must be an integer >= {minimum}, got {v!r}")


class NeighborSampler:
    """Draws one neighbour per anchor from the rows of a sparse joint P (on any device).

    Parameters
    ----------
    edges : Edges
        Joint affinities; need not be sorted.
    n : int
        Number of points.
    device : torch.device
    """

    def __init__(self, edges: Edges, n: int, device: torch.device | str = "cpu"):
        order = np.lexsort((edges.tail, edges.head))
        head = edges.head[order]
        weight = edges.weight[order].astype(np.float64)
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(head, minlength=n), out=indptr[1:])
        row_sum = np.add.reduceat(weight, indptr[:-1]) if len(weight) else np.zeros(n)
        row_sum[indptr[:-1] == indptr[1:]] = 0.0
        if np.any(row_sum <= 0):
            bad = np.flatnonzero(row_sum <= 0)[:5].tolist()
            raise ValueError(f"NeighborSampler: points without neighbours in P, e.g. ids {bad}")
        self.n = int(n)
        self.device = torch.device(device)
        self.indptr = torch.as_tensor(indptr, device=self.device)
        self.tail = torch.as_tensor(edges.tail[order], device=self.device)
        self.cumw = torch.as_tensor(np.cumsum(weight), device=self.device)
        self.row_sum = torch.as_tensor(row_sum, device=self.device)
        # Importance weight n * P_i makes the anchor-uniform draw unbiased for P.
        self.importance = (self.row_sum * self.n).float()

    def sample(
        self, anchors: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One neighbour per anchor and its importance weight."""
        start = self.indptr[anchors]
        stop = self.indptr[anchors + 1]
        base = torch.where(start > 0, self.cumw[(start - 1).clamp(min=0)], torch.zeros_like(self.row_sum[anchors]))
        u = torch.rand(anchors.shape[0], generator=generator, device=self.device, dtype=torch.float64)
        target = base + u * self.row_sum[anchors]
        pos = torch.searchsorted(self.cumw, target, right=True)
        pos = torch.minimum(torch.maximum(pos, start), stop - 1)
        return self.tail[pos], self.importance[anchors]


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
) -> dict[str, float]:
    """One optimisation step on a batch of anchors and their sampled neighbours.

    With ``autocast_dtype`` (see :func:`ptsne.device.resolve_precision`) the
    forward pass runs under autocast; the loss is computed in float32.
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
    return {"loss": float(loss.detach()), **{k: float(v) for k, v in parts.items()}}


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    # foreach: one fused update over all parameters (torch's CPU default updates them one by one).
    return torch.optim.Adam(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay, foreach=True
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
    bar = tqdm(total=config.n_epochs * steps, desc="ptsne fit", unit="step", disable=not verbose)
    try:
        for epoch in range(config.n_epochs):
            t0 = time.perf_counter()
            exaggeration = config.exaggeration_at(epoch)
            order = torch.randperm(n, generator=gen, device=device)
            sums = {"loss": 0.0, "attraction": 0.0, "log_z": 0.0}
            for s in range(steps):
                anchors = order[s * batch : (s + 1) * batch]
                heads = anchors if m == 1 else anchors.repeat_interleave(m)
                tails, weight = sampler.sample(heads, gen)
                out = train_step(
                    model, optimizer, loss_fn, Xt[anchors], Xt[tails], weight, n, exaggeration,
                    autocast_dtype,
                )
                scheduler.step()
                for key in sums:
                    sums[key] += out[key]
                bar.update(1)
            metrics = {key: v / steps for key, v in sums.items()}
            metrics.update(
                epoch=epoch,
                exaggeration=exaggeration,
                phase="early_exaggeration" if epoch < config.early_epochs else "embedding",
                learning_rate=scheduler.get_last_lr()[0],
                seconds=time.perf_counter() - t0,
            )
            history.append(metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", exag=exaggeration)
            log.debug("epoch %d: %s", epoch, metrics)
            if any(cb(epoch, metrics) for cb in callbacks):
                log.info("training stopped by a callback after epoch %d", epoch)
                break
    finally:
        bar.close()
    model.eval()
    return history
