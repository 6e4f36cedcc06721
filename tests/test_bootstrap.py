"""Bootstrap intervals of the test metrics: against a plain loop, seeded, NaN-aware; their place in tables and tags."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from rich.console import Console

import stellarlab.metrics as metrics_module
from stellarlab.metrics import METRIC_NAMES, bootstrap_intervals, label_metrics
from stellarlab.results.hparams import hparam_metric_names, metric_tag, summary_metrics
from stellarlab.results.reports import metrics_table


def _data(n=300, seed=5):
    rng = np.random.default_rng(seed)
    true = rng.normal(size=(n, 2)) * [700.0, 1.0] + [4800.0, 2.5]
    pred = true + rng.standard_t(4, size=(n, 2)) * [50.0, 0.08] + [3.0, -0.01]
    return pred, true


def test_intervals_match_a_plain_loop_over_resamples():
    pred, true = _data()
    names = ["teff", "logg"]
    got = bootstrap_intervals(pred, true, names, n_resamples=200, seed=7, level=0.9)
    for j, name in enumerate(names):
        # the same draws, one resample at a time through label_metrics (astropy's mad_std)
        rng = np.random.default_rng([7, zlib.crc32(name.encode())])
        idx = rng.integers(0, len(pred), size=(200, len(pred)))
        per_resample = [label_metrics(pred[i][:, [j]], true[i][:, [j]], [name])[name] for i in idx]
        for m in METRIC_NAMES:
            lo, hi = np.percentile([r[m] for r in per_resample], [5.0, 95.0])
            assert got[name][f"{m}_ci"] == pytest.approx([lo, hi], rel=1e-10, abs=1e-12), (name, m)


def test_intervals_hold_the_estimate_and_have_the_expected_width():
    rng = np.random.default_rng(0)
    true = rng.normal(size=(400, 1))
    pred = true + rng.normal(size=(400, 1))  # unit-variance residuals
    point = label_metrics(pred, true, ["x"])["x"]
    ci = bootstrap_intervals(pred, true, ["x"], n_resamples=2000, seed=0)["x"]
    for m in METRIC_NAMES:
        lo, hi = ci[f"{m}_ci"]
        assert lo < point[m] < hi, m
    # RMSE of N(0,1) residuals: standard error ~ 1/sqrt(2N) = 0.035, so a 95% interval ~0.14 wide
    lo, hi = ci["rmse_ci"]
    assert 0.10 < hi - lo < 0.18
    assert lo < 1.0 < hi


def test_seeded_and_independent_of_the_other_labels_and_of_chunking(monkeypatch):
    pred, true = _data()
    a = bootstrap_intervals(pred, true, ["teff", "logg"], n_resamples=300, seed=1)
    assert a == bootstrap_intervals(pred, true, ["teff", "logg"], n_resamples=300, seed=1)
    assert a != bootstrap_intervals(pred, true, ["teff", "logg"], n_resamples=300, seed=2)
    swapped = bootstrap_intervals(pred[:, ::-1], true[:, ::-1], ["logg", "teff"], n_resamples=300, seed=1)
    assert swapped == a  # each label draws from its own (seed, name) generator
    monkeypatch.setattr(metrics_module, "_MAX_BOOTSTRAP_ELEMENTS", 7 * len(pred))  # 7 resamples at a time
    assert bootstrap_intervals(pred, true, ["teff", "logg"], n_resamples=300, seed=1) == a


def test_missing_true_labels_are_left_out_per_label():
    pred, true = _data(n=200)
    holed = true.copy()
    holed[::3, 1] = np.nan  # a third of the log g values missing
    ci = bootstrap_intervals(pred, holed, ["teff", "logg"], n_resamples=100, seed=3)
    ok = np.isfinite(holed[:, 1])
    only_known = bootstrap_intervals(pred[ok][:, [1]], true[ok][:, [1]], ["logg"], n_resamples=100, seed=3)
    assert ci["logg"] == only_known["logg"]
    assert ci["teff"] == bootstrap_intervals(pred, true, ["teff", "logg"], n_resamples=100, seed=3)["teff"]
    empty = true.copy()
    empty[:, 1] = np.nan
    assert all(np.isnan(v).all() for v in bootstrap_intervals(pred, empty, ["teff", "logg"], n_resamples=10)["logg"].values())


def test_bad_arguments_are_clear_errors():
    pred, true = _data(n=10)
    with pytest.raises(ValueError, match="n_resamples must be >= 1"):
        bootstrap_intervals(pred, true, ["a", "b"], n_resamples=0)
    with pytest.raises(ValueError, match="level must be between 0 and 1"):
        bootstrap_intervals(pred, true, ["a", "b"], level=95)
    with pytest.raises(ValueError, match=r"must both be \(N, 3\)"):
        bootstrap_intervals(pred, true, ["a", "b", "c"])


def test_table_tags_and_hparams_carry_the_intervals():
    pred, true = _data()
    m = label_metrics(pred, true, ["teff", "logg"], train_mean=[4800.0, 2.5])
    for label, cis in bootstrap_intervals(pred, true, ["teff", "logg"], n_resamples=100).items():
        m[label].update(cis)
    console = Console(width=200, record=True)
    console.print(metrics_table(m, caption="value [lo, hi]: 95% bootstrap interval"))
    text = console.export_text()
    lo, hi = m["teff"]["rmse_ci"]
    assert f"{m['teff']['rmse']:.4g} [{lo:.4g}, {hi:.4g}]" in text
    assert "value [lo, hi]: 95% bootstrap interval" in text  # the caption is not eaten as markup

    summary = {"best_val_loss": 0.1, "test_loss": 0.2, "train_seconds": 3.0, "test": m}
    flat = summary_metrics(summary)
    assert flat[metric_tag("rmse", "teff")] == m["teff"]["rmse"]
    assert flat["test/rmse_lo_teff"] == lo and flat["test/rmse_hi_teff"] == hi
    assert flat["time/train_seconds"] == 3.0 and flat["val/loss_best"] == 0.1
    names = hparam_metric_names(["teff", "logg"], intervals=True)
    assert {"test/rmse_teff", "test/rmse_lo_teff", "test/mad_std_hi_logg", "time/train_seconds"} <= set(names)
    assert "test/rmse_lo_teff" not in hparam_metric_names(["teff"], intervals=False)
