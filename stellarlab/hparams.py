"""The TensorBoard HPARAMS tab: the run's config next to its real final metrics.

Lightning's default writes `hp_metric = -1`. Here the hyperparameters are logged once at the start
with the names of the metrics that matter; the same tags are then logged with real values during
validation and test, and TensorBoard shows their final values beside the config.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import TensorBoardLogger

GROUPS = ("data", "model", "optimizer", "scheduler")


def _flatten(prefix: str, node, out: dict) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("_target_", "_partial_") or key.endswith("_dir"):
                continue
            _flatten(f"{prefix}/{key}", value, out)
    elif isinstance(node, (list, tuple)):
        out[prefix] = str(list(node))
    elif node is None or isinstance(node, (bool, int, float, str)):
        out[prefix] = "none" if node is None else node
    else:
        out[prefix] = str(node)


def hparams_from_config(cfg: DictConfig, n_parameters: int) -> dict:
    """Flat {'model/hidden_sizes': '[256, 128]', 'optimizer/lr': 0.001, ...} of the settings that define a run."""
    out: dict = {}
    for group in GROUPS:
        node = OmegaConf.to_container(cfg[group], resolve=True) if cfg.get(group) is not None else None
        if isinstance(node, dict):
            out[f"{group}/name"] = node.get("_target_", "none").rsplit(".", 1)[-1]
        _flatten(group, node, out)
    out["trainer/max_epochs"] = cfg.trainer.get("max_epochs")
    out["trainer/precision"] = str(cfg.trainer.get("precision"))
    out["seed"] = "none" if cfg.get("seed") is None else cfg.seed
    out["model/n_parameters"] = int(n_parameters)
    return out


def hparam_metric_names(label_names) -> list[str]:
    names = ["val/loss_best", "test/loss"]
    for metric in ("rmse", "bias", "mad_std"):
        names += [f"test/{metric}_{label}" for label in label_names]
    return names


def log_hyperparameters(loggers, cfg: DictConfig, n_parameters: int, label_names) -> None:
    params = hparams_from_config(cfg, n_parameters)
    metrics = {name: float("nan") for name in hparam_metric_names(label_names)}
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(params, metrics)
        else:
            logger.log_hyperparams(params)
