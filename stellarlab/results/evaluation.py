"""Testing a trained model, shared by train.py (end of training) and eval.py (a checkpoint later).

One function so both give the same numbers: test metrics per label in physical units, their
bootstrap intervals, the printed table, and the per-spectrum test predictions as a CSV. It returns
`TestResults`; train.py and eval.py put them into their metrics.json record (`stellarlab.results.summary`).

Under DDP with `strategy=ddp_spawn` the test runs in spawned processes and the model object here never
sees its `test_results`: rank 0 leaves them in `<run>/test_predictions.npz` (`save_test_results`, full
precision, with the metrics it computed) and `test_model` reads them back.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from stellarlab.files import atomic_path
from stellarlab.models.test_results import TEST_RESULTS_FILE, load_test_results
from stellarlab.results.reports import print_metrics
from stellarlab.results.summary import TestResults

log = logging.getLogger(__name__)


def bootstrap_test_metrics(metrics: dict, results: dict, label_names, bootstrap) -> tuple[dict | None, str | None]:
    """Put each test metric's bootstrap interval (`rmse_ci`: [lo, hi], ...) beside it in `metrics`.

    Returns (the bootstrap settings, the caption of the printed table); (None, None) and no intervals when
    bootstrap.n_resamples is 0 or unset.
    """
    from stellarlab.metrics import bootstrap_intervals

    if not bootstrap or not bootstrap.get("n_resamples"):
        return None, None
    settings = {key: bootstrap[key] for key in ("n_resamples", "seed", "level")}
    for label, cis in bootstrap_intervals(results["pred"], results["true"], label_names, **settings).items():
        metrics[label].update(cis)
    caption = f"value [lo, hi]: {100 * float(bootstrap['level']):g}% bootstrap interval, {bootstrap['n_resamples']} resamples of the test set"
    return settings, caption


def write_test_predictions(path: Path, results: dict, label_names: list[str], ids: dict | None = None,
                           snr=None) -> Path:
    """One row per test spectrum: what names it (`ids`: the star id and the survey's own ids, e.g. APOGEE_ID,
    FIELD), its `snr` (when the data knows it), `<label>_true`, `<label>_pred` (and `<label>_sigma` when predicted)."""
    columns, names = [], []
    for name, values in (ids or {}).items():
        columns.append([str(v) for v in np.asarray(values).tolist()])
        names.append(str(name))
    if snr is not None:
        columns.append([f"{v:.6g}" for v in np.asarray(snr, dtype=np.float64).tolist()])
        names.append("snr")
    for j, label in enumerate(label_names):
        parts = [("true", results["true"]), ("pred", results["pred"])]
        if results.get("sigma") is not None:
            parts.append(("sigma", results["sigma"]))
        for suffix, values in parts:
            columns.append([f"{v:.9g}" for v in np.asarray(values[:, j], dtype=np.float64).tolist()])
            names.append(f"{label}_{suffix}")
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(names)
            writer.writerows(zip(*columns))
    return path


def ids_of_test_rows(datamodule, n_rows: int) -> tuple[dict | None, np.ndarray | None]:
    """(ids, snr) of the test split's rows, when the DataModule knows them and they match the results' rows."""
    try:
        ids = datamodule.split_ids("test")
    except (AttributeError, KeyError, ValueError):
        return None, None
    snr = datamodule.split_arrays("test").get("snr")
    snr = None if snr is None else np.asarray(snr.numpy() if hasattr(snr, "numpy") else snr)
    if any(len(v) != n_rows for v in ids.values()) or (snr is not None and len(snr) != n_rows):
        return None, None
    return ids, snr


def test_model(trainer, model, datamodule, cfg, ckpt_path: str | None = None) -> TestResults:
    """trainer.test on the test split: test loss, metrics with intervals, the bound where known; writes the predictions."""
    handoff = Path(trainer.default_root_dir) / TEST_RESULTS_FILE
    if trainer.is_global_zero:
        handoff.unlink(missing_ok=True)  # never read an earlier test's results
    model.test_results = None
    trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
    results = model.test_results
    spawned_val_loss = None
    if results is None:  # ddp_spawn: the test ran in spawned processes; rank 0 left its results on disk
        if not handoff.is_file():
            raise RuntimeError(f"trainer.test produced no results in this process and no {handoff}")
        results, extra = load_test_results(handoff)
        model.test_results = results
        model.best_val_loss, model.best_val_mse = extra["best_val_loss"], extra["best_val_mse"]
        spawned_val_loss = model.best_val_loss  # fit ran in spawned processes too: this object never trained
    return report_results(results, datamodule, cfg, best_val_loss=spawned_val_loss,
                          best_val_mse=getattr(model, "best_val_mse", None), rank_zero=trainer.is_global_zero,
                          whole_split=not trainer.fast_dev_run)


def report_results(results: dict, datamodule, cfg, title: str = "test metrics", best_val_loss: float | None = None,
                   best_val_mse: float | None = None, rank_zero: bool = True, whole_split: bool = True) -> TestResults:
    """A test's results (`pred`, `true`, optional `sigma`, `metrics`, `calibration`, `loss`) as every test reports
    them: the bound where known, bootstrap intervals, the printed table, test_predictions.csv.

    Shared by a single model's test step and an ensemble's (`stellarlab.results.ensemble`)."""
    label_names = list(datamodule.label_names)
    tested = TestResults(
        test_loss=results["loss"],
        test=results["metrics"],
        calibration=results.get("calibration") or None,
        best_val_loss=best_val_loss,
        best_val_mse=best_val_mse,
    )
    if rank_zero and whole_split:  # debug=fdr tests one batch: no bound over the split
        from stellarlab.synthetic.crlb import crlb_vs_rmse

        tested.crlb = crlb_vs_rmse(datamodule, tested.test)  # None unless the data is the synthetic survey
        if tested.crlb is not None:
            log.info("test RMSE / Cramer-Rao bound: %s", ", ".join(f"{k} {v['ratio']:.2f}" for k, v in tested.crlb.items()))
    tested.bootstrap, caption = bootstrap_test_metrics(tested.test, results, label_names, cfg.get("bootstrap"))
    if rank_zero:
        n_test = len(datamodule.split_index["test"])
        print_metrics(tested.test, title=f"{title} ({n_test} spectra)", caption=caption)
        ids, snr = ids_of_test_rows(datamodule, len(results["pred"]))
        out = write_test_predictions(Path(cfg.paths.output_dir) / "test_predictions.csv", results, label_names, ids, snr)
        tested.test_predictions = str(out)
    return tested
