"""Pixel grids of the two built-in surveys.

The generator must produce spectra on exactly the grids real data come on, so that a model trained on
synthetic spectra can be applied to survey files without resampling. APOGEE DR17 apStar/aspcapStar
spectra use a log-uniform vacuum grid with three detector chips; the GALAH-like grid uses the four
HERMES arms in air (the GALAH DR3 line list is in air as well).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

C_KMS = 299792.458  # speed of light, km/s

# APOGEE DR17 apStar grid: log10(lambda) = 4.179 + 6e-6 * i, i = 0..8574 (vacuum, Angstrom).
APOGEE_LOGLAM0 = 4.179
APOGEE_DLOGLAM = 6e-6
APOGEE_NPIX = 8575
APOGEE_RESOLUTION = 22500.0
# DR13-DR17 chip limits (astroNN / jobovy apogee), end-exclusive pixel ranges: 7514 pixels in total.
APOGEE_CHIP_RANGES = ((246, 3274), (3585, 6080), (6344, 8335))
APOGEE_NCHIP_PIXELS = sum(hi - lo for lo, hi in APOGEE_CHIP_RANGES)

# HERMES arms (GALAH): blue, green, red, IR, air Angstrom; 4096 px per arm is an assumption
# (docs/synthetic-spectra.md sec. 0), the one that makes galah4's 16384-pixel rows four arms end to end.
GALAH_ARMS = ((4713.0, 4903.0), (5648.0, 5873.0), (6478.0, 6737.0), (7585.0, 7887.0))
GALAH_NPIX_PER_ARM = 4096
GALAH_RESOLUTION = 28000.0

SURVEYS = ("apogee", "galah")


def apogee_wavelength(gap_deleted: bool = False) -> np.ndarray:
    """Vacuum wavelengths (Angstrom) of the 8575-pixel APOGEE apStar grid, or of its 7514 chip pixels."""
    wl = 10.0 ** (APOGEE_LOGLAM0 + APOGEE_DLOGLAM * np.arange(APOGEE_NPIX, dtype=np.float64))
    return wl[apogee_chip_mask()] if gap_deleted else wl


def apogee_chip_mask() -> np.ndarray:
    """True for the 7514 pixels that fall on one of the three DR17 detector chips."""
    mask = np.zeros(APOGEE_NPIX, dtype=bool)
    for lo, hi in APOGEE_CHIP_RANGES:
        mask[lo:hi] = True
    return mask


def galah_wavelength() -> np.ndarray:
    """Air wavelengths (Angstrom) of the four HERMES arms, each linear with 4096 pixels, end to end."""
    return np.concatenate([np.linspace(lo, hi, GALAH_NPIX_PER_ARM) for lo, hi in GALAH_ARMS])


def air_to_vacuum(wavelength_air: np.ndarray) -> np.ndarray:
    """Air -> vacuum wavelength (Angstrom), VALD / Piskunov formula (docs/synthetic-spectra.md sec. 0)."""
    lam = np.asarray(wavelength_air, dtype=np.float64)
    s2 = (1e4 / lam) ** 2
    n = 1.0 + 8.336624e-5 + 2.408927e-2 / (130.10659 - s2) + 1.599741e-4 / (38.925688 - s2)
    return lam * n


@dataclass(frozen=True)
class Segment:
    """A piece of a grid that is uniformly sampled, either in log-lambda or in lambda.

    The generator oversamples, convolves and bins each segment separately, because the
    sampling law (and hence the LSF width in samples) is only constant within a segment.
    """

    start: int  # first pixel (inclusive) in the full grid
    stop: int  # last pixel (exclusive)
    log_uniform: bool


@dataclass(frozen=True)
class SurveyGrid:
    name: str
    wavelength: np.ndarray  # float64 (P,)
    resolution: float
    segments: tuple[Segment, ...]
    vacuum: bool
    valid_mask: np.ndarray  # bool (P,), False where the instrument records nothing


def survey_grid(name: str) -> SurveyGrid:
    """Grid description for a survey name; ValueError listing the valid names otherwise."""
    key = str(name).lower()
    if key == "apogee":
        return SurveyGrid("apogee", apogee_wavelength(), APOGEE_RESOLUTION,
                          (Segment(0, APOGEE_NPIX, True),), True, apogee_chip_mask())
    if key == "galah":
        n = GALAH_NPIX_PER_ARM
        segs = tuple(Segment(i * n, (i + 1) * n, False) for i in range(len(GALAH_ARMS)))
        wl = galah_wavelength()
        return SurveyGrid("galah", wl, GALAH_RESOLUTION, segs, False, np.ones(wl.size, dtype=bool))
    raise ValueError(f"unknown survey {name!r}; valid surveys: {', '.join(SURVEYS)}")


def pixels_per_fwhm(grid: SurveyGrid) -> np.ndarray:
    """Sampling of the LSF (pixels per resolution element) at every pixel of the grid."""
    wl = grid.wavelength
    step = np.gradient(wl)
    for seg in grid.segments:  # the arms are not contiguous: take the step inside each arm only
        step[seg.start:seg.stop] = np.gradient(wl[seg.start:seg.stop])
    return (wl / grid.resolution) / step
