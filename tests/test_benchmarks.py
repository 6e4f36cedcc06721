"""CI runs every benchmark once in its small mode, so the scripts keep working (figures are not asserted)."""

import json
import math
import subprocess
import sys

import pytest

from benchmarks.__main__ import BENCHMARKS
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_benchmarks_small_mode_runs_and_writes_figures(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "run", "--small", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    results = report["results"]
    assert set(results) == set(BENCHMARKS)
    for model in ("linear", "mlp", "cnn"):
        r = results["training_overhead"][model]
        assert r["stellarlab_samples_per_s"] > 0 and r["bare_samples_per_s"] > 0 and math.isfinite(r["overhead"])
        assert r["naive_samples_per_s"] > 0 and r["speedup_vs_naive"] > 0 and r["ceiling_vs_naive"] > 0
        assert set(results["default_run"]["models"][model]) >= {"teff", "logg", "fe_h", "seconds"}
    assert results["training_overhead"]["linear@1024"]["batch_size"] == 1024
    malloc = results["malloc_reuse"]
    assert "skipped" in malloc if not sys.platform.startswith("linux") else malloc["cnn"]["speedup"] > 0
    assert results["default_run"]["default_run_seconds_cold_cache"] > 0
    for model in ("cannon", "emulator"):  # every model in one table, the fits with their errors' calibration
        row = results["default_run"]["models"][model]
        assert set(row["crlb_ratio"]) == set(row["within_1sigma"]) == {"teff", "logg", "fe_h"}
    assert not results["startup"]["train.py --help"]["imports_torch"]
    for row in results["predict_scale"]["rows"]:  # memory stays that of the blocks in flight
        assert row["peak_rss_mb"] < results["predict_scale"]["targets"]["peak_rss_mb"]
    fits = results["emulator_fit"]["models"]
    assert {"emulator", "cannon", "thecannon"} <= set(fits)  # the reference The Cannon runs beside ours
    for row in fits.values():
        assert set(row["labels"]) == {"teff", "logg", "fe_h"} and row["spectra_per_second"] > 0
    for name in ("emulator", "cannon"):  # each model's own error against the noise-free spectra, train and test stars
        rows = fits[name]["emulation_error"]
        assert {row["split"] for row in rows} == {"train", "test"}
        for row in rows:
            assert row["emulation_chi2_per_pixel"] > 0
            assert all(math.isfinite(v) for v in row["shift_over_bound"].values())
            assert ("fit_rmse_over_bound" in row) == ("noise_over_bound" in row) == (row["split"] == "test")
    step = results["emulator_fit"]["optimizer_step"]  # fused and per-operation Adam timed side by side
    assert step["fused_ms"] > 0 and step["per_operation_ms"] > 0 and "fused Adam" in proc.stdout
    assert "overhead" in proc.stdout and "RMSE" in proc.stdout and "own error" in proc.stdout


def test_the_own_error_of_a_run_refuses_a_folder_that_is_no_spectrum_model_run(tmp_path):
    """`benchmarks/emulator_fit.py --run DIR`: a folder without a finished run, or a run of another model, is one `error:` line, exit 2."""
    script = ROOT / "benchmarks" / "emulator_fit.py"
    proc = subprocess.run([sys.executable, str(script), "--run", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --run") and "not a finished training run" in proc.stderr
    run = tmp_path / "ridge"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "best-epoch000.ckpt").write_bytes(b"")
    (run / ".hydra" / "config.yaml").write_text("model:\n  _target_: stellarlab.models.ridge.RidgeRegressor\n")
    proc = subprocess.run([sys.executable, str(script), "--run", str(run)], capture_output=True, text=True)
    assert proc.returncode == 2 and "model=emulator or model=cannon" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    (run / ".hydra" / "config.yaml").write_text("model:\n  _target_: stellarlab.models.emulator.EmulatorRegressor\n"
                                                "data:\n  _target_: stellarlab.data.synthetic.SyntheticDataModule\n")
    (run / "checkpoints" / "best-epoch000.ckpt").write_bytes(b"PK\x03\x04 cut short")  # a corrupt checkpoint
    proc = subprocess.run([sys.executable, str(script), "--run", str(run)], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "cannot be read" in proc.stderr
