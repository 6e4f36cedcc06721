"""data=apogee: the DR17 catalogue, cuts, file readers, the cache and the DataModule, on files in the survey's layouts."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from astropy.io import fits
from astropy.table import Table
from omegaconf import open_dict

from stellarlab import grids
from stellarlab.data.apogee import files as af
from stellarlab.data.apogee import mock as fx
from stellarlab.data.apogee.catalog import (
    DEFAULT_PIXMASK_BITS,
    PIXMASK_BITS,
    apply_cuts,
    bit_value,
    label_array,
    read_catalog,
    spectrum_relpath,
    spectrum_relpaths,
)
from stellarlab.data.apogee.datamodule import APOGEEDataModule
from stellarlab.data.cache import ArrayCache
from stellarlab.data.split import split_by_star
from stellarlab.errors import ConfigError, DataError
from tests.conftest import REAL_APSTAR, compose_config

DEFAULT_PIXMASK = bit_value(DEFAULT_PIXMASK_BITS, PIXMASK_BITS, "test")
N_STARS = 300  # the fixture survey: + 5 duplicate rows; 5 + 4 + 12 + 3 stars removed -> 281 kept


@pytest.fixture(scope="session")
def survey(tmp_path_factory) -> fx.SurveyFiles:
    """One aspcapStar survey for the session (files written once, a few seconds)."""
    return fx.make_survey_files(tmp_path_factory.mktemp("apogee-aspcap"), n_stars=N_STARS, source="aspcapStar", seed=3)


@pytest.fixture(scope="session")
def apstar_survey(tmp_path_factory) -> fx.SurveyFiles:
    return fx.make_survey_files(tmp_path_factory.mktemp("apogee-apstar"), n_stars=40, source="apStar", seed=4,
                                n_duplicates=2, n_missing_labels=1, n_star_bad=1, n_missing_files=1)


def datamodule(s: fx.SurveyFiles, cache_dir: Path, **kwargs) -> APOGEEDataModule:
    args = dict(catalog=str(s.catalog), spectra_dir=str(s.spectra_dir), source=s.source, cache_dir=str(cache_dir),
                workers=1, progress=False, split=[0.8, 0.1, 0.1], batch_size=16)
    return APOGEEDataModule(**{**args, **kwargs})


# -- catalogue and cuts ------------------------------------------------------------------------------
def small_table() -> Table:
    """Ten rows whose cut outcomes are known by hand."""
    return Table({
        "APOGEE_ID": [f"2M0000000{i}+0000000" for i in range(10)],
        "TELESCOPE": ["apo25m"] * 8 + ["lco25m", "apo1m"],
        "FIELD": ["F1"] * 10,
        "TEFF": np.array([4000, 4500, 5000, 6000, np.nan, -9999, 4800, 4200, 4300, 4400], np.float32),
        "LOGG": np.array([2.0, 2.5, 3.0, 4.4, 2.0, 2.0, 4.5, 1.5, 1.0, 2.2], np.float32),
        "FE_H": np.array([-0.1, 0.0, -0.5, 0.1, 0.0, 0.0, 0.0, -2.5, -0.2, 0.0], np.float32),
        "SNR": np.array([150, 90, 300, 200, 100, 100, 100, 100, 50, 120], np.float32),
        "ASPCAPFLAG": np.array([0, 1 << 23, 1, 0, 0, 0, 0, 0, 0, 0], np.int64),
        "STARFLAG": np.array([0, 0, 0, 1 << 4, 0, 0, 0, 0, 0, 0], np.int64),
        "EXTRATARG": np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 16], np.int16),
    })


def test_cuts_apply_in_order_and_report_what_each_removed(caplog):
    cuts = {"preset": "rgb", "snr_min": 80, "starflag_bits": ["LOW_SNR"], "telescopes": ["apo25m", "lco25m"]}
    with caplog.at_level(logging.INFO, logger="stellarlab.data.apogee.catalog"):
        kept, removed = apply_cuts(small_table(), cuts)
    assert removed == [
        ("TELESCOPE in ['apo25m', 'lco25m']", 1),  # the apo1m row (also the duplicate)
        ("EXTRATARG duplicate (bit 4)", 0),
        ("STARFLAG bits LOW_SNR (4)", 1),
        ("ASPCAPFLAG bits STAR_BAD (23)", 1),  # bit 0 (a warning) alone is kept
        ("SNR >= 80", 1),
        ("3500 <= TEFF <= 5500", 2),  # NaN and -9999 are missing: they fail a range
        ("0 <= LOGG <= 3.8", 1),
        ("-2 <= FE_H <= 0.5", 1),
    ]
    assert list(kept["APOGEE_ID"]) == ["2M00000000+0000000", "2M00000002+0000000"]
    assert "removed       2 stars" in caplog.text


def test_default_cuts_drop_star_bad_and_duplicates_only():
    kept, removed = apply_cuts(small_table(), {})
    assert removed == [("EXTRATARG duplicate (bit 4)", 1), ("ASPCAPFLAG bits STAR_BAD (23)", 1)]
    assert len(kept) == 8


def test_a_cut_that_empties_the_catalogue_is_named():
    with pytest.raises(DataError, match=r"no star left after the cut 'SNR >= 1000'.*all 8 remaining stars \(earlier cuts removed: EXTRATARG duplicate \(bit 4\): 1; ASPCAPFLAG bits STAR_BAD \(23\): 1\); loosen data\.cuts\.snr_min"):
        apply_cuts(small_table(), {"snr_min": 1000})
    with pytest.raises(DataError, match=r"'0 <= TEFF <= 1'.*data\.cuts\.ranges\.TEFF"):
        apply_cuts(small_table(), {"ranges": {"TEFF": [0, 1]}})


def test_bad_cut_settings_are_config_errors():
    with pytest.raises(ConfigError, match="preset='giants' is unknown; valid presets: null, rgb"):
        apply_cuts(small_table(), {"preset": "giants"})
    with pytest.raises(ConfigError, match="unknown bit name 'STARBAD'.*STAR_BAD \\(23\\)"):
        apply_cuts(small_table(), {"aspcapflag_bits": ["STARBAD"]})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['snr'\]"):
        apply_cuts(small_table(), {"snr": 50})
    with pytest.raises(DataError, match="no column VSCATTER"):
        apply_cuts(small_table(), {"ranges": {"VSCATTER": [None, 1]}})


def test_labels_nan_and_minus_9999_are_missing_and_all_missing_rows_are_cut():
    t = small_table()
    labels = label_array(t, ["teff", "LOGG"])
    assert labels.dtype == np.float32
    assert np.isnan(labels[4, 0]) and np.isnan(labels[5, 0]) and labels[0, 0] == 4000
    t["LOGG"][4] = -9999
    kept, removed = apply_cuts(t, {"aspcapflag_bits": [], "drop_duplicates": False}, labels=["TEFF", "LOGG"])
    assert removed == [("every label missing (TEFF, LOGG)", 1)]
    assert "2M00000004+0000000" not in list(kept["APOGEE_ID"])


def test_catalogue_reads_hdu1_with_clean_strings(survey):
    t = read_catalog(survey.catalog, ["apogee_id", "TELESCOPE", "teff", "NOT_A_COLUMN"])
    assert t.colnames == ["APOGEE_ID", "TELESCOPE", "TEFF"]
    assert len(t) == N_STARS + 5
    assert t["APOGEE_ID"][0] == survey.columns["APOGEE_ID"][0] and len(t["APOGEE_ID"][0]) == 18
    assert t["TELESCOPE"].dtype.kind == "U" and t["TEFF"].dtype == np.float32


def test_catalogue_errors_say_what_to_do(tmp_path):
    with pytest.raises(DataError, match=r"catalogue not found: .*nope\.fits.*python -m stellarlab\.download data=apogee"):
        read_catalog(tmp_path / "nope.fits")
    bad = tmp_path / "allStar.fits"
    bad.write_bytes(b"not a fits file" * 100)
    with pytest.raises(DataError, match=r"cannot read the APOGEE catalogue .*allStar\.fits.*corrupt"):
        read_catalog(bad)
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.zeros(3))]).writeto(tmp_path / "image.fits")
    with pytest.raises(DataError, match="HDU 1 is not a table"):
        read_catalog(tmp_path / "image.fits")


def test_spectrum_paths_follow_the_server_layout():
    row = {"APOGEE_ID": "2M19485057+5005279", "TELESCOPE": "apo25m", "FIELD": "K04_083+13", "FILE": "apStar-dr17-2M19485057+5005279.fits"}
    assert spectrum_relpath(row, "aspcapStar") == "apo25m/K04_083+13/aspcapStar-dr17-2M19485057+5005279.fits"
    assert spectrum_relpath(row, "apStar") == "apo25m/K04_083+13/apStar-dr17-2M19485057+5005279.fits"
    lco = {"APOGEE_ID": b"2M00000001-0000001 ", "TELESCOPE": b"lco25m", "FIELD": b"Hdeep_lco", "FILE": b""}
    assert spectrum_relpath(lco, "apStar") == "lco25m/Hdeep_lco/asStar-dr17-2M00000001-0000001.fits"
    t = Table({k: [v] for k, v in row.items()})
    assert spectrum_relpaths(t, "apStar") == [spectrum_relpath(row, "apStar")]


# -- file readers --------------------------------------------------------------------------------------
def test_aspcapstar_reader_masks_gaps_and_huge_errors(tmp_path):
    rng = np.random.default_rng(0)
    clean = np.full(grids.APOGEE_NPIX, 0.9, np.float32)
    flux, err = fx.aspcapstar_arrays(clean, 100.0, rng)
    path = fx.write_aspcapstar(tmp_path / "a.fits", flux, err)
    f, w = af.load_spectrum(path, af.PixelConfig(source="aspcapStar"))
    assert f.dtype == np.float32 and w.dtype == np.float32 and f.shape == (8575,)
    assert np.all(w[~grids.apogee_chip_mask()] == 0) and np.all(f[~grids.apogee_chip_mask()] == 1.0)
    assert int((w == 0).sum()) == 8575 - 7514 + 20  # off-chip pixels + the 20 with error 1e10
    on = w > 0
    assert np.allclose(w[on], 100.0**2, rtol=1e-5) and np.allclose(f[on], flux[on])
    f2, w2 = af.load_spectrum(path, af.PixelConfig(source="aspcapStar", gap_deleted=True))
    assert f2.shape == (7514,) and np.array_equal(f2, f[grids.apogee_chip_mask()])


def test_apstar_reader_uses_row0_of_big_endian_2d_data_and_the_bitmask(tmp_path):
    rng = np.random.default_rng(1)
    clean = np.full(grids.APOGEE_NPIX, 1.0)
    clean[1000:1010] = 0.5  # an absorption line
    flux, err, mask = fx.apstar_arrays(clean, 200.0, rng, n_visits=2)
    flux[1:] *= 3.0  # other rows differ: only row 0 may be read
    path = fx.write_apstar(tmp_path / "apStar.fits", flux, err, mask)
    with fits.open(path) as h:
        assert h[1].data.dtype.str == ">f8" and h[1].data.shape == (4, 8575) and h[3].data.dtype.str == ">i8"
    raw_flux, raw_err, raw_mask = af.read_apstar(path)
    assert raw_flux.dtype == np.float32 and raw_flux.dtype.isnative and raw_mask.dtype == np.int64
    assert np.allclose(raw_flux[grids.apogee_chip_mask()], flux[0][grids.apogee_chip_mask()], rtol=1e-6)

    f, w = af.load_spectrum(path, af.PixelConfig(source="apStar", pixmask=DEFAULT_PIXMASK))
    assert np.isfinite(f).all() and np.isfinite(w).all()
    masked = (mask[0] & DEFAULT_PIXMASK) != 0
    assert np.all(w[masked] == 0) and np.all(f[masked] == 1.0)
    assert np.all(w[np.isnan(flux[0])] == 0)
    persist = (mask[0] & (1 << 10)) != 0  # PERSIST_MED is not in the default set: those pixels are kept
    assert np.all(w[persist & ~masked & grids.apogee_chip_mask()] > 0)
    on = w > 0
    # continuum normalised: the flat spectrum comes back at 1 (noise 1/200), the line at 0.5
    assert np.median(f[on]) == pytest.approx(1.0, abs=0.003)
    line = slice(1000, 1010)
    assert on[line].sum() >= 5 and np.mean(f[line][on[line]]) == pytest.approx(0.5, abs=0.01)
    assert np.median(1 / np.sqrt(w[on])) == pytest.approx(1 / 200, rel=0.05)  # errors divided by the continuum


def test_apstar_1d_files_are_read_too(tmp_path):
    rng = np.random.default_rng(2)
    flux, err, mask = fx.apstar_arrays(np.ones(grids.APOGEE_NPIX), 100.0, rng)
    path = fx.write_apstar(tmp_path / "apStar-1d.fits", flux[0], err[0], mask[0])
    f, w = af.load_spectrum(path, af.PixelConfig(source="apStar", pixmask=DEFAULT_PIXMASK))
    assert f.shape == (8575,) and np.median(f[w > 0]) == pytest.approx(1.0, abs=0.005)


@pytest.mark.filterwarnings("ignore:File may have been truncated")
def test_reader_errors_name_the_file(tmp_path):
    short = fx.write_aspcapstar(tmp_path / "aspcapStar-short.fits", np.ones(7514), np.ones(7514))
    with pytest.raises(DataError, match=r"aspcapStar-short\.fits: HDU1 has shape \(7514,\), expected 8575 pixels"):
        af.read_aspcapstar(short)
    good = fx.write_aspcapstar(tmp_path / "aspcapStar-good.fits", np.ones(8575), np.ones(8575))
    truncated = tmp_path / "aspcapStar-truncated.fits"
    truncated.write_bytes(good.read_bytes()[:20000])
    with pytest.raises(DataError, match=r"corrupt or (unreadable|incomplete) FITS file .*aspcapStar-truncated\.fits"):
        af.read_aspcapstar(truncated)
    with fits.open(good) as h:
        h[1].header["CDELT1"] = 1e-5
        h.writeto(tmp_path / "other-grid.fits")
    with pytest.raises(DataError, match=r"other-grid\.fits: wavelength grid .* is not the DR17 grid"):
        af.read_aspcapstar(tmp_path / "other-grid.fits")


def test_real_dr17_apstar_file_loads_clean_onto_the_grid():
    cfg = af.PixelConfig(source="apStar", pixmask=DEFAULT_PIXMASK)
    flux, err, mask = af.read_apstar(REAL_APSTAR)
    assert flux.shape == (8575,) and flux.dtype == np.float32 and flux.dtype.isnative
    f, w = af.load_spectrum(REAL_APSTAR, cfg)
    assert f.shape == w.shape == (8575,)
    t = torch.from_numpy(f)
    assert torch.isfinite(t).all() and torch.isfinite(torch.from_numpy(w)).all()
    on = w > 0
    assert 7000 < on.sum() <= 7514
    assert np.median(f[on]) == pytest.approx(1.0, abs=0.02)  # the normalised continuum sits near 1
    for lo, hi in grids.APOGEE_CHIP_RANGES:  # on every chip
        assert np.median(f[lo:hi][on[lo:hi]]) == pytest.approx(1.0, abs=0.02)
    assert np.all(w[(mask & DEFAULT_PIXMASK) != 0] == 0) and np.all(f[(mask & DEFAULT_PIXMASK) != 0] == 1.0)
    assert np.all(w[~np.isfinite(flux)] == 0) and np.all(w[err > 1e5] == 0)
    # the K dwarf's spectrum has real lines: deep pixels exist, the median error is the SNR ~137 one
    assert np.percentile(f[on], 1) < 0.8
    assert 1 / np.median(1 / np.sqrt(w[on])) == pytest.approx(137, rel=0.25)
    g, _ = af.load_spectrum(REAL_APSTAR, af.PixelConfig(source="apStar", pixmask=DEFAULT_PIXMASK, gap_deleted=True))
    assert g.shape == (7514,)
    assert grids.apogee_wavelength()[0] == pytest.approx(15100.8, abs=0.05) and grids.apogee_wavelength()[-1] == pytest.approx(16999.8, abs=0.1)


# -- cache ---------------------------------------------------------------------------------------------
def test_cache_round_trip_memory_maps_and_keys_by_config(tmp_path):
    cache = ArrayCache(tmp_path, "demo", {"b": [1, 2], "a": 1})
    assert not cache.exists()
    flux = np.arange(12, dtype=np.float32).reshape(3, 4)
    ids = np.array(["2M1+1", "2M22-2", "2M333+3"])
    cache.write({"flux": flux, "ids": ids}, meta={"note": "x"})
    same = ArrayCache(tmp_path, "demo", {"a": 1, "b": [1, 2]})  # key order does not matter
    assert same.path == cache.path and same.exists()
    loaded = same.load()
    assert isinstance(loaded["flux"], np.memmap) and np.array_equal(loaded["flux"], flux)
    assert list(loaded["ids"]) == list(ids)
    assert same.meta["config"] == {"a": 1, "b": [1, 2]} and same.meta["note"] == "x"
    assert ArrayCache(tmp_path, "demo", {"a": 2, "b": [1, 2]}).path != cache.path


def test_a_killed_cache_build_leaves_nothing_trusted(tmp_path):
    cache = ArrayCache(tmp_path, "demo", {"n": 1})
    with pytest.raises(RuntimeError):
        with cache.writer({"flux": ((10, 4), np.float32)}) as w:
            w["flux"][0:5] = np.ones((5, 4))
            raise RuntimeError("killed")
    assert not cache.exists() and not cache.path.exists()
    assert list(tmp_path.iterdir()) == []
    # a temporary folder of a process that no longer exists is cleaned up by the next build
    stale = tmp_path / f".{cache.path.name}.tmp-{socket.gethostname()}-999999999-abc"
    stale.mkdir()
    with cache.writer({"flux": ((2, 4), np.float32)}) as w:
        w["flux"][:] = 2.0
    assert not stale.exists() and cache.exists() and np.all(cache.load()["flux"] == 2.0)


def test_a_damaged_cache_says_how_to_rebuild(tmp_path):
    cache = ArrayCache(tmp_path, "demo", {"n": 1})
    cache.write({"flux": np.ones((3, 4), np.float32)})
    np.save(cache.path / "flux.npy", np.ones((2, 4), np.float32))
    with pytest.raises(DataError, match=r"flux\.npy holds <f4 \[2, 4\], meta\.json says <f4 \[3, 4\]; delete .* to rebuild"):
        cache.load()


# -- the DataModule ------------------------------------------------------------------------------------
def test_datamodule_builds_a_cache_and_tensors_are_clean(survey, tmp_path, caplog):
    dm = datamodule(survey, tmp_path)
    with caplog.at_level(logging.INFO):
        dm.prepare_data()
    assert dm.build_report["cuts"] == [
        ("EXTRATARG duplicate (bit 4)", 5),
        ("ASPCAPFLAG bits STAR_BAD (23)", 4),
        ("every label missing (TEFF, LOGG, FE_H)", 12),
        ("aspcapStar file missing", 3),
    ]
    assert dm.build_report["n_stars"] == 281
    assert "3 of 284 selected stars have no aspcapStar file" in caplog.text
    meta = dm.cache.meta
    assert meta["arrays"]["flux"] == {"shape": [281, 8575], "dtype": "<f4"}
    assert meta["config"]["source"] == "aspcapStar" and meta["label_names"] == ["teff", "logg", "fe_h"]

    dm.setup()
    assert sum(len(i) for i in dm.split_index.values()) == 281
    for t in dm.tensors.values():
        assert t["flux"].dtype == torch.float32 and torch.isfinite(t["flux"]).all() and torch.isfinite(t["weight"]).all()
        assert torch.all(t["flux"][t["weight"] == 0] == 1.0)
        assert torch.all(t["weight"][:, ~torch.from_numpy(grids.apogee_chip_mask())] == 0)
    phys = torch.cat([t["labels_phys"] for t in dm.tensors.values()])
    # one label missing stays NaN (masked per label in the loss): 6 NaN LOGG, 6 FE_H = -9999
    assert torch.isnan(phys).sum(dim=0).tolist() == [0, 6, 6]
    assert (phys[:, 0] > 3000).all()
    assert dm.model_spec()["n_pixels"] == 8575 and len(dm.wavelength) == 8575


def test_split_is_by_apogee_id_and_reproducible(survey, tmp_path):
    a = datamodule(survey, tmp_path, split=[200, 40, 41], split_seed=17)
    a.setup()
    ids = a.cache.load()["apogee_id"]
    sides = [set(ids[i]) for i in a.split_index.values()]
    assert [len(s) for s in sides] == [200, 40, 41]
    assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
    b = datamodule(survey, tmp_path, split=[200, 40, 41], split_seed=17)
    b.setup()
    assert all(np.array_equal(a.split_index[k], b.split_index[k]) for k in a.split_index)


def test_seed_study_split_1024_256_512_is_reproducible():
    ids = np.array([fx.apogee_id(np.random.default_rng(i)) + f"{i:05d}" for i in range(1900)])
    one = split_by_star(ids, [1024, 256, 512], 17)
    two = split_by_star(ids, [1024, 256, 512], 17)
    assert [len(i) for i in one] == [1024, 256, 512]
    assert all(np.array_equal(x, y) for x, y in zip(one, two))
    assert not set(ids[one[0]]) & set(ids[one[2]])


def test_second_run_reuses_the_cache_and_a_changed_setting_rebuilds(survey, tmp_path, monkeypatch):
    first = datamodule(survey, tmp_path)
    first.prepare_data()
    built = (first.cache.path / "meta.json").stat().st_mtime_ns

    def no_reading(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr("stellarlab.data.apogee.datamodule.load_chunk", no_reading)
    again = datamodule(survey, tmp_path, split=[0.5, 0.25, 0.25], batch_size=8, workers=2)  # split/loader: same cache
    again.prepare_data()
    again.setup()
    assert again.cache.path == first.cache.path and (first.cache.path / "meta.json").stat().st_mtime_ns == built
    monkeypatch.undo()

    gaps = datamodule(survey, tmp_path, gap_deleted=True, cuts={"snr_min": 100})
    assert gaps.cache.path != first.cache.path
    gaps.setup()
    assert gaps.tensors["train"]["flux"].shape[1] == 7514
    assert np.allclose(gaps.wavelength, grids.apogee_wavelength()[grids.apogee_chip_mask()])


def test_parallel_readers_give_the_same_cache_as_one_process(survey, tmp_path):
    serial = datamodule(survey, tmp_path / "serial")
    serial.prepare_data()
    ref = serial.cache.load()
    for parallel in ("process", "thread"):
        dm = datamodule(survey, tmp_path / parallel, workers=2, parallel=parallel, chunk_size=7)
        dm.prepare_data()
        got = dm.cache.load()
        for name in ("flux", "weight", "labels", "apogee_id", "snr"):
            assert np.array_equal(got[name], ref[name], equal_nan=name != "apogee_id"), (parallel, name)


def test_apstar_source_normalises_each_star(apstar_survey, tmp_path):
    dm = datamodule(apstar_survey, tmp_path, split=[0.6, 0.2, 0.2], batch_size=4)
    dm.setup()
    flux = torch.cat([t["flux"] for t in dm.tensors.values()])
    weight = torch.cat([t["weight"] for t in dm.tensors.values()])
    assert torch.isfinite(flux).all()
    med = torch.stack([row[w > 0].median() for row, w in zip(flux, weight)])
    assert torch.all((med > 0.95) & (med < 1.02)), med  # synthetic spectra have lines: median just below 1
    n_usable = (weight > 0).sum(dim=1)
    assert torch.all(n_usable == 7514 - 40 - 30)  # chip pixels minus the bitmasked ones


def test_data_errors_are_clear(survey, tmp_path):
    with pytest.raises(DataError, match=r"catalogue not found.*python -m stellarlab\.download data=apogee"):
        datamodule(survey, tmp_path, catalog=str(tmp_path / "allStar.fits")).prepare_data()
    with pytest.raises(DataError, match=r"spectra folder not found: .*nowhere.*python -m stellarlab\.download data=apogee data\.source=aspcapStar"):
        datamodule(survey, tmp_path, spectra_dir=str(tmp_path / "nowhere")).prepare_data()
    with pytest.raises(DataError, match=r"3 of 284 selected stars have no aspcapStar file .*data\.strict=false"):
        datamodule(survey, tmp_path, strict=True).prepare_data()
    with pytest.raises(DataError, match=r"no star left after the cut 'SNR >= 1e\+06'.*data\.cuts\.snr_min"):
        datamodule(survey, tmp_path, cuts={"snr_min": 1e6}).prepare_data()
    with pytest.raises(DataError, match=r"has no column\(s\) \['MG_FE'\], asked for by data\.labels"):
        datamodule(survey, tmp_path, labels=["teff", "mg_fe"]).prepare_data()
    with pytest.raises(ConfigError, match="data.source='apVisit' is unknown"):
        datamodule(survey, tmp_path, source="apVisit")
    with pytest.raises(ConfigError, match=r"data\.pixmask_bits: unknown bit name 'SKY'"):
        datamodule(survey, tmp_path, pixmask_bits=["SKY"])
    assert not any(tmp_path.glob("apogee-*"))  # nothing half-built was published


@pytest.mark.filterwarnings("ignore:File may have been truncated")
def test_bad_spectrum_files_are_skipped_and_listed_or_with_strict_all_named_in_one_error(survey, tmp_path, caplog):
    broken = tmp_path / "survey"
    shutil.copytree(survey.root, broken)
    files = sorted((broken / "aspcapStar").rglob("aspcapStar-*.fits"))
    files[10].write_bytes(files[10].read_bytes()[:9000])  # truncated
    fx.write_aspcapstar(files[20], np.ones(8000), np.ones(8000))  # another grid
    s = fx.SurveyFiles(broken, broken / survey.catalog.name, broken / "aspcapStar", "aspcapStar", survey.columns,
                       survey.labels, survey.written)
    for rel in datamodule(s, tmp_path / "probe")._select()[2]["missing_examples"]:  # strict also refuses missing files
        shutil.copy(files[0], broken / "aspcapStar" / rel)
    files = sorted((broken / "aspcapStar").rglob("aspcapStar-*.fits"))
    strict = datamodule(s, tmp_path / "strict", workers=2, strict=True)
    with pytest.raises(DataError) as info:
        strict.prepare_data()
    message = str(info.value)
    assert message.startswith("2 of ") and "cannot be read (data.strict=true); download them again" in message
    assert re.search(rf"corrupt or (unreadable|incomplete) FITS file .*{re.escape(files[10].name)}", message)
    assert re.search(rf"{re.escape(files[20].name)}: HDU1 has shape \(8000,\), expected 8575 pixels", message)
    assert not strict.cache.exists() and not any((tmp_path / "strict").glob(".*tmp*"))

    dm = datamodule(s, tmp_path / "cache", workers=2)  # data.strict=false: one bad file is not a stop
    dm.prepare_data()
    dm.setup("fit")
    assert "skipped 2 of" in caplog.text and files[10].name in caplog.text
    bad = dm.cache.meta["unreadable_files"]
    assert [Path(b["file"]).name for b in bad] == sorted([files[10].name, files[20].name], key=[f.name for f in files].index)
    kept = sum(len(v) for v in dm.split_index.values())
    assert kept == dm.cache.meta["report"]["n_stars"] - 2  # their stars are left out, the others train
def test_a_changed_catalogue_rebuilds_the_cache(survey, tmp_path):
    root = tmp_path / "survey"
    root.mkdir()
    catalog = root / "allStar.fits"
    shutil.copy(survey.catalog, catalog)
    s = fx.SurveyFiles(root, catalog, survey.spectra_dir, "aspcapStar", survey.columns, survey.labels, survey.written)
    dm = datamodule(s, tmp_path / "cache", cuts={"snr_min": 100})
    dm.prepare_data()
    n_before = dm.cache.meta["report"]["n_stars"]
    cols = {k: np.array(v) for k, v in survey.columns.items()}
    cols["SNR"][:] = 50  # everyone below the cut but the first 100 rows
    cols["SNR"][:100] = 200
    fx.write_allstar(catalog, cols)
    os.utime(catalog, ns=(1, 1))
    dm2 = datamodule(s, tmp_path / "cache", cuts={"snr_min": 100})
    dm2.prepare_data()
    assert dm2.cache.path == dm.cache.path
    assert dm2.cache.meta["report"]["n_stars"] < n_before and dm2.cache.meta["report"]["n_stars"] <= 100


# -- configs and end to end ----------------------------------------------------------------------------
def test_configs_compose(tmp_path):
    cfg = compose_config(["data=apogee"], tmp_path=tmp_path)
    assert cfg.data._target_ == "stellarlab.data.apogee.datamodule.APOGEEDataModule"
    assert cfg.data.spectra_dir == f"{tmp_path}/data/apogee/aspcapStar"
    assert cfg.data.catalog == f"{tmp_path}/data/apogee/allStar-dr17-synspec_rev1.fits"
    assert compose_config(["data=apogee", "data.source=apStar"], tmp_path=tmp_path).data.spectra_dir.endswith("/apogee/apStar")
    for model in ("linear", "mlp"):
        exp = compose_config(["experiment=apogee_rgb_logg", f"model={model}"], tmp_path=tmp_path)
        assert exp.model._target_ == {"linear": "stellarlab.models.linear.LinearRegressor", "mlp": "stellarlab.models.mlp.MLPRegressor"}[model]
        assert list(exp.data.labels) == ["logg"] and list(exp.data.split) == [1024, 256, 512]
        assert exp.data.split_seed == 17 and exp.data.cuts.preset == "rgb"
        syn = compose_config(["experiment=apogee_rgb_logg_synthetic", f"model={model}"], tmp_path=tmp_path)
        assert syn.data._target_.endswith("SyntheticDataModule")
        assert list(syn.data.labels) == ["logg"] and list(syn.data.split) == [1024, 256, 512] and syn.data.split_seed == 17


def apogee_cfg(s: fx.SurveyFiles, tmp_path: Path, *overrides: str):
    cfg = compose_config(
        [
            "data=apogee",
            f"data.catalog={s.catalog}",
            f"data.spectra_dir={s.spectra_dir}",
            "data.workers=2",
            "data.progress=false",
            "data.batch_size=32",
            "trainer.accelerator=cpu",
            "trainer.log_every_n_steps=5",
            "~callbacks.progress_bar",
            *overrides,
        ],
        tmp_path=tmp_path,
    )
    return cfg


@pytest.mark.slow
def test_train_on_apogee_files_end_to_end(survey, tmp_path):
    import train as train_script

    cfg = apogee_cfg(survey, tmp_path, "model=mlp", "trainer.max_epochs=10", "data.split=[0.7,0.15,0.15]")
    best = train_script.main(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert math.isfinite(best)
    assert metrics["split_sizes"] == {"train": 197, "val": 42, "test": 42}
    assert metrics["label_names"] == ["teff", "logg", "fe_h"]
    for label in ("teff", "logg", "fe_h"):
        m = metrics["test"][label]
        assert 38 <= m["n"] <= 42  # a star missing this one label is left out of its metrics
        assert m["rmse"] < 0.6 * m["rmse_mean_predictor"], (label, m)  # the spectra carry the labels


@pytest.mark.slow
def test_rgb_logg_experiment_runs_on_files_and_on_the_synthetic_survey(survey, tmp_path):
    import train as train_script

    cfg = apogee_cfg(survey, tmp_path / "files", "experiment=apogee_rgb_logg", "model=linear", "trainer.max_epochs=2",
                     "data.split=[0.6,0.2,0.2]", "data.batch_size=16")
    train_script.main(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert metrics["label_names"] == ["logg"]
    dm_cache = ArrayCache(Path(cfg.paths.cache_dir) / "apogee", "x", {})  # find the cache the run built
    (built,) = [p for p in dm_cache.root.iterdir() if p.name.startswith("apogee-aspcapStar-")]
    meta = json.loads((built / "meta.json").read_text())
    labels = np.load(built / "labels.npy")
    assert meta["config"]["cuts"]["preset"] == "rgb" and labels.shape[1] == 1
    assert np.nanmin(labels) >= 0 and np.nanmax(labels) <= 3.8
    n_rgb = meta["report"]["n_stars"]
    assert sum(metrics["split_sizes"].values()) == n_rgb

    syn = compose_config(["experiment=apogee_rgb_logg_synthetic", "model=linear", "trainer.max_epochs=1",
                          "trainer.accelerator=cpu", "~callbacks.progress_bar"], tmp_path=tmp_path / "synthetic")
    with open_dict(syn):
        syn.data.n_stars = 1792
    train_script.main(syn)
    metrics = json.loads((Path(syn.paths.output_dir) / "metrics.json").read_text())
    assert metrics["split_sizes"] == {"train": 1024, "val": 256, "test": 512}
    assert metrics["label_names"] == ["logg"]


def test_a_bare_preset_name_is_shorthand_for_the_preset():
    from stellarlab.data.apogee.catalog import resolved_cuts

    assert resolved_cuts("rgb") == resolved_cuts({"preset": "rgb"})
    assert resolved_cuts("rgb")["ranges"]["LOGG"] == (0.0, 3.8)


def test_checkpoints_carry_the_pixel_settings_so_predict_reads_files_the_same_way(survey, tmp_path):
    from stellarlab.data.apogee.files import read_input

    dm = datamodule(survey, tmp_path / "cache", gap_deleted=True, max_flux_error=0.5)
    saved = dm.state_dict()["preprocessing"]  # what the checkpoint holds
    assert saved["gap_deleted"] is True and saved["pixels"]["max_flux_error"] == 0.5
    path = fx.write_aspcapstar(tmp_path / "aspcapStar-dr17-2M00000000+0000000.fits", np.full(8575, 0.9), np.full(8575, 0.01))
    flux, weight, ids = read_input(path, "aspcapStar", saved, np.zeros(7514))  # a gap-deleted model's grid
    assert flux.shape == weight.shape == (1, 7514) and ids == ["2M00000000+0000000"]
    assert np.allclose(flux[weight > 0], 0.9)
