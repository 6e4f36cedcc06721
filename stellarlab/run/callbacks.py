"""Callbacks and the checkpoint plugin stellarlab adds to Lightning's.

- `FigureLogger`: figures in TensorBoard and as PNG files in the run folder (example spectra; after the
  test: predicted vs true, RMSE vs SNR with the Cramér–Rao bound, z-scores of predicted sigmas).
- `ModelCheckpoint`: Lightning's, with `last.ckpt` written at the end of every epoch.
- `ExactResume`: what Lightning's checkpoint lacks for a resumed run to repeat an uninterrupted one.
- `GracefulStop`: SIGTERM, Ctrl-C or Slurm's requeue signal save `last.ckpt` before the run exits.
- `AtomicCheckpointIO`: checkpoints are renamed into place, never half-written under their name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import EarlyStopping
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.exceptions import SIGTERMException

from stellarlab.files import write_bytes_atomic
from stellarlab.results.plots import example_spectra_figure, figures_of_test, save_png

log = logging.getLogger("stellarlab.run.callbacks")


class FigureLogger(pl.Callback):
    """Figures in TensorBoard and as PNG files in `<run>/figures/` (or `save_dir`).

    At the start of fitting: example spectra. After testing (`results.plots.figures_of_test`): predicted
    vs true with residuals; RMSE vs SNR per label with the Cramér–Rao bound on the synthetic survey; the
    z-scores of predicted sigmas (models with loss=gaussian_nll).
    """

    def __init__(self, n_example_spectra: int = 4, save_dir: str | None = None):
        self.n_example_spectra = int(n_example_spectra)
        self.save_dir = save_dir

    def _emit(self, trainer: pl.Trainer, tag: str, fig) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure(tag, fig, global_step=trainer.global_step, close=False)
        out = Path(self.save_dir or Path(trainer.default_root_dir) / "figures")
        save_png(fig, out / (tag.replace("/", "_") + ".png"))  # atomic: a killed run leaves no half PNG

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
        # debug=fdr tests one batch: no bound over the whole split (the test step skips it too)
        figures = figures_of_test(results, trainer.datamodule, pl_module.label_names, with_bound=not trainer.fast_dev_run)
        for tag, fig in figures.items():
            self._emit(trainer, tag, fig)


# -- resuming ------------------------------------------------------------------------------------------
def rng_states() -> dict:
    """The global random generators' states as tensors and plain lists (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available():
        states["mps"] = torch.mps.get_rng_state()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "mps" in states and torch.backends.mps.is_available():
        torch.mps.set_rng_state(states["mps"])


class ModelCheckpoint(pl.callbacks.ModelCheckpoint):
    """Lightning's ModelCheckpoint, with `last.ckpt` saved at the end of every epoch.

    Lightning (2.x) writes `last.ckpt` only in an epoch that also saved a top-k checkpoint, so after a run
    of epochs without a new best, `last.ckpt` lags behind and a hard kill loses all of them. Here it is
    the end of the last finished epoch, always: a kill loses at most the epoch in progress.
    """

    def _save_last_if_missed(self, trainer: pl.Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            if self._last_global_step_saved != trainer.global_step:
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)


class ExactResume(pl.Callback):
    """What Lightning's checkpoint lacks for a resumed run to repeat the uninterrupted one.

    - The global RNG states (torch, numpy, python, CUDA/MPS): the shuffling of the next epoch and
      dropout draw from them, and Lightning restores none. They are saved with every checkpoint and
      set back when training resumes from it, before the next epoch's data iterator is created.
      Epoch-end checkpoints are written at the end of validation, after which nothing draws random
      numbers until the next epoch begins (the resumed run's sanity check runs under Lightning's
      `isolate_rng`), so a resumed run replays that epoch exactly.
    - Loggers are flushed when an epoch starts: TensorBoard otherwise keeps up to 2 minutes of
      events in memory, which a killed process loses although its checkpoint is on disk.
    - An early stop decided before the checkpoint stays decided: Lightning does not save
      `trainer.should_stop`, so a resumed run would otherwise train one more epoch. So does the end of a
      model that `fits_in_one_pass`: its one epoch was its whole fit, and another would fit it again on
      another batch order (the Cannon's scatter would be measured on other spectra).
    - The metrics the last epoch logged: a run killed after its last epoch (during the test, the bound,
      the reports) resumes with no epoch to train, and goes straight on with the values its
      checkpoint holds.
    - The model's end of training: with no epoch left Lightning skips `on_train_end`, which the killed
      run may not have reached (the emulator calibrates its errors there), so it runs once here.
    """

    def __init__(self):
        self.restored = False
        self.trained = False
        self.restored_metrics: dict[str, float] = {}
        self._trainer: pl.Trainer | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict:
        metrics = {}
        if self._trainer is not None:  # what the epoch logged: a resumed run with nothing left to train needs it
            metrics = {k: float(v) for k, v in self._trainer.callback_metrics.items()
                       if not k.startswith("stellarlab/") and getattr(v, "numel", lambda: 1)() == 1}
        return {"rng": rng_states(), "metrics": metrics}

    def load_state_dict(self, state_dict: dict) -> None:
        # called while fit() restores the checkpoint, before the train data iterator exists
        self.restored = True
        if "rng" in state_dict:
            set_rng_states(state_dict["rng"])
        self.restored_metrics = dict(state_dict.get("metrics") or {})

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.trained = True
        if not self.restored:
            return
        for cb in trainer.callbacks:
            if isinstance(cb, EarlyStopping) and (cb.stopped_epoch > 0 or 0 < cb.wait_count >= cb.patience):
                trainer.should_stop = True
        if getattr(pl_module, "fits_in_one_pass", False) and trainer.current_epoch > 0:
            trainer.should_stop = True

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for logger in trainer.loggers:
            logger.save()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A run resumed after its last epoch trains nothing and logs nothing: give it the checkpoint's metrics."""
        for key, value in self.restored_metrics.items():
            if key not in trainer.callback_metrics:
                trainer.callback_metrics[key] = torch.tensor(value)
        if self.restored and not self.trained:
            pl_module.on_train_end()


class RunInterrupted(BaseException):
    """SIGTERM, Ctrl-C or the requeue signal outside the training loop (preparing data, testing, the bound,
    reports): nothing there is worth saving, so the run stops at once. A BaseException, so that no
    `except Exception` on the way swallows it (Lightning turns a KeyboardInterrupt in `test` into exit 1)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class GracefulStop(pl.Callback):
    """SIGTERM (Slurm preemption, scancel, kill), Ctrl-C, or the requeue signal: stop cleanly in every phase.

    In the training loop Lightning turns SIGTERM into `SIGTERMException` once the current batch is done, a
    point where the state is consistent; this callback saves `<dirpath>/last.ckpt` there (except for a model
    that `fits_in_one_pass`: what it has read so far is not in its weights, so its epoch starts again). Ctrl-C and the
    requeue signal (`SUBMITIT_PREEMPT_SIGNAL`, USR2 by default: what submitit asks Slurm to send before the
    time limit or on preemption) are routed the same way while `signals()` is active. Outside the training
    loop every one of them raises `RunInterrupted` at once: the last finished epoch is in `last.ckpt`
    already, and a resumed run goes on from there (straight to the test when training was complete).
    `exit()` ends the process with 128 + the signal's number, or hands over to the launcher's requeue
    handler. A second Ctrl-C in training stops at once without saving.
    """

    def __init__(self, dirpath: str | Path, requeue_signal: str | None = None):
        self.dirpath = Path(dirpath)
        name = requeue_signal or os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
        self.requeue_signal = getattr(signal, name if name.startswith("SIG") else f"SIG{name}", None)
        self.signum: int | None = None  # the signal that stopped the run
        self.checkpoint_path: Path | None = None
        self.where = ""
        self.phase = "starting"
        self._training = False
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict:  # ddp_spawn pickles callbacks; signal handlers stay with this process
        return {**self.__dict__, "_previous": {}}

    # -- signal handling around the whole run ------------------------------------------------------
    @contextlib.contextmanager
    def signals(self) -> Iterator[GracefulStop]:
        """Handle SIGTERM, Ctrl-C and the requeue signal while the block runs (Lightning's own SIGTERM
        handler, installed inside fit and test, calls this one too)."""
        import threading

        mine = [s for s in (signal.SIGINT, signal.SIGTERM, self.requeue_signal) if s is not None]
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        self._previous = {s: signal.getsignal(s) for s in mine}
        for s in mine:
            signal.signal(s, self._on_signal)
        try:
            yield self
        finally:
            for s, handler in self._previous.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)

    def _on_signal(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker: the main process handles it
            return
        if self._training:
            if signum == signal.SIGTERM:  # Lightning's handler, which called this one, stops after the batch
                self.signum = self.signum or signum
                return
            if self.signum is not None:  # asked twice: at once, without saving, as Ctrl-C always did
                previous = self._previous.get(signum)
                if callable(previous):
                    previous(signum, frame)  # Ctrl-C: KeyboardInterrupt; submitit's handler: requeue
                return
            self.signum = signum
            log.warning(
                "%s: saving a checkpoint at the end of this batch, then stopping%s",
                signal.Signals(signum).name,
                " (Ctrl-C again stops at once, without it)" if signum == signal.SIGINT else "",
            )
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler raises SIGTERMException after the batch
            return
        if self.signum is not None and signum == signal.SIGTERM:
            return  # the SIGTERM this handler sent itself, arriving after training ended
        self.signum = signum
        self.where = self.where or self.phase
        raise RunInterrupted(signum)

    # -- Lightning hooks -------------------------------------------------------------------------------
    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.phase = "the sanity check"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._training = True
        self.phase = "training"

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._training = False
        self.phase = "after training"
        if self.signum is not None:  # it came after the last batch (during the last validation): no batch is left to
            self.where = "the end of training"  # stop after, and last.ckpt holds the finished training
            raise RunInterrupted(self.signum)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.phase = "the test"

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._training = False
        if not isinstance(exception, SIGTERMException):
            return
        self.signum = self.signum or signal.SIGTERM
        self.where = f"epoch {trainer.current_epoch}, step {trainer.global_step}"
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        if getattr(pl_module, "fits_in_one_pass", False):  # its rows so far are in memory, not in a checkpoint:
            return  # resumed, it would be fitted on the later batches alone, so its one epoch starts again
        path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(path, weights_only=False)
        self.checkpoint_path = path

    # -- after SIGTERMException or RunInterrupted ------------------------------------------------------
    def exit(self, run_dir: str | Path) -> None:
        """Log what was saved and how to resume; exit 128 + signal, or let the launcher requeue the job."""
        signum = self.signum or signal.SIGTERM
        name = signal.Signals(signum).name
        last = self.dirpath / "last.ckpt"
        if self.checkpoint_path is not None:
            log.warning(
                "stopped by %s at %s; saved %s. Resume with: python train.py resume=%s",
                name, self.where, self.checkpoint_path, run_dir,
            )
        elif last.is_file():
            log.warning(
                "stopped by %s during %s; %s holds the last finished epoch. Resume with: python train.py resume=%s",
                name, self.where or self.phase, last, run_dir,
            )
        else:
            log.warning("stopped by %s during %s, before a first epoch ended: nothing to resume; start the run again",
                        name, self.where or self.phase)
        print(f"interrupted: stopped by {name}" + (f"; resume with: python train.py resume={run_dir}" if last.is_file() else ""),
              file=sys.stderr)
        previous = self._previous.get(signum)
        if signum == self.requeue_signal and callable(previous):
            log.info("handing over to the launcher's %s handler (requeue)", name)
            previous(signum, None)
        raise SystemExit(128 + int(signum))


# -- atomic checkpoints -------------------------------------------------------------------------------
class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file beside the target, fsynced, then renamed over it.

    Lightning's own save writes a temporary file in the system temp folder and `shutil.move`s it: when
    that folder is on another file system than the run (usual on clusters: local /tmp, shared outputs)
    the move is a copy into the final name, which a kill leaves half-written. A temporary left by a
    killed save (`.<name>.tmp-<host>-<pid>-<random>`) is never read, and removed by the next save here.
    Remote paths (s3://...) go through Lightning's save.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        write_bytes_atomic(Path(str(path).removeprefix("file://")), lambda fh: torch.save(checkpoint, fh))
