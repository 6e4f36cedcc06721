"""Callbacks stellarlab adds to Lightning's: figures in TensorBoard and as PNG files in the run folder."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger

from stellarlab.plots import example_spectra_figure, pred_vs_true_figure


class FigureLogger(pl.Callback):
    """Example spectra at the start of fitting; predicted vs true with residuals after testing."""

    def __init__(self, n_example_spectra: int = 4, save_dir: str | None = None):
        self.n_example_spectra = int(n_example_spectra)
        self.save_dir = save_dir

    def _emit(self, trainer: pl.Trainer, tag: str, fig) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure(tag, fig, global_step=trainer.global_step, close=False)
        out = Path(self.save_dir or Path(trainer.default_root_dir) / "figures")
        out.mkdir(parents=True, exist_ok=True)
        fig.savefig(out / (tag.replace("/", "_") + ".png"), dpi=110)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = trainer.datamodule
        if not trainer.is_global_zero or self.n_example_spectra < 1 or not getattr(dm, "tensors", None):
            return
        t = dm.tensors["train"]
        n = min(self.n_example_spectra, len(t["flux"]))
        fig = example_spectra_figure(dm.wavelength, t["flux"][:n].numpy(), t["labels_phys"][:n].numpy(), dm.label_names)
        self._emit(trainer, "examples/spectra", fig)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        results = getattr(pl_module, "test_results", None)
        if not trainer.is_global_zero or not results:
            return
        fig = pred_vs_true_figure(results["pred"], results["true"], pl_module.label_names)
        self._emit(trainer, "test/pred_vs_true", fig)
