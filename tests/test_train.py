"""End to end through train.py's entry point on a tiny synthetic survey (CPU, seconds per run)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train as train_script
from stellarlab.models import MLPRegressor
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

LABELS = ["teff", "logg", "fe_h"]


def run(cfg) -> tuple[float, dict]:
    best = train_script.main(cfg)  # the @hydra.main function, given a composed config
    return best, json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())


@pytest.mark.parametrize(
    "model, overrides",
    [
        ("linear", ["optimizer.lr=3e-3"]),
        ("mlp", []),
        ("cnn", []),
    ],
)
def test_each_model_beats_the_mean_predictor_on_every_label(model, overrides, tiny_cfg):
    best, metrics = run(tiny_cfg(f"model={model}", *overrides))
    assert isinstance(best, float) and math.isfinite(best)
    assert best == pytest.approx(metrics["best_val_loss"])
    for label in LABELS:
        m = metrics["test"][label]
        assert m["n"] == 90
        # a clear margin: at most half the RMSE of always predicting the training mean
        assert m["rmse"] < 0.5 * m["rmse_mean_predictor"], (label, m)


def test_same_seed_same_metrics_and_other_seed_differs(tiny_cfg):
    quick = ["model=mlp", "trainer.max_epochs=3"]
    _, a = run(tiny_cfg(*quick, "seed=0"))
    _, b = run(tiny_cfg(*quick, "seed=0", run_name="b"))
    _, c = run(tiny_cfg(*quick, "seed=1", run_name="c"))
    assert a["test"] == b["test"]
    assert a["split_sizes"] == c["split_sizes"]
    assert a["test"]["teff"]["rmse"] != c["test"]["teff"]["rmse"]


def test_run_folder_holds_metrics_checkpoints_and_tensorboard(tiny_cfg):
    cfg = tiny_cfg("model=linear", "trainer.max_epochs=4", "tags=[baseline,night-2]")
    _, metrics = run(cfg)
    out = Path(cfg.paths.output_dir)
    assert set(metrics["test"]) == set(LABELS)
    assert metrics["tags"] == ["baseline", "night-2"]
    assert metrics["split_sizes"] == {"train": 420, "val": 90, "test": 90}
    assert (out / "checkpoints" / "last.ckpt").exists()
    assert Path(metrics["best_checkpoint"]).exists()
    assert (out / "figures" / "test_pred_vs_true.png").stat().st_size > 10_000
    assert (out / "figures" / "examples_spectra.png").stat().st_size > 10_000

    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = set(tags["scalars"])
    expected = {"train/loss_epoch", "val/loss", "val/loss_best", "test/loss"}
    expected |= {f"{stage}/{m}_{label}" for stage in ("val", "test") for m in ("rmse", "mae", "bias", "mad_std") for label in LABELS}
    assert expected <= scalars, expected - scalars
    assert {"examples/spectra", "test/pred_vs_true"} <= set(tags["images"])
    # HPARAMS tab: the config plus the metric tags, whose last values are the real final metrics
    hparams = acc.summary_metadata["_hparams_/session_start_info"]
    assert hparams.plugin_data.plugin_name == "hparams"
    assert b"optimizer/lr" in hparams.plugin_data.content and b"model/name" in hparams.plugin_data.content
    assert b"baseline,night-2" in hparams.plugin_data.content  # the tags, as one HPARAMS column
    experiment = acc.summary_metadata["_hparams_/experiment"].plugin_data.content
    assert b"test/rmse_teff" in experiment and b"val/loss_best" in experiment
    final = acc.Scalars("test/rmse_teff")[-1].value
    assert final == pytest.approx(metrics["test"]["teff"]["rmse"], rel=1e-5)
    assert acc.Scalars("val/loss_best")[-1].value == pytest.approx(metrics["best_val_loss"], rel=1e-5)


def test_checkpoint_carries_label_scaling_and_predicts_alone(tiny_cfg):
    cfg = tiny_cfg("model=mlp", "trainer.max_epochs=2")
    _, metrics = run(cfg)
    model = MLPRegressor.load_from_checkpoint(metrics["best_checkpoint"], weights_only=True)
    assert model.label_names == LABELS
    ckpt = torch.load(metrics["best_checkpoint"], weights_only=True)
    assert ckpt["state_dict"]["wavelength"].shape == (8575,)
    assert ckpt["state_dict"]["wavelength"][0] == pytest.approx(15100.8, abs=0.02)
    assert ckpt["hyper_parameters"]["label_std"][0] > 100  # Teff scale in K, fitted on the training split


def test_two_runs_started_together_get_their_own_folders(tmp_path):
    cmd = [sys.executable, "train.py", "debug=fdr", f"paths.log_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}", "data.n_stars=200"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        assert "💡 Tip" not in out + err  # Lightning's adverts are filtered from the console
        assert "raised" not in err, err[-2000:]  # every Hydra callback ran cleanly
    runs = sorted((tmp_path / "debug" / "runs").iterdir())  # debug runs have their own task folder
    assert len(runs) == 2
    for run_dir in runs:
        assert (run_dir / "metrics.json").exists()
        assert (run_dir / ".hydra" / "config.yaml").exists()
        log_text = (run_dir / "debug.log").read_text(encoding="utf-8")
        assert "Seed set to 0" in log_text and "💡 Tip" not in log_text


def test_a_diverging_run_stops_with_a_clear_error_instead_of_training_on_nan(tiny_cfg):
    from stellarlab.errors import TrainingError

    cfg = tiny_cfg("model=mlp", "optimizer=sgd", "optimizer.lr=1e8", "trainer.max_epochs=3")
    with pytest.raises(TrainingError, match=r"training loss became (nan|inf).*lower optimizer.lr"):
        train_script.train(cfg)
    assert not (Path(cfg.paths.output_dir) / "metrics.json").exists()
