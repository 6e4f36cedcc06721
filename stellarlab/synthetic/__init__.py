"""Built-in synthetic stellar-spectrum surveys (APOGEE DR17 H band, GALAH-like optical).

A fast, differentiable one-layer LTE generator (see the design note `synthetic-spectra.md`) so that every
stellarlab command runs without downloads and models meet the same label degeneracies as in real spectra.
"""
from .generator import GENERATOR_VERSION, LABEL_NAMES, SpectrumGenerator
from .grids import (APOGEE_CHIP_RANGES, GALAH_ARMS, SURVEYS, air_to_vacuum, apogee_chip_mask, apogee_wavelength,
                    galah_wavelength)
from .linelist import LineList, load_linelist
from .prior import sample_labels
from .survey import SyntheticSurvey, make_survey

__all__ = [
    "LABEL_NAMES", "SpectrumGenerator", "sample_labels", "make_survey", "SyntheticSurvey",
    "apogee_wavelength", "apogee_chip_mask", "galah_wavelength", "APOGEE_CHIP_RANGES",
    "GALAH_ARMS", "SURVEYS", "GENERATOR_VERSION", "air_to_vacuum", "LineList", "load_linelist",
]
