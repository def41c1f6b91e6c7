"""The mapper: input standardisation followed by an MLP with a linear output."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ptsne.settings import setting, validate

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "elu": nn.ELU}
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
    activation: str = setting("relu", "hidden activation", choices=tuple(sorted(ACTIVATIONS)))
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


class Standardize(nn.Module):
    """``(x - mean) / scale`` with a single scale, keeping the relative feature variances."""

    def __init__(self, n_inputs: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_inputs))
        self.register_buffer("scale", torch.ones(()))

    @torch.no_grad()
    def fit(self, X: np.ndarray) -> Standardize:
        X = np.asarray(X, dtype=np.float64)
        mean = X.mean(axis=0)
        scale = float(np.sqrt(((X - mean) ** 2).sum(axis=1).mean())) or 1.0
        self.mean.copy_(torch.as_tensor(mean, dtype=self.mean.dtype))
        self.scale.fill_(scale)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale


class OutputLinear(nn.Linear):
    """The output layer, always in float32.

    Under mixed-precision training the hidden layers run in bfloat16 while the
    coordinates keep full precision: a bfloat16 coordinate near 30 is only good
    to about 0.1, the scale of a point's nearest-neighbour distances.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return super().forward(x.float())


class Mapper(nn.Module):
    """Standardisation followed by a network from inputs to the embedding."""

    def __init__(self, net: nn.Module, n_inputs: int):
        super().__init__()
        self.standardize = Standardize(n_inputs)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.standardize(x))


def build_mlp(config: ModelConfig) -> nn.Sequential:
    """``Linear -> [LayerNorm] -> activation`` per hidden width, then a float32 linear output."""
    if config.n_inputs is None:
        raise ValueError("build_mlp: ModelConfig.n_inputs is None; give the input dimension (with_inputs)")
    layers: list[nn.Module] = []
    width = config.n_inputs
    for h in config.hidden_layers:
        layers.append(nn.Linear(width, h))
        if config.layer_norm:
            layers.append(nn.LayerNorm(h))
        layers.append(ACTIVATIONS[config.activation]())
        width = h
    layers.append(OutputLinear(width, config.n_components))
    return nn.Sequential(*layers)


def build_mapper(config: ModelConfig, net: nn.Module | None = None) -> Mapper:
    """The default MLP mapper for ``config``, or ``net`` wrapped with standardisation."""
    return Mapper(build_mlp(config) if net is None else net, config.n_inputs)
