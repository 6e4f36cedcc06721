"""`model=mlp`: fully connected network on the whole spectrum."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from stellarlab.errors import ConfigError
from stellarlab.models.base import SpectrumRegressor, activation


def dense_stack(n_in: int, hidden_sizes: Sequence[int], n_out: int, act: str, dropout: float, batch_norm: bool) -> nn.Sequential:
    """Linear -> [BatchNorm] -> activation -> [Dropout] per hidden layer, then a linear output layer."""
    if not 0 <= dropout < 1:
        raise ConfigError(f"model.dropout must be in [0, 1), got {dropout}")
    if any(int(h) < 1 for h in hidden_sizes):
        raise ConfigError(f"model.hidden_sizes must be positive integers, got {list(hidden_sizes)}")
    layers: list[nn.Module] = []
    for width in hidden_sizes:
        layers.append(nn.Linear(n_in, int(width)))
        if batch_norm:
            layers.append(nn.BatchNorm1d(int(width)))
        layers.append(activation(act))
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        n_in = int(width)
    layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


class MLPRegressor(SpectrumRegressor):
    def __init__(
        self,
        n_pixels: int,
        label_names,
        hidden_sizes: Sequence[int] = (256, 128),
        activation: str = "gelu",
        dropout: float = 0.0,
        batch_norm: bool = False,
        **kwargs,
    ):
        super().__init__(n_pixels=n_pixels, label_names=label_names, **kwargs)
        self.net = dense_stack(n_pixels, list(hidden_sizes), self.n_outputs, activation, dropout, batch_norm)
