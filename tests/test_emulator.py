"""model=emulator and model=cannon: the label fit recovers, bounds and flags; The Cannon is least squares; train.py end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from stellarlab.errors import ConfigError
from stellarlab.models.cannon import fit_quadratic, quadratic_design
from stellarlab.models.emulator import EmulatorRegressor
from stellarlab.models.flux_network import FluxNetwork
from stellarlab.models.spectrum_fit import (
    ErrorBasis,
    _normal_equations,
    fit_error_basis,
    fit_scatter,
    fit_spectra,
    retry_poor_fits,
)
from tests.conftest import ROOT, TINY, compose_config

LABELS = ["teff", "logg", "fe_h"]
MEAN, STD = [4800.0, 2.5, -0.2], [700.0, 1.2, 0.4]
LOW, HIGH = [3500.0, 0.0, -2.0], [6500.0, 5.0, 0.5]
IVAR = 1e4  # SNR 100 on a continuum of 1


def emulator(n_pixels: int = 300, seed: int = 0, **kwargs) -> EmulatorRegressor:
    """A small untrained emulator: its random network is a smooth, non-degenerate labels -> flux map to fit."""
    torch.manual_seed(seed)
    kwargs = {"hidden_sizes": [32, 32], "latent_dims": 0, "fit_templates": 64, **kwargs}
    model = EmulatorRegressor(n_pixels, LABELS, label_mean=MEAN, label_std=STD, label_min=LOW, label_max=HIGH, **kwargs)
    low, high, _ = model._bounds()
    low, high = low[:3], high[:3]
    labels = low + (high - low) * torch.rand(500, 3, generator=torch.Generator().manual_seed(seed))
    model._prepare(labels, torch.ones(2, n_pixels), torch.full((2, n_pixels), IVAR))
    if model.kind == "mlp":
        with torch.no_grad():  # absorption-like depths of a few percent around the continuum
            model.net.set_output(torch.ones(n_pixels), torch.ones(n_pixels))
            model.net.out.weight.mul_(0.3)
            if model.latent_dims:  # a latent response the spectra pin down, as a trained one: the N(0,1) prior then barely pulls
                model.net.basis.mul_(30)
    return model.eval()


def inside(model, n: int, seed: int = 1, margin: float = 0.1) -> torch.Tensor:
    """Standardised labels well inside the training range."""
    low, high, _ = model._bounds()
    low, high = low[:3], high[:3]
    u = torch.rand(n, 3, generator=torch.Generator().manual_seed(seed))
    return low + (high - low) * (margin + (1 - 2 * margin) * u)


def physical(model, x):
    return x * model.label_std + model.label_mean


# -- the fit ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("latent_dims", [0, 1])
def test_the_fit_recovers_the_labels_of_noise_free_emulator_spectra(latent_dims):
    model = emulator(latent_dims=latent_dims, fit_tolerance=1e-6, fit_starts=3)
    x = inside(model, 40)
    latent = None if not latent_dims else torch.linspace(-1.5, 1.5, 40)[:, None]
    with torch.no_grad():
        flux = model.emulate(x, latent)
        fit = model.fit_spectra(flux, torch.full_like(flux, IVAR))
    assert fit.converged.all()
    standardised = (fit.labels - model.label_mean) / model.label_std
    np.testing.assert_allclose(standardised.numpy(), x.numpy(), atol=1e-3)
    assert (fit.rchi2 < 1e-3).all()  # the emulator describes its own spectra: chi2 ~ 0
    assert (fit.sigma > 0).all() and torch.isfinite(fit.sigma).all()


NUISANCE = {"names": ["alpha_fe"], "complete": True, "mean": [0.1], "std": [0.15], "min": [-1.0], "max": [2.0]}


@pytest.mark.parametrize("kind", ["mlp", "quadratic"])
def test_nuisance_labels_are_inputs_of_the_emulator_and_free_in_every_fit(kind):
    model = emulator(kind=kind, nuisance_labels=NUISANCE, fit_tolerance=1e-6, fit_starts=3, seed=5)
    if kind == "quadratic":
        with torch.no_grad():
            model.net.theta.normal_(0, 0.02, generator=torch.Generator().manual_seed(6))
            model.net.theta[:, 0] = 0.9
    low, high, _ = model._bounds()  # the nuisance label's standardised training range beside the labels'
    assert low.tolist()[3:] == [-1.0] and high.tolist()[3:] == [2.0]
    x, nuisance = inside(model, 30), torch.linspace(-0.8, 1.8, 30)[:, None]
    with torch.no_grad():
        flux = model.emulate(torch.cat([x, nuisance], 1))
        fit = model.fit_spectra(flux, torch.full_like(flux, IVAR))
        held = model.emulate(torch.cat([x, torch.zeros_like(nuisance)], 1))
    assert fit.labels.shape == (30, 3) and fit.converged.all()  # the labels are reported; the nuisance is fitted
    np.testing.assert_allclose(((fit.labels - model.label_mean) / model.label_std).numpy(), x.numpy(), atol=1e-3)
    assert ((flux - held) ** 2 * IVAR).sum(1).median() > 10  # the nuisance label shapes the spectra: it had to be fitted


def test_the_default_latent_label_is_left_out_when_the_data_leaves_nothing_out():
    assert EmulatorRegressor(10, LABELS).latent_dims == 1
    assert EmulatorRegressor(10, LABELS, nuisance_labels=NUISANCE).latent_dims == 0
    assert EmulatorRegressor(10, LABELS, nuisance_labels={**NUISANCE, "complete": False}).latent_dims == 1
    assert EmulatorRegressor(10, LABELS, nuisance_labels={**NUISANCE, "complete": True}, kind="quadratic").latent_dims == 0
    assert EmulatorRegressor(10, LABELS, nuisance_labels=NUISANCE, latent_dims=2).latent_dims == 2
    # saved resolved, so a checkpoint is rebuilt with its own shape whatever the default becomes
    assert EmulatorRegressor(10, LABELS, nuisance_labels=NUISANCE).hparams["latent_dims"] == 0


def test_training_reads_the_nuisance_labels_and_skips_rows_without_them():
    model = emulator(nuisance_labels=NUISANCE)
    batch = {"flux": torch.ones(4, 300), "weight": torch.full((4, 300), IVAR), "labels": torch.zeros(4, 3),
             "nuisance": torch.tensor([[0.5], [float("nan")], [-0.5], [0.0]])}
    flux, weight, inputs = model._known(batch)
    assert inputs.shape == (3, 4) and inputs[:, 3].tolist() == [0.5, -0.5, 0.0]


def test_formal_errors_match_the_scatter_of_repeated_noisy_fits_of_one_spectrum():
    model = emulator(seed=2, scatter=False)
    x = inside(model, 1, seed=3)
    rng = torch.Generator().manual_seed(4)
    with torch.no_grad():
        clean = model.emulate(x)
        noisy = clean + torch.randn(400, clean.shape[1], generator=rng) / IVAR**0.5
        fit = model.fit_spectra(noisy, torch.full_like(noisy, IVAR))
    assert fit.converged.all()
    spread = fit.labels.std(0)
    formal = fit.sigma.median(0).values
    np.testing.assert_allclose(spread.numpy(), formal.numpy(), rtol=0.12)  # 400 fits: std known to ~3.5 %
    truth = physical(model, x)[0]
    assert ((fit.labels.mean(0) - truth).abs() < 4 * formal / 400**0.5).all()  # unbiased
    z = (fit.labels - truth) / fit.sigma
    assert 0.62 < float((z.abs() < 1).float().mean()) < 0.75
    assert 0.85 < float(fit.rchi2.median()) < 1.15


def test_errors_are_calibrated_by_the_spread_of_fits_of_spectra_with_known_labels():
    # the same noise draw at twice the level the weights claim: the formal errors stay, the factor doubles
    model = emulator(seed=5, scatter=False)
    x = inside(model, 300, seed=6)
    with torch.no_grad():
        clean = model.emulate(x)
        noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(7)) / IVAR**0.5
        weight = torch.full_like(clean, IVAR)
        honest = model._error_scale(clean + noise, weight, x)
        scale = model._error_scale(clean + 2 * noise, weight, x)
        np.testing.assert_allclose(honest.numpy(), 1.0, rtol=0.25)  # 300 stars: a median |z| to ~7 %
        np.testing.assert_allclose(scale.numpy(), 2 * honest.numpy(), rtol=0.05)
        before = model.fit_spectra(clean + 2 * noise, weight).sigma
        model.sigma_scale.copy_(scale)
        fit = model.fit_spectra(clean + 2 * noise, weight)
    torch.testing.assert_close(fit.sigma, before * scale)  # the reported error is the formal one times the factor
    z = (fit.labels - physical(model, x)) / fit.sigma
    assert 0.6 < float((z.abs() < 1).float().mean()) < 0.76


def test_labels_stay_inside_the_training_range():
    model = emulator(seed=5)
    low, high, _ = model._bounds()
    x = inside(model, 6, seed=6)
    x[:3, 0] = high[0] + 0.8  # hotter than any training star
    x[3:, 1] = low[1] - 0.8  # log g below the training range
    with torch.no_grad():
        flux = model.emulate(x)
        fit = model.fit_spectra(flux, torch.full_like(flux, IVAR))
    lo, hi = torch.tensor(LOW), torch.tensor(HIGH)
    assert ((fit.labels >= lo - 1e-3) & (fit.labels <= hi + 1e-3)).all()
    np.testing.assert_allclose(fit.labels[:3, 0].numpy(), HIGH[0], rtol=1e-6)
    np.testing.assert_allclose(fit.labels[3:, 1].numpy(), LOW[1], atol=1e-5)
    assert fit.at_bound[:3, 0].all() and fit.at_bound[3:, 1].all()
    assert not fit.at_bound[:, 2].any()


def test_a_fit_that_ran_out_of_iterations_or_a_spectrum_of_noise_is_flagged():
    model = emulator(seed=7, fit_starts=1, fit_tolerance=1e-6)
    x = inside(model, 20, seed=8)
    with torch.no_grad():
        flux = model.emulate(x)
        weight = torch.full_like(flux, IVAR)
        model.fit_settings["max_iter"] = 1
        short = model.fit_spectra(flux, weight)
        model.fit_settings["max_iter"] = 30
        full = model.fit_spectra(flux, weight)
        noise = 1 + torch.randn(5, flux.shape[1], generator=torch.Generator().manual_seed(9)) * 0.2
        junk = model.fit_spectra(noise, torch.full_like(noise, IVAR))
    assert not short.converged.any() and (short.iterations == 1).all()
    assert full.converged.all()
    assert (junk.rchi2 > 50).all()  # no label fits a spectrum of pure noise: the goodness of fit says so


def test_a_fit_stuck_in_a_wrong_basin_is_retried_from_further_starts_and_the_lower_minimum_kept():
    # one label, two basins: a deep one at the truth x = 2 and a shallow one near -2 (the linear term tells them apart)
    g, h = (torch.randn(2, 200, generator=torch.Generator().manual_seed(21)).abs() + 0.5).unbind(0)

    def emulate(x):
        return 1 + 0.05 * g * (x**2 - 4) ** 2 / 16 + 0.01 * h * x

    truth = torch.tensor([[2.0], [2.0]])
    flux = emulate(truth) + torch.randn(2, 200, generator=torch.Generator().manual_seed(22)) * 0.01
    weight, low, high = torch.full_like(flux, IVAR), torch.tensor([-3.0]), torch.tensor([3.0])
    first = fit_spectra(emulate, flux, weight, low, high, starts=torch.tensor([[[-2.5]], [[2.5]]]))
    assert first.labels[0, 0] < -1.5 and first.rchi2[0] > 5  # the wrong basin, and its fit says so
    assert abs(first.labels[1, 0] - 2) < 5 * first.sigma[1, 0] and first.rchi2[1] < 1.5
    again = torch.tensor([[[2.5], [-1.0]], [[-2.5], [-1.0]]])  # further starts; the right one only for the first
    fit, retried, improved = retry_poor_fits(emulate, flux, weight, low, high, None, first, again, 1.5)
    assert (retried, improved) == (1, 1)  # the good fit is not retried (from its starts it would fall in the wrong basin)
    torch.testing.assert_close(fit.labels[1:], first.labels[1:])
    assert abs(fit.labels[0, 0] - 2) < 5 * fit.sigma[0, 0] and fit.rchi2.max() < 1.5 and fit.chi2[0] < first.chi2[0]
    assert fit.converged.all()


def test_the_emulator_retries_poor_fits_only_when_asked():
    model = emulator(seed=23, fit_starts=1)
    x = inside(model, 40, seed=24)
    with torch.no_grad():
        flux = model.emulate(x)
        flux[:3] = 1 + torch.randn(3, flux.shape[1], generator=torch.Generator().manual_seed(25)) * 0.2  # no label fits
        weight = torch.full_like(flux, IVAR)
        model.fit_settings["retry_rchi2"] = None
        plain = model.fit_spectra(flux, weight)
        assert model.retry_counts == [0, 0]
        model.fit_settings["retry_rchi2"] = 1.1
        retried = model.fit_spectra(flux, weight)
    assert model.retry_counts[0] == 3  # the three spectra of noise; the good fits (reduced chi-square ~1) are left
    assert (retried.chi2 <= plain.chi2).all()
    torch.testing.assert_close(retried.labels[3:], plain.labels[3:])


def test_spectra_without_errors_get_their_noise_from_the_flux():
    model = emulator(n_pixels=2000, seed=10, scatter=False)
    x = inside(model, 20, seed=11)
    with torch.no_grad():  # lines several pixels wide, as in real spectra (DER_SNR reads the noise off neighbours)
        w = model.net.out.weight
        w.copy_(torch.nn.functional.avg_pool1d(w.T[None], 31, stride=1, padding=15, count_include_pad=False)[0].T * 5)
        clean = model.emulate(x)
        noisy = clean + torch.randn(clean.shape, generator=torch.Generator().manual_seed(12)) * 0.01
        given = model.fit_spectra(noisy, torch.full_like(noisy, IVAR))
        guessed = model.fit_spectra(noisy)  # no weights: DER_SNR on the flux
    # the same minimum (weights differ by a factor per spectrum), stopped within the tolerance of it
    assert ((guessed.labels - given.labels).abs() < 0.2 * given.sigma).all()
    ratio = (guessed.sigma / given.sigma).numpy()  # DER_SNR reads a little signal as noise where lines are sharp
    assert 0.9 < np.median(ratio) < 1.2 and 0.7 < ratio.min() and ratio.max() < 1.6


def test_predict_and_the_base_contract_give_the_fit():
    model = emulator(seed=13)
    x = inside(model, 4, seed=14)
    with torch.no_grad():
        flux = model.emulate(x)
        fit = model.fit_spectra(flux, torch.full_like(flux, IVAR))
        standardised = model(flux, torch.full_like(flux, IVAR))  # forward: the same fit, in standardised units
    np.testing.assert_allclose(standardised.numpy(), ((fit.labels - model.label_mean) / model.label_std).numpy(), atol=1e-5)
    np.testing.assert_allclose(standardised.numpy(), x.numpy(), atol=3e-3)
    out = model.predict(flux.numpy(), np.full(flux.shape, IVAR, dtype=np.float32))
    np.testing.assert_allclose(out["teff"], fit.labels[:, 0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(out["logg_sigma"], fit.sigma[:, 1].numpy(), rtol=1e-5)


def test_a_spectrum_without_usable_pixels_gets_no_fit_in_the_catalogue():
    """All-NaN flux: nothing to fit, so no labels, no reduced chi-square and no convergence, and the FEW_PIXELS bit."""
    from stellarlab.results.flags import Flag
    from stellarlab.results.predict_block import predict_chunk

    model = emulator(seed=15)
    with torch.no_grad():
        flux = model.emulate(inside(model, 3, seed=16)).numpy()
    flux[1] = np.nan
    columns = predict_chunk(model, flux, np.full(flux.shape, IVAR, np.float32))
    assert np.isnan(columns["teff"][1]) and np.isnan(columns["rchi2"][1]) and not columns["fit_converged"][1]
    assert columns["flag"][1] & Flag.FEW_PIXELS
    assert np.isfinite(columns["rchi2"][[0, 2]]).all() and columns["fit_converged"][[0, 2]].all() and (columns["flag"][[0, 2]] == 0).all()


def test_a_checkpointed_state_predicts_the_same():
    model = emulator(seed=15, latent_dims=1)
    fresh = EmulatorRegressor(300, LABELS, hidden_sizes=[32, 32], latent_dims=1, fit_templates=64,
                              label_mean=MEAN, label_std=STD, label_min=LOW, label_max=HIGH).eval()
    fresh.load_state_dict(model.state_dict())
    flux = model.emulate(inside(model, 5, seed=16)).detach()
    weight = torch.full_like(flux, IVAR)
    with torch.no_grad():
        np.testing.assert_array_equal(fresh.fit_spectra(flux, weight).labels.numpy(), model.fit_spectra(flux, weight).labels.numpy())


def test_the_network_starts_at_the_mean_flux_in_units_of_each_pixels_spread():
    """Every pixel's output unit is how far its flux varies across the training stars, the noise taken out."""
    model = EmulatorRegressor(5, LABELS, hidden_sizes=[8], latent_dims=0, fit_templates=4,
                              label_mean=MEAN, label_std=STD, label_min=LOW, label_max=HIGH)
    rng = np.random.default_rng(3)
    n = 4000
    mean = np.array([0.98, 0.7, 0.99, 0.5, 1.0])
    spread = np.array([0.002, 0.1, 0.0, 0.03, 0.0])  # a continuum pixel, a line core, a flat pixel, ...
    flux = mean + spread * rng.normal(size=(n, 5)) + rng.normal(size=(n, 5)) / np.sqrt(IVAR)
    weight = np.full((n, 5), IVAR)
    weight[:, 4] = 0.0  # a pixel no spectrum has data on
    model._prepare(torch.zeros(n, 3), torch.as_tensor(flux, dtype=torch.float32), torch.as_tensor(weight, dtype=torch.float32))
    scale = model.net.flux_scale.numpy()
    np.testing.assert_allclose(scale[[0, 1, 3]], spread[[0, 1, 3]], rtol=0.1)
    assert 1e-4 <= scale[2] < 1e-3  # below the noise: the floor or the estimate's own scatter, far below the line's unit
    assert scale[4] == 1.0
    with torch.no_grad():
        model.net.out.weight.zero_()  # the network's start is the bias alone: the mean flux, 1 where there is no data
        np.testing.assert_allclose(model.emulate(torch.zeros(1, 3))[0].numpy(), [*flux[:, :4].mean(0), 1.0], atol=1e-4)


def test_the_fitted_emulator_is_the_trained_one_latent_labels_included():
    """The fit's forward pass (basis combined once) gives the flux training learnt: mean + response @ z."""
    torch.manual_seed(0)
    net = FluxNetwork(3, 50, [16, 8], "silu", latent_dims=2)
    with torch.no_grad():
        net.basis.normal_()
    x = torch.randn(7, 5)
    with torch.no_grad():
        mean, response = net.parts(x[:, :3])
        trained = mean + (response @ x[:, 3:].unsqueeze(-1)).squeeze(-1)
        np.testing.assert_allclose(net(x).numpy(), trained.numpy(), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(net(x), mean, atol=1e-3)  # the latent labels do move the flux


def test_a_checkpoint_from_before_the_output_units_loads_as_raw_flux_outputs():
    model = emulator(seed=17, latent_dims=1)  # raw flux outputs: unit scale everywhere
    state = dict(model.state_dict())
    del state["net.flux_scale"]
    checkpoint = {"state_dict": state}
    fresh = EmulatorRegressor(300, LABELS, hidden_sizes=[32, 32], latent_dims=1, fit_templates=64,
                              label_mean=MEAN, label_std=STD, label_min=LOW, label_max=HIGH).eval()
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])  # strict: nothing missing
    x = inside(model, 5, seed=18)
    with torch.no_grad():
        np.testing.assert_array_equal(fresh.emulate(x).numpy(), model.emulate(x).numpy())


# -- The Cannon ---------------------------------------------------------------------------------------
def cannon_problem(n=80, p=12, seed=0, scatter=0.0):
    rng = np.random.default_rng(seed)
    labels = rng.normal(size=(n, 3))
    design = quadratic_design(torch.as_tensor(labels)).numpy()
    theta = rng.normal(scale=0.05, size=(p, design.shape[1]))
    theta[:, 0] = 0.9
    weight = rng.uniform(0.5, 2.0, size=(n, p)) * IVAR
    flux = design @ theta.T + rng.normal(size=(n, p)) * np.sqrt(1 / weight + scatter**2)
    weight[rng.random((n, p)) < 0.05] = 0.0  # missing pixels
    as_t = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    return as_t(labels), as_t(flux), as_t(weight), design


def test_the_quadratic_model_is_the_weighted_least_squares_solution_of_its_design_matrix():
    labels, flux, weight, _ = cannon_problem()
    theta, s2 = fit_quadratic(labels, flux, weight, scatter=False)
    design = quadratic_design(labels.double()).numpy()
    assert (s2 == 0).all()
    for p in range(flux.shape[1]):
        root = np.sqrt(weight[:, p].double().numpy())
        expected = np.linalg.lstsq(design * root[:, None], flux[:, p].double().numpy() * root, rcond=None)[0]
        np.testing.assert_allclose(theta[p].numpy(), expected, rtol=1e-4, atol=1e-6)


def test_the_cannon_scatter_is_the_likelihood_optimum_and_theta_the_least_squares_at_it():
    labels, flux, weight, _ = cannon_problem(n=2000, p=6, seed=1, scatter=0.02)
    theta, s2 = fit_quadratic(labels, flux, weight, scatter=True)
    np.testing.assert_allclose(s2.sqrt().numpy(), 0.02, rtol=0.1)
    design = quadratic_design(labels.double()).numpy()
    for p in range(flux.shape[1]):
        c = weight[:, p].double().numpy() / (1 + weight[:, p].double().numpy() * float(s2[p]))
        expected = np.linalg.lstsq(design * np.sqrt(c)[:, None], flux[:, p].double().numpy() * np.sqrt(c), rcond=None)[0]
        np.testing.assert_allclose(theta[p].numpy(), expected, rtol=1e-3, atol=1e-6)


def test_fit_scatter_finds_the_extra_variance_and_zero_where_there_is_none():
    rng = np.random.default_rng(2)
    weight = np.full((4000, 3), IVAR)
    extra = np.array([0.0, 0.01, 0.03])
    resid = rng.normal(size=weight.shape) * np.sqrt(1 / weight + extra**2)
    s2 = fit_scatter(torch.as_tensor(resid, dtype=torch.float32), torch.as_tensor(weight, dtype=torch.float32))
    assert float(s2[0]) < 1e-5  # within the sampling noise of 4000 residuals' variance (1e-4 +- 2 %)
    np.testing.assert_allclose(s2[1:].sqrt().numpy(), extra[1:], rtol=0.06)

    def loglike(v):  # per pixel, of variance 1/w + v
        var = 1 / weight + v
        return -0.5 * (resid**2 / var + np.log(var)).sum(0)

    best = s2.double().numpy()
    for factor in (0.99, 1.01):  # the returned value is the maximum
        assert (loglike(best)[1:] >= loglike(best * factor)[1:]).all()


def test_a_cannon_emulator_fits_its_own_spectra():
    model = emulator(kind="quadratic", seed=17, fit_tolerance=1e-6)
    with torch.no_grad():
        model.net.theta.normal_(0, 0.02, generator=torch.Generator().manual_seed(18))
        model.net.theta[:, 0] = 0.9
        x = inside(model, 10, seed=19)
        flux = model.emulate(x)
        fit = model.fit_spectra(flux, torch.full_like(flux, IVAR))
    np.testing.assert_allclose(fit.labels.numpy(), physical(model, x).numpy(), rtol=1e-3)


def test_the_correlated_error_enters_the_fit_as_the_dense_covariance_would():
    rng = np.random.default_rng(3)
    b, p, n_labels, k = 4, 40, 3, 2
    jac, resid = rng.normal(size=(b, p, n_labels)), rng.normal(size=(b, p)) * 0.01
    cinv = rng.uniform(0.5, 2.0, size=(b, p)) * IVAR
    cinv[0, :5] = 0.0  # pixels without data
    patterns, variance = rng.normal(size=(p, k)) * 0.01, np.array([4.0, 0.5])
    basis = ErrorBasis(torch.as_tensor(patterns), torch.as_tensor(variance))
    t = lambda a: torch.as_tensor(a)  # noqa: E731
    a, g, chi2 = _normal_equations(t(jac), t(cinv), t(resid), t(np.zeros((b, n_labels))), None,
                                   (basis, basis.coupling(t(cinv))))
    for i in range(b):
        d = np.diag(cinv[i])  # C^-1 = (D^-1 + U V U^T)^-1 = D - D U (V^-1 + U^T D U)^-1 U^T D, defined where D is 0
        inner = np.linalg.inv(np.diag(1 / variance) + patterns.T @ d @ patterns)
        c_inv = d - d @ patterns @ inner @ patterns.T @ d
        np.testing.assert_allclose(a[i].numpy(), jac[i].T @ c_inv @ jac[i], rtol=1e-9)
        np.testing.assert_allclose(g[i].numpy(), jac[i].T @ c_inv @ resid[i], rtol=1e-9)
        np.testing.assert_allclose(float(chi2[i]), resid[i] @ c_inv @ resid[i], rtol=1e-9)
    if_used = cinv[1] > 0  # and where every pixel has data, C^-1 is the inverse of the dense covariance itself
    dense = np.diag(1 / cinv[1][if_used]) + patterns[if_used] @ np.diag(variance) @ patterns[if_used].T
    np.testing.assert_allclose(float(chi2[1]), resid[1] @ np.linalg.solve(dense, resid[1]), rtol=1e-9)


def test_fit_error_basis_finds_a_planted_pattern_and_takes_its_share_out_of_the_scatter():
    rng = np.random.default_rng(4)
    n, p = 3000, 200
    weight = np.full((n, p), IVAR)
    shape = np.sin(np.linspace(0, 3 * np.pi, p))  # smooth in wavelength, as an emulator's error is
    amplitude = 0.02  # per star, in flux: 2x the noise on the pattern's peaks
    resid = rng.normal(size=(n, p)) / np.sqrt(IVAR) + rng.normal(size=(n, 1)) * amplitude * shape
    as_t = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    s2 = fit_scatter(as_t(resid), as_t(weight))
    basis, left = fit_error_basis(as_t(resid), as_t(weight), s2, 1)
    found = basis.patterns[:, 0].double().numpy() * np.sqrt(float(basis.variance[0]))
    cosine = abs(found @ shape) / np.linalg.norm(found) / np.linalg.norm(shape)
    assert cosine > 0.99
    np.testing.assert_allclose(np.abs(found), amplitude * np.abs(shape), atol=0.002)  # its size in flux too
    assert float(left.sum()) < 0.05 * float(s2.sum())  # the scatter was this pattern: little is left per pixel


def test_a_cannon_whose_error_is_correlated_fits_better_with_its_error_patterns():
    def trained(components):
        model = emulator(kind="quadratic", seed=20, error_components=components, fit_tolerance=1e-4)
        x = inside(model, 1500, seed=21)
        model.scatter2.copy_(model.net.fit(x, truth_flux(x, noise=True), torch.full((1500, 300), IVAR)))
        return model

    shapes = torch.as_tensor(np.sin(np.linspace(0, 7, 300)[None, :] * np.arange(1, 13)[:, None] / 3), dtype=torch.float32)
    lines = torch.as_tensor(np.random.default_rng(22).normal(scale=0.02, size=(300, 3)), dtype=torch.float32)

    def truth_flux(x, noise):  # line depths linear in the labels, plus what no quadratic follows: a cubic in each
        flux = 0.9 + x @ lines.T + 0.01 * (x**3) @ shapes[:3] + 0.01 * torch.sin(2 * x[:, :1]) * shapes[3]
        return flux + (torch.randn(flux.shape, generator=torch.Generator().manual_seed(23)) / IVAR**0.5 if noise else 0)

    x = inside(trained(0), 300, seed=24, margin=0.2)
    flux = truth_flux(x, noise=True)
    rmse = {}
    for components in (0, 4):
        fit = trained(components).fit_spectra(flux, torch.full_like(flux, IVAR))
        rmse[components] = ((fit.labels - physical(trained(0), x)) / torch.tensor(STD)).pow(2).mean(0).sqrt()
    assert (rmse[4] < 0.5 * rmse[0]).all(), rmse
    bound = torch.linalg.inv(lines.double().T @ lines.double() * IVAR).diagonal().sqrt().float()  # the noise's limit
    assert (rmse[4] < 1.25 * bound).all(), (rmse, bound)  # with the patterns the model's error costs little


def test_more_error_patterns_than_pixels_or_training_spectra_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match=r"^model\.error_components=11 is more than the spectra's 10 pixels: each "
                                          r"pattern is a spectrum's worth of flux; lower it \(model=cannon uses 12\)$"):
        EmulatorRegressor(10, LABELS, kind="quadratic", error_components=11)
    model = emulator(kind="quadratic", seed=26, error_components=30)  # 300 pixels
    x = inside(model, 20)
    with pytest.raises(ConfigError, match=r"^model\.error_components=30 is more than the 20 training spectra its "
                                          r"patterns are measured on; lower it or train on more stars$"):
        model.net.fit(x, model.emulate(x), torch.full((20, 300), IVAR))


def test_a_cannon_checkpoint_from_before_the_error_patterns_loads_without_them():
    model = emulator(kind="quadratic", seed=25)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("net.error_")}
    checkpoint = {"state_dict": state}
    fresh = EmulatorRegressor(300, LABELS, kind="quadratic", fit_templates=64, label_mean=MEAN, label_std=STD,
                              label_min=LOW, label_max=HIGH).eval()
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])  # strict: nothing missing
    assert fresh.net.error_basis is None


# -- options ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kind": "payne"}, r"^model\.kind=payne is not valid; valid values: mlp, quadratic$"),
        ({"latent_dims": -1}, r"^model\.latent_dims=-1 is not valid: it must be an integer >= 0 or null; e\.g\. model\.latent_dims=1$"),
        ({"latent_dims": 1.5}, r"^model\.latent_dims=1\.5 is not valid"),
        ({"kind": "quadratic", "latent_dims": 2}, r"^model\.latent_dims=2: kind=quadratic \(The Cannon\) is quadratic in the labels alone"),
        ({"scatter": "yes"}, r"^model\.scatter=yes is not valid: it must be true or false"),
        ({"fit_starts": 0}, r"^model\.fit_starts=0 is not valid: it must be an integer >= 1"),
        ({"fit_templates": 2.5}, r"^model\.fit_templates=2\.5 is not valid: it must be an integer >= 1"),
        ({"fit_starts": 8, "fit_templates": 4}, r"^model\.fit_starts=8 is more than model\.fit_templates=4"),
        ({"fit_iterations": 0}, r"^model\.fit_iterations=0 is not valid: it must be an integer >= 1"),
        ({"fit_tolerance": 0}, r"^model\.fit_tolerance=0 is not valid: it must be a number > 0"),
        ({"fit_retry_rchi2": 0}, r"^model\.fit_retry_rchi2=0 is not valid: it must be a number > 0 or null"),
        ({"fit_retry_rchi2": "often"}, r"^model\.fit_retry_rchi2=often is not valid"),
        ({"hidden_sizes": [0]}, r"^model\.hidden_sizes=\[0\] is not valid"),
        ({"activation": "sigmoidish"}, r"^unknown activation 'sigmoidish'"),
        ({"loss": "gaussian_nll"}, r"^model\.loss=gaussian_nll: the emulator trains on the chi-square of the flux"),
        ({"error_components": -1}, r"^model\.error_components=-1 is not valid: it must be an integer >= 0"),
        ({"error_components": 2}, r"^model\.error_components=2: the patterns of the emulator's error are measured for "
                                  r"kind=quadratic \(The Cannon\) only; set model\.error_components=0"),
    ],
)
def test_bad_options_are_one_line_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match) as err:
        EmulatorRegressor(10, LABELS, **kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("override, match", [("model.kind=cannon", "model.kind=cannon is not valid"),
                                             ("model.fit_tolerance=-1", "model.fit_tolerance=-1 is not valid"),
                                             ("data.nuisance_labels=[vsini]", "the synthetic survey has no label vsini"),
                                             ("data.nuisance_labels=alpha_fe", "name zero or more labels")])
def test_the_config_check_refuses_bad_options_before_training(override, match, tmp_path):
    from stellarlab.run.validation import validate_train_config

    with pytest.raises(ConfigError, match=match):
        validate_train_config(compose_config(["model=emulator", override], tmp_path=tmp_path))


def test_a_survey_reader_refuses_nuisance_labels_before_training(tmp_path):
    from stellarlab.run.validation import validate_train_config

    cfg = compose_config(["model=emulator", "data=apogee", "+data.nuisance_labels=[alpha_m]"], tmp_path=tmp_path)
    with pytest.raises(ConfigError, match=r"^data\.nuisance_labels=\['alpha_m'\]: APOGEEDataModule reads the columns "
                                          r"of data\.labels alone"):
        validate_train_config(cfg)


def test_both_configs_build_the_emulator_and_it_reads_the_pixel_weights(tmp_path):
    import hydra

    for name, kind, latent in (("emulator", "mlp", 1), ("cannon", "quadratic", 0)):
        cfg = compose_config([f"model={name}"], tmp_path=tmp_path)
        model = hydra.utils.instantiate(cfg.model, n_pixels=50, label_names=LABELS, optimizer=cfg.optimizer)
        assert isinstance(model, EmulatorRegressor) and model.kind == kind and model.latent_dims == latent
        assert model.batch_keys == ("flux", "weight", "labels", "nuisance")


# -- end to end through train.py, eval.py and predict.py -------------------------------------------------
def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True)


# early stopping set to fire at the second epoch: the emulator (cosine decay to max_epochs) turns it off
STOP_AT_2 = ["callbacks.early_stopping.patience=1", "callbacks.early_stopping.min_delta=1000"]


@pytest.mark.slow
@pytest.mark.parametrize("model, extra", [("cannon", []), ("emulator", ["trainer.max_epochs=3", *STOP_AT_2])])
def test_train_eval_and_predict_end_to_end(model, extra, tmp_path, warm_cache):
    tiny = [o for o in TINY if not o.startswith("trainer.max_epochs")]
    out = _run("train.py", f"model={model}", *tiny, *extra, f"paths.log_dir={tmp_path}/out", f"paths.cache_dir={warm_cache}")
    assert out.returncode == 0, out.stderr[-3000:]
    run = next((tmp_path / "out" / "train" / "runs").iterdir())
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "ok"
    assert set(metrics["calibration"]) == set(LABELS)  # formal errors go through the calibration report
    assert set(metrics["crlb"]) == set(LABELS)
    if model == "cannon":
        assert metrics["epochs"] == 1
    else:
        assert metrics["epochs"] == 3 and "early stopping is off" in (run / "train.log").read_text()
    predictions = np.genfromtxt(run / "test_predictions.csv", delimiter=",", names=True)
    assert np.isfinite(predictions["teff_sigma"]).all() and (predictions["teff_sigma"] > 0).all()
    ckpt = next((run / "checkpoints").glob("best-*.ckpt"))
    for saved in (ckpt, run / "checkpoints" / "last.ckpt"):  # calibrated after training, written back, checksum renewed
        scale = torch.load(saved, map_location="cpu", weights_only=False)["state_dict"]["sigma_scale"]
        assert torch.isfinite(scale).all() and (scale > 0).all() and not torch.equal(scale, torch.ones_like(scale))
    assert "errors calibrated on" in (run / "train.log").read_text()

    evaluated = _run("eval.py", f"ckpt_path={ckpt}", f"paths.log_dir={tmp_path}/eval", f"paths.cache_dir={warm_cache}",
                     "trainer.accelerator=cpu")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    again = json.loads(next((tmp_path / "eval").rglob("metrics.json")).read_text())
    for label in LABELS:
        assert again["test"][label]["rmse"] == pytest.approx(metrics["test"][label]["rmse"], rel=1e-5)

    from astropy.table import Table

    from stellarlab.data.synthetic import SyntheticDataModule

    dm = SyntheticDataModule(n_stars=600, split=[0.7, 0.15, 0.15], cache_dir=str(warm_cache / "synthetic"))
    dm.setup()
    n = len(dm.split_index["test"])  # the whole split, fitted in one batch as the test step fits it
    np.save(tmp_path / "flux.npy", dm.tensors["test"]["flux"].numpy())
    np.save(tmp_path / "flux_ivar.npy", dm.tensors["test"]["weight"].numpy())  # read beside the flux
    predicted = _run("predict.py", f"ckpt_path={ckpt}", f"input={tmp_path / 'flux.npy'}", f"paths.log_dir={tmp_path}/pred")
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    catalog = Table.read(next((tmp_path / "pred").rglob("predictions.csv")), format="ascii.csv")
    assert len(catalog) == n
    for label in LABELS:  # the test step's fits, errors included. This 3-epoch emulator has minima a few chi-square
        # units apart, so rounding that differs with the batch's size could pick another one: hence the same batch
        diff = np.abs(catalog[label.upper()] - predictions[f"{label}_pred"])
        assert (diff < 0.01 * predictions[f"{label}_sigma"]).all(), diff.max()
        np.testing.assert_allclose(catalog[f"{label.upper()}_ERR"], predictions[f"{label}_sigma"], rtol=1e-3)
