"""One hidden layer on the whole spectrum: a model that only declares its argument's rule, nowhere else."""

from __future__ import annotations

from typing import Annotated

from torch import nn

from stellarlab.checks import Number
from stellarlab.models.base import SpectrumRegressor


class TinyRegressor(SpectrumRegressor):
    def __init__(
        self,
        n_pixels: int,
        label_names,
        width: Annotated[int, Number(minimum=1, integer=True, example="model.width=16")] = 16,
        **kwargs,
    ):
        super().__init__(n_pixels=n_pixels, label_names=label_names, **kwargs)
        self.net = nn.Sequential(nn.Linear(n_pixels, width), nn.GELU(), nn.Linear(width, self.n_outputs))
