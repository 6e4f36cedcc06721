"""The figures a user checks a model and a catalogue with: the catalogue's Kiel diagram and label histograms,
a test run's RMSE vs SNR (with the Cramér–Rao bound) and z-scores; each a readable PNG, in the run folder
and in TensorBoard."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.collections import PathCollection, PolyCollection
from matplotlib.image import imread

from stellarlab.metrics import calibration_summary
from stellarlab.results import plots
from stellarlab.results.plots import (
    DPI,
    MIN_PER_SNR_BIN,
    figures_of_test,
    kiel_figure,
    label_histograms_figure,
    rmse_by_snr,
    rmse_vs_snr_figure,
    snr_bins,
    write_figures,
    write_prediction_figures,
    zscore_figure,
)

LABELS = ["teff", "logg", "fe_h"]


def catalogue(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"teff": rng.normal(4800, 500, n), "logg": rng.normal(2.8, 0.8, n), "fe_h": rng.normal(-0.3, 0.3, n),
            "alpha_fe": rng.normal(0.1, 0.05, n)}


def assert_png(path: Path, figsize: tuple[float, float]) -> None:
    """A PNG matplotlib reads back, of the figure's size at the figures' resolution."""
    image = imread(path)
    assert image.shape[:2] == (round(figsize[1] * DPI), round(figsize[0] * DPI)), image.shape
    assert image.std() > 0.01  # not blank


def only_collection(fig, kind) -> object:
    found = [c for ax in fig.axes for c in ax.collections if isinstance(c, kind)]
    assert len(found) == 1, [type(c).__name__ for ax in fig.axes for c in ax.collections]
    return found[0]


def texts(fig) -> str:
    return "\n".join(t.get_text() for ax in fig.axes for t in ax.texts)


# -- a catalogue ---------------------------------------------------------------------------------------
def test_prediction_figures_are_readable_pngs_of_their_size(tmp_path):
    values = catalogue(2000)
    written = write_prediction_figures(values, ["teff", "logg", "fe_h", "alpha_fe"], tmp_path)
    assert written == [tmp_path / "kiel.png", tmp_path / "label_histograms.png"]
    assert_png(tmp_path / "kiel.png", (6.4, 5.4))
    assert_png(tmp_path / "label_histograms.png", (4 * 3.6, 3.0))
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_kiel_is_a_scatter_for_few_stars_and_a_hexbin_of_mean_metallicity_for_many():
    small = kiel_figure(catalogue(1000), LABELS)
    only_collection(small, PathCollection)
    assert not [c for c in small.axes[0].collections if isinstance(c, PolyCollection)]
    # two clumps of stars, each of one [Fe/H]: every cell's colour is its clump's value, not a count
    n = plots.HEXBIN_ABOVE + 1000
    rng = np.random.default_rng(1)
    giant = rng.random(n) < 0.5
    values = {"teff": np.where(giant, 4500.0, 6000.0) + rng.normal(0, 50, n),
              "logg": np.where(giant, 2.0, 4.3) + rng.normal(0, 0.05, n),
              "fe_h": np.where(giant, -1.0, 0.25)}
    big = kiel_figure(values, LABELS)
    cells = only_collection(big, PolyCollection).get_array()
    assert len(cells) > 20 and np.allclose(np.unique(np.round(cells, 6)), [-1.0, 0.25])
    ax = big.axes[0]
    assert ax.xaxis_inverted() and ax.yaxis_inverted()  # hot stars left, giants up
    assert ax.get_xlabel() == "Teff [K]" and ax.get_ylabel() == "log g [dex]"
    assert big.axes[1].get_ylabel() == "mean [Fe/H] [dex] per cell"


def test_kiel_without_metallicity_counts_stars_and_masked_values_are_no_value():
    values = catalogue(plots.HEXBIN_ABOVE + 10)
    del values["fe_h"]
    fig = kiel_figure(values, ["teff", "logg"])
    cells = only_collection(fig, PolyCollection).get_array()
    assert cells.sum() == plots.HEXBIN_ABOVE + 10 and fig.axes[1].get_ylabel() == "stars per cell"
    values = catalogue(300)
    values["teff"] = np.ma.masked_array(values["teff"], mask=np.arange(300) < 100)
    values["fe_h"][:50] = np.nan  # among the masked Teff; 50 more without [Fe/H]
    values["fe_h"][150:200] = np.nan
    fig = kiel_figure(values, LABELS)
    assert "200 stars of 300, 50 without [Fe/H]" in fig.axes[0].get_title()
    assert sum(len(c.get_offsets()) for c in fig.axes[0].collections) == 200


def test_labels_without_teff_or_logg_give_histograms_only_and_say_so(tmp_path, caplog):
    values = catalogue(500)
    with caplog.at_level(logging.INFO, logger="stellarlab.results.plots"):
        written = write_prediction_figures({"fe_h": values["fe_h"], "alpha_fe": values["alpha_fe"]}, ["fe_h", "alpha_fe"], tmp_path)
    assert written == [tmp_path / "label_histograms.png"]
    assert "no Kiel diagram" in caplog.text and "histograms only" in caplog.text
    assert_png(written[0], (2 * 3.6, 3.0))
    assert kiel_figure(values, ["teff", "fe_h"]) is None  # teff without logg


def test_histograms_have_physical_units_and_count_what_is_missing_or_far_out():
    values = catalogue(1000)
    values["teff"][:3] = 1e6  # three wild predictions
    values["fe_h"][:] = np.nan
    fig = label_histograms_figure(values, ["teff", "logg", "fe_h", "alpha_fe"])
    assert [ax.get_xlabel() for ax in fig.axes] == ["Teff [K]", "log g [dex]", "[Fe/H] [dex]", "[alpha/Fe] [dex]"]
    teff, _, feh, _ = fig.axes
    assert teff.get_xlim()[1] < 1e4 and "outside 3" in teff.texts[0].get_text()
    assert feh.texts[0].get_text() == "no values"


def test_a_large_catalogue_is_drawn_quickly(tmp_path):
    import time

    values = catalogue(300_000)
    start = time.perf_counter()
    write_prediction_figures(values, ["teff", "logg", "fe_h", "alpha_fe"], tmp_path)
    assert time.perf_counter() - start < 10


# -- a test run ----------------------------------------------------------------------------------------
def noisy_test_set(n: int, seed: int = 0, sigma_scale: float = 1.0):
    """Predictions with Gaussian errors of a known sigma that falls as 1/SNR."""
    rng = np.random.default_rng(seed)
    snr = np.exp(rng.uniform(np.log(20), np.log(300), n))
    true = np.column_stack([rng.uniform(4000, 6000, n), rng.uniform(1, 5, n), rng.uniform(-1, 0.4, n)])
    sigma = np.column_stack([3000.0, 3.0, 1.5])[0] / snr[:, None] * np.ones((1, 3))
    pred = true + rng.standard_normal((n, 3)) * sigma * sigma_scale
    return pred, true, sigma, snr


def test_snr_bins_hold_enough_stars_and_one_snr_is_one_bin():
    _, _, _, snr = noisy_test_set(1000)
    bins = snr_bins(snr)
    counts = np.bincount(bins)
    assert len(counts) == 10 and counts.min() >= MIN_PER_SNR_BIN
    order = np.argsort(snr)
    assert (np.diff(bins[order]) >= 0).all()  # bins follow SNR
    assert (snr_bins(snr[:100]) >= 0).all() and snr_bins(snr[:100]).max() == 1  # 100 stars: 2 bins of >= 40
    assert set(snr_bins(np.full(500, 100.0))) == {0}
    with_nan = np.r_[snr[:100], np.nan]
    assert snr_bins(with_nan)[-1] == -1


def test_rmse_falls_with_snr_and_the_bound_is_the_rms_of_the_stars_bounds():
    pred, true, sigma, snr = noisy_test_set(4000)
    stats = rmse_by_snr(pred, true, snr, bound=sigma)
    assert (np.diff(stats["snr"]) > 0).all() and (np.diff(stats["rmse"][:, 0]) < 0).all()
    assert stats["n"].sum(axis=0).tolist() == [4000] * 3
    rows = snr_bins(snr) == 0
    assert stats["bound"][0, 1] == pytest.approx(np.sqrt(np.mean(sigma[rows, 1] ** 2)))
    # errors drawn with these sigmas: RMSE / bound ~ 1 in every bin
    assert np.allclose(stats["rmse"] / stats["bound"], 1.0, atol=0.2)
    fig = rmse_vs_snr_figure(pred, true, snr, LABELS, bound=sigma)
    assert [line.get_label() for line in fig.axes[0].get_lines() if not line.get_label().startswith("_")] == ["Cramér–Rao bound"]
    assert fig.axes[0].get_ylabel() == "RMSE Teff [K]" and fig.axes[0].get_xscale() == "log"
    no_bound = rmse_vs_snr_figure(pred, true, snr, LABELS)
    assert "Cramér–Rao bound" not in [line.get_label() for line in no_bound.axes[0].get_lines()]


def fraction_annotated(fig, panel: int) -> float:
    return float(re.search(r"\|z\|<1: ([\d.]+) %", fig.axes[panel].texts[0].get_text()).group(1))


def test_z_scores_of_right_sigmas_show_68_percent_and_of_wrong_ones_do_not():
    pred, true, sigma, _ = noisy_test_set(20_000, seed=3)
    fig = zscore_figure(pred, true, sigma, LABELS)
    for j in range(3):
        frac = calibration_summary((pred[:, j] - true[:, j]) / sigma[:, j])["frac_within_1sigma"]
        assert fraction_annotated(fig, j) == round(100 * frac, 1)
        assert fraction_annotated(fig, j) == pytest.approx(68.3, abs=1.0)
    assert "(Gaussian 68.3 %)" in texts(fig)
    # the unit Gaussian drawn over a histogram normalised to density
    x, y = fig.axes[0].get_lines()[0].get_data()
    assert y.max() == pytest.approx(1 / np.sqrt(2 * np.pi), rel=1e-3) and x.min() == -plots.Z_RANGE
    over = zscore_figure(*noisy_test_set(20_000, seed=3, sigma_scale=2.0)[:3], LABELS)  # sigmas half the errors
    assert fraction_annotated(over, 0) == pytest.approx(38.3, abs=1.5)


class FakeData:
    """What the test figures read from a DataModule: the test split's arrays."""

    def __init__(self, snr: np.ndarray | None):
        self.arrays = {"labels_phys": torch.zeros(len(snr) if snr is not None else 0, 3)}
        if snr is not None:
            self.arrays["snr"] = torch.as_tensor(snr, dtype=torch.float32)

    def split_arrays(self, split: str) -> dict:
        assert split == "test"
        return self.arrays


def test_test_figures_written_and_skipped_with_a_reason(tmp_path, caplog):
    pred, true, sigma, snr = noisy_test_set(600)
    results = {"pred": pred, "true": true, "sigma": sigma}
    figures = figures_of_test(results, FakeData(snr), LABELS)
    assert list(figures) == ["test/pred_vs_true", "test/rmse_vs_snr", "test/z_scores"]
    del figures["test/pred_vs_true"]  # drawn as before; its file is checked end to end below
    written = write_figures(figures, tmp_path)
    assert [p.name for p in written] == ["test_rmse_vs_snr.png", "test_z_scores.png"]
    for path, size in zip(written, [(4.0 * 3, 3.8), (3.8 * 3, 3.4)]):
        assert_png(path, size)
    with caplog.at_level(logging.INFO, logger="stellarlab.results.plots"):
        assert list(figures_of_test({"pred": pred, "true": true}, FakeData(None), LABELS)) == ["test/pred_vs_true"]
        assert "no RMSE-vs-SNR figure: FakeData has no per-spectrum SNR" in caplog.text
        # a test of one batch (debug=fdr) does not cover the split: no SNR to pair its rows with
        assert "test/rmse_vs_snr" not in figures_of_test({"pred": pred[:32], "true": true[:32]}, FakeData(snr), LABELS)
        assert "the test predicted 32 rows of a 600-spectrum split" in caplog.text


def test_a_figure_that_fails_is_logged_and_the_others_are_drawn(caplog):
    pred, true, sigma, snr = noisy_test_set(200)
    with caplog.at_level(logging.WARNING, logger="stellarlab.results.plots"):
        figures = figures_of_test({"pred": pred, "true": true, "sigma": sigma[:, :2]}, FakeData(snr), LABELS)
    assert list(figures) == ["test/pred_vs_true", "test/rmse_vs_snr"]
    assert "figure test/z_scores not drawn: ValueError" in caplog.text


# -- end to end ----------------------------------------------------------------------------------------
def tensorboard_images(run: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    return set(acc.Tags()["images"])


@pytest.mark.slow
def test_a_trained_run_leaves_its_test_figures_in_the_folder_and_tensorboard(trained_run):
    figures = trained_run["run"] / "figures"
    assert_png(figures / "test_pred_vs_true.png", (4.2 * 3, 6.0))
    assert_png(figures / "test_rmse_vs_snr.png", (4.0 * 3, 3.8))
    assert not (figures / "test_z_scores.png").exists()  # loss=mse: no sigmas
    assert {"examples/spectra", "test/pred_vs_true", "test/rmse_vs_snr"} <= tensorboard_images(trained_run["run"])


@pytest.mark.slow
def test_a_run_with_sigmas_shows_z_scores_and_the_bound_computed_once(tiny_cfg, monkeypatch):
    """gaussian_nll on spectra of SNR 30-200: the z-score figure, and RMSE vs SNR drawn with the per-star
    Cramér–Rao bounds, whose Fisher matrices the test step's own bound then reads from the cache."""
    import train as train_script
    from stellarlab.synthetic import crlb

    bounds, fisher_calls = [], []
    draw, fisher = plots.rmse_vs_snr_figure, crlb.generator_fisher
    monkeypatch.setattr(plots, "rmse_vs_snr_figure", lambda *a, **k: bounds.append(a[4]) or draw(*a, **k))
    monkeypatch.setattr(crlb, "generator_fisher", lambda *a, **k: fisher_calls.append(1) or fisher(*a, **k))
    cfg = tiny_cfg("data.snr=[30,200]", "model=linear", "model.loss=gaussian_nll", "optimizer.lr=3e-3",
                   "trainer.max_epochs=4", "bootstrap.n_resamples=0")
    summary = train_script.train(cfg)
    run = Path(cfg.paths.output_dir)
    assert_png(run / "figures" / "test_z_scores.png", (3.8 * 3, 3.4))
    assert_png(run / "figures" / "test_rmse_vs_snr.png", (4.0 * 3, 3.8))
    assert {"test/z_scores", "test/rmse_vs_snr"} <= tensorboard_images(run)
    (bound,) = bounds
    assert bound.shape == (summary["split_sizes"]["test"], 3) and np.isfinite(bound).all()
    assert np.sqrt(np.mean(bound[:, 0] ** 2)) == pytest.approx(summary["crlb"]["teff"]["crlb"], rel=1e-6)
    assert len(fisher_calls) <= 1  # the figure's bounds and the test step's are one computation
