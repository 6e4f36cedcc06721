"""The notebook API (`stellarlab.train`, `stellarlab.load`, `stellarlab.load_runs`) and the MLflow and W&B loggers.

One tiny run through the API with TensorBoard and MLflow serves most tests: its summary is its metrics.json,
MLflow holds the HPARAMS tab's params and metrics (read back with MLflow's own client), the loaded model
predicts what the test wrote to test_predictions.csv, and `load_runs` tabulates it."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

import stellarlab
from stellarlab.errors import ConfigError, DataError
from tests.conftest import TINY, compose_config

FAST_RUN = [*TINY, "trainer.max_epochs=3", "bootstrap.n_resamples=50"]


def paths(tmp: Path, cache: Path) -> list[str]:
    return [f"paths.log_dir={tmp / 'out'}", f"paths.cache_dir={cache}"]


@pytest.fixture(scope="module")
def api_run(tmp_path_factory, survey_cache):
    """stellarlab.train with TensorBoard and MLflow; the allocator must not be touched by an API call."""
    from stellarlab.run import allocator

    tmp = tmp_path_factory.mktemp("api")
    overrides = [*FAST_RUN, "logger=[tensorboard,mlflow]", *paths(tmp, survey_cache)]
    handlers = logging.getLogger().handlers[:]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(allocator, "keep_freed_blocks", lambda *_: pytest.fail("the API applied malloc_keep_block_mb"))
        summary = stellarlab.train(overrides)
    assert logging.getLogger().handlers == handlers  # the run's log file is not the caller's afterwards
    return {"summary": summary, "overrides": overrides, "tmp": tmp, "cache": survey_cache}


@pytest.mark.slow
def test_train_runs_one_job_as_the_command_does_and_returns_its_summary(api_run):
    summary, run_dir = api_run["summary"], Path(api_run["summary"]["run_dir"])
    assert summary["status"] == "ok"
    assert run_dir.parent == api_run["tmp"] / "out" / "train" / "runs"
    assert json.loads((run_dir / "metrics.json").read_text()) == json.loads(json.dumps(summary))
    assert [str(o) for o in OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")] == api_run["overrides"]
    assert (run_dir / "train.log").stat().st_size > 0 and (run_dir / "tensorboard").is_dir()
    assert Path(summary["best_checkpoint"]).is_file()


@pytest.mark.slow
def test_mlflow_holds_the_hparams_tab_params_and_final_metrics(api_run, monkeypatch):
    from mlflow.tracking import MlflowClient

    from stellarlab.results.hparams import hparam_metric_names, hparams_from_config, summary_metrics

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    summary = api_run["summary"]
    client = MlflowClient(f"file:{api_run['tmp'] / 'out' / 'mlruns'}")
    experiment = client.get_experiment_by_name("train")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["run_dir"] == summary["run_dir"]

    cfg = compose_config(api_run["overrides"])
    expected = hparams_from_config(cfg, summary["n_parameters"])
    assert {k: run.data.params[k] for k in expected} == {k: str(v) for k, v in expected.items()}
    wanted = hparam_metric_names(summary["label_names"], intervals=True)
    final = summary_metrics(summary)
    assert set(wanted) <= set(run.data.metrics)
    for name in wanted:
        assert run.data.metrics[name] == pytest.approx(final[name], rel=1e-5), name


@pytest.mark.slow
def test_the_loaded_model_predicts_what_the_test_wrote(api_run):
    import hydra

    summary = api_run["summary"]
    model = stellarlab.load(summary["best_checkpoint"])
    cfg = compose_config(api_run["overrides"], tmp_path=api_run["tmp"] / "compose", cache_dir=api_run["cache"])
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("test")
    arrays = datamodule.split_arrays("test")
    flux, weight = np.asarray(arrays["flux"]), np.asarray(arrays["weight"])
    predicted = model.predict(flux, weight)
    with open(Path(summary["run_dir"]) / "test_predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(flux) and sorted(predicted) == sorted(summary["label_names"])
    for label in summary["label_names"]:
        np.testing.assert_allclose(predicted[label], [float(r[f"{label}_pred"]) for r in rows], rtol=1e-4, atol=1e-4)
    one = model.predict(flux[0])  # a single spectrum: one value per label
    assert one == pytest.approx({k: v[0] for k, v in predicted.items()}, rel=1e-5)
    holes = flux[:2].copy()
    holes[:, :50] = np.nan  # NaN pixels read as pixels without data
    masked = weight[:2].copy()
    masked[:, :50] = 0
    for label, values in model.predict(holes).items():
        np.testing.assert_allclose(values, model.predict(flux[:2], masked)[label], rtol=1e-6)
    with pytest.raises(DataError, match=r"flux has shape \[2, 10\]; this model reads \(N, 8575\)"):
        model.predict(np.ones((2, 10)))


@pytest.mark.slow
def test_load_runs_is_the_comparison_table(api_run):
    summary = api_run["summary"]
    table = stellarlab.load_runs(api_run["tmp"] / "out" / "train")
    assert len(table) == 1 and table["status"][0] == "ok" and table["run_dir"][0] == summary["run_dir"]
    assert table["test/rmse_teff"][0] == pytest.approx(summary["test"]["teff"]["rmse"])
    assert table["test/rmse_lo_teff"][0] == pytest.approx(summary["test"]["teff"]["rmse_ci"][0])
    assert "data.n_stars=600" in table["overrides"][0]
    pd = pytest.importorskip("pandas")
    assert isinstance(table.to_pandas(), pd.DataFrame)


@pytest.mark.slow
def test_wandb_records_the_same_params_and_metrics_offline(tmp_path, survey_cache):
    pytest.importorskip("wandb")
    # two runs in one process, as a sweep's jobs: each run's records are complete when its training returns
    for seed in (0, 1):
        summary = stellarlab.train([*FAST_RUN, "logger=wandb", f"seed={seed}", *paths(tmp_path, survey_cache)])
        (records,) = Path(summary["run_dir"]).glob("wandb/offline-run-*/run-*.wandb")  # offline, in the run folder
        data = records.read_bytes()
        for name in ("optimizer/lr", "model/hidden_sizes", "val/loss_best", "test/rmse_teff", "test/rmse_lo_teff",
                     "time/train_seconds"):
            assert name.encode() in data, (seed, name)


def test_the_api_raises_the_one_line_errors_instead_of_exiting(tmp_path):
    with pytest.raises(ConfigError, match=r"optimizer.lr=-1 is not valid"):
        stellarlab.train([*TINY, "optimizer.lr=-1", *paths(tmp_path, tmp_path / "cache")])
    assert not list(tmp_path.rglob("metrics.json"))
    with pytest.raises(ConfigError, match="a list of overrides"):
        stellarlab.train("model=cnn")
    with pytest.raises(ConfigError, match="run sweeps with the command"):
        stellarlab.train(["-m", "model=linear,mlp"])
    with pytest.raises(ConfigError, match="runs one job"):
        stellarlab.train(["hparams_search=optuna", *paths(tmp_path, tmp_path / "cache")])
    with pytest.raises(ConfigError, match="no such file"):
        stellarlab.load(tmp_path / "missing.ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no runs under"):
        stellarlab.load_runs(tmp_path / "empty")
    with pytest.raises(ConfigError, match="is not a folder"):
        stellarlab.load_runs(tmp_path / "nowhere")
