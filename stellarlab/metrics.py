"""Per-label regression metrics in physical units, as spectroscopic surveys report them.

RMSE and MAE, the median residual (bias) and the robust scatter `astropy.stats.mad_std`
(what astroNN and The Cannon quote), so results compare with published precisions.
Missing (NaN) true labels are left out per label. `bootstrap_intervals` gives each metric a
percentile-bootstrap confidence interval over the test rows.

Calibration of predicted uncertainties: for each label z = (prediction - truth) / sigma. If the
sigmas a model quotes are right and the errors Gaussian, z is standard normal: 68.3 % of |z| < 1,
95.4 % of |z| < 2, std(z) = mad_std(z) = 1; std(z) > 1 means over-confident sigmas. `mad_std` asks
the same of the core of the distribution, robust to the few catastrophic outliers that inflate std.
Pure numpy, so that reports, benchmarks and tests can use it without a model.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np
from astropy.stats import mad_std

METRIC_NAMES = ("rmse", "mae", "bias", "mad_std")


def label_metrics(pred: np.ndarray, true: np.ndarray, names, train_mean=None) -> dict[str, dict[str, float]]:
    """Metrics of `pred` against `true` (both (N, L), physical units) for each label name.

    With `train_mean` (the training-split label means) also returns `rmse_mean_predictor`, the RMSE of
    always predicting that mean: the floor any useful model must beat.
    """
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    if pred.shape != true.shape or pred.ndim != 2 or pred.shape[1] != len(names):
        raise ValueError(f"pred {pred.shape} and true {true.shape} must both be (N, {len(names)})")
    out: dict[str, dict[str, float]] = {}
    for j, name in enumerate(names):
        ok = np.isfinite(true[:, j])
        resid = pred[ok, j] - true[ok, j]
        n = int(ok.sum())
        if n == 0:
            row = {m: float("nan") for m in METRIC_NAMES}
        else:
            row = {
                "rmse": float(np.sqrt(np.mean(resid**2))),
                "mae": float(np.mean(np.abs(resid))),
                "bias": float(np.median(resid)),
                "mad_std": float(mad_std(resid)),
            }
        row["n"] = n
        if train_mean is not None:
            base = true[ok, j] - float(train_mean[j])
            row["rmse_mean_predictor"] = float(np.sqrt(np.mean(base**2))) if n else float("nan")
        out[name] = row
    return out


# 1 / Phi^-1(3/4): the factor astropy's mad_std applies to the median absolute deviation.
_MAD_TO_STD = 1.482602218505602
# Resampled residuals held in memory at once (float64): ~32 MB, whatever the test-set size.
_MAX_BOOTSTRAP_ELEMENTS = 4_000_000


def _resampled_metrics(resid: np.ndarray, rng: np.random.Generator, n_resamples: int) -> dict[str, np.ndarray]:
    """Each metric of METRIC_NAMES on `n_resamples` resamplings (with replacement) of `resid`."""
    n = len(resid)
    out = {m: np.empty(n_resamples) for m in METRIC_NAMES}
    chunk = max(1, _MAX_BOOTSTRAP_ELEMENTS // n)
    for start in range(0, n_resamples, chunk):
        stop = min(n_resamples, start + chunk)
        sample = resid[rng.integers(0, n, size=(stop - start, n))]
        median = np.median(sample, axis=1)
        out["rmse"][start:stop] = np.sqrt(np.mean(sample**2, axis=1))
        out["mae"][start:stop] = np.mean(np.abs(sample), axis=1)
        out["bias"][start:stop] = median
        out["mad_std"][start:stop] = _MAD_TO_STD * np.median(np.abs(sample - median[:, None]), axis=1)
    return out


def bootstrap_intervals(
    pred: np.ndarray,
    true: np.ndarray,
    names,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, list[float]]]:
    """Percentile-bootstrap intervals of every metric of METRIC_NAMES, per label: {label: {'rmse_ci': [lo, hi], ...}}.

    Why: a test set of a few hundred stars moves an RMSE by several per cent from one draw to the next;
    the interval tells whether two runs really differ. Test rows are resampled with replacement, rows
    with a missing (NaN) true label left out per label. Each label draws from its own generator seeded
    with (seed, label name), so its interval does not depend on which other labels are fitted.
    """
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    if pred.shape != true.shape or pred.ndim != 2 or pred.shape[1] != len(names):
        raise ValueError(f"pred {pred.shape} and true {true.shape} must both be (N, {len(names)})")
    n_resamples = int(n_resamples)
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must be between 0 and 1 (e.g. 0.95), got {level}")
    tail = 50.0 * (1.0 - float(level))  # per cent in each tail
    out: dict[str, dict[str, list[float]]] = {}
    for j, name in enumerate(names):
        ok = np.isfinite(true[:, j])
        resid = pred[ok, j] - true[ok, j]
        if len(resid) == 0:
            out[name] = {f"{m}_ci": [float("nan"), float("nan")] for m in METRIC_NAMES}
            continue
        rng = np.random.default_rng([int(seed), zlib.crc32(str(name).encode())])
        stats = _resampled_metrics(resid, rng, n_resamples)
        out[name] = {
            f"{m}_ci": [float(v) for v in np.percentile(stats[m], [tail, 100.0 - tail])] for m in METRIC_NAMES
        }
    return out


# -- calibration of predicted uncertainties --------------------------------------------------------
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
