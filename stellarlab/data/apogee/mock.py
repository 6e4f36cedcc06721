"""A mock APOGEE DR17 survey: files in the survey's own layouts, with flux from the synthetic generator.

For tests, benchmarks, a local test server, and for trying `data=apogee` without the 4 GB download.

- `write_allstar`: the allStar catalogue, table in HDU 1, DR17 column names and types (string ids,
  float32 labels with NaN and -9999, int64 ASPCAPFLAG/STARFLAG, EXTRATARG duplicate bit).
- `write_aspcapstar`: HDU1 normalised flux, HDU2 error, HDU3 best-fit model (8575, float32), HDU4 one-row table;
  zero-filled outside the chips like the real files.
- `write_apstar`: HDU1-3 flux, error, APOGEE_PIXMASK as 2-D (rows, 8575) big-endian float64 / int64, NaN at
  the edges and gaps, huge errors at bad pixels; HDU4-7 sky/telluric.
- `make_survey_files`: a whole local survey (catalogue + one file per star, `{TELESCOPE}/{FIELD}/{file}`) with
  flux from the built-in synthetic generator, so a model trained on it learns something.
- `AspcapStarTemplate`: writes thousands of aspcapStar files fast (one astropy-made template, data patched
  in), for the preprocessing benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits

from stellarlab.data.apogee.catalog import spectrum_filename
from stellarlab.grids import (
    APOGEE_CHIP_RANGES,
    APOGEE_DLOGLAM,
    APOGEE_LOGLAM0,
    APOGEE_NPIX,
    apogee_chip_mask,
)

FIELDS = {"apo25m": ["K04_083+13", "060+00", "N6791", "M67"], "lco25m": ["Hdeep_lco", "300-05_lco"]}


def _grid_header(header: fits.Header) -> fits.Header:
    header["CRVAL1"] = (APOGEE_LOGLAM0, "Start log10(wavelength)")
    header["CDELT1"] = (APOGEE_DLOGLAM, "Dispersion in log10(wave)")
    header["CRPIX1"] = 1
    header["CTYPE1"] = "LOG-LINEAR"
    header["DC-FLAG"] = 1
    return header


def apogee_id(rng: np.random.Generator) -> str:
    """A 2MASS-style id such as 2M19485057+5005279."""
    hh, mm, ss = rng.integers(0, 24), rng.integers(0, 60), rng.integers(0, 6000)
    sign = "+" if rng.random() < 0.6 else "-"
    dd, dm, ds = rng.integers(0, 90), rng.integers(0, 60), rng.integers(0, 600)
    return f"2M{hh:02d}{mm:02d}{ss:04d}{sign}{dd:02d}{dm:02d}{ds:03d}"


def write_allstar(path: str | Path, columns: dict[str, np.ndarray]) -> Path:
    """The catalogue as DR17 writes it: an empty primary HDU and the table in HDU 1 (plus a small HDU 2)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = []
    for name, values in columns.items():
        values = np.asarray(values)
        if values.dtype.kind in "US":
            width = max(1, max((len(str(v)) for v in values), default=1))
            cols.append(fits.Column(name=name, format=f"{width}A", array=values.astype(f"S{width}")))
        elif values.dtype.kind == "f":
            cols.append(fits.Column(name=name, format="E" if values.dtype.itemsize == 4 else "D", array=values))
        elif values.dtype.kind in "iu":
            fmt = {2: "I", 4: "J", 8: "K"}[values.dtype.itemsize]
            cols.append(fits.Column(name=name, format=fmt, array=values))
        else:
            raise TypeError(f"column {name}: unsupported dtype {values.dtype}")
    table = fits.BinTableHDU.from_columns(cols)
    extra = fits.BinTableHDU.from_columns([fits.Column(name="ELEM_SYMBOL", format="2A", array=np.array([b"Fe", b"Mg"]))])
    fits.HDUList([fits.PrimaryHDU(), table, extra]).writeto(path, overwrite=True)
    return path


def write_aspcapstar(path: str | Path, flux: np.ndarray, err: np.ndarray, model: np.ndarray | None = None, objid: str = "") -> Path:
    """An aspcapStar file: HDU1 flux, HDU2 error, HDU3 model (8575 float32 each), HDU4 a one-row table."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    primary = fits.PrimaryHDU()
    primary.header["OBJID"] = objid
    hdus = [primary]
    for data in (flux, err, flux if model is None else model):
        hdus.append(fits.ImageHDU(np.asarray(data, dtype=">f4"), header=_grid_header(fits.Header())))
    hdus.append(fits.BinTableHDU.from_columns([
        fits.Column(name="APOGEE_ID", format="18A", array=np.array([objid.encode()])),
        fits.Column(name="FPARAM", format="9E", array=np.zeros((1, 9), np.float32)),
    ]))
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return path


def write_apstar(path: str | Path, flux: np.ndarray, err: np.ndarray, mask: np.ndarray, objid: str = "", snr: float = 100.0) -> Path:
    """An apStar file: HDU1-3 flux, error (big-endian float64) and APOGEE_PIXMASK (int64), 1-D or (rows, 8575)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    primary = fits.PrimaryHDU()
    header = _grid_header(primary.header)
    header["NWAVE"] = APOGEE_NPIX
    header["OBJID"] = objid
    header["SNR"] = float(snr)
    header["NVISITS"] = max(1, flux.shape[0] - 2) if np.ndim(flux) == 2 else 1
    hdus = [primary]
    for data, dtype in ((flux, ">f8"), (err, ">f8"), (mask, ">i8")):
        hdus.append(fits.ImageHDU(np.asarray(data).astype(dtype), header=_grid_header(fits.Header())))
    zeros = np.zeros(np.shape(flux), dtype=">f8")
    for _ in range(4):  # sky, sky error, telluric, telluric error
        hdus.append(fits.ImageHDU(zeros, header=_grid_header(fits.Header())))
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return path


# -- realistic content -------------------------------------------------------------------------------
def clean_spectra(labels: np.ndarray) -> np.ndarray:
    """Noise-free normalised spectra (N, 8575) from the built-in generator for (teff, logg, fe_h, alpha_fe) rows."""
    import torch

    from stellarlab.synthetic import SpectrumGenerator

    gen = SpectrumGenerator("apogee", oversample=3)
    return gen.generate(torch.as_tensor(np.asarray(labels, dtype=np.float32))).numpy()


def aspcapstar_arrays(clean: np.ndarray, snr: float, rng: np.random.Generator, n_bad: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """(flux, err) as in an aspcapStar file: noise at `snr`, zeros off the chips, huge errors at a few bad pixels."""
    on_chip = apogee_chip_mask()
    err = np.full(APOGEE_NPIX, 1.0 / snr, dtype=np.float32)
    flux = (clean + rng.standard_normal(APOGEE_NPIX) / snr).astype(np.float32)
    flux[~on_chip] = 0.0
    err[~on_chip] = 0.0
    bad = rng.choice(np.flatnonzero(on_chip), n_bad, replace=False)
    err[bad] = 1e10
    return flux, err


def apstar_arrays(clean: np.ndarray, snr: float, rng: np.random.Generator, n_visits: int = 1, scale: float = 600.0):
    """(flux, err, mask) rows as in a DR17 apStar file: a smooth instrumental continuum per chip times the
    spectrum, noise, NaN beyond the chip edges, bitmasked bad pixels with huge errors, some persistence bits."""
    rows = 2 + (n_visits if n_visits > 1 else 0)
    cont = np.zeros(APOGEE_NPIX)
    for k, (lo, hi) in enumerate(APOGEE_CHIP_RANGES):
        t = np.linspace(-1, 1, hi - lo)
        cont[lo:hi] = scale * (1.0 - 0.1 * k) * (1.0 + 0.08 * t - 0.06 * t**2 + rng.normal(0, 0.02) * t**3)
    flux = np.zeros((rows, APOGEE_NPIX))
    err = np.zeros((rows, APOGEE_NPIX))
    mask = np.zeros((rows, APOGEE_NPIX), dtype=np.int64)
    for r in range(rows):
        sigma = cont / snr
        flux[r] = cont * clean + rng.standard_normal(APOGEE_NPIX) * sigma
        err[r] = sigma
    # edges and gaps: NaN where no chip contributes, finite with huge error in the chip margins (as in DR17)
    margins = [(0, 200), (3330, 3530), (6130, 6290), (8380, APOGEE_NPIX)]
    for lo, hi in margins:
        flux[:, lo:hi] = np.nan
        err[:, lo:hi] = np.nan
    (b0, b1), (g0, g1), (r0, r1) = APOGEE_CHIP_RANGES
    for lo, hi in ((200, b0), (b1, 3330), (3530, g0), (g1, 6130), (6290, r0), (r1, 8380)):
        err[:, lo:hi] = 1e10
        mask[:, lo:hi] |= 1 << 0  # BADPIX
    on_chip = np.flatnonzero(apogee_chip_mask())
    picked = rng.choice(on_chip, 70, replace=False)
    bad, sky = picked[:40], picked[40:]
    err[:, bad] = 1e10
    mask[:, bad] |= np.int64(1 << 1) | np.int64(1 << 3)  # CRPIX | UNFIXABLE
    mask[:, sky] |= 1 << 12  # SIG_SKYLINE: masked by default, data still finite
    flux[:, sky] *= 1.5
    persist = on_chip[(on_chip > 500) & (on_chip < 900)]
    mask[:, persist] |= 1 << 10  # PERSIST_MED: not masked by default, data fine
    if n_visits == 1:
        flux[1] = 0.0  # single-visit files: the second combination row is empty, as in the shared DR17 file
        err[1] = 0.0
    return flux, err, mask


@dataclass
class SurveyFiles:
    """What `make_survey_files` wrote, with the truth a test checks against."""

    root: Path
    catalog: Path
    spectra_dir: Path
    source: str
    columns: dict  # the catalogue columns as written
    labels: np.ndarray  # (n_rows, 4) the generating labels (teff, logg, fe_h, alpha_fe), before NaN/-9999
    written: np.ndarray  # (n_rows,) bool: a spectrum file exists for the row


def make_catalog(n_stars: int, seed: int = 0, n_duplicates: int = 0, label_seed: int | None = None) -> tuple[dict, np.ndarray]:
    """DR17-like catalogue columns for `n_stars` stars (+ `n_duplicates` duplicate rows with EXTRATARG bit 4)."""
    from stellarlab.synthetic import sample_labels

    rng = np.random.default_rng(seed)
    truth = sample_labels(n_stars, seed if label_seed is None else label_seed).astype(np.float32)
    ids = []
    seen = set()
    while len(ids) < n_stars:
        i = apogee_id(rng)
        if i not in seen:
            seen.add(i)
            ids.append(i)
    telescope = np.where(rng.random(n_stars) < 0.8, "apo25m", "lco25m")
    field = np.array([FIELDS[t][rng.integers(len(FIELDS[t]))] for t in telescope])
    rows = np.arange(n_stars)
    if n_duplicates:
        dup = rng.choice(n_stars, n_duplicates, replace=False)
        rows = np.concatenate([rows, dup])
    n = len(rows)
    ids_all = np.array(ids)[rows]
    tel = telescope[rows].copy()
    fld = field[rows].copy()
    labels = truth[rows]
    cols = {
        "APOGEE_ID": ids_all,
        "TELESCOPE": tel,
        "FIELD": fld,
        "FILE": np.array([spectrum_filename(i, t, "apStar") for i, t in zip(ids_all, tel)]),
        "SNR": np.exp(rng.uniform(np.log(60), np.log(400), n)).astype(np.float32),
        "TEFF": labels[:, 0].copy(),
        "TEFF_ERR": np.full(n, 30.0, np.float32),
        "LOGG": labels[:, 1].copy(),
        "LOGG_ERR": np.full(n, 0.05, np.float32),
        "FE_H": labels[:, 2].copy(),
        "FE_H_ERR": np.full(n, 0.02, np.float32),
        "M_H": (labels[:, 2] + 0.7 * labels[:, 3]).astype(np.float32),
        "ALPHA_M": labels[:, 3].copy(),
        "ASPCAPFLAG": np.zeros(n, np.int64),
        "STARFLAG": np.zeros(n, np.int64),
        "EXTRATARG": np.zeros(n, np.int16),
    }
    if n_duplicates:
        cols["EXTRATARG"][n_stars:] |= 16
    return cols, labels


def make_survey_files(root: str | Path, n_stars: int = 200, source: str = "aspcapStar", seed: int = 0,
                      snr: float = 150.0, n_duplicates: int = 5, n_missing_labels: int = 6,
                      n_star_bad: int = 4, n_missing_files: int = 3) -> SurveyFiles:
    """A small local DR17 survey: catalogue and spectrum files laid out like the SDSS server.

    Deterministic for the seed. Some rows have NaN or -9999 labels (one label, or all of them), some have
    STAR_BAD set, `n_duplicates` extra rows repeat a star with the EXTRATARG duplicate bit, and the files of
    `n_missing_files` clean stars are not written.
    """
    root = Path(root)
    rng = np.random.default_rng(seed + 1)
    cols, labels = make_catalog(n_stars, seed, n_duplicates)
    n = len(cols["APOGEE_ID"])
    # Missing labels: a NaN logg, a -9999 fe_h, and rows with every label missing (NaN or -9999).
    k = n_missing_labels
    pick = rng.choice(n_stars, 4 * k + n_star_bad + n_missing_files, replace=False)
    nan_one, sentinel_one, nan_all, sentinel_all = pick[:k], pick[k : 2 * k], pick[2 * k : 3 * k], pick[3 * k : 4 * k]
    star_bad = pick[4 * k : 4 * k + n_star_bad]
    no_file = pick[4 * k + n_star_bad :]
    cols["LOGG"][nan_one] = np.nan
    cols["FE_H"][sentinel_one] = -9999.0
    for c in ("TEFF", "LOGG", "FE_H", "M_H", "ALPHA_M"):
        cols[c][nan_all] = np.nan
        cols[c][sentinel_all] = -9999.0
    cols["ASPCAPFLAG"][star_bad] |= np.int64(1 << 23)
    cols["ASPCAPFLAG"][rng.choice(n, n // 5, replace=False)] |= np.int64(1 << 0)  # TEFF_WARN: harmless
    cols["STARFLAG"][rng.choice(n, n // 10, replace=False)] |= np.int64(1 << 9)  # PERSIST_HIGH: kept by default
    catalog = write_allstar(root / "allStar-dr17-synspec_rev1.fits", cols)

    spectra_dir = root / source
    clean = clean_spectra(labels)
    written = np.ones(n, dtype=bool)
    written[no_file] = False
    for i in range(n):
        if not written[i]:
            continue
        tel, field, sid = cols["TELESCOPE"][i], cols["FIELD"][i], cols["APOGEE_ID"][i]
        name = spectrum_filename(sid, tel, source, cols["FILE"][i] if source == "apStar" else None)
        path = spectra_dir / tel / field / name
        if source == "aspcapStar":
            flux, err = aspcapstar_arrays(clean[i], snr, rng)
            write_aspcapstar(path, flux, err, clean[i], objid=sid)
        else:
            flux, err, mask = apstar_arrays(clean[i], snr, rng, n_visits=1 + i % 3)
            write_apstar(path, flux, err, mask, objid=sid, snr=snr)
    return SurveyFiles(root, catalog, spectra_dir, source, cols, labels, written)


class AspcapStarTemplate:
    """Writes aspcapStar files fast: astropy builds one file, later files patch flux and error into its bytes."""

    def __init__(self):
        zeros = np.zeros(APOGEE_NPIX, np.float32)
        tmp = fits.HDUList([fits.PrimaryHDU()] + [fits.ImageHDU(zeros.astype(">f4"), header=_grid_header(fits.Header())) for _ in range(3)]
                           + [fits.BinTableHDU.from_columns([fits.Column(name="FPARAM", format="9E", array=np.zeros((1, 9), np.float32))])])
        import io

        buf = io.BytesIO()
        tmp.writeto(buf)
        self.template = bytearray(buf.getvalue())
        reread = fits.open(io.BytesIO(bytes(self.template)))
        self.offsets = [reread.fileinfo(i)["datLoc"] for i in (1, 2, 3)]
        reread.close()

    def write(self, path: str | Path, flux: np.ndarray, err: np.ndarray) -> None:
        data = bytearray(self.template)
        for offset, arr in zip(self.offsets, (flux, err, flux)):
            raw = np.asarray(arr, dtype=">f4").tobytes()
            data[offset : offset + len(raw)] = raw
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
