"""One LightningModule base for every network: loss, metrics, optimiser wiring and best-so-far tracking.

Subclasses only build `self.net` (spectrum -> standardised labels). The base trains on standardised
labels with a masked MSE (a missing label contributes nothing), and reports metrics in physical
units using the label statistics it carries as buffers, so a checkpoint predicts on its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch import nn

from stellarlab.errors import ConfigError, TrainingError
from stellarlab.metrics import label_metrics

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
}


def activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name.lower()]()
    except KeyError:
        raise ConfigError(f"unknown activation '{name}'; choose one of {sorted(ACTIVATIONS)}") from None


def masked_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over labels of the MSE over the rows where that label is known (NaN = missing)."""
    mask = torch.isfinite(target)
    diff = (pred - torch.nan_to_num(target)) * mask
    counts = mask.sum(0)
    per_label = (diff**2).sum(0) / counts.clamp(min=1)
    return per_label[counts > 0].mean()


class SpectrumRegressor(pl.LightningModule):
    """Base for all models. `forward(flux)` returns standardised labels; `predict_physical` undoes the scaling."""

    def __init__(
        self,
        n_pixels: int,
        label_names: Sequence[str],
        label_mean: Sequence[float] | None = None,
        label_std: Sequence[float] | None = None,
        optimizer: Callable | None = None,
        scheduler: Callable | None = None,
        wavelength: torch.Tensor | None = None,
    ):
        super().__init__()
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
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.best_val_loss = math.inf
        self.test_results: dict | None = None
        self._outputs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"val": [], "test": []}

    # -- prediction ---------------------------------------------------------------------------
    def forward(self, flux: torch.Tensor) -> torch.Tensor:
        # Absorption depth is 0 on the continuum, so bad pixels (flux set to 1) carry no signal.
        return self.net(1.0 - flux)

    def predict_physical(self, flux: torch.Tensor) -> torch.Tensor:
        return self(flux) * self.label_std + self.label_mean

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- steps ----------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        loss = masked_mse(self(batch["flux"]), batch["labels"])
        if not torch.isfinite(loss):
            raise TrainingError(
                f"training loss became {loss.item()} at epoch {self.current_epoch}, step {self.global_step}; "
                "lower optimizer.lr, add a scheduler, or check the input spectra for extreme values"
            )
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch["flux"]))
        return loss

    def _eval_step(self, stage: str, batch) -> None:
        self._outputs[stage].append((self(batch["flux"]).detach(), batch["labels"]))

    def validation_step(self, batch, batch_idx):
        self._eval_step("val", batch)

    def test_step(self, batch, batch_idx):
        self._eval_step("test", batch)

    def _epoch_results(self, stage: str):
        """Loss on the whole split and per-label metrics in physical units (gathered across ranks)."""
        outputs = self._outputs[stage]
        self._outputs[stage] = []
        pred = torch.cat([o[0] for o in outputs])
        target = torch.cat([o[1] for o in outputs])
        if self.trainer is not None and self.trainer.world_size > 1:
            pred = self.all_gather(pred).flatten(0, 1)
            target = self.all_gather(target).flatten(0, 1)
        loss = masked_mse(pred, target)
        pred_phys = (pred * self.label_std + self.label_mean).float().cpu().numpy()
        true_phys = (target * self.label_std + self.label_mean).float().cpu().numpy()
        metrics = label_metrics(pred_phys, true_phys, self.label_names, self.label_mean.cpu().numpy())
        for label, row in metrics.items():
            for name in ("rmse", "mae", "bias", "mad_std"):
                self.log(f"{stage}/{name}_{label}", row[name], sync_dist=False)
        self.log(f"{stage}/loss", loss.float(), prog_bar=True, sync_dist=False)
        return float(loss), metrics, pred_phys, true_phys

    def on_validation_epoch_end(self):
        loss, *_ = self._epoch_results("val")
        if self.trainer.sanity_checking:
            return
        self.best_val_loss = min(self.best_val_loss, loss)
        self.log("val/loss_best", self.best_val_loss, prog_bar=True, sync_dist=False)

    def on_test_epoch_end(self):
        loss, metrics, pred, true = self._epoch_results("test")
        self.test_results = {"loss": loss, "metrics": metrics, "pred": pred, "true": true}

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
        checkpoint["best_val_loss"] = self.best_val_loss

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.best_val_loss = checkpoint.get("best_val_loss", math.inf)

