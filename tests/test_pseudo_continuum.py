"""data.normalization=pseudo_continuum: a synthetic spectrum and the same spectrum written as an apStar file
come out of preprocessing identical, because both go through the apStar reader's own continuum fit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stellarlab.data.apogee.files import read_input
from stellarlab.data.apogee.mock import write_apstar
from stellarlab.data.synthetic import SyntheticDataModule
from stellarlab.errors import ConfigError
from stellarlab.grids import APOGEE_CHIP_RANGES, APOGEE_NPIX, apogee_chip_mask, apogee_wavelength
from stellarlab.run.validation import validate_train_config
from tests.conftest import REAL_APSTAR, ROOT, TINY, compose_config

SMALL = dict(n_stars=16, snr=[30, 300], seed=5, split=[8, 4, 4], batch_size=4)
SCALE = 512.0  # flux units of the file: a power of two, so scaled float32 values are exact


def module(cache: Path, **kwargs) -> SyntheticDataModule:
    dm = SyntheticDataModule(**{**SMALL, "cache_dir": str(cache), **kwargs})
    dm.prepare_data()
    return dm


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pseudo-continuum")


@pytest.fixture(scope="module")
def pseudo(cache) -> SyntheticDataModule:
    return module(cache, normalization="pseudo_continuum")


def full_grid(row: np.ndarray, fill: float) -> np.ndarray:
    """A synthetic row (8575 or the 7514 chip pixels) on the 8575-pixel grid, `fill` off the chips."""
    if row.shape[0] == APOGEE_NPIX:
        return np.asarray(row, dtype=np.float64)
    out = np.full(APOGEE_NPIX, fill)
    out[apogee_chip_mask()] = row
    return out


def write_as_apstar(path: Path, flux: np.ndarray, ivar: np.ndarray, continuum: np.ndarray | float = SCALE) -> Path:
    """The noisy synthetic spectrum as a DR17 apStar file: times a continuum in flux units, its error
    1/sqrt(ivar) times the same, NaN off the chips, no mask bit set; row 0 as in a combined file."""
    flux, ivar = full_grid(flux, np.nan), full_grid(ivar, 0.0)
    with np.errstate(divide="ignore"):
        err = (np.float32(1.0) / np.sqrt(ivar.astype(np.float32))).astype(np.float64)
    on = ivar > 0
    flux = np.where(on, flux * continuum, np.nan)
    err = np.where(on, err * continuum, np.nan)
    mask = np.zeros((2, APOGEE_NPIX), dtype=np.int64)
    return write_apstar(path, np.stack([flux, flux]), np.stack([err, err]), mask, objid=path.stem.split("-")[-1])


def chip_continuum(scale: float = 600.0) -> np.ndarray:
    """A smooth instrumental continuum per chip (as `stellarlab.data.apogee.mock` draws them), in flux units."""
    cont = np.ones(APOGEE_NPIX)
    for k, (lo, hi) in enumerate(APOGEE_CHIP_RANGES):
        t = np.linspace(-1, 1, hi - lo)
        cont[lo:hi] = scale * (1.0 - 0.1 * k) * (1.0 + 0.08 * t - 0.06 * t**2 + 0.02 * t**3)
    return cont


@pytest.mark.parametrize("gap_deleted", [False, True])
def test_a_synthetic_spectrum_and_its_apstar_file_come_out_identical(cache, tmp_path, gap_deleted):
    dm = module(cache, normalization="pseudo_continuum", gap_deleted=gap_deleted)
    arrays, survey = dm.load_arrays(), dm.synthetic_survey()
    preprocessing = dm.state_dict()["preprocessing"]  # what the checkpoint carries
    rows = [0, 5, 11]
    files = [write_as_apstar(tmp_path / f"apStar-dr17-2M0000000{i}+0000000.fits", survey.flux[i], survey.ivar[i])
             for i in rows]
    wavelength = apogee_wavelength(gap_deleted)
    for i, path in zip(rows, files):
        flux, weight, ids = read_input(path, "apStar", preprocessing, wavelength)  # predict.py's apStar reader
        assert ids == [path.stem.removeprefix("apStar-dr17-")]
        np.testing.assert_allclose(flux[0], arrays.flux[i], rtol=0, atol=1e-6)
        np.testing.assert_allclose(weight[0], arrays.weight[i], rtol=1e-5, atol=0)


def test_the_fit_divides_the_flux_and_scales_the_weight_by_the_continuum_squared(pseudo):
    arrays, survey = pseudo.load_arrays(), pseudo.synthetic_survey()
    flux, weight = np.asarray(arrays.flux), np.asarray(arrays.weight)
    raw_flux, raw_ivar = np.asarray(survey.flux), np.asarray(survey.ivar)
    used = weight > 0
    assert used.sum(axis=1).min() > 7000 and not used[:, ~apogee_chip_mask()].any()
    cont = raw_flux[used] / flux[used]  # the fitted continuum, pixel by pixel
    np.testing.assert_allclose(weight[used], raw_ivar[used] * cont**2, rtol=1e-4)
    assert np.all(flux[~used] == 1.0)
    # line blanketing: the clipped fit still sits below the true continuum (1), so the normalised flux rises
    assert 0.95 < np.median(cont) < 1.0 and np.median(flux[used]) > np.median(raw_flux[used])


def test_a_smooth_instrumental_continuum_changes_the_result_by_much_less_than_the_noise(pseudo, tmp_path):
    """Real files carry a curved continuum: the fit of a curved chip is not exactly the flat chip's fit times the
    curve (the weights change, and the clipping may keep other pixels), but it moves the flux by a small fraction
    of the noise; most at the chip edges, where a polynomial fit is least certain."""
    arrays, survey = pseudo.load_arrays(), pseudo.synthetic_survey()
    preprocessing = pseudo.state_dict()["preprocessing"]
    for i in (1, 2, 3):
        path = write_as_apstar(tmp_path / f"apStar-dr17-2M0000000{i}+0000001.fits", survey.flux[i], survey.ivar[i],
                               chip_continuum())
        flux, weight, _ = read_input(path, "apStar", preprocessing, apogee_wavelength())
        used = np.asarray(arrays.weight[i]) > 0
        assert np.array_equal(weight[0] > 0, used)
        diff = np.abs(flux[0] - arrays.flux[i])[used]
        noise = 1.0 / float(survey.snr[i])
        assert np.median(diff) < 0.1 * noise and diff.max() < 2 * noise


def test_true_continuum_is_the_default_and_keeps_the_survey_arrays(cache, pseudo):
    plain = module(cache)
    arrays, survey = plain.load_arrays(), plain.synthetic_survey()
    assert plain.normalization == "true_continuum" and plain.normalised_cache() is None
    assert arrays.flux is survey.flux and arrays.weight is survey.ivar
    preprocessing = plain.preprocessing_config()
    assert preprocessing["normalization"] == "true_continuum" and "pixels" not in preprocessing
    assert pseudo.synthetic_survey().cache_path == survey.cache_path  # one survey, generated once
    assert not np.array_equal(np.asarray(pseudo.load_arrays().flux), np.asarray(arrays.flux))


def test_the_normalised_arrays_have_their_own_cache_key(cache, pseudo):
    survey_folder = Path(pseudo.synthetic_survey().cache_path)
    normalised = pseudo.normalised_cache()
    assert normalised.exists() and normalised.path.parent == survey_folder
    assert normalised.path.name.startswith("pseudo_continuum-") and normalised.path != survey_folder
    assert {p.name for p in normalised.path.glob("*.npy")} == {"flux.npy", "weight.npy"}
    assert normalised.meta["config"]["normalization"] == "pseudo_continuum"
    other_fit = module(cache, normalization="pseudo_continuum", continuum={"degree": 2})
    assert other_fit.normalised_cache().key != normalised.key
    assert other_fit.synthetic_survey().cache_path == str(survey_folder)
    other_survey = module(cache, normalization="pseudo_continuum", seed=6)
    assert other_survey.normalised_cache().key != normalised.key
    # a second DataModule reads the cache as it is (memory-mapped), it does not fit again
    created = normalised.meta["created"]
    again = module(cache, normalization="pseudo_continuum")
    assert isinstance(again.load_arrays().flux, np.memmap) and again.normalised_cache().meta["created"] == created


def test_the_checkpoint_records_the_fit_and_predict_reads_real_apstar_files_with_it(cache, pseudo):
    preprocessing = pseudo.state_dict()["preprocessing"]
    assert preprocessing["normalization"] == "pseudo_continuum"
    assert preprocessing["pixels"] == {"source": "apStar", "max_flux_error": 1.0, "gap_deleted": False,
                                       "continuum_degree": 3, "continuum_iterations": 5, "clip_low": 2.0, "clip_high": 3.0}
    flux, weight, ids = read_input(REAL_APSTAR, "apStar", preprocessing, apogee_wavelength())
    assert ids == ["2M19485057+5005279"] and np.isfinite(flux).all()
    assert 0.99 < np.median(flux[weight > 0]) < 1.0
    # the real file's APOGEE_PIXMASK still applies (the synthetic data have none to record)
    unmasked = {**preprocessing, "pixels": {**preprocessing["pixels"], "pixmask": 0}}
    assert (weight > 0).sum() < (read_input(REAL_APSTAR, "apStar", unmasked, apogee_wavelength())[1] > 0).sum()
    # another fit in the data is another fit in predict.py
    degree2 = module(cache, normalization="pseudo_continuum", continuum={"degree": 2}).state_dict()["preprocessing"]
    assert degree2["pixels"]["continuum_degree"] == 2
    assert not np.allclose(read_input(REAL_APSTAR, "apStar", degree2, apogee_wavelength())[0], flux)


# (constructor arguments, the same as train.py overrides or None, the message's start)
BAD = [
    (dict(normalization="pseudocontinuum"), ["data.normalization=pseudocontinuum"],
     "data.normalization=pseudocontinuum is not valid; did you mean data.normalization=pseudo_continuum?"),
    (dict(normalization="exact"), ["data.normalization=exact"],
     "data.normalization=exact is not valid; valid values: true_continuum, pseudo_continuum"),
    (dict(normalization="pseudo_continuum", survey="galah"), ["data=synthetic_galah", "data.normalization=pseudo_continuum"],
     "data.normalization=pseudo_continuum is the apStar per-chip continuum fit and applies to the APOGEE grid only"),
    (dict(continuum={"degre": 3}), ["+data.continuum.degre=3"],
     "data.continuum: unknown key(s) degre; valid keys: degree, iterations, clip_low, clip_high"),
    (dict(continuum={"degree": -1}), ["data.continuum.degree=-1"], "data.continuum.degree=-1 is not valid"),
    (dict(continuum={"clip_low": 0}), ["data.continuum.clip_low=0"], "data.continuum.clip_low=0 is not valid"),
    (dict(continuum=3), None, "data.continuum=3 is not valid: give a mapping"),
]


@pytest.mark.parametrize(("values", "overrides", "start"), BAD)
def test_bad_values_are_one_config_error_line(tmp_path, values, overrides, start):
    with pytest.raises(ConfigError) as called:
        SyntheticDataModule(cache_dir=str(tmp_path), **values)
    assert str(called.value).startswith(start) and "\n" not in str(called.value)
    if overrides is not None:
        cfg = compose_config([*TINY, *overrides], tmp_path=tmp_path)
        with pytest.raises(ConfigError) as checked:  # the config check, before any data is made
            validate_train_config(cfg)
        assert str(checked.value) == str(called.value)


def test_the_sim2real_recipe_composes():
    cfg = compose_config(["experiment=sim2real_apogee"])
    assert cfg.data.normalization == "pseudo_continuum" and list(cfg.data.snr) == [30, 300]
    assert cfg.data.survey == "apogee" and cfg.model._target_.endswith("CNNRegressor") and "sim2real" in cfg.tags
    validate_train_config(cfg)


@pytest.mark.slow
def test_a_tiny_sim2real_run_predicts_the_real_apstar_file(tmp_path, survey_cache):
    overrides = ["experiment=sim2real_apogee", "data.n_stars=300", "data.split=[200,50,50]", "data.batch_size=32",
                 "trainer.max_epochs=2", "trainer.accelerator=cpu", "~callbacks.progress_bar", "bootstrap.n_resamples=0",
                 f"paths.log_dir={tmp_path}/out", f"paths.cache_dir={survey_cache}"]
    train = subprocess.run([sys.executable, "train.py", *overrides], cwd=ROOT, capture_output=True, text=True)
    assert train.returncode == 0, train.stderr[-2000:]
    ckpt = next((tmp_path / "out" / "train" / "runs").glob("*/checkpoints/best-*.ckpt"))
    predict = subprocess.run([sys.executable, "predict.py", f"ckpt_path={ckpt}", f"input={REAL_APSTAR}",
                              f"paths.log_dir={tmp_path}/predict"], cwd=ROOT, capture_output=True, text=True)
    assert predict.returncode == 0, predict.stderr[-2000:]
    from astropy.table import Table

    row = Table.read(next((tmp_path / "predict").rglob("predictions.csv")), format="ascii.csv")[0]
    columns = {name.lower(): name for name in row.colnames}  # stellarlab's names or the survey's (TEFF, ...)
    assert "2M19485057+5005279" in [str(v) for v in row]
    assert all(np.isfinite(row[columns[label]]) for label in ("teff", "logg", "fe_h"))
