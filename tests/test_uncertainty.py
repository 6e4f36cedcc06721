"""Predicted uncertainties: calibration numbers on known cases, the Gaussian NLL, and `model.loss=gaussian_nll`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from stellarlab.errors import ConfigError
from stellarlab.metrics import (
    GAUSSIAN_COVERAGE,
    calibration,
    calibration_summary,
    z_scores,
)
from stellarlab.models import CNNRegressor, LinearRegressor, MLPRegressor
from stellarlab.models.losses import SIGMA_MIN, masked_gaussian_nll, masked_mse

LABELS = ["teff", "logg", "fe_h"]


# -- calibration numbers ---------------------------------------------------------------------------
def test_calibration_of_a_hand_made_case_is_exact():
    # z = +-0.5, +-1.5, +-2.5: a third inside 1 sigma, two thirds inside 2, std = sqrt(35/12)
    z = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5])
    sigma = np.array([1.0, 2.0, 1.0, 2.0, 1.0, 2.0])
    out = calibration_summary(z, sigma)
    assert out["frac_within_1sigma"] == pytest.approx(1 / 3)
    assert out["frac_within_2sigma"] == pytest.approx(2 / 3)
    assert out["z_std"] == pytest.approx(math.sqrt(35 / 12))
    assert out["z_median"] == pytest.approx(0.0)
    assert out["mean_sigma"] == pytest.approx(1.5)
    assert out["rms_sigma"] == pytest.approx(math.sqrt(2.5))
    assert out["n"] == 6


def test_gaussian_errors_with_the_right_sigmas_are_calibrated_and_wrong_sigmas_show():
    rng = np.random.default_rng(0)
    n = 200_000
    true = rng.normal(size=(n, 2))
    sigma = np.exp(rng.uniform(-2, 1, size=(n, 2)))  # heteroscedastic: every star its own sigma
    pred = true + sigma * rng.standard_normal((n, 2))
    right = calibration(pred, true, sigma, ["a", "b"])
    tol = 4 * math.sqrt(0.25 / n)  # 4 binomial standard errors
    for row in right.values():
        assert row["frac_within_1sigma"] == pytest.approx(GAUSSIAN_COVERAGE[1], abs=tol)
        assert row["frac_within_2sigma"] == pytest.approx(GAUSSIAN_COVERAGE[2], abs=tol)
        assert row["z_std"] == pytest.approx(1.0, abs=0.01)
        assert row["z_mad_std"] == pytest.approx(1.0, abs=0.01)
    # quoting twice the real sigma: z ~ N(0, 1/4), so |z| < 1 covers erf(2/sqrt 2) = 95.4 %
    wide = calibration(pred, true, 2 * sigma, ["a", "b"])["a"]
    assert wide["frac_within_1sigma"] == pytest.approx(GAUSSIAN_COVERAGE[2], abs=tol)
    assert wide["z_std"] == pytest.approx(0.5, abs=0.005)
    # a few catastrophic outliers inflate std(z) but not its robust mad_std
    pred_out = pred.copy()
    pred_out[:200, 0] += 1e3
    bad = calibration(pred_out, true, sigma, ["a", "b"])["a"]
    assert bad["z_std"] > 5 and bad["z_mad_std"] == pytest.approx(1.0, abs=0.01)


def test_missing_truths_and_bad_sigmas_are_left_out():
    pred = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    true = np.array([[1.5, np.nan], [2.0, np.nan], [np.nan, np.nan]])
    sigma = np.array([[0.5, 1.0], [0.0, 1.0], [1.0, 1.0]])
    z = z_scores(pred, true, sigma)
    assert z[0, 0] == pytest.approx(-1.0) and np.isnan(z[1:, 0]).all() and np.isnan(z[:, 1]).all()
    out = calibration(pred, true, sigma, ["a", "b"])
    assert out["a"]["n"] == 1 and out["b"]["n"] == 0 and math.isnan(out["b"]["z_std"])
    with pytest.raises(ValueError, match="one shape"):
        z_scores(pred, true, sigma[:2])


# -- the loss ----------------------------------------------------------------------------------------
def test_gaussian_nll_matches_its_formula_and_masks_missing_labels():
    mean = torch.tensor([[0.0, 1.0], [1.0, 5.0]])
    sigma = torch.tensor([[1.0, 2.0], [2.0, 1.0]])
    target = torch.tensor([[0.0, 1.0], [0.0, float("nan")]])
    c = 0.5 * math.log(2 * math.pi)
    label0 = 0.5 * ((0 + c) + (0.5 * 0.25 + math.log(2) + c))
    label1 = math.log(2) + c  # the NaN row does not count
    assert masked_gaussian_nll(mean, sigma, target).item() == pytest.approx(0.5 * (label0 + label1), rel=1e-6)


@pytest.mark.parametrize("cls", [LinearRegressor, MLPRegressor, CNNRegressor])
def test_every_network_predicts_a_mean_and_a_sigma_with_gaussian_nll(cls):
    kwargs = dict(n_pixels=256, label_names=LABELS, label_mean=[5000.0, 3.0, -0.2], label_std=[600.0, 1.0, 0.5])
    if cls is CNNRegressor:
        kwargs.update(channels=[4], kernel_sizes=[5], pool_sizes=[4], hidden_sizes=[16])
    mse, nll = cls(**kwargs), cls(**kwargs, loss="gaussian_nll")
    assert (mse.n_outputs, nll.n_outputs) == (3, 6)
    flux = torch.rand(5, 256)
    assert nll(flux).shape == mse(flux).shape == (5, 3)  # forward: standardised means either way
    mean, sigma = nll.predict_with_uncertainty(flux)
    raw = nll.net(1.0 - flux)
    assert torch.allclose(mean, raw[:, :3] * nll.label_std + nll.label_mean)
    expected = (torch.nn.functional.softplus(raw[:, 3:]) + SIGMA_MIN) * nll.label_std
    assert torch.allclose(sigma, expected) and (sigma > 0).all()
    assert torch.allclose(nll.predict_physical(flux), mean)
    # the validation-fitted sigma factor multiplies every reported sigma
    nll.sigma_scale.copy_(torch.tensor([2.0, 1.0, 0.5]))
    assert torch.allclose(nll.predict_with_uncertainty(flux)[1], expected * torch.tensor([2.0, 1.0, 0.5]))
    with pytest.raises(ConfigError, match="predicts no uncertainty"):
        mse.predict_with_uncertainty(flux)
    assert "sigma_scale" not in mse.state_dict()  # mse checkpoints keep their exact state_dict


def test_an_unknown_loss_is_a_config_error_listing_the_valid_ones():
    with pytest.raises(ConfigError, match=r"model\.loss=l1 is not valid; valid values: mse, gaussian_nll"):
        MLPRegressor(n_pixels=8, label_names=["teff"], loss="l1")
    with pytest.raises(ConfigError, match=r"model\.nll_beta=2 is not valid: it must be a number >= 0 and <= 1"):
        MLPRegressor(n_pixels=8, label_names=["teff"], loss="gaussian_nll", nll_beta=2)


def test_beta_nll_weights_rows_by_sigma_without_a_gradient_through_the_weight():
    mean = torch.tensor([[0.0], [0.0]], requires_grad=True)
    sigma = torch.tensor([[1.0], [3.0]])
    target = torch.tensor([[1.0], [1.0]])
    masked_gaussian_nll(mean, sigma, target, beta=1.0).backward()
    # beta = 1: d/dmean of sigma^2 * (mean - y)^2 / (2 sigma^2) = mean - y for every row, as an MSE
    assert torch.allclose(mean.grad, torch.tensor([[-0.5], [-0.5]]))


def test_mse_loss_is_unchanged():
    model = LinearRegressor(n_pixels=4, label_names=["a", "b"])
    mean = torch.tensor([[1.0, 2.0]])
    target = torch.tensor([[0.0, float("nan")]])
    assert model.compute_loss(mean, None, target) == masked_mse(mean, target)


def test_gaussian_nll_learns_the_noise_level_of_a_known_problem():
    """y = w.x + noise whose sigma grows from 0.05 to 0.35 with x0: the net must find each star's sigma."""
    torch.manual_seed(0)
    p = 4
    w = torch.randn(p)

    def draw(n):
        x = torch.rand(n, p)
        sigma = 0.05 + 0.3 * x[:, 0]
        return 1.0 - x, sigma, (x @ w + sigma * torch.randn(n))[:, None]  # the base feeds 1 - flux to the net

    flux, _, y = draw(4096)
    model = MLPRegressor(n_pixels=p, label_names=["y"], hidden_sizes=[32], loss="gaussian_nll")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=600)
    for _ in range(600):
        idx = torch.randint(0, len(flux), (256,))
        loss = model.compute_loss(*model._mean_and_sigma(flux[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    flux, true_sigma, y = draw(4096)  # fresh stars
    with torch.no_grad():
        mean, sigma = model.predict_with_uncertainty(flux)
    ratio = sigma[:, 0] / true_sigma
    assert ratio.median().item() == pytest.approx(1.0, abs=0.1)
    assert ratio.quantile(0.1).item() > 0.8 and ratio.quantile(0.9).item() < 1.2
    calib = calibration(mean.numpy(), y.numpy(), sigma.numpy(), ["y"])["y"]
    assert calib["frac_within_1sigma"] == pytest.approx(GAUSSIAN_COVERAGE[1], abs=0.03)
    assert calib["frac_within_2sigma"] == pytest.approx(GAUSSIAN_COVERAGE[2], abs=0.02)
    assert calib["z_std"] == pytest.approx(1.0, abs=0.06)


# -- end to end ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_with_gaussian_nll_reports_calibration_and_reloads(tiny_cfg):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import train as train_script

    cfg = tiny_cfg("model=mlp", "model.loss=gaussian_nll", "trainer.max_epochs=6")
    summary = train_script.train(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert metrics["best_val_loss"] == pytest.approx(summary["best_val_loss"])
    for label in LABELS:
        assert metrics["test"][label]["rmse"] < metrics["test"][label]["rmse_mean_predictor"]

    model = MLPRegressor.load_from_checkpoint(metrics["best_checkpoint"], weights_only=True)
    assert model.loss_name == "gaussian_nll" and model.n_outputs == 6
    # the checkpoint's sigma factor is the RMS of that epoch's validation z-scores of the raw sigmas
    import hydra

    dm = hydra.utils.instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    model.eval()
    with torch.no_grad():
        mean, raw_sigma = model._mean_and_sigma(dm.tensors["val"]["flux"])
    z = (mean - dm.tensors["val"]["labels"]) / raw_sigma
    assert torch.allclose(model.sigma_scale, z.pow(2).mean(0).sqrt(), rtol=1e-4)
    acc = EventAccumulator(str(Path(cfg.paths.output_dir) / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"val/loss", "val/mse", "val/loss_best", "val/mse_at_best", "test/mse"} <= scalars
    assert {f"val/sigma_scale_{l}" for l in LABELS} <= scalars
    assert {f"test/{m}_{l}" for m in ("frac_within_1sigma", "frac_within_2sigma", "z_std", "z_mad_std", "mean_sigma") for l in LABELS} <= scalars
    # val/mse_at_best is the val MSE of the epoch with the lowest val NLL
    losses = {e.step: e.value for e in acc.Scalars("val/loss")}
    mses = {e.step: e.value for e in acc.Scalars("val/mse")}
    best_step = min(losses, key=losses.get)
    assert acc.Scalars("val/mse_at_best")[-1].value == pytest.approx(mses[best_step], rel=1e-5)
    assert acc.Scalars("val/loss_best")[-1].value == pytest.approx(losses[best_step], rel=1e-5)


@pytest.mark.slow
def test_test_results_carry_sigmas_and_calibration(tiny_cfg):
    import hydra
    import pytorch_lightning as pl

    cfg = tiny_cfg("model=linear", "model.loss=gaussian_nll", "optimizer.lr=3e-3")
    pl.seed_everything(0)
    dm = hydra.utils.instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    model = hydra.utils.instantiate(cfg.model, **dm.model_spec(), optimizer=cfg.optimizer)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=8, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    res = model.test_results
    assert res["pred"].shape == res["true"].shape == res["sigma"].shape == (90, 3)
    assert (res["sigma"] > 0).all()
    assert set(res["calibration"]) == set(LABELS)
    # the logged calibration is the calibration of the stored arrays
    again = calibration(res["pred"], res["true"], res["sigma"], LABELS)
    assert again == res["calibration"]
    for row in res["calibration"].values():
        assert 0 < row["frac_within_1sigma"] <= row["frac_within_2sigma"] <= 1
        assert row["n"] == 90
