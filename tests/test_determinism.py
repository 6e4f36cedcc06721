"""Determinism on CPU: the same seed gives identical test metrics in two separate processes, another seed
different ones, and the split depends on `data.split_seed` alone (a sweep over `seed` keeps its test stars)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import hydra
import numpy as np
import pytest
import pytorch_lightning as pl

from tests.conftest import ROOT, compose_config
from tests.test_resume import RUN


def columns(path: Path, suffix: str) -> dict[str, list[str]]:
    """The `<label><suffix>` columns of test_predictions.csv, as the text written."""
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    return {k: [r[k] for r in rows] for k in rows[0] if k.endswith(suffix)}


@pytest.mark.slow
def test_same_seed_same_metrics_in_two_processes_other_seed_differs_on_the_same_test_stars(tmp_path, warm_cache):
    seeds = {"a": 0, "b": 0, "c": 1}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "train.py", *RUN, f"seed={seed}", f"paths.log_dir={tmp_path / name}", f"paths.cache_dir={warm_cache}"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        for name, seed in seeds.items()
    }  # side by side: three separate processes
    runs = {}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        (runs[name],) = (tmp_path / name / "train" / "runs").iterdir()
    m = {name: json.loads((run / "metrics.json").read_text()) for name, run in runs.items()}

    assert m["a"]["test"] == m["b"]["test"]  # every metric of every label, bit for bit
    assert m["a"]["best_val_loss"] == m["b"]["best_val_loss"]
    assert (runs["a"] / "test_predictions.csv").read_bytes() == (runs["b"] / "test_predictions.csv").read_bytes()
    for label in ("teff", "logg", "fe_h"):
        assert m["a"]["test"][label]["rmse"] != m["c"]["test"][label]["rmse"], label
    # another model seed, the same test stars in the same order: identical true labels, other predictions
    pred_a, pred_c = (runs[n] / "test_predictions.csv" for n in ("a", "c"))
    assert columns(pred_a, "_true") == columns(pred_c, "_true")
    assert columns(pred_a, "_pred") != columns(pred_c, "_pred")
    assert m["a"]["split_sizes"] == m["c"]["split_sizes"] == {"train": 420, "val": 90, "test": 90}


def split_of(*overrides: str, cache_dir: Path, tmp_path: Path) -> dict[str, np.ndarray]:
    """The split index of the DataModule train.py builds, after seeding as train.py does."""
    cfg = compose_config([*RUN, *overrides], tmp_path=tmp_path, cache_dir=cache_dir)
    pl.seed_everything(int(cfg.seed))
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule.split_index


def test_the_split_depends_on_the_split_seed_only(tmp_path, warm_cache):
    base = split_of("seed=0", cache_dir=warm_cache, tmp_path=tmp_path)
    for other in (["seed=1"], ["seed=123", "model=cnn", "optimizer.lr=0.1"]):
        split = split_of(*other, cache_dir=warm_cache, tmp_path=tmp_path)
        for name in ("train", "val", "test"):
            assert np.array_equal(split[name], base[name]), (other, name)
    moved = split_of("seed=0", "data.split_seed=43", cache_dir=warm_cache, tmp_path=tmp_path)
    assert not np.array_equal(np.sort(moved["test"]), np.sort(base["test"]))
