"""GALAH: `galah4` (data=galah, the `simbaswe/galah4` arrays) and `dr4` (data=galah_dr4, the official
release, whose files `dr4_files` reads), on the shared base in `common`; `download` is galah4's recipe.

`dr4_files` and `download` need no torch, so the DataModules are imported here on first use only.
"""

import importlib

_EXPORTS = {
    "GALAH4DataModule": "stellarlab.data.galah.galah4",
    "GALAHDR4DataModule": "stellarlab.data.galah.dr4",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'stellarlab.data.galah' has no attribute {name!r}")
