"""The test step's results as one file, for a test that ran in other processes.

Under DDP with `strategy=ddp_spawn` the test runs in spawned processes and the model object of the
launching process never sees its `test_results`: rank 0 leaves them in `<run>/test_predictions.npz`
(full precision, with the metrics it computed) and the test step of train.py and eval.py reads them back.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from stellarlab.files import write_bytes_atomic

#: Where rank 0 of a multi-process test leaves its results for the launching process.
TEST_RESULTS_FILE = "test_predictions.npz"


def save_test_results(path: Path, results: dict, extra: dict | None = None) -> Path:
    """Test results (pred/true/sigma arrays, loss, metrics, calibration) plus `extra` floats, as one .npz, atomically."""
    arrays = {k: np.asarray(results[k]) for k in ("pred", "true", "sigma") if results.get(k) is not None}
    scalars = {"loss": results["loss"], "metrics": results["metrics"], "calibration": results.get("calibration"), **(extra or {})}
    return write_bytes_atomic(path, lambda fh: np.savez(fh, **arrays, scalars=np.array(json.dumps(scalars, allow_nan=True))))


def load_test_results(path: Path) -> tuple[dict, dict]:
    """(results as `model.test_results` holds them, the extra floats) from `save_test_results`' file."""
    with np.load(path, allow_pickle=False) as data:
        scalars = json.loads(str(data["scalars"]))
        results = {k: data[k] for k in ("pred", "true", "sigma") if k in data.files}
    results.update(loss=scalars.pop("loss"), metrics=scalars.pop("metrics"))
    calibration = scalars.pop("calibration")
    if calibration is not None:
        results["calibration"] = calibration
    return results, scalars
