"""One LightningModule base for every network: loss, metrics, optimiser wiring and best-so-far tracking.

Subclasses only build `self.net` (spectrum -> `self.n_outputs` values). The base trains on
standardised labels with a masked loss (a missing label contributes nothing), and reports metrics in
physical units using the label statistics it carries as buffers, so a checkpoint predicts on its own.

`loss=mse` (default): the net outputs one standardised mean per label.
`loss=gaussian_nll`: the net outputs a mean and a raw scale per label (2L values); the base turns the
scale into sigma = softplus(raw) + SIGMA_MIN and trains on the Gaussian negative log-likelihood, so
every network predicts its own uncertainty. `forward` returns the means either way. Training uses
beta-NLL (`nll_beta`, default 0.5): with plain NLL (0) the default MLP's validation loss spiked and
early stopping kept an early, worse epoch; with 0.5 its means match the MSE run's and the sigmas stay
calibrated (the figures are in the README's uncertainty section).

A network that fits its training spectra better than unseen ones (the default MLP does, by far) learns sigmas that are too small for new stars. So after every
validation epoch the base refits one factor per label, `sigma_scale` = RMS of the validation z-scores
(the factor that minimises the validation NLL), and every reported sigma (val loss, test,
`predict_with_uncertainty`, `predict`) is the net's sigma times that factor: the relative sigmas come from the
net, their overall level from held-out stars (the factor grows over training as the net overfits). The factor travels in the checkpoint as a buffer.

A checkpoint also carries a SHA-256 of its weights (`stellarlab.models.checksum`: flipped bytes still
unpickle, and would predict confident nonsense) and the training labels' range (`label_min`,
`label_max`), outside which predict.py flags a prediction. `nuisance_labels` (the data's, `model_spec`) is
for models that emulate spectra; one that reads labels off a spectrum keeps it in its hyperparameters only.
`logged_metrics` names what a fit logs, so a misspelt `optimized_metric` is refused before training.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from stellarlab.checks import Choice, Number, Rule, check_call
from stellarlab.errors import ConfigError, TrainingError
from stellarlab.metrics import calibration, label_metrics
from stellarlab.models import checksum
from stellarlab.models.inference import Predicting
from stellarlab.models.losses import LOSSES, SIGMA_MIN, masked_gaussian_nll, masked_mse, rms_z
from stellarlab.models.quality import TrainingDomain, domain_of

# Epoch-level val/test values are computed from predictions all_gathered from every rank, so each rank
# holds the same global number. Logging them with a max-reduction across ranks returns that number
# exactly and tells Lightning they are synchronised (no "use sync_dist=True" warning under DDP).
GLOBAL = {"sync_dist": True, "reduce_fx": "max"}

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
}


class ActivationName(Rule):
    """A name of `ACTIVATIONS`, in any case. The message starts "unknown activation '<name>'": sweep summaries match on it."""

    def check(self, key: str, value: Any) -> None:
        name = str(value)
        if name.lower() not in ACTIVATIONS:
            close = difflib.get_close_matches(name.lower(), sorted(ACTIVATIONS), n=1)
            hint = f"did you mean {key}={close[0]}? " if close else ""
            raise ConfigError(f"unknown activation '{name}' ({key}); {hint}choose one of {sorted(ACTIVATIONS)}")


#: `activation` argument of the networks.
Activation = Annotated[str, ActivationName()]


def activation(name: str) -> nn.Module:
    ActivationName().check("model.activation", name)
    return ACTIVATIONS[name.lower()]()


def _drop_repeats(index: torch.Tensor, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Rows of `tensors` sorted by `index`, each index kept once: the split in its own order, as one process sees it."""
    order = torch.argsort(index, stable=True)
    ordered = index[order]
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    keep = order[first]
    return [None if t is None else t[keep] for t in tensors]


#: callback_metrics key of the completed epoch count (set at the end of fitting, never sent to loggers)
EPOCHS_METRIC = "stellarlab/epochs"
#: Per-label statistics logged on each validation epoch (and test), as `<stage>/<stat>_<label>`.
LABEL_STATS = ("rmse", "mae", "bias", "mad_std")


class SpectrumRegressor(Predicting, pl.LightningModule):
    """Base for all models. `forward(flux)` returns standardised label means; `predict_physical` undoes the scaling.

    `loss` is `mse` or `gaussian_nll`; subclasses size their output layer with `self.n_outputs`
    (L or 2L) and never need to know which loss is in use.

    Arguments state their rules in their annotations (`stellarlab.checks`); every subclass's too, with
    no code of its own: `__new__` checks the arguments of each call, and `validate_train_config` the config.
    """

    #: Epochs a fit can take at most whatever trainer.max_epochs says (None: as many as the trainer allows).
    max_fit_epochs: ClassVar[int | None] = None
    #: Fitted from every batch of its one epoch at once, the rows kept in memory until the epoch ends: a checkpoint
    #: in the middle of that epoch cannot hold them, so an interrupted fit starts its epoch again.
    fits_in_one_pass: bool = False

    def __new__(cls, *args, **kwargs):
        check_call(cls, args, kwargs, "model")
        return super().__new__(cls)

    @classmethod
    def logged_metrics(cls, label_names: Sequence[str], values: Mapping[str, Any]) -> list[str]:
        """The names a fit leaves in `trainer.callback_metrics` for these labels and model arguments `values`.

        `optimized_metric` must name one of them; the config check asks before training, not after it.
        """
        names = ["train/loss_epoch", "val/loss", "val/loss_best", "val/mse", "val/mse_at_best"]
        names += [f"val/{stat}_{label}" for label in label_names for stat in LABEL_STATS]
        if str(values.get("loss", "mse")) == "gaussian_nll":
            names += [f"val/sigma_scale_{label}" for label in label_names]
        return names

    def __init__(
        self,
        n_pixels: int,
        label_names: Sequence[str],
        label_mean: Sequence[float] | None = None,
        label_std: Sequence[float] | None = None,
        label_min: Sequence[float] | None = None,
        label_max: Sequence[float] | None = None,
        nuisance_labels: Mapping[str, Any] | None = None,
        optimizer: Callable | None = None,
        scheduler: Callable | None = None,
        wavelength: torch.Tensor | None = None,
        loss: Annotated[str, Choice(*LOSSES)] = "mse",
        nll_beta: Annotated[float, Number(minimum=0, maximum=1, example="model.nll_beta=0.5")] = 0.5,
    ):
        super().__init__()
        self.loss_name = str(loss)
        self.nll_beta = float(nll_beta)
        self.n_labels = len(label_names)
        # Output width of `self.net`: a mean per label, plus a raw sigma per label for gaussian_nll.
        self.n_outputs = self.n_labels * (2 if self.loss_name == "gaussian_nll" else 1)
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "wavelength"], logger=False)
        for key, value in list(self.hparams.items()):  # plain types keep checkpoints loadable with weights_only
            if OmegaConf.is_config(value):
                self.hparams[key] = OmegaConf.to_container(value, resolve=True)
        n_labels = len(label_names)
        self.label_names = list(label_names)
        self.register_buffer("label_mean", torch.tensor(label_mean or [0.0] * n_labels, dtype=torch.float32))
        self.register_buffer("label_std", torch.tensor(label_std or [1.0] * n_labels, dtype=torch.float32))
        wl = torch.zeros(n_pixels) if wavelength is None else torch.as_tensor(wavelength, dtype=torch.float32)
        self.register_buffer("wavelength", wl)
        if self.loss_name == "gaussian_nll":  # only then, so mse checkpoints keep their exact state_dict
            self.register_buffer("sigma_scale", torch.ones(n_labels))
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.best_val_loss = math.inf
        self.best_val_mse = math.nan  # val MSE at the epoch of best_val_loss (the checkpoint that is tested)
        self.test_results: dict | None = None
        # per batch: (means, targets) or, with gaussian_nll, (means, targets, sigmas); standardised units
        self._outputs: dict[str, list[tuple[torch.Tensor, ...]]] = {"val": [], "test": []}
        # per batch: the rows' positions in the split, when the DataModule provides them (`index`)
        self._eval_index: dict[str, list[torch.Tensor]] = {"val": [], "test": []}
        self._train_loss_sum = torch.zeros(())
        self._train_loss_count = 0
        self._epoch_sigma = None  # physical sigmas (numpy) of the last _epoch_results, gaussian_nll only
        self._epoch_mse = math.nan  # standardised MSE of the last _epoch_results
        self.training_domain: TrainingDomain | None = None  # set at the start of fitting, saved with every checkpoint

    # -- prediction ---------------------------------------------------------------------------
    def forward(self, flux: torch.Tensor) -> torch.Tensor:
        # Absorption depth is 0 on the continuum, so bad pixels (flux set to 1) carry no signal.
        out = self.net(1.0 - flux)
        return out if self.loss_name == "mse" else out[:, : self.n_labels]

    def _mean_and_sigma(self, flux: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Standardised means and sigmas (None for loss=mse) from one pass through the net."""
        if self.loss_name == "mse":
            return self(flux), None  # through forward, so subclasses that override it keep working
        out = self.net(1.0 - flux).float()  # float32 even under mixed precision: log and 1/sigma^2 follow
        return out[:, : self.n_labels], F.softplus(out[:, self.n_labels :]) + SIGMA_MIN

    def training_range(self) -> tuple[list[float], list[float], bool]:
        """(low, high, saved) per label: the training labels' range as saved with the model (`saved`), or for a
        checkpoint written before it was saved, label_mean -/+ 3 label_std."""
        low, high = self.hparams.get("label_min"), self.hparams.get("label_max")
        if low is not None and high is not None:
            return [float(v) for v in low], [float(v) for v in high], True
        mean, std = self.label_mean.tolist(), self.label_std.tolist()
        return [m - 3 * s for m, s in zip(mean, std)], [m + 3 * s for m, s in zip(mean, std)], False

    def predict_physical(self, flux: torch.Tensor) -> torch.Tensor:
        return self(flux) * self.label_std + self.label_mean

    def predict_with_uncertainty(self, flux: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, sigma) per label in physical units; needs a model trained with loss=gaussian_nll."""
        if self.loss_name != "gaussian_nll":
            raise ConfigError(
                f"this model was trained with model.loss={self.loss_name} and predicts no uncertainty; "
                "train with model.loss=gaussian_nll"
            )
        mean, sigma = self._mean_and_sigma(flux)
        return mean * self.label_std + self.label_mean, sigma * self.sigma_scale * self.label_std

    def compute_loss(self, mean: torch.Tensor, sigma: torch.Tensor | None, target: torch.Tensor) -> torch.Tensor:
        """The configured loss on standardised labels (NaN target = no contribution).

        The beta-NLL weighting applies in training mode only: evaluation always scores the plain NLL.
        """
        if self.loss_name == "gaussian_nll":
            return masked_gaussian_nll(mean.float(), sigma, target, self.nll_beta if self.training else 0.0)
        return masked_mse(mean, target)

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- steps ----------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        loss = self.compute_loss(*self._mean_and_sigma(batch["flux"]), batch["labels"])
        # The epoch's loss is summed on the device and logged once per epoch, and the step curve is
        # written every `log_every_n_steps` steps: `self.log` on every step costs as much as a linear
        # model's whole step. A non-finite loss is caught at those points (or at the end of the epoch).
        n = len(batch["flux"])
        self._train_loss_sum = self._train_loss_sum + loss.detach() * n
        self._train_loss_count += n
        every = self.trainer.log_every_n_steps if self._trainer is not None else 1
        if (self.global_step + 1) % max(every, 1) == 0:
            value = float(loss.detach())
            self._check_finite(value, "training loss")
            if self._trainer is not None:
                for logger in self.loggers:
                    logger.log_metrics({"train/loss_step": value}, step=self.global_step)
        return loss

    def _check_finite(self, value: float, what: str) -> None:
        if not math.isfinite(value):
            raise TrainingError(
                f"{what} became {value} at epoch {self.current_epoch}, step {self.global_step}; "
                "lower optimizer.lr, add a scheduler, or check the input spectra for extreme values"
            )

    def on_train_epoch_start(self) -> None:
        self._train_loss_sum = torch.zeros((), device=self.device)
        self._train_loss_count = 0

    def on_train_epoch_end(self) -> None:
        if self._train_loss_count:  # closed-form baselines log their own training loss
            mean = self._train_loss_sum / self._train_loss_count
            self._check_finite(float(mean), "mean training loss of the epoch")
            self.log("train/loss_epoch", mean, prog_bar=True, sync_dist=True)

    def on_fit_start(self) -> None:
        # What predict.py compares new spectra with (`stellarlab.models.quality`): from the data, not the weights,
        # so it is known before the first checkpoint is written and every checkpoint of the run carries it.
        datamodule = getattr(self.trainer, "datamodule", None)
        self.training_domain = domain_of(datamodule) if datamodule is not None else None

    def on_train_end(self) -> None:
        # Epochs completed, for metrics.json: under ddp_spawn the fit runs in other processes and only
        # callback_metrics come back to the one that writes the summary.
        self.trainer.callback_metrics[EPOCHS_METRIC] = torch.tensor(float(self.current_epoch))

    def _eval_step(self, stage: str, batch) -> None:
        mean, sigma = self._mean_and_sigma(batch["flux"])
        row = (mean.detach(), batch["labels"]) if sigma is None else (mean.detach(), batch["labels"], sigma.detach())
        self._outputs[stage].append(row)
        if "index" in batch:
            self._eval_index[stage].append(batch["index"])

    def validation_step(self, batch, batch_idx):
        self._eval_step("val", batch)

    def test_step(self, batch, batch_idx):
        self._eval_step("test", batch)

    def _epoch_results(self, stage: str):
        """Loss on the whole split and per-label metrics in physical units (gathered across ranks).

        Returns (loss, metrics, pred, true) with the means; with gaussian_nll the physical sigmas are
        left in `self._epoch_sigma`. Logs `<stage>/loss` (the configured loss) and `<stage>/mse`
        (the standardised MSE of the means, the same number for every loss, so runs compare).
        """
        outputs, index = self._outputs[stage], self._eval_index[stage]
        self._outputs[stage], self._eval_index[stage] = [], []
        pred = torch.cat([o[0] for o in outputs])
        target = torch.cat([o[1] for o in outputs])
        sigma = torch.cat([o[2] for o in outputs]) if outputs and len(outputs[0]) > 2 else None
        if self.trainer is not None and self.trainer.world_size > 1:
            pred = self.all_gather(pred).flatten(0, 1)
            target = self.all_gather(target).flatten(0, 1)
            if sigma is not None:
                sigma = self.all_gather(sigma).flatten(0, 1)
            if index:  # DistributedSampler repeats rows to even out the ranks: keep each row once
                index = self.all_gather(torch.cat(index)).flatten(0, 1)
                pred, target, sigma = _drop_repeats(index, pred, target, sigma)
        mse = masked_mse(pred, target)
        if sigma is not None:
            if stage == "val" and not self.trainer.sanity_checking:
                self.sigma_scale.copy_(rms_z(pred.float(), sigma, target))
                for label, value in zip(self.label_names, self.sigma_scale.tolist()):
                    self.log(f"val/sigma_scale_{label}", value, **GLOBAL)
            sigma = sigma * self.sigma_scale
        loss = mse if sigma is None else masked_gaussian_nll(pred.float(), sigma, target)
        pred_phys = (pred * self.label_std + self.label_mean).float().cpu().numpy()
        true_phys = (target * self.label_std + self.label_mean).float().cpu().numpy()
        self._epoch_sigma = None if sigma is None else (sigma * self.label_std).float().cpu().numpy()
        metrics = label_metrics(pred_phys, true_phys, self.label_names, self.label_mean.cpu().numpy())
        for label, row in metrics.items():
            for name in LABEL_STATS:
                self.log(f"{stage}/{name}_{label}", row[name], **GLOBAL)
        self.log(f"{stage}/loss", loss.float(), prog_bar=True, **GLOBAL)
        self.log(f"{stage}/mse", mse.float(), **GLOBAL)
        self._epoch_mse = float(mse)
        return float(loss), metrics, pred_phys, true_phys

    def on_validation_epoch_end(self):
        loss, *_ = self._epoch_results("val")
        if self.trainer.sanity_checking:
            return
        # val/loss_best is the lowest val/loss so far, in the configured loss (an MSE or an NLL): the
        # value at the epoch the checkpoint callback keeps. val/mse_at_best is the val MSE of that same
        # epoch: the number to compare runs trained with different losses.
        if loss < self.best_val_loss:
            self.best_val_loss = loss
            self.best_val_mse = self._epoch_mse
        self.log("val/loss_best", self.best_val_loss, prog_bar=True, **GLOBAL)
        self.log("val/mse_at_best", self.best_val_mse, **GLOBAL)

    def on_test_epoch_end(self):
        loss, metrics, pred, true = self._epoch_results("test")
        self.test_results = {"loss": loss, "metrics": metrics, "pred": pred, "true": true}
        sigma = self._epoch_sigma
        if sigma is not None:
            calib = calibration(pred, true, sigma, self.label_names)
            self.test_results["sigma"] = sigma
            self.test_results["calibration"] = calib
            for label, row in calib.items():
                for name in ("frac_within_1sigma", "frac_within_2sigma", "z_std", "z_mad_std", "mean_sigma"):
                    self.log(f"test/{name}_{label}", row[name], **GLOBAL)
        if self.trainer is not None and self.trainer.world_size > 1 and self.trainer.is_global_zero:
            from stellarlab.models.test_results import (  # ddp_spawn: the launcher gets no attributes back
                TEST_RESULTS_FILE,
                save_test_results,
            )

            extra = {"best_val_loss": self.best_val_loss, "best_val_mse": self.best_val_mse}
            save_test_results(Path(self.trainer.default_root_dir) / TEST_RESULTS_FILE, self.test_results, extra)

    # -- optimisation ---------------------------------------------------------------------------
    def configure_optimizers(self):
        factory = self.optimizer_factory or (lambda params: torch.optim.Adam(params, lr=1e-3))
        optimizer = factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "monitor": "val/loss", "interval": "epoch"},
        }

    # -- checkpoint extras ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # predict.py and eval.py rebuild the model from the checkpoint alone
        checkpoint["stellarlab"] = {"model_class": f"{type(self).__module__}.{type(self).__qualname__}"}
        if self.training_domain is not None:
            checkpoint["stellarlab"]["training_domain"] = self.training_domain.state()
        checksum.stamp(checkpoint)  # read back by eval.py, predict.py and resume: damaged weights are refused
        checkpoint["best_val_loss"] = self.best_val_loss
        checkpoint["best_val_mse"] = self.best_val_mse

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        domain = (checkpoint.get("stellarlab") or {}).get("training_domain")
        self.training_domain = None if domain is None else TrainingDomain.from_state(domain)
        self.best_val_loss = checkpoint.get("best_val_loss", math.inf)
        self.best_val_mse = checkpoint.get("best_val_mse", math.nan)

