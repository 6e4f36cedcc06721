"""`model=mlp`: fully connected network on the whole spectrum."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from torch import nn

from stellarlab.checks import IntList, Number
from stellarlab.models.base import Activation, SpectrumRegressor, activation

#: Arguments the networks share, with their rules.
HiddenSizes = Annotated[Sequence[int], IntList(example="model.hidden_sizes=[256,128]")]
Dropout = Annotated[float, Number(minimum=0, below=1, example="model.dropout=0.1")]


def dense_stack(n_in: int, hidden_sizes: Sequence[int], n_out: int, act: str, dropout: float, batch_norm: bool) -> nn.Sequential:
    """Linear -> [BatchNorm] -> activation -> [Dropout] per hidden layer, then a linear output layer."""
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
        hidden_sizes: HiddenSizes = (256, 128),
        activation: Activation = "gelu",
        dropout: Dropout = 0.0,
        batch_norm: bool = False,
        **kwargs,
    ):
        super().__init__(n_pixels=n_pixels, label_names=label_names, **kwargs)
        self.net = dense_stack(n_pixels, list(hidden_sizes), self.n_outputs, activation, dropout, batch_norm)
