"""Check a composed run config before anything heavy runs: one ConfigError naming the key, the value and the fix.

Hydra already refuses an unknown group option (`model=transformer`, listing the valid ones) and an
unknown key of the config (`optimizer.lrr=1`). It does not know that a learning rate must be positive,
that split fractions sum to 1, or that `+optimizer.lrr=1` (the spelling Hydra suggests for adding a
key) is no argument of the optimizer. Without these checks such values reach torch or Lightning deep
inside a run, often after the data were prepared, and end in a library traceback.

`validate_train_config(cfg)` runs at the top of `train.py`'s `train()`. Checks that need no import of
torch come first, so `python train.py optimizer.lr=-1` answers in well under a second. `OutputFolderCheck`
is a Hydra callback: Hydra creates the run folder before any task code runs, so an unwritable
`paths.log_dir` can only be caught there.
"""

from __future__ import annotations

import difflib
import inspect
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stellarlab.errors import ConfigError

#: Keys Hydra's `instantiate` reads itself.
HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
#: Constructor arguments train.py fills in from the data (never typed in a config).
MODEL_KEYS_FROM_DATA = {"n_pixels", "label_names", "label_mean", "label_std", "optimizer", "scheduler", "wavelength"}
#: The first argument of a `_partial_` optimizer / scheduler, supplied by `configure_optimizers`.
SUPPLIED_LATER = {"optimizer": {"params"}, "scheduler": {"optimizer"}}
SYNTHETIC_LABELS = ("teff", "logg", "fe_h", "alpha_fe")  # stellarlab.synthetic.LABEL_NAMES, without importing torch


# -- value helpers ----------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """OmegaConf containers to plain lists/dicts (values are compared and printed as the user typed them)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _show(value: Any) -> str:
    """A value the way it is written on the command line: 1e-3, fast, [0.8,0.1,0.1], null."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    """A real int: Lightning asserts isinstance(max_epochs, int), so 30.0 is refused here, not after data preparation."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_number(
    key: str,
    value: Any,
    example: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    below: float | None = None,
    integer: bool = False,
    allow_null: bool = False,
    also: Sequence[Any] = (),
    also_note: str = "",
) -> None:
    """ConfigError unless `value` is a finite number (an integer if asked) in the given bounds.

    `minimum`/`maximum` are inclusive, `above`/`below` exclusive; `also` lists extra accepted values (e.g. -1).
    """
    if value is None and allow_null:
        return
    if value in also and _is_number(value):
        return
    kind = "an integer" if integer else "a number"
    bounds = []
    if minimum is not None:
        bounds.append(f">= {minimum:g}")
    if above is not None:
        bounds.append(f"> {above:g}")
    if maximum is not None:
        bounds.append(f"<= {maximum:g}")
    if below is not None:
        bounds.append(f"< {below:g}")
    want = kind + (" " + " and ".join(bounds) if bounds else "")
    if also:
        want += f" (or {', '.join(_show(a) for a in also)}{also_note})"
    if allow_null:
        want += " or null"
    ok = _is_int(value) if integer else (_is_number(value) and math.isfinite(value))
    if ok:
        v = float(value)
        ok = not (
            (minimum is not None and v < minimum)
            or (maximum is not None and v > maximum)
            or (above is not None and v <= above)
            or (below is not None and v >= below)
        )
    if not ok:
        raise ConfigError(f"{key}={_show(value)} is not valid: it must be {want}; e.g. {example}")


def check_int_list(key: str, value: Any, example: str, *, allow_empty: bool = True, minimum: int = 1,
                   scalar_ok: bool = False) -> list[int]:
    """A list of integers >= minimum (with `scalar_ok`, a single integer counts as a list of one)."""
    items = value if isinstance(value, (list, tuple)) else [value]
    if not isinstance(value, (list, tuple)) and not scalar_ok:
        raise ConfigError(f"{key}={_show(value)} is not valid: it must be a list of integers >= {minimum}; e.g. {example}")
    if not items and not allow_empty:
        raise ConfigError(f"{key}={_show(value)} is empty; give at least one value, e.g. {example}")
    if not all(_is_int(v) and int(v) >= minimum for v in items):
        raise ConfigError(f"{key}={_show(value)} is not valid: it must be integers >= {minimum}; e.g. {example}")
    return [int(v) for v in items]


def check_choice(key: str, value: Any, choices: Sequence[str]) -> None:
    if str(value) not in choices:
        close = difflib.get_close_matches(str(value), list(choices), n=1)
        hint = f"did you mean {key}={close[0]}? " if close else ""
        raise ConfigError(f"{key}={_show(value)} is not valid; {hint}valid values: {', '.join(choices)}")


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


# -- instantiable nodes -----------------------------------------------------------------------------
def accepted_keys(target: Any) -> set[str] | None:
    """Keyword arguments a class (or function) accepts, following **kwargs up the base classes; None: any."""
    if inspect.isclass(target):
        names: set[str] = set()
        for cls in target.__mro__:
            if cls is object or "__init__" not in vars(cls):
                continue
            try:
                params = inspect.signature(cls.__init__).parameters.values()
            except (TypeError, ValueError):
                return None
            names |= {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)} - {"self"}
            if not any(p.kind == p.VAR_KEYWORD for p in params):
                return names
        return None
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind != p.VAR_POSITIONAL}


def check_node_keys(group: str, node: Any, supplied: set[str] = frozenset()) -> None:
    """Every key of an instantiable config node must be an argument of its `_target_`."""
    if node is None or "_target_" not in node:
        return
    from hydra._internal.utils import (
        _locate,  # what hydra.utils.instantiate uses, without its error log
    )

    target_name = str(node["_target_"])
    try:
        target = _locate(target_name)
    except Exception as err:  # ImportError with Hydra's explanation
        lines = [line for line in str(err).splitlines() if line.strip()]
        raise ConfigError(
            f"{group}._target_={target_name} cannot be imported ({lines[-1] if lines else type(err).__name__}); "
            f"check the spelling or choose an option of the {group} group (python train.py --help lists them)"
        ) from None
    valid = accepted_keys(target)
    if valid is None:
        return
    for key in node:
        key = str(key)
        if key in HYDRA_KEYS:
            continue
        if key in supplied:
            raise ConfigError(f"{group}.{key} is set by stellarlab itself (from the data or the run); remove {group}.{key}")
        if key not in valid:
            options = sorted(valid - supplied - {"self"})
            close = difflib.get_close_matches(key, options, n=1)
            hint = f"did you mean {group}.{close[0]}? " if close else ""
            raise ConfigError(
                f"{group}.{key} is not an option of {target_name}; {hint}valid options: {', '.join(options)} "
                f"(remove it with ~{group}.{key})"
            )


# -- the groups -------------------------------------------------------------------------------------
def _check_optimizer(opt: Mapping) -> None:
    if opt is None:
        return
    if "lr" in opt:
        check_number("optimizer.lr", opt["lr"], "optimizer.lr=1e-3", above=0)
    if "weight_decay" in opt:
        check_number("optimizer.weight_decay", opt["weight_decay"], "optimizer.weight_decay=0", minimum=0)
    if "momentum" in opt:
        check_number("optimizer.momentum", opt["momentum"], "optimizer.momentum=0.9", minimum=0, below=1)
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


def _check_model(model: Mapping) -> None:
    if "hidden_sizes" in model:
        check_int_list("model.hidden_sizes", _plain(model["hidden_sizes"]), "model.hidden_sizes=[256,128]")
    if "dropout" in model:
        check_number("model.dropout", model["dropout"], "model.dropout=0.1", minimum=0, below=1)
    conv = [k for k in ("channels", "kernel_sizes", "pool_sizes") if k in model]
    lengths = {}
    for key in conv:
        example = {"channels": "model.channels=[8,16,32]", "kernel_sizes": "model.kernel_sizes=[7,7,7]",
                   "pool_sizes": "model.pool_sizes=[4,4,4]"}[key]
        lengths[key] = len(check_int_list(f"model.{key}", _plain(model[key]), example, allow_empty=False))
    if len(set(lengths.values())) > 1:
        raise ConfigError(
            "model.channels, model.kernel_sizes and model.pool_sizes need one entry per conv block; got "
            + ", ".join(f"{n} for model.{k}" for k, n in lengths.items())
            + "; e.g. model.channels=[8,16,32] model.kernel_sizes=[7,7,7] model.pool_sizes=[4,4,4]"
        )
    if "k" in model:
        check_int_list("model.k", _plain(model["k"]), "model.k=[5,10,20]", allow_empty=False, scalar_ok=True)
    if "alpha" in model:
        alphas = _plain(model["alpha"])
        items = alphas if isinstance(alphas, (list, tuple)) else [alphas]
        if not items or not all(_is_number(a) and math.isfinite(a) and a > 0 for a in items):
            raise ConfigError(f"model.alpha={_show(alphas)} is not valid: it must be numbers > 0; e.g. model.alpha=[0.01,0.1,1,10]")
    if "nll_beta" in model:
        check_number("model.nll_beta", model["nll_beta"], "model.nll_beta=0.5", minimum=0, maximum=1)


def _split_problem(split: Any) -> str | None:
    """Why data.split is not three fractions summing to 1 or three star counts (train and val non-empty)."""
    if not isinstance(split, (list, tuple)) or len(split) != 3:
        return "it must have 3 entries (train, val, test)"
    if not all(_is_number(s) and math.isfinite(s) and s >= 0 for s in split):
        return "its entries must be numbers >= 0"
    if any(s > 1 for s in split):
        if not all(float(s).is_integer() for s in split):
            return "give three star counts (integers) or three fractions summing to 1"
        if split[0] < 1 or split[1] < 1:
            return "the training and validation sets need at least one star each"
        return None
    total = sum(split)
    if abs(total - 1.0) > 1e-6:
        return f"the fractions sum to {total:.6g}, not 1"
    if split[0] <= 0 or split[1] <= 0:
        return "the training and validation fractions must both be > 0"
    return None


def _check_data(data: Mapping) -> None:
    if "batch_size" in data:
        check_number("data.batch_size", data["batch_size"], "data.batch_size=128", minimum=1, integer=True)
    if "eval_batch_size" in data:
        check_number("data.eval_batch_size", data["eval_batch_size"], "data.eval_batch_size=512", minimum=1,
                     integer=True, allow_null=True)
    if "num_workers" in data:
        check_number("data.num_workers", data["num_workers"], "data.num_workers=0", minimum=0, integer=True)
    labels = _plain(data.get("labels"))
    if "labels" in data:
        if not isinstance(labels, (list, tuple)) or not labels or not all(isinstance(n, str) and n for n in labels):
            raise ConfigError(f"data.labels={_show(labels)} is not valid: name one or more labels, e.g. data.labels=[teff,logg,fe_h]")
        twice = sorted({n for n in labels if [m.lower() for m in labels].count(n.lower()) > 1})
        if twice:
            raise ConfigError(f"data.labels={_show(labels)} names {', '.join(twice)} more than once; list each label once")
    split = _plain(data.get("split"))
    if "split" in data:
        problem = _split_problem(split)
        if problem:
            raise ConfigError(
                f"data.split={_show(split)} is not valid: {problem}; e.g. data.split=[0.8,0.1,0.1] "
                "or star counts such as data.split=[1024,256,512]"
            )
    if str(data.get("_target_", "")).endswith("SyntheticDataModule"):
        _check_synthetic(data, labels, split)


def _check_synthetic(data: Mapping, labels, split) -> None:
    """The built-in survey: everything is known before it is generated, including the split sizes."""
    check_number("data.n_stars", data.get("n_stars"), "data.n_stars=8000", minimum=1, integer=True)
    check_number("data.spectra_per_star", data.get("spectra_per_star", 1), "data.spectra_per_star=1", minimum=1, integer=True)
    snr = _plain(data.get("snr"))
    if isinstance(snr, (list, tuple)):
        if not (len(snr) == 2 and all(_is_number(s) and math.isfinite(s) and s > 0 for s in snr) and snr[0] <= snr[1]):
            raise ConfigError(f"data.snr={_show(snr)} is not valid: a range must be [low, high] with 0 < low <= high; e.g. data.snr=[30,200]")
    else:
        check_number("data.snr", snr, "data.snr=100 or a range data.snr=[30,200]", above=0)
    if labels:
        unknown = [n for n in labels if n not in SYNTHETIC_LABELS]
        if unknown:
            raise ConfigError(
                f"data.labels={_show(labels)}: the synthetic survey has no label {', '.join(unknown)}; "
                f"its labels are {', '.join(SYNTHETIC_LABELS)}"
            )
    if split is not None:
        from stellarlab.data.split import resolve_split_sizes

        n_train, _, _ = resolve_split_sizes(split, int(data["n_stars"]))  # the survey has exactly n_stars stars
        n_spectra = n_train * int(data.get("spectra_per_star", 1))
        if int(data.get("batch_size", 128)) > n_spectra:
            raise ConfigError(
                f"data.batch_size={data['batch_size']} is larger than the training set ({n_spectra} spectra from "
                f"data.n_stars={data['n_stars']} and data.split={_show(split)}); lower data.batch_size or raise data.n_stars"
            )


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


def validate_train_config(cfg) -> None:
    """Raise ConfigError for the first value of a train/eval config that cannot work; return None otherwise."""
    seed = cfg.get("seed")
    if seed is not None and not (_is_int(seed) and 0 <= seed < 2**32):
        raise ConfigError(f"seed={_show(seed)} is not valid: it must be an integer in [0, 2^32) or null (unseeded); e.g. seed=0")
    _check_optimizer(cfg.get("optimizer"))
    _check_scheduler(cfg.get("scheduler"))
    if cfg.get("model") is not None:
        _check_model(cfg.model)
    if cfg.get("data") is not None:
        _check_data(cfg.data)
    if cfg.get("trainer") is not None:
        _check_trainer(cfg.trainer)
    _check_bootstrap(cfg.get("bootstrap"))
    check_number("malloc_keep_block_mb", cfg.get("malloc_keep_block_mb"), "malloc_keep_block_mb=1024 (null: malloc's defaults)",
                 minimum=0, allow_null=True)
    paths = cfg.get("paths")
    if paths is not None and paths.get("output_dir") is not None:
        check_writable_folder("paths.output_dir", paths.output_dir, "set paths.log_dir to a folder you can write, e.g. paths.log_dir=./outputs")
    data = cfg.get("data")
    if data is not None and data.get("cache_dir") is not None:
        check_writable_folder("data.cache_dir", data.cache_dir, "set paths.cache_dir to a folder you can write, e.g. paths.cache_dir=./data/cache")

    # Checks below import the targets (torch, Lightning): after the cheap ones.
    check_node_keys("optimizer", cfg.get("optimizer"), SUPPLIED_LATER["optimizer"])
    check_node_keys("scheduler", cfg.get("scheduler"), SUPPLIED_LATER["scheduler"])
    check_node_keys("model", cfg.get("model"), MODEL_KEYS_FROM_DATA)
    check_node_keys("data", cfg.get("data"))
    model = cfg.get("model")
    if model is not None and "activation" in model:
        from stellarlab.models.base import ACTIVATIONS

        name = str(model.activation)
        if name.lower() not in ACTIVATIONS:  # the model's own wording (sweep summaries match on it), plus a guess
            close = difflib.get_close_matches(name.lower(), sorted(ACTIVATIONS), n=1)
            hint = f"did you mean model.activation={close[0]}? " if close else ""
            raise ConfigError(f"unknown activation '{name}' (model.activation); {hint}choose one of {sorted(ACTIVATIONS)}")
    if model is not None and "loss" in model:
        from stellarlab.models.base import LOSSES

        check_choice("model.loss", model.loss, LOSSES)
    if model is not None and "weights" in model:
        check_choice("model.weights", model.weights, ("uniform", "distance"))
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


__all__ = [
    "OutputFolderCheck", "accepted_keys", "check_node_keys", "check_number", "validate_train_config",
    "writable_folder_problem",
]
