"""Train a model on stellar spectra: `stellarlab-train` and `python train.py`.

    stellarlab-train                                   # MLP on the built-in synthetic APOGEE survey
    stellarlab-train model=cnn trainer.accelerator=mps # any group option, any override
    stellarlab-train -m model=linear,mlp,cnn           # Hydra multirun: one folder per job
    stellarlab-train hparams_search=optuna             # Optuna study (TPE) over lr, widths, dropout, ...
    stellarlab-train resume=last                       # continue the newest unfinished run in its folder

Seeds, builds data, model and trainer from the config, fits, tests the best checkpoint, prints the
test metrics per label in physical units with their bootstrap intervals and writes them to
`<run folder>/metrics.json`. Returns the best validation value (`optimized_metric`) for sweepers.
In a multirun a failing job is recorded as failed and the sweep goes on (`stellarlab/run/sweep.py`).
A run folder that already holds `checkpoints/last.ckpt` is continued from it (`resume=`, a requeued
Slurm job); SIGTERM or Ctrl-C saves that checkpoint before the run exits (`stellarlab/run/resume.py`).
The allocator setting (`malloc_keep_block_mb`) is the command's (`main`), never `train(cfg)`'s: a
notebook calling `stellarlab.train` keeps its process's malloc as it was.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from stellarlab.checks import _plain, _show
from stellarlab.config import conf_dir, instantiate_group, register_resolvers
from stellarlab.errors import ConfigError, command_errors, weights_mismatch
from stellarlab.run import extras
from stellarlab.run.resume import (
    resume_argv,
    resume_point,
    run_lock,
    tensorboard_continuing,
    use_resume_folder,
)
from stellarlab.run.sweep import in_multirun, record_failure

log = logging.getLogger("stellarlab.train")
RESUME_HINT = "run the same command again (a run that saved checkpoints/last.ckpt continues with resume=last)"
register_resolvers()


def train(cfg: DictConfig) -> dict:
    """Run one training job described by `cfg`; returns the summary also written to metrics.json.

    SIGTERM, Ctrl-C and the requeue signal stop every phase cleanly (`GracefulStop`): in training after
    the batch with `last.ckpt` saved, elsewhere at once; the run is then continued with `resume=`.
    """
    from stellarlab.run.validation import validate_train_config

    validate_train_config(cfg)  # a value that cannot work: one line now, not a library traceback later
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from stellarlab.run.callbacks import GracefulStop, RunInterrupted
    from stellarlab.run.loggers import finish_open_runs

    use_resume_folder(cfg)  # train(cfg) with resume= set; on the command line resume_argv has done it
    output_dir = Path(cfg.paths.output_dir)
    stop = GracefulStop(output_dir / "checkpoints")
    try:
        with stop.signals():
            return _run(cfg, output_dir, stop)
    except (SIGTERMException, RunInterrupted):
        stop.exit(output_dir)  # exits 128 + signal, or hands over to the launcher's requeue handler
        raise  # pragma: no cover - exit() always raises
    finally:
        finish_open_runs()  # the next run of this process (a sweep's job, a notebook's call) starts its own


def _run(cfg: DictConfig, output_dir: Path, stop) -> dict:
    import pytorch_lightning as pl
    import torch

    from stellarlab.models.base import EPOCHS_METRIC
    from stellarlab.results.evaluation import test_model
    from stellarlab.results.hparams import log_final_metrics, log_hyperparameters, run_tags
    from stellarlab.results.summary import run_fields, train_summary, write_summary
    from stellarlab.run.callbacks import ExactResume
    from stellarlab.run.devices import check_trainer_config

    device = check_trainer_config(cfg.trainer.accelerator, cfg.trainer.get("precision", "32-true"))
    if device == "cuda":
        torch.set_float32_matmul_precision("high")
    if cfg.get("seed") is not None:  # seed=0 is a seed: test for None, not truthiness
        pl.seed_everything(int(cfg.seed), workers=True)

    log.info("run folder: %s", output_dir)
    stop.phase = "preparing the data"
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = hydra.utils.instantiate(
        cfg.model,
        **datamodule.model_spec(),
        optimizer=cfg.optimizer,
        scheduler=cfg.get("scheduler"),
        wavelength=torch.tensor(datamodule.wavelength, dtype=torch.float32),
    )
    resumed_from = resume_point(output_dir)  # an interrupted (or requeued) run continues from its last.ckpt
    if resumed_from is not None:  # damaged weights are refused here, not trained on
        from stellarlab.models import checksum

        checksum.verify_file(resumed_from["checkpoint"], "move it away to start this run over (or resume from a copy)")
    extras.check_loggers((name, node.get("_target_")) for name, node in (cfg.get("logger") or {}).items() if node)
    loggers = instantiate_group(tensorboard_continuing(cfg.get("logger"), resumed_from))
    # Always on, whatever the callbacks group says: a run must stay resumable.
    callbacks = [*instantiate_group(cfg.get("callbacks")), ExactResume(), stop]
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    log_hyperparameters(trainer.loggers, cfg, model.n_parameters, datamodule.label_names)

    start = time.perf_counter()
    stop.phase = "starting to train"
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=resumed_from and resumed_from["checkpoint"])
    except RuntimeError as err:
        mismatch = resumed_from and weights_mismatch(
            err, resumed_from["checkpoint"], f"the {type(model).__name__} this run's config builds now",
            "it was written by another version of stellarlab (or of its defaults): start a new run, or resume with "
            "the version that wrote it")
        if not mismatch:
            raise
        raise mismatch from err
    train_seconds = time.perf_counter() - start
    fit_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    epochs = int(fit_metrics.pop(EPOCHS_METRIC, trainer.current_epoch))
    if resumed_from is not None and trainer.global_step == resumed_from["global_step"]:
        log.info("training was already complete in %s: going on with the test", resumed_from["checkpoint"])
    if cfg.optimized_metric not in fit_metrics:
        raise ConfigError(
            f"optimized_metric={cfg.optimized_metric} was never logged; logged metrics: {sorted(fit_metrics)}"
        )

    checkpoint = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
    best_val_loss = model.best_val_loss  # before the test loads the best checkpoint into the model
    tested, test_skipped = None, None
    if not cfg.get("test"):
        test_skipped = "test=false"
    elif not len(datamodule.split_index["test"]):
        test_skipped = f"the test split is empty (data.split={_show(_plain(cfg.data.get('split')))}): no test metrics"
        log.warning("%s; give data.split a test part to test the model", test_skipped)
    else:
        tested = test_model(trainer, model, datamodule, cfg, ckpt_path=checkpoint)
    stop.phase = "writing the results"
    run = run_fields(output_dir, datamodule.label_names, {k: len(v) for k, v in datamodule.split_index.items()},
                     model.n_parameters, run_tags(cfg))
    summary = train_summary(
        run,
        optimized_metric=cfg.optimized_metric,
        best_value=fit_metrics[cfg.optimized_metric],
        best_val_loss=best_val_loss,
        epochs=epochs,
        train_seconds=train_seconds,
        best_checkpoint=checkpoint,
        resumed_from=resumed_from,
        tested=tested,
        test_skipped=test_skipped,
    )

    log_final_metrics(trainer.loggers, summary, trainer.global_step)
    if trainer.is_global_zero:
        path = write_summary(output_dir, summary)
        log.info("wrote %s; compare runs with: tensorboard --logdir %s", path, cfg.paths.log_dir)
    return summary


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="train")
def main(cfg: DictConfig) -> float:
    """One run: a stellarlab error is one line on stderr and exit 2. In a multirun a failing job is
    recorded (metrics.json `status: failed`) and returns a value instead, so the other jobs go on."""
    from stellarlab.run.allocator import apply_command_setting

    with command_errors(log, interrupted=RESUME_HINT, signals=False):  # GracefulStop owns the signals
        try:
            with run_lock(cfg.paths.output_dir):  # `resume=` refuses a folder a live process is training
                apply_command_setting(cfg.get("malloc_keep_block_mb"))  # the command's setting, before any data
                summary = train(cfg)
        except Exception as err:
            if in_multirun():
                return record_failure(cfg, err)
            raise
    return float(summary["best_value"])


def cli() -> None:
    """`stellarlab-train` and `python train.py`: the command line checked and rewritten, then Hydra."""
    with command_errors(log):
        extras.check_command_line(sys.argv[1:])  # a missing sweeper/launcher plugin: one line, before Hydra
        # resume=last|<folder>: the old run's overrides and folder, before Hydra picks one
        sys.argv[1:] = resume_argv(sys.argv[1:], conf_dir())
    main()


if __name__ == "__main__":
    cli()
