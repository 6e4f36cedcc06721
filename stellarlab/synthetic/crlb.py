"""Cramér–Rao bounds of the synthetic survey: the best precision any unbiased method could reach.

The generator is differentiable, so for each spectrum the Jacobian J = d flux / d labels is exact
(forward mode: one `torch.func.jvp` pass per label). With independent Gaussian pixel noise of inverse
variance w_p, the Fisher matrix is F = J^T C^-1 J = sum_p w_p J_p J_p^T and any unbiased estimator has
Cov >= F^-1; the bound on label i is sqrt((F^-1)_ii). F spans every label the generator varies
(Teff, log g, [Fe/H], [alpha/Fe]), so a model that predicts only three of them is still charged for
not knowing the fourth: the bound is the marginal one, never the one with the others held fixed.

The noise is exactly the survey's (`stellarlab.synthetic.survey`): sigma_p = 1/SNR of that spectrum on
every detector pixel (the flux is continuum-normalised, so the continuum is 1), nothing in the
detector gaps (weight 0, or the pixel is absent with gap_deleted=true). The weights are read from the
DataModule's own `weight` tensor (the survey's ivar), so F uses the C^-1 the model was given.

A test set's RMSE compares with sqrt(mean_i sigma_CRLB,i^2), the RMS of the per-spectrum bounds: that
is the RMSE an efficient unbiased estimator would reach on the same spectra. (Networks are not
unbiased: they shrink towards the training prior, so a ratio below 1 is possible where the prior is
informative, e.g. [alpha/Fe] given [Fe/H].)
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.func import jvp

from stellarlab.errors import DataError
from stellarlab.files import write_bytes_atomic

log = logging.getLogger(__name__)

# A Fisher matrix whose unit-diagonal form has a condition number above this is treated as singular
# (some label combination leaves the spectrum unchanged): the bound is then infinite, not noise.
MAX_CONDITION = 1e12


def jacobian(fn: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """d fn(labels)[b, p] / d labels[b, k] as (B, P, K), for an fn whose rows depend on their own labels only.

    One forward-mode pass per label direction (K passes for the whole batch), exact to the precision of fn.
    """
    labels = torch.as_tensor(labels)
    if not labels.is_floating_point():
        labels = labels.to(torch.get_default_dtype())
    cols = []
    for k in range(labels.shape[1]):
        tangent = torch.zeros_like(labels)
        tangent[:, k] = 1.0
        cols.append(jvp(fn, (labels,), (tangent,))[1])
    return torch.stack(cols, dim=-1)


def fisher_matrix(jac: torch.Tensor | np.ndarray, ivar: torch.Tensor | np.ndarray) -> np.ndarray:
    """F[b] = J[b]^T diag(ivar[b]) J[b] in float64, (B, K, K); ivar is (B, P) or (P,), 0 = no information."""
    j = torch.as_tensor(jac).to(torch.float64)
    w = torch.as_tensor(ivar).to(torch.float64)
    if w.dim() == 1:
        w = w.expand(j.shape[0], -1)
    if w.shape != j.shape[:2]:
        raise ValueError(f"ivar {tuple(w.shape)} does not match the Jacobian's (spectra, pixels) {tuple(j.shape[:2])}")
    return torch.einsum("bpi,bp,bpj->bij", j, w, j).numpy()


def crlb_from_fisher(fisher: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-spectrum bounds sqrt(diag(F^-1)) (B, K) and the correlation matrix of F^-1 (B, K, K).

    F is scaled to unit diagonal before inversion (Teff in K and abundances in dex differ by 1e5 in
    Fisher units); singular F (condition > MAX_CONDITION or a label with no effect) gives inf and NaN.
    """
    f = np.asarray(fisher, dtype=np.float64)
    if f.ndim == 2:
        f = f[None]
    d = np.sqrt(np.clip(np.einsum("bii->bi", f), 0.0, None))
    ok = (d > 0).all(axis=1)
    scale = np.where(ok[:, None], d, 1.0)
    fn = f / (scale[:, :, None] * scale[:, None, :])
    fn[~ok] = np.eye(f.shape[1])
    ok &= np.linalg.cond(fn) < MAX_CONDITION
    fn[~ok] = np.eye(f.shape[1])
    cov = np.linalg.inv(fn) / (scale[:, :, None] * scale[:, None, :])
    sigma = np.sqrt(np.einsum("bii->bi", cov))
    corr = cov / (sigma[:, :, None] * sigma[:, None, :])
    sigma[~ok] = np.inf
    corr[~ok] = np.nan
    return sigma, corr


def generator_fisher(generator, labels: np.ndarray, ivar: np.ndarray, pixels: np.ndarray | None = None,
                     batch_size: int = 32) -> np.ndarray:
    """Fisher matrices (N, 4, 4) of the generator's spectra at `labels` (N, 4), physical units.

    `ivar` (N, P_data) is each spectrum's pixel inverse variance; `pixels` maps data pixels to the
    generator's grid (None: the same grid). Batches of 32 match the generator's CPU chunk.
    """
    labels = torch.as_tensor(np.asarray(labels, dtype=np.float32))
    ivar = np.asarray(ivar, dtype=np.float64)
    out = np.empty((labels.shape[0], labels.shape[1], labels.shape[1]))
    for start in range(0, labels.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        jac = jacobian(generator, labels[sl])
        if pixels is not None:
            jac = jac[:, pixels]
        out[sl] = fisher_matrix(jac, ivar[sl])
    return out


# -- the synthetic survey behind a DataModule ------------------------------------------------------
def _survey_of(datamodule):
    """The SyntheticSurvey behind a DataModule (its public `synthetic_survey()`), or None for other data."""
    hook = getattr(datamodule, "synthetic_survey", None)
    return hook() if callable(hook) else None


def pixel_index(generator_wavelength: np.ndarray, data_wavelength: np.ndarray) -> np.ndarray | None:
    """Generator pixels of the data's pixels (gap-deleted surveys keep a subset); None if identical."""
    if len(generator_wavelength) == len(data_wavelength) and np.allclose(generator_wavelength, data_wavelength, rtol=1e-9):
        return None
    idx = np.clip(np.searchsorted(generator_wavelength, data_wavelength), 0, len(generator_wavelength) - 1)
    if not np.allclose(generator_wavelength[idx], data_wavelength, rtol=1e-9):
        raise DataError("the data's wavelength grid is not a subset of the generator's; cannot compute its Jacobian")
    return idx


def _cached(path: Path | None, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """Load `path` if it exists, else compute and write it atomically (temporary file, then rename)."""
    if path is not None and path.is_file():
        try:
            return np.load(path)
        except (OSError, ValueError) as err:
            log.warning("ignoring unreadable Fisher cache %s (%s)", path, err)
    value = compute()
    if path is not None:
        try:
            write_bytes_atomic(path, lambda fh: np.save(fh, value))
        except OSError as err:  # a read-only cache only costs the recomputation next time
            log.info("could not cache Fisher matrices in %s (%s)", path.parent, err)
    return value


def survey_crlb(datamodule, split: str = "test", batch_size: int = 32) -> dict | None:
    """Per-spectrum Cramér–Rao bounds of one split of a synthetic DataModule (set up); None for other data.

    Returns {"labels": generator label names, "sigma": (N, 4), "corr": (N, 4, 4), "fisher": (N, 4, 4),
    "snr": (N,), "true": (N, 4)} in the split's row order. Fisher matrices are cached beside the survey
    (they depend only on the survey and the split), so a sweep over seeds pays for them once.
    """
    survey = _survey_of(datamodule)
    if survey is None:
        return None
    from stellarlab.synthetic import LABEL_NAMES

    # the survey rows of the split (a split of star counts leaves rows out, and rows without data are dropped)
    idx = np.asarray(datamodule.split_ids(split)["row"], dtype=np.int64)
    if len(idx) and (idx.min() < 0 or idx.max() >= len(survey)):
        raise DataError("the DataModule's split rows do not map to the synthetic survey's rows")
    true = np.asarray(survey.labels[idx], dtype=np.float32)
    chosen = [list(survey.label_names).index(n) for n in datamodule.label_names]
    if not np.allclose(true[:, chosen], datamodule.tensors[split]["labels_phys"].numpy(), equal_nan=True):
        raise DataError(f"the {split} labels do not match the synthetic survey's; cannot pair spectra with their stars")
    weight = datamodule.tensors[split]["weight"].numpy()

    def compute() -> np.ndarray:
        generator = survey.generator()
        pixels = pixel_index(generator.wavelength, datamodule.wavelength)
        return generator_fisher(generator, true, weight, pixels, batch_size=batch_size)

    path = None
    if survey.cache_path:
        key = hashlib.sha1(idx.astype(np.int64).tobytes() + weight.sum(axis=1).tobytes()).hexdigest()[:16]
        path = Path(survey.cache_path) / f"fisher-{split}-{key}.npy"
    fisher = _cached(path, compute)
    sigma, corr = crlb_from_fisher(fisher)
    snr = datamodule.tensors[split]["snr"].numpy() if "snr" in datamodule.tensors[split] else np.asarray(survey.snr)[idx]
    return {"labels": list(LABEL_NAMES), "sigma": sigma, "corr": corr, "fisher": fisher, "snr": np.asarray(snr), "true": true}


def rms(values: np.ndarray) -> float:
    """sqrt(mean(x^2)): the aggregate of per-spectrum bounds that an RMSE is compared with."""
    values = np.asarray(values, dtype=np.float64)
    return float(np.sqrt(np.mean(values**2))) if values.size else float("nan")


def crlb_vs_rmse(datamodule, test_metrics: dict, split: str = "test") -> dict | None:
    """Per label {rmse, crlb, crlb_median, ratio, n} for a trained run; None when the data are not synthetic.

    `crlb` is the RMS over the split's spectra of the per-spectrum bound (same units as the RMSE) and
    `ratio` = rmse / crlb (1 = as good as any unbiased method can be).
    `test_metrics` is the run's per-label metrics dict (`model.test_results["metrics"]`).
    """
    bounds = survey_crlb(datamodule, split)
    if bounds is None:
        return None
    out = {}
    for label, row in test_metrics.items():
        if label not in bounds["labels"]:
            continue
        b = bounds["sigma"][:, bounds["labels"].index(label)]
        crlb = rms(b)
        out[label] = {"rmse": float(row["rmse"]), "crlb": crlb, "crlb_median": float(np.median(b)),
                      "ratio": float(row["rmse"]) / crlb, "n": int(b.size)}
    return out


__all__ = ["jacobian", "fisher_matrix", "crlb_from_fisher", "generator_fisher", "pixel_index", "survey_crlb", "crlb_vs_rmse", "rms"]
