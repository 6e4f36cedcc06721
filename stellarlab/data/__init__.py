"""DataModules: one per survey, all on `SpectraDataModule`.

Names are imported on first use, so `stellarlab.data.apogee_catalog` (used by the download command
and by preprocessing workers) loads without torch or Lightning.
"""

import importlib

_EXPORTS = {
    "BatchDataset": "stellarlab.data.base",
    "SpectraArrays": "stellarlab.data.base",
    "SpectraDataModule": "stellarlab.data.base",
    "SyntheticDataModule": "stellarlab.data.synthetic",
    "APOGEEDataModule": "stellarlab.data.apogee",
    "GALAH4DataModule": "stellarlab.data.galah",
    "GALAHDR4DataModule": "stellarlab.data.galah",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'stellarlab.data' has no attribute {name!r}")
