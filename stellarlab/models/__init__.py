"""LightningModules: every model on the `SpectrumRegressor` base."""

from stellarlab.models.base import SpectrumRegressor
from stellarlab.models.cnn import CNNRegressor
from stellarlab.models.linear import LinearRegressor
from stellarlab.models.losses import masked_mse
from stellarlab.models.mlp import MLPRegressor

__all__ = ["CNNRegressor", "LinearRegressor", "MLPRegressor", "SpectrumRegressor", "masked_mse"]
