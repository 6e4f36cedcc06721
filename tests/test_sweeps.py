"""Multiruns that survive failing jobs: the submitit local launcher, Optuna studies (failures, budget, resume),
the Slurm launcher's batch script, and a failed job's record. Tiny synthetic survey, CPU."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import hydra
import optuna
import pytest
import submitit.slurm.slurm
from hydra.core.hydra_config import HydraConfig
from hydra.core.plugins import Plugins
from hydra.types import HydraContext
from omegaconf import OmegaConf, open_dict, read_write
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train as train_script
from stellarlab.results.compare import collect_runs, compare
from tests.conftest import ROOT, TINY, compose_config

FAST = [*TINY, "trainer.max_epochs=2"]
# Optuna test space: only the learning rate varies; the rest of hparams_search=optuna's space is fixed.
FIXED_SPACE = ["optimizer=sgd", "optimizer.weight_decay=0", "model.dropout=0", "model.hidden_sizes=[32]"]


def run_train(args: list[str], tmp_path: Path, cache: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    flags = [a for a in args if a.startswith("-")]  # -m must come before the overrides
    overrides = [a for a in args if not a.startswith("-")]
    cmd = [sys.executable, "train.py", *flags, *FAST, f"paths.log_dir={tmp_path / 'outputs'}", f"paths.cache_dir={cache}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def only_sweep(tmp_path: Path) -> Path:
    sweeps = sorted((tmp_path / "outputs" / "train" / "multiruns").iterdir())
    assert len(sweeps) == 1, sweeps
    return sweeps[0]


def read(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.slow
def test_multirun_with_the_default_folders_runs_from_any_folder(tmp_path, warm_cache):
    """`python train.py -m ...` as the README shows it: no paths.* given, so runs land under ./outputs of
    the folder it is run from (Hydra resolves the sweep folder before it can answer ${hydra:runtime.cwd})."""
    env = {k: v for k, v in os.environ.items() if k != "STELLARLAB_ROOT"}
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", *FAST, "trainer.max_epochs=1", "model=linear,mlp",
           f"paths.cache_dir={warm_cache}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = only_sweep(tmp_path)
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    assert [read(sweep / job / "metrics.json")["status"] for job in ("0", "1")] == ["ok", "ok"]


@pytest.mark.slow
def test_local_launcher_sweep_keeps_the_good_job_when_the_other_fails(tmp_path, warm_cache):
    proc = run_train(["-m", "launcher=local", "model=linear", "optimizer=sgd", "optimizer.lr=1e-3,1e9"], tmp_path, warm_cache)
    assert proc.returncode == 1, proc.stderr[-3000:]  # every job ran, but the sweep did not do all it was asked
    assert proc.stderr.strip().splitlines()[-1].startswith("error: 1 of 2 jobs of the sweep did not finish")
    sweep = only_sweep(tmp_path)
    assert len([p for p in (sweep / ".submitit").iterdir() if p.name != "%j"]) == 2  # two submitit jobs, two processes

    ok, failed = read(sweep / "0" / "metrics.json"), read(sweep / "1" / "metrics.json")
    assert ok["status"] == "ok" and ok["run_dir"] == str(sweep / "0")
    assert ok["bootstrap"] == {"n_resamples": 1000, "seed": 0, "level": 0.95}
    for label in ("teff", "logg", "fe_h"):
        m = ok["test"][label]
        for metric in ("rmse", "mae", "bias", "mad_std"):
            lo, hi = m[f"{metric}_ci"]
            assert lo <= m[metric] <= hi, (label, metric)
    assert failed["status"] == "failed" and failed["error"]["type"] == "TrainingError"
    assert "training loss became" in failed["error"]["message"] and failed["best_value"] is None
    assert (sweep / "1" / ".hydra" / "overrides.yaml").exists() and (sweep / "1" / "train.log").exists()

    summary = read(sweep / "summary.json")
    assert (summary["n_jobs"], summary["n_ok"], summary["n_failed"]) == (2, 1, 1)
    assert [(j["run"], j["status"]) for j in summary["jobs"]] == [("0", "ok"), ("1", "failed")]
    assert summary["jobs"][0]["best_value"] == ok["best_value"]
    assert "optimizer.lr=1000000000.0" in summary["jobs"][1]["overrides"]
    assert summary["jobs"][1]["error"].startswith("TrainingError: training loss became")
    assert "1 ok, 1 failed" in proc.stdout

    # compare: the right rows, and the same numbers under the same names as TensorBoard's HPARAMS tab
    compare(sweep)
    rows = list(csv.DictReader((sweep / "comparison.csv").open()))
    assert [(r["run"], r["status"]) for r in rows] == [("0", "ok"), ("1", "failed")]
    assert float(rows[0]["test/rmse_teff"]) == ok["test"]["teff"]["rmse"]
    assert float(rows[0]["test/rmse_lo_teff"]) == ok["test"]["teff"]["rmse_ci"][0]
    assert int(rows[0]["model/n_parameters"]) == ok["n_parameters"]
    acc = EventAccumulator(str(sweep / "0" / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    for tag in ("test/rmse_teff", "test/rmse_lo_teff", "test/rmse_hi_teff", "test/mad_std_lo_fe_h", "time/train_seconds"):
        assert acc.Scalars(tag)[-1].value == pytest.approx(float(rows[0][tag]), rel=1e-5), tag
    experiment = acc.summary_metadata["_hparams_/experiment"].plugin_data.content
    assert b"test/rmse_lo_teff" in experiment and b"time/train_seconds" in experiment
    assert (sweep / "comparison.png").stat().st_size > 10_000


@pytest.mark.slow
def test_optuna_study_goes_on_past_a_failing_trial_and_resumes_from_sqlite(tmp_path, warm_cache):
    db = tmp_path / "db" / "study.db"  # its folder does not exist yet: the sweep callback makes it
    study = ["hparams_search=optuna", *FIXED_SPACE, f"hydra.sweeper.storage=sqlite:///{db}", "hydra.sweeper.study_name=tiny"]
    # seed 2 proposes lr = 1e9, 1e-3, 3e-3: the first trial diverges, the study goes on (max_failure_rate=0.5)
    proc = run_train(
        [*study, "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.seed=2", "optimizer.lr=choice(1e-3,3e-3,1e9)"],
        tmp_path,
        warm_cache,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = only_sweep(tmp_path)
    runs = collect_runs(sweep)
    assert [r["run"] for r in runs] == ["0", "1", "2"]
    failed = [r for r in runs if r["status"] == "failed"]
    assert len(failed) == 1 and "optimizer.lr=1000000000.0" in failed[0]["overrides"]
    assert failed[0]["error"].startswith("TrainingError: training loss became")
    ok_values = [r["summary"]["best_value"] for r in runs if r["status"] == "ok"]
    assert len(ok_values) == 2
    # the objective is each run's best validation loss, and Optuna's best is the best of those
    for r in runs:
        if r["status"] == "ok":
            assert r["summary"]["best_value"] == r["summary"]["best_val_loss"]
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert best.best_value == pytest.approx(min(ok_values))
    assert read(sweep / "summary.json")["n_failed"] == 1

    loaded = optuna.load_study(study_name="tiny", storage=f"sqlite:///{db}")
    values = sorted(t.value for t in loaded.trials)
    assert len(values) == 3 and values[-1] == math.inf  # the failed trial: the worst value, not an aborted study
    assert values[0] == pytest.approx(min(ok_values))

    # the same command with the same storage and name adds trials to that study
    proc = run_train([*study, "hydra.sweeper.n_trials=1", "optimizer.lr=1e-3", "trainer.max_epochs=1"], tmp_path / "again", warm_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(optuna.load_study(study_name="tiny", storage=f"sqlite:///{db}").trials) == 4


def as_sweep_job(cfg, sweep_dir: Path, num: int):
    """Make `cfg` what job `num` of a multirun in `sweep_dir` gets from Hydra."""
    with read_write(cfg.hydra), open_dict(cfg.hydra), open_dict(cfg):
        cfg.hydra.mode = "MULTIRUN"
        cfg.hydra.job.num = num
        cfg.hydra.sweep.dir = str(sweep_dir)
        cfg.paths.output_dir = str(sweep_dir / str(num))
    HydraConfig.instance().set_config(cfg)
    return cfg


def test_failed_trials_get_the_worst_value_until_more_fail_than_max_failure_rate_allows(tiny_cfg, capsys):
    sweep = Path(tiny_cfg().paths.log_dir) / "study"
    # n_trials=4, max_failure_rate=0.5: two failed trials are tolerated, the third stops the study
    failing = ("hparams_search=optuna", "hydra.sweeper.n_trials=4", "model.activation=nope")
    for num in (0, 1):
        assert train_script.main(as_sweep_job(tiny_cfg(*failing), sweep, num)) == math.inf
    with pytest.raises(SystemExit) as stopped:  # the study ends with one line and exit 2
        train_script.main(as_sweep_job(tiny_cfg(*failing), sweep, 2))
    assert stopped.value.code == 2
    assert re.match(r"error: 3 of at most 4 trials failed, more than max_failure_rate=0.5 allows",
                    capsys.readouterr().err.strip().splitlines()[-1])
    assert [r["status"] for r in collect_runs(sweep)] == ["failed"] * 3  # the last one recorded too
    maximize = tiny_cfg(*failing, "hydra.sweeper.direction=maximize", "max_failure_rate=1")
    assert train_script.main(as_sweep_job(maximize, sweep, 3)) == -math.inf


def test_failed_job_in_a_multirun_is_recorded_and_a_single_run_exits_2(tiny_cfg, capsys):
    cfg = tiny_cfg("model=mlp", "model.activation=nope")
    with pytest.raises(SystemExit) as exit_info:  # single run: one line, exit 2, no metrics.json
        train_script.main(cfg)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().startswith("error: unknown activation 'nope'")
    assert not (Path(cfg.paths.output_dir) / "metrics.json").exists()

    value = train_script.main(as_sweep_job(cfg, Path(cfg.paths.log_dir) / "sweep", 3))  # a grid sweep's job: NaN, no exception
    assert isinstance(value, float) and math.isnan(value)
    record = read(Path(cfg.paths.log_dir) / "sweep" / "3" / "metrics.json")
    assert record["status"] == "failed"
    # Hydra wraps errors raised while instantiating; the record names the stellarlab error behind it
    assert record["error"]["type"] == "ConfigError"
    assert record["error"]["message"].startswith("unknown activation 'nope'")
    assert "Traceback" in record["traceback"]


class _Submitted(Exception):
    pass


def test_slurm_launcher_writes_an_sbatch_array_with_the_configured_resources(tmp_path, monkeypatch):
    cfg = compose_config(
        [
            "launcher=slurm",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.gpus_per_node=2",
            "hydra.launcher.mem_gb=64",
            "hydra.launcher.timeout_min=90",
            "hydra.launcher.array_parallelism=1",
            "hydra.launcher.setup=[module load cuda,source .venv/bin/activate]",
            "hydra.job.name=train",
        ],
        tmp_path=tmp_path,
    )
    launcher = Plugins.instance().instantiate_launcher(
        hydra_context=HydraContext(config_loader=None, callbacks=None), task_function=train_script.main, config=cfg
    )
    scripts = []

    def fake_sbatch(self, command):  # what `sbatch` would receive; no cluster here
        scripts.append(self._make_submission_file_text(command, "uid"))
        raise _Submitted

    monkeypatch.setattr(submitit.slurm.slurm.SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # "srun exists"
    monkeypatch.setattr(submitit.slurm.slurm.SlurmExecutor, "_submit_command", fake_sbatch)
    with pytest.raises(_Submitted):
        launcher.launch([["model=linear"], ["model=mlp"]], initial_job_idx=0)
    (script,) = scripts
    sweep_dir = Path(str(cfg.hydra.sweep.dir))
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --gpus-per-node=2",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=64GB",
        "#SBATCH --time=90",
        "#SBATCH --array=0-1%1",
        "#SBATCH --job-name=train",
        f"#SBATCH --output={sweep_dir}/.submitit/%A_%a/%A_%a_0_log.out",
        "module load cuda",
        "source .venv/bin/activate",
    ):
        assert line in script, (line, script)
    assert "submitit.core._submit" in script


@pytest.mark.parametrize("option", sorted(p.stem for p in (ROOT / "conf" / "hparams_search").glob("*.yaml")))
def test_every_searched_parameter_exists_and_its_values_build_a_model(option, tmp_path):
    """A typo in a search space would make every trial fail; each key must exist and each bound compose."""
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
    from optuna.distributions import CategoricalDistribution

    cfg = compose_config([f"hparams_search={option}"], tmp_path=tmp_path)
    assert cfg.hydra.sweeper.sampler._target_ == "optuna.samplers.TPESampler" and cfg.hydra.sweeper.sampler.seed == 0
    assert cfg.hydra.sweeper.direction == "minimize" and cfg.optimized_metric == "val/loss_best"
    assert 0 < cfg.max_failure_rate < 1
    space, fixed = create_params_from_overrides([f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()])
    assert not fixed and {"optimizer.lr", "optimizer.weight_decay", "model.dropout", "data.batch_size", "model.hidden_sizes"} <= set(space)
    spec = {"n_pixels": 8575, "label_names": ["teff", "logg"], "label_mean": [4800.0, 2.5], "label_std": [700.0, 1.2]}
    for key, dist in space.items():
        assert OmegaConf.select(cfg, key, default="missing") != "missing", key
        values = dist.choices if isinstance(dist, CategoricalDistribution) else (dist.low, dist.high)
        for value in values:
            trial = compose_config([f"hparams_search={option}", f"{key}={value}"], tmp_path=tmp_path)
            if isinstance(value, float):
                assert OmegaConf.select(trial, key) == pytest.approx(value), key
            if key.startswith("model."):  # shapes that a network cannot be built with would fail every trial
                model = hydra.utils.instantiate(trial.model, **spec, optimizer=trial.optimizer)
                assert model.n_parameters > 0
