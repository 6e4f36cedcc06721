"""Metric functions against numpy/astropy references; label standardisation; masked loss."""

import numpy as np
import pytest
import torch
from astropy.stats import mad_std

from stellarlab.errors import DataError
from stellarlab.labels import LabelScaler
from stellarlab.metrics import label_metrics
from stellarlab.models import masked_mse


def test_label_metrics_match_numpy_and_astropy():
    rng = np.random.default_rng(3)
    true = rng.normal(size=(500, 2)) * [800.0, 1.0] + [4800.0, 2.5]
    resid = rng.standard_t(3, size=(500, 2)) * [40.0, 0.05] + [5.0, -0.01]
    pred = true + resid
    m = label_metrics(pred, true, ["teff", "logg"], train_mean=[4700.0, 2.4])
    for j, name in enumerate(["teff", "logg"]):
        r = resid[:, j]
        assert m[name]["rmse"] == pytest.approx(np.sqrt(np.mean(r**2)), rel=1e-12)
        assert m[name]["mae"] == pytest.approx(np.mean(np.abs(r)), rel=1e-12)
        assert m[name]["bias"] == pytest.approx(np.median(r), rel=1e-12)
        assert m[name]["mad_std"] == pytest.approx(mad_std(r), rel=1e-12)
        assert m[name]["n"] == 500
        base = true[:, j] - [4700.0, 2.4][j]
        assert m[name]["rmse_mean_predictor"] == pytest.approx(np.sqrt(np.mean(base**2)), rel=1e-12)
    # the robust scatter ignores the heavy tails that inflate the RMSE
    assert m["teff"]["mad_std"] < m["teff"]["rmse"]


def test_label_metrics_skip_missing_labels_per_label():
    true = np.array([[1.0, np.nan], [2.0, 5.0], [3.0, 7.0]])
    pred = np.array([[1.5, 100.0], [2.0, 6.0], [3.0, 7.0]])
    m = label_metrics(pred, true, ["a", "b"])
    assert m["a"]["n"] == 3 and m["b"]["n"] == 2
    assert m["b"]["rmse"] == pytest.approx(np.sqrt(0.5))
    assert m["a"]["bias"] == 0.0


def test_label_scaler_round_trip_and_train_only_statistics():
    rng = np.random.default_rng(0)
    train = rng.normal([4800, 2.5, -0.2], [700, 1.1, 0.4], size=(300, 3)).astype(np.float32)
    train[5, 1] = np.nan
    scaler = LabelScaler.fit(train, ["teff", "logg", "fe_h"])
    np.testing.assert_allclose(scaler.mean, np.nanmean(train, axis=0), rtol=1e-5)
    np.testing.assert_allclose(scaler.std, np.nanstd(train, axis=0), rtol=1e-5)
    other = rng.normal([6000, 4.0, 0.0], [10, 0.1, 0.1], size=(50, 3)).astype(np.float32)
    scaled = scaler.transform(other)
    np.testing.assert_allclose(scaler.inverse(scaled).numpy(), other, rtol=1e-5)
    scaled_train = scaler.transform(train).numpy()
    np.testing.assert_allclose(np.nanmean(scaled_train, axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(np.nanstd(scaled_train, axis=0), 1, atol=1e-5)
    assert np.isnan(scaled_train[5, 1])


def test_label_scaler_refuses_constant_or_empty_labels():
    with pytest.raises(DataError, match="constant"):
        LabelScaler.fit(np.ones((10, 1)), ["teff"])
    with pytest.raises(DataError, match="finite value"):
        LabelScaler.fit(np.full((10, 1), np.nan), ["logg"])


def test_masked_mse_ignores_missing_labels():
    pred = torch.tensor([[0.0, 1.0], [2.0, 3.0]], requires_grad=True)
    target = torch.tensor([[1.0, float("nan")], [2.0, 1.0]])
    loss = masked_mse(pred, target)
    assert loss.item() == pytest.approx((0.5 + 4.0) / 2)
    loss.backward()
    assert torch.isfinite(pred.grad).all()
    assert pred.grad[0, 1] == 0
