"""Hydra glue: where the configs are, the `run_id` and `cwd` resolvers, instantiation of named groups and the
log filter that `conf/hydra/default.yaml` puts on the console and the run's log file."""

from __future__ import annotations

import logging
import os
import secrets
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf


def conf_dir() -> Path:
    """The folder of `train.yaml` and its groups: `stellarlab/conf` in an installed wheel, the repository's `conf/`
    in a clone or an editable install. One answer for every command, the API and the tests."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"stellarlab's configs are missing: neither {package / 'conf'} nor {package.parent / 'conf'} "
                            "holds train.yaml; reinstall stellarlab")


def new_run_id() -> str:
    """`<date>_<time>_<6 random hex>`: sortable by start time, and two runs in one second never collide."""
    return time.strftime("%Y-%m-%d_%H-%M-%S") + "_" + secrets.token_hex(3)


def register_resolvers() -> None:
    # use_cache: one value per config object, so every use of ${run_id:} in a run agrees.
    if not OmegaConf.has_resolver("run_id"):
        OmegaConf.register_new_resolver("run_id", new_run_id, use_cache=True)
    # the folder the command runs from (paths.root_dir); resolvable before Hydra registers its config
    if not OmegaConf.has_resolver("cwd"):
        OmegaConf.register_new_resolver("cwd", os.getcwd, use_cache=True)


def instantiate_group(group: DictConfig | None) -> list:
    """Instantiate every entry of a `callbacks`/`logger` group; entries set to null are skipped."""
    if not group:
        return []
    return [hydra.utils.instantiate(node) for node in group.values() if node is not None and "_target_" in node]


class DropLibraryAdverts(logging.Filter):
    """Drops pytorch_lightning's "💡 Tip: ... try installing litlogger/litmodels" lines, printed on every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith("pytorch_lightning") and str(record.msg).startswith("💡 Tip"))


register_resolvers()
