"""One block of spectra in, its catalogue columns out: the per-spectrum step of predict.py.

`predict_chunk` predicts a block (one model, an ensemble's members, MC-dropout passes, or a model that fits
each spectrum), masks what cannot be trusted and sets the FLAG bits (`stellarlab.results.flags`) from the
scores the model carries (`stellarlab.models.quality`). A prediction outside the training labels' range
(widened by a tolerance) is flagged: a model extrapolates there, or was fed garbage. A new per-spectrum
quantity is one more column here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from stellarlab.models.quality import noise_weight, snr_estimate, without_errors

log = logging.getLogger(__name__)


def clean(flux: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 copies-if-needed with the bad-pixel rule applied: non-finite or zero-weight pixels get flux 1, weight 0."""
    flux, weight = np.asarray(flux, dtype=np.float32), np.asarray(weight, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        bad = ~((weight > 0) & np.isfinite(flux) & (weight < np.inf))
    if bad.any():
        flux, weight = np.where(bad, np.float32(1.0), flux), np.where(bad, np.float32(0.0), weight)
    return flux, weight


@dataclass(frozen=True)
class Trust:
    """predict.py's settings for the quality flags and for model uncertainty (conf/predict.yaml)."""

    tolerance: float | None = 0.2  # OUTSIDE_RANGE: beyond the training range widened by this fraction of its width
    min_usable_fraction: float = 0.5  # FEW_PIXELS: fewer usable pixels than this times a training spectrum's median
    disagreement_factor: float = 2.0  # MEMBERS_DISAGREE: a member spread above this times the members' own sigma
    max_reduced_chi2: float = 3.0  # FIT_FAILED: a fitted spectrum's reduced chi-square above this (or no convergence)
    mc_dropout: int = 0  # passes with dropout on per model (0: off)


def predict_chunk(models, flux: np.ndarray, weight: np.ndarray, batch_size: int = 1024,
                  trust: Trust | float | None = None) -> dict[str, np.ndarray]:
    """Every catalogue column of one chunk of spectra, under stellarlab's names, each an (N,) array.

    `models`: one model or an ensemble's members. Columns: `<label>` (physical units; masked when the spectrum has
    too few usable pixels), `<label>_err` (the model's sigma, or the ensemble's total sigma; NaN without one),
    `<label>_spread` (ensembles and MC dropout: the members' standard deviation), `<label>_outside`, `snr` (median
    flux * sqrt(ivar) over usable pixels), `usable_fraction`, `unlikeness` (`stellarlab.models.quality`), `rchi2` and
    `fit_converged` for models that fit the spectrum, and `flag` (`stellarlab.results.flags`). The one per-chunk step
    of predict.py: a new per-spectrum quantity is one more entry here."""
    from stellarlab.results import flags

    models = list(models) if isinstance(models, (list, tuple)) else [models]
    model = models[0]
    trust = trust if isinstance(trust, Trust) else Trust(tolerance=trust)
    flux, weight = clean(flux, weight)
    no_errors = without_errors(torch.from_numpy(weight)).numpy()
    # spectra given without errors get their noise from the flux once, here, for every score and fit below
    weight = noise_weight(torch.from_numpy(flux), torch.from_numpy(weight)).numpy()
    columns: dict[str, np.ndarray] = {}
    bits: dict[str, np.ndarray | None] = {}
    if len(models) > 1 or trust.mc_dropout:
        labels, sigma, spread, bits["MEMBERS_DISAGREE"] = _members_predict(models, flux, weight, batch_size, trust)
    elif hasattr(model, "fit_spectra"):
        labels, sigma, rchi2, converged = _fit_predict(model, flux, weight, batch_size)
        columns["rchi2"], columns["fit_converged"] = rchi2.astype(np.float32), converged
        with np.errstate(invalid="ignore"):
            bits["FIT_FAILED"] = ~converged | ~(rchi2 <= trust.max_reduced_chi2)
        spread = None
    else:
        (labels, sigma), spread = predict(model, flux, batch_size, weight), None
    n_usable = (weight > 0).sum(axis=1)
    domain = getattr(model, "training_domain", None)
    snr = snr_estimate(flux, weight)
    if domain is not None:
        few = n_usable < trust.min_usable_fraction * domain.usable_median
        columns["unlikeness"] = _unlikeness(domain, flux, weight, batch_size)
        threshold, snr_min = domain.limits(no_errors)  # spectra without errors: the limits of their own noise estimate
        bits["UNLIKE_TRAINING"] = columns["unlikeness"] > threshold
        with np.errstate(invalid="ignore"):
            bits["LOW_SNR"] = snr < snr_min
    else:
        few = n_usable == 0
    labels, sigma = labels.astype(np.float32), sigma.astype(np.float32)
    labels[few], sigma[few] = np.nan, np.nan
    if "rchi2" in columns:  # nothing was fitted there either
        columns["rchi2"][few], columns["fit_converged"][few] = np.nan, False
    bits["FEW_PIXELS"] = few
    outside = None
    if trust.tolerance is not None:
        outside = outside_training_range(model, labels, trust.tolerance, warn=False) & ~few[:, None]
        bits["OUTSIDE_RANGE"] = outside.any(axis=1)
    for j, name in enumerate(model.label_names):
        columns[name] = labels[:, j]
        columns[f"{name}_err"] = sigma[:, j]
        if spread is not None:
            columns[f"{name}_spread"] = spread[:, j].astype(np.float32)
        if outside is not None:
            columns[f"{name}_outside"] = outside[:, j]
    columns["snr"] = snr
    columns["usable_fraction"] = (n_usable / max(weight.shape[1], 1)).astype(np.float32)
    columns["flag"] = flags.flag_column(len(flux), **bits)
    return columns


def _members_predict(models, flux, weight, batch_size, trust: Trust):
    """(mean, total sigma, spread, disagree) of an ensemble or MC dropout (`stellarlab.results.ensemble`)."""
    import torch

    from stellarlab.results.ensemble import combine_members, member_predictions

    device = next(iter(models[0].buffers())).device
    parts = []
    for start in range(0, len(flux), batch_size):
        f, w = (torch.as_tensor(a[start : start + batch_size], device=device) for a in (flux, weight))
        parts.append(combine_members(member_predictions(models, f, w, trust.mc_dropout)))
    if not parts:
        n = len(models[0].label_names)
        return np.empty((0, n)), np.empty((0, n)), np.empty((0, n)), np.zeros(0, bool)
    join = {k: np.concatenate([getattr(p, k) for p in parts]) for k in ("mean", "sigma", "spread")}
    disagree = np.concatenate([p.disagree(trust.disagreement_factor) for p in parts])
    return join["mean"], join["sigma"], join["spread"], disagree


def _fit_predict(model, flux, weight, batch_size):
    """(labels, formal errors, reduced chi2, converged) of a model that fits each spectrum (the emulator)."""
    import torch

    device = next(iter(model.buffers())).device
    out: dict[str, list] = {"labels": [], "sigma": [], "rchi2": [], "converged": []}
    with torch.inference_mode():
        for start in range(0, len(flux), batch_size):
            f, w = (torch.as_tensor(a[start : start + batch_size], device=device) for a in (flux, weight))
            fit = model.fit_spectra(f, w)
            for key in out:
                out[key].append(getattr(fit, key).double().cpu().numpy() if key != "converged" else fit.converged.cpu().numpy())
    n = len(model.label_names)
    if not out["labels"]:
        return np.empty((0, n)), np.empty((0, n)), np.empty(0), np.zeros(0, bool)
    return tuple(np.concatenate(out[k]) for k in ("labels", "sigma", "rchi2", "converged"))


def _unlikeness(domain, flux: np.ndarray, weight: np.ndarray, batch_size: int) -> np.ndarray:
    import torch

    with torch.inference_mode():
        scores = [domain.score(torch.from_numpy(flux[i : i + batch_size]), torch.from_numpy(weight[i : i + batch_size]))
                  for i in range(0, len(flux), batch_size)]
    return torch.cat(scores).numpy().astype(np.float32) if scores else np.empty(0, np.float32)


def predict(model, flux: np.ndarray, batch_size: int = 1024, weight: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(labels, sigma) in physical units; sigma is NaN for models trained without `model.loss=gaussian_nll`.

    `weight` (inverse variance, 0 = no data) is passed on to models that fit the spectrum."""
    import torch

    device = next(iter(model.buffers())).device
    means, sigmas = [], []
    with torch.inference_mode():
        for start in range(0, len(flux), batch_size):
            batch = torch.as_tensor(flux[start : start + batch_size], device=device)
            if hasattr(model, "predict_with_sigma"):
                w = None if weight is None else torch.as_tensor(weight[start : start + batch_size], device=device)
                mean, sigma = model.predict_with_sigma(batch, w)
            else:
                mean, sigma = model.predict_physical(batch), None
            means.append(mean.float().cpu().numpy())
            sigmas.append(np.full_like(means[-1], np.nan) if sigma is None else sigma.float().cpu().numpy())
    if not means:
        n = len(model.label_names)
        return np.empty((0, n), np.float32), np.empty((0, n), np.float32)
    return np.concatenate(means), np.concatenate(sigmas)


def outside_training_range(model, labels: np.ndarray, tolerance: float, warn: bool = True) -> np.ndarray:
    """(N, L) True where a predicted label is not finite or lies outside the training labels' range widened by
    `tolerance` times its width on each side (a checkpoint without a saved range: label_mean -/+ 3 label_std)."""
    low, high, saved = model.training_range()
    if not saved and warn:
        log.warning("the checkpoint predates saved training ranges: predictions are flagged outside label_mean -/+ "
                    "3 label_std instead")
    low, high = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
    margin = tolerance * (high - low)
    with np.errstate(invalid="ignore"):
        return ~np.isfinite(labels) | (labels < low - margin) | (labels > high + margin)


def report_outside(label_names: Sequence[str], outside: np.ndarray, tolerance: float) -> str | None:
    """The warning line for flagged rows, or None when no row is flagged."""
    rows = outside.any(axis=1)
    if not rows.any():
        return None
    per_label = ", ".join(f"{name}: {int(n)}" for name, n in zip(label_names, outside.sum(axis=0)) if n)
    return (f"{int(rows.sum())} of {len(rows)} spectra have a prediction outside the training labels' range widened by "
            f"{tolerance:g} of its width ({per_label}); their rows have <label>_outside=True: do not trust those values")


__all__ = ["Trust", "clean", "outside_training_range", "predict", "predict_chunk", "report_outside"]
