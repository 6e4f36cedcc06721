"""The losses every model trains on, on standardised labels with NaN marking a missing label.

`masked_mse` for point estimates; `masked_gaussian_nll` (with optional beta-NLL weighting) for models
that predict a sigma per label; `rms_z`, the validation factor that rescales those sigmas; `flux_chi2`, the
emulator's loss on the flux (labels -> spectrum) instead of the labels.
"""

from __future__ import annotations

import math

import torch

LOSSES = ("mse", "gaussian_nll")
# Smallest predicted sigma, in standardised units (~0.6 K in Teff, ~1e-3 dex in log g on the default
# survey): ten times below the Cramer-Rao bound at SNR 100, yet it keeps 1/sigma^2 finite if a net
# pushes a scale to -inf. softplus (not exp) keeps large sigmas linear in the raw output, so an early
# bad batch cannot blow the variance up exponentially.
SIGMA_MIN = 1e-3
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def masked_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over labels of the MSE over the rows where that label is known (NaN = missing)."""
    mask = torch.isfinite(target)
    diff = (pred - torch.nan_to_num(target)) * mask
    counts = mask.sum(0)
    per_label = (diff**2).sum(0) / counts.clamp(min=1)
    present = (counts > 0).to(per_label.dtype)  # arithmetic, not boolean indexing: no device sync per step
    return (per_label * present).sum() / present.sum().clamp(min=1)


def masked_gaussian_nll(mean: torch.Tensor, sigma: torch.Tensor, target: torch.Tensor, beta: float = 0.0) -> torch.Tensor:
    """Mean over labels of the Gaussian NLL (nats, constant included) over the rows where that label is known.

    With the 0.5 log(2 pi) term it is a true log-likelihood: a perfectly calibrated Gaussian predictor with
    sigma s scores log(s) + 1.42 per label, so the value is comparable across runs (not with an MSE).
    `beta` > 0 weights each row by sigma^(2 beta) with no gradient through the weight (beta-NLL, Seitzer
    et al. 2022): plain NLL (beta = 0) scales the mean's gradient by 1/sigma^2, so stars the net already
    fits well dominate and the mean learns worse than with an MSE; beta = 1 gives the MSE's mean gradient.
    """
    mask = torch.isfinite(target)
    z = (mean - torch.nan_to_num(target)) / sigma
    nll = (0.5 * z**2 + torch.log(sigma) + _HALF_LOG_2PI) * mask
    if beta:
        nll = nll * sigma.detach() ** (2.0 * beta)
    counts = mask.sum(0)
    per_label = nll.sum(0) / counts.clamp(min=1)
    return per_label[counts > 0].mean()


def rms_z(mean: torch.Tensor, sigma: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per label sqrt(mean(z^2)) over known rows: the sigma factor that minimises the Gaussian NLL (1 if none)."""
    mask = torch.isfinite(target)
    z2 = (((mean - torch.nan_to_num(target)) / sigma) ** 2) * mask
    counts = mask.sum(0)
    return torch.where(counts > 0, torch.sqrt(z2.sum(0) / counts.clamp(min=1)), torch.ones_like(counts, dtype=z2.dtype))


def flux_chi2(flux: torch.Tensor, weight: torch.Tensor, model: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of w (flux - model)^2, number of pixels with w > 0): the chi-square of a model spectrum, w the inverse variance."""
    return (weight * (flux - model) ** 2).sum(), (weight > 0).sum()
