"""Built-in synthetic stellar-spectrum surveys (APOGEE DR17 H band, GALAH-like optical) and their
Cramér–Rao bounds.

A fast, differentiable one-layer LTE generator, so that every stellarlab command runs without downloads
and models meet the same label degeneracies as in real spectra. Names are imported on first use: the
survey grids (`stellarlab.grids`) and the label names load without torch.
"""

import importlib

LABEL_NAMES = ("teff", "logg", "fe_h", "alpha_fe")

_EXPORTS = {
    "GENERATOR_VERSION": "stellarlab.synthetic.generator",
    "SpectrumGenerator": "stellarlab.synthetic.generator",
    "LineList": "stellarlab.synthetic.linelist",
    "load_linelist": "stellarlab.synthetic.linelist",
    "sample_labels": "stellarlab.synthetic.prior",
    "SyntheticSurvey": "stellarlab.synthetic.survey",
    "make_survey": "stellarlab.synthetic.survey",
}

__all__ = ["LABEL_NAMES", *sorted(_EXPORTS)]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'stellarlab.synthetic' has no attribute {name!r}")
