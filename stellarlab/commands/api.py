"""The notebook API: `stellarlab.train`, `stellarlab.load`, `stellarlab.load_runs`.

    summary = stellarlab.train(["model=cnn", "trainer.max_epochs=5"])
    model = stellarlab.load(summary["best_checkpoint"])
    model.predict(flux)                                  # {label: values} in physical units
    stellarlab.load_runs("outputs/train/multiruns/<sweep>").to_pandas()

`train` runs what `stellarlab-train <overrides>` runs, in this process: the packaged config composed with
Hydra's compose API, the run folder (`.hydra/` with the config and overrides, the log file) and Hydra's
runtime config set up by Hydra's own `run_job`, the same callbacks. It raises instead of exiting: a
stellarlab error as itself (`ConfigError`, ...), with its one-line message. Unlike the command it leaves
the process's malloc settings alone (`malloc_keep_block_mb` is the command's).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

from stellarlab.errors import ConfigError, StellarlabError, root_cause


class _Callbacks:
    """The config's `hydra.callbacks`, called as Hydra calls them around a run."""

    def __init__(self, cfg) -> None:
        import hydra

        self.items = [hydra.utils.instantiate(node) for node in (cfg.hydra.get("callbacks") or {}).values()]

    def __getattr__(self, event: str):
        def call(**kwargs: Any) -> None:
            for callback in self.items:
                getattr(callback, event)(**kwargs)

        return call


@contextlib.contextmanager
def _logging_restored() -> Iterator[None]:
    """Hydra points the root logger at the run's log file for the run; afterwards the caller's logging is back
    (a notebook's next cell does not write into a finished run's train.log)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)


def _one_run(cfg) -> dict:
    from stellarlab.commands.train import train as train_run
    from stellarlab.run.resume import run_lock

    with run_lock(cfg.paths.output_dir):
        return train_run(cfg)


def train(overrides: Sequence[str] = ()) -> dict:
    """One training run with these overrides (as on the command line); returns its metrics.json summary.

    `resume=last` / `resume=<run folder>` continue a run as the command does. Sweeps (`-m`, comma lists,
    `hparams_search=`) are the command's: run them with `stellarlab-train -m ...`.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.utils import JobStatus, run_job
    from hydra.types import HydraContext, RunMode

    from stellarlab.config import conf_dir, register_resolvers
    from stellarlab.run import extras
    from stellarlab.run.resume import resume_argv

    if isinstance(overrides, str):
        raise ConfigError(f"stellarlab.train takes a list of overrides, e.g. [{overrides!r}], not a string")
    overrides = [str(o) for o in overrides]
    if any(o in ("-m", "--multirun") or o.startswith("-") for o in overrides):
        raise ConfigError(f"stellarlab.train takes overrides only, not {[o for o in overrides if o.startswith('-')]}; "
                          "run sweeps with the command: stellarlab-train -m ...")
    extras.check_command_line(overrides)
    overrides = resume_argv(overrides, conf_dir())
    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with _logging_restored(), initialize_config_dir(config_dir=str(conf_dir()), job_name="train", version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
            if cfg.hydra.mode == RunMode.MULTIRUN:
                raise ConfigError("these overrides make a sweep (hparams_search= or hydra.mode=MULTIRUN); stellarlab.train "
                                  "runs one job: run sweeps with the command, stellarlab-train -m ...")
            callbacks = _Callbacks(cfg)
            callbacks.on_run_start(config=cfg, config_name="train")
            context = HydraContext(config_loader=GlobalHydra.instance().config_loader(), callbacks=callbacks)
            job = run_job(task_function=_one_run, config=cfg, job_dir_key="hydra.run.dir", job_subdir_key=None,
                          hydra_context=context)
            callbacks.on_run_end(config=cfg, config_name="train", job_return=job)
    except Exception as err:
        cause = root_cause(err)  # Hydra wraps errors of the classes it instantiates
        if isinstance(cause, StellarlabError) and cause is not err:
            raise cause from err
        raise
    finally:
        GlobalHydra.instance().clear()
    if job.status == JobStatus.FAILED:
        cause = root_cause(job._return_value)
        raise cause from (job._return_value if cause is not job._return_value else None)
    return job.return_value


def load(ckpt_path: str | os.PathLike, map_location: str = "cpu"):
    """The model a checkpoint holds, in eval mode on `map_location`: `model.predict(flux, weight=None)` gives its
    labels (and sigmas, for `model.loss=gaussian_nll`) in physical units for spectra on `model.wavelength`."""
    from stellarlab.results.prediction import load_model

    model, preprocessing = load_model(ckpt_path, map_location=map_location)
    model.preprocessing = preprocessing
    return model


def load_runs(folder: str | os.PathLike):
    """An astropy Table with one row per run below `folder` (a sweep, an Optuna study, a runs folder): the columns
    of `stellarlab-compare`'s comparison.csv (overrides, status, test metrics with their intervals, error).
    `.to_pandas()` gives a DataFrame when pandas is installed."""
    from pathlib import Path

    from astropy.table import Table

    from stellarlab.results.compare import TEXT_COLUMNS, collect_runs, comparison_rows, find_run_dirs

    path = Path(folder)
    if not path.is_dir():
        raise ConfigError(f"{folder} is not a folder; give a sweep, Optuna study or runs folder, e.g. outputs/train/runs")
    if not find_run_dirs(path):
        raise ConfigError(f"no runs under {folder}: searched it and every folder below for metrics.json")
    columns, rows = comparison_rows(collect_runs(path))
    nan = float("nan")
    data = [[("" if row[c] is None else str(row[c])) if c in TEXT_COLUMNS else (nan if row[c] is None else float(row[c]))
             for row in rows] for c in columns]
    return Table(data, names=columns)
