"""Check a composed run config before anything heavy runs: one ConfigError naming the key, the value and the fix.

Hydra already refuses an unknown group option (`model=transformer`, listing the valid ones) and an
unknown key of the config (`optimizer.lrr=1`). It does not know that a learning rate must be positive,
that split fractions sum to 1, or that `+optimizer.lrr=1` (the spelling Hydra suggests for adding a
key) is no argument of the optimizer. Without these checks such values reach torch or Lightning deep
inside a run, often after the data were prepared, and end in a library traceback.

`validate_train_config(cfg)` runs at the top of `train.py`'s `train()`. Checks that need no import of
torch come first, so `python train.py optimizer.lr=-1` answers in well under a second. The arguments of
a model or DataModule are checked by the rules that class declares (`stellarlab.checks`), the same ones
its constructor applies; this module keeps the groups stellarlab does not own (seed, optimizer,
scheduler, trainer, bootstrap, paths) and the checks that span groups (split and batch against the
survey's size, devices and precision). `OutputFolderCheck` is a Hydra callback: Hydra creates the run
folder before any task code runs, so an unwritable `paths.log_dir` can only be caught there.
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stellarlab.checks import (
    HYDRA_KEYS,
    Flag,
    _is_int,
    _is_number,
    _plain,
    _show,
    check_arguments,
    check_number,
    locate_target,
    with_defaults,
)
from stellarlab.errors import ConfigError

log = logging.getLogger(__name__)

#: Constructor arguments train.py fills in from the data (never typed in a config).
MODEL_KEYS_FROM_DATA = {"n_pixels", "label_names", "label_mean", "label_std", "label_min", "label_max", "nuisance_labels",
                        "optimizer", "scheduler", "wavelength"}
#: The first argument of a `_partial_` optimizer / scheduler, supplied by `configure_optimizers`.
SUPPLIED_LATER = {"optimizer": {"params"}, "scheduler": {"optimizer"}}


# -- folders ----------------------------------------------------------------------------------------
def writable_folder_problem(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be (created and) written as a folder, or None if it can. Creates nothing.

    Walks up to the first part of the path that exists: it must be a folder this process may write into.
    """
    p = Path(os.path.abspath(os.fspath(path)))
    for parent in (p, *p.parents):
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is a file, not a folder"
            if not os.access(parent, os.W_OK | os.X_OK):
                return f"{parent} is not writable by this user"
            return None
        if parent.is_symlink():  # a dangling link: mkdir would fail
            return f"{parent} is a broken symbolic link"
    return f"no part of {p} exists"  # pragma: no cover - the root always exists


def check_writable_folder(key: str, path: Any, fix: str) -> None:
    problem = writable_folder_problem(str(path))
    if problem is not None:
        raise ConfigError(f"{key}={path} cannot be written: {problem}; {fix}")


# -- the groups no stellarlab class owns ------------------------------------------------------------
def _check_optimizer(opt: Mapping) -> None:
    if opt is None:
        return
    if "lr" in opt:
        check_number("optimizer.lr", opt["lr"], "optimizer.lr=1e-3", above=0)
    if "weight_decay" in opt:
        check_number("optimizer.weight_decay", opt["weight_decay"], "optimizer.weight_decay=0", minimum=0)
    if "momentum" in opt:
        check_number("optimizer.momentum", opt["momentum"], "optimizer.momentum=0.9", minimum=0, below=1)
    if "fused" in opt and opt["fused"] is not None:  # torch takes any truthy value, `maybe` included
        Flag().check("optimizer.fused", opt["fused"])
    if "eps" in opt:
        check_number("optimizer.eps", opt["eps"], "optimizer.eps=1e-8", above=0)
    if "betas" in opt:
        betas = _plain(opt["betas"])
        if not (isinstance(betas, (list, tuple)) and len(betas) == 2
                and all(_is_number(b) and 0 <= b < 1 for b in betas)):
            raise ConfigError(f"optimizer.betas={_show(betas)} is not valid: it must be two numbers in [0, 1); e.g. optimizer.betas=[0.9,0.999]")


def _check_scheduler(sch: Mapping | None) -> None:
    if not sch:
        return
    if "T_max" in sch:
        check_number("scheduler.T_max", sch["T_max"], "trainer.max_epochs=30 (scheduler.T_max follows it)", minimum=1, integer=True)
    if "step_size" in sch:
        check_number("scheduler.step_size", sch["step_size"], "scheduler.step_size=10", minimum=1, integer=True)
    if "gamma" in sch:
        check_number("scheduler.gamma", sch["gamma"], "scheduler.gamma=0.5", above=0)
    if "factor" in sch:
        check_number("scheduler.factor", sch["factor"], "scheduler.factor=0.5", above=0, below=1)
    if "patience" in sch:
        check_number("scheduler.patience", sch["patience"], "scheduler.patience=3", minimum=0, integer=True)


def _check_trainer(trainer: Mapping) -> None:
    if "max_epochs" in trainer:
        check_number("trainer.max_epochs", trainer["max_epochs"], "trainer.max_epochs=30", minimum=1, integer=True,
                     allow_null=True, also=(-1,), also_note=": no limit")
    if "min_epochs" in trainer:
        check_number("trainer.min_epochs", trainer["min_epochs"], "trainer.min_epochs=1", minimum=0, integer=True, allow_null=True)
        max_epochs, min_epochs = trainer.get("max_epochs"), trainer["min_epochs"]
        if max_epochs is not None and max_epochs != -1 and min_epochs is not None and min_epochs > max_epochs:
            raise ConfigError(
                f"trainer.min_epochs={min_epochs} is above trainer.max_epochs={max_epochs}; lower trainer.min_epochs"
            )
    for key, example in (("log_every_n_steps", "10"), ("check_val_every_n_epoch", "1")):
        if key in trainer:
            check_number(f"trainer.{key}", trainer[key], f"trainer.{key}={example}", minimum=1, integer=True, allow_null=True)
    if "accumulate_grad_batches" in trainer:
        check_number("trainer.accumulate_grad_batches", trainer["accumulate_grad_batches"],
                     "trainer.accumulate_grad_batches=1 (1: a step per batch)", minimum=1, integer=True)
    devices = _plain(trainer.get("devices", 1))
    if not (devices == "auto" or (_is_int(devices) and (devices >= 1 or devices == -1))
            or (isinstance(devices, list) and devices and all(_is_int(d) and d >= 0 for d in devices))):
        raise ConfigError(
            f"trainer.devices={_show(devices)} is not valid: give a number of devices >= 1, -1 (all), auto, "
            "or a list of device indices; e.g. trainer.devices=1"
        )


def _check_devices(device: str, devices: Any) -> None:
    """What Lightning accepts for `devices` on the device type `trainer.accelerator` resolved to."""
    if devices == "auto":
        return
    if device == "cpu":
        if not (_is_int(devices) and devices >= 1):
            raise ConfigError(
                f"trainer.devices={_show(devices)} is not valid on CPU: give a number of processes >= 1 or auto; "
                "e.g. trainer.devices=1"
            )
        return
    if device == "cuda":
        import torch

        count = torch.cuda.device_count()
        ok = (_is_int(devices) and (1 <= devices <= count or devices == -1)) or (
            isinstance(devices, list) and all(_is_int(d) and 0 <= d < count for d in devices))
        if not ok:
            raise ConfigError(
                f"trainer.devices={_show(devices)}: this machine has {count} CUDA device(s); give a number 1-{count}, "
                f"-1 (all), auto, or indices 0-{count - 1}; e.g. trainer.devices=1"
            )
        return
    if device == "mps" and devices not in (1, -1, [0]):
        raise ConfigError(f"trainer.devices={_show(devices)}: MPS is one device; use trainer.devices=1")


def _check_bootstrap(boot: Mapping | None) -> None:
    if not boot:
        return
    check_number("bootstrap.n_resamples", boot.get("n_resamples"), "bootstrap.n_resamples=1000 (0: no intervals)",
                 minimum=0, integer=True, allow_null=True)
    if boot.get("n_resamples"):
        check_number("bootstrap.level", boot.get("level"), "bootstrap.level=0.95", above=0, below=1)
        check_number("bootstrap.seed", boot.get("seed"), "bootstrap.seed=0", minimum=0, integer=True)


def _check_survey_size(data_class: type, data: Mapping) -> None:
    """data.split and data.batch_size against the number of stars, when the DataModule knows it before loading."""
    values = {str(k): _plain(v) for k, v in data.items()}
    planned_size = getattr(data_class, "planned_size", None)  # SpectraDataModule's; None for a foreign class
    planned = planned_size(values) if planned_size is not None else None
    if planned is None:
        return
    from stellarlab.data.split import resolve_split_sizes  # numpy only

    given = with_defaults(data_class, values)
    split, batch_size = _plain(given["split"]), given["batch_size"]
    n_train, _, _ = resolve_split_sizes(split, planned.stars)
    n_spectra = n_train * planned.spectra_per_star
    if batch_size > n_spectra:
        raise ConfigError(
            f"data.batch_size={batch_size} is larger than the training set ({n_spectra} spectra from "
            f"{planned.key}={planned.stars} and data.split={_show(split)}); lower data.batch_size or raise {planned.key}"
        )


def _node_values(node: Mapping | None) -> dict[str, Any]:
    return {str(k): _plain(v) for k, v in (node or {}).items() if str(k) not in HYDRA_KEYS}


def _check_validation_runs(trainer: Mapping, model_class: type | None, model: Mapping | None) -> None:
    """Validation must run at least once: without it nothing is monitored, no best checkpoint is kept, and the
    run trains to the end before failing on a metric that was never logged."""
    every, max_epochs = _plain(trainer.get("check_val_every_n_epoch", 1)), _plain(trainer.get("max_epochs"))
    if not _is_int(every) or every <= 1:
        return
    fit_epochs = getattr(model_class, "max_fit_epochs", None)
    if fit_epochs is not None and every > fit_epochs:
        raise ConfigError(
            f"trainer.check_val_every_n_epoch={every}: {model['_target_']} is fitted in {fit_epochs} epoch(s), so "
            f"validation would never run; set trainer.check_val_every_n_epoch=1"
        )
    if _is_int(max_epochs) and max_epochs >= 1 and every > max_epochs:
        raise ConfigError(
            f"trainer.check_val_every_n_epoch={every} is larger than trainer.max_epochs={max_epochs}: validation would "
            f"never run (no val/loss, no best checkpoint); lower trainer.check_val_every_n_epoch or raise trainer.max_epochs"
        )


def _check_optimized_metric(cfg, model_class: type | None, data_class: type | None) -> None:
    """`optimized_metric` against what the model logs for these labels (`logged_metrics`), before training."""
    metric = cfg.get("optimized_metric")
    logged_metrics = getattr(model_class, "logged_metrics", None)
    planned_label_names = getattr(data_class, "planned_label_names", None)
    if metric is None or logged_metrics is None or planned_label_names is None:
        return  # a model or DataModule from outside stellarlab: train.py checks the metric after the fit
    labels = planned_label_names(with_defaults(data_class, _node_values(cfg.get("data"))))
    names = logged_metrics(labels, with_defaults(model_class, _node_values(cfg.get("model"))))
    if str(metric) not in names:
        close = difflib.get_close_matches(str(metric), names, n=1)
        hint = f"did you mean optimized_metric={close[0]}? " if close else ""
        raise ConfigError(
            f"optimized_metric={metric} is not a metric {cfg.model._target_} logs for data.labels={_show(labels)}; "
            f"{hint}it logs: {', '.join(names)}"
        )


def predict_settings(cfg) -> tuple[str, int, float]:
    """(device, batch size, outside_tolerance) of a predict.py config, checked by train's rules; the old
    top-level keys still count.

    `accelerator=` and `batch_size=` are the old spellings of `trainer.accelerator=` and `data.eval_batch_size=`:
    a message names the key the user typed.
    """
    from stellarlab.data.base import EVAL_BATCH_SIZE
    from stellarlab.run.devices import check_trainer_config

    chosen, notes = {}, []
    for old, group, key in (("accelerator", "trainer", "accelerator"), ("batch_size", "data", "eval_batch_size")):
        if cfg.get(old) is not None:
            notes.append(f"{old}= is deprecated: use {group}.{key}={_show(_plain(cfg[old]))}")
            chosen[key] = (old, _plain(cfg[old]))
        else:
            chosen[key] = (f"{group}.{key}", _plain((cfg.get(group) or {}).get(key)))
    key, batch_size = chosen["eval_batch_size"]
    EVAL_BATCH_SIZE.check(key, batch_size)
    tolerance = _plain(cfg.get("outside_tolerance", 0.2))
    check_number("outside_tolerance", tolerance, "outside_tolerance=0.2 (of the training range, each side)", minimum=0)
    key, accelerator = chosen["accelerator"]
    try:
        device = check_trainer_config(accelerator, "32-true")
    except ConfigError as err:
        if key == "trainer.accelerator":
            raise
        raise ConfigError(str(err).replace("trainer.accelerator=", f"{key}=", 1)) from None
    for note in notes:  # after the checks: a refused value gets its error line only
        log.warning("%s", note)
    return device, int(batch_size or 1024), float(tolerance)


def validate_train_config(cfg) -> None:
    """Raise ConfigError for the first value of a train/eval config that cannot work; return None otherwise."""
    seed = cfg.get("seed")
    if seed is not None and not (_is_int(seed) and 0 <= seed < 2**32):
        raise ConfigError(f"seed={_show(seed)} is not valid: it must be an integer in [0, 2^32) or null (unseeded); e.g. seed=0")
    _check_optimizer(cfg.get("optimizer"))
    _check_scheduler(cfg.get("scheduler"))
    if cfg.get("trainer") is not None:
        _check_trainer(cfg.trainer)
    _check_bootstrap(cfg.get("bootstrap"))
    check_number("malloc_keep_block_mb", cfg.get("malloc_keep_block_mb"), "malloc_keep_block_mb=1024 (null: malloc's defaults)",
                 minimum=0, allow_null=True)
    paths = cfg.get("paths")
    if paths is not None and paths.get("output_dir") is not None:
        check_writable_folder("paths.output_dir", paths.output_dir, "set paths.log_dir to a folder you can write, e.g. paths.log_dir=./outputs")
    data = cfg.get("data")
    if data is not None and data.get("cache_dir") is not None and not Path(str(data.cache_dir)).is_dir():
        # an existing folder may be read-only and still hold a complete cache: writing it is checked when it happens
        check_writable_folder("data.cache_dir", data.cache_dir, "set paths.cache_dir to a folder you can write, e.g. paths.cache_dir=./data/cache")

    # Checks below import the targets (torch, Lightning): after the cheap ones. Each class checks its own arguments.
    supplied = {"optimizer": SUPPLIED_LATER["optimizer"], "scheduler": SUPPLIED_LATER["scheduler"],
                "model": MODEL_KEYS_FROM_DATA, "data": set()}
    targets = {}
    for group, keys in supplied.items():
        target = targets[group] = locate_target(group, cfg.get(group))
        if target is not None:
            check_arguments(target, cfg[group], group, keys)
            if group == "data":
                _check_survey_size(target, cfg.data)
    if cfg.get("trainer") is not None:
        _check_validation_runs(cfg.trainer, targets["model"], cfg.get("model"))
    _check_optimized_metric(cfg, targets["model"], targets["data"])
    trainer = cfg.get("trainer")
    if trainer is not None and "accelerator" in trainer:
        from stellarlab.run.devices import check_trainer_config

        device = check_trainer_config(trainer.accelerator, trainer.get("precision", "32-true"))
        _check_devices(device, _plain(trainer.get("devices", 1)))


# -- the run folder: a Hydra callback ---------------------------------------------------------------
try:  # hydra is a dependency; the guard keeps this module importable in bare numpy workers
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover
    Callback = object


class OutputFolderCheck(Callback):
    """Refuse an unwritable run/sweep folder with one line and exit code 2, before Hydra tries to create it.

    Hydra makes the run folder before any task code runs; without this an unwritable `paths.log_dir` ends in
    a NotADirectoryError/PermissionError traceback from pathlib.
    """

    def _check(self, folder: Any, what: str) -> None:
        problem = writable_folder_problem(str(folder))
        if problem is not None:
            message = (
                f"cannot create the {what} folder {folder}: {problem}; set paths.log_dir to a folder you can write, "
                "e.g. paths.log_dir=./outputs"
            )
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)

    def on_run_start(self, config, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir, "run")

    def on_multirun_start(self, config, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir, "sweep")


__all__ = ["OutputFolderCheck", "check_writable_folder", "predict_settings", "validate_train_config", "writable_folder_problem"]
