"""The mapper: input standardisation followed by an MLP with a linear output."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ptsne.configs import ACTIVATION_MODULES, DEFAULT_HIDDEN, LEGACY_HIDDEN, ModelConfig  # noqa: F401 (exported)

#: Hidden activations by name (``ModelConfig.activation``).
ACTIVATIONS = {name: getattr(nn, module) for name, module in ACTIVATION_MODULES.items()}


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
