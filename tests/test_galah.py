"""GALAH data: the galah4 arrays and the official DR4 release, on files written in exactly their layouts.

Spectra come from the synthetic GALAH-like survey, so the end-to-end runs really learn. The unit tests
assert values: which rows and labels come out, the log flux with its floor, the rows each cut removes,
the wavelength grid of resampled and concatenated arms, and the errors for broken or missing files.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
from astropy.io import fits

import train as train_script
from stellarlab.data.galah.common import canonical_label
from stellarlab.data.galah.dr4 import GALAHDR4DataModule
from stellarlab.data.galah.galah4 import GALAH4_COLUMNS, GALAH4DataModule
from stellarlab.errors import ConfigError, DataError
from stellarlab.grids import galah_wavelength
from tests.conftest import compose_config
from tests.galah_fixtures import C_KMS, make_galah4, synthetic_galah, write_galah_dr4

N_STARS = 240
DR4_ROWS = 160
# Catalogue rows with something to cut: flag_sp set, low or missing SNR, a star observed three times,
# a star whose four files are missing and one without its IR (CCD4) file.
FLAGS = {3: 16, 4: 2048, 5: 1 + 8}
SNR = {4: 14.0, 6: np.nan, 7: 12.0, 8: 29.9, 9: 30.0, 10: 90.0, 11: 60.0, 12: 45.0, 13: 80.0, 14: 80.0}
REPEATS = {11: 10, 12: 10}
NO_FILES = [13]
NO_CCD4 = [14]
NO_GAIA_ID = [15, 16]


@pytest.fixture(scope="module")
def survey(survey_cache):
    return synthetic_galah(N_STARS, seed=7, snr=(15.0, 150.0), cache_dir=survey_cache)


@pytest.fixture(scope="module")
def galah4(survey, tmp_path_factory):
    return make_galah4(tmp_path_factory.mktemp("galah4"), survey)


@pytest.fixture(scope="module")
def dr4(survey, tmp_path_factory):
    return write_galah_dr4(
        tmp_path_factory.mktemp("galah_dr4"), survey, n_rows=DR4_ROWS, flag_sp=FLAGS, snr_ccd3=SNR,
        repeats=REPEATS, no_files=NO_FILES, no_ccd4=NO_CCD4, no_gaia_id=NO_GAIA_ID,
    )


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One cache folder for the module: tests asking for the same DR4 config read the files once."""
    return tmp_path_factory.mktemp("galah-cache")


def g4(fx, **kwargs) -> GALAH4DataModule:
    return GALAH4DataModule(root=str(fx.root), batch_size=8, **kwargs)


def dr4_module(fx, cache: Path, **kwargs) -> GALAHDR4DataModule:
    kwargs.setdefault("cache_dir", str(cache))
    return GALAHDR4DataModule(root=str(fx.root), batch_size=8, **kwargs)


def loaded_rows(dm: GALAHDR4DataModule) -> np.ndarray:
    """Catalogue rows behind the spectra the module hands over, in their order."""
    arrays = dm.cache().load()
    return np.asarray(arrays["row"])[np.asarray(arrays["ok"])]


# ------------------------------------------------------------------------------------------------
# galah4
# ------------------------------------------------------------------------------------------------


def test_galah4_labels_are_picked_by_name_and_galah4_spellings_are_aliases(galah4):
    dm = g4(galah4, labels=["t_eff", "fe_h", "mass", "log_g"])
    assert dm.label_names == ["teff", "fe_h", "mass", "logg"]
    a = dm.load_arrays()
    assert a.label_names == ["teff", "fe_h", "mass", "logg"]
    rows = a.star_id  # galah4 has no star id: the row index in the files is the star
    expected = galah4.labels[rows][:, [4, 6, 0, 5]]
    np.testing.assert_array_equal(a.labels, expected)
    # rows whose Teff/log g/[Fe/H] are NaN still have a mass: kept; a row with no valid pixel is dropped
    assert set(galah4.nan_label_rows) <= set(rows.tolist())
    assert not set(galah4.dead_rows) & set(rows.tolist())
    assert len(rows) == N_STARS - len(galah4.dead_rows)
    np.testing.assert_array_equal(a.extra["snr"], galah4.snr[rows])  # the SNR column, aligned with the rows
    assert canonical_label("SNR") == "snr" and canonical_label("T_EFF") == "teff"


def test_galah4_drops_rows_with_none_of_the_requested_labels(galah4, caplog):
    dm = g4(galah4, labels=["teff", "logg", "fe_h"])
    with caplog.at_level(logging.INFO, logger="stellarlab.data.galah"):
        a = dm.load_arrays()
    dropped = set(galah4.nan_label_rows) | set(galah4.dead_rows)
    assert sorted(a.star_id.tolist()) == sorted(set(range(N_STARS)) - dropped)
    partial = galah4.partial_label_rows[0]
    i = int(np.flatnonzero(a.star_id == partial)[0])
    assert np.isnan(a.labels[i, 1]) and np.isfinite(a.labels[i, [0, 2]]).all()  # masked in the loss, not dropped
    assert "dropped 4 of 240 spectra: 3 with none of the labels" in caplog.text
    assert "1 with no usable pixel" in caplog.text


def test_galah4_log_flux_with_floor_keeps_the_continuum_at_one(galah4):
    a = g4(galah4, flux_transform="log", flux_floor=0.2).load_arrays()
    raw = galah4.spectra[a.star_id]
    with np.errstate(invalid="ignore"):
        expected = (1.0 + np.log(np.maximum(raw, np.float32(0.2)))).astype(np.float32)
    np.testing.assert_allclose(a.flux, expected, rtol=0, atol=1e-6)
    i = int(np.flatnonzero(a.star_id == galah4.low_pixels[0][0])[0])
    for _, pixel in galah4.low_pixels:  # -0.05 and 0.1 are both clipped to the floor
        assert a.flux[i, pixel] == pytest.approx(1.0 + np.log(0.2), abs=1e-6)
    assert np.isnan(a.flux[np.isin(a.star_id, galah4.nan_pixel_rows)]).any()  # NaN stays a masked pixel
    none = g4(galah4).load_arrays()
    np.testing.assert_array_equal(none.flux, galah4.spectra[none.star_id])


def test_galah4_masked_pixels_reach_the_model_as_continuum_with_zero_weight(galah4):
    dm = g4(galah4, flux_transform="log")
    dm.setup()
    flux = np.concatenate([dm.tensors[s]["flux"].numpy() for s in ("train", "val", "test")])
    weight = np.concatenate([dm.tensors[s]["weight"].numpy() for s in ("train", "val", "test")])
    assert np.isfinite(flux).all()
    kept = sorted(set(range(N_STARS)) - set(galah4.dead_rows))
    assert int((weight == 0).sum()) == int(np.isnan(galah4.spectra[kept]).sum()) == 4 * 200
    assert (flux[weight == 0] == 1.0).all()
    assert {k: len(v) for k, v in dm.split_index.items()} == {"train": 188, "val": 24, "test": 24}  # 0.8/0.1/0.1 of 236
    assert dm.n_pixels == 16384
    np.testing.assert_array_equal(dm.wavelength, galah_wavelength())


def test_galah4_snr_cut_counts(galah4, caplog):
    with caplog.at_level(logging.INFO, logger="stellarlab.data.galah"):
        a = g4(galah4, snr_min=50).load_arrays()
    passing = np.flatnonzero(galah4.snr >= 50)
    assert f"SNR cut (SNR >= 50): removed {N_STARS - len(passing)} of {N_STARS} rows" in caplog.text
    assert 40 < len(passing) < 200  # the cut does something and leaves something
    assert sorted(a.star_id.tolist()) == sorted(set(passing.tolist()) - set(galah4.dead_rows) - set(galah4.nan_label_rows))
    assert (a.extra["snr"] >= 50).all()
    with pytest.raises(DataError, match=r"no spectrum left after the SNR cut \(SNR >= 1e\+06\).*lower data.snr_min"):
        g4(galah4, snr_min=1e6).load_arrays()


@pytest.mark.parametrize("name, keep_bytes", [("spectra.npy", 0.5), ("labels.npy", 40)])
def test_galah4_truncated_npy_is_a_data_error_naming_the_file(galah4, tmp_path, name, keep_bytes):
    root = tmp_path / "galah4"
    shutil.copytree(galah4.root, root)
    data = (root / name).read_bytes()
    cut = int(len(data) * keep_bytes) if isinstance(keep_bytes, float) else keep_bytes
    (root / name).write_bytes(data[:cut])
    with pytest.raises(DataError, match=rf"{root / name} is not a readable \.npy file .*truncated.*python -m stellarlab\.download data=galah"):
        GALAH4DataModule(root=str(root)).prepare_data()


def test_galah4_missing_label_lists_the_available_ones(galah4):
    with pytest.raises(DataError, match=r"label\(s\) \['vsini'\] not in .*labels\.npy.*available labels: \['mass', 'age', 'l_bol', 'dist', 't_eff', 'log_g', 'fe_h', 'SNR'\]"):
        g4(galah4, labels=["teff", "vsini"]).load_arrays()


def test_galah4_missing_files_say_how_to_download(tmp_path):
    with pytest.raises(DataError, match=r"spectra\.npy not found; get the galah4 files with `python -m stellarlab\.download data=galah`"):
        GALAH4DataModule(root=str(tmp_path / "nowhere")).prepare_data()


def test_galah4_wrong_shapes_are_data_errors(galah4, tmp_path):
    root = tmp_path / "g"
    root.mkdir()
    np.save(root / "spectra.npy", galah4.spectra[:10])
    np.save(root / "labels.npy", galah4.labels[:10, :7])
    with pytest.raises(DataError, match=r"labels\.npy has shape \(10, 7\); the galah4 layout is \(N, 8\)"):
        GALAH4DataModule(root=str(root)).prepare_data()
    np.save(root / "labels.npy", galah4.labels[:9])
    with pytest.raises(DataError, match=r"spectra\.npy has 10 rows but .*labels\.npy has 9"):
        GALAH4DataModule(root=str(root)).prepare_data()
    np.save(root / "spectra.npy", galah4.spectra[:9, :8575])
    with pytest.raises(DataError, match=r"shape \(9, 8575\); the galah4 layout is \(N, 16384\)"):
        GALAH4DataModule(root=str(root)).prepare_data()


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"names 'teff' twice \('teff' and 't_eff' are the same column\)"):
        GALAH4DataModule(root=str(tmp_path), labels=["teff", "t_eff"])
    with pytest.raises(ConfigError, match="data.flux_transform must be one of"):
        GALAH4DataModule(root=str(tmp_path), flux_transform="sqrt")
    with pytest.raises(ConfigError, match="data.flux_floor must be > 0"):
        GALAH4DataModule(root=str(tmp_path), flux_transform="log", flux_floor=0)
    with pytest.raises(ConfigError, match="data.grid=concat keeps the native pixels.*data.rv_keyword=null"):
        GALAHDR4DataModule(root=str(tmp_path), grid="concat")
    with pytest.raises(ConfigError, match="data.ccds must list distinct HERMES CCDs"):
        GALAHDR4DataModule(root=str(tmp_path), ccds=[1, 5])
    with pytest.raises(ConfigError, match="data.spectra_pattern"):
        GALAHDR4DataModule(root=str(tmp_path), spectra_pattern="{star}.fits")


# ------------------------------------------------------------------------------------------------
# GALAH DR4
# ------------------------------------------------------------------------------------------------


def test_dr4_cuts_count_what_they_remove(dr4, tmp_path, caplog):
    dm = dr4_module(dr4, tmp_path / "cache")  # its own cache: the build's log lines are asserted
    with caplog.at_level(logging.INFO, logger="stellarlab.data.galah"):
        a = dm.load_arrays()
    flagged = dr4.flag_sp > 0
    assert flagged.sum() == 4  # rows 3, 4, 5 and 14 (no CCD4: flag 2)
    low_snr = ~flagged & ~(dr4.snr_ccd3 >= 30)
    assert {6, 7, 8} <= set(np.flatnonzero(low_snr).tolist()) and 9 not in np.flatnonzero(low_snr)  # 30 passes
    passing = ~flagged & ~low_snr
    meta = dm.cache().meta["removed"]
    assert meta == {"catalogue_rows": DR4_ROWS, "flag_sp": 4, "snr": int(low_snr.sum()), "no_spectrum_file": 1, "no_radial_velocity": 0,
                    "no_readable_file": 0}
    assert f"flag_sp cut (flag_sp <= 0): removed 4 of {DR4_ROWS} rows" in caplog.text
    assert f"SNR cut (snr_px_ccd3 >= 30): removed {int(low_snr.sum())} of {DR4_ROWS - 4} rows" in caplog.text
    assert "1 of" in caplog.text and "have none (removed)" in caplog.text
    rows = loaded_rows(dm)
    assert rows.tolist() == sorted(set(np.flatnonzero(passing).tolist()) - set(NO_FILES))
    np.testing.assert_array_equal(a.labels, dr4.labels[rows])  # teff, logg, fe_h columns of the catalogue
    np.testing.assert_array_equal(a.extra["snr"], dr4.snr_ccd3[rows])
    with pytest.raises(DataError, match=r"no spectrum left after the flag_sp cut \(flag_sp <= -1\); raise data.flag_sp_max"):
        dr4_module(dr4, tmp_path / "cache", flag_sp_max=-1).prepare_data()
    with pytest.raises(DataError, match=r"no spectrum left after the SNR cut \(snr_px_ccd3 >= 1000\)"):
        dr4_module(dr4, tmp_path / "cache", snr_min=1000).prepare_data()


def test_dr4_splits_by_gaia_source_id(dr4, shared_cache):
    dm = dr4_module(dr4, shared_cache, flag_sp_max=None, snr_min=None)
    a = dm.load_arrays()
    rows = loaded_rows(dm)
    repeat_ids = a.star_id[np.isin(rows, [10, 11, 12])]
    assert len(repeat_ids) == 3 and len(set(repeat_ids.tolist())) == 1  # one star, three spectra
    assert len(np.unique(a.star_id)) == len(rows) - 2
    no_id = a.star_id[np.isin(rows, NO_GAIA_ID)]
    assert len(no_id) == 2 and no_id[0] != no_id[1]  # gaiadr3_source_id 0: each its own star
    dm.setup()
    side = {}
    for split, idx in dm.split_index.items():
        for star in np.unique(a.star_id[idx]):
            assert side.setdefault(int(star), split) == split  # every star on exactly one side


def test_dr4_resampled_arms_sit_on_the_synthetic_galah_grid_in_the_rest_frame(dr4, survey, shared_cache):
    dm = dr4_module(dr4, shared_cache)
    a = dm.load_arrays()
    np.testing.assert_array_equal(a.wavelength, galah_wavelength())  # 4 x 4096, the grid of data=synthetic_galah
    rows = loaded_rows(dm)
    truth = np.asarray(survey.flux)[dr4.star_of_row[rows]]
    usable = a.weight > 0
    assert usable.mean() > 0.99
    residual = np.abs(a.flux - truth)[usable]
    # two linear interpolations (the fixture onto the shifted native pixels, the loader back) of noisy spectra
    assert np.median(residual) < 0.01 and np.percentile(residual, 99) < 0.08
    # pixels beyond a CCD's coverage in the rest frame have no data: weight 0
    i = int(np.argmax(np.abs(dr4.rv[rows])))
    r = rows[i]
    shift = 1 + dr4.rv[r] / C_KMS
    start, end = dr4.crval[r, 0] / shift, (dr4.crval[r, 0] + (dr4.native_pixels - 1) * dr4.cdelt[r, 0]) / shift
    blue = a.wavelength[:4096]
    outside = (blue < start) | (blue > end)
    assert outside.sum() > 10 and (a.weight[i, :4096][outside] == 0).all()


def test_dr4_missing_ccd_file_gives_that_arm_zero_weight(dr4, shared_cache):
    dm = dr4_module(dr4, shared_cache, flag_sp_max=None, snr_min=None)
    a = dm.load_arrays()
    rows = loaded_rows(dm)
    i = int(np.flatnonzero(rows == NO_CCD4[0])[0])
    assert (a.weight[i, 3 * 4096 :] == 0).all() and np.isnan(a.flux[i, 3 * 4096 :]).all()
    assert (a.weight[i, : 3 * 4096] > 0).mean() > 0.99


def test_dr4_on_the_target_grid_resampling_returns_the_file_pixels(survey, tmp_path):
    fx = write_galah_dr4(tmp_path / "exact", survey, n_rows=4, exact_grid=True)
    dm = dr4_module(fx, tmp_path / "cache", snr_min=None)
    a = dm.load_arrays()
    assert loaded_rows(dm).tolist() == [0, 1, 2, 3]
    for ccd in (1, 2, 3, 4):
        with fits.open(fx.path(2, ccd)) as hdul:
            flux = hdul["normalized"].data.astype(np.float64)
            rel = hdul["relative_error"].data.astype(np.float64)
        arm = slice((ccd - 1) * 4096, ccd * 4096)
        measured = rel > 0
        assert measured.sum() == 4096 - 3  # the fixture's 3 unmeasured pixels...
        np.testing.assert_array_equal(a.weight[2, arm] > 0, measured)  # ...are the only ones without weight
        np.testing.assert_allclose(a.flux[2, arm][measured], flux[measured], rtol=1e-6)
        ivar = 1.0 / (rel[measured] * flux[measured]) ** 2  # sigma = relative error x normalised flux
        np.testing.assert_allclose(a.weight[2, arm][measured], ivar, rtol=1e-5)


def test_dr4_concatenated_arms_keep_the_native_pixels(dr4, shared_cache):
    dm = dr4_module(dr4, shared_cache, grid="concat", rv_keyword=None, flag_sp_max=None, snr_min=None)
    a = dm.load_arrays()
    rows = loaded_rows(dm)
    assert a.flux.shape[1] == 4 * dr4.native_pixels and len(a.wavelength) == 4 * 4096
    for ccd in (1, 2, 3, 4):
        have = [r for r in rows if not (ccd == 4 and r in NO_CCD4)]
        native = dr4.crval[have, ccd - 1][:, None] + np.arange(4096) * dr4.cdelt[have, ccd - 1][:, None]
        np.testing.assert_allclose(a.wavelength[(ccd - 1) * 4096 : ccd * 4096], native.mean(axis=0), rtol=1e-12)
    with fits.open(dr4.path(rows[0], 3)) as hdul:
        flux, measured = hdul["normalized"].data, hdul["relative_error"].data > 0
    red = slice(2 * 4096, 3 * 4096)
    np.testing.assert_array_equal(a.flux[0, red][measured], flux[measured])  # pixel for pixel, no interpolation
    assert np.isnan(a.flux[0, red][~measured]).all() and (a.weight[0, red][~measured] == 0).all()
    assert np.all(np.diff(a.wavelength[:4096]) > 0)


def test_dr4_cache_is_reused_and_keyed_by_the_cuts(dr4, tmp_path, monkeypatch):
    first = dr4_module(dr4, tmp_path / "cache")
    first.prepare_data()
    assert first.cache().exists()
    built = first.load_arrays()
    monkeypatch.setattr(GALAHDR4DataModule, "_build", lambda self, cache: pytest.fail("rebuilt a cached config"))
    again = dr4_module(dr4, tmp_path / "cache", labels=["teff", "mg_fe"])  # labels are read from the catalogue: same cache
    again.prepare_data()
    assert again.cache().path == first.cache().path
    np.testing.assert_array_equal(again.load_arrays().flux, built.flux)
    assert dr4_module(dr4, tmp_path / "cache", snr_min=20).cache().path != first.cache().path
    assert not list(Path(tmp_path / "cache").glob(".*tmp*"))  # no temporary folder left behind


def test_dr4_max_spectra_keeps_a_seeded_subset(dr4, tmp_path):
    a = dr4_module(dr4, tmp_path / "cache", max_spectra=20, subset_seed=1)
    b = dr4_module(dr4, tmp_path / "other", max_spectra=20, subset_seed=1)
    c = dr4_module(dr4, tmp_path / "cache", max_spectra=20, subset_seed=2)
    for dm in (a, b, c):
        dm.prepare_data()
    rows = loaded_rows(a)
    assert len(rows) == 20 - a.cache().meta["removed"]["no_spectrum_file"]
    passing = np.flatnonzero((dr4.flag_sp == 0) & (dr4.snr_ccd3 >= 30))
    assert set(rows.tolist()) <= set(passing.tolist())
    assert a.cache().meta["removed"]["max_spectra"] == len(passing) - 20
    np.testing.assert_array_equal(loaded_rows(b), rows)  # same seed, same subset
    assert loaded_rows(c).tolist() != rows.tolist()


def test_dr3_style_files_by_extension_index(tmp_path):
    """DR3 files: normalised flux in HDU 4 (shorter for CCD4, its own WCS, CRPIX1 = 0), relative error in HDU 1."""
    n, cut = 200, 30
    hdr = fits.Header({"CRVAL1": 7585.0, "CDELT1": 0.0735, "CRPIX1": 0.0})
    rel = np.linspace(0.01, 0.03, n).astype(np.float32)
    norm = np.linspace(0.9, 1.0, n - cut).astype(np.float32)
    hdus = [fits.PrimaryHDU(np.full(n, 1000.0, dtype=np.float32), header=hdr), fits.ImageHDU(rel, header=hdr, name="input_sigma"),
            fits.ImageHDU(np.zeros(n, dtype=np.float32), name="no_sky_subspectrum"), fits.ImageHDU(np.zeros(n, dtype=np.float32), name="no_sky_sigma")]
    norm_hdr = fits.Header({"CRVAL1": 7585.0 + cut * 0.0735, "CDELT1": 0.0735, "CRPIX1": 1.0})
    hdus.append(fits.ImageHDU(norm, header=norm_hdr, name="normalised_spectra"))
    path = tmp_path / "1704180037012054.fits"
    fits.HDUList(hdus).writeto(path)
    dm = GALAHDR4DataModule(root=str(tmp_path), flux_hdu=4, error_hdu=1, rv_keyword=None)
    wl, flux, sigma, rv = dm._read_ccd(path)
    np.testing.assert_allclose(wl, 7585.0 + (np.arange(cut, n)) * 0.0735)
    np.testing.assert_allclose(flux, norm)
    np.testing.assert_allclose(sigma, rel[cut:] * norm, rtol=1e-5)  # the error pixels at the same wavelengths
    assert rv is None


def test_dr4_file_errors_name_the_file_and_the_fix(dr4, survey, tmp_path, shared_cache):
    with pytest.raises(DataError, match=r"catalogue .*missing\.fits not found; download missing\.fits from https://cloud\.datacentral\.org\.au/teamdata/GALAH/public/GALAH_DR4/catalogs/"):
        dr4_module(dr4, shared_cache, catalogue="missing.fits").prepare_data()
    with pytest.raises(DataError, match=r"none of the \d+ selected GALAH spectra is in .*nowhere.*Data Central's bulk download"):
        dr4_module(dr4, shared_cache, spectra_dir=str(tmp_path / "nowhere")).prepare_data()
    with pytest.raises(DataError, match=r"has no extension 'flux' \(data\.flux_hdu\); its extensions are \['PRIMARY', 'NORMALIZED', 'RELATIVE_ERROR'"):
        dr4_module(dr4, shared_cache, flux_hdu="flux").prepare_data()
    with pytest.raises(DataError, match=r"label\(s\) \['vsini'\] not in the catalogue .*available labels: \[.*'teff'.*'mg_fe'"):
        dr4_module(dr4, shared_cache, labels=["teff", "vsini"]).load_arrays()
    with pytest.raises(DataError, match=r"column 'snr_c3_iraf' \(data\.snr_column\) is not in"):
        dr4_module(dr4, shared_cache, snr_column="snr_c3_iraf").prepare_data()
    with pytest.raises(DataError, match=r"has no RV_HELIO header keyword .*data\.rv_keyword"):
        dr4_module(dr4, shared_cache, rv_keyword="RV_HELIO").prepare_data()
    small = write_galah_dr4(tmp_path / "small", survey, n_rows=3)
    broken, gone = small.path(1, 2), small.path(2, 1)
    broken.write_bytes(broken.read_bytes()[:5000])
    gone.write_bytes(b"not a FITS file")
    with pytest.raises(DataError, match=rf"2 GALAH spectrum files cannot be read \(data\.strict=true\).*cannot read "
                                        rf"{broken}: .*truncated: delete it and download it again.*cannot read {gone}"):
        dr4_module(small, tmp_path / "broken", snr_min=None, strict=True).prepare_data()
    assert not list((tmp_path / "broken").iterdir())  # a failed build publishes nothing and leaves no temporary


def test_dr4_unreadable_files_are_skipped_and_listed(dr4, survey, tmp_path, caplog):
    """Without data.strict one bad file costs its arm (weight 0), not the preprocessing; it is listed in the log
    and in the cache's meta.json."""
    import json

    small = write_galah_dr4(tmp_path / "small", survey, n_rows=3)
    broken = small.path(1, 2)
    broken.write_bytes(broken.read_bytes()[:5000])
    module = dr4_module(small, tmp_path / "cache", snr_min=None)
    with caplog.at_level("WARNING"):
        arrays = module.load_arrays()
    assert "skipped 1 spectrum files that cannot be read" in caplog.text and str(broken) in caplog.text
    meta = json.loads(next((tmp_path / "cache").rglob("meta.json")).read_text())
    assert [u["file"] for u in meta["unreadable_files"]] == [str(broken)]
    assert len(arrays.flux) == 3  # every star kept: only the broken arm lost
    arm = slice(4096, 8192)  # CCD 2 on the resampled grid
    row = list(np.asarray(arrays.extra.get("row", np.arange(3)))).index(1) if "row" in arrays.extra else 1
    assert (np.asarray(arrays.weight)[row, arm] == 0).all()
    assert (np.asarray(arrays.weight)[row, :4096] > 0).any()


# ------------------------------------------------------------------------------------------------
# Config: data=galah, data=galah_dr4, experiment=galah_cnn (on GALAH data and on the synthetic survey)
# ------------------------------------------------------------------------------------------------


def test_galah_cnn_experiment_recipe(tmp_path):
    cfg = compose_config(["experiment=galah_cnn"], tmp_path=tmp_path)
    assert cfg.data._target_ == "stellarlab.data.galah.galah4.GALAH4DataModule"
    assert cfg.data.root == str(tmp_path / "data" / "galah4")
    assert list(cfg.data.labels) == ["teff", "logg", "fe_h"]
    assert list(cfg.data.split) == [0.7, 0.15, 0.15] and cfg.data.batch_size == 32
    assert cfg.model._target_ == "stellarlab.models.cnn.CNNRegressor"
    assert len(cfg.model.channels) == len(cfg.model.pool_sizes) == 3 and min(cfg.model.pool_sizes) > 1
    assert list(cfg.model.hidden_sizes) == [128]
    assert cfg.optimizer._target_ == "torch.optim.Adam" and cfg.optimizer.lr == 1e-3
    assert cfg.trainer.max_epochs == 10
    dr4 = compose_config(["experiment=galah_cnn", "data=galah_dr4"], tmp_path=tmp_path)
    assert dr4.data._target_.endswith("GALAHDR4DataModule") and dr4.data.batch_size == 32


def test_galah_cnn_runs_on_the_synthetic_survey_with_the_same_shapes(galah4, tmp_path, survey_cache):
    # the command line's data=... replaces the experiment's data option, in either order
    for overrides in (["experiment=galah_cnn", "data=synthetic_galah"], ["data=synthetic_galah", "experiment=galah_cnn"]):
        cfg = compose_config([*overrides, "data.n_stars=60"], tmp_path=tmp_path, cache_dir=survey_cache)
        assert cfg.data._target_ == "stellarlab.data.synthetic.SyntheticDataModule" and cfg.data.survey == "galah"
        assert cfg.data.batch_size == 32 and list(cfg.data.split) == [0.7, 0.15, 0.15]
    synthetic = hydra.utils.instantiate(cfg.data)
    synthetic.setup()
    real = g4(galah4)
    real.setup()
    assert synthetic.n_pixels == real.n_pixels == 16384
    np.testing.assert_array_equal(synthetic.wavelength, real.wavelength)
    assert synthetic.label_names == real.label_names == ["teff", "logg", "fe_h"]
    model = hydra.utils.instantiate(cfg.model, **synthetic.model_spec(), optimizer=cfg.optimizer)
    assert model(synthetic.tensors["train"]["flux"][:2]).shape == (2, 3)


def test_data_options_build_without_touching_files(tmp_path):
    for option in ("galah", "galah_dr4"):
        cfg = compose_config([f"data={option}"], tmp_path=tmp_path)
        dm = hydra.utils.instantiate(cfg.data)
        assert dm.label_names == ["teff", "logg", "fe_h"]
    assert dm.cache_dir == tmp_path / "cache" / "galah"
    assert dm.catalogue == tmp_path / "data" / "galah_dr4" / "galah_dr4_allstar_240705.fits"
    assert list(GALAH4_COLUMNS) == ["mass", "age", "l_bol", "dist", "t_eff", "log_g", "fe_h", "SNR"]


# ------------------------------------------------------------------------------------------------
# End to end through train.py
# ------------------------------------------------------------------------------------------------

E2E = ["trainer.accelerator=cpu", "~callbacks.progress_bar", "logger=csv", "trainer.log_every_n_steps=2"]


def run(cfg) -> dict:
    best = train_script.main(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert best == pytest.approx(metrics["best_val_loss"])
    return metrics


@pytest.mark.slow
def test_a_model_learns_from_galah4_files(galah4, tmp_path):
    cfg = compose_config(
        ["data=galah", f"data.root={galah4.root}", "data.flux_transform=log", "model=mlp", "data.batch_size=32",
         "trainer.max_epochs=10", *E2E],
        tmp_path=tmp_path,
    )
    metrics = run(cfg)
    assert metrics["split_sizes"] == {"train": 166, "val": 35, "test": 35}  # 70/15/15 of the 236 usable rows
    assert metrics["label_names"] == ["teff", "logg", "fe_h"]
    for label, margin in (("teff", 0.4), ("logg", 0.5), ("fe_h", 0.8)):
        m = metrics["test"][label]
        assert m["rmse"] < margin * m["rmse_mean_predictor"], (label, m)


@pytest.mark.slow
def test_a_model_learns_from_dr4_files(dr4, tmp_path):
    cfg = compose_config(
        ["data=galah_dr4", f"data.root={dr4.root}", "data.snr_min=null",
         "data.flag_sp_max=null", "data.pixels_per_arm=1024", "model=mlp", "data.batch_size=32", "trainer.max_epochs=15", *E2E],
        tmp_path=tmp_path,
    )
    metrics = run(cfg)
    assert sum(metrics["split_sizes"].values()) == DR4_ROWS - len(NO_FILES)
    assert list((tmp_path / "cache" / "galah").glob("galah_dr4-*/meta.json"))  # built under paths.cache_dir
    for label, margin in (("teff", 0.4), ("logg", 0.5), ("fe_h", 0.8)):
        m = metrics["test"][label]
        assert m["rmse"] < margin * m["rmse_mean_predictor"], (label, m)
    ckpt = torch.load(metrics["best_checkpoint"], weights_only=True)
    assert ckpt["state_dict"]["wavelength"].shape == (4 * 1024,)


@pytest.mark.slow
def test_galah_cnn_experiment_runs_end_to_end_on_galah4_files(galah4, tmp_path):
    cfg = compose_config(["experiment=galah_cnn", f"data.root={galah4.root}", "trainer.max_epochs=1", *E2E], tmp_path=tmp_path)
    metrics = run(cfg)
    assert metrics["epochs"] == 1 and metrics["split_sizes"] == {"train": 166, "val": 35, "test": 35}
    assert set(metrics["test"]) == {"teff", "logg", "fe_h"}
    assert all(np.isfinite(m["rmse"]) and m["n"] >= 34 for m in metrics["test"].values())
    # 3 conv blocks (conv + batch norm) then 256 x 32 features -> 128 -> 3
    convs = 1 * 8 * 7 + 8 + 8 * 16 * 7 + 16 + 16 * 32 * 7 + 32 + 2 * (8 + 16 + 32)
    assert metrics["n_parameters"] == convs + 256 * 32 * 128 + 128 + 128 * 3 + 3


def test_galah_spellings_of_labels_pass_the_optimized_metric_check(tmp_path):
    from stellarlab.run.validation import validate_train_config

    cfg = compose_config(["data=galah", "data.labels=[t_eff,log_g]", "optimized_metric=val/rmse_teff"], tmp_path=tmp_path)
    validate_train_config(cfg)  # galah4's t_eff is logged as teff
    bad = compose_config(["data=galah", "data.labels=[t_eff,log_g]", "optimized_metric=val/rmse_t_eff"], tmp_path=tmp_path)
    with pytest.raises(ConfigError, match=r"optimized_metric=val/rmse_t_eff is not a metric .*did you mean optimized_metric=val/rmse_teff"):
        validate_train_config(bad)
