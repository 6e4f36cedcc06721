"""A realistic label prior: stars along an HR diagram with Galactic-disc chemistry.

A uniform (Teff, log g, [Fe/H], [alpha/Fe]) box contains unphysical corners (7000 K at log g 0) and no
label correlations, so a model trained on it learns neither the real label distribution nor the real
degeneracies. Here stars are drawn from populations that lie near isochrones (approximate, hand-fitted
relations; ~50-100 K / 0.1 dex fidelity, enough for a training prior):

* chemistry: thin disc (low alpha), thick disc (high-alpha sequence) and halo, so [Fe/H] has a disc peak
  near -0.1 and a metal-poor tail to -2.5, and [alpha/Fe] rises from ~0 at [Fe/H] > 0 to ~+0.3 below -1;
* main-sequence dwarfs (log g from a mass-radius-like relation, with some evolution off the ZAMS),
  subgiants, red-giant branch (Teff rising with log g, metal-poor giants hotter) and the red clump.
"""
from __future__ import annotations

import numpy as np

# Population fractions (a magnitude-limited, APOGEE-like mix: giants are over-represented).
FRACTIONS = {"dwarf": 0.40, "subgiant": 0.10, "rgb": 0.35, "clump": 0.15}
TEFF_RANGE = (3500.0, 7000.0)  # where the one-layer physics is credible (docs/synthetic-spectra.md sec. 6)
LOGG_RANGE = (0.3, 5.0)
FEH_RANGE = (-2.5, 0.5)
AFE_RANGE = (-0.15, 0.45)


def _chemistry(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    comp = rng.choice(3, size=n, p=[0.76, 0.17, 0.07])  # thin disc, thick disc, halo
    feh = np.empty(n)
    afe = np.empty(n)
    thin, thick, halo = comp == 0, comp == 1, comp == 2
    feh[thin] = rng.normal(-0.05, 0.22, thin.sum())
    feh[thick] = rng.normal(-0.55, 0.30, thick.sum())
    feh[halo] = rng.normal(-1.5, 0.50, halo.sum())
    feh = np.clip(feh, *FEH_RANGE)
    # Low-alpha sequence: ~0 at solar and above, ~+0.1 at [Fe/H] = -0.7.
    afe[thin] = 0.01 - 0.13 * np.minimum(feh[thin], 0.0) + rng.normal(0, 0.03, thin.sum())
    # High-alpha (thick disc) sequence: plateau ~+0.3 below a knee at [Fe/H] ~ -0.8, declining to ~+0.1.
    knee = np.clip((feh[thick] + 0.8) / 0.8, 0.0, None)
    afe[thick] = 0.30 - 0.22 * knee + rng.normal(0, 0.03, thick.sum())
    afe[halo] = 0.30 + rng.normal(0, 0.05, halo.sum())
    return feh, np.clip(afe, *AFE_RANGE)


def _dwarfs(rng, feh):
    n = feh.size
    # Teff of MS stars in the sample (K to F dwarfs), metal-poor stars slightly hotter at fixed mass.
    teff = rng.triangular(4000.0, 5800.0, 6900.0, n) - 150.0 * feh
    # ZAMS log g ~ 4.75 at 4000 K to ~4.2 at 7000 K, then evolution lowers it (more for hotter, shorter-lived stars).
    x = (teff - 5777.0) / 1000.0
    zams = 4.52 - 0.17 * x - 0.07 * x ** 2
    evol = rng.uniform(0.0, 1.0, n) * np.clip(0.05 + 0.12 * (x + 1.5), 0.0, 0.35)
    return teff, zams - evol + rng.normal(0, 0.04, n)


def _subgiants(rng, feh):
    n = feh.size
    logg = rng.uniform(3.5, 4.1, n)
    teff = rng.uniform(5000.0, 6200.0, n) - 150.0 * feh
    return teff, logg


def _rgb_teff(logg, feh):
    # Fitted to solar-metallicity isochrones: 5000 K at log g 3.4, 4750 K at 2.5, 4350 K at 1.5, ~3850 K at 0.5;
    # ~220 K hotter per dex lower [Fe/H].
    d = logg - 2.5
    return 4750.0 + 330.0 * d - 60.0 * d ** 2 - 220.0 * feh


def _rgb(rng, feh):
    n = feh.size
    # More stars at high log g (the RGB is traversed faster near the tip): density ~ 10^(0.3 log g).
    u = rng.uniform(0.0, 1.0, n)
    lo, hi = 0.5, 3.45
    a, b = 10.0 ** (0.3 * lo), 10.0 ** (0.3 * hi)
    logg = np.log10(a + u * (b - a)) / 0.3
    teff = _rgb_teff(logg, feh) + rng.normal(0, 60.0, n)
    return teff, logg


def _clump(rng, feh):
    n = feh.size
    logg = rng.normal(2.45, 0.10, n)
    teff = 4700.0 - 250.0 * feh + rng.normal(0, 70.0, n)
    return teff, logg


def sample_labels(n: int, seed: int) -> np.ndarray:
    """Draw n label vectors (Teff, log g, [Fe/H], [alpha/Fe]) as float32 (n, 4); deterministic for the seed."""
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]))
    feh, afe = _chemistry(rng, n)
    names = list(FRACTIONS)
    pop = rng.choice(len(names), size=n, p=[FRACTIONS[k] for k in names])
    teff = np.empty(n)
    logg = np.empty(n)
    makers = {"dwarf": _dwarfs, "subgiant": _subgiants, "rgb": _rgb, "clump": _clump}
    for i, name in enumerate(names):
        sel = pop == i
        teff[sel], logg[sel] = makers[name](rng, feh[sel])
    out = np.stack([np.clip(teff, *TEFF_RANGE), np.clip(logg, *LOGG_RANGE), feh, afe], axis=1)
    return out.astype(np.float32)
