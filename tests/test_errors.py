"""A catalogue of bad inputs: each ends in one message that names the problem and the fix, never a traceback.

One row per case (the README's troubleshooting table lists the same cases). Cases where what the user
sees on the terminal is the point run the real command in a subprocess (exit code, one `error:` line,
no "Traceback"); the others call the function that raises in this process, which is 10-100x cheaper.
Exit codes: 2 for stellarlab's own errors (config, data, hardware), 1 when Hydra cannot compose the
config (unknown group option or key: Hydra's message names it and lists a group's options).
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

import train as train_script
from stellarlab.data.apogee.mock import (
    make_catalog,
    write_allstar,
    write_apstar,
    write_aspcapstar,
)
from stellarlab.errors import ConfigError, DataError, StellarlabError
from tests.conftest import CONF_DIR, ROOT, TINY, compose_config

GALAH4_PIXELS = 16384
APOGEE_PIXELS = 8575


# -- how a case is run ------------------------------------------------------------------------------
@dataclass
class Env:
    """What a case may use: its own tmp folder, stderr capture, and module-wide prepared files."""

    tmp: Path
    capsys: pytest.CaptureFixture
    files: dict


def error_line(stderr: str) -> str:
    """The single `error: ...` line of a command's stderr (and no traceback anywhere)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def run_train(env: Env, *overrides: str) -> str:
    """`python train.py <overrides>` in this process: SystemExit(2), one error line, no metrics.json."""
    cfg = compose_config([*TINY, *overrides], tmp_path=env.tmp, cache_dir=env.files["cache"])
    env.capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train_script.main(cfg)
    assert exit_info.value.code == 2
    assert not list(env.tmp.rglob("metrics.json"))
    return error_line(env.capsys.readouterr().err)


def run_cli(env: Env, *argv: str, code: int = 2) -> str:
    """A real command in a subprocess: its exit code, and its stderr without a traceback."""
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == code, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr


def missing_accelerator() -> str:
    """An accelerator this machine lacks (the case is skipped on a machine with both)."""
    from stellarlab.run.devices import available_accelerators

    missing = [a for a in ("cuda", "mps") if a not in available_accelerators()]
    if not missing:
        pytest.skip("this machine has both CUDA and MPS")
    return missing[0]


def raised(error: type[Exception], fn: Callable, *args, **kwargs) -> str:
    """The message of the stellarlab error `fn` raises (a documented type, not a library's)."""
    with pytest.raises(StellarlabError) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, error), repr(info.value)
    return str(info.value)


def compose_eval(env: Env, *overrides: str):
    """The config `python eval.py <overrides>` runs, folders under env.tmp (as conftest.compose_config does for train)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        eval_tiny = [o for o in TINY if "callbacks." not in o]  # eval.py has no callbacks group
        cfg = compose(config_name="eval", overrides=[*eval_tiny, *overrides], return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.root_dir = str(env.tmp)
        cfg.paths.output_dir = str(env.tmp / "eval")
        cfg.paths.log_dir = str(env.tmp / "outputs")
        cfg.paths.cache_dir = str(env.files["cache"])
        cfg.hydra.runtime.output_dir = str(env.tmp / "eval")
    HydraConfig.instance().set_config(cfg)
    return cfg


def run_eval(env: Env, *overrides: str) -> str:
    eval_script = importlib.import_module("eval")
    cfg = compose_eval(env, f"ckpt_path={env.files['checkpoint']()}", *overrides)
    env.capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        eval_script.main(cfg)
    assert exit_info.value.code == 2
    return error_line(env.capsys.readouterr().err)


# -- the cases --------------------------------------------------------------------------------------
CASES: dict[str, tuple[Callable[[Env], str], str, str]] = {}


def case(name: str, problem: str, fix: str):
    """Register a case: `problem` and `fix` are regexes the message must both match."""

    def register(fn: Callable[[Env], str]):
        assert name not in CASES, name
        CASES[name] = (fn, problem, fix)
        return fn

    return register


# Config values train.py refuses before anything heavy runs: (case, overrides, problem, fix).
TRAIN_CONFIG_CASES = [
    ("negative learning rate", ["optimizer.lr=-0.001"], r"optimizer\.lr=-0\.001 .*must be a number > 0", r"e\.g\. optimizer\.lr=1e-3"),
    ("learning rate not a number", ["optimizer.lr=fast"], r"optimizer\.lr=fast .*must be a number", r"e\.g\. optimizer\.lr=1e-3"),
    ("negative weight decay", ["optimizer.weight_decay=-1"], r"optimizer\.weight_decay=-1 .*>= 0", r"e\.g\. optimizer\.weight_decay=0"),
    ("fused Adam not a flag", ["optimizer.fused=maybe"], r"optimizer\.fused=maybe .*must be true or false", r"e\.g\. optimizer\.fused=true"),
    ("sgd momentum out of range", ["optimizer=sgd", "optimizer.momentum=1.5"], r"optimizer\.momentum=1\.5 .*< 1", r"e\.g\. optimizer\.momentum=0\.9"),
    ("option the optimizer does not take", ["+optimizer.lrr=1"], r"optimizer\.lrr is not an option of torch\.optim\.Adam",
     r"did you mean optimizer\.lr\?.*valid options: .*weight_decay.*~optimizer\.lrr"),
    ("optimizer class that does not exist", ["optimizer._target_=torch.optim.Adamm"], r"optimizer\._target_=torch\.optim\.Adamm cannot be imported",
     r"check the spelling or choose an option of the optimizer group"),
    ("option the model does not take", ["+model.hiden_sizes=[64]"], r"model\.hiden_sizes is not an option of stellarlab\.models\.mlp\.MLPRegressor",
     r"did you mean model\.hidden_sizes\?.*valid options: activation, batch_norm, dropout, hidden_sizes"),
    ("model option set from the data", ["+model.n_pixels=100"], r"model\.n_pixels is set by stellarlab itself", r"remove model\.n_pixels"),
    ("option the data module does not take", ["+data.n_star=100"], r"data\.n_star is not an option of stellarlab\.data\.synthetic\.SyntheticDataModule",
     r"did you mean data\.n_stars\?"),
    ("dropout of 1.5", ["model.dropout=1.5"], r"model\.dropout=1\.5 .*>= 0 and < 1", r"e\.g\. model\.dropout=0\.1"),
    ("hidden layer of width 0", ["model.hidden_sizes=[256,0]"],
     r"model\.hidden_sizes=\[256,0\] .*integers >= 1", r"e\.g\. model\.hidden_sizes=\[256,128\]"),
    ("unknown activation", ["model.activation=rleu"], r"unknown activation 'rleu' \(model\.activation\)",
     r"did you mean model\.activation=relu\? choose one of \['elu', 'gelu'"),
    ("CNN blocks of different lengths", ["model=cnn", "model.channels=[8,16]"],
     r"one entry per conv block; got 2 for model\.channels, 3 for model\.kernel_sizes",
     r"e\.g\. model\.channels=\[8,16,32\] model\.kernel_sizes=\[7,7,7\]"),
    ("k of 0 neighbours", ["model=knn", "model.k=0"], r"model\.k=0 .*integers >= 1", r"e\.g\. model\.k=\[5,10,20\]"),
    ("negative ridge penalty", ["model=ridge", "model.alpha=-1"], r"model\.alpha=-1 .*numbers > 0", r"e\.g\. model\.alpha=\[0\.01"),
    ("SNR of 0", ["data.snr=0"], r"data\.snr=0 .*must be a number > 0", r"e\.g\. data\.snr=100 or a range data\.snr=\[30,200\]"),
    ("SNR range upside down", ["data.snr=[200,30]"], r"data\.snr=\[200,30\] .*0 < low <= high", r"e\.g\. data\.snr=\[30,200\]"),
    ("split fractions not summing to 1", ["data.split=[0.8,0.1,0.05]"], r"data\.split=\[0\.8,0\.1,0\.05\] .*sum to 0\.95, not 1",
     r"e\.g\. data\.split=\[0\.8,0\.1,0\.1\] or star counts"),
    ("split with two parts", ["data.split=[0.9,0.1]"],
     r"data\.split=\[0\.9,0\.1\] .*3 entries \(train, val, test\)", r"e\.g\. data\.split=\[0\.8,0\.1,0\.1\]"),
    ("split leaving no validation set", ["data.split=[1.0,0,0]"], r"data\.split=\[1\.0,0,0\] .*validation fractions must both be > 0",
     r"e\.g\. data\.split=\[0\.8,0\.1,0\.1\]"),
    ("split asking for more stars than exist", ["data.split=[500,100,100]"], r"asks for 700 stars but the data have 600",
     r"lower the counts or use fractions such as \[0\.8, 0\.1, 0\.1\]"),
    ("survey of 0 stars", ["data.n_stars=0"], r"data\.n_stars=0 .*integer >= 1", r"e\.g\. data\.n_stars=8000"),
    ("batch larger than the training set", ["data.batch_size=1000"], r"data\.batch_size=1000 is larger than the training set \(420 spectra",
     r"lower data\.batch_size or raise data\.n_stars"),
    ("batch size of 0", ["data.batch_size=0"], r"data\.batch_size=0 .*integer >= 1", r"e\.g\. data\.batch_size=128"),
    ("label the synthetic survey lacks", ["data.labels=[teff,vsini]"],
     r"the synthetic survey has no label vsini", r"its labels are teff, logg, fe_h, alpha_fe"),
    ("no labels", ["data.labels=[]"], r"data\.labels=\[\] is not valid", r"name one or more labels, e\.g\. data\.labels=\[teff,logg,fe_h\]"),
    ("max_epochs not a number", ["trainer.max_epochs=abc"], r"trainer\.max_epochs=abc .*integer >= 1", r"e\.g\. trainer\.max_epochs=30"),
    ("max_epochs of 0", ["trainer.max_epochs=0"], r"trainer\.max_epochs=0 .*integer >= 1 \(or -1: no limit\)", r"e\.g\. trainer\.max_epochs=30"),
    ("cosine schedule without an epoch limit", ["scheduler=cosine", "trainer.max_epochs=-1"], r"scheduler\.T_max=-1 .*integer >= 1",
     r"trainer\.max_epochs=30 \(scheduler\.T_max follows it\)"),
    ("precision typo", ["trainer.precision=16mixed"], r"trainer\.precision=16mixed is not a precision Lightning knows",
     r"use 32-true \(any device\), bf16-mixed \(CPU, CUDA\) or 16-mixed \(CUDA\)"),
    ("unknown accelerator", ["trainer.accelerator=tpu"], r"trainer\.accelerator=tpu is not a known accelerator", r"use one of \['auto', 'cpu'"),
    ("half precision on CPU", ["trainer.precision=16-mixed"], r"trainer\.precision=16-mixed needs CUDA", r"on CPU use bf16-mixed or 32-true"),
    ("no devices", ["trainer.devices=0"], r"trainer\.devices=0 is not valid", r"e\.g\. trainer\.devices=1"),
    ("seed not an integer", ["seed=abc"], r"seed=abc is not valid", r"integer in \[0, 2\^32\) or null \(unseeded\); e\.g\. seed=0"),
    ("bootstrap level above 1", ["bootstrap.level=1.5"], r"bootstrap\.level=1\.5 .*> 0 and < 1", r"e\.g\. bootstrap\.level=0\.95"),
    ("negative malloc block size", ["malloc_keep_block_mb=-5"], r"malloc_keep_block_mb=-5 is not valid: it must be a number >= 0 or null",
     r"e\.g\. malloc_keep_block_mb=1024 \(null: malloc's defaults\)"),
    ("optimized metric the model never logs", ["optimized_metric=val/los"],
     r"optimized_metric=val/los is not a metric stellarlab\.models\.mlp\.MLPRegressor logs for data\.labels=\[teff,logg,fe_h\]",
     r"did you mean optimized_metric=val/loss\? it logs: train/loss_epoch, val/loss, val/loss_best"),
    ("optimized metric of a label not trained on", ["optimized_metric=val/rmse_alpha_fe"],
     r"optimized_metric=val/rmse_alpha_fe is not a metric", r"did you mean optimized_metric=val/rmse_fe_h\?"),
    ("split seed not a number", ["data.split_seed=abc"], r"data\.split_seed=abc is not valid: it must be an integer >= 0",
     r"e\.g\. data\.split_seed=42"),
    ("gradient accumulation over 0 batches", ["+trainer.accumulate_grad_batches=0"],
     r"trainer\.accumulate_grad_batches=0 is not valid: it must be an integer >= 1", r"e\.g\. trainer\.accumulate_grad_batches=1"),
    ("validation less often than the last epoch", ["trainer.check_val_every_n_epoch=30"],
     r"trainer\.check_val_every_n_epoch=30 is larger than trainer\.max_epochs=20: validation would never run",
     r"lower trainer\.check_val_every_n_epoch or raise trainer\.max_epochs"),
    ("closed-form model validated every 2 epochs", ["model=ridge", "trainer.check_val_every_n_epoch=2"],
     r"trainer\.check_val_every_n_epoch=2: stellarlab\.models\.ridge\.RidgeRegressor is fitted in 1 epoch\(s\), so validation would never run",
     r"set trainer\.check_val_every_n_epoch=1"),
    ("nuisance label the synthetic survey lacks", ["data.nuisance_labels=[vsini]"],
     r"data\.nuisance_labels=\[vsini\]: the synthetic survey has no label vsini", r"its labels are teff, logg, fe_h, alpha_fe"),
    ("nuisance labels not a list", ["data.nuisance_labels=alpha_fe"], r"data\.nuisance_labels=alpha_fe is not valid",
     r"name zero or more labels, e\.g\. data\.nuisance_labels=\[alpha_fe\]"),
    ("error patterns for the network emulator", ["model=emulator", "model.error_components=3"],
     r"model\.error_components=3: the patterns of the emulator's error are measured for kind=quadratic \(The Cannon\) only",
     r"set model\.error_components=0 \(or use model=cannon\)"),
    ("more error patterns than pixels", ["model=cannon", "model.error_components=100000"],
     r"model\.error_components=100000 is more than the spectra's 8575 pixels", r"lower it \(model=cannon uses 12\)"),
    ("more error patterns than training spectra", ["model=cannon", "model.error_components=500"],
     r"model\.error_components=500 is more than the 420 training spectra its patterns are measured on",
     r"lower it or train on more stars"),
]
for _name, _overrides, _problem, _fix in TRAIN_CONFIG_CASES:
    case(_name, _problem, _fix)(lambda env, o=tuple(_overrides): run_train(env, *o))


@case("requested accelerator unavailable", r"trainer\.accelerator=(cuda|mps) is not available on this machine; available: cpu",
      r"use trainer\.accelerator=auto to pick the best one")
def _(env):
    return run_train(env, f"trainer.accelerator={missing_accelerator()}")


def train_with_output_dir(env: Env, output_dir: Path) -> str:
    """train() itself (as a notebook calls it): the folder is checked before anything is built."""
    cfg = compose_config([*TINY], tmp_path=env.tmp, cache_dir=env.files["cache"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return raised(ConfigError, train_script.train, cfg)


@case("output folder under a regular file", r"paths\.output_dir=.*a-file/run cannot be written: .*a-file is a file, not a folder",
      r"set paths\.log_dir to a folder you can write, e\.g\. paths\.log_dir=\./outputs")
def _(env):
    (env.tmp / "a-file").write_text("not a folder")
    return train_with_output_dir(env, env.tmp / "a-file" / "run")


@case("read-only output folder", r"paths\.output_dir=.*read-only/run cannot be written: .*read-only is not writable by this user",
      r"set paths\.log_dir to a folder you can write")
def _(env):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; the regular-file case covers root")
    folder = env.tmp / "read-only"
    folder.mkdir(mode=0o500)
    try:
        return train_with_output_dir(env, folder / "run")
    finally:
        folder.chmod(0o700)


# Hydra composes the config before stellarlab runs: its own messages, exit code 1.
@case("unknown group option (Hydra)", r"Could not find 'model/transformer'", r"Available options in 'model':\s+cannon\s+cnn\s+emulator\s+knn\s+linear\s+mlp\s+ridge")
def _(env):
    return run_cli(env, "train.py", "model=transformer", f"paths.log_dir={env.tmp}", code=1)


@case("unknown config key (Hydra)", r"Could not override 'optimizer\.lrr'.*Key 'lrr' is not in struct",
      r"To append to your config use \+optimizer\.lrr=1")
def _(env):
    # Appending it as suggested reaches stellarlab's check, which lists the valid options (case "option the optimizer does not take").
    return run_cli(env, "train.py", "optimizer.lrr=1", f"paths.log_dir={env.tmp}", code=1).replace("\n", " ")


@case("bad value on the command line (subprocess)", r"^error: optimizer\.lr=-0\.001 is not valid: it must be a number > 0",
      r"e\.g\. optimizer\.lr=1e-3$")
def _(env):
    return error_line(run_cli(env, "train.py", "optimizer.lr=-0.001", f"paths.log_dir={env.tmp}"))


def _has_output_check() -> bool:
    return "stellarlab.run.validation.OutputFolderCheck" in (CONF_DIR / "hydra" / "default.yaml").read_text()


@case("unwritable paths.log_dir (subprocess)", r"^error: cannot create the run folder .*a-file/out/train/runs/.*: .*a-file is a file, not a folder",
      r"set paths\.log_dir to a folder you can write")
def _(env):
    if not _has_output_check():
        pytest.skip("conf/hydra/default.yaml does not register stellarlab.run.validation.OutputFolderCheck yet")
    (env.tmp / "a-file").write_text("not a folder")
    return error_line(run_cli(env, "train.py", f"paths.log_dir={env.tmp / 'a-file' / 'out'}"))


@case("unwritable run folder (Hydra callback)", r"^error: cannot create the run folder .*a-file/runs/x: .*a-file is a file, not a folder",
      r"set paths\.log_dir to a folder you can write")
def _(env):
    from omegaconf import OmegaConf

    from stellarlab.run.validation import OutputFolderCheck

    (env.tmp / "a-file").write_text("not a folder")
    config = OmegaConf.create({"hydra": {"run": {"dir": str(env.tmp / "a-file" / "runs" / "x")}}})
    env.capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        OutputFolderCheck().on_run_start(config)
    assert exit_info.value.code == 2
    return error_line(env.capsys.readouterr().err)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["run", "sweep"])
def test_default_log_dir_is_checked_before_hydra_creates_it(tmp_path, mode):
    """The default paths.log_dir is under the folder the command runs from (once ${hydra:runtime.cwd}, which
    Hydra could not resolve this early: the check only warned, and Hydra then failed with a traceback)."""
    (tmp_path / "outputs").write_text("a file where the run folders would go")
    env = {k: v for k, v in os.environ.items() if k != "STELLARLAB_ROOT"}
    argv = [sys.executable, str(ROOT / "train.py"), *(["-m", "model=linear,mlp"] if mode == "sweep" else [])]
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "raised" not in proc.stderr, proc.stderr[-3000:]
    assert re.match(
        rf"error: cannot create the {mode} folder {re.escape(str(tmp_path))}/outputs/train/(runs|multiruns)/.*: .*outputs is a file",
        error_line(proc.stderr),
    )
    assert (tmp_path / "outputs").is_file()


# -- APOGEE files ---------------------------------------------------------------------------------
def apogee_module(env: Env, catalog: Path | None = None, spectra_dir: Path | None = None, **kwargs):
    from stellarlab.data.apogee.datamodule import APOGEEDataModule

    root = env.files["apogee"]
    return APOGEEDataModule(
        catalog=str(catalog or root / "allStar.fits"), spectra_dir=str(spectra_dir or root / "aspcapStar"),
        cache_dir=str(env.tmp / "cache"), workers=1, progress=False, **kwargs,
    )


@case("APOGEE catalogue missing", r"APOGEE catalogue not found: .*nope\.fits",
      r"Download it with `python -m stellarlab\.download data=apogee` or point data\.catalog at your copy")
def _(env):
    return raised(DataError, apogee_module(env, catalog=env.tmp / "nope.fits").prepare_data)


@case("APOGEE spectra folder missing", r"APOGEE spectra folder not found: .*nowhere",
      r"python -m stellarlab\.download data=apogee data\.source=aspcapStar.*or point data\.spectra_dir at your copy")
def _(env):
    return raised(DataError, apogee_module(env, spectra_dir=env.tmp / "nowhere").prepare_data)


@case("label column not in the catalogue", r"has no column\(s\) \['VSINI'\], asked for by data\.labels",
      r"names are catalogue columns, .*e\.g\. teff, logg, fe_h")
def _(env):
    return raised(DataError, apogee_module(env, labels=["teff", "vsini"]).prepare_data)


@case("every label missing", r"no star left after the cut 'every label missing \(TEFF, LOGG, FE_H\)'",
      r"choose data\.labels that these stars have values for")
def _(env):
    root = env.files["apogee"]
    return raised(DataError, apogee_module(env, catalog=root / "allStar-no-labels.fits").prepare_data)


@case("cut leaving no star", r"no star left after the cut 'SNR >= 1e\+06': it removed all \d+ remaining stars", r"loosen data\.cuts\.snr_min")
def _(env):
    return raised(DataError, apogee_module(env, cuts={"snr_min": 1e6}).prepare_data)


@case("unknown cut (appended key)", r"data\.cuts: unknown key\(s\) \['snr'\]", r"valid keys: preset, ranges, snr_min")
def _(env):
    return raised(ConfigError, apogee_module, env, cuts={"snr": 70})


def load_aspcapstar(path: Path):
    from stellarlab.data.apogee.files import PixelConfig, load_spectrum

    return load_spectrum(path, PixelConfig())


@case("corrupt FITS file", r"corrupt or unreadable FITS file .*aspcapStar-garbage\.fits", r"delete it and download it again")
def _(env):
    path = env.tmp / "aspcapStar-garbage.fits"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    return raised(DataError, load_aspcapstar, path)


@case("truncated FITS file", r"corrupt or (unreadable|incomplete) FITS file .*aspcapStar-cut\.fits", r"delete it and download it again")
def _(env):
    path = env.tmp / "aspcapStar-cut.fits"
    write_aspcapstar(path, np.ones(APOGEE_PIXELS), np.full(APOGEE_PIXELS, 0.01))
    path.write_bytes(path.read_bytes()[:20000])  # in the middle of the flux
    return raised(DataError, load_aspcapstar, path)


@case("spectrum with the wrong pixel count", r"aspcapStar-short\.fits: HDU1 has shape \(7514,\), expected 8575 pixels",
      r"is this a DR17 file of the right kind\?")
def _(env):
    path = write_aspcapstar(env.tmp / "aspcapStar-short.fits", np.ones(7514), np.full(7514, 0.01))
    return raised(DataError, load_aspcapstar, path)


@case("spectrum on another wavelength grid", r"wavelength grid CRVAL1=4\.2, CDELT1=6e-06 is not the DR17 grid",
      r"use the star's DR17 file, or give spectra on another grid to predict\.py as \.npy with input_wavelength=")
def _(env):
    from astropy.io import fits

    path = write_aspcapstar(env.tmp / "aspcapStar-grid.fits", np.ones(APOGEE_PIXELS), np.full(APOGEE_PIXELS, 0.01))
    with fits.open(path, mode="update") as hdul:
        hdul[1].header["CRVAL1"] = 4.2
    return raised(DataError, load_aspcapstar, path)


@case("aspcapStar file read as apStar", r"HDU3 should be the integer APOGEE_PIXMASK, found float32; is this an apStar/asStar file\?",
      r"aspcapStar files need data\.source=aspcapStar")
def _(env):
    from stellarlab.data.apogee.files import PixelConfig, load_spectrum

    path = write_aspcapstar(env.tmp / "aspcapStar-x.fits", np.ones(APOGEE_PIXELS), np.full(APOGEE_PIXELS, 0.01))
    return raised(DataError, load_spectrum, path, PixelConfig(source="apStar"))


@case("apStar with too few rows", r"apStar-rows\.fits: HDU1 has 0 rows, row 0 was asked for", r"download it again|re-download")
def _(env):
    from stellarlab.data.apogee.files import read_apstar

    empty = np.zeros((0, APOGEE_PIXELS))
    path = write_apstar(env.tmp / "apStar-rows.fits", empty, empty, empty.astype(np.int64))
    return raised(DataError, read_apstar, path)


@case("table where the spectrum image should be", r"aspcapStar-table\.fits: HDU1 holds .* data, not an image of numbers",
      r"is this an APOGEE spectrum file of the right kind \(data\.source\)\?")
def _(env):
    from astropy.io import fits

    path = env.tmp / "aspcapStar-table.fits"
    table = fits.BinTableHDU.from_columns([fits.Column(name="FLUX", format="E", array=np.ones(APOGEE_PIXELS, np.float32))])
    fits.HDUList([fits.PrimaryHDU(), table, table.copy()]).writeto(path)
    return raised(DataError, load_aspcapstar, path)


@case("cache file that does not match its metadata", r"cache file .*flux\.npy holds <f4 \[2, 4\], meta\.json says <f4 \[3, 4\]",
      r"delete .* to rebuild it")
def _(env):
    from stellarlab.data.cache import ArrayCache

    cache = ArrayCache(env.tmp / "c", "x", {"a": 1})
    cache.write({"flux": np.zeros((3, 4), np.float32)})
    np.save(cache.path / "flux.npy", np.zeros((2, 4), np.float32))
    return raised(DataError, cache.load)


# -- GALAH galah4 arrays --------------------------------------------------------------------------
def galah4_root(env: Env, spectra: np.ndarray | None = None, labels: np.ndarray | None = None) -> Path:
    """A copy of the module's galah4 folder, with spectra/labels replaced where given."""
    root = env.tmp / "galah4"
    shutil.copytree(env.files["galah4"], root)
    if spectra is not None:
        np.save(root / "spectra.npy", spectra)
    if labels is not None:
        np.save(root / "labels.npy", labels)
    return root


def galah4_module(root: Path, **kwargs):
    from stellarlab.data.galah.galah4 import GALAH4DataModule

    return GALAH4DataModule(root=str(root), **{"batch_size": 4, "split": [0.6, 0.2, 0.2], **kwargs})


@case("galah4 files missing", r"nowhere/spectra\.npy not found",
      r"get the galah4 files with `python -m stellarlab\.download data=galah` \(or point data\.root at them\)")
def _(env):
    return raised(DataError, galah4_module(env.tmp / "nowhere").prepare_data)


@case("truncated .npy file", r"spectra\.npy is not a readable \.npy file .*probably truncated",
      r"delete it and run `python -m stellarlab\.download data=galah` again")
def _(env):
    root = galah4_root(env)
    data = (root / "spectra.npy").read_bytes()
    (root / "spectra.npy").write_bytes(data[: len(data) // 2])
    return raised(DataError, galah4_module(root).prepare_data)


@case("galah4 spectra with the wrong pixel count", r"spectra\.npy has shape \(30, 8575\); the galah4 layout is \(N, 16384\)",
      r"four HERMES CCDs of 4096 pixels end to end")
def _(env):
    return raised(DataError, galah4_module(galah4_root(env, spectra=np.ones((30, 8575), np.float32))).prepare_data)


@case("galah4 label that does not exist", r"label\(s\) \['vsini'\] not in .*labels\.npy",
      r"available labels: \['mass', 'age'.*Set data\.labels to some of them")
def _(env):
    return raised(DataError, galah4_module(env.files["galah4"], labels=["teff", "vsini"]).setup)


@case("galah4 every label missing", r"galah4: no spectrum left: 30 of 30 have none of the labels \['teff', 'logg', 'fe_h'\]",
      r"choose data\.labels that these spectra have values for")
def _(env):
    labels = np.load(env.files["galah4"] / "labels.npy")
    labels[:, 4:7] = np.nan
    return raised(DataError, galah4_module(galah4_root(env, labels=labels)).setup)


@case("all-NaN spectra", r"galah4: no spectrum left: .* 30 have no usable pixel", r"flux is NaN/inf or weight 0 everywhere: check the spectrum files")
def _(env):
    return raised(DataError, galah4_module(galah4_root(env, spectra=np.full((30, GALAH4_PIXELS), np.nan, np.float32))).setup)


@case("galah4 SNR cut leaving nothing", r"no spectrum left after the SNR cut \(SNR >= 1e\+06\)", r"lower data\.snr_min or set it to null")
def _(env):
    return raised(DataError, galah4_module(env.files["galah4"], snr_min=1e6).setup)


@case("batch larger than a real training set", r"data\.batch_size=64 is larger than the training set \(18 spectra\)",
      r"lower data\.batch_size or use more stars")
def _(env):
    return raised(ConfigError, galah4_module(env.files["galah4"], batch_size=64).setup)


# -- predict.py -----------------------------------------------------------------------------------
def read_npy(env: Env, flux: np.ndarray | None = None, path: Path | None = None, input_wavelength=None):
    from stellarlab.grids import apogee_wavelength
    from stellarlab.results.prediction import read_spectra

    if path is None:
        path = env.tmp / "spectra.npy"
        np.save(path, flux)
    return read_spectra([path], "auto", {}, apogee_wavelength(), input_wavelength)


@case("spectrum that is all NaN (predict)", r"no input spectrum has a single usable pixel \(all NaN or masked\) in .*spectra\.npy",
      r"check that the files hold finite flux")
def _(env):
    return raised(DataError, read_npy, env, np.full((2, APOGEE_PIXELS), np.nan, np.float32))


@case("npy spectra with another pixel count (predict)", r"spectra have 4000 pixels but the checkpoint's grid has 8575",
      r"pass input_wavelength=<\.npy of 4000 wavelengths in A> to resample them onto it")
def _(env):
    return raised(DataError, read_npy, env, np.ones((2, 4000), np.float32))


@case("checkpoint applied to spectra on another grid (predict)",
      r"its grid \(5000\.0-6000\.0 A\) covers 0% of the checkpoint's \(15\d{3}\.\d-16\d{3}\.\d A\)",
      r"this model cannot read these spectra")
def _(env):
    np.save(env.tmp / "wave.npy", np.linspace(5000.0, 6000.0, 4000))
    return raised(DataError, read_npy, env, np.ones((2, 4000), np.float32), input_wavelength=str(env.tmp / "wave.npy"))


@case("input_wavelength of the wrong length (predict)", r"input_wavelength=.*wave\.npy holds float64 \[3999\]",
      r"needs 4000 finite wavelengths in A, one per pixel")
def _(env):
    np.save(env.tmp / "wave.npy", np.linspace(15100.0, 17000.0, 3999))
    return raised(DataError, read_npy, env, np.ones((2, 4000), np.float32), input_wavelength=str(env.tmp / "wave.npy"))


@case("empty .npy (predict)", r"spectra\.npy: the array \[0, 8575\] holds no spectra", r"save the spectra as an \(N, pixels\) array")
def _(env):
    return raised(DataError, read_npy, env, np.ones((0, APOGEE_PIXELS), np.float32))


@case("truncated .npy for predict", r"spectra\.npy: not a readable \.npy array", r"is the file truncated\?")
def _(env):
    path = env.tmp / "spectra.npy"
    np.save(path, np.ones((4, APOGEE_PIXELS), np.float32))
    path.write_bytes(path.read_bytes()[:5000])
    return raised(DataError, read_npy, env, path=path)


@case("predict input that does not exist", r"input .*missing\.npy: no such file or folder",
      r"give input=<file>, <folder> or \[<file>,<file>,\.\.\.\]")
def _(env):
    from stellarlab.results.prediction import find_inputs

    return raised(DataError, find_inputs, [str(env.tmp / "missing.npy")], "auto")


@case("predict input that is a pipe, not a file", r"input .*spectra\.fits is not a regular file \(a pipe or a device\)",
      r"give input=<file>, <folder> or \[<file>,<file>,\.\.\.\]")
def _(env):
    from stellarlab.results.prediction import find_inputs

    os.mkfifo(env.tmp / "spectra.fits")  # reading it would wait for a writer forever
    return raised(DataError, find_inputs, [str(env.tmp / "spectra.fits")], "auto")


@case("predict format that does not exist", r"format='fits' is not one of \['auto', 'aspcapStar', 'apStar', 'npy'\]",
      r"format=auto tells it from each file's name")
def _(env):
    from stellarlab.results.prediction import find_inputs

    return raised(ConfigError, find_inputs, [str(env.tmp)], "fits")


@case("file whose format cannot be told from its name", r"cannot tell the format of .*star\.fits from its name",
      r"pass format=aspcapStar\|apStar\|npy")
def _(env):
    from stellarlab.results.prediction import file_format

    return raised(DataError, file_format, env.tmp / "star.fits", "auto")


@case("checkpoint that does not exist (subprocess)", r"^error: ckpt_path=.*nope\.ckpt: no such file",
      r"checkpoints are in <run folder>/checkpoints/ \(best-\*\.ckpt, last\.ckpt\)$")
def _(env):
    return error_line(run_cli(env, "predict.py", f"ckpt_path={env.tmp / 'nope.ckpt'}", f"input={env.tmp}", f"paths.log_dir={env.tmp}"))


@case("truncated checkpoint", r"checkpoint .*cut\.ckpt cannot be read", r"is the file complete\?")
def _(env):
    from stellarlab.results.prediction import read_checkpoint

    path = env.tmp / "cut.ckpt"
    path.write_bytes(Path(env.files["checkpoint"]()).read_bytes()[:5000])
    return raised(DataError, read_checkpoint, path)


@case("object array saved as .npy (predict)", r"objects\.npy holds Python objects \(dtype object\), not numbers",
      r"save the flux as a float array, e\.g\. np\.save\(path, np\.asarray\(flux, dtype=np\.float32\)\)")
def _(env):
    path = env.tmp / "objects.npy"
    np.save(path, np.array([np.ones(APOGEE_PIXELS), "not a spectrum"], dtype=object), allow_pickle=True)
    return raised(DataError, read_npy, env, path=path)


@case("FITS file read with format=npy (predict)", r"aspcapStar-x\.fits is not a \.npy file \(a FITS file\?",
      r"use format=auto, which tells the format from the name")
def _(env):
    from stellarlab.grids import apogee_wavelength
    from stellarlab.results.prediction import read_spectra

    path = write_aspcapstar(env.tmp / "aspcapStar-x.fits", np.ones(APOGEE_PIXELS), np.full(APOGEE_PIXELS, 0.01))
    return raised(DataError, read_spectra, [path], "npy", {}, apogee_wavelength())


@case("the same input file twice (predict)", r"input names .*twice\.npy more than once \(input=\[.*twice\.npy,.*twice\.npy\]\)",
      r"give each file or folder once")
def _(env):
    from stellarlab.results.prediction import find_inputs

    np.save(env.tmp / "twice.npy", np.ones((2, APOGEE_PIXELS), np.float32))
    return raised(DataError, find_inputs, [str(env.tmp / "twice.npy")] * 2, "auto")


def damaged_copy(env: Env, source: Path) -> Path:
    """A copy of checkpoint `source` with one byte of its largest weight flipped: it still unpickles."""
    import torch

    weights = torch.load(source, map_location="cpu", weights_only=True)["state_dict"]
    tensor = max(weights.values(), key=lambda t: t.numel())
    data, needle = bytearray(source.read_bytes()), tensor.reshape(-1)[:16].numpy().tobytes()
    at = data.find(needle)
    assert at > 0 and data.find(needle, at + 1) < 0
    data[at + 5] ^= 0x10
    path = env.tmp / "damaged.ckpt"
    path.write_bytes(bytes(data))
    torch.load(path, map_location="cpu", weights_only=True)  # still readable: only the checksum tells
    return path


@case("checkpoint with flipped bytes", r"checkpoint .*damaged\.ckpt is damaged: its weights do not match their checksum",
      r"copy it again from where it was trained, or use another checkpoint of the run")
def _(env):
    from stellarlab.results.prediction import read_checkpoint

    return raised(DataError, read_checkpoint, damaged_copy(env, Path(env.files["checkpoint"]())))


@case("checkpoint of another version's model (eval, predict)",
      r"checkpoint .*other-version\.ckpt: its weights do not fit the LinearRegressor its settings build \(size mismatch",
      r"it was written by another version of the model: retrain, or predict with the version that wrote it")
def _(env):
    import torch

    from stellarlab.results.prediction import load_model

    checkpoint = torch.load(env.files["checkpoint"](), map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["n_pixels"] = 32  # settings of another version's model; the weights untouched
    path = env.tmp / "other-version.ckpt"
    torch.save(checkpoint, path)
    return raised(DataError, load_model, path)


@case("resume from weights the config no longer builds",
      r"checkpoint .*last\.ckpt: its weights do not fit the LinearRegressor this run's config builds now \(size mismatch",
      r"written by another version of stellarlab \(or of its defaults\): start a new run, or resume with the version that wrote it")
def _(env):
    run_dir = env.tmp / "interrupted"  # the trained run, as if killed before its end, resumed under other defaults
    shutil.copytree(Path(env.files["checkpoint"]()).parent.parent, run_dir)
    (run_dir / "metrics.json").unlink(missing_ok=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    saved = last.read_bytes()
    message = run_train(env, *CHECKPOINT_RUN, "data.labels=[teff,logg]", f"resume={run_dir}")
    assert last.read_bytes() == saved and not (run_dir / ".running").exists()  # kept for the version that wrote it
    return message


@case("full disk while writing an output", r"the disk is full: writing .*metrics\.json failed \(OSError: \[Errno 28\] No space left",
      r"free space there, or point paths\.log_dir \(outputs\) or paths\.cache_dir \(surveys\) at a disk with room")
def _(env):
    import errno

    from stellarlab.files import write_bytes_atomic

    def full(fh):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return raised(DataError, write_bytes_atomic, env.tmp / "metrics.json", full)


def run_predict(env: Env, *overrides: str) -> str:
    """`python predict.py <overrides>` in this process: SystemExit(2) and one error line."""
    predict_script = importlib.import_module("predict")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="predict", return_hydra_config=True,
                      overrides=[f"ckpt_path={env.tmp / 'model.ckpt'}", f"input={env.tmp}", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = cfg.hydra.runtime.output_dir = str(env.tmp / "predict")
    HydraConfig.instance().set_config(cfg)
    env.capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        predict_script.main(cfg)
    assert exit_info.value.code == 2
    assert not (env.tmp / "predict").exists()
    return error_line(env.capsys.readouterr().err)


@case("predict with a usable-pixel fraction above 1", r"^error: min_usable_fraction=1\.5 is not valid: it must be a number >= 0 and <= 1",
      r"e\.g\. min_usable_fraction=0\.5")
def _(env):
    return run_predict(env, "min_usable_fraction=1.5")


@case("predict with a negative number of MC-dropout passes", r"^error: mc_dropout=-3 is not valid: it must be an integer >= 0",
      r"e\.g\. mc_dropout=20")
def _(env):
    return run_predict(env, "mc_dropout=-3")


@case("ensemble naming one checkpoint twice", r"^error: ckpt_path names the same checkpoint more than once",
      r"an ensemble needs distinct members")
def _(env):
    (env.tmp / "a.ckpt").write_bytes(b"x")
    return run_predict(env, f"ckpt_path=[{env.tmp / 'a.ckpt'},{env.tmp / 'a.ckpt'}]")


@case("ensemble folder without a finished run", r"^error: ckpt_path=.*runs: no finished run with a best checkpoint below it",
      r"looked for metrics\.json with status ok and checkpoints/best-\*\.ckpt")
def _(env):
    (env.tmp / "runs" / "0").mkdir(parents=True)
    return run_predict(env, f"ckpt_path={env.tmp / 'runs'}")


@case("MC dropout on a model without dropout", r"^error: mc_dropout=5: LinearRegressor has no dropout layer",
      r"train with model\.dropout=0\.1 \(say\), or use an ensemble")
def _(env):
    return run_predict(env, f"ckpt_path={env.files['checkpoint']()}", "mc_dropout=5")


@case("predict batch of 0 spectra", r"data\.eval_batch_size=0 is not valid: it must be an integer >= 1", r"e\.g\. data\.eval_batch_size=512")
def _(env):
    return run_predict(env, "data.eval_batch_size=0")


@case("predict batch_size that is not a number (old key)", r"^error: batch_size=abc is not valid: it must be an integer >= 1",
      r"e\.g\. data\.eval_batch_size=512")
def _(env):
    return run_predict(env, "batch_size=abc")


@case("predict on an accelerator this machine lacks (old key)", r"^error: accelerator=(cuda|mps) is not available on this machine",
      r"use trainer\.accelerator=auto to pick the best one")
def _(env):
    return run_predict(env, f"accelerator={missing_accelerator()}")


# -- eval.py --------------------------------------------------------------------------------------
@case("checkpoint evaluated on data on another grid",
      r"the checkpoint was trained on a 8575-pixel grid, data=.*SyntheticDataModule gives 7514 pixels",
      r"evaluate on data preprocessed like the training data")
def _(env):
    return run_eval(env, *CHECKPOINT_RUN, "data.gap_deleted=true")


@case("checkpoint evaluated on other labels", r"the checkpoint predicts \['teff', 'logg', 'fe_h'\] but data\.labels=\['teff'\]",
      r"set data\.labels to match")
def _(env):
    return run_eval(env, *CHECKPOINT_RUN, "data.labels=[teff]")


# -- compare and download -------------------------------------------------------------------------
@case("sweep folder with no runs (subprocess)", r"^error: no runs under .*empty: searched it and every folder below for metrics\.json",
      r"give the folder of a multirun, an Optuna study or of single runs, e\.g\. outputs/train/multiruns/<sweep>")
def _(env):
    (env.tmp / "empty").mkdir()
    return run_cli(env, "-m", "stellarlab.compare", str(env.tmp / "empty")).strip()


@case("compare on a folder that does not exist", r"^error: .*no-such-sweep is not a folder", r"give a sweep folder such as outputs/train/multiruns/")
def _(env):
    from stellarlab.results.compare import main

    env.capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main([str(env.tmp / "no-such-sweep")])
    assert stopped.value.code == 2
    return error_line(env.capsys.readouterr().err)


@case("download option out of range (subprocess)", r"^error: download\.workers=0 is not valid: it must be an integer >= 1",
      r"e\.g\. download\.workers=4$")
def _(env):
    return error_line(run_cli(env, "-m", "stellarlab.download", "data=galah", "download.workers=0", f"paths.data_dir={env.tmp}"))


def download_error(env: Env, *overrides: str) -> str:
    """`python -m stellarlab.download data=galah <overrides>` in this process (a dry run, in case a value got through):
    the ConfigError, before any request."""
    from stellarlab.download.command import download

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="download", overrides=["data=galah", f"paths.root_dir={env.tmp}", "download.dry_run=true", *overrides])
    message = raised(ConfigError, download, cfg)
    assert not any(env.tmp.iterdir())
    return message


DOWNLOAD_CASES = [
    ("download workers not a number", "download.workers=abc", r"download\.workers=abc is not valid: it must be an integer >= 1",
     r"e\.g\. download\.workers=4"),
    ("download max_stars not a number", "download.max_stars=abc", r"download\.max_stars=abc is not valid: it must be an integer >= 1",
     r"or null; e\.g\. download\.max_stars=5000 \(null: all stars\)"),
    ("download timeout of nan", "download.timeout=nan", r"download\.timeout=nan is not valid: it must be a number > 0",
     r"e\.g\. download\.timeout=60\.0 \(seconds\)"),
    ("download retries not an integer", "download.retries=1.5", r"download\.retries=1\.5 is not valid: it must be an integer >= 0",
     r"e\.g\. download\.retries=5"),
    ("download verify neither true nor false", "download.verify=maybe", r"download\.verify=maybe is not valid: it must be true or false",
     r"e\.g\. download\.verify=true"),
]
for _name, _override, _problem, _fix in DOWNLOAD_CASES:
    case(_name, _problem, _fix)(lambda env, o=_override: download_error(env, o))


# -- module-wide files ----------------------------------------------------------------------------
CHECKPOINT_RUN = ("model=linear", "data.n_stars=150", "data.batch_size=16")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Small APOGEE catalogues and galah4 arrays, a survey cache, and (on first use) a trained checkpoint."""
    root = tmp_path_factory.mktemp("error-files")
    apogee = root / "apogee"
    cols, _ = make_catalog(12, seed=3)
    write_allstar(apogee / "allStar.fits", cols)
    for name in ("TEFF", "LOGG", "FE_H"):
        cols[name][:] = np.nan
    write_allstar(apogee / "allStar-no-labels.fits", cols)
    (apogee / "aspcapStar").mkdir()

    rng = np.random.default_rng(0)
    galah4 = root / "galah4"
    galah4.mkdir()
    np.save(galah4 / "spectra.npy", (1.0 - 0.1 * rng.random((30, GALAH4_PIXELS))).astype(np.float32))
    labels = np.column_stack([rng.uniform(0.8, 2, 30), rng.uniform(1, 12, 30), rng.uniform(1, 50, 30), rng.uniform(100, 3000, 30),
                              rng.uniform(4000, 6500, 30), rng.uniform(1, 4.8, 30), rng.uniform(-1.5, 0.4, 30), rng.uniform(20, 200, 30)])
    np.save(galah4 / "labels.npy", labels.astype(np.float32))

    checkpoint: list[Path] = []

    def trained_checkpoint() -> Path:
        """A tiny linear model trained once through train.main (the run the eval cases re-test)."""
        if not checkpoint:
            run = root / "trained"
            cfg = compose_config([*TINY, *CHECKPOINT_RUN, "trainer.max_epochs=1", "test=false", "~logger",
                                  "~callbacks.figures", "~callbacks.lr_monitor", "~callbacks.early_stopping"],
                                 tmp_path=run, cache_dir=root / "cache")
            train_script.main(cfg)
            checkpoint.append(next((run / "run" / "checkpoints").glob("best-*.ckpt")))
        return checkpoint[0]

    return {"apogee": apogee, "galah4": galah4, "cache": root / "cache", "checkpoint": trained_checkpoint}


# -- the tests ------------------------------------------------------------------------------------
def test_the_catalogue_has_at_least_30_distinct_cases():
    assert len(CASES) >= 30
    assert len({problem for _, problem, _ in CASES.values()}) == len(CASES)  # no case checks the same message twice


def slow_case(fn: Callable[[Env], str]) -> bool:
    """A case that starts a subprocess or trains a model (on first use of the checkpoint) is in the slow tier."""
    source = inspect.getsource(fn)
    return any(call in source for call in ("run_cli(", "run_eval(", "subprocess.", "files['checkpoint']", 'files["checkpoint"]'))


@pytest.mark.filterwarnings("ignore:File may have been truncated")
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if slow_case(c[0]) else n for n, c in CASES.items()])
def test_bad_input_gives_a_message_naming_problem_and_fix(name, tmp_path, capsys, files):
    run, problem, fix = CASES[name]
    message = run(Env(tmp_path, capsys, files))
    assert "Traceback" not in message
    assert re.search(problem, message, re.S), f"problem not named: {message!r}"
    assert re.search(fix, message, re.S), f"fix not named: {message!r}"
