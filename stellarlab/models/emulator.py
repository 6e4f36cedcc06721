"""`model=emulator` / `model=cannon`: learn labels -> flux, then read labels off a spectrum by fitting all of it.

Instead of mapping a spectrum to its labels, the model learns the forward problem, the continuum-normalised
flux of every pixel as a function of the standardised labels, on the training spectra with a chi-square
loss weighted by each pixel's inverse variance. Labels of a new spectrum are the ones whose emulated
spectrum fits it best (`stellarlab.models.spectrum_fit`: bounded Levenberg-Marquardt from template starts),
with formal errors from the curvature of the chi-square. So every prediction comes with an error and a
goodness of fit, and a spectrum the emulator cannot describe shows as a reduced chi-square far above 1.

kind=mlp (The Payne): a dense network; trained by gradient descent like the other networks (`optimizer`,
`scheduler`; without a scheduler the learning rate decays on a cosine over the run, which trains the
emulator to a much lower chi-square than a constant rate in the same epochs, and early stopping is off).
kind=quadratic (The Cannon): flux quadratic in the labels, fitted in closed form in one pass
(`stellarlab.models.cannon`), with a per-pixel intrinsic scatter and (`error_components`) the patterns its
errors share across pixels, measured on the training spectra and part of every fit's noise.

Nuisance labels (`data.nuisance_labels`, e.g. the synthetic survey's [alpha/Fe]): labels the spectra depend on
that the run does not predict. They are inputs of the emulator beside the labels (known for the training spectra)
and free in every fit, within their training range, so the labels' errors include what not knowing them costs.
Latent labels (`latent_dims`, mlp): nuisance labels learnt from the spectra, for what the data's labels
leave out (`stellarlab.models.flux_network`); in a fit they are free beside the labels, with a N(0, 1) prior.

Intrinsic scatter (`scatter`): per pixel, the variance of what the emulator does not reproduce, added to
the noise of every fit (C = 1/w + s^2). mlp: measured on the validation spectra after each validation epoch
(the network fits its own training spectra too well); quadratic: on the training spectra, with the fit.

Validation is cheap and meaningful: val/loss is the chi-square per pixel of the emulated validation spectra
at their true labels (about 1 plus the emulator's error in units of the noise). The test split and
`predict` get the full label fit.

Errors: the fit's formal errors (inverse Fisher matrix, intrinsic scatter included) measure the noise, not the
emulator's own error, which is smooth in wavelength and so does not average down over pixels like noise does:
a fit's label is off by it on every noise draw of the same star. At the end of training the validation spectra
are fitted with each saved checkpoint's weights and one factor per label, `sigma_scale`, makes the formal
errors' z-scores have the spread of a unit Gaussian (median |z| = 0.674: robust to the few stars far off); the
reported error is the formal error times it. The factors are in every checkpoint and in the log.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pytorch_lightning as pl
import torch

from stellarlab.checks import Choice, Flag, Number
from stellarlab.errors import ConfigError
from stellarlab.files import atomic_path
from stellarlab.models import checksum
from stellarlab.models.base import GLOBAL, Activation, SpectrumRegressor
from stellarlab.models.cannon import QuadraticFlux
from stellarlab.models.flux_network import FluxNetwork, pixel_mean_and_spread
from stellarlab.models.losses import flux_chi2
from stellarlab.models.mlp import HiddenSizes
from stellarlab.models.quality import usable_pixels
from stellarlab.models.spectrum_fit import (
    FitResult,
    error_scale,
    fit_scatter,
    fit_spectra,
    inverse_variance,
    retry_poor_fits,
    template_starts,
)

log = logging.getLogger(__name__)

#: Latent labels are bounded to +-LATENT_BOUND in a fit (their prior is N(0, 1)).
LATENT_BOUND = 5.0
#: Spectra fitted at once (the Jacobian of a chunk is chunk x pixels x labels floats).
FIT_CHUNK = 512
#: Validation spectra whose residuals measure the intrinsic scatter (the first ones of the split): s^2 to ~5 %.
SCATTER_ROWS = 1000
#: Validation spectra (the first ones) fitted at the end of training to calibrate the errors: a factor to ~5 %.
CALIBRATION_ROWS = 800
#: Further templates (the next best after the first starts) a poor fit is retried from (`fit_retry_rchi2`).
RETRY_STARTS = 8
KINDS = ("mlp", "quadratic")


class EmulatorRegressor(SpectrumRegressor):
    """Spectrum emulator (kind=mlp: The Payne; kind=quadratic: The Cannon) whose predictions are full-spectrum fits."""

    batch_keys = ("flux", "weight", "labels", "nuisance")

    @classmethod
    def logged_metrics(cls, label_names: Sequence[str], values: Mapping[str, Any]) -> list[str]:
        names = ["val/loss", "val/loss_best", "val/scatter_median"]
        return [*names, "train/loss" if str(values.get("kind", "mlp")) == "quadratic" else "train/loss_epoch"]

    @classmethod
    def check_together(cls, values: Mapping[str, Any]) -> None:
        if str(values.get("loss", "mse")) != "mse":
            raise ConfigError(f"model.loss={values['loss']}: the emulator trains on the chi-square of the flux and its "
                              "errors come from the fit; remove model.loss (or use a network: model=mlp model.loss=gaussian_nll)")
        if str(values.get("kind", "mlp")) == "quadratic" and values.get("latent_dims"):
            raise ConfigError(f"model.latent_dims={values['latent_dims']}: kind=quadratic (The Cannon) is quadratic in the "
                              "labels alone; set model.latent_dims=0 or null (or use kind=mlp)")
        if str(values.get("kind", "mlp")) == "mlp" and values.get("error_components"):
            raise ConfigError(f"model.error_components={values['error_components']}: the patterns of the emulator's error "
                              "are measured for kind=quadratic (The Cannon) only; set model.error_components=0 (or use model=cannon)")
        starts, templates = values.get("fit_starts", 1), values.get("fit_templates", 256)
        if isinstance(starts, int) and isinstance(templates, int) and starts > templates:
            raise ConfigError(f"model.fit_starts={starts} is more than model.fit_templates={templates}: each start is a "
                              "template; lower model.fit_starts or raise model.fit_templates")

    def __init__(
        self,
        n_pixels: int,
        label_names,
        kind: Annotated[str, Choice(*KINDS)] = "mlp",
        hidden_sizes: HiddenSizes = (300, 300, 300, 128),
        activation: Activation = "silu",
        latent_dims: Annotated[int | None, Number(minimum=0, integer=True, allow_null=True,
                                                  example="model.latent_dims=1")] = None,
        scatter: Annotated[bool, Flag()] = True,
        error_components: Annotated[int, Number(minimum=0, integer=True, example="model.error_components=12")] = 0,
        fit_starts: Annotated[int, Number(minimum=1, integer=True, example="model.fit_starts=2")] = 1,
        fit_templates: Annotated[int, Number(minimum=1, integer=True, example="model.fit_templates=256")] = 256,
        fit_iterations: Annotated[int, Number(minimum=1, integer=True, example="model.fit_iterations=30")] = 30,
        fit_tolerance: Annotated[float, Number(above=0, example="model.fit_tolerance=0.01")] = 0.01,
        fit_retry_rchi2: Annotated[float | None, Number(above=0, allow_null=True,
                                                        example="model.fit_retry_rchi2=1.1")] = 1.1,
        **kwargs,
    ):
        super().__init__(n_pixels=n_pixels, label_names=label_names, **kwargs)
        self.kind = str(kind)
        self.nuisance = self.hparams.get("nuisance_labels") or {"names": []}  # the data's `nuisance_spec`
        n_labels, n_inputs = len(label_names), len(label_names) + len(self.nuisance["names"])
        default_latent = 1 if self.kind == "mlp" and not self.nuisance.get("complete") else 0  # none if nothing is left out
        self.latent_dims = default_latent if latent_dims is None else int(latent_dims)
        self.hparams["latent_dims"] = self.latent_dims  # saved resolved: a checkpoint keeps its shape if defaults change
        self.use_scatter = bool(scatter)
        self.fit_settings = {"n_starts": int(fit_starts), "max_iter": int(fit_iterations), "tol": float(fit_tolerance),
                             "retry_rchi2": None if fit_retry_rchi2 is None else float(fit_retry_rchi2)}
        self.retry_counts = [0, 0]  # spectra retried, fits improved (reported and reset after each test)
        if self.kind == "mlp":
            self.net = FluxNetwork(n_inputs, n_pixels, hidden_sizes, activation, self.latent_dims)
        else:
            self.net = QuadraticFlux(n_inputs, n_pixels, int(error_components))
            self.automatic_optimization, self.fits_in_one_pass = False, True
            if kwargs.get("optimizer") is not None or kwargs.get("scheduler") is not None:
                log.info("kind=quadratic is fitted in closed form in one pass: the optimizer and scheduler configs are ignored")
        self.register_buffer("sigma_scale", torch.ones(n_labels))  # calibration of the formal errors (on_train_end)
        self.register_buffer("scatter2", torch.zeros(n_pixels))
        self.register_buffer("template_labels", torch.zeros(int(fit_templates), n_inputs + self.latent_dims))
        self.register_buffer("prepared", torch.tensor(False))
        self.best_val_mse = None  # no label predictions on validation: val/loss is the flux chi-square
        self._templates: tuple[tuple, torch.Tensor] | None = None
        self._val: dict[str, Any] = {}
        self._train_rows: list[tuple[torch.Tensor, ...]] = []
        self._fit_rows: list[FitResult] = []
        self.last_fit: FitResult | None = None

    # -- the emulator and its fit -------------------------------------------------------------------
    def emulate(self, labels: torch.Tensor, latent: torch.Tensor | None = None) -> torch.Tensor:
        """Flux (B, P) of standardised labels, nuisance labels after them (B, L + K) (latent labels 0 unless given)."""
        x = labels.float()
        if self.latent_dims:
            z = torch.zeros(*x.shape[:-1], self.latent_dims, device=x.device) if latent is None else latent.float()
            x = torch.cat([x, z], -1)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.net(x)

    def _bounds(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(low, high, prior precision) of the fitted coordinates: labels and nuisance labels in their training
        range, latents +-LATENT_BOUND."""
        lo, hi, _ = self.training_range()
        dev = self.label_mean.device
        low = (torch.tensor(lo, device=dev) - self.label_mean) / self.label_std
        high = (torch.tensor(hi, device=dev) - self.label_mean) / self.label_std
        if self.nuisance["names"]:  # their range is saved standardised
            low = torch.cat([low, torch.tensor(self.nuisance["min"], device=dev)])
            high = torch.cat([high, torch.tensor(self.nuisance["max"], device=dev)])
        if not self.latent_dims:
            return low, high, None
        bound = torch.full((self.latent_dims,), LATENT_BOUND, device=dev)
        prior = torch.cat([torch.zeros(len(low), device=dev), torch.ones(self.latent_dims, device=dev)])
        return torch.cat([low, -bound]), torch.cat([high, bound]), prior

    def _template_flux(self) -> torch.Tensor:
        """The emulated template spectra, recomputed only when the weights or templates changed (or moved)."""
        key = tuple((t.data_ptr(), t._version) for t in (*self.net.parameters(), self.template_labels))
        if self._templates is None or self._templates[0] != key:
            with torch.autocast(device_type=self.template_labels.device.type, enabled=False):
                self._templates = (key, self.net(self.template_labels.float()))
        return self._templates[1]

    def _fit(self, flux: torch.Tensor, weight: torch.Tensor | None) -> FitResult:
        """The fit in standardised units, latent coordinates included; chunks of FIT_CHUNK spectra."""
        flux, weight = usable_pixels(flux, weight)
        low, high, prior = self._bounds()
        scatter2, parts = self.scatter2 if self.use_scatter else None, []
        first, retry = self.fit_settings["n_starts"], self.fit_settings["retry_rchi2"]
        steps = (self.fit_settings["max_iter"], self.fit_settings["tol"], prior, getattr(self.net, "error_basis", None))
        # float32, gradients off (the Jacobian is forward mode); inference tensors from predict are fine
        with torch.autocast(device_type=flux.device.type, enabled=False), torch.no_grad():
            template_flux = self._template_flux()
            for start in range(0, len(flux), FIT_CHUNK):
                f, w = flux[start : start + FIT_CHUNK], weight[start : start + FIT_CHUNK]
                starts = template_starts(f, inverse_variance(w, scatter2), self.template_labels, template_flux,
                                         first + (RETRY_STARTS if retry is not None else 0))
                fit = fit_spectra(self.net, f, w, low, high, scatter2, starts[:, :first], *steps)
                if retry is not None and starts.shape[1] > first:
                    fit, retried, improved = retry_poor_fits(self.net, f, w, low, high, scatter2, fit,
                                                             starts[:, first:], retry, *steps)
                    self.retry_counts = [self.retry_counts[0] + retried, self.retry_counts[1] + improved]
                parts.append(fit)
        return FitResult(*(torch.cat([getattr(p, name) for p in parts]) for name in FitResult.__dataclass_fields__))

    def fit_spectra(self, flux: torch.Tensor, weight: torch.Tensor | None = None) -> FitResult:
        """Labels of each spectrum by fitting it: `FitResult` with labels and formal errors in physical units.

        `weight` is the inverse variance per pixel (0 = no data); without errors (None, or only 0 and 1) the noise
        comes from the flux itself. `rchi2` and `converged` say which fits to trust; latent labels are left out.
        """
        device = self.label_mean.device
        fit = self._physical(self._fit(torch.as_tensor(flux, device=device),
                                       None if weight is None else torch.as_tensor(weight, device=device)))
        self.last_fit = fit
        return fit

    def _physical(self, fit: FitResult) -> FitResult:
        """The labels' part of a fit in physical units (latent labels dropped)."""
        n = len(self.label_names)
        return FitResult(fit.labels[:, :n] * self.label_std + self.label_mean, fit.sigma[:, :n] * self.sigma_scale * self.label_std,
                         fit.chi2, fit.n_pixels, fit.converged, fit.iterations, fit.at_bound[:, :n])

    def forward(self, flux: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Standardised labels of the fitted spectra (the base's contract); `last_fit` keeps the whole fit."""
        fit = self._fit(flux, weight)
        self.last_fit = self._physical(fit)
        return fit.labels[:, : len(self.label_names)]

    def predict_with_sigma(self, flux: torch.Tensor, weight: torch.Tensor | None = None):
        """(labels, formal errors) in physical units; `last_fit` keeps the reduced chi-square and convergence."""
        fit = self.fit_spectra(flux, weight)
        return fit.labels, fit.sigma

    def predict_with_uncertainty(self, flux: torch.Tensor, weight: torch.Tensor | None = None):
        """(labels, formal errors) in physical units: every emulator fit has errors."""
        return self.predict_with_sigma(flux, weight)

    # -- preparing a fit: templates and the starting flux ---------------------------------------------
    def setup(self, stage: str) -> None:
        if self._trainer is None:
            return
        if self.trainer.world_size > 1:
            raise ConfigError(f"the emulator trains and fits on one device; set trainer.devices=1 (this run has "
                              f"{self.trainer.world_size} processes)")
        # TF32 keeps ~3 significant digits: far coarser than the noise of an SNR-100 spectrum
        if self.trainer.strategy.root_device.type == "cuda" and torch.get_float32_matmul_precision() != "highest":
            log.info("the emulator needs full float32 matrix products: float32 matmul precision set to 'highest'")
            torch.set_float32_matmul_precision("highest")

    def on_fit_start(self) -> None:
        super().on_fit_start()
        datamodule = getattr(self.trainer, "datamodule", None)
        if not bool(self.prepared) and hasattr(datamodule, "split_arrays"):
            train = datamodule.split_arrays("train")
            rows = np.sort(np.random.default_rng(0).permutation(len(train["labels"]))[:SCATTER_ROWS])
            self._prepare(self.inputs(train), train["flux"][rows], train["weight"][rows])

    @torch.no_grad()
    def _prepare(self, labels: torch.Tensor, flux: torch.Tensor, weight: torch.Tensor) -> None:
        """Templates from the training labels; (mlp) each pixel's mean training flux and spread for the output layer."""
        labels = labels[torch.isfinite(labels).all(1)].float()
        if not len(labels):
            raise ConfigError("no training spectrum has every label of data.labels and data.nuisance_labels; the "
                              "emulator needs them all")
        k = len(self.template_labels)
        pick = torch.from_numpy(np.random.default_rng(0).choice(len(labels), k, replace=k > len(labels)))
        chosen = labels[pick].to(self.template_labels)
        self.template_labels.zero_()
        self.template_labels[:, : chosen.shape[1]] = chosen
        if self.kind == "mlp":
            weight = weight.to(self.device).float()
            self.net.set_output(*pixel_mean_and_spread(flux.to(weight), weight))
        self.prepared.fill_(True)

    # -- training -------------------------------------------------------------------------------------
    def configure_optimizers(self):
        if self.kind == "quadratic":
            return []
        if self.scheduler_factory is not None or self._trainer is None:
            return super().configure_optimizers()
        factory = self.optimizer_factory or (lambda params: torch.optim.Adam(params, lr=1e-3))
        optimizer = factory(params=self.parameters())
        steps = max(int(self.trainer.estimated_stepping_batches), 1)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_callbacks(self):
        """Without a scheduler config the learning rate decays on a cosine to trainer.max_epochs, and the validation
        loss still falls in the last epochs, at the lowest rates: early stopping (patience counted in epochs of a
        noisy loss) would end the run halfway down the decay. The trainer's EarlyStopping is replaced by one with
        the same monitor and a patience of max_epochs (so it never fires); with a scheduler config it stays."""
        if self.kind != "mlp" or self.scheduler_factory is not None or self._trainer is None:
            return []
        stoppers = [cb for cb in self.trainer.callbacks if isinstance(cb, pl.callbacks.EarlyStopping)]
        epochs = self.trainer.max_epochs
        # none, no epoch limit, or already off (this hook runs again for the test after fit)
        if not stoppers or epochs is None or epochs < 0 or stoppers[0].patience >= epochs:
            return []
        old = stoppers[0]
        log.info("the emulator's learning rate decays on a cosine to epoch %d: early stopping is off for this run "
                 "(patience %d -> %d)", epochs, old.patience, epochs)
        return [pl.callbacks.EarlyStopping(monitor=old.monitor, mode=old.mode, min_delta=abs(old.min_delta),
                                           patience=epochs)]

    def inputs(self, rows: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The emulator's inputs of a batch or split (`labels`, `nuisance`): standardised labels, then nuisance labels."""
        labels = rows["labels"]
        return torch.cat([labels, rows["nuisance"].to(labels)], 1) if self.nuisance["names"] else labels

    def _known(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(flux, weight, inputs) of the rows with every input known: the emulator maps all of them to flux."""
        labels = self.inputs(batch)
        keep = torch.isfinite(labels).all(1)
        flux, weight = batch["flux"], batch["weight"]
        if not bool(keep.all()):
            flux, weight, labels = flux[keep], weight[keep], labels[keep]
        return flux.float(), weight.float(), labels.float()

    def emulate_known(self, labels, flux, weight) -> torch.Tensor:
        """Flux (B, P) at known standardised labels (B, L), latent labels (if any) solved against `flux`, `weight`."""
        return self.net.emulate_known(labels, flux, weight) if self.kind == "mlp" else self.net(labels)

    def training_step(self, batch, batch_idx):
        flux, weight, labels = self._known(batch)
        if self.kind == "quadratic":
            self._train_rows.append((labels.detach(), flux.detach(), weight.detach()))
            return None
        if not bool(self.prepared):  # trained without a DataModule: prepare from the first batch
            self._prepare(labels, flux, weight)
        if not len(labels):
            return None
        with torch.autocast(device_type=flux.device.type, enabled=False):
            total, count = flux_chi2(flux, weight, self.emulate_known(labels, flux, weight))
            loss = total / count.clamp(min=1)
        n = len(flux)
        self._train_loss_sum = self._train_loss_sum + loss.detach() * n
        self._train_loss_count += n
        every = self.trainer.log_every_n_steps if self._trainer is not None else 1
        if (self.global_step + 1) % max(every, 1) == 0:
            value = float(loss.detach())
            self._check_finite(value, "training chi-square")
            for logger in self.loggers if self._trainer is not None else ():
                logger.log_metrics({"train/loss_step": value}, step=self.global_step)
        return loss

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._train_rows = []

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.kind == "quadratic" and self.trainer.is_last_batch:
            self._solve_quadratic()  # before this epoch's validation, which runs next

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if self.kind == "quadratic" and self._train_rows:  # a loader of unknown length never flagged its last batch
            self._solve_quadratic()

    @torch.no_grad()
    def _solve_quadratic(self) -> None:
        labels, flux, weight = (torch.cat(t) for t in zip(*self._train_rows))
        self._train_rows = []
        if not bool(self.prepared):
            self._prepare(labels, flux, weight)
        self.scatter2.copy_(self.net.fit(labels, flux, weight, scatter=self.use_scatter))
        total, count = flux_chi2(flux, weight, self.net(labels))
        self.log("train/loss", float(total / count.clamp(min=1)), on_step=False, on_epoch=True, batch_size=len(flux))
        # no optimizer: the solve counts as the step, so the checkpoint callback saves it
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        progress.increment_ready()
        progress.increment_completed()
        self.trainer.should_stop = True

    # -- validation: the emulated flux at the true labels --------------------------------------------
    def validation_step(self, batch, batch_idx):
        flux, weight, labels = self._known(batch)
        with torch.autocast(device_type=flux.device.type, enabled=False), torch.no_grad():
            resid = flux - self.emulate_known(labels, flux, weight)
        total, count = flux_chi2(resid, weight, torch.zeros_like(resid))
        self._val["chi2"] = self._val.get("chi2", 0.0) + float(total)
        self._val["pixels"] = self._val.get("pixels", 0) + int(count)
        kept = self._val.setdefault("rows", [])
        room = SCATTER_ROWS - sum(len(r) for r, _ in kept)
        if room > 0 and self.kind == "mlp" and self.use_scatter:
            kept.append((resid[:room], weight[:room]))

    def on_validation_epoch_end(self) -> None:
        values, self._val = self._val, {}
        loss = float(values.get("chi2", math.nan)) / max(values.get("pixels", 0), 1)
        self.log("val/loss", loss, prog_bar=True, **GLOBAL)
        if self.trainer.sanity_checking:
            return
        if values.get("rows"):
            resid, weight = (torch.cat(t) for t in zip(*values["rows"]))
            self.scatter2.copy_(fit_scatter(resid, weight))
        positive = self.scatter2[self.scatter2 > 0]
        self.log("val/scatter_median", float(positive.sqrt().median()) if len(positive) else 0.0, **GLOBAL)
        self.best_val_loss = min(self.best_val_loss, loss)
        self.log("val/loss_best", self.best_val_loss, prog_bar=True, **GLOBAL)

    # -- calibration of the errors: after training, on the validation split ----------------------------
    def on_train_end(self) -> None:
        super().on_train_end()
        datamodule = getattr(self.trainer, "datamodule", None)
        if not hasattr(datamodule, "split_arrays") or "val" not in getattr(datamodule, "tensors", {}):
            return
        val = datamodule.split_arrays("val")
        rows = np.flatnonzero(torch.isfinite(val["labels"]).all(1).numpy())[:CALIBRATION_ROWS]
        if not len(rows):
            return
        index = torch.from_numpy(rows)
        flux, weight, labels = (val[k][index].float().to(self.device) for k in ("flux", "weight", "labels"))
        current = {k: v.detach().clone() for k, v in self.state_dict().items()}
        scales = {self.trainer.global_step: self._error_scale(flux, weight, labels)}
        for path in self._saved_checkpoints():
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
            step = checkpoint.get("global_step")
            if step not in scales:
                self.load_state_dict(checkpoint["state_dict"])
                self._templates = None
                scales[step] = self._error_scale(flux, weight, labels)
            checkpoint["state_dict"]["sigma_scale"] = scales[step].cpu()
            checksum.stamp(checkpoint)
            with atomic_path(path) as tmp:
                torch.save(checkpoint, tmp)
        self.load_state_dict(current)
        self._templates = None
        self.sigma_scale.copy_(scales[self.trainer.global_step])
        self.retry_counts = [0, 0]  # the test's count starts here
        log.info("errors calibrated on %d validation spectra: formal error x %s (%s)", len(rows),
                 " / ".join(f"{v:.2f}" for v in self.sigma_scale.tolist()), " / ".join(self.label_names))

    def _saved_checkpoints(self) -> list[Path]:
        """The checkpoint files this run's ModelCheckpoint callbacks keep (best ones and last)."""
        paths: set[str] = set()
        for callback in self.trainer.checkpoint_callbacks:
            paths.update(str(p) for p in getattr(callback, "best_k_models", {}))
            paths.update(p for p in (getattr(callback, "best_model_path", ""), getattr(callback, "last_model_path", "")) if p)
        return sorted(Path(p) for p in paths if Path(p).is_file())

    @torch.no_grad()
    def _error_scale(self, flux: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """`error_scale` of the fits of spectra with known standardised labels."""
        n, fit = len(self.label_names), self._fit(flux, weight)
        return error_scale(fit.labels[:, :n], fit.sigma[:, :n], fit.converged, labels).to(self.sigma_scale)

    # -- test: the full label fit ----------------------------------------------------------------------
    def test_step(self, batch, batch_idx):
        fit = self._fit(batch["flux"], batch["weight"])
        n = len(self.label_names)
        self._outputs["test"].append((fit.labels[:, :n], batch["labels"], fit.sigma[:, :n]))
        if "index" in batch:
            self._eval_index["test"].append(batch["index"])
        self._fit_rows.append(fit)

    def on_test_epoch_end(self) -> None:
        fits, self._fit_rows = self._fit_rows, []
        super().on_test_epoch_end()
        if not fits:
            return
        rchi2 = torch.cat([f.rchi2 for f in fits]).float().cpu().numpy()
        converged = torch.cat([f.converged for f in fits]).cpu().numpy()
        at_bound = torch.cat([f.at_bound[:, : len(self.label_names)].any(1) for f in fits]).cpu().numpy()
        self.test_results["fit"] = {"rchi2": rchi2, "converged": converged, "at_bound": at_bound}
        self.log("test/converged_fraction", float(converged.mean()), **GLOBAL)
        self.log("test/rchi2_median", float(np.median(rchi2)), **GLOBAL)
        log.info("test fits: %.1f%% converged, median reduced chi-square %.3f, %.1f%% with a label on its bound; %d "
                 "poor fits retried (fit_retry_rchi2=%s), %d of them ended lower", 100 * converged.mean(),
                 np.median(rchi2), 100 * at_bound.mean(), self.retry_counts[0],
                 self.fit_settings["retry_rchi2"] or "null", self.retry_counts[1])
        self.retry_counts = [0, 0]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("state_dict", {})
        if self.kind == "mlp" and "net.flux_scale" not in state and "net.out.bias" in state:
            state["net.flux_scale"] = torch.ones_like(state["net.out.bias"])  # older checkpoints: raw flux outputs
        if self.kind == "quadratic" and "net.error_variance" not in state and "net.theta" in state:  # older: none
            state["net.error_patterns"], state["net.error_variance"] = torch.zeros(len(state["net.theta"]), 0), torch.ones(0)
        self.best_val_mse = None
        self._templates = None


__all__ = ["EmulatorRegressor"]
