"""`python -m stellarlab.compare`: one row per run (ok, failed, incomplete) in Markdown and CSV, a PNG, clear errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from stellarlab.results.compare import collect_runs, compare, main
from tests.conftest import ROOT

COMMON = ["data.n_stars=600", "trainer.max_epochs=2"]


def _ok_summary(rmse: float, n_parameters: int) -> dict:
    test = {}
    for label, scale in (("teff", 1.0), ("logg", 0.001)):
        r = rmse * scale
        test[label] = {
            "rmse": r, "mae": 0.8 * r, "bias": -0.1 * r, "mad_std": 0.9 * r, "n": 90, "rmse_mean_predictor": 10 * r,
            "rmse_ci": [0.9 * r, 1.1 * r], "mae_ci": [0.7 * r, 0.9 * r], "bias_ci": [-0.2 * r, 0.05 * r], "mad_std_ci": [0.8 * r, r],
        }  # fmt: skip
    return {
        "status": "ok", "optimized_metric": "val/loss_best", "best_value": rmse / 1000, "best_val_loss": rmse / 1000,
        "epochs": 2, "train_seconds": 12.5, "n_parameters": n_parameters, "label_names": ["teff", "logg"],
        "test_loss": rmse / 900, "test": test, "bootstrap": {"n_resamples": 1000, "seed": 0, "level": 0.95},
    }  # fmt: skip


def _job(sweep: Path, name: str, overrides: list[str], summary: dict | None) -> Path:
    run = sweep / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if summary is not None:
        (run / "metrics.json").write_text(json.dumps(summary))
    return run


@pytest.fixture
def sweep(tmp_path) -> Path:
    """A multirun as train.py leaves it: jobs 0, 1, 2 and 10; one failed, one killed before its metrics.json."""
    sweep = tmp_path / "multiruns" / "2026-01-01_00-00-00_abcdef"
    _job(sweep, "0", [*COMMON, "model=linear"], _ok_summary(60.0, 25_728))
    failed = {
        "status": "failed", "optimized_metric": "val/loss_best", "best_value": None,
        "error": {"type": "TrainingError", "message": "training loss became nan | at epoch 0"},
    }  # fmt: skip
    _job(sweep, "1", [*COMMON, "model=mlp", "optimizer.lr=1e9"], failed)
    _job(sweep, "2", [*COMMON, "model=cnn"], None)
    _job(sweep, "10", [*COMMON, "model=mlp"], _ok_summary(30.0, 2_228_739))
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    (sweep / ".submitit" / "123").mkdir(parents=True)  # launcher logs: not a run
    return sweep


def test_one_row_per_run_with_status_overrides_metrics_and_intervals(sweep):
    written = compare(sweep)
    assert set(written) == {"md", "csv", "png"}
    rows = list(csv.DictReader((sweep / "comparison.csv").open()))
    assert [r["run"] for r in rows] == ["0", "1", "2", "10"]  # job order, not string order
    assert [r["status"] for r in rows] == ["ok", "failed", "incomplete", "ok"]
    ok = rows[3]
    assert ok["overrides"] == "data.n_stars=600 trainer.max_epochs=2 model=mlp"
    assert float(ok["test/rmse_teff"]) == 30.0
    assert [float(ok["test/rmse_lo_teff"]), float(ok["test/rmse_hi_teff"])] == pytest.approx([27.0, 33.0])
    assert float(ok["test/mad_std_hi_logg"]) == pytest.approx(0.03)
    assert ok["model/n_parameters"] == "2228739" and float(ok["time/train_seconds"]) == 12.5
    assert ok["test/n_teff"] == "90" and ok["error"] == ""
    assert rows[1]["error"] == "TrainingError: training loss became nan | at epoch 0"
    assert rows[1]["test/rmse_teff"] == "" and rows[1]["model/n_parameters"] == ""
    assert rows[2]["error"].startswith("no metrics.json")

    md = (sweep / "comparison.md").read_text()
    assert "4 runs: 2 ok, 1 failed, 1 incomplete." in md
    assert "Overrides common to all runs: `data.n_stars=600 trainer.max_epochs=2`." in md
    assert "95% bootstrap intervals" in md
    assert "| Teff RMSE [K] | Teff bias [K] | Teff mad_std [K] | log g RMSE [dex] |" in md
    table = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| run")]
    assert len(table) == 4
    assert table[0].startswith("| 0 | ok | `model=linear` | 25,728 | 12.5 | 0.06 | 60 [54, 66] | -6 [-12, 3] |")
    assert table[1].startswith("| 1 | failed | `model=mlp` `optimizer.lr=1e9` | - |")
    assert table[1].endswith("TrainingError: training loss became nan \\| at epoch 0 |")  # pipe escaped
    assert table[2].startswith("| 2 | incomplete | `model=cnn` |")

    png = (sweep / "comparison.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert not list(sweep.glob(".comparison*"))  # no temporary files left behind


def test_a_sweep_where_every_run_failed_gets_tables_but_no_figure(tmp_path, capsys):
    failed = {"status": "failed", "error": {"type": "ConfigError", "message": "unknown activation 'nope'"}}
    _job(tmp_path, "0", ["model.activation=nope"], failed)
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "comparison.png not written" in out
    assert not (tmp_path / "comparison.png").exists()
    rows = list(csv.DictReader((tmp_path / "comparison.csv").open()))
    assert [(r["run"], r["status"], r["error"]) for r in rows] == [("0", "failed", "ConfigError: unknown activation 'nope'")]


def test_a_folder_of_single_runs_and_a_run_folder_itself(tmp_path):
    runs = tmp_path / "train" / "runs"
    _job(runs, "2026-01-01_00-00-00_aaaaaa", [], _ok_summary(50.0, 10))
    _job(runs, "2026-01-02_00-00-00_bbbbbb", ["model=cnn"], _ok_summary(40.0, 20))
    assert [r["run"] for r in collect_runs(runs)] == ["2026-01-01_00-00-00_aaaaaa", "2026-01-02_00-00-00_bbbbbb"]
    single = collect_runs(runs / "2026-01-02_00-00-00_bbbbbb")
    assert [(r["run"], r["overrides"]) for r in single] == [("2026-01-02_00-00-00_bbbbbb", ["model=cnn"])]


@pytest.mark.slow
def test_no_runs_is_a_clear_error_with_exit_code_2(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "stellarlab.compare", str(tmp_path / "empty")], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: no runs under {tmp_path / 'empty'}")
    assert "metrics.json and .hydra/overrides.yaml" in proc.stderr
    assert "Traceback" not in proc.stderr
    with pytest.raises(SystemExit) as stopped:
        main([str(tmp_path / "missing")])
    assert stopped.value.code == 2
    assert not list(tmp_path.rglob("comparison.*"))


@pytest.mark.parametrize("rmse", [None, "abc", [1, 2]])
def test_a_metrics_json_with_a_value_that_is_no_number_is_listed_not_a_crash(sweep, rmse):
    bad = _ok_summary(30.0, 1000)
    bad["test"]["teff"]["rmse"] = rmse
    _job(sweep, "11", [*COMMON, "model=mlp", "seed=2"], bad)
    compare(sweep)
    rows = {r["run"]: r for r in csv.DictReader((sweep / "comparison.csv").open())}
    assert rows["11"]["status"] == "incomplete"
    shown = "null" if rmse is None else repr(rmse)
    assert rows["11"]["error"] == f"metrics.json unusable: test.teff.rmse is {shown}, not a number"
    assert rows["10"]["status"] == "ok"  # the good runs are still compared
