"""DataModules: one per survey, all on `SpectraDataModule`.

Each survey's code is a package (`apogee`, `galah`) or module (`synthetic`), found through the registry
`stellarlab.data.surveys`. Names are imported on first use, so the registry and the file readers (used
by the download command and by preprocessing workers) load without torch or Lightning.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "base": ["BatchDataset", "SpectraArrays", "SpectraDataModule"],
        "synthetic": ["SyntheticDataModule"],
        "apogee.datamodule": ["APOGEEDataModule"],
        "galah.galah4": ["GALAH4DataModule"],
        "galah.dr4": ["GALAHDR4DataModule"],
    },
)
