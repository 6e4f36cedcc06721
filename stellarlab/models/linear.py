"""`model=linear`: one affine map from the spectrum to the labels, the simplest data-driven baseline."""

from __future__ import annotations

from torch import nn

from stellarlab.models.base import SpectrumRegressor


class LinearRegressor(SpectrumRegressor):
    def __init__(self, n_pixels: int, label_names, **kwargs):
        super().__init__(n_pixels=n_pixels, label_names=label_names, **kwargs)
        self.net = nn.Linear(n_pixels, self.n_outputs)
