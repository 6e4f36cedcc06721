"""No confident output from nothing: what a model logs is known before training, damaged checkpoints are
refused, predictions outside the training range are flagged, and a run that tested nothing says so."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import train as train_script
from stellarlab.data import SpectraArrays
from stellarlab.errors import DataError
from stellarlab.models import LinearRegressor, MLPRegressor
from stellarlab.models.base import EPOCHS_METRIC
from stellarlab.models.checksum import CHECKSUM_KEY, weights_checksum
from stellarlab.models.knn import KNNRegressor
from stellarlab.models.ridge import RidgeRegressor
from stellarlab.results.predict_block import outside_training_range, report_outside
from stellarlab.results.prediction import load_model, read_checkpoint
from stellarlab.results.summary import summary_problem
from tests.conftest import CONF_DIR, TINY, compose_config
from tests.test_datamodule import ArraysDataModule

LABELS = ["teff", "logg"]


def small_survey(n: int = 120, p: int = 30) -> SpectraArrays:
    rng = np.random.default_rng(0)
    labels = np.column_stack([rng.uniform(4000, 6000, n), rng.uniform(1, 5, n)]).astype(np.float32)
    flux = (1 - 0.1 * rng.random((n, p))).astype(np.float32)
    return SpectraArrays(flux, np.ones((n, p), np.float32), labels, LABELS, np.arange(n), np.linspace(15100, 17000, p))


# -- optimized_metric: each model says what it logs ----------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("cls, kwargs", [
    (MLPRegressor, {"hidden_sizes": [8]}), (LinearRegressor, {"loss": "gaussian_nll"}),
    (RidgeRegressor, {"alpha": [0.1, 1.0]}), (KNNRegressor, {"k": [1, 2]}),
], ids=["mlp", "linear-gaussian_nll", "ridge", "knn"])
def test_logged_metrics_names_exactly_what_a_fit_logs(cls, kwargs):
    dm = ArraysDataModule(small_survey(), labels=LABELS, split=[0.5, 0.25, 0.25], batch_size=20)
    dm.setup()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(cls(**dm.model_spec(), **kwargs), datamodule=dm)
    assert set(trainer.callback_metrics) - {EPOCHS_METRIC} == set(cls.logged_metrics(LABELS, kwargs))


# -- checksums ---------------------------------------------------------------------------------------
def saved_checkpoint(tmp_path: Path, model, stamped: bool = True) -> Path:
    """A checkpoint laid out as Lightning writes it, the model's own on_save_checkpoint filling in its part."""
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                  "pytorch-lightning_version": pl.__version__, "epoch": 0, "global_step": 0}
    model.on_save_checkpoint(checkpoint)
    if not stamped:  # as stellarlab wrote them before checksums
        del checkpoint["stellarlab"][CHECKSUM_KEY]
    path = tmp_path / "model.ckpt"
    torch.save(checkpoint, path)
    return path


def linear_model(**kwargs) -> LinearRegressor:
    torch.manual_seed(0)
    return LinearRegressor(64, LABELS, label_mean=[5000.0, 3.0], label_std=[500.0, 1.0], **kwargs)


def test_the_checksum_covers_every_weight_byte_and_nothing_else():
    model = linear_model()
    state = model.state_dict()
    digest = weights_checksum(state)
    assert digest == weights_checksum({k: v.clone() for k, v in reversed(state.items())})  # order and copies do not matter
    flipped = {k: v.clone() for k, v in state.items()}
    flipped["net.weight"].view(-1).view(torch.int32)[7] ^= 1  # one bit of one float
    assert weights_checksum(flipped) != digest
    assert weights_checksum({**state, "net.bias": state["net.bias"].double()}) != digest  # the dtype counts


def test_a_checkpoint_whose_weights_changed_after_saving_is_refused(tmp_path):
    path = saved_checkpoint(tmp_path, linear_model())
    assert read_checkpoint(path)["stellarlab"][CHECKSUM_KEY] == weights_checksum(linear_model().state_dict())
    model, _ = load_model(path)
    torch.testing.assert_close(model.net.weight, linear_model().net.weight)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["state_dict"]["net.bias"][0] += 1e-3  # what a flipped byte does, in a file that still unpickles
    torch.save(checkpoint, path)
    with pytest.raises(DataError, match=r"^checkpoint .*model\.ckpt is damaged: its weights do not match their checksum; "
                                        r"copy it again from where it was trained, or use another checkpoint of the run"):
        load_model(path)


def test_a_checkpoint_from_before_checksums_loads_with_a_warning(tmp_path, caplog):
    path = saved_checkpoint(tmp_path, linear_model(), stamped=False)
    with caplog.at_level(logging.WARNING):
        model, _ = load_model(path)
    assert f"checkpoint {path} carries no checksum of its weights" in caplog.text
    torch.testing.assert_close(model.net.weight, linear_model().net.weight)


# -- predictions outside the training range ----------------------------------------------------------
def test_predictions_outside_the_widened_training_range_are_flagged():
    model = linear_model(label_min=[4000.0, 1.0], label_max=[6000.0, 5.0])
    labels = np.array([[5000, 3], [6300, 3], [6500, 3], [-3.9e33, 3], [np.nan, 3], [5000, 0.1]])
    outside = outside_training_range(model, labels, tolerance=0.2)  # teff [3600, 6400], logg [0.2, 5.8]
    assert outside.tolist() == [[False, False], [False, False], [True, False], [True, False], [True, False], [False, True]]
    assert report_outside(LABELS, outside, 0.2) == (
        "4 of 6 spectra have a prediction outside the training labels' range widened by 0.2 of its width "
        "(teff: 3, logg: 1); their rows have <label>_outside=True: do not trust those values")
    assert report_outside(LABELS, outside[:2], 0.2) is None
    from stellarlab.data.surveys import CATALOG_NAMES
    from stellarlab.results.catalog import build_table

    values = {"teff": labels[:, 0], "teff_outside": outside[:, 0], "logg": labels[:, 1], "logg_outside": outside[:, 1]}
    table = build_table({"id": np.arange(6).astype(str)}, values, LABELS, CATALOG_NAMES["apogee"])
    assert table.colnames == ["ID", "TEFF", "TEFF_OUTSIDE", "LOGG", "LOGG_OUTSIDE"]
    assert list(table["TEFF_OUTSIDE"]) == [False, False, True, True, True, False]


def test_a_checkpoint_without_a_saved_range_flags_outside_three_sigma(caplog):
    model = linear_model()  # label_mean 5000 +- 500, logg 3 +- 1: range [3500, 6500], [0, 6]
    with caplog.at_level(logging.WARNING):
        outside = outside_training_range(model, np.array([[6500.0, 3.0], [6501.0, 6.1]]), tolerance=0.0)
    assert outside.tolist() == [[False, False], [True, True]]
    assert "predates saved training ranges" in caplog.text


def test_the_training_range_travels_with_the_model(tmp_path):
    dm = ArraysDataModule(small_survey(), labels=LABELS, split=[0.5, 0.25, 0.25], batch_size=20)
    dm.setup()
    train = dm.tensors["train"]["labels_phys"].numpy()
    spec = dm.model_spec()
    assert spec["label_min"] == pytest.approx(train.min(0).tolist()) and spec["label_max"] == pytest.approx(train.max(0).tolist())
    model, _ = load_model(saved_checkpoint(tmp_path, LinearRegressor(**spec)))
    assert model.training_range() == (spec["label_min"], spec["label_max"], True)


# -- predict.py's settings ----------------------------------------------------------------------------
def predict_config(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="predict", overrides=["ckpt_path=x.ckpt", "input=x.npy", *overrides])


def test_predict_takes_trains_key_names_and_still_the_old_ones(caplog):
    from stellarlab.run.validation import predict_settings

    assert predict_settings(predict_config()) == ("cpu", 1024, 0.2)
    assert predict_settings(predict_config("trainer.accelerator=cpu", "data.eval_batch_size=8")) == ("cpu", 8, 0.2)
    with caplog.at_level(logging.WARNING):
        assert predict_settings(predict_config("accelerator=cpu", "batch_size=7", "outside_tolerance=0")) == ("cpu", 7, 0.0)
    assert "accelerator= is deprecated: use trainer.accelerator=cpu" in caplog.text
    assert "batch_size= is deprecated: use data.eval_batch_size=7" in caplog.text


# -- train.py ------------------------------------------------------------------------------------------
QUICK = [*TINY, "model=linear", "trainer.max_epochs=2", "~logger", "~callbacks.figures", "~callbacks.lr_monitor",
         "bootstrap.n_resamples=0"]


@pytest.mark.slow
def test_an_empty_test_split_is_said_and_recorded(tmp_path, survey_cache, caplog):
    cfg = compose_config([*QUICK, "data.split=[0.5,0.5,0]"], tmp_path=tmp_path, cache_dir=survey_cache)
    with caplog.at_level(logging.WARNING):
        train_script.main(cfg)
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    reason = "the test split is empty (data.split=[0.5,0.5,0]): no test metrics"
    assert record["test"] is None and record["test_skipped"] == reason and "test_loss" not in record
    assert summary_problem(record) is None
    assert f"{reason}; give data.split a test part to test the model" in caplog.text


@pytest.mark.slow
def test_resuming_from_a_damaged_last_checkpoint_is_refused(tmp_path, survey_cache, capsys):
    cfg = compose_config(QUICK, tmp_path=tmp_path, cache_dir=survey_cache)
    train_script.main(cfg)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    checkpoint["state_dict"]["net.weight"][0, 0] += 1.0
    torch.save(checkpoint, last)
    (tmp_path / "run" / "metrics.json").unlink()  # as if the run had been interrupted
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train_script.main(compose_config([*QUICK, "trainer.max_epochs=3"], tmp_path=tmp_path, cache_dir=survey_cache))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: checkpoint {last} is damaged: its weights do not match their checksum; move it away to start this "
        "run over (or resume from a copy)")
    assert not (tmp_path / "run" / "metrics.json").exists()
