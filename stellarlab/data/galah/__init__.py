"""GALAH: `galah4` (data=galah, the `simbaswe/galah4` arrays) and `dr4` (data=galah_dr4, the official
release, whose files `dr4_files` reads), on the shared base in `common`; `download` is galah4's recipe.

`dr4_files` and `download` need no torch, so the DataModules are imported here on first use only.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "galah4": ["GALAH4DataModule"],
        "dr4": ["GALAHDR4DataModule"],
    },
)
