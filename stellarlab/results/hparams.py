"""The TensorBoard HPARAMS tab: the run's config next to its real final metrics.

Lightning's default writes `hp_metric = -1`. Here the hyperparameters are logged once at the start
with the names of the metrics that matter; the same tags are then logged with real values during
validation and test (training time and the bootstrap intervals right after testing), and TensorBoard
shows their final values beside the config. `metric_tag` names them; `stellarlab.results.compare` uses the
same names for its columns, so the HPARAMS tab and the comparison table line up. Every other logger
(`logger=csv|mlflow|wandb`) gets the same parameters and the same metrics under the same names.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from stellarlab.metrics import METRIC_NAMES

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


def run_tags(cfg) -> list[str]:
    """`tags` of the config as a list of strings (a single tag may be given as a plain string)."""
    tags = cfg.get("tags")
    if tags is None:
        return []
    if isinstance(tags, str):
        return [tags]
    return [str(tag) for tag in OmegaConf.to_container(tags, resolve=True)] if OmegaConf.is_list(tags) else [str(tags)]


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
    out["tags"] = ",".join(run_tags(cfg))
    out["model/n_parameters"] = int(n_parameters)
    return out


HPARAM_TEST_METRICS = ("rmse", "bias", "mad_std")
TRAIN_SECONDS = "time/train_seconds"


def metric_tag(metric: str, label: str, bound: str | None = None, stage: str = "test") -> str:
    """The one name of a per-label metric, used alike in TensorBoard and in `stellarlab.results.compare`'s columns.

    `test/rmse_teff`; its bootstrap interval is `test/rmse_lo_teff` and `test/rmse_hi_teff`.
    """
    return f"{stage}/{metric}_{bound}_{label}" if bound else f"{stage}/{metric}_{label}"


def hparam_metric_names(label_names, intervals: bool = False) -> list[str]:
    """The metrics beside the config in the HPARAMS tab (with `intervals`, each test metric's CI bounds too)."""
    names = ["val/loss_best", "test/loss", TRAIN_SECONDS]
    for metric in HPARAM_TEST_METRICS:
        for label in label_names:
            names.append(metric_tag(metric, label))
            if intervals:
                names += [metric_tag(metric, label, "lo"), metric_tag(metric, label, "hi")]
    return names


def _interval_metrics(summary: dict, metrics=METRIC_NAMES) -> dict[str, float]:
    out: dict[str, float] = {}
    for label, row in (summary.get("test") or {}).items():
        for metric in metrics:
            ci = row.get(f"{metric}_ci")
            if ci:
                out[metric_tag(metric, label, "lo")] = float(ci[0])
                out[metric_tag(metric, label, "hi")] = float(ci[1])
    return out


def summary_metrics(summary: dict, metrics=METRIC_NAMES) -> dict[str, float]:
    """Flat {tag: value} of a run's metrics.json summary: what TensorBoard shows and `compare` tabulates."""
    out: dict[str, float] = {}
    for key, tag in (("best_val_loss", "val/loss_best"), ("test_loss", "test/loss"), ("train_seconds", TRAIN_SECONDS)):
        if summary.get(key) is not None:
            out[tag] = float(summary[key])
    intervals = _interval_metrics(summary, metrics)
    for label, row in (summary.get("test") or {}).items():
        for metric in metrics:
            if metric in row:
                out[metric_tag(metric, label)] = float(row[metric])
                for bound in ("lo", "hi"):
                    tag = metric_tag(metric, label, bound)
                    if tag in intervals:
                        out[tag] = intervals[tag]
    return out


def log_final_metrics(loggers, summary: dict, step: int) -> None:
    """Log what only exists after testing (training time, bootstrap intervals) under the HPARAMS tags.

    The per-label test metrics themselves are logged by the model during `trainer.test`.
    """
    values = {TRAIN_SECONDS: float(summary["train_seconds"]), **_interval_metrics(summary)}
    for logger in loggers:
        logger.log_metrics(values, step=step)
        logger.save()


def log_hyperparameters(loggers, cfg: DictConfig, n_parameters: int, label_names) -> None:
    from pytorch_lightning.loggers import (
        TensorBoardLogger,  # here: `compare` imports this module without Lightning
    )

    params = hparams_from_config(cfg, n_parameters)
    bootstrap = cfg.get("bootstrap")
    intervals = bool(cfg.get("test")) and bool(bootstrap) and int(bootstrap.get("n_resamples") or 0) > 0
    metrics = {name: float("nan") for name in hparam_metric_names(label_names, intervals)}
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(params, metrics)
        else:
            logger.log_hyperparams(params)
