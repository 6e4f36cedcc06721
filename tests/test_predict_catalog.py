"""predict.py's catalogue in the survey's own terms, streamed: names and units astropy reads back, masked errors,
provenance, ids per input kind, the SPLIT column, skipped files, bounded memory, resampled errors, option checks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import astropy.units as u
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from astropy.io import fits
from astropy.table import Table
from omegaconf import OmegaConf

from stellarlab.data import SpectraArrays
from stellarlab.data.apogee.mock import write_apstar, write_aspcapstar
from stellarlab.data.flux import open_npy, resample
from stellarlab.data.surveys import CATALOG_NAMES, catalog_names
from stellarlab.errors import ConfigError, DataError
from stellarlab.grids import apogee_wavelength
from stellarlab.models import LinearRegressor
from stellarlab.results import catalog, predict_block, prediction
from tests.conftest import REAL_APSTAR, ROOT
from tests.test_datamodule import ArraysDataModule, make_arrays

LABELS = ["teff", "logg", "fe_h"]
NPIX = 8575


def apogee_model() -> LinearRegressor:
    """A linear model on the APOGEE grid with a saved training range (fast to build and to run)."""
    torch.manual_seed(0)
    return LinearRegressor(NPIX, LABELS, label_mean=[5000.0, 3.0, -0.2], label_std=[500.0, 1.0, 0.3],
                           label_min=[3500.0, 0.0, -2.0], label_max=[7000.0, 5.0, 0.5],
                           wavelength=torch.as_tensor(apogee_wavelength()))


def saved_checkpoint(path: Path, model, preprocessing: dict) -> Path:
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "epoch": 0, "global_step": 0,
                  "pytorch-lightning_version": pl.__version__, "DataModule": {"preprocessing": preprocessing}}
    model.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


def columns(n: int) -> tuple[dict, dict]:
    """ids and values as predict_chunk and a reader give them: an MSE model (no errors), one row without SNR."""
    values = {"file": np.array(["a.npy"] * n)}
    for j, label in enumerate(LABELS):
        values[label] = np.arange(n, dtype=np.float32) + j
        values[f"{label}_err"] = np.full(n, np.nan, np.float32)
        values[f"{label}_outside"] = np.zeros(n, bool)
    values["snr"] = np.array([50.0] * (n - 1) + [np.nan], np.float32)
    values["usable_fraction"] = np.ones(n, np.float32)
    return {"id": np.array([f"a:{i}" for i in range(n)])}, values


# -- names, units, masks, provenance -------------------------------------------------------------------
@pytest.mark.parametrize("style, expected", [
    ("apogee", ["ID", "FILE", "TEFF", "TEFF_ERR", "TEFF_OUTSIDE", "LOGG", "LOGG_ERR", "LOGG_OUTSIDE", "FE_H", "FE_H_ERR",
                "FE_H_OUTSIDE", "SNR", "USABLE_FRACTION"]),
    ("galah", ["id", "file", "teff", "e_teff", "teff_outside", "logg", "e_logg", "logg_outside", "fe_h", "e_fe_h",
               "fe_h_outside", "snr", "usable_fraction"]),
])
def test_columns_have_the_survey_names_units_astropy_reads_back_and_masked_errors(tmp_path, style, expected):
    ids, values = columns(4)
    names = CATALOG_NAMES[style]
    meta = {"checkpoint": "/runs/x/" * 12, "checkpoint_sha256": "ab" * 32, "training_data": {"survey": "apogee"},
            "date": "2026-01-02T03:04:05"}
    paths = catalog.write_catalog(catalog.build_table(ids, values, LABELS, names, meta), tmp_path)
    units = {names.label("teff"): u.K, names.error("teff"): u.K, names.label("logg"): u.dex(u.cm / u.s**2),
             names.error("logg"): u.dex, names.label("fe_h"): u.dex, names.error("fe_h"): u.dex}
    for kind in ("fits", "ecsv"):
        table = Table.read(paths[kind])
        assert table.colnames == expected, kind
        for name, unit in units.items():
            assert table[name].unit == unit, (kind, name)
        for label in LABELS:
            error = table[names.error(label)]
            assert hasattr(error, "mask") and error.mask.all(), (kind, label)  # masked, not NaN values
        assert table[names.column("snr")].mask.tolist() == [False, False, False, True]
        assert not hasattr(table[names.label("teff")], "mask") or not table[names.label("teff")].mask.any()
    header = fits.getheader(paths["fits"], 1)
    assert header["CKPT"] == meta["checkpoint"] and header["CKPTSHA"] == "ab" * 32 and header["DATE"] == meta["date"]
    assert json.loads(header["TRAINDAT"]) == {"survey": "apogee"} and fits.getheader(paths["fits"], 0)["CKPTSHA"] == "ab" * 32
    assert "[dex(cm / s2)]" in header.comments[f"TTYPE{expected.index(names.label('logg')) + 1}"]  # for other readers
    assert Table.read(paths["ecsv"]).meta == meta
    csv = Table.read(paths["csv"], format="ascii.csv")
    assert csv.colnames == expected and list(csv[names.label("teff")]) == [0.0, 1.0, 2.0, 3.0]


def test_a_row_without_labels_keeps_every_unit_in_the_fits_file(tmp_path):
    """A spectrum with too few pixels has no labels: astropy cannot mask a log g in dex(cm/s2) as a quantity, so the
    FITS file holds NaN there and keeps the unit (the ECSV masks it), and no astropy warning reaches the user."""
    import warnings

    ids, values = columns(3)
    for label in LABELS:
        values[label][1] = np.nan
    names = CATALOG_NAMES["apogee"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = catalog.write_catalog(catalog.build_table(ids, values, LABELS, names), tmp_path)
    fits_table, ecsv = Table.read(paths["fits"]), Table.read(paths["ecsv"])
    assert fits_table["LOGG"].unit == u.dex(u.cm / u.s**2) and fits_table["FE_H"].unit == u.dex and fits_table["TEFF"].unit == u.K
    assert np.isnan(fits_table["LOGG"][1]) and list(fits_table["LOGG"][[0, 2]]) == [1.0, 3.0]
    assert fits_table["TEFF"].mask.tolist() == [False, True, False]
    assert ecsv["LOGG"].unit == u.dex(u.cm / u.s**2) and ecsv["LOGG"].mask.tolist() == [False, True, False]


def test_provenance_names_the_checkpoint_by_path_and_sha256(tmp_path):
    model = apogee_model()
    path = saved_checkpoint(tmp_path / "m.ckpt", model, {"datamodule": "APOGEEDataModule", "survey_name": "apogee"})
    meta = catalog.provenance(path, model, {"survey_name": "apogee"}, "apogee", "input=x")
    import hashlib

    import stellarlab

    assert meta["checkpoint_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert meta["checkpoint"] == str(path.resolve()) and meta["stellarlab_version"] == stellarlab.__version__
    assert meta["model_class"] == "stellarlab.models.linear.LinearRegressor" and meta["label_names"] == LABELS
    assert meta["training_data"] == {"survey_name": "apogee"} and meta["date"].count("T") == 1


@pytest.mark.parametrize("preprocessing, style", [
    ({"survey_name": "apogee"}, "apogee"), ({"survey_name": "galah_dr4"}, "galah"), ({"survey_name": "galah4"}, "galah"),
    ({"survey_name": "synthetic", "survey": "apogee"}, "apogee"), ({"survey_name": "synthetic", "survey": "galah"}, "galah"),
    ({"datamodule": "APOGEEDataModule"}, "apogee"),  # a checkpoint from before survey_name
    ({"datamodule": "SyntheticDataModule", "survey": "galah"}, "galah"), ({}, "stellarlab"), ({"survey_name": None}, "stellarlab"),
])
def test_the_catalogue_names_follow_the_survey_the_model_was_trained_on(preprocessing, style):
    assert catalog_names(preprocessing) == (style, CATALOG_NAMES[style])


def test_other_label_columns_keep_their_label_prefix_and_units():
    names = CATALOG_NAMES["apogee"]
    assert catalog.column_name("fe_h_err", ["fe_h", "fe"], names) == "FE_H_ERR"  # the longest label wins
    assert catalog.column_name("mg_fe_true", ["mg_fe"], names) == "MG_FE_TRUE"
    assert catalog.column_name("unlikeness", LABELS, names) == "UNLIKENESS"
    assert catalog.column_unit("logg_true", LABELS) == "dex(cm/s2)" and catalog.column_unit("teff_spread", LABELS) == "K"
    assert catalog.column_unit("teff_outside", LABELS) is None and catalog.column_unit("snr", LABELS) is None


def test_a_failed_write_leaves_no_catalogue_under_its_name(tmp_path, monkeypatch):
    table = catalog.build_table(*columns(3), LABELS, CATALOG_NAMES["apogee"])

    def half_then_fail(table, paths):
        for path in paths.values():
            Path(path).write_text("ID,FILE\n")
        raise OSError("disk full")

    monkeypatch.setattr(catalog, "write_text", half_then_fail)
    with pytest.raises(ConfigError, match=r"cannot write the catalogue predictions\.fits, predictions\.csv, "
                                          r"predictions\.ecsv in .* \(disk full\)"):
        catalog.write_catalog(table, tmp_path)
    assert list(tmp_path.iterdir()) == []  # not the FITS file written before either


# -- ids of each input kind ------------------------------------------------------------------------
def test_apogee_files_name_their_star_telescope_and_field(tmp_path):
    real = prediction.open_input(REAL_APSTAR, "auto", {}, apogee_wavelength()).read()
    assert {k: v[0] for k, v in real.ids.items()} == {"APOGEE_ID": "2M19485057+5005279", "TELESCOPE": "", "FIELD": "K04_083+13"}
    assert real.snr[0] == pytest.approx(137.4889561519403)  # the header's SNR
    flux, err = np.ones(NPIX), np.full(NPIX, 0.01)
    in_layout = write_aspcapstar(tmp_path / "lco25m" / "F1" / "aspcapStar-dr17-2M1.fits", flux, err, objid="2M1")
    rows = prediction.open_input(in_layout, "auto", {}, apogee_wavelength()).read()
    assert {k: v[0] for k, v in rows.ids.items()} == {"APOGEE_ID": "2M1", "TELESCOPE": "lco25m", "FIELD": "F1"}
    assert np.isnan(rows.snr[0])  # no SNR in an aspcapStar header: estimated from flux and errors later
    lco = write_apstar(tmp_path / "asStar-dr17-2M2.fits", 1000 * flux, 10 * err, np.zeros(NPIX, np.int64), objid="2M2")
    ids = prediction.open_input(lco, "auto", {}, apogee_wavelength()).read().ids
    assert ids["APOGEE_ID"] == ["2M2"] and ids["TELESCOPE"] == ["lco25m"]  # asStar: LCO's


def test_npy_rows_are_file_colon_row_and_read_a_block_at_a_time(tmp_path):
    flux = np.random.default_rng(0).uniform(0.5, 1.0, (7, NPIX)).astype(np.float32)
    flux[3, :10] = np.nan
    np.save(tmp_path / "flux.npy", flux)
    source = open_npy(tmp_path / "flux.npy", "npy", {}, apogee_wavelength())
    block = source.read(2, 5)
    assert block.ids == {"id": ["flux:2", "flux:3", "flux:4"]} and source.n_rows == 7
    np.testing.assert_array_equal(block.flux[0], flux[2])
    assert (block.weight[1, :10] == 0).all() and (block.weight[0] == 1).all()  # flux only: finite pixels weigh 1
    ivar = np.full_like(flux, 400.0)
    np.save(tmp_path / "flux_ivar.npy", ivar)  # beside it: the inverse variance
    weighted = open_npy(tmp_path / "flux.npy", "npy", {}, apogee_wavelength()).read(3, 4)
    assert (weighted.weight[0, :10] == 0).all() and (weighted.weight[0, 10:] == 400.0).all()
    np.save(tmp_path / "one.npy", flux[0])
    assert open_npy(tmp_path / "one.npy", "npy", {}, apogee_wavelength()).read().ids == {"id": ["one"]}
    np.save(tmp_path / "flux_ivar.npy", ivar[:3])
    with pytest.raises(DataError, match=r"flux_ivar\.npy holds \[3, 8575\] but .*flux\.npy \[7, 8575\]"):
        open_npy(tmp_path / "flux.npy", "npy", {}, apogee_wavelength())


def test_a_grid_given_is_used_even_for_as_many_pixels_as_the_models(tmp_path):
    """input_wavelength is the user's word on the file's grid: another wavelength solution of the same length is
    resampled (a line moved by a pixel comes back where it belongs), the model's own grid is read as it is, and a
    file that is not there is an error, not ignored."""
    wave = apogee_wavelength()
    flux = np.ones((1, NPIX), np.float32)
    flux[0, 4000] = 0.5  # one absorbed pixel
    np.save(tmp_path / "flux.npy", flux)
    np.save(tmp_path / "own.npy", wave)
    np.save(tmp_path / "shifted.npy", np.concatenate([wave[1:], [wave[-1] + (wave[-1] - wave[-2])]]))  # one pixel off
    own = open_npy(tmp_path / "flux.npy", "npy", {}, wave, str(tmp_path / "own.npy")).read()
    np.testing.assert_array_equal(own.flux, flux)
    moved = open_npy(tmp_path / "flux.npy", "npy", {}, wave, str(tmp_path / "shifted.npy")).read()
    assert int(np.argmin(moved.flux[0])) == 4001 and moved.flux[0, 4001] == pytest.approx(0.5, abs=0.05)
    with pytest.raises(DataError, match=r"input_wavelength=.*nope\.npy: not a readable \.npy array"):
        open_npy(tmp_path / "flux.npy", "npy", {}, wave, str(tmp_path / "nope.npy"))


@pytest.mark.slow
def test_galah_dr4_rows_keep_sobject_id_and_gaia_id(tmp_path, survey_cache):
    from stellarlab.data.galah.dr4 import GALAHDR4DataModule
    from tests.galah_fixtures import synthetic_galah, write_galah_dr4

    fx = write_galah_dr4(tmp_path / "dr4", synthetic_galah(24, cache_dir=survey_cache), n_rows=24)
    dm = GALAHDR4DataModule(root=str(fx.root), batch_size=4, snr_min=None, cache_dir=str(tmp_path / "cache"))
    dm.setup()
    for split in ("train", "val", "test"):
        ids = dm.split_ids(split)
        assert set(ids) == {"star_id", "sobject_id", "gaiadr3_source_id"}
        rows = np.searchsorted(fx.sobject_id, ids["sobject_id"])
        np.testing.assert_array_equal(fx.sobject_id[rows], ids["sobject_id"])
        np.testing.assert_array_equal(fx.gaia_id[rows], ids["gaiadr3_source_id"])
        np.testing.assert_allclose(dm.split_arrays(split)["labels_phys"].numpy()[:, 0], fx.labels[rows, 0], rtol=1e-6)


# -- which rows the model was trained on ---------------------------------------------------------------
class NamedStars(ArraysDataModule):
    survey_name = "apogee"
    star_id_name = "APOGEE_ID"


def test_the_split_column_says_where_each_row_was_in_training(tmp_path):
    arrays = make_arrays(n=120, p=10)
    trained = ArraysDataModule(arrays, split=[0.6, 0.2, 0.2], batch_size=8)
    trained.setup()
    torch.save({"record": trained.split_record()}, tmp_path / "r.pt")
    record = torch.load(tmp_path / "r.pt", weights_only=True)["record"]  # as a checkpoint carries it

    again = ArraysDataModule(arrays, split=[0.6, 0.2, 0.2], batch_size=8, labels=["teff", "fe_h"])  # fewer labels: same stars
    again.setup()
    splits, how = again.splits_of_training(record, None)
    assert how == "the data and split the checkpoint was trained on"
    assert {s: set(v) for s, v in splits.items()} == {"train": {"train"}, "val": {"val"}, "test": {"test"}}

    other = make_arrays(n=120, p=10, seed=1)  # the same star ids, other stars (other labels): no claim
    unknown = ArraysDataModule(other, split=[0.6, 0.2, 0.2], batch_size=8)
    unknown.setup()
    assert unknown.splits_of_training(record, None) == (None, "other stars, labels or split than the training data, "
                                                               "and star ids that name no star outside their data")
    assert unknown.splits_of_training(None, None)[0] is None

    named = NamedStars(arrays, split=[0.6, 0.2, 0.2], batch_size=8)
    named.setup()
    reshuffled = NamedStars(SpectraArrays(arrays.flux[:90], arrays.weight[:90], arrays.labels[:90], arrays.label_names,
                                          arrays.star_id[:90], arrays.wavelength), split=[0.5, 0.25, 0.25], split_seed=7,
                            batch_size=8)
    reshuffled.setup()
    splits, how = reshuffled.splits_of_training(named.split_record(), "apogee")
    assert how == "other data of the same survey: matched star by star (APOGEE_ID)"
    side = {int(star): s for s in ("train", "val", "test") for star in named.split_ids(s)["star_id"]}
    for split, column in splits.items():
        assert column.tolist() == [side[int(star)] for star in reshuffled.split_ids(split)["star_id"]]
    real = NamedStars(other, batch_size=8)
    real.setup()
    splits, how = real.splits_of_training(record, "synthetic")  # a synthetic-survey model on real spectra
    assert {v for c in splits.values() for v in c} == {"none"} and "no star in common" in how


# -- streaming, skipped files -------------------------------------------------------------------------
def test_streamed_blocks_give_the_in_memory_predictions_in_input_order(tmp_path):
    model = apogee_model()
    rng = np.random.default_rng(0)
    flux = (1 - 0.2 * rng.random((50, NPIX))).astype(np.float32)
    np.save(tmp_path / "a.npy", flux[:37])
    np.save(tmp_path / "b.npy", flux[37:])
    files = prediction.find_inputs(str(tmp_path), "auto")
    tasks = prediction.file_tasks(files, "auto", {}, apogee_wavelength(), None, 16, 32, [])
    result = prediction.stream_predictions(model, tasks, batch_size=16, trust=0.2, workers=1, progress=False)
    ids, values = result.columns.joined()
    assert ids["id"].tolist() == [f"a:{i}" for i in range(37)] + [f"b:{i}" for i in range(13)]
    labels, _ = predict_block.predict(model, flux, 64)
    np.testing.assert_allclose(values["teff"], labels[:, 0], rtol=1e-5)
    assert np.isnan(values["teff_err"]).all() and (values["usable_fraction"] == 1).all()


def test_a_corrupt_file_in_a_folder_is_skipped_and_listed_and_strict_lists_them_all(tmp_path, caplog):
    model = apogee_model()
    flux, err = np.ones(NPIX), np.full(NPIX, 0.01)
    folder = tmp_path / "spectra"
    for i in (1, 2):
        write_aspcapstar(folder / f"aspcapStar-dr17-2M{i}.fits", flux, err, objid=f"2M{i}")
    good = (folder / "aspcapStar-dr17-2M1.fits").read_bytes()
    (folder / "aspcapStar-dr17-2M3.fits").write_bytes(good[: len(good) // 2])  # truncated
    (folder / "aspcapStar-dr17-2M4.fits").write_bytes(b"SIMPLE  = garbage" + b" " * 3000)  # unreadable header
    fits.HDUList([fits.PrimaryHDU()]).writeto(folder / "aspcapStar-dr17-2M5.fits")  # no spectrum HDUs
    files = prediction.find_inputs(str(folder), "auto")
    result = prediction.Pass()
    tasks = prediction.file_tasks(files, "auto", {}, apogee_wavelength(), None, 1024, 2, result.skipped)
    prediction.stream_predictions(model, tasks, batch_size=64, trust=0.2, workers=2, progress=False, result=result)
    ids, _ = result.columns.joined()
    assert ids["APOGEE_ID"].tolist() == ["2M1", "2M2"]
    skipped = {Path(s["file"]).name: s["error"] for s in result.skipped}
    assert sorted(skipped) == ["aspcapStar-dr17-2M3.fits", "aspcapStar-dr17-2M4.fits", "aspcapStar-dr17-2M5.fits"]
    assert all(name in message and "download it again" in message for name, message in skipped.items())
    from stellarlab.commands.predict import _check_pass

    with caplog.at_level("WARNING"):
        _check_pass(result, strict=False)
    assert "skipped 3 of 5 input files that cannot be read" in caplog.text
    with pytest.raises(DataError, match=r"^3 of 5 input files cannot be read \(data\.strict=true\).*2M3\.fits.*2M4\.fits.*2M5\.fits"):
        _check_pass(result, strict=True)


# -- resampling -----------------------------------------------------------------------------------------
def test_resampling_propagates_the_errors_a_monte_carlo_measures():
    rng = np.random.default_rng(3)
    wave_in = np.sort(rng.uniform(15000.0, 15100.0, 300))
    wave_out = np.linspace(15005.0, 15095.0, 410)
    truth = 1.0 - 0.3 * np.exp(-0.5 * ((wave_in - 15050.0) / 3.0) ** 2)
    sigma = rng.uniform(0.005, 0.05, wave_in.size)
    draws = (truth + sigma * rng.standard_normal((4000, wave_in.size))).astype(np.float32)
    ivar = np.broadcast_to(1.0 / sigma**2, draws.shape).astype(np.float32)
    out_flux, out_weight = resample(draws, ivar, wave_in, wave_out)
    assert (out_weight > 0).all() and np.allclose(out_weight, out_weight[0])
    measured = out_flux.var(axis=0, ddof=1)
    np.testing.assert_allclose(measured * out_weight[0], 1.0, atol=0.12)  # 4000 draws: the variance to ~2-3 %
    assert abs(np.median(measured * out_weight[0]) - 1.0) < 0.02
    interpolated_sigma = np.interp(wave_out, wave_in, sigma)  # what interpolating the errors would claim instead
    assert np.median(measured / interpolated_sigma**2) < 0.8
    same, same_weight = resample(draws[:2], ivar[:2], wave_in, wave_in)
    np.testing.assert_allclose(same, draws[:2], rtol=1e-6)
    np.testing.assert_allclose(same_weight, ivar[:2], rtol=1e-5)
    bad = ivar[:1].copy()
    bad[0, 100] = 0.0
    _, w = resample(draws[:1], bad, wave_in, wave_in)
    assert w[0, 100] == 0 and (w[0, 99] > 0) and (w[0, 101] > 0)  # a bad pixel touches only what it feeds


# -- options --------------------------------------------------------------------------------------------
def predict_config(**overrides):
    base = {"ckpt_path": "m.ckpt", "input": "x.npy", "input_wavelength": None, "progress": True,
            "catalog_formats": ["fits", "csv", "ecsv"],
            "data": {"eval_batch_size": 1024, "strict": False, "workers": None, "chunk_size": 32}}
    for key, value in overrides.items():
        node = base
        *parents, last = key.split(".")
        for parent in parents:
            node = node[parent]
        node[last] = value
    return OmegaConf.create(base)


@pytest.mark.parametrize("overrides, message", [
    ({"data.strict": "maybe"}, r"^data\.strict=maybe is not valid: it must be true or false"),
    ({"progress": 1}, r"^progress=1 is not valid: it must be true or false"),
    ({"data.workers": 0}, r"^data\.workers=0 is not valid: .*e\.g\. data\.workers=4"),
    ({"data.chunk_size": 2.5}, r"^data\.chunk_size=2\.5 is not valid: .*e\.g\. data\.chunk_size=32"),
    ({"catalog_formats": ["fits", "xlsx"]}, r"^catalog_formats=\[fits,xlsx\] is not valid: list some of fits, csv, ecsv"),
    ({"catalog_formats": []}, r"^catalog_formats=\[\] is not valid"),
    ({"input": None}, r"^give the spectra either as input=.* or as data=<option> .*, not neither$"),
    ({"data._target_": "x.Y"}, r"not both$"),
    ({"input": None, "data._target_": "x.Y", "input_wavelength": "w.npy"}, r"^input_wavelength= resamples input= \.npy"),
])
def test_bad_option_values_are_one_clear_line(overrides, message):
    from stellarlab.commands.predict import options

    with pytest.raises(ConfigError, match=message):
        options(predict_config(**overrides))


def test_good_options_are_read():
    from stellarlab.commands.predict import options

    opts = options(predict_config(**{"data.workers": 3, "catalog_formats": ["ecsv"]}))
    assert opts["workers"] == 3 and opts["formats"] == [".ecsv"] and not opts["by_data"] and not opts["strict"]


# -- the command ------------------------------------------------------------------------------------------
def _predict(*args: str, log_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "predict.py", *args, f"paths.log_dir={log_dir}", "progress=false"], cwd=ROOT,
                          capture_output=True, text=True)


@pytest.mark.slow
def test_the_command_skips_a_corrupt_file_lists_it_and_strict_fails_naming_all(trained_run, tmp_path):
    folder = tmp_path / "spectra"
    flux, err = np.ones(NPIX), np.full(NPIX, 0.01)
    write_aspcapstar(folder / "aspcapStar-dr17-2M1.fits", flux, err, objid="2M1")
    good = (folder / "aspcapStar-dr17-2M1.fits").read_bytes()
    (folder / "aspcapStar-dr17-2M2.fits").write_bytes(good[:4000])
    np.save(folder / "flux.npy", np.ones((2, NPIX), np.float32))
    (folder / "broken.npy").write_bytes(b"\x93NUMPY garbage")
    out = _predict(f"ckpt_path={trained_run['ckpt']}", f"input={folder}", log_dir=tmp_path / "ok")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "skipped 2 of 4 input files that cannot be read" in out.stderr + out.stdout
    summary = json.loads(next((tmp_path / "ok").rglob("predictions.json")).read_text())
    assert summary["n_spectra"] == 3 and summary["n_skipped"] == 2
    assert sorted(Path(s["file"]).name for s in summary["skipped"]) == ["aspcapStar-dr17-2M2.fits", "broken.npy"]
    table = Table.read(next((tmp_path / "ok").rglob("predictions.fits")))
    assert table["APOGEE_ID"].filled("").tolist() == ["2M1", "", ""] and table["ID"].filled("").tolist() == ["", "flux:0", "flux:1"]
    assert table.meta["NSKIPPED"] == 2 and table.meta["CKPT"] == str(Path(trained_run["ckpt"]).resolve())

    strict = _predict(f"ckpt_path={trained_run['ckpt']}", f"input={folder}", "data.strict=true", log_dir=tmp_path / "strict")
    errors = [line for line in strict.stderr.splitlines() if line.startswith("error: ")]
    assert strict.returncode == 2 and len(errors) == 1 and "Traceback" not in strict.stderr, strict.stderr[-3000:]
    assert "2 of 4 input files cannot be read (data.strict=true)" in errors[0]
    assert "aspcapStar-dr17-2M2.fits" in errors[0] and "broken.npy" in errors[0]
    assert not list((tmp_path / "strict").rglob("predictions.*"))  # nothing half-written, nothing at all

    bad = _predict(f"ckpt_path={trained_run['ckpt']}", f"input={folder}", "catalog_formats=[fits,xls]", log_dir=tmp_path / "bad")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: catalog_formats=[fits,xls] is not valid")


@pytest.mark.slow
def test_data_mode_predicts_every_split_and_marks_the_training_stars(trained_run, tmp_path):
    out = _predict(f"ckpt_path={trained_run['ckpt']}", "data=synthetic_apogee", "data.n_stars=600",
                   f"paths.cache_dir={trained_run['cache']}", log_dir=tmp_path / "out")
    assert out.returncode == 0, out.stderr[-3000:]
    table = Table.read(next((tmp_path / "out").rglob("predictions.ecsv")))
    sizes = json.loads((trained_run["run"] / "metrics.json").read_text())["split_sizes"]
    assert {s: int((table["SPLIT"] == s).sum()) for s in ("train", "val", "test")} == sizes
    test = table[table["SPLIT"] == "test"]
    expected = np.genfromtxt(trained_run["run"] / "test_predictions.csv", delimiter=",", names=True)
    np.testing.assert_allclose(test["TEFF"], expected["teff_pred"], rtol=1e-5)  # the test step's own rows, in its order
    np.testing.assert_allclose(test["TEFF_TRUE"], expected["teff_true"], rtol=1e-6)
    np.testing.assert_array_equal(test["STAR_ID"], expected["star_id"])
    assert (table["SNR"] == 100).all()  # the synthetic survey's own SNR


@pytest.mark.slow
def test_test_predictions_name_each_row_and_its_snr(trained_run):
    header = (trained_run["run"] / "test_predictions.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["star_id", "row", "snr"] and header[3:5] == ["teff_true", "teff_pred"]


# -- memory ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_memory_does_not_grow_with_the_number_of_spectra(tmp_path):
    """12,000 x 8575 flux + inverse variance (0.8 GB) against 20 spectra: the peak grows by far less than the input."""
    from benchmarks.peak_rss import run_measured
    from benchmarks.predict_scale import write_checkpoint, write_spectra

    ckpt = write_checkpoint(tmp_path)
    peaks = {}
    for n in (20, 12_000):
        folder = tmp_path / str(n)
        folder.mkdir()
        flux = write_spectra(folder, n)
        cmd = [sys.executable, "predict.py", f"ckpt_path={ckpt}", f"input={flux}", f"paths.log_dir={folder / 'out'}",
               "progress=false"]
        _, _, peaks[n] = run_measured(cmd, timeout=600)
        assert json.loads(next((folder / "out").rglob("predictions.json")).read_text())["n_spectra"] == n
        shutil.rmtree(folder)
    input_mb = 2 * 12_000 * NPIX * 4 / 2**20
    assert peaks[12_000] - peaks[20] < 0.25 * input_mb, (peaks, input_mb)
