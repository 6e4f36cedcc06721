"""DataModules: one per survey, all on `SpectraDataModule`.

Each survey's code is a package (`apogee`, `galah`) or module (`synthetic`), found through the registry
`stellarlab.data.surveys`. Names are imported on first use, so the registry and the file readers (used
by the download command and by preprocessing workers) load without torch or Lightning.
"""

import importlib

_EXPORTS = {
    "BatchDataset": "stellarlab.data.base",
    "SpectraArrays": "stellarlab.data.base",
    "SpectraDataModule": "stellarlab.data.base",
    "SyntheticDataModule": "stellarlab.data.synthetic",
    "APOGEEDataModule": "stellarlab.data.apogee.datamodule",
    "GALAH4DataModule": "stellarlab.data.galah.galah4",
    "GALAHDR4DataModule": "stellarlab.data.galah.dr4",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'stellarlab.data' has no attribute {name!r}")
