"""Flux arrays that belong to no survey: the optional log flux transform, and `.npy` spectra for predict.py.

`flux_transform=log` stores `1 + ln(max(flux, flux_floor))`: the continuum stays at 1 and models read
the absorption depth `1 - flux` as an optical depth `-ln(flux)`. The GALAH DataModules offer it;
checkpoints record it (`flux_transform`, `flux_floor` in the preprocessing), and `read_npy` applies it
to new spectra just as training did. numpy only, so reading needs neither torch nor a survey package.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stellarlab.errors import DataError

FLUX_TRANSFORMS = ("none", "log")


def transform_flux(flux: np.ndarray, kind: str, floor: float) -> np.ndarray:
    """`none`: float32 flux as is. `log`: 1 + ln(max(flux, floor)); NaN stays NaN (a masked pixel)."""
    flux = np.asarray(flux, dtype=np.float32)
    if kind == "none":
        return flux
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.float32(1.0) + np.log(np.maximum(flux, np.float32(floor)))).astype(np.float32)


def resample(flux: np.ndarray, weight: np.ndarray, wave_in: np.ndarray, wave_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Linear interpolation onto the model grid; pixels outside the input range, or next to a bad one, get weight 0."""
    order = np.argsort(wave_in)
    wave_in, flux, weight = wave_in[order], flux[:, order], weight[:, order]
    out_flux = np.empty((len(flux), len(wave_out)), dtype=np.float32)
    out_weight = np.empty_like(out_flux)
    inside = (wave_out >= wave_in[0]) & (wave_out <= wave_in[-1])
    right = np.clip(np.searchsorted(wave_in, wave_out), 1, len(wave_in) - 1)
    for i in range(len(flux)):  # one interpolation per spectrum (vectorised over pixels)
        out_flux[i] = np.interp(wave_out, wave_in, flux[i])
        bad = weight[i] <= 0
        out_weight[i] = np.interp(wave_out, wave_in, weight[i])
        out_weight[i][bad[right] | bad[right - 1] | ~inside] = 0.0
    out_flux[out_weight <= 0] = 1.0
    return out_flux, out_weight


NPY_MAGIC = b"\x93NUMPY"


def _check_npy_header(path: Path) -> None:
    """DataError for a file that is no .npy file, or one of Python objects: numpy's own errors for both read
    like a damaged file. A header it cannot parse is left to the reader (a truncated file)."""
    dtype = None
    try:
        with open(path, "rb") as fh:
            start = fh.read(len(NPY_MAGIC))
            if start == NPY_MAGIC:
                fh.seek(0)
                version = np.lib.format.read_magic(fh)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                dtype = read(fh)[2]
    except (OSError, ValueError, EOFError):
        return
    if start.startswith(b"SIMPLE"):
        raise DataError(f"{path} is not a .npy file (a FITS file? use format=auto, which tells the format from the name)")
    if start != NPY_MAGIC and len(start) == len(NPY_MAGIC):
        raise DataError(f"{path} is not a .npy file (it lacks numpy's header); write the spectra with np.save, "
                        "or give the file's own format with format=")
    if dtype is not None and dtype.hasobject:
        raise DataError(f"{path} holds Python objects (dtype {dtype}), not numbers; save the flux as a float array, "
                        "e.g. np.save(path, np.asarray(flux, dtype=np.float32))")


def read_npy(path: Path, fmt: str, preprocessing: dict, wavelength: np.ndarray,
             input_wavelength: str | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """predict.py's reader of an (N, pixels) or (pixels,) `.npy` array: (flux, weight, ids) on the model's grid.

    Spectra on another grid are resampled onto it when `input_wavelength` names their wavelengths."""
    n_pixels = len(wavelength)
    _check_npy_header(path)
    try:
        flux = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"{path}: not a readable .npy array ({err}); is the file truncated?") from err
    if flux.ndim == 1:
        flux = flux[None, :]
    if flux.ndim != 2 or flux.dtype.kind not in "iuf":
        raise DataError(f"{path}: expected a real-valued (N, pixels) or (pixels,) array, got {flux.dtype} {list(flux.shape)}")
    if flux.size == 0:
        raise DataError(f"{path}: the array {list(flux.shape)} holds no spectra; save the spectra as an (N, pixels) array")
    flux = np.asarray(flux, dtype=np.float32)
    weight = np.isfinite(flux).astype(np.float32)
    transform = preprocessing.get("flux_transform", "none")
    if transform != "none":
        flux = transform_flux(flux, transform, float(preprocessing.get("flux_floor", 0.0)))
    if flux.shape[1] != n_pixels:
        if input_wavelength is None:
            raise DataError(
                f"{path}: spectra have {flux.shape[1]} pixels but the checkpoint's grid has {n_pixels} "
                f"({wavelength[0]:.2f}-{wavelength[-1]:.2f} A); pass input_wavelength=<.npy of {flux.shape[1]} wavelengths in A> "
                "to resample them onto it"
            )
        try:
            wave_in = np.load(input_wavelength, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise DataError(f"input_wavelength={input_wavelength}: not a readable .npy array ({err})") from err
        if wave_in.shape != (flux.shape[1],) or wave_in.dtype.kind not in "iuf" or not np.isfinite(wave_in).all():
            raise DataError(
                f"input_wavelength={input_wavelength} holds {wave_in.dtype} {list(wave_in.shape)}; {path} needs "
                f"{flux.shape[1]} finite wavelengths in A, one per pixel"
            )
        wave_in = wave_in.astype(np.float64)
        overlap = np.mean((wavelength >= wave_in.min()) & (wavelength <= wave_in.max()))
        if overlap < 0.5:
            raise DataError(
                f"{path}: its grid ({wave_in.min():.1f}-{wave_in.max():.1f} A) covers {overlap:.0%} of the checkpoint's "
                f"({wavelength[0]:.1f}-{wavelength[-1]:.1f} A); this model cannot read these spectra"
            )
        flux, weight = resample(np.where(weight > 0, flux, 1.0), weight, wave_in, wavelength)
    ids = [path.stem] if len(flux) == 1 else [f"{path.stem}:{i}" for i in range(len(flux))]
    return flux, weight, ids


__all__ = ["FLUX_TRANSFORMS", "read_npy", "resample", "transform_flux"]
