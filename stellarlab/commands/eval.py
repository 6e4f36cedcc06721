"""Re-test a trained checkpoint: the same metrics as at the end of training, or on other data.

    stellarlab-eval ckpt_path=outputs/train/runs/<run>/checkpoints/best-epoch012.ckpt    # or python eval.py ...
    stellarlab-eval ckpt_path=... data.snr=50            # the same model on noisier spectra
    stellarlab-eval ckpt_path=... trainer.accelerator=cuda

The config is the training run's (its saved overrides re-applied), then the overrides given here.
Prints the test table and writes metrics.json and test_predictions.csv into outputs/eval/runs/<id>/.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from stellarlab.config import conf_dir, register_resolvers
from stellarlab.errors import ConfigError, DataError, command_errors
from stellarlab.run import extras

log = logging.getLogger("stellarlab.eval")
register_resolvers()


def run_config(cfg: DictConfig) -> DictConfig:
    """The training run's config (its data and cache paths too) with this command's overrides on top."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    from stellarlab.results.ensemble import member_checkpoints

    ckpt = member_checkpoints(cfg.ckpt_path)[0]  # an ensemble's members share their data: the first one's config
    saved = ckpt.resolve().parent.parent / ".hydra" / "overrides.yaml"
    if not saved.is_file():
        log.warning("no %s beside the checkpoint: using this command's config as is", saved)
        return cfg
    choices = HydraConfig.get().runtime.choices
    train_overrides, training_only = [], []
    for override in (str(o) for o in OmegaConf.load(saved)):
        top = override.lstrip("~+").split("=", 1)[0].split("@", 1)[0].split(".", 1)[0]
        (train_overrides if top in cfg or top in choices else training_only).append(override)
    if training_only:
        log.info("left out the training-only overrides %s", training_only)
    here = [o for o in HydraConfig.get().overrides.task if not o.startswith("ckpt_path=")]
    given = [o for o in HydraConfig.get().overrides.task if o.startswith("ckpt_path=")]  # a file, a list or a folder
    composed = compose(config_name="eval", overrides=[*train_overrides, *here, *given])
    with open_dict(composed):  # the training run's data paths; this eval run's own folder
        composed.paths.output_dir = cfg.paths.output_dir
        composed.task_name = cfg.task_name
    log.info("training overrides %s + %s", train_overrides, here)
    return composed


def evaluate(cfg: DictConfig) -> dict:
    import numpy as np
    import torch

    from stellarlab.results import ensemble
    from stellarlab.results.evaluation import test_model
    from stellarlab.results.hparams import run_tags
    from stellarlab.results.prediction import load_model
    from stellarlab.results.summary import eval_summary, run_fields, write_summary
    from stellarlab.run.devices import check_trainer_config

    cfg = run_config(cfg)
    check_trainer_config(cfg.trainer.accelerator, cfg.trainer.get("precision", "32-true"))
    members = ensemble.member_checkpoints(cfg.ckpt_path)
    mc_dropout = cfg.get("mc_dropout") or 0
    loaded = [load_model(m) for m in members]
    models = [m for m, _ in loaded]
    ensemble.check_members_agree(models, members, [p for _, p in loaded])
    for model in models:
        ensemble.check_mc_dropout(model, mc_dropout)
    model = models[0]
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("test")
    if list(model.label_names) != list(datamodule.label_names):
        raise ConfigError(f"the checkpoint predicts {model.label_names} but data.labels={datamodule.label_names}; set data.labels to match")
    wavelength = torch.from_numpy(np.array(datamodule.wavelength, dtype=np.float32))  # a copy: the grid may be read-only
    if len(wavelength) != len(model.wavelength) or not torch.allclose(wavelength, model.wavelength.cpu(), rtol=1e-6):
        raise DataError(
            f"the checkpoint was trained on a {len(model.wavelength)}-pixel grid, data={cfg.data._target_} gives "
            f"{len(wavelength)} pixels on another grid; evaluate on data preprocessed like the training data"
        )
    if not len(datamodule.split_index["test"]):
        raise ConfigError("the test split is empty; give data.split a test part")
    run = run_fields(cfg.paths.output_dir, datamodule.label_names, {k: len(v) for k, v in datamodule.split_index.items()},
                     sum(m.n_parameters for m in models), run_tags(cfg))
    if len(models) == 1 and not mc_dropout:
        from stellarlab.run.callbacks import FigureLogger  # the test figures, as train.py's test draws them

        trainer = hydra.utils.instantiate(cfg.trainer, logger=False, callbacks=[FigureLogger(n_example_spectra=0)],
                                          enable_checkpointing=False)
        summary = eval_summary(run, str(members[0]), test_model(trainer, model, datamodule, cfg))
    else:
        summary = eval_summary(run, [str(m) for m in members], test_ensemble(models, datamodule, cfg, mc_dropout))
        summary["ensemble"] = {"members": [str(m) for m in members], "mc_dropout": int(mc_dropout)}
    log.info("wrote %s", write_summary(cfg.paths.output_dir, summary))
    return summary


def test_ensemble(models, datamodule, cfg, mc_dropout: int):
    """The test step of an ensemble (or MC dropout): metrics of the members' mean, calibration of the total sigma."""
    import torch

    from stellarlab.results.ensemble import test_split_results
    from stellarlab.results.evaluation import report_results

    device = cfg.trainer.accelerator if cfg.trainer.accelerator in ("cuda", "mps") else "cpu"
    models = [m.to(torch.device(device)) for m in models]
    results = test_split_results(models, datamodule, mc_dropout, int(datamodule.eval_batch_size))
    what = f"{len(models)} models" + (f" x {mc_dropout} MC-dropout passes" if mc_dropout else "")
    log.info("ensemble of %s: mean spread across members %s", what, {
        label: float(v) for label, v in zip(models[0].label_names, results["spread"].mean(axis=0).round(4))})
    return report_results(results, datamodule, cfg, title=f"ensemble test metrics ({what})")


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="eval")
def main(cfg: DictConfig) -> dict:
    from stellarlab.run.allocator import apply_command_setting

    with command_errors(log):
        apply_command_setting(cfg.get("malloc_keep_block_mb"))  # the command's setting (see conf/train.yaml)
        return evaluate(cfg)


def cli() -> None:
    """`stellarlab-eval` and `python eval.py`."""
    with command_errors(log):
        extras.check_command_line(sys.argv[1:])
    main()


if __name__ == "__main__":
    cli()
