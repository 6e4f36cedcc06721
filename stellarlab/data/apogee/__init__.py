"""APOGEE DR17: `datamodule` (data=apogee), `catalog` (allStar cuts, file names), `files` (spectrum
readers), `download` (the download recipe).

`catalog`, `files` and `download` need no torch: the download command and preprocessing workers import
them. So the DataModule is imported here on first use only.
"""

import importlib

_EXPORTS = {"APOGEEDataModule": "stellarlab.data.apogee.datamodule"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'stellarlab.data.apogee' has no attribute {name!r}")
