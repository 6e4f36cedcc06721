"""DataModules: one per survey, all on `SpectraDataModule`."""

from stellarlab.data.base import BatchDataset, SpectraArrays, SpectraDataModule
from stellarlab.data.synthetic import SyntheticDataModule

__all__ = ["BatchDataset", "SpectraArrays", "SpectraDataModule", "SyntheticDataModule"]
