"""Each rule of a model's or DataModule's arguments has one owner: the class, in its `__init__` annotations.

The pre-flight config check (`validate_train_config`) and the constructor called from plain Python apply
the same rule with the same message, and a model added from outside stellarlab (tests/plugins: one
module, one YAML file) is trained and checked like the built-in ones without touching stellarlab.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

import pytest
from omegaconf import OmegaConf

from stellarlab.checks import Number, argument_rules, check_arguments
from stellarlab.data.base import SpectraArrays, SpectraDataModule
from stellarlab.data.split import PlannedSize
from stellarlab.data.synthetic import SyntheticDataModule
from stellarlab.errors import ConfigError
from stellarlab.models import CNNRegressor, MLPRegressor
from stellarlab.models.knn import KNNRegressor
from stellarlab.models.ridge import RidgeRegressor
from stellarlab.run.validation import validate_train_config
from tests.conftest import ROOT, TINY, compose_config
from tests.plugins.tiny_model import TinyRegressor

PLUGINS = ROOT / "tests" / "plugins"
LABELS = ["teff", "logg", "fe_h"]


PLUGIN = [f"hydra.searchpath=[file://{PLUGINS}]", "model=tiny"]


def preflight_error(tmp_path: Path, *overrides: str) -> str:
    """The message `validate_train_config` refuses the composed config with."""
    cfg = compose_config([*TINY, *overrides], tmp_path=tmp_path)
    with pytest.raises(ConfigError) as info:
        validate_train_config(cfg)
    return str(info.value)


def constructor_error(build: Callable[[], Any]) -> str:
    with pytest.raises(ConfigError) as info:
        build()
    return str(info.value)


# (overrides, the same value given to the constructor in Python, the message's start)
SAME_RULE = [
    (["model.dropout=1.5"], lambda: MLPRegressor(64, LABELS, dropout=1.5), "model.dropout=1.5 is not valid: it must be a number >= 0 and < 1"),
    (["model.hidden_sizes=[256,0]"], lambda: MLPRegressor(64, LABELS, hidden_sizes=[256, 0]), "model.hidden_sizes=[256,0] is not valid"),
    (["model.activation=rleu"], lambda: MLPRegressor(64, LABELS, activation="rleu"), "unknown activation 'rleu' (model.activation)"),
    (["model.loss=l1"], lambda: MLPRegressor(64, LABELS, loss="l1"), "model.loss=l1 is not valid; valid values: mse, gaussian_nll"),
    (["model=cnn", "model.channels=[8,16]"], lambda: CNNRegressor(64, LABELS, channels=[8, 16]),
     "model.channels, model.kernel_sizes and model.pool_sizes need one entry per conv block; got 2 for model.channels"),
    (["model=knn", "model.k=[4,2.5]"], lambda: KNNRegressor(64, LABELS, k=[4, 2.5]), "model.k=[4,2.5] is not valid"),
    (["model=knn", "+model.loss=gaussian_nll"], lambda: KNNRegressor(64, LABELS, loss="gaussian_nll"),
     "KNNRegressor fits the labels' means only"),
    (["model=ridge", "model.alpha=[1,0]"], lambda: RidgeRegressor(64, LABELS, alpha=[1, 0]), "model.alpha=[1,0] is not valid"),
    (["data.batch_size=0"], lambda: SyntheticDataModule(batch_size=0), "data.batch_size=0 is not valid: it must be an integer >= 1"),
    (["data.n_stars=30.0"], lambda: SyntheticDataModule(n_stars=30.0), "data.n_stars=30.0 is not valid: it must be an integer >= 1"),
    (["data.snr=[200,30]"], lambda: SyntheticDataModule(snr=[200, 30]), "data.snr=[200,30] is not valid: a range must be"),
    (["data.labels=[teff,vsini]"], lambda: SyntheticDataModule(labels=["teff", "vsini"]), "data.labels=[teff,vsini]: the synthetic"),
    (["data.split=[0.9,0.1]"], lambda: SyntheticDataModule(split=[0.9, 0.1]), "data.split=[0.9,0.1] is not valid: it must have 3"),
    (["data.in_memory=sometimes"], lambda: SyntheticDataModule(in_memory="sometimes"), "data.in_memory must be auto, true or false"),
]


@pytest.mark.parametrize("overrides, build, start", SAME_RULE, ids=[" ".join(o) for o, _, _ in SAME_RULE])
def test_one_rule_refuses_a_value_in_the_config_and_in_the_constructor_alike(tmp_path, overrides, build, start):
    message = preflight_error(tmp_path, *overrides)
    assert message.startswith(start), message
    assert constructor_error(build) == message


def test_a_plugin_model_brings_its_rule_to_the_config_check_and_to_its_constructor(tmp_path):
    message = preflight_error(tmp_path, *PLUGIN, "model.width=0")
    assert message == "model.width=0 is not valid: it must be an integer >= 1; e.g. model.width=16"
    assert constructor_error(lambda: TinyRegressor(64, LABELS, width=0)) == message
    assert constructor_error(lambda: TinyRegressor(64, LABELS, width=2, nll_beta=2)).startswith("model.nll_beta=2 is not valid")
    # the base's rules are inherited; an unknown key is named with the plugin's own options
    assert {"width", "loss", "nll_beta"} <= set(argument_rules(TinyRegressor))
    unknown = preflight_error(tmp_path, *PLUGIN, "+model.widht=3")
    assert "did you mean model.width?" in unknown and "tests.plugins.tiny_model.TinyRegressor" in unknown


def test_values_that_mean_something_special_are_accepted(tmp_path):
    for overrides in (["data.eval_batch_size=null"], ["trainer.max_epochs=-1"], ["model=knn", "model.k=3"], ["model=knn", "model.k=[1,3]"],
                      ["model=ridge", "model.alpha=0.5"], ["data.snr=[30,200]"], ["data.in_memory=false"]):
        validate_train_config(compose_config([*TINY, *overrides], tmp_path=tmp_path))
    dm = SyntheticDataModule(batch_size=16, eval_batch_size=None, n_stars=50)
    assert dm.eval_batch_size == 16
    assert KNNRegressor(8, LABELS, k=3).k_candidates == [3]


def test_checking_in_the_constructor_keeps_every_argument_in_the_hyperparameters():
    """The check runs in `__new__`: a wrapper around `__init__` would hide the subclass's frame from
    Lightning's `save_hyperparameters`, and checkpoints would lose those arguments."""
    model = TinyRegressor(64, LABELS, width=4, loss="gaussian_nll")
    assert {k: model.hparams[k] for k in ("width", "loss", "n_pixels")} == {"width": 4, "loss": "gaussian_nll", "n_pixels": 64}
    assert MLPRegressor(64, LABELS, dropout=0.25).hparams["dropout"] == 0.25


class FortyStars(SpectraDataModule):
    """A survey that knows its size from its arguments: the config check tests split and batch against it."""

    def __init__(self, stars: Annotated[int, Number(minimum=1, integer=True, example="data.stars=40")] = 40, **kwargs):
        super().__init__(**kwargs)
        self.stars = stars

    @classmethod
    def planned_size(cls, values: Mapping[str, Any]) -> PlannedSize:
        return PlannedSize(int(values.get("stars", 40)), 1, "data.stars")

    def load_arrays(self) -> SpectraArrays:  # pragma: no cover - never set up here
        raise NotImplementedError


def test_the_survey_size_check_asks_the_data_module_not_its_name():
    node = OmegaConf.create({"_target_": f"{__name__}.FortyStars", "stars": 40, "split": [0.5, 0.25, 0.25], "batch_size": 20})
    check_arguments(FortyStars, node, "data")
    cfg = OmegaConf.create({"data": node, "seed": 0})
    validate_train_config(cfg)
    cfg.data.batch_size = 21
    with pytest.raises(ConfigError, match=r"data\.batch_size=21 is larger than the training set \(20 spectra from data\.stars=40"):
        validate_train_config(cfg)
    cfg.data.batch_size, cfg.data.stars = 8, 0
    with pytest.raises(ConfigError, match=r"^data\.stars=0 is not valid: it must be an integer >= 1; e\.g\. data\.stars=40$"):
        validate_train_config(cfg)


def test_validation_names_no_model_or_data_module():
    source = (ROOT / "stellarlab" / "run" / "validation.py").read_text()
    assert len(source.splitlines()) < 500
    for name in ("SyntheticDataModule", "MLPRegressor", "dropout", "hidden_sizes", "n_stars", "isinstance(data"):
        assert name not in source, name


# -- through train.py, as a user adds a model ------------------------------------------------------
def run_train(*overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("STELLARLAB_ROOT", None)
    argv = [sys.executable, "train.py", *PLUGIN, *overrides]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_model_added_as_a_module_and_a_yaml_file_trains_through_train_py(tmp_path, survey_cache):
    proc = run_train("debug=fdr", f"paths.log_dir={tmp_path}", f"paths.cache_dir={survey_cache}", "data.n_stars=600")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (metrics_file,) = tmp_path.rglob("metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["status"] == "ok"


@pytest.mark.slow
def test_a_plugin_models_rule_answers_on_the_command_line(tmp_path):
    proc = run_train("model.width=0", f"paths.log_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}", "data.n_stars=600")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: model.width=0 is not valid"), proc.stderr[-3000:]
    assert not list(tmp_path.rglob("metrics.json"))


@pytest.mark.slow
def test_a_bad_optimizer_value_is_answered_without_importing_torch():
    code = (
        "import sys\n"
        "from tests.conftest import compose_config\n"
        "from stellarlab.run.validation import validate_train_config\n"
        "import tempfile, pathlib\n"
        "cfg = compose_config(['optimizer.lr=-1'], tmp_path=pathlib.Path(tempfile.mkdtemp()))\n"
        "try:\n"
        "    validate_train_config(cfg)\n"
        "except Exception as err:\n"
        "    print(err)\n"
        "print('torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["optimizer.lr=-1 is not valid: it must be a number > 0; e.g. optimizer.lr=1e-3", "False"]
