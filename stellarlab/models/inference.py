"""`model.predict(flux)`: the labels of NumPy spectra in physical units, for notebooks and scripts.

A mixin of `SpectrumRegressor`, so every model has it. The spectra must lie on the model's grid
(`model.wavelength`); they are cleaned as training data were (a non-finite or zero-weight pixel becomes
the continuum, 1) and given the flux transform the checkpoint records (`stellarlab.load` sets
`preprocessing`), then run through the model in batches without gradients.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import numpy as np
import torch

from stellarlab.data.flux import transform_flux
from stellarlab.errors import DataError


class Predicting:
    #: the training data's preprocessing (`flux_transform`, `flux_floor`, ...); `stellarlab.load` sets it from the checkpoint
    preprocessing: Mapping = MappingProxyType({})

    def predict_with_sigma(self, flux: torch.Tensor, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean, sigma) per label in physical units; sigma is None for a model trained without gaussian_nll.

        `weight` (inverse variance, 0 = no data) is read by models that fit the spectrum (the emulator);
        networks see bad pixels as continuum (flux 1) instead."""
        if self.loss_name == "gaussian_nll":
            return self.predict_with_uncertainty(flux)
        return self.predict_physical(flux), None

    def dropout_layers(self) -> list[torch.nn.Module]:
        """The model's dropout layers (empty for a model trained with model.dropout=0)."""
        return [m for m in self.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]

    def predict_mc_dropout(self, flux: torch.Tensor, weight: torch.Tensor | None, n_passes: int,
                           seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """`n_passes` (mean, sigma) predictions with the dropout layers on (MC dropout), everything else in eval mode.

        Seeded (a fixed `seed` and the spectra's own order), so a catalogue is reproducible; the global RNG is left
        as it was."""
        layers = self.dropout_layers()
        was_training = self.training
        self.eval()
        for layer in layers:
            layer.train()
        try:
            with torch.random.fork_rng(devices=[flux.device] if flux.device.type == "cuda" else []):
                torch.manual_seed(seed)
                return [self.predict_with_sigma(flux, weight) for _ in range(n_passes)]
        finally:
            self.train(was_training)

    def predict(self, flux, weight=None, batch_size: int = 1024) -> dict[str, np.ndarray]:
        """{label: values} in physical units, plus `<label>_sigma` for a model that predicts uncertainties.

        `flux`: (N, P) or (P,) continuum-normalised spectra on the model's grid of P pixels; `weight`: the
        same shape, 0 for a pixel without data (NaN flux counts as no data too). A (P,) spectrum gives
        one value per key instead of an array.
        """
        flux = np.array(flux, dtype=np.float32)  # a copy: bad pixels are overwritten below
        single = flux.ndim == 1
        flux = flux[None, :] if single else flux
        n_pixels = len(self.wavelength)
        if flux.ndim != 2 or flux.shape[1] != n_pixels:
            raise DataError(f"flux has shape {list(flux.shape)}; this model reads (N, {n_pixels}) or ({n_pixels},) "
                            "spectra on its grid (model.wavelength): resample them onto it first")
        bad = ~np.isfinite(flux)
        if weight is not None:
            weight = np.asarray(weight, dtype=np.float32)
            if weight.shape != (flux[0].shape if single else flux.shape):
                raise DataError(f"weight has shape {list(weight.shape)}, flux {list(flux.shape)}: give one weight per pixel")
            bad |= ~(weight.reshape(flux.shape) > 0)
        transform = self.preprocessing.get("flux_transform", "none")
        if transform != "none":
            flux = transform_flux(flux, transform, float(self.preprocessing.get("flux_floor", 0.0)))
        flux[bad] = 1.0
        weight = np.where(bad, 0.0, 1.0 if weight is None else weight.reshape(flux.shape)).astype(np.float32)
        device = next(iter(self.buffers())).device
        means, sigmas = [], []
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                for start in range(0, len(flux), batch_size):
                    rows = slice(start, start + batch_size)
                    mean, sigma = self.predict_with_sigma(torch.as_tensor(flux[rows], device=device),
                                                          torch.as_tensor(weight[rows], device=device))
                    means.append(mean.float().cpu().numpy())
                    sigmas.append(None if sigma is None else sigma.float().cpu().numpy())
        finally:
            self.train(was_training)
        mean = np.concatenate(means)
        out = {label: mean[:, i] for i, label in enumerate(self.label_names)}
        if sigmas[0] is not None:
            sigma = np.concatenate(sigmas)
            out.update({f"{label}_sigma": sigma[:, i] for i, label in enumerate(self.label_names)})
        return {key: float(value[0]) for key, value in out.items()} if single else out
