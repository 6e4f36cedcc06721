"""Built-in synthetic stellar-spectrum surveys (APOGEE DR17 H band, GALAH-like optical) and their
Cramér–Rao bounds.

A fast, differentiable one-layer LTE generator, so that every stellarlab command runs without downloads
and models meet the same label degeneracies as in real spectra. Names are imported on first use: the
survey grids (`stellarlab.grids`) and the label names load without torch.
"""

import lazy_loader

LABEL_NAMES = ("teff", "logg", "fe_h", "alpha_fe")

__getattr__, __dir__, _lazy = lazy_loader.attach(
    __name__,
    submod_attrs={
        "generator": ["GENERATOR_VERSION", "SpectrumGenerator"],
        "linelist": ["LineList", "load_linelist"],
        "prior": ["sample_labels"],
        "survey": ["SyntheticSurvey", "make_survey"],
    },
)
__all__ = ["LABEL_NAMES", *_lazy]
