"""Models fitted in one pass over the training split, with no optimizer: the loop ridge and knn share.

Baselines go through the same `train.py`, Trainer, metrics, checkpoints and TensorBoard as the
networks, so their numbers are directly comparable. `ClosedFormRegressor` turns Lightning's loop
into "read the training split once, solve, stop": the first epoch collects the training spectra,
the last training batch triggers the solve (validation runs right after it, inside the same epoch),
the candidates (`alpha: [...]`, `k: [...]`) are compared on the validation split, and
`trainer.should_stop` ends the fit whatever `trainer.max_epochs` says.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from omegaconf import OmegaConf

from stellarlab.errors import ConfigError, DataError
from stellarlab.models.base import SpectrumRegressor


def candidate_list(value) -> list:
    """One value or a list of them (tuned on validation), as a plain list (the argument's rule refused an empty one)."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    return list(value) if isinstance(value, (list, tuple)) else [value]


class ClosedFormRegressor(SpectrumRegressor):
    """Base for models fitted in one pass over the training split, with no optimizer.

    Subclasses implement `_fit_depth(depth, labels, val_depth, val_labels) -> {candidate: val loss}`
    and set `self.chosen` (the candidate kept), on standardised labels and absorption depth 1 - flux.
    """

    #: Name of the hyperparameter tuned on validation (`alpha`, `k`): logged as `model/<name>`.
    tuned: str = ""
    max_fit_epochs = 1  # the solve ends the fit after its first epoch
    fits_in_one_pass = True

    @classmethod
    def logged_metrics(cls, label_names: Sequence[str], values: Mapping[str, Any]) -> list[str]:
        """The validation metrics of every model and the tuned value; no per-epoch training loss (no epochs)."""
        names = [n for n in super().logged_metrics(label_names, values) if n != "train/loss_epoch"]
        return [*names, f"model/{cls.tuned}"]

    @classmethod
    def check_together(cls, values: Mapping[str, Any]) -> None:
        if str(values.get("loss", "mse")) != "mse":
            raise ConfigError(
                f"{cls.__name__} fits the labels' means only (least squares / neighbour average): "
                f"model.loss={values['loss']} is not available for it; use a network (model=mlp, cnn, linear)"
            )

    def __init__(self, n_pixels: int, label_names, **kwargs):
        super().__init__(n_pixels=n_pixels, label_names=label_names, **kwargs)
        self.automatic_optimization = False
        self._train_rows: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.tuning: dict[str, float] = {}
        if kwargs.get("optimizer") is not None or kwargs.get("scheduler") is not None:
            logging.getLogger(type(self).__module__).info(
                "%s is fitted in closed form in one pass over the training split: the optimizer and scheduler "
                "configs are ignored",
                type(self).__name__,
            )

    # -- the public fit (tests, notebooks): the same solve the Trainer runs ---------------------
    @torch.no_grad()
    def fit(self, flux, labels, val_flux=None, val_labels=None) -> dict[str, float]:
        """Fit on spectra `flux` (N, P) and standardised `labels` (N, L), NaN = missing; choose on the validation pair."""
        device = self.label_mean.device
        as_t = lambda a: None if a is None else torch.as_tensor(a, dtype=torch.float32, device=device)  # noqa: E731
        flux, labels, val_flux, val_labels = map(as_t, (flux, labels, val_flux, val_labels))
        val_depth = None if val_flux is None else 1.0 - val_flux
        return self._fit_checked(1.0 - flux, labels, val_depth, val_labels)

    def _fit_checked(self, depth, labels, val_depth, val_labels) -> dict[str, float]:
        if labels.ndim != 2 or labels.shape[1] != len(self.label_names) or len(labels) != len(depth):
            raise DataError(
                f"labels of shape {tuple(labels.shape)} do not match {len(depth)} spectra x {len(self.label_names)} labels"
            )
        n_candidates = len(getattr(self, f"{self.tuned}_candidates"))
        if n_candidates > 1 and (val_depth is None or len(val_depth) == 0):
            raise ConfigError(
                f"model.{self.tuned} lists {n_candidates} candidates but there is no validation split to choose "
                f"among them; give one value (model.{self.tuned}=...) or a validation split (data.split)"
            )
        with torch.autocast(device_type=depth.device.type, enabled=False):
            self.tuning = self._fit_depth(depth.float(), labels.float(), val_depth, val_labels)
        return self.tuning

    def _fit_depth(self, depth, labels, val_depth, val_labels) -> dict[str, float]:
        raise NotImplementedError

    def _report_choice(self) -> None:
        chosen, log_ = self.chosen, logging.getLogger(type(self).__module__)
        if len(self.tuning) > 1:
            table = ", ".join(f"{c}: {loss:.5g}" for c, loss in self.tuning.items())
            log_.info("%s: %s=%s chosen on the validation split (val loss by %s: %s)", type(self).__name__, self.tuned, chosen, self.tuned, table)
        else:
            log_.info("%s: %s=%s (one candidate, nothing to tune)", type(self).__name__, self.tuned, chosen)

    @property
    def chosen(self):
        raise NotImplementedError

    # -- Lightning: one epoch, no optimizer -------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.trainer is not None and self.trainer.world_size > 1:
            raise ConfigError(
                f"{type(self).__name__} is fitted in closed form on one device; set trainer.devices=1 "
                f"(this run has {self.trainer.world_size} processes)"
            )

    def configure_optimizers(self):
        # No optimizer. Lightning 2.x accepts an empty list silently; returning None works too but
        # warns on every fit ("configure_optimizers returned None, this fit will run with no optimizer").
        return []

    def on_train_epoch_start(self) -> None:
        self._train_rows = []

    def training_step(self, batch, batch_idx):
        self._train_rows.append(((1.0 - batch["flux"]).detach().float(), batch["labels"].detach().float()))
        return None

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # Validation runs right after the last batch, before on_train_epoch_end: solve here.
        if self.trainer.is_last_batch:
            self._fit_from_epoch()

    def on_train_epoch_end(self) -> None:
        if self._train_rows:  # the loop never flagged a last batch (an iterable of unknown length)
            logging.getLogger(type(self).__module__).warning("%s: fitted at the end of the epoch, after this epoch's validation", type(self).__name__)
            self._fit_from_epoch()

    def _val_split(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        dm = self.trainer.datamodule
        loader = dm.val_dataloader() if dm is not None else self.trainer.val_dataloaders
        if loader is None:
            return None, None
        depth, labels = [], []
        for batch in loader:
            depth.append(1.0 - batch["flux"].to(self.device, torch.float32))
            labels.append(batch["labels"].to(self.device, torch.float32))
        if not depth:
            return None, None
        return torch.cat(depth), torch.cat(labels)

    @torch.no_grad()
    def _fit_from_epoch(self) -> None:
        depth = torch.cat([d for d, _ in self._train_rows])
        labels = torch.cat([y for _, y in self._train_rows])
        self._train_rows = []
        self._fit_checked(depth, labels, *self._val_split())
        self._report_choice()
        self.log(f"model/{self.tuned}", float(self.chosen), on_step=False, on_epoch=True)
        train_loss = self._train_loss(depth, labels)
        if train_loss is not None:
            self.log("train/loss", train_loss, on_step=False, on_epoch=True, batch_size=len(depth))
        # Lightning counts global_step in optimizer steps and ModelCheckpoint saves nothing at step 0;
        # there is no optimizer here, so the solve counts as the one step.
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        progress.increment_ready()
        progress.increment_completed()
        self.trainer.should_stop = True  # one epoch is the whole fit, whatever trainer.max_epochs says

    def _train_loss(self, depth, labels) -> torch.Tensor | None:
        return None

    # -- checkpoint extras ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["tuning"] = dict(self.tuning)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.tuning = dict(checkpoint.get("tuning", {}))


def label_groups(known: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Labels that are known on exactly the same rows share one system: [(label indices, row mask)].

    `known` is the (N, L) finite mask. Without missing labels this is one group of all labels.
    """
    patterns, inverse = torch.unique(known.T.cpu(), dim=0, return_inverse=True)  # on CPU: MPS lacks unique(dim=)
    return [
        (torch.nonzero(inverse == g).flatten().to(known.device), patterns[g].to(known.device))
        for g in range(len(patterns))
    ]
