"""Read one APOGEE DR17 spectrum file onto the 8575-pixel grid: flux, inverse-variance weight, nothing non-finite.

aspcapStar files are already pseudo-continuum normalised (HDU1 flux, HDU2 error). apStar/asStar files
hold the combined spectrum in row 0 of 2-D (rows, 8575) arrays (1-D in old single-visit files), as
big-endian float64 with NaN edges, huge errors at bad pixels and an APOGEE_PIXMASK in HDU3; they are
normalised here per detector chip by an error-weighted Chebyshev fit that ignores masked pixels and
clips absorption lines. Every error names the file. numpy and astropy only: these run in worker processes.
`open_input` is predict.py's reader of the same files (registered in `stellarlab.data.surveys`): it also
reads what names the star (APOGEE_ID, TELESCOPE, FIELD) and the SNR the header states.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from numpy.polynomial import chebyshev

from stellarlab.data.surveys import InputRows
from stellarlab.errors import DataError
from stellarlab.grids import (
    APOGEE_CHIP_RANGES,
    APOGEE_DLOGLAM,
    APOGEE_LOGLAM0,
    APOGEE_NCHIP_PIXELS,
    APOGEE_NPIX,
    apogee_chip_mask,
)

FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class PixelConfig:
    """How a file becomes (flux, weight); small and picklable so it travels to worker processes."""

    source: str = "aspcapStar"  # or "apStar"
    pixmask: int = 0  # OR of the APOGEE_PIXMASK bits that make a pixel unusable (apStar only)
    max_flux_error: float = 1.0  # normalised-flux error above this: the pixel carries no information
    gap_deleted: bool = False  # keep only the 7514 chip pixels
    continuum_degree: int = 3  # Chebyshev degree per chip (apStar only)
    continuum_iterations: int = 5  # refits, each dropping pixels clip_low sigma below / clip_high above the fit
    clip_low: float = 2.0
    clip_high: float = 3.0

    @property
    def n_pixels(self) -> int:
        return APOGEE_NCHIP_PIXELS if self.gap_deleted else APOGEE_NPIX


def _native_float32(data, path, hdu: int, row: int | None, keep_integers: bool = False) -> np.ndarray:
    """Row `row` of a 2-D image (or the 1-D image) as native float32 (integers kept for a bitmask), after
    checking that it holds numbers and the pixel count."""
    if data is None:
        raise DataError(f"{path}: HDU{hdu} holds no data; re-download the file")
    arr = np.asarray(data)
    if arr.dtype.kind not in "iuf":  # e.g. a table where an image should be
        raise DataError(
            f"{path}: HDU{hdu} holds {arr.dtype} data, not an image of numbers; is this an APOGEE spectrum file "
            "of the right kind (data.source)?"
        )
    if arr.ndim == 2 and row is not None:
        if row >= arr.shape[0]:
            raise DataError(
                f"{path}: HDU{hdu} has {arr.shape[0]} rows, row {row} was asked for; the file is incomplete: "
                "delete it and download it again"
            )
        arr = arr[row]
    if arr.ndim != 1 or arr.shape[0] != APOGEE_NPIX:
        raise DataError(
            f"{path}: HDU{hdu} has shape {arr.shape}, expected {APOGEE_NPIX} pixels (the DR17 apStar grid"
            f"{' or (rows, 8575)' if row is not None else ''}); is this a DR17 file of the right kind?"
        )
    return arr if keep_integers and arr.dtype.kind in "iu" else arr.astype(np.float32)


def _check_grid(header, path) -> None:
    """Refuse a file whose header puts it on another wavelength grid (CRVAL1/CDELT1, when present)."""
    crval, cdelt = header.get("CRVAL1"), header.get("CDELT1")
    if crval is not None and cdelt is not None:
        if abs(float(crval) - APOGEE_LOGLAM0) > 1e-6 or abs(float(cdelt) - APOGEE_DLOGLAM) > 1e-10:
            raise DataError(
                f"{path}: wavelength grid CRVAL1={crval}, CDELT1={cdelt} is not the DR17 grid "
                f"(CRVAL1={APOGEE_LOGLAM0}, CDELT1={APOGEE_DLOGLAM}); use the star's DR17 file, or give spectra on "
                "another grid to predict.py as .npy with input_wavelength=<their wavelengths> to resample them"
            )


def _open_error(path, err: Exception) -> DataError:
    return DataError(
        f"corrupt or unreadable FITS file {path} ({type(err).__name__}: {err}); delete it and download it again"
    )


def _require_hdus(hdul, n: int, path, layout: str) -> None:
    """DataError unless the file has HDUs 0..n-1. Reads only those: `len(hdul)` reads every HDU, and a corrupt
    header with a negative data size sends astropy back to the same HDU forever."""
    try:
        hdul[n - 1]
    except IndexError:
        raise DataError(
            f"corrupt or incomplete FITS file {path}: fewer than {n} HDUs, {layout}; delete it and download it again"
        ) from None


@contextlib.contextmanager
def _spectrum_file(path, n_hdus: int, layout: str) -> Iterator[fits.HDUList]:
    """The open file, checked for its HDUs and the DR17 grid; any failure to read it is one DataError."""
    try:
        with fits.open(path, memmap=False) as hdul:
            _require_hdus(hdul, n_hdus, path, layout)
            _check_grid(hdul[1].header, path)
            yield hdul
    except DataError:
        raise
    except (OSError, ValueError, TypeError, IndexError, KeyError) as err:
        raise _open_error(path, err) from err


#: Primary-header keywords predict.py's catalogue takes from a file (where present).
HEADER_KEYS = ("OBJID", "FIELD", "TELESCOP", "SNR")


def _header_values(hdul, header: dict | None) -> None:
    """Copy HEADER_KEYS of the primary header into `header` (when a dict is given)."""
    if header is not None:
        primary = hdul[0].header
        header.update({key: primary[key] for key in HEADER_KEYS if key in primary})


def read_aspcapstar(path, header: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Normalised flux (HDU1) and its error (HDU2) as native float32 (8575,); `header` gets HEADER_KEYS."""
    with _spectrum_file(path, 3, "an aspcapStar file has flux in HDU1 and error in HDU2") as hdul:
        _header_values(hdul, header)
        return _native_float32(hdul[1].data, path, 1, None), _native_float32(hdul[2].data, path, 2, None)


def read_apstar(path, row: int = 0, header: dict | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row `row` (0: the pixel-weighted combination) of flux, error (native float32) and APOGEE_PIXMASK (int64);
    `header` gets HEADER_KEYS."""
    with _spectrum_file(path, 4, "an apStar file has flux, error and bitmask in HDU1-3") as hdul:
        _header_values(hdul, header)
        flux = _native_float32(hdul[1].data, path, 1, row)
        err = _native_float32(hdul[2].data, path, 2, row)
        mask = _native_float32(hdul[3].data, path, 3, row, keep_integers=True)
    if mask.dtype.kind not in "iu":
        raise DataError(
            f"{path}: HDU3 should be the integer APOGEE_PIXMASK, found {mask.dtype}; is this an apStar/asStar file? "
            "(aspcapStar files need data.source=aspcapStar, or format=aspcapStar in predict.py)"
        )
    return flux, err, mask.astype(np.int64)


def usable_pixels(flux: np.ndarray, err: np.ndarray, pixmask: np.ndarray | None = None, bad_bits: int = 0) -> np.ndarray:
    """True where a pixel holds data: on a chip, finite, error > 0, flux != 0 (zero-filled), no bad mask bit."""
    good = apogee_chip_mask() & np.isfinite(flux) & np.isfinite(err) & (err > 0) & (flux != 0)
    if pixmask is not None and bad_bits:
        good &= (pixmask & np.int64(bad_bits)) == 0
    return good


def continuum(flux: np.ndarray, err: np.ndarray, usable: np.ndarray, degree: int = 3, iterations: int = 5,
              clip_low: float = 2.0, clip_high: float = 3.0) -> np.ndarray:
    """Per-chip continuum: a Chebyshev fit weighted by 1/err^2 over usable pixels, refitted after dropping
    pixels more than clip_low sigma below it (absorption lines) or clip_high above it (spikes).

    Returns the continuum on the full grid, NaN outside the chips and on a chip with too few pixels to fit
    (or whose values are too extreme to fit: the least-squares solver fails to converge).
    """
    cont = np.full(flux.shape, np.nan, dtype=np.float64)
    f64, e64 = flux.astype(np.float64), err.astype(np.float64)
    with np.errstate(divide="ignore", over="ignore"):
        usable = usable & np.isfinite(1.0 / e64) & (np.abs(f64) < 1e150)  # weights and squares stay finite
    min_pixels = 4 * (degree + 1)
    for lo, hi in APOGEE_CHIP_RANGES:
        f, e, ok = f64[lo:hi], e64[lo:hi], usable[lo:hi]
        if ok.sum() < min_pixels:
            continue
        x = np.linspace(-1.0, 1.0, hi - lo)
        use = ok
        for it in range(iterations + 1):
            try:  # w multiplies residuals: chi^2 weights 1/err^2
                with np.errstate(all="ignore"):
                    coef = chebyshev.chebfit(x[use], f[use], degree, w=1.0 / e[use])
            except (np.linalg.LinAlgError, ValueError):
                model = np.full(hi - lo, np.nan)
                break
            model = chebyshev.chebval(x, coef)
            if it == iterations:
                break
            with np.errstate(invalid="ignore", divide="ignore"):
                r = (f - model) / e
            new = ok & (r > -clip_low) & (r < clip_high)
            if new.sum() < min_pixels or np.array_equal(new, use):
                break
            use = new
        cont[lo:hi] = model
    return cont


def spectrum_arrays(
    flux: np.ndarray, err: np.ndarray, pixmask: np.ndarray | None, cfg: PixelConfig
) -> tuple[np.ndarray, np.ndarray]:
    """(flux, weight) float32 on the output grid: normalised flux, inverse variance; flux 1 / weight 0 where no data."""
    good = usable_pixels(flux, err, pixmask, cfg.pixmask)
    if cfg.source == "apStar":
        cont = continuum(flux, err, good, cfg.continuum_degree, cfg.continuum_iterations, cfg.clip_low, cfg.clip_high)
        good &= np.isfinite(cont) & (cont > 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            flux = flux / cont
            err = err / cont
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        good &= np.isfinite(flux) & (err <= cfg.max_flux_error)
        ivar = 1.0 / np.square(err, dtype=np.float64)
        good &= (np.abs(flux) <= FLOAT32_MAX) & (ivar <= FLOAT32_MAX)  # would be inf in the float32 output
        weight = np.where(good, ivar, 0.0).astype(np.float32)
    flux_out = np.where(good, flux, 1.0).astype(np.float32)
    if cfg.gap_deleted:
        keep = apogee_chip_mask()
        flux_out, weight = flux_out[keep], weight[keep]
    return flux_out, weight


def load_spectrum(path, cfg: PixelConfig, header: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read one file of `cfg.source` and return its (flux, weight) on the output grid; `header` gets HEADER_KEYS."""
    if cfg.source == "aspcapStar":
        flux, err = read_aspcapstar(path, header)
        mask = None
    elif cfg.source == "apStar":
        flux, err, mask = read_apstar(path, header=header)
    else:
        raise DataError(f"unknown spectrum source {cfg.source!r}; valid: aspcapStar, apStar")
    return spectrum_arrays(flux, err, mask, cfg)


def load_chunk(task: tuple[int, Sequence[str], PixelConfig]) -> tuple[int, np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """Worker entry point: (first row, paths, config) -> (first row, flux (k, P), weight (k, P), bad files).

    A file that cannot be read (truncated, wrong HDUs, another grid) does not stop the chunk: its row
    gets no usable pixel (flux 1, weight 0) and (row, message) is returned, for the caller to list."""
    start, paths, cfg = task
    flux = np.empty((len(paths), cfg.n_pixels), dtype=np.float32)
    weight = np.empty_like(flux)
    bad: list[tuple[int, str]] = []
    for i, path in enumerate(paths):
        try:
            flux[i], weight[i] = load_spectrum(path, cfg)
        except DataError as err:
            flux[i], weight[i] = 1.0, 0.0
            bad.append((start + i, str(err)))
    return start, flux, weight, bad


TELESCOPES = ("apo25m", "lco25m", "apo1m")
FILE_PREFIXES = ("aspcapStar-dr17-", "apStar-dr17-", "asStar-dr17-", "aspcapStar-", "apStar-", "asStar-")


def file_ids(path, header: dict) -> dict[str, str]:
    """APOGEE_ID, TELESCOPE and FIELD of a spectrum file ('' where unknown).

    APOGEE_ID: the file name (`aspcapStar-dr17-<APOGEE_ID>.fits`), else the header's OBJID. TELESCOPE and FIELD:
    the SAS layout `<TELESCOPE>/<FIELD>/<file>`, else the header's FIELD (apStar) and TELESCOP, else asStar
    files are LCO's (apStar files are APO's 2.5 m or 1 m telescope: not told by the name)."""
    path = Path(path)
    stem = path.stem
    prefix = next((p for p in FILE_PREFIXES if stem.startswith(p)), None)
    apogee_id = stem[len(prefix):] if prefix else str(header.get("OBJID") or "").strip() or stem
    parts = path.parts
    in_layout = len(parts) >= 3 and parts[-3] in TELESCOPES
    telescope = parts[-3] if in_layout else str(header.get("TELESCOP") or "").strip()
    if not telescope and path.name.startswith("asStar"):
        telescope = "lco25m"
    field_name = str(header.get("FIELD") or "").strip() or (parts[-2] if in_layout else "")
    return {"APOGEE_ID": apogee_id, "TELESCOPE": telescope, "FIELD": field_name}


@dataclass(frozen=True)
class ApogeeInput:
    """One aspcapStar/apStar file for predict.py: one spectrum, read in a worker process (FITS reading and the
    continuum fit are slow per file, so several files are read at once)."""

    path: str
    config: PixelConfig
    n_rows: int = field(default=1, init=False)
    parallel: str = field(default="process", init=False)

    def read(self, start: int = 0, stop: int = 1) -> InputRows:
        header: dict = {}
        flux, weight = load_spectrum(self.path, self.config, header)
        try:
            snr = float(header.get("SNR", np.nan))
        except (TypeError, ValueError):
            snr = np.nan
        ids = {key: [value] for key, value in file_ids(self.path, header).items()}
        return InputRows(flux=flux[None, :], weight=weight[None, :], ids=ids, snr=np.array([snr], dtype=np.float32))


def pixel_config_of(fmt: str, preprocessing: dict) -> PixelConfig:
    """The pixel settings a checkpoint's training data were read with (`preprocessing`, saved by APOGEEDataModule),
    for files of `fmt`; apStar files get the default APOGEE_PIXMASK bits when training named none."""
    settings = dict(preprocessing.get("pixels") or {})
    settings["source"] = fmt
    settings.setdefault("gap_deleted", bool(preprocessing.get("gap_deleted", False)))
    if fmt == "apStar" and "pixmask" not in settings:
        from stellarlab.data.apogee.catalog import DEFAULT_PIXMASK_BITS

        settings["pixmask"] = sum(1 << b for b in DEFAULT_PIXMASK_BITS)
    return PixelConfig(**{k: v for k, v in settings.items() if k in PixelConfig.__dataclass_fields__})


def open_input(path: Path, fmt: str, preprocessing: dict, wavelength: np.ndarray, input_wavelength=None) -> ApogeeInput:
    """predict.py's reader of one aspcapStar/apStar file (`fmt`), preprocessed as the checkpoint's training data
    (`preprocessing`) was. The files are on the DR17 grid, so `input_wavelength` (for resampling other grids)
    does not apply; nothing is read until `read`."""
    cfg = pixel_config_of(fmt, preprocessing)
    if cfg.n_pixels != len(wavelength):
        raise DataError(
            f"{path}: APOGEE spectra give {cfg.n_pixels} pixels (gap_deleted={cfg.gap_deleted}) but the checkpoint's "
            f"grid has {len(wavelength)}; this model was not trained on the APOGEE grid"
        )
    return ApogeeInput(str(path), cfg)


def read_input(path: Path, fmt: str, preprocessing: dict, wavelength: np.ndarray, input_wavelength=None):
    """One file at once: (flux (1, P), weight (1, P), [APOGEE_ID]) (what `open_input(...).read()` holds)."""
    rows = open_input(path, fmt, preprocessing, wavelength, input_wavelength).read()
    return rows.flux, rows.weight, rows.ids["APOGEE_ID"]


__all__ = [
    "ApogeeInput", "PixelConfig", "continuum", "file_ids", "load_chunk", "load_spectrum", "open_input", "pixel_config_of",
    "read_apstar", "read_aspcapstar", "read_input", "spectrum_arrays", "usable_pixels",
]
