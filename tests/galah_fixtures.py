"""Files in exactly the GALAH layouts, for tests (and for checks of the download command).

* galah4 (`simbaswe/galah4`): `spectra.npy` (N, 16384) and `labels.npy` (N, 8) with columns
  `[mass, age, l_bol, dist, t_eff, log_g, fe_h, SNR]`.
* GALAH DR4: an allstar FITS table (HDU 1: `sobject_id`, `tmass_id`, `gaiadr3_source_id`, `teff`,
  `logg`, `fe_h`, ..., `flag_sp`, `snr_px_ccd1..4`) and one file per star and CCD,
  `{sobject_id}{ccd}.fits`, with the eight extensions of the DR4 data model (PRIMARY counts,
  `normalized`, `relative_error`, `sky`, `teluric`, `scattered`, `cross_talk`, `resolution_profile`),
  a linear observed-frame wavelength (CRVAL1, CDELT1, CRPIX1) and the radial velocity `RVCOM`.

The spectra come from the synthetic GALAH-like survey (`stellarlab.synthetic`, survey="galah"), so
a model trained on these files really learns. Every file is written under a temporary name and renamed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

GALAH4_COLUMNS = ("mass", "age", "l_bol", "dist", "t_eff", "log_g", "fe_h", "SNR")
C_KMS = 299792.458
#: Native HERMES CCD grids close to real DR4 files: CRVAL1 (Angstrom) and CDELT1 (Angstrom per pixel).
CCD_NATIVE = {1: (4713.5, 0.04598), 2: (5648.9, 0.05463), 3: (6478.3, 0.06311), 4: (7585.6, 0.07354)}
DR4_EXTENSIONS = ("normalized", "relative_error", "sky", "teluric", "scattered", "cross_talk", "resolution_profile")


def synthetic_galah(n_stars: int, seed: int = 7, snr=(15.0, 150.0), cache_dir: str | os.PathLike | None = None):
    """A synthetic GALAH-like survey (4 x 4096 pixels, air wavelengths, labels teff/logg/fe_h/alpha_fe)."""
    from stellarlab.synthetic import make_survey

    return make_survey(survey="galah", n_stars=n_stars, snr=tuple(snr), seed=seed, cache_dir=cache_dir, progress=False)


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.save(fh, array)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# galah4
# ------------------------------------------------------------------------------------------------


@dataclass
class Galah4Fixture:
    root: Path
    spectra: np.ndarray  # what spectra.npy holds
    labels: np.ndarray  # what labels.npy holds
    nan_label_rows: list[int]  # t_eff, log_g and fe_h all NaN
    partial_label_rows: list[int]  # only log_g NaN
    nan_pixel_rows: list[int]  # a run of NaN pixels
    dead_rows: list[int]  # every pixel NaN
    low_pixels: list[tuple[int, int]]  # (row, pixel) set below the log floor: -0.05 and 0.1

    @property
    def snr(self) -> np.ndarray:
        return self.labels[:, 7]


def galah4_arrays(survey, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """spectra (N, 16384) float32 and labels (N, 8) in galah4's column order, with NaN labels and pixels."""
    rng = np.random.default_rng(seed)
    n = len(survey)
    spectra = np.array(survey.flux, dtype=np.float32)
    labels = np.empty((n, len(GALAH4_COLUMNS)), dtype=np.float32)
    labels[:, 0] = rng.uniform(0.7, 2.5, n)  # mass, Msun
    labels[:, 1] = rng.uniform(0.5, 13.0, n)  # age, Gyr
    labels[:, 2] = rng.lognormal(0.5, 1.0, n)  # l_bol, Lsun
    labels[:, 3] = rng.uniform(100.0, 4000.0, n)  # dist, pc
    labels[:, 4:7] = np.asarray(survey.labels)[:, :3]  # teff, logg, fe_h
    labels[:, 7] = np.asarray(survey.snr)
    special = rng.choice(n, 10, replace=False)
    info = {
        "nan_label_rows": sorted(int(i) for i in special[:3]),
        "partial_label_rows": sorted(int(i) for i in special[3:5]),
        "nan_pixel_rows": sorted(int(i) for i in special[5:9]),
        "dead_rows": [int(special[9])],
    }
    labels[info["nan_label_rows"], 4:7] = np.nan
    labels[info["partial_label_rows"], 5] = np.nan
    for i in info["nan_pixel_rows"]:
        start = int(rng.integers(0, spectra.shape[1] - 200))
        spectra[i, start : start + 200] = np.nan
    spectra[info["dead_rows"]] = np.nan
    row = info["partial_label_rows"][0]
    info["low_pixels"] = [(row, 100), (row, 9000)]
    spectra[row, 100], spectra[row, 9000] = -0.05, 0.1  # noise below zero, a saturated line core
    return spectra, labels, info


def write_galah4(root: str | os.PathLike, spectra: np.ndarray, labels: np.ndarray) -> Path:
    """Write spectra.npy and labels.npy into root (created); returns root."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _save_npy(root / "spectra.npy", np.asarray(spectra))
    _save_npy(root / "labels.npy", np.asarray(labels))
    return root


def make_galah4(root: str | os.PathLike, survey, seed: int = 0) -> Galah4Fixture:
    spectra, labels, info = galah4_arrays(survey, seed)
    return Galah4Fixture(write_galah4(root, spectra, labels), spectra, labels, **info)


# ------------------------------------------------------------------------------------------------
# GALAH DR4
# ------------------------------------------------------------------------------------------------


@dataclass
class DR4Fixture:
    root: Path
    catalogue: Path
    spectra_dir: Path
    sobject_id: np.ndarray
    gaia_id: np.ndarray
    labels: np.ndarray  # (N, 3) teff, logg, fe_h
    flag_sp: np.ndarray
    snr_ccd3: np.ndarray
    rv: np.ndarray  # km/s, RVCOM of each star's files
    crval: np.ndarray  # (N, 4) CRVAL1 per CCD
    cdelt: np.ndarray  # (N, 4)
    star_of_row: np.ndarray  # index of the synthetic star each row shows
    no_files: list[int] = field(default_factory=list)
    no_ccd4: list[int] = field(default_factory=list)
    native_pixels: int = 4096

    def path(self, row: int, ccd: int) -> Path:
        return self.spectra_dir / f"{self.sobject_id[row]}{ccd}.fits"


def _write_ccd_file(path: Path, wl_start: float, wl_step: float, normalized: np.ndarray, relative_error: np.ndarray,
                    rv: float, rng: np.random.Generator) -> None:
    from astropy.io import fits

    n = normalized.size
    x = np.linspace(-1.0, 1.0, n)
    counts = (normalized * 1500.0 * (1.0 + 0.2 * x - 0.1 * x**2)).astype(np.float32)
    header = fits.Header()
    header["CRVAL1"] = (wl_start, "wavelength of the reference pixel [Angstrom]")
    header["CDELT1"] = (wl_step, "wavelength step [Angstrom / pixel]")
    header["CRPIX1"] = (1.0, "reference pixel")
    header["CTYPE1"] = "LINEAR"
    header["CUNIT1"] = "Angstroms"
    header["RVCOM"] = (rv, "radial velocity of the combined spectrum [km/s]")
    header["SLITMASK"] = "OUT"
    header["WAV_OK"] = 1
    header["CROSS_OK"] = 1
    header["PLATE"] = 0
    header["B"] = 2.0
    wcs = {k: header[k] for k in ("CRVAL1", "CDELT1", "CRPIX1", "CTYPE1")}
    hdus = [fits.PrimaryHDU(counts, header=header)]
    arrays = {
        "normalized": normalized.astype(np.float32),
        "relative_error": relative_error.astype(np.float32),
        "sky": rng.normal(20.0, 1.0, n).astype(np.float32),
        "teluric": np.ones(n, dtype=np.float32),
        "scattered": np.full(n, 3.0, dtype=np.float32),
        "cross_talk": np.full(n, 0.5, dtype=np.float32),
        "resolution_profile": np.full(n, 0.17, dtype=np.float32),
    }
    for name in DR4_EXTENSIONS:
        hdu = fits.ImageHDU(arrays[name], name=name)
        for k, v in wcs.items():
            hdu.header[k] = v
        hdus.append(hdu)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fits.HDUList(hdus).writeto(tmp, overwrite=True)
    os.replace(tmp, path)


def write_galah_dr4(
    root: str | os.PathLike,
    survey,
    seed: int = 0,
    n_rows: int | None = None,
    flag_sp: dict[int, int] | None = None,
    snr_ccd3: dict[int, float] | None = None,
    repeats: dict[int, int] | None = None,
    no_files: list[int] = (),
    no_ccd4: list[int] = (),
    no_gaia_id: list[int] = (),
    rv_max: float = 60.0,
    exact_grid: bool = False,
    native_pixels: int = 4096,
    catalogue_name: str = "galah_dr4_allstar_240705.fits",
) -> DR4Fixture:
    """Write a DR4-style allstar table and per-CCD spectra for the survey's stars into root.

    flag_sp / snr_ccd3: per-row overrides (row -> value); repeats: row -> earlier row it re-observes
    (same Gaia id, labels and spectrum); no_files: rows whose four files are not written; no_ccd4: rows
    without the IR file; no_gaia_id: rows whose gaiadr3_source_id is 0 (no match). exact_grid=True writes every CCD on the arm grid of data=synthetic_galah at
    RV 0, so a resampled spectrum must equal the file's pixels.
    """
    from astropy.table import Table

    from stellarlab.grids import GALAH_ARMS, GALAH_NPIX_PER_ARM

    root = Path(root)
    spectra_dir = root / "spectra"
    spectra_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n = int(n_rows or len(survey))
    star_of_row = np.arange(n) % len(survey)
    for row, earlier in (repeats or {}).items():
        star_of_row[row] = star_of_row[earlier]

    base_id = 170115002401000  # yymmdd 170115, run 0024, repeat 01, fibre 000
    sobject_id = base_id + np.arange(n, dtype=np.int64) * 7 + 1
    gaia_id = 4_000_000_000_000_000_000 + rng.choice(10**12, n, replace=False).astype(np.int64)
    for row, earlier in (repeats or {}).items():
        gaia_id[row] = gaia_id[earlier]
    gaia_id[list(no_gaia_id)] = 0
    labels = np.asarray(survey.labels, dtype=np.float32)[star_of_row, :3]
    snr = np.asarray(survey.snr, dtype=np.float32)[star_of_row].copy()
    for row, value in (snr_ccd3 or {}).items():
        snr[row] = value
    flags = np.zeros(n, dtype=np.int32)
    flags[list(no_ccd4)] |= 2  # DR4: "data from at least one CCD is missing"
    for row, value in (flag_sp or {}).items():
        flags[row] = value
    rv = np.zeros(n) if exact_grid else np.round(rng.uniform(-rv_max, rv_max, n), 3)
    crval = np.zeros((n, 4))
    cdelt = np.zeros((n, 4))

    wl_grid = np.asarray(survey.wavelength)
    flux_all = np.asarray(survey.flux)
    for row in range(n):
        star = star_of_row[row]
        for ccd in (1, 2, 3, 4):
            lo, hi = GALAH_ARMS[ccd - 1]
            if exact_grid:
                start, step, npx = lo, (hi - lo) / (GALAH_NPIX_PER_ARM - 1), GALAH_NPIX_PER_ARM
            else:
                start = CCD_NATIVE[ccd][0] + rng.uniform(-0.3, 0.3)
                step = CCD_NATIVE[ccd][1] * (1.0 + rng.uniform(-1e-3, 1e-3))
                npx = native_pixels
            crval[row, ccd - 1], cdelt[row, ccd - 1] = start, step
            if row in no_files or (ccd == 4 and row in no_ccd4):
                continue
            arm = slice((ccd - 1) * GALAH_NPIX_PER_ARM, ccd * GALAH_NPIX_PER_ARM)
            wl_obs = start + np.arange(npx) * step
            rest = wl_obs / (1.0 + rv[row] / C_KMS)
            normalized = np.interp(rest, wl_grid[arm], flux_all[star, arm], left=1.0, right=1.0)
            relative_error = np.full(npx, 1.0 / max(float(snr[row]) if np.isfinite(snr[row]) else 20.0, 1.0))
            relative_error[rng.choice(npx, 3, replace=False)] = 0.0  # pixels the reduction could not measure
            _write_ccd_file(spectra_dir / f"{sobject_id[row]}{ccd}.fits", start, step, normalized, relative_error, float(rv[row]), rng)

    table = Table()
    table["sobject_id"] = sobject_id
    table["tmass_id"] = np.array([f"J{10000000 + i:08d}-{5000000 + i:07d}" for i in range(n)])
    table["gaiadr3_source_id"] = gaia_id
    table["survey_name"] = np.array(["galah_main"] * n)
    table["flag_sp"] = flags
    table["snr_px_ccd1"] = (0.6 * snr).astype(np.float32)
    table["snr_px_ccd2"] = (0.9 * snr).astype(np.float32)
    table["snr_px_ccd3"] = snr
    table["snr_px_ccd4"] = (1.1 * snr).astype(np.float32)
    table["teff"] = labels[:, 0]
    table["e_teff"] = np.full(n, 60.0, dtype=np.float32)
    table["logg"] = labels[:, 1]
    table["e_logg"] = np.full(n, 0.05, dtype=np.float32)
    table["fe_h"] = labels[:, 2]
    table["e_fe_h"] = np.full(n, 0.05, dtype=np.float32)
    table["mg_fe"] = np.asarray(survey.labels, dtype=np.float32)[star_of_row, 3]
    table["flag_mg_fe"] = np.zeros(n, dtype=np.int32)
    table["vmic"] = rng.uniform(0.8, 2.0, n).astype(np.float32)
    table["rv_comp_1"] = rv.astype(np.float32)
    catalogue = root / catalogue_name
    tmp = catalogue.with_name(f".{catalogue.name}.tmp-{os.getpid()}")
    table.write(tmp, format="fits", overwrite=True)
    os.replace(tmp, catalogue)
    return DR4Fixture(
        root=root, catalogue=catalogue, spectra_dir=spectra_dir, sobject_id=sobject_id, gaia_id=gaia_id,
        labels=labels, flag_sp=flags, snr_ccd3=snr, rv=rv, crval=crval, cdelt=cdelt, star_of_row=star_of_row,
        no_files=list(no_files), no_ccd4=list(no_ccd4), native_pixels=GALAH_NPIX_PER_ARM if exact_grid else native_pixels,
    )
