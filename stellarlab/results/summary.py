"""`metrics.json`: the one record of a run that train.py, eval.py, sweeps, `compare` and TensorBoard share.

Every key is defined here, once, and every writer builds its record through these functions; readers
go through `read_summary`. A record has three parts:

- the run: `status` ("ok" or "failed"), `run_dir`, `tags`, `label_names`, `split_sizes`, `n_parameters`,
  and for eval.py the `checkpoint` it tested;
- training (train.py only): `optimized_metric`, `best_value` (what a sweeper optimises), `best_val_loss`,
  `best_val_mse`, `epochs`, `train_seconds`, `best_checkpoint`, `resumed_from` for a continued run;
- testing (`TestResults`): `test_loss`, `test` (per label: rmse, mae, bias, mad_std, n, the
  mean-predictor RMSE, and `<metric>_ci` intervals when bootstrapped), `bootstrap` (its settings),
  `calibration` (models with sigmas), `crlb` (synthetic survey: RMSE against the Cramér–Rao bound),
  `test_predictions` (the per-spectrum CSV). A run that tested nothing has `test: null` and `test_skipped`
  (why: `test=false`, or an empty test split).

A failed job of a sweep has `status: failed`, `error` {type, message}, `traceback` and `best_value: null`.
"""

from __future__ import annotations

import json
import traceback
from dataclasses import dataclass
from pathlib import Path

from stellarlab.files import write_json_atomic

METRICS_FILE = "metrics.json"
OK, FAILED = "ok", "failed"


@dataclass
class TestResults:
    """What testing a model adds to its record (returned by the test step, never written into a record)."""

    test_loss: float
    test: dict[str, dict]
    test_predictions: str | None = None
    bootstrap: dict | None = None
    calibration: dict | None = None
    crlb: dict | None = None
    # a test that ran in spawned processes (ddp_spawn) is where the launching process learns these
    best_val_loss: float | None = None
    best_val_mse: float | None = None

    def fields(self) -> dict:
        out = {"test_loss": self.test_loss, "test": self.test}
        for key in ("bootstrap", "calibration", "crlb", "best_val_mse", "test_predictions"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


def run_fields(run_dir: str | Path, label_names, split_sizes: dict, n_parameters: int, tags=()) -> dict:
    return {
        "status": OK,
        "run_dir": str(run_dir),
        "tags": list(tags),
        "label_names": list(label_names),
        "split_sizes": {k: int(v) for k, v in split_sizes.items()},
        "n_parameters": int(n_parameters),
    }


def train_summary(
    run: dict,
    *,
    optimized_metric: str,
    best_value: float,
    best_val_loss: float,
    epochs: int,
    train_seconds: float,
    best_checkpoint: str | None,
    resumed_from: dict | None = None,
    tested: TestResults | None = None,
    test_skipped: str | None = None,
) -> dict:
    """The record train.py writes: the run, its training and its test (or `test: null` and why, `test_skipped`)."""
    record = {
        **run,
        "optimized_metric": optimized_metric,
        "best_value": float(best_value),
        "best_val_loss": float(best_val_loss),
        "epochs": int(epochs),
        "train_seconds": float(train_seconds),
        "best_checkpoint": best_checkpoint,
    }
    if resumed_from is not None:
        record["resumed_from"] = resumed_from  # train_seconds counts the last process only
    if tested is not None:
        if tested.best_val_loss is not None:  # fit ran in spawned processes: only the test saw the value
            record["best_val_loss"] = float(tested.best_val_loss)
        record.update(tested.fields())
    else:
        record.update(test=None, test_skipped=test_skipped or "not tested")
    return record


def eval_summary(run: dict, checkpoint: str | list[str], tested: TestResults) -> dict:
    """The record eval.py writes: the checkpoint it tested (a list for an ensemble) and the test."""
    checkpoint = [str(c) for c in checkpoint] if isinstance(checkpoint, (list, tuple)) else str(checkpoint)
    return {**run, "checkpoint": checkpoint, **tested.fields()}


def failed_summary(run_dir: str | Path, optimized_metric: str | None, err: BaseException, cause: BaseException) -> dict:
    """The record of a job that failed inside a sweep (the sweep goes on; `compare` lists it as failed)."""
    return {
        "status": FAILED,
        "error": {"type": type(cause).__name__, "message": str(cause)},
        "run_dir": str(run_dir),
        "optimized_metric": optimized_metric,
        "best_value": None,
        "traceback": "".join(traceback.format_exception(type(err), err, err.__traceback__)),
    }


def write_summary(run_dir: str | Path, record: dict) -> Path:
    return write_json_atomic(Path(run_dir) / METRICS_FILE, record)


def summary_problem(record: dict) -> str | None:
    """What makes a record unusable for tables and plots (a number that is not one), or None when it is fine."""
    numbers = [("best_value", record.get("best_value")), ("best_val_loss", record.get("best_val_loss")),
               ("test_loss", record.get("test_loss")), ("train_seconds", record.get("train_seconds"))]
    test = record.get("test")
    if test is not None and not isinstance(test, dict):
        return f"test is {test!r}, not a table of labels"
    for label, row in (test or {}).items():
        if not isinstance(row, dict):
            return f"test.{label} is {row!r}, not a table of metrics"
        numbers += [(f"test.{label}.{k}", v) for k, v in row.items() if not k.endswith("_ci")]
    for key, value in numbers:
        if key == "best_value" and value is None and record.get("status") == FAILED:
            continue
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"{key} is {value!r}, not a number"
        if value is None and key.startswith("test."):
            return f"{key} is null, not a number"
    return None


def read_summary(path: str | Path) -> dict | None:
    """A run's metrics.json (the file, or the run folder holding it); None if it cannot be read as a JSON object."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
