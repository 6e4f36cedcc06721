"""Synthetic surveys: label prior, noise model, determinism, validation and the atomic on-disk cache."""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch

import stellarlab.synthetic.survey as survey_mod
from stellarlab.grids import apogee_chip_mask
from stellarlab.synthetic import (
    LABEL_NAMES,
    SpectrumGenerator,
    SyntheticSurvey,
    make_survey,
    sample_labels,
)


@pytest.fixture(scope="module")
def apogee():
    return SpectrumGenerator("apogee")


@pytest.fixture(scope="module")
def small():
    return make_survey("apogee", n_stars=12, snr=50.0, seed=3, spectra_per_star=2, progress=False)


# ---------------------------------------------------------------------------------------------- prior
def test_prior_is_deterministic_and_in_range():
    a, b, c = sample_labels(2000, 1), sample_labels(2000, 1), sample_labels(2000, 2)
    assert a.dtype == np.float32 and a.shape == (2000, 4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    teff, logg, feh, afe = a.T
    assert teff.min() >= 3500 and teff.max() <= 7000
    assert feh.min() >= -2.5 and feh.max() <= 0.5
    assert -0.2 < afe.min() and afe.max() < 0.5


def test_prior_is_an_hr_diagram_not_a_box():
    teff, logg, feh, afe = sample_labels(20000, 0).astype(np.float64).T
    giants, dwarfs = logg < 3.5, logg > 4.0
    assert 0.3 < giants.mean() < 0.65 and 0.25 < dwarfs.mean() < 0.6
    assert np.corrcoef(teff[giants], logg[giants])[0, 1] > 0.5  # the RGB: cooler when more luminous
    assert np.corrcoef(afe, feh)[0, 1] < -0.5
    # no hot supergiants (unphysical corner of a box prior); dwarfs are 4000-7000 K at log g 4.0-4.8
    assert not np.any((teff > 6000) & (logg < 2.5))
    assert 4.0 <= np.percentile(logg[dwarfs], 1) and np.percentile(logg[dwarfs], 99) <= 4.8
    # MDF peaks near -0.1 with a metal-poor tail; alpha rises at low metallicity
    hist, edges = np.histogram(feh, bins=np.arange(-2.5, 0.55, 0.1))
    assert -0.35 < edges[np.argmax(hist)] < 0.15
    assert 0.02 < np.mean(feh < -1.0) < 0.2 and np.any(feh < -2.0)
    assert abs(afe[feh > 0].mean()) < 0.06 and afe[feh < -1].mean() > 0.22
    # metal-poor giants are hotter at fixed log g
    band = giants & (np.abs(logg - 1.5) < 0.3)
    assert teff[band & (feh < -1)].mean() > teff[band & (feh > -0.3)].mean() + 150


# ---------------------------------------------------------------------------------------------- survey arrays
def test_survey_shapes_dtypes_and_gaps(small):
    s = small
    assert isinstance(s, SyntheticSurvey)
    assert s.flux.shape == s.ivar.shape == (24, 8575)
    assert s.flux.dtype == np.float32 and s.ivar.dtype == np.float32 and s.labels.dtype == np.float32
    assert s.star_id.dtype == np.int64 and s.snr.dtype == np.float32 and s.wavelength.dtype == np.float64
    assert s.label_names == LABEL_NAMES and s.survey == "apogee"
    chips = apogee_chip_mask()
    assert np.all(s.flux[:, ~chips] == 1.0) and np.all(s.ivar[:, ~chips] == 0.0)
    assert np.all(s.ivar[:, chips] == np.float32(50.0 ** 2))
    assert s.params["n_stars"] == 12 and s.params["seed"] == 3


def test_spectra_per_star_share_star_and_labels_but_not_noise(small):
    s = small
    assert np.array_equal(s.star_id, np.repeat(np.arange(12), 2))
    assert np.array_equal(s.labels[0::2], s.labels[1::2])
    assert np.array_equal(s.labels[0::2], sample_labels(12, 3))
    chips = apogee_chip_mask()
    assert not np.allclose(s.flux[0, chips], s.flux[1, chips])


@pytest.mark.parametrize("snr", [30.0, 200.0])
def test_noise_matches_snr(apogee, snr):
    s = make_survey("apogee", n_stars=8, snr=snr, seed=5, gap_deleted=True, progress=False)
    clean = apogee.generate(torch.from_numpy(s.labels)).numpy()[:, apogee_chip_mask()]
    resid = s.flux - clean
    assert np.std(resid) == pytest.approx(1.0 / snr, rel=0.03)
    assert abs(np.mean(resid)) < 5.0 / snr / np.sqrt(resid.size)  # unbiased (5 sigma)
    assert np.all(s.ivar == np.float32(snr ** 2))


def test_snr_range_is_per_spectrum_log_uniform(apogee):
    s = make_survey("apogee", n_stars=400, snr=(20.0, 400.0), seed=1, gap_deleted=True, progress=False)
    assert s.snr.min() >= 20.0 and s.snr.max() <= 400.0 and np.unique(s.snr).size == 400
    # log-uniform: the median sits near the geometric mean, not the arithmetic one
    assert np.median(s.snr) == pytest.approx(np.sqrt(20.0 * 400.0), rel=0.2)
    assert np.allclose(s.ivar[:, 0], s.snr.astype(np.float64) ** 2, rtol=1e-6)
    clean = apogee.generate(torch.from_numpy(s.labels[:40])).numpy()[:, apogee_chip_mask()]
    z = (s.flux[:40] - clean) * s.snr[:40, None]  # standardised residuals
    assert np.std(z) == pytest.approx(1.0, rel=0.03)


def test_gap_deleted_keeps_chip_pixels_only(small):
    d = make_survey("apogee", n_stars=12, snr=50.0, seed=3, spectra_per_star=2, gap_deleted=True, progress=False)
    chips = apogee_chip_mask()
    assert d.flux.shape == (24, 7514) and d.wavelength.shape == (7514,)
    assert np.array_equal(d.wavelength, small.wavelength[chips])
    assert np.array_equal(d.flux, small.flux[:, chips])


def test_galah_survey_all_pixels_valid():
    s = make_survey("galah", n_stars=3, snr=80.0, seed=0, progress=False)
    assert s.flux.shape == (3, 16384) and np.all(s.ivar == np.float32(6400.0))


def test_determinism(small):
    again = make_survey("apogee", n_stars=12, snr=50.0, seed=3, spectra_per_star=2, progress=False)
    other = make_survey("apogee", n_stars=12, snr=50.0, seed=4, spectra_per_star=2, progress=False)
    for name in ("flux", "ivar", "labels", "star_id", "snr", "wavelength"):
        assert np.array_equal(getattr(small, name), getattr(again, name)), name
    assert not np.array_equal(small.flux, other.flux) and not np.array_equal(small.labels, other.labels)


@pytest.mark.parametrize("kwargs,match", [
    ({"n_stars": 0}, "n_stars"), ({"n_stars": 2.5}, "n_stars"), ({"snr": 0.0}, "snr"), ({"snr": -5.0}, "snr"),
    ({"snr": (100.0, 50.0)}, "lo <= hi"), ({"snr": (0.0, 50.0)}, "snr"), ({"survey": "sdss"}, "apogee, galah"),
    ({"spectra_per_star": 0}, "spectra_per_star"),
])
def test_input_validation(kwargs, match):
    args = {"survey": "apogee", "n_stars": 2, "progress": False} | kwargs
    with pytest.raises(ValueError, match=match):
        make_survey(**args)


def test_progress_bar_runs():
    s = make_survey("apogee", n_stars=2, snr=50.0, seed=0, progress=True)
    assert s.flux.shape == (2, 8575)


# ---------------------------------------------------------------------------------------------- cache
def _args(**kw):
    return {"survey": "apogee", "n_stars": 6, "snr": 60.0, "seed": 11, "progress": False} | kw


def test_cache_roundtrip_loads_without_regenerating(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="stellarlab.synthetic")
    first = make_survey(**_args(), cache_dir=tmp_path)
    dirs = [p for p in tmp_path.iterdir()]
    assert len(dirs) == 1 and dirs[0].name.startswith("apogee-") and len(dirs[0].name) == len("apogee-") + 16
    names = sorted(p.name for p in dirs[0].iterdir())
    assert names == sorted(["flux.npy", "ivar.npy", "labels.npy", "star_id.npy", "snr.npy", "wavelength.npy",
                            "params.json"])
    assert json.loads((dirs[0] / "params.json").read_text())["params"]["n_stars"] == 6
    assert any("generated 6 spectra" in r.message for r in caplog.records)
    np.load(dirs[0] / "flux.npy", mmap_mode="r")  # loadable memory-mapped

    def boom(*a, **k):
        raise AssertionError("generator called although the cache should be used")

    monkeypatch.setattr(SpectrumGenerator, "generate", boom)
    monkeypatch.setattr(SpectrumGenerator, "forward", boom)
    second = make_survey(**_args(), cache_dir=tmp_path)
    assert any("loaded cached synthetic survey" in r.message for r in caplog.records)
    for name in ("flux", "ivar", "labels", "star_id", "snr", "wavelength"):
        assert np.array_equal(getattr(first, name), getattr(second, name)), name
    assert second.label_names == LABEL_NAMES and second.survey == "apogee" and second.params == first.params


def test_cache_key_changes_with_params(tmp_path):
    make_survey(**_args(), cache_dir=tmp_path)
    make_survey(**_args(snr=61.0), cache_dir=tmp_path)
    make_survey(**_args(gap_deleted=True), cache_dir=tmp_path)
    make_survey(**_args(), cache_dir=tmp_path)  # same as the first: no new directory
    assert len([p for p in tmp_path.iterdir()]) == 3


def test_cache_key_includes_generator_version(monkeypatch):
    params = survey_mod._canonical_params("apogee", 6, 60.0, 11, 1, False, 3)
    key = survey_mod.cache_key(params)
    monkeypatch.setattr(survey_mod, "GENERATOR_VERSION", "something-else")
    assert survey_mod.cache_key(params) != key


def test_crash_during_cache_write_leaves_nothing_trusted(tmp_path, monkeypatch):
    real_save = np.save
    calls = {"n": 0}

    def flaky_save(*a, **k):
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError("disk full (simulated)")
        return real_save(*a, **k)

    monkeypatch.setattr(np, "save", flaky_save)
    with pytest.raises(OSError, match="simulated"):
        make_survey(**_args(), cache_dir=tmp_path)
    assert calls["n"] == 2
    assert list(tmp_path.iterdir()) == []  # no final directory, no leftover temporary one
    monkeypatch.setattr(np, "save", real_save)
    s = make_survey(**_args(), cache_dir=tmp_path)
    final = [p for p in tmp_path.iterdir()]
    assert len(final) == 1 and (final[0] / "params.json").is_file()
    assert np.array_equal(s.flux, make_survey(**_args()).flux)


def test_partial_directory_without_metadata_is_not_trusted(tmp_path):
    key = survey_mod.cache_key(survey_mod._canonical_params("apogee", 6, 60.0, 11, 1, False, 3))
    bogus = tmp_path / f"apogee-{key}"
    bogus.mkdir()
    np.save(bogus / "flux.npy", np.zeros((6, 8575), np.float32))  # e.g. a hand-copied, incomplete directory
    os.remove(bogus / "flux.npy")
    s = make_survey(**_args(), cache_dir=tmp_path)  # regenerates and replaces the empty directory
    assert (bogus / "params.json").is_file() and s.flux.shape == (6, 8575)


def _cache_folder(tmp_path):
    key = survey_mod.cache_key(survey_mod._canonical_params("apogee", 6, 60.0, 11, 1, False, 3))
    return tmp_path / f"apogee-{key}"


def test_an_interrupted_copy_of_a_cache_is_rebuilt_not_a_traceback_forever(tmp_path, caplog):
    folder = _cache_folder(tmp_path)
    folder.mkdir()
    np.save(folder / "flux.npy", np.zeros((6, 8575), np.float32))  # what an interrupted `cp -r` leaves
    s = make_survey(**_args(), cache_dir=tmp_path)
    assert "has no params.json (an interrupted copy?): building it again" in caplog.text
    assert (folder / "params.json").is_file() and s.flux.shape == (6, 8575)
    assert np.array_equal(make_survey(**_args(), cache_dir=tmp_path).flux, s.flux)


def test_a_truncated_cache_array_is_repaired_once_not_regenerated_every_run(tmp_path, monkeypatch, caplog):
    good = make_survey(**_args(), cache_dir=tmp_path)
    folder = _cache_folder(tmp_path)
    data = (folder / "flux.npy").read_bytes()
    (folder / "flux.npy").write_bytes(data[: len(data) // 2])  # a full disk, a copy cut short
    repaired = make_survey(**_args(), cache_dir=tmp_path)
    assert "is damaged" in caplog.text and np.array_equal(repaired.flux, good.flux)

    def boom(*a, **k):
        raise AssertionError("generated again although the cache was repaired")

    monkeypatch.setattr(SpectrumGenerator, "generate", boom)
    again = make_survey(**_args(), cache_dir=tmp_path)  # from the repaired files, memory-mapped
    assert isinstance(again.flux, np.memmap) and np.array_equal(again.flux, good.flux)


def test_a_damaged_cache_that_cannot_be_removed_is_one_clear_error(tmp_path, monkeypatch):
    from stellarlab.errors import DataError

    folder = _cache_folder(tmp_path)
    folder.mkdir()
    (folder / "junk").write_text("x")

    def refuse(path, *a, **k):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(survey_mod.shutil, "rmtree", refuse)
    with pytest.raises(DataError, match=r"has no params\.json .* cannot be removed .*delete it, or set paths\.cache_dir"):
        make_survey(**_args(), cache_dir=tmp_path)


def test_a_snr_whose_noise_overflows_is_refused_and_nothing_is_cached(tmp_path):
    with pytest.raises(ValueError, match=r"snr=1e-40 makes the noise .* overflow float32"):
        make_survey(**_args(snr=1e-40), cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_complete_cache_in_a_read_only_folder_is_read_and_a_missing_one_is_one_error(tmp_path, monkeypatch):
    from stellarlab.errors import DataError

    good = make_survey(**_args(), cache_dir=tmp_path)

    def read_only(final):  # what mkdir does in a folder this user cannot write (tests may run as root)
        raise PermissionError(13, "Permission denied", str(final))

    monkeypatch.setattr("stellarlab.files.temporary_sibling", read_only)
    again = make_survey(**_args(), cache_dir=tmp_path)  # nothing to write: read as it is
    assert np.array_equal(again.flux, good.flux)
    with pytest.raises(DataError, match=r"cannot write .*apogee-.*Permission denied.*set paths\.cache_dir to a folder you can write"):
        make_survey(**_args(seed=12), cache_dir=tmp_path)


def test_the_config_check_lets_a_read_only_cache_folder_through_but_not_an_impossible_one(tmp_path, monkeypatch):
    from stellarlab.errors import ConfigError
    from stellarlab.run import validation
    from tests.conftest import compose_config

    monkeypatch.setattr(validation, "writable_folder_problem",
                        lambda path: None if str(path).startswith(str(tmp_path / "run")) else f"{path} is not writable by this user")
    (tmp_path / "ro").mkdir()
    validation.validate_train_config(compose_config([f"data.cache_dir={tmp_path / 'ro'}"], tmp_path=tmp_path))
    with pytest.raises(ConfigError, match=r"data\.cache_dir=.*missing cannot be written"):
        validation.validate_train_config(compose_config([f"data.cache_dir={tmp_path / 'missing'}"], tmp_path=tmp_path))
