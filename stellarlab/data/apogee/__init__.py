"""APOGEE DR17: `datamodule` (data=apogee), `catalog` (allStar cuts, file names), `files` (spectrum
readers), `download` (the download recipe).

`catalog`, `files` and `download` need no torch: the download command and preprocessing workers import
them. So the DataModule is imported here on first use only.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "datamodule": ["APOGEEDataModule"],
    },
)
