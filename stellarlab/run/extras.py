"""Optional features and the extra that installs each: a missing one is one `error:` line naming the extra.

Sweeps, cluster launchers and some loggers need packages the core install leaves out (`pip install
"stellarlab[sweep]"`, ...). Hydra looks a sweeper or launcher plugin up only while composing the config,
and reports a missing one as a missing config `hydra/sweeper/optuna` in a block of text, so the command
line is checked before Hydra starts (`check_command_line`): the option named (`hparams_search=optuna`,
`launcher=slurm`, an `experiment=` that selects one) is read from its config file for the plugin it
selects. Loggers are ordinary classes and are checked on the composed config (`check_loggers`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from stellarlab.errors import missing_extra


@dataclass(frozen=True)
class Extra:
    what: str  # the feature, as the message names it
    extra: str  # pip install "stellarlab[<extra>]"
    modules: tuple[str, ...]  # importable when it is installed

    def check(self, option: str) -> None:
        error = missing_extra(option, self.what, self.extra, self.modules)
        if error is not None:
            raise error


SWEEPERS = {"optuna": Extra("the Optuna sweeper", "sweep", ("hydra_plugins.hydra_optuna_sweeper", "optuna"))}
LAUNCHERS = {
    name: Extra("the submitit launcher", "slurm", ("hydra_plugins.hydra_submitit_launcher", "submitit"))
    for name in ("submitit_local", "submitit_slurm")
}
#: logger class name -> what it needs
LOGGERS = {
    "MLFlowLogger": Extra("MLflow", "mlflow", ("mlflow",)),
    "WandbLogger": Extra("Weights & Biases", "wandb", ("wandb",)),
}
#: groups whose options may select a sweeper or launcher in their defaults list
GROUPS = ("hparams_search", "launcher", "experiment")


def _selected_plugins(group: str, option: str, depth: int = 0) -> list[tuple[str, str]]:
    """(`sweeper`|`launcher`, name) that the option's config file selects with `override /hydra/<kind>: <name>`,
    also through the options its defaults list includes (`hparams_search=optuna_cnn` includes `optuna`)."""
    import yaml

    from stellarlab.config import conf_dir

    path = conf_dir() / group / f"{option}.yaml"
    try:
        defaults = (yaml.safe_load(path.read_text()) or {}).get("defaults") or []
    except (OSError, yaml.YAMLError, AttributeError):  # not ours to report: Hydra names a bad option itself
        return []
    found = []
    for entry in defaults:
        if isinstance(entry, str) and entry != "_self_" and depth < 5:  # another option of the same group
            found += _selected_plugins(group, entry, depth + 1)
        for key, value in (entry.items() if isinstance(entry, dict) else ()):
            key = str(key).replace("override", "").strip().lstrip("/")
            if key in ("hydra/sweeper", "hydra/launcher"):
                found.append((key.split("/")[1], str(value)))
            elif key in GROUPS and value is not None and depth < 5:
                found += _selected_plugins(key, str(value), depth + 1)
    return found


def check_command_line(argv: Sequence[str]) -> None:
    """ConfigError for the first override whose sweeper or launcher plugin is not installed."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        option = f"{key}={value}"
        if key in ("hydra/sweeper", "hydra/launcher"):
            plugins = [(key.split("/")[1], value)]
        elif key in GROUPS:
            plugins = [p for name in value.split(",") if name.strip() for p in _selected_plugins(key, name.strip())]
        else:
            continue
        for kind, name in plugins:
            extra = (SWEEPERS if kind == "sweeper" else LAUNCHERS).get(name)
            if extra is not None:
                extra.check(option)


def check_loggers(loggers: Iterable[tuple[str, str]]) -> None:
    """ConfigError for a logger whose package is not installed; `loggers` is (name in the group, _target_)."""
    for name, target in loggers:
        extra = LOGGERS.get(str(target).rsplit(".", 1)[-1])
        if extra is not None:
            extra.check(f"logger.{name} ({target})")
