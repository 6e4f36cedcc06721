"""`model=cnn`: 1-D convolution blocks along wavelength, then a dense head.

Convolutions share weights along the spectrum, so a line shape learnt in one place is recognised
everywhere: far fewer parameters than an MLP on 8575 pixels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import torch
from torch import nn

from stellarlab.checks import IntList, with_defaults
from stellarlab.errors import ConfigError
from stellarlab.models.base import Activation, SpectrumRegressor
from stellarlab.models.base import activation as make_activation
from stellarlab.models.mlp import Dropout, HiddenSizes, dense_stack

BLOCK_LISTS = ("channels", "kernel_sizes", "pool_sizes")


class CNNRegressor(SpectrumRegressor):
    def __init__(
        self,
        n_pixels: int,
        label_names,
        channels: Annotated[Sequence[int], IntList(allow_empty=False, example="model.channels=[8,16,32]")] = (8, 16, 32),
        kernel_sizes: Annotated[Sequence[int], IntList(allow_empty=False, example="model.kernel_sizes=[7,7,7]")] = (7, 7, 7),
        pool_sizes: Annotated[Sequence[int], IntList(allow_empty=False, example="model.pool_sizes=[4,4,4]")] = (4, 4, 4),
        hidden_sizes: HiddenSizes = (128,),
        activation: Activation = "gelu",
        dropout: Dropout = 0.0,
        batch_norm: bool = True,
        **kwargs,
    ):
        super().__init__(n_pixels=n_pixels, label_names=label_names, **kwargs)
        channels, kernel_sizes, pool_sizes = list(channels), list(kernel_sizes), list(pool_sizes)
        blocks: list[nn.Module] = []
        c_in, length = 1, n_pixels
        for c, k, p in zip(channels, kernel_sizes, pool_sizes):
            blocks.append(nn.Conv1d(c_in, int(c), int(k), padding=int(k) // 2))
            if batch_norm:
                blocks.append(nn.BatchNorm1d(int(c)))
            blocks.append(make_activation(activation))
            if int(p) > 1:
                blocks.append(nn.MaxPool1d(int(p)))
            c_in = int(c)
            length = (length + 2 * (int(k) // 2) - int(k) + 1) // max(int(p), 1)
            if length < 1:
                raise ConfigError(
                    f"model.pool_sizes {pool_sizes} shrink the {n_pixels}-pixel spectrum to nothing; use fewer or smaller pools"
                )
        head = dense_stack(c_in * length, list(hidden_sizes), self.n_outputs, activation, dropout, batch_norm=False)
        self.net = nn.Sequential(Unsqueeze(), *blocks, nn.Flatten(), head)

    @classmethod
    def check_together(cls, values: Mapping[str, Any]) -> None:
        """One entry per conv block in each of the three lists (a list left out counts with its default)."""
        given = with_defaults(cls, values)
        lengths = {key: len(given[key]) for key in BLOCK_LISTS}
        if len(set(lengths.values())) > 1:
            raise ConfigError(
                "model.channels, model.kernel_sizes and model.pool_sizes need one entry per conv block; got "
                + ", ".join(f"{n} for model.{k}" for k, n in lengths.items())
                + "; e.g. model.channels=[8,16,32] model.kernel_sizes=[7,7,7] model.pool_sizes=[4,4,4]"
            )


class Unsqueeze(nn.Module):
    """(B, P) spectra -> (B, 1, P): one input channel for Conv1d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(1)
