"""Per-label regression metrics in physical units, as spectroscopic surveys report them.

RMSE and MAE, the median residual (bias) and the robust scatter `astropy.stats.mad_std`
(what astroNN and The Cannon quote), so results compare with published precisions.
Missing (NaN) true labels are left out per label.
"""

from __future__ import annotations

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
