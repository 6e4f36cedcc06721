"""Every option of every config group composes, and what it composes into can be built."""

from __future__ import annotations

import subprocess
import sys

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from stellarlab.config import instantiate_group
from stellarlab.errors import ConfigError
from stellarlab.run.devices import available_accelerators, check_trainer_config
from stellarlab.run.extras import check_loggers
from tests.conftest import CONF_DIR, ROOT, compose_config

GROUPS = ["data", "model", "optimizer", "scheduler", "trainer", "logger", "callbacks", "paths", "debug", "experiment", "hparams_search", "launcher"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]
SPEC = {"n_pixels": 8575, "label_names": ["teff", "logg", "fe_h"], "label_mean": [4800.0, 2.5, -0.2], "label_std": [700.0, 1.2, 0.4]}


def test_every_group_has_options():
    found = {g for g, _ in OPTIONS}
    assert found >= {"data", "model", "optimizer", "scheduler", "trainer", "logger", "callbacks", "debug", "experiment", "hparams_search", "launcher"}


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_builds(group, option, tmp_path):
    cfg = compose_config([f"{group}={option}"], tmp_path=tmp_path)
    try:  # logger=mlflow|wandb come with extras (installed by make's set-up, not by make test-min)
        check_loggers((name, node.get("_target_")) for name, node in (cfg.get("logger") or {}).items() if node)
    except ConfigError as missing:
        pytest.skip(str(missing))
    for key in cfg:  # every interpolation resolves
        if key != "hydra" and OmegaConf.is_config(cfg[key]):
            OmegaConf.to_container(cfg[key], resolve=True)
    model = hydra.utils.instantiate(cfg.model, **SPEC, optimizer=cfg.optimizer, scheduler=cfg.get("scheduler"))
    out = model(torch.rand(2, SPEC["n_pixels"]))
    assert out.shape == (2, 3)
    opt = model.configure_optimizers()
    if model.automatic_optimization:
        assert isinstance(opt if isinstance(opt, torch.optim.Optimizer) else opt["optimizer"], torch.optim.Optimizer)
    else:  # closed-form baselines (knn, ridge) fit without an optimizer
        assert opt == []
    data = hydra.utils.instantiate(cfg.data)
    assert data.batch_size >= 1
    instantiate_group(cfg.get("logger"))
    instantiate_group(cfg.get("callbacks"))
    accelerator = str(cfg.trainer.accelerator)
    if accelerator in ("auto", "cpu") or accelerator in available_accelerators():
        hydra.utils.instantiate(cfg.trainer, logger=False)
    else:
        with pytest.raises(ConfigError, match="available: cpu"):
            check_trainer_config(accelerator, cfg.trainer.precision)


@pytest.mark.parametrize("model", ["linear", "mlp", "cnn"])
@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_any_optimizer_composes_with_any_model(model, optimizer, tmp_path):
    cfg = compose_config([f"model={model}", f"optimizer={optimizer}", "scheduler=cosine"], tmp_path=tmp_path)
    m = hydra.utils.instantiate(cfg.model, **SPEC, optimizer=cfg.optimizer, scheduler=cfg.scheduler)
    conf = m.configure_optimizers()
    assert type(conf["optimizer"]).__name__.lower() == optimizer.replace("adamw", "adamw")
    assert conf["optimizer"].param_groups[0]["lr"] == cfg.optimizer.lr
    # Adam and AdamW take torch's fused update (one kernel for every parameter), and it steps on CPU
    assert conf["optimizer"].defaults.get("fused") is (True if optimizer.startswith("adam") else None)
    before = [p.detach().clone() for p in m.parameters()]
    m(torch.ones(2, SPEC["n_pixels"])).square().mean().backward()
    conf["optimizer"].step()
    assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))


@pytest.mark.parametrize("overrides, epochs, accelerator", [
    (["model=emulator"], 120, "auto"),                                   # its config sets the epochs it needs
    (["model=emulator", "trainer.max_epochs=7"], 7, "auto"),             # the command line still wins
    (["model=emulator", "trainer=cpu"], 120, "cpu"),                     # the trainer choice is kept
    (["model=emulator", "experiment=quick"], 10, "auto"),                # experiments come last
    (["model=mlp"], 30, "auto"), (["model=cannon"], 30, "auto"),
])
def test_emulator_config_sets_its_epochs(overrides, epochs, accelerator, tmp_path):
    cfg = compose_config(overrides, tmp_path=tmp_path)
    assert cfg.trainer.max_epochs == epochs
    assert cfg.trainer.accelerator == accelerator
    assert set(cfg.model) >= {"_target_"} and "max_epochs" not in cfg.model


def test_accelerator_override_is_a_plain_override(tmp_path):
    cfg = compose_config(["trainer.accelerator=cpu", "trainer.precision=bf16-mixed"], tmp_path=tmp_path)
    assert check_trainer_config(cfg.trainer.accelerator, cfg.trainer.precision) == "cpu"
    with pytest.raises(ConfigError, match="needs CUDA"):
        check_trainer_config("cpu", "16-mixed")
    with pytest.raises(ConfigError, match="not a known accelerator"):
        check_trainer_config("tpu9", "32-true")


def test_missing_accelerator_is_a_one_line_error(tmp_path):
    missing = [a for a in ("cuda", "mps") if a not in available_accelerators()]
    if not missing:
        pytest.skip("this machine has both CUDA and MPS: no missing accelerator to ask for")
    proc = subprocess.run(
        [sys.executable, "train.py", f"trainer.accelerator={missing[0]}", f"paths.log_dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith(f"error: trainer.accelerator={missing[0]} is not available on this machine; available: cpu")
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("**/metrics.json"))
