"""DDP through train.py: 2 CPU processes over gloo, the ddp_spawn and the subprocess launchers, exact test metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, TINY

pytestmark = pytest.mark.slow

DDP = [
    *TINY,
    "model=linear",
    "trainer=ddp",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.max_epochs=2",
    "~callbacks.figures",
]


def run_script(script: str, *overrides: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, script, *overrides], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def only_run(log_dir: Path, task: str) -> Path:
    runs = sorted((log_dir / task / "runs").iterdir())
    assert len(runs) == 1, runs  # all ranks share one run folder
    return runs[0]


def test_ddp_on_two_cpu_processes_gives_the_single_process_metrics(tmp_path, survey_cache):
    paths = [f"paths.cache_dir={survey_cache}"]
    spawn_dir, ddp_dir = tmp_path / "spawn", tmp_path / "ddp"
    # ddp_spawn: fit and test run in spawned processes; the test results come back through a file
    spawn = run_script("train.py", *DDP, *paths, "trainer.strategy=ddp_spawn", f"paths.log_dir={spawn_dir}")
    # ddp: train.py is re-run for rank 1, and here the spectra stream from the survey's memory map per rank
    run_script("train.py", *DDP, *paths, "data.in_memory=false", f"paths.log_dir={ddp_dir}")
    assert "sync_dist" not in spawn.stderr  # epoch values are global already (gathered), and logged as such

    spawn_run, ddp_run = only_run(spawn_dir, "train"), only_run(ddp_dir, "train")
    a = json.loads((spawn_run / "metrics.json").read_text())
    b = json.loads((ddp_run / "metrics.json").read_text())
    assert a["status"] == b["status"] == "ok"
    assert a["epochs"] == b["epochs"] == 2  # the spawned fit's epoch count comes back to the main process
    assert a["split_sizes"]["test"] == 90 and all(a["test"][label]["n"] == 90 for label in a["label_names"])
    assert a["test"] == b["test"] and a["test_loss"] == b["test_loss"]  # same shards, same batches: identical
    assert np.isfinite(a["best_val_loss"]) and a["best_val_loss"] == b["best_val_loss"]
    assert (spawn_run / "test_predictions.npz").is_file()

    # the best checkpoint re-tested by eval.py in one process
    run_script("eval.py", f"ckpt_path={a['best_checkpoint']}", "trainer.devices=1", "++trainer.strategy=auto",
               f"paths.log_dir={spawn_dir}", *paths)
    single_run = only_run(spawn_dir, "eval")
    c = json.loads((single_run / "metrics.json").read_text())
    for label, metrics in c["test"].items():
        assert a["test"][label]["n"] == metrics["n"] == 90  # every test spectrum once: no padded repeats
        for name, value in metrics.items():
            # a row's prediction can differ in the last float32 bit: its batch holds other rows under DDP
            assert a["test"][label][name] == pytest.approx(value, rel=1e-5), (label, name)
    assert a["test_loss"] == pytest.approx(c["test_loss"], rel=1e-5)
    ddp_rows = np.genfromtxt(spawn_run / "test_predictions.csv", delimiter=",", names=True)
    single_rows = np.genfromtxt(single_run / "test_predictions.csv", delimiter=",", names=True)
    for label in a["label_names"]:  # the same spectra in the same order
        np.testing.assert_array_equal(ddp_rows[f"{label}_true"], single_rows[f"{label}_true"])
        np.testing.assert_allclose(ddp_rows[f"{label}_pred"], single_rows[f"{label}_pred"], rtol=1e-5)
