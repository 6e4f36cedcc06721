"""Shared fixtures: the real Hydra config, composed and shrunk to run in seconds on CPU; one survey cache
for the session, warmed once; the real DR17 apStar file of tests/data.

Tiers: tests that start a subprocess or train end to end are marked `slow`; `pytest -m "not slow"` is the
fast tier (`make test-fast`), `make test` runs everything."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import stellarlab.config  # noqa: F401  (registers the run_id resolver)

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
TEST_DATA = ROOT / "tests" / "data"
#: A real APOGEE DR17 apStar file (public SDSS data): one visit of a K dwarf, SNR 137.
REAL_APSTAR = TEST_DATA / "apStar-dr17-2M19485057+5005279.fits"

# A survey small enough to generate in a few seconds and train on in a few more.
TINY = [
    "data.n_stars=600",
    "data.split=[0.7,0.15,0.15]",
    "data.batch_size=32",
    "data.eval_batch_size=256",
    "trainer.max_epochs=20",
    "trainer.accelerator=cpu",
    "trainer.log_every_n_steps=5",
    "~callbacks.progress_bar",
    "callbacks.early_stopping.patience=20",
]


def compose_config(overrides=(), tmp_path: Path | None = None, cache_dir: Path | None = None) -> DictConfig:
    """The config `python train.py <overrides>` would run, with its folders moved under tmp_path."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
    if tmp_path is not None:
        with open_dict(cfg):
            cfg.paths.root_dir = str(tmp_path)
            cfg.paths.output_dir = str(tmp_path / "run")
            cfg.paths.log_dir = str(tmp_path / "outputs")
            cfg.paths.cache_dir = str(cache_dir or tmp_path / "cache")
            cfg.hydra.runtime.output_dir = str(tmp_path / "run")
        HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture(scope="session")
def survey_cache(tmp_path_factory) -> Path:
    """One cache folder for the whole session, so each tiny survey is generated once."""
    return tmp_path_factory.mktemp("survey-cache")


@pytest.fixture(scope="session")
def warm_cache(survey_cache) -> Path:
    """The session's survey cache holding the TINY survey and its test-split Cramér–Rao bounds, made once,
    before runs start side by side in subprocesses (each would otherwise make them)."""
    import hydra

    from stellarlab.synthetic.crlb import survey_crlb

    cfg = compose_config(TINY, tmp_path=survey_cache / "warm", cache_dir=survey_cache)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    survey_crlb(datamodule, "test")
    return survey_cache


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, survey_cache) -> dict:
    """One tiny MLP run through train.py, in a subprocess, with the folders a user gets: for the tests of
    what comes after training (eval, predict, checkpoints)."""
    import subprocess
    import sys

    tmp = tmp_path_factory.mktemp("trained")
    overrides = ["data.n_stars=600", "data.batch_size=32", "trainer.max_epochs=4", "trainer.accelerator=cpu",
                 "~callbacks.progress_bar"]
    cmd = [sys.executable, "train.py", *overrides, f"paths.log_dir={tmp}/out", f"paths.cache_dir={survey_cache}"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    run = next((tmp / "out" / "train" / "runs").iterdir())
    return {"tmp": tmp, "run": run, "ckpt": next((run / "checkpoints").glob("best-*.ckpt")), "cache": survey_cache}


@pytest.fixture
def tiny_cfg(tmp_path, survey_cache):
    def make(*overrides: str, run_name: str = "run") -> DictConfig:
        cfg = compose_config([*TINY, *overrides], tmp_path=tmp_path, cache_dir=survey_cache)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / run_name)
        return cfg

    return make
