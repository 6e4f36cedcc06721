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
    assert not results["startup"]["train.py --help"]["imports_torch"]
    assert "overhead" in proc.stdout and "RMSE" in proc.stdout
