"""Calibration of predicted uncertainties: are the sigmas a model quotes the sigmas it achieves?

For each label, z = (prediction - truth) / sigma. If the predicted sigmas are right and the errors
Gaussian, z is standard normal: 68.3 % of |z| < 1, 95.4 % of |z| < 2, std(z) = mad_std(z) = 1.
std(z) > 1 means over-confident sigmas, < 1 under-confident; `mad_std` is the same question asked of
the core of the distribution, robust to the few catastrophic outliers that inflate std.
Pure numpy so that reports, benchmarks and tests can use it without a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from astropy.stats import mad_std

# What |z| < k covers for a standard normal: the reference every fraction is read against.
GAUSSIAN_COVERAGE = {1: math.erf(1 / math.sqrt(2)), 2: math.erf(2 / math.sqrt(2))}
CALIBRATION_NAMES = ("frac_within_1sigma", "frac_within_2sigma", "z_std", "z_mad_std", "z_median", "mean_sigma", "rms_sigma")


def z_scores(pred: np.ndarray, true: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """(pred - true) / sigma elementwise; NaN where the truth is missing or sigma is not positive."""
    pred, true, sigma = (np.asarray(a, dtype=np.float64) for a in (pred, true, sigma))
    if not pred.shape == true.shape == sigma.shape:
        raise ValueError(f"pred {pred.shape}, true {true.shape} and sigma {sigma.shape} must have one shape")
    ok = np.isfinite(pred) & np.isfinite(true) & np.isfinite(sigma) & (sigma > 0)
    return np.where(ok, (pred - true) / np.where(ok, sigma, 1.0), np.nan)


def calibration_summary(z: np.ndarray, sigma: np.ndarray | None = None) -> dict[str, float]:
    """Coverage and spread of one label's z-scores (NaN entries ignored); sigma adds its mean and RMS.

    `rms_sigma` = sqrt(mean(sigma^2)) is what the RMSE should equal if the sigmas are right.
    """
    z = np.asarray(z, dtype=np.float64).ravel()
    ok = np.isfinite(z)
    zz = z[ok]
    n = int(zz.size)
    out: dict[str, float] = {}
    if n == 0:
        out.update({name: math.nan for name in CALIBRATION_NAMES})
    else:
        out["frac_within_1sigma"] = float(np.mean(np.abs(zz) < 1.0))
        out["frac_within_2sigma"] = float(np.mean(np.abs(zz) < 2.0))
        out["z_std"] = float(np.std(zz))
        out["z_mad_std"] = float(mad_std(zz))
        out["z_median"] = float(np.median(zz))
        if sigma is not None:
            s = np.asarray(sigma, dtype=np.float64).ravel()[ok]
            out["mean_sigma"] = float(np.mean(s))
            out["rms_sigma"] = float(np.sqrt(np.mean(s**2)))
        else:
            out["mean_sigma"] = out["rms_sigma"] = math.nan
    out["n"] = n
    return out


def calibration(pred: np.ndarray, true: np.ndarray, sigma: np.ndarray, names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per-label calibration of (N, L) predictions with (N, L) sigmas against (N, L) truths (NaN = missing)."""
    pred = np.asarray(pred, dtype=np.float64)
    if pred.ndim != 2 or pred.shape[1] != len(names):
        raise ValueError(f"pred has shape {pred.shape}; expected (N, {len(names)}) for labels {list(names)}")
    z = z_scores(pred, true, sigma)
    sigma = np.asarray(sigma, dtype=np.float64)
    return {name: calibration_summary(z[:, j], sigma[:, j]) for j, name in enumerate(names)}


__all__ = ["GAUSSIAN_COVERAGE", "CALIBRATION_NAMES", "z_scores", "calibration_summary", "calibration"]
