"""What a model remembers of its training spectra, so a prediction can say when it should not be trusted.

A network returns a number for any input, however unlike its training spectra. At the start of every
fit the model records a `TrainingDomain` from its data (it depends on the spectra only, not on the
weights, so every checkpoint of the run carries the same one):

- the principal components of the training spectra's absorption depth (1 - flux). A new spectrum is
  projected onto them and the residual, summed over its usable pixels with its inverse variances and
  divided by their number, is its *unlikeness score*: about 1 plus what the components cannot express for
  a spectrum like the training ones, far above that for a spectrum of another kind (another generator,
  a real star given to a model of the synthetic survey, a bad continuum, a wrong grid);
- the score's threshold, the (1 - `FLAGGED_FRACTION`) quantile of the validation spectra's scores, so
  about 1 % of in-domain spectra are flagged (validation, not training: the components fit the training
  spectra themselves a little better than any others);
- the lowest signal-to-noise ratio of the training spectra and their median number of usable pixels.

Inputs without errors (a `.npy` of flux only: no weight above 1) get a noise estimate from the flux
itself (`der_snr_noise`). That estimate reads lines as noise a little, so their SNR and scores are not on
the scale of spectra with errors: they are compared with a threshold and a lowest SNR measured the same
way, on the same training and validation spectra given without their errors (`*_no_errors`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

#: Principal components kept (the synthetic survey's spectra need about ten for a residual at its noise level).
N_COMPONENTS = 16
#: At most this many spectra of each split are read to fit the components and calibrate the threshold.
MAX_ROWS = 4000
#: Fraction of validation spectra above the threshold.
FLAGGED_FRACTION = 0.01


#: The score reads blocks of SCORED_BLOCK pixels, one in every SCORED_EVERY: an eighth of the pixels, spread over
#: the whole spectrum, measure a residual as well as all of them, and contiguous blocks are gathered at an eighth
#: of the memory traffic (a strided view would touch every cache line); predict.py's speed stays the network's.
SCORED_BLOCK, SCORED_EVERY = 32, 256


def scored_pixels(n_pixels: int) -> torch.Tensor:
    """The pixel indices the unlikeness score reads."""
    starts = torch.arange(0, n_pixels, SCORED_EVERY)
    index = (starts[:, None] + torch.arange(SCORED_BLOCK)[None, :]).reshape(-1)
    return index[index < n_pixels]


def der_snr_noise(flux: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-spectrum noise sigma from the flux alone (DER_SNR: 1.4826/sqrt(6) times the median |2 f_i - f_i-2 - f_i+2|
    over pixels whose neighbours are usable too): for inputs that carry no errors. Taken at the `scored_pixels`
    (about a thousand: as good a median as eight thousand, at a fraction of the cost). A second difference of
    exactly 0 is a run of filled values (a chip gap saved as 1.0), never noise, and is left out."""
    n_pixels = flux.shape[1]
    centre = scored_pixels(n_pixels).to(flux.device)
    centre = centre[(centre >= 2) & (centre < n_pixels - 2)]
    if not len(centre):
        return torch.ones(len(flux), device=flux.device)
    left, right = centre - 2, centre + 2
    second = (2 * flux.index_select(1, centre) - flux.index_select(1, left) - flux.index_select(1, right)).abs()
    ok = (weight.index_select(1, centre) > 0) & (weight.index_select(1, left) > 0) & (weight.index_select(1, right) > 0)
    second = torch.where(ok & (second != 0), second, torch.nan)
    noise = 1.482602 / math.sqrt(6.0) * torch.nanmedian(second, dim=1).values
    return torch.nan_to_num(noise, nan=1.0).clamp(min=1e-4)


def without_errors(weight: torch.Tensor) -> torch.Tensor:
    """(N,) True for spectra given without errors: no weight above 1 (0/1 masks; a real inverse variance of at most
    1 everywhere would be an SNR below 1, no spectrum to measure)."""
    return weight.amax(dim=1) <= 1.0


def noise_weight(flux: torch.Tensor, weight: torch.Tensor, pixels: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse variances (of the `pixels` given, else all) to score with: `weight`'s own, or for spectra given
    `without_errors` the usable pixels weighted by 1/sigma^2 from `der_snr_noise` (of the whole spectrum)."""
    out = weight if pixels is None else weight.index_select(1, pixels)
    binary = without_errors(out)
    if not binary.any():
        return out
    estimated = der_snr_noise(flux, weight)[binary] ** -2  # columns gathered for every row: cheaper than copying rows
    out = out.clone()
    out[binary] = (out[binary] > 0) * estimated[:, None]
    return out


def usable_pixels(flux: torch.Tensor, weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(flux, weight) to fit: bad pixels to flux 1, weight 0; a spectrum whose weights are all 0 or 1 carries no
    errors (a `.npy` of flux alone), so its noise is estimated from the flux itself (`noise_weight`)."""
    flux = flux.float()
    weight = torch.ones_like(flux) if weight is None else weight.to(flux)
    bad = ~torch.isfinite(flux) | ~(weight > 0)
    flux = torch.where(bad, torch.ones_like(flux), flux)
    return flux, noise_weight(flux, torch.where(bad, torch.zeros_like(weight), weight))


#: Pixels of each spectrum the SNR median is taken over (a regular subsample).
SNR_PIXELS = 1024


def snr_estimate(flux: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """(N,) median of |flux| * sqrt(ivar) over each spectrum's usable pixels (the noise from `der_snr_noise` for a
    spectrum given without errors); NaN for one without any usable pixel.

    Taken over a regular subsample of about SNR_PIXELS pixels (a median of a thousand values is as good a noise
    level as one of eight thousand, at an eighth of the cost), where pixels without data are filled with -inf and
    +inf alternately, so that one selection of the same rank in every row (np.partition, many times faster than a
    NaN-aware median) lands on the usable pixels' median (within a rank: runs of bad pixels split evenly)."""
    flux, weight = np.asarray(flux, dtype=np.float32), np.asarray(weight, dtype=np.float32)
    step = max(1, flux.shape[1] // SNR_PIXELS)
    full_flux, full_weight = flux, weight
    flux, weight = flux[:, ::step], weight[:, ::step]
    binary = weight.max(axis=1, initial=0.0) <= 1.0 if weight.size else np.zeros(len(weight), bool)  # `without_errors`
    if binary.any():
        sigma = der_snr_noise(torch.from_numpy(full_flux), torch.from_numpy(full_weight)).numpy()[binary]
        weight = weight.copy()
        weight[binary] = (weight[binary] > 0) / np.square(sigma)[:, None]
    usable = weight > 0
    fill = np.where(np.arange(flux.shape[1]) % 2 == 0, -np.inf, np.inf).astype(np.float32)
    with np.errstate(invalid="ignore"):
        ratio = np.where(usable, np.abs(flux) * np.sqrt(np.maximum(weight, np.float32(0.0))), fill)
    middle = (ratio.shape[1] - 1) // 2
    out = np.partition(ratio, middle, axis=1)[:, middle].astype(np.float32) if ratio.shape[1] else np.full(len(flux), np.nan, np.float32)
    out[~usable.any(axis=1)] = np.nan
    return out


@dataclass
class TrainingDomain:
    """The training spectra in a few numbers (see the module docstring); travels in the checkpoint as tensors."""

    pixels: torch.Tensor  # (S,) the pixels scored (`scored_pixels`)
    mean_depth: torch.Tensor  # (S,)
    components: torch.Tensor  # (K, S), orthonormal rows
    threshold: float  # unlikeness score above which a spectrum is flagged
    snr_min: float  # lowest SNR of the training spectra
    usable_median: float  # median number of usable pixels of a training spectrum
    threshold_no_errors: float = math.inf  # the same two for spectra given without errors (noise from the flux)
    snr_min_no_errors: float = 0.0

    @classmethod
    def fit(cls, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor] | None,
            n_components: int = N_COMPONENTS) -> TrainingDomain:
        """Components from the training (flux, weight) rows, threshold from the validation rows (the training rows
        when there is no validation split)."""
        flux, weight = (t.float().cpu() for t in train)
        pixels = scored_pixels(flux.shape[1])
        usable = weight.index_select(1, pixels) > 0
        depth = (1.0 - flux.index_select(1, pixels)) * usable
        counts = usable.sum(0).clamp(min=1)
        mean = depth.sum(0) / counts
        centred = (depth - mean) * usable
        k = max(1, min(n_components, len(flux) - 1, flux.shape[1]))
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(0)  # svd_lowrank draws a random start: the same data give the same components
        try:
            _, _, v = torch.svd_lowrank(centred, q=min(k + 8, min(centred.shape)), niter=6)
        finally:
            torch.random.set_rng_state(generator_state)
        domain = cls(pixels, mean, v[:, :k].T.contiguous(), math.inf, 0.0, float((weight > 0).sum(1).float().median()))
        calib_flux, calib_weight = train if val is None or not len(val[0]) else val
        calib_flux, calib_weight = calib_flux.float().cpu(), calib_weight.float().cpu()

        def limits(train_weight: torch.Tensor, calib: torch.Tensor) -> tuple[float, float]:
            """(lowest training SNR, unlikeness threshold) with these weights (the errors, or 0/1 masks)."""
            snr = snr_estimate(flux.numpy(), train_weight.numpy())
            scores = domain.score(calib_flux, calib)
            scores = scores[torch.isfinite(scores)]
            return (float(np.nanmin(snr)) if np.isfinite(snr).any() else 0.0,
                    float(torch.quantile(scores.double(), 1.0 - FLAGGED_FRACTION)) if len(scores) else math.inf)

        domain.snr_min, domain.threshold = limits(weight, calib_weight)
        domain.snr_min_no_errors, domain.threshold_no_errors = limits((weight > 0).float(), (calib_weight > 0).float())
        if val is None or not len(val[0]):
            log.warning("no validation split: the unlikeness threshold is calibrated on training spectra (too low a "
                        "threshold: more new spectra are flagged)")
        return domain

    def score(self, flux: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """(N,) unlikeness score: the weighted residual of the projection on the components per usable pixel.

        It runs on every block predict.py reads, so it reads the `scored_pixels` only and makes few passes:
        pixels without data are zeroed before the projection and weigh nothing in the sum."""
        components, pixels = self.components.to(flux.device), self.pixels.to(flux.device)
        flux, weight = flux.float(), weight.float()
        w = noise_weight(flux, weight, pixels)
        centred = torch.sub(1.0 - self.mean_depth.to(flux.device), flux.index_select(1, pixels))  # (1 - flux) - mean
        centred.masked_fill_(w <= 0, 0.0)
        residual = torch.addmm(centred, centred @ components.T, components, alpha=-1.0)
        chi2 = residual.square_().mul_(w).sum(1)
        n = torch.count_nonzero(w > 0, dim=1)
        return torch.where(n > 0, chi2 / n.clamp(min=1), torch.full_like(chi2, math.inf))

    def limits(self, no_errors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(unlikeness threshold, lowest SNR) per spectrum: those of spectra without errors where `no_errors`."""
        return (np.where(no_errors, self.threshold_no_errors, self.threshold),
                np.where(no_errors, self.snr_min_no_errors, self.snr_min))

    def state(self) -> dict:
        """Plain tensors and floats, loadable with `torch.load(weights_only=True)`."""
        return {"pixels": self.pixels.cpu(), "mean_depth": self.mean_depth.cpu(), "components": self.components.cpu(), "threshold": self.threshold,
                "snr_min": self.snr_min, "usable_median": self.usable_median, "threshold_no_errors": self.threshold_no_errors,
                "snr_min_no_errors": self.snr_min_no_errors}

    @classmethod
    def from_state(cls, state: dict) -> TrainingDomain:
        """A checkpoint written before the `_no_errors` limits judges spectra without errors by the others, as it did."""
        threshold, snr_min = float(state["threshold"]), float(state["snr_min"])
        return cls(state["pixels"].long(), state["mean_depth"].float(), state["components"].float(), threshold, snr_min,
                   float(state["usable_median"]), float(state.get("threshold_no_errors", threshold)),
                   float(state.get("snr_min_no_errors", snr_min)))


def sample_rows(arrays: dict, n_max: int = MAX_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """(flux, weight) of at most `n_max` evenly spaced rows of a split (in memory or streamed alike)."""
    n = len(arrays["flux"])
    rows = np.unique(np.linspace(0, n - 1, num=min(n, n_max)).round().astype(np.int64)) if n else np.zeros(0, np.int64)
    index = torch.from_numpy(rows)
    return arrays["flux"][index].float(), arrays["weight"][index].float()


def domain_of(datamodule) -> TrainingDomain | None:
    """The `TrainingDomain` of a set-up DataModule's training and validation splits (None if it has no pixel splits)."""
    split_arrays = getattr(datamodule, "split_arrays", None)
    if split_arrays is None:
        return None
    train = split_arrays("train")
    if "weight" not in train or not len(train["flux"]):
        return None
    val = split_arrays("val") if "val" in getattr(datamodule, "tensors", {}) else None
    return TrainingDomain.fit(sample_rows(train), sample_rows(val) if val is not None and len(val["flux"]) else None)


__all__ = ["FLAGGED_FRACTION", "N_COMPONENTS", "SCORED_BLOCK", "SCORED_EVERY", "SNR_PIXELS", "TrainingDomain", "der_snr_noise", "domain_of",
           "noise_weight", "scored_pixels", "snr_estimate", "usable_pixels", "without_errors"]
