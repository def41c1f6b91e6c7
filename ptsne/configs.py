"""The settings of the core stages, declared once and importable without torch or FAISS.

Each stage's config (:class:`KNNConfig`, :class:`ModelConfig`, :class:`TrainConfig`,
:class:`ReferenceConfig`) is a frozen dataclass whose user settings are declared with
:func:`ptsne.settings.setting`; the stage modules (``ptsne.knn``, ``ptsne.model``,
``ptsne.train``, ``ptsne.reference``) export them too. They live here, with the
constants their declarations name, so that the command line (``jobs.settings``) is
built from them without importing torch or FAISS: ``ptsne --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ptsne.settings import setting, validate

#: Where a stage runs (``ptsne.device.resolve_device``).
DEVICES = ("auto", "cpu", "cuda")
#: Forward-pass precisions of training (``ptsne.device.resolve_precision``).
PRECISIONS = ("auto", "float32", "bfloat16")

# -- kNN ---------------------------------------------------------------------------------

#: kNN indexes (``ptsne.knn.METHODS``).
KNN_METHODS = ("auto", "exact", "ivf")
#: Above this many indexed points ``method="auto"`` switches from exact to IVF on CPU.
EXACT_MAX_POINTS = 200_000


@dataclass(frozen=True)
class KNNConfig:
    """Settings of the kNN stage, declared with :func:`ptsne.settings.setting`.

    ``method="auto"`` is exact up to :data:`EXACT_MAX_POINTS` points, IVF beyond;
    ``device="auto"`` takes a GPU when FAISS sees one (:func:`ptsne.knn.resolve_knn_device`).
    """

    n_neighbors: int = setting(90, "neighbours per point, self excluded", ge=1)
    method: str = setting("auto", "FAISS index: exact, IVF, or 'auto' by the number of points", choices=KNN_METHODS)
    target_recall: float = setting(0.95, "IVF only: nprobe is raised until sampled recall@k reaches this",
                                   gt=0, le=1)
    device: str = setting("auto", "where FAISS searches", choices=DEVICES)
    n_threads: int | None = setting(None, "OpenMP threads of FAISS on CPU; without it, the current setting", ge=1)
    seed: int = setting(0, "seed of the IVF training sample and of the recall probe")

    def __post_init__(self) -> None:
        validate(self)


# -- the mapper --------------------------------------------------------------------------

#: Hidden activations by name, with their ``torch.nn`` classes (``ptsne.model.ACTIVATIONS``).
ACTIVATION_MODULES = {"relu": "ReLU", "gelu": "GELU", "silu": "SiLU", "tanh": "Tanh", "elu": "ELU"}
#: Default hidden widths, chosen on the MNIST benchmark for quality per second.
DEFAULT_HIDDEN = (256, 256, 256)
#: The widths of the original parametric t-SNE network, available by name.
LEGACY_HIDDEN = (500, 500, 2000)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the default MLP mapper.

    Parameters
    ----------
    n_inputs : int or None
        Input dimension (after the optional PCA); None for an architecture whose
        input is not known yet (see :meth:`with_inputs`).
    n_components : int
        Output dimension (2 or 3 for maps).
    hidden_layers : tuple of int
        Widths of the hidden layers.
    activation : str
        One of ``relu``, ``gelu``, ``silu``, ``tanh``, ``elu``.
    layer_norm : bool
        Put a LayerNorm after each hidden linear layer.
    """

    n_inputs: int | None = None
    n_components: int = setting(2, "embedding dimension", ge=1)
    hidden_layers: tuple[int, ...] = setting(DEFAULT_HIDDEN, "hidden widths of the MLP")
    activation: str = setting("relu", "hidden activation", choices=tuple(sorted(ACTIVATION_MODULES)))
    layer_norm: bool = setting(False, "a LayerNorm after each hidden linear layer")

    def __post_init__(self) -> None:
        v = self.n_inputs
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1):
            raise ValueError(f"ModelConfig: n_inputs must be a positive integer or None, got {v!r}")
        validate(self)
        if isinstance(self.hidden_layers, (str, bytes)) or not isinstance(
            self.hidden_layers, Sequence
        ):
            raise TypeError(
                f"ModelConfig: hidden_layers must be a sequence of positive integers, "
                f"got {self.hidden_layers!r}"
            )
        widths = tuple(self.hidden_layers)
        if any(isinstance(h, bool) or not isinstance(h, (int, np.integer)) or h < 1 for h in widths):
            raise ValueError(
                f"ModelConfig: hidden_layers must hold positive integers, got {self.hidden_layers!r}"
            )
        object.__setattr__(self, "hidden_layers", tuple(int(h) for h in widths))

    def with_inputs(self, n_inputs: int) -> ModelConfig:
        """This architecture for ``n_inputs`` input dimensions."""
        return dataclasses.replace(self, n_inputs=n_inputs)


# -- training ----------------------------------------------------------------------------

#: ``n_epochs="auto"`` trains for at least this many optimisation steps.
MIN_STEPS = 2000
#: ... and aims at this many, in at most ``TrainConfig.n_epochs`` epochs.
TARGET_STEPS = 3500
#: ... and at least this many epochs, so that every point is an anchor a few times.
MIN_EPOCHS = 10


_BELOW_ONE = "below 1 the loss decreases without bound as the map expands"


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
        loss, the optimiser state and ``transform`` stay in float32. float32 on
        a CUDA GPU multiplies matrices in TF32
        (:func:`ptsne.device.training_precision`, restored after training); never on CPU.
    """

    n_epochs: int = setting(
        60, "passes over the points as anchors", ge=1, flag="--epochs",
        auto=f"about {TARGET_STEPS} steps within {MIN_EPOCHS} to 60 epochs, more for small data")
    batch_size: int = setting(512, "anchors per optimisation step (over all workers together)", ge=2)
    learning_rate: float = setting(1e-2, "peak Adam learning rate, decaying along a cosine to 1%", gt=0)
    early_exaggeration: float = setting(
        4.0, "attraction factor of the early phase", ge=1, why=_BELOW_ONE)
    early_exaggeration_fraction: float = setting(0.25, "share of the epochs run with early exaggeration",
                                                 ge=0, lt=1)
    exaggeration: float = setting(1.5, "attraction factor after the early phase", ge=1, why=_BELOW_ONE)
    dof: float = setting(1.0, "degrees of freedom of the Student-t kernel", gt=0)
    weight_decay: float = setting(0.0, "Adam weight decay", ge=0)
    positives_per_anchor: int = setting(4, "neighbours drawn per anchor in each step", ge=1)
    seed: int = setting(0, "seed of the anchor order, the neighbour draws and the initial weights")
    precision: str = setting(
        "auto", "forward pass of training: 'auto' is bfloat16 autocast where the device has it in hardware "
        "(recent x86 CPUs, CUDA GPUs), else float32, or what the environment variable PTSNE_PRECISION names",
        choices=PRECISIONS)

    def __post_init__(self) -> None:
        validate(self)

    @property
    def early_epochs(self) -> int:
        return int(round(self.n_epochs * self.early_exaggeration_fraction))

    def exaggeration_at(self, epoch: int) -> float:
        return self.early_exaggeration if epoch < self.early_epochs else self.exaggeration


# -- the reference -----------------------------------------------------------------------

#: ``reference_iter="auto"``: first-phase iterations per reference point, at least ``MIN_ITER`` ...
ITER_PER_POINT = 1.5e-3
MIN_ITER = 100
#: ... and second-phase (fine) iterations per point, at least ``MIN_FINE_ITER``.
FINE_ITER_PER_POINT = 4e-4
MIN_FINE_ITER = 40
#: Placement methods of ``transform`` (``ptsne.reference.METHODS``).
PLACEMENT_METHODS = ("auto", "network", "refine")
#: Where a placed point starts.
INITS = ("median", "network")


@dataclass(frozen=True)
class ReferenceConfig:
    """Settings of the reference map and of placing new points on it.

    Parameters
    ----------
    size : int
        At most this many training points form the reference (a uniform sample
        beyond it); 0 trains a network-only model.
    n_iter : int or "auto"
        At most this many gradient-descent iterations of the reference map (exaggeration
        1) with openTSNE's FFT interpolation on intervals of ``coarse_interval`` map
        units; the phase stops earlier once converged (``tol``). ``"auto"``
        (:func:`ptsne.reference.default_iterations`) scales with the number of reference points.
    tol : float
        The first phase stops once t-SNE's objective fell by less than ``tol``
        (relative) over the last ``ptsne.reference.CHECK_EVERY`` iterations; 0 runs all ``n_iter``.
    fine_iter : int or "auto"
        Then this many iterations on intervals of ``fine_interval``, which sharpen the
        local structure; ``"auto"`` scales with the number of points too.
    coarse_interval, fine_interval : float
        Interval widths (map units) of the two phases; an iteration's cost falls with
        the square of the width (0.81, 0.32 and 0.19 s for 1, 1.5 and 2 on MNIST's map).
    learning_rate : float or "auto"
        Of the reference map's optimisation; ``"auto"`` is :data:`ptsne.reference.LEARNING_RATE_PER_POINT`
        times the number of points. The map starts at full size, where gradients are
        small: openTSNE's ``n`` (made for a map growing from a tiny start) leaves it
        slow (KL 2.627 after 100 + 40 iterations on MNIST, against 2.575 at ``4 n``,
        2.548 at ``6.7 n``; ``13 n`` diverges to 2.662).
    transform_perplexity : float
        Perplexity of a new point's affinities to its reference neighbours.
    transform_iter : int
        Iterations of a new point's placement.
    transform_init : {"median", "network"}
        Start of a placed point: the median of its nearest reference points'
        coordinates, or the network's output.
    transform_exaggeration : float
        Attraction factor of the placement.
    grid_spacing : float
        Cell size (map units) of the repulsion grid.
    """

    size: int = setting(
        250_000, "training points kept as the model's reference (a uniform seeded sample beyond it): their "
        "coordinates optimised to t-SNE's objective, on which new points are placed; 0 disables it, for a "
        "network-only model", ge=0, name="reference_size")
    n_iter: int | str = setting(
        "auto", "most gradient-descent iterations of the reference map's first phase (it stops earlier once "
        "converged)", ge=0, name="reference_iter",
        auto=f"{ITER_PER_POINT * 1e3:g} per 1,000 reference points, at least {MIN_ITER}")
    tol: float = 1e-3
    fine_iter: int | str = "auto"
    coarse_interval: float = 2.0
    fine_interval: float = 1.5
    learning_rate: float | str = "auto"
    transform_perplexity: float = 10.0
    transform_iter: int = 15
    transform_init: str = "median"
    transform_exaggeration: float = 1.0
    grid_spacing: float = 0.125

    def __post_init__(self) -> None:
        validate(self)
        for name, minimum in (("fine_iter", 0), ("transform_iter", 0)):
            v = getattr(self, name)
            if name == "fine_iter" and v == "auto":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
                raise ValueError(f"ReferenceConfig: {name} must be an integer >= {minimum}, got {v!r}")
        if isinstance(self.tol, bool) or not isinstance(self.tol, (int, float)) or not 0 <= self.tol < 1:
            raise ValueError(f"ReferenceConfig: tol must be a number in [0, 1), got {self.tol!r}")
        if not (self.learning_rate == "auto" or _positive(self.learning_rate)):
            raise ValueError(
                f"ReferenceConfig: learning_rate must be 'auto' or a number > 0, got {self.learning_rate!r}"
            )
        if not (_positive(self.transform_perplexity) and self.transform_perplexity > 1):
            raise ValueError(
                f"ReferenceConfig: transform_perplexity must be a number > 1, got {self.transform_perplexity!r}"
            )
        if not (_positive(self.transform_exaggeration) and self.transform_exaggeration >= 1):
            raise ValueError(
                "ReferenceConfig: transform_exaggeration must be a number >= 1, "
                f"got {self.transform_exaggeration!r}"
            )
        if self.transform_init not in INITS:
            raise ValueError(f"ReferenceConfig: transform_init must be one of {INITS}, got {self.transform_init!r}")
        for name in ("coarse_interval", "fine_interval"):
            if not _positive(getattr(self, name)):
                raise ValueError(f"ReferenceConfig: {name} must be a number > 0, got {getattr(self, name)!r}")
        if not _positive(self.grid_spacing):
            raise ValueError(f"ReferenceConfig: grid_spacing must be a number > 0, got {self.grid_spacing!r}")

    @property
    def transform_k(self) -> int:
        """Reference neighbours of a new point: ``3 * transform_perplexity``."""
        return int(math.floor(3 * self.transform_perplexity))


def check_size(config: ReferenceConfig, owner: str) -> None:
    """Raise ValueError unless ``config.size`` is 0 or more than ``config.transform_k``.

    A placed point needs more reference points than its ``transform_k``
    neighbours; a smaller reference would fail only after training, in the
    placement's neighbour search. ``owner`` names the class in the message.
    """
    k = config.transform_k
    if 0 < config.size <= k:
        raise ValueError(
            f"{owner}: reference_size must be 0 (no reference) or more than {k} "
            f"(the reference neighbours of a placed point), got {config.size!r}"
        )


def _positive(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float, np.number)) and math.isfinite(v) and v > 0
