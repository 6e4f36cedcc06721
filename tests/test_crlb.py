"""Cramér–Rao bounds: analytic toy models, the generator's Jacobian, and the synthetic survey's test split."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from stellarlab.synthetic.crlb import (
    crlb_from_fisher,
    crlb_vs_rmse,
    fisher_matrix,
    generator_fisher,
    jacobian,
    pixel_index,
    rms,
    survey_crlb,
)


def _toy(seed=0, n_pixels=40, n_labels=3):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n_pixels, n_labels))
    ivar = rng.uniform(0.5, 4.0, size=n_pixels)  # heteroscedastic: C = diag(1/ivar)
    return a, ivar


def test_linear_model_bound_matches_the_analytic_one():
    """flux = A theta + noise: J = A exactly, F = A^T C^-1 A, bound = sqrt(diag(F^-1))."""
    a, ivar = _toy()
    fn = lambda theta: theta @ torch.as_tensor(a).T  # noqa: E731
    theta = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]], dtype=torch.float64)
    jac = jacobian(fn, theta)
    assert jac.shape == (2, 40, 3)
    np.testing.assert_allclose(jac.numpy(), np.broadcast_to(a, (2, 40, 3)), rtol=0, atol=1e-14)
    fisher = fisher_matrix(jac, ivar)
    expected_f = a.T @ np.diag(ivar) @ a
    np.testing.assert_allclose(fisher, np.broadcast_to(expected_f, (2, 3, 3)), rtol=1e-12)
    sigma, corr = crlb_from_fisher(fisher)
    cov = np.linalg.inv(expected_f)
    np.testing.assert_allclose(sigma[0], np.sqrt(np.diag(cov)), rtol=1e-10)
    np.testing.assert_allclose(corr[0], cov / np.sqrt(np.outer(np.diag(cov), np.diag(cov))), rtol=1e-10, atol=1e-12)
    # the bound scales as 1/SNR: four times the inverse variance halves it
    np.testing.assert_allclose(crlb_from_fisher(fisher_matrix(jac, 4 * ivar))[0], sigma / 2, rtol=1e-12)


def test_the_weighted_least_squares_fit_of_the_linear_model_reaches_the_bound():
    """The bound is tight here: GLS is unbiased with covariance exactly F^-1 (a Monte Carlo check)."""
    a, ivar = _toy(seed=1)
    theta = np.array([1.0, -2.0, 0.5])
    rng = np.random.default_rng(2)
    n = 20_000
    flux = theta @ a.T + rng.standard_normal((n, len(ivar))) / np.sqrt(ivar)
    f = a.T @ (ivar[:, None] * a)
    estimates = np.linalg.solve(f, (a.T * ivar) @ flux.T).T
    sigma, _ = crlb_from_fisher(f)
    np.testing.assert_allclose(estimates.mean(0), theta, atol=4 * sigma[0].max() / math.sqrt(n))
    np.testing.assert_allclose(estimates.std(0), sigma[0], rtol=0.03)  # sampling error of a std: 1/sqrt(2n) = 0.5 %


def test_two_label_bound_and_correlation_are_the_closed_form():
    f = np.array([[4.0, 1.5], [1.5, 1.0]])
    det = 4.0 - 1.5**2
    sigma, corr = crlb_from_fisher(f)
    assert sigma[0] == pytest.approx([math.sqrt(1.0 / det), math.sqrt(4.0 / det)])
    assert corr[0, 0, 1] == pytest.approx(-1.5 / math.sqrt(4.0))


def test_a_degenerate_fisher_matrix_gives_an_infinite_bound_not_noise():
    a = np.array([[1.0, 2.0], [2.0, 4.0], [0.5, 1.0]])  # the two labels change the flux the same way
    sigma, corr = crlb_from_fisher(a.T @ a)
    assert np.isinf(sigma).all() and np.isnan(corr).all()
    sigma, _ = crlb_from_fisher(np.array([[1.0, 0.0], [0.0, 0.0]]))  # a label with no effect at all
    assert np.isinf(sigma).all()


def test_zero_weight_pixels_carry_no_information_and_shapes_are_checked():
    a, ivar = _toy()
    jac = torch.as_tensor(a)[None]
    masked = ivar.copy()
    masked[:10] = 0.0
    np.testing.assert_allclose(fisher_matrix(jac, masked)[0], a[10:].T @ np.diag(ivar[10:]) @ a[10:], rtol=1e-12)
    with pytest.raises(ValueError, match="does not match"):
        fisher_matrix(jac, ivar[:5])


def test_rms_is_the_aggregate_an_rmse_compares_with():
    assert rms(np.array([3.0, 4.0])) == pytest.approx(math.sqrt(12.5))


# -- the generator -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def apogee():
    from stellarlab.synthetic import SpectrumGenerator

    return SpectrumGenerator("apogee")


def test_generator_jacobian_matches_central_differences(apogee):
    labels = torch.tensor([[4800.0, 2.5, 0.0, 0.0], [6200.0, 4.2, -0.8, 0.2]])
    jac = jacobian(apogee, labels)
    steps = [2.0, 0.01, 0.005, 0.005]
    for k, h in enumerate(steps):
        e = torch.zeros(4)
        e[k] = h
        fd = ((apogee(labels + e).double() - apogee(labels - e).double()) / (2 * h)).numpy()
        an = jac[..., k].double().numpy()
        rel = np.linalg.norm(fd - an, axis=1) / np.linalg.norm(an, axis=1)
        assert rel.max() < 0.01, (k, rel)  # finite differences of float32 spectra: ~1e-3


def test_generator_bounds_agree_with_the_independent_prototype(apogee):
    """docs/synthetic-spectra.md sec. 4 (an independent NumPy prototype, SNR 100): same physics, so bounds within 1.5x."""
    stars = np.array([[4800, 2.5, 0, 0], [5777, 4.44, 0, 0], [4800, 2.5, -2, 0.3]], dtype=np.float32)
    prototype = np.array([[6.1, 0.019, 0.007, 0.003], [7.0, 0.024, 0.007, 0.010], [22.5, 0.135, 0.032, 0.020]])
    ivar = np.where(apogee.valid_mask, 100.0**2, 0.0)[None].repeat(len(stars), 0)
    sigma, corr = crlb_from_fisher(generator_fisher(apogee, stars, ivar))
    ratio = sigma / prototype
    assert ((ratio > 1 / 1.5) & (ratio < 1.5)).all(), ratio
    # and the degeneracies the note lists: T-[Fe/H] in the solar-metallicity giant, T-log g in the other two
    assert corr[0, 0, 2] > 0.85 and corr[1, 0, 1] > 0.7 and corr[2, 0, 1] > 0.9
    # gap pixels: weight 0 on the full grid is the same as deleting them
    valid = np.flatnonzero(apogee.valid_mask)
    gap_deleted = generator_fisher(apogee, stars[:1], ivar[:1, valid], pixels=valid)
    np.testing.assert_allclose(gap_deleted, generator_fisher(apogee, stars[:1], ivar[:1]), rtol=1e-6)


def test_pixel_index_maps_a_gap_deleted_grid_and_refuses_another_grid(apogee):
    valid = np.flatnonzero(apogee.valid_mask)
    assert pixel_index(apogee.wavelength, apogee.wavelength) is None
    np.testing.assert_array_equal(pixel_index(apogee.wavelength, apogee.wavelength[valid]), valid)
    from stellarlab.errors import DataError

    with pytest.raises(DataError, match="not a subset"):
        pixel_index(apogee.wavelength, apogee.wavelength[:100] + 0.3)


# -- the synthetic survey behind a DataModule ---------------------------------------------------------------
@pytest.fixture(scope="module")
def datamodule(survey_cache):
    """A tiny gap-deleted survey with a per-spectrum SNR range: every path the bound has to get right."""
    from stellarlab.data import SyntheticDataModule

    dm = SyntheticDataModule(n_stars=50, snr=[30.0, 300.0], gap_deleted=True, split=[40, 4, 6], batch_size=8,
                             cache_dir=str(survey_cache), seed=3)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_survey_bound_uses_each_test_spectrum_with_its_own_snr(datamodule, apogee):
    b = survey_crlb(datamodule)
    assert b["labels"] == ["teff", "logg", "fe_h", "alpha_fe"]  # all generator labels free, though 3 are trained
    assert b["sigma"].shape == (6, 4) and np.isfinite(b["sigma"]).all()
    survey = datamodule.synthetic_survey()
    idx = datamodule.split_index["test"]
    np.testing.assert_array_equal(b["true"], survey.labels[idx])
    np.testing.assert_array_equal(b["snr"], survey.snr[idx])
    # spectrum by spectrum: the generator's Fisher matrix with 1/sigma^2 = SNR^2 on the chip pixels
    valid = np.flatnonzero(apogee.valid_mask)
    ivar = np.repeat((survey.snr[idx].astype(np.float64) ** 2)[:, None], len(valid), axis=1)
    direct = generator_fisher(apogee, survey.labels[idx], ivar, pixels=valid)
    np.testing.assert_allclose(b["fisher"], direct, rtol=1e-5)
    # cached beside the survey: the next call reads the same numbers back
    assert list(Path(survey.cache_path).glob("fisher-test-*.npy"))
    np.testing.assert_array_equal(survey_crlb(datamodule)["fisher"], b["fisher"])


def test_crlb_vs_rmse_reports_the_ratio_per_trained_label(datamodule):
    metrics = {"teff": {"rmse": 30.0}, "logg": {"rmse": 0.1}, "fe_h": {"rmse": 0.05}}
    out = crlb_vs_rmse(datamodule, metrics)
    sigma = survey_crlb(datamodule)["sigma"]
    assert set(out) == {"teff", "logg", "fe_h"}
    for j, label in enumerate(["teff", "logg", "fe_h"]):
        assert out[label]["crlb"] == pytest.approx(math.sqrt(np.mean(sigma[:, j] ** 2)))
        assert out[label]["ratio"] == pytest.approx(metrics[label]["rmse"] / out[label]["crlb"])
        assert out[label]["n"] == 6
    assert crlb_vs_rmse(object(), metrics) is None  # not a synthetic survey: no bound


def test_a_split_of_fewer_stars_than_the_survey_pairs_each_row_with_its_star(survey_cache):
    """data.split as star counts that leave part of the survey out (data.n_stars=10000 data.split=[1000,200,200]):
    the bound follows each split row to its survey row instead of refusing."""
    from stellarlab.data import SyntheticDataModule

    dm = SyntheticDataModule(n_stars=50, snr=[30.0, 300.0], gap_deleted=True, split=[20, 4, 6], batch_size=8,
                             cache_dir=str(survey_cache), seed=3)
    dm.prepare_data()
    dm.setup("fit")
    b = survey_crlb(dm)
    rows = dm.split_ids("test")["row"]
    survey = dm.synthetic_survey()
    assert b["sigma"].shape == (6, 4) and np.isfinite(b["sigma"]).all()
    np.testing.assert_array_equal(b["true"], survey.labels[rows])
    np.testing.assert_array_equal(b["snr"], survey.snr[rows])
