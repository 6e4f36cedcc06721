"""Apply a trained checkpoint to new spectra: read them as training did, predict, write a catalogue.

A checkpoint carries everything needed: the model class and weights, the label names and their
normalisation, the wavelength grid, and the preprocessing of the data it was trained on (saved by
the DataModule's `state_dict`). `predict.py` is the command-line front end.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stellarlab.errors import ConfigError, DataError
from stellarlab.files import atomic_path

log = logging.getLogger(__name__)

FORMATS = ("auto", "aspcapStar", "apStar", "npy")
FILE_PATTERNS = {"aspcapStar": "aspcapStar-*.fits", "apStar": "ap*Star-*.fits", "npy": "*.npy"}


@dataclass
class Spectra:
    """New spectra on the model's grid: one row each, with an id and the file it came from."""

    ids: list[str]
    files: list[str]
    flux: np.ndarray  # (N, P) float32, bad pixels 1
    weight: np.ndarray  # (N, P) float32, bad pixels 0
    notes: list[str] = field(default_factory=list)


# -- the checkpoint --------------------------------------------------------------------------------
def read_checkpoint(ckpt_path: str | os.PathLike) -> dict:
    """The raw checkpoint dict (tensors and plain types only), with a clear error for a bad path or file."""
    import torch

    path = Path(ckpt_path)
    if not path.is_file():
        raise ConfigError(f"ckpt_path={ckpt_path}: no such file; checkpoints are in <run folder>/checkpoints/ (best-*.ckpt, last.ckpt)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickle from elsewhere, ...
        raise DataError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); is the file complete?") from err


def model_class_of(checkpoint: dict, ckpt_path: str | os.PathLike):
    """The LightningModule class that wrote the checkpoint (recorded by the model, or by the run's config)."""
    import hydra

    target = checkpoint.get("stellarlab", {}).get("model_class")
    if target is None:  # older checkpoints: the run folder's Hydra config names the model
        config = Path(ckpt_path).resolve().parent.parent / ".hydra" / "config.yaml"
        if config.is_file():
            from omegaconf import OmegaConf

            target = OmegaConf.load(config).model.get("_target_")
    if target is None:
        raise DataError(f"checkpoint {ckpt_path} does not say which model wrote it, and no run config lies beside it")
    return hydra.utils.get_class(target)


def preprocessing_of(checkpoint: dict) -> dict:
    """The DataModule's preprocessing settings saved with the checkpoint ({} if the data did not save any)."""
    for value in checkpoint.values():
        if isinstance(value, dict) and isinstance(value.get("preprocessing"), dict):
            return dict(value["preprocessing"])
    return {}


def load_model(ckpt_path: str | os.PathLike, map_location: str = "cpu"):
    """(model in eval mode, preprocessing dict) from a checkpoint written by train.py."""
    checkpoint = read_checkpoint(ckpt_path)
    cls = model_class_of(checkpoint, ckpt_path)
    model = cls.load_from_checkpoint(str(ckpt_path), map_location=map_location, weights_only=True)
    model.eval()
    return model, preprocessing_of(checkpoint)


# -- reading new spectra ---------------------------------------------------------------------------
def find_inputs(inputs: str | Sequence[str], fmt: str) -> list[Path]:
    """Files named directly, or every file of the format in a folder (sorted, so output order is stable)."""
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r} is not one of {list(FORMATS)}; format=auto tells it from each file's name")
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            patterns = FILE_PATTERNS.values() if fmt == "auto" else [FILE_PATTERNS[fmt]]
            found = sorted({p for pattern in patterns for p in path.glob(pattern) if not p.name.endswith("_wavelength.npy")})
            if not found:
                raise DataError(f"input folder {path} holds no spectra (looked for {', '.join(patterns)})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"input {path}: no such file or folder; give input=<file>, <folder> or [<file>,<file>,...]")
    return files


def file_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name = path.name
    if name.endswith(".npy"):
        return "npy"
    if name.startswith("aspcapStar"):
        return "aspcapStar"
    if name.startswith(("apStar", "asStar")):
        return "apStar"
    raise DataError(f"cannot tell the format of {path} from its name; pass format=aspcapStar|apStar|npy")


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


def _read_npy(path: Path, preprocessing: dict, n_pixels: int, wavelength: np.ndarray, input_wavelength) -> tuple[np.ndarray, np.ndarray, list[str]]:
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
        from stellarlab.data.galah import transform_flux

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


def _read_apogee(path: Path, fmt: str, preprocessing: dict, n_pixels: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from stellarlab.data.apogee_files import PixelConfig, load_spectrum

    settings = dict(preprocessing.get("pixels") or {})
    settings["source"] = fmt
    settings.setdefault("gap_deleted", bool(preprocessing.get("gap_deleted", False)))
    if fmt == "apStar" and "pixmask" not in settings:
        from stellarlab.data.apogee_catalog import DEFAULT_PIXMASK_BITS

        settings["pixmask"] = sum(1 << b for b in DEFAULT_PIXMASK_BITS)
    cfg = PixelConfig(**{k: v for k, v in settings.items() if k in PixelConfig.__dataclass_fields__})
    if cfg.n_pixels != n_pixels:
        raise DataError(
            f"{path}: APOGEE spectra give {cfg.n_pixels} pixels (gap_deleted={cfg.gap_deleted}) but the checkpoint's "
            f"grid has {n_pixels}; this model was not trained on the APOGEE grid"
        )
    flux, weight = load_spectrum(path, cfg)
    stem = path.stem
    for prefix in ("aspcapStar-dr17-", "apStar-dr17-", "asStar-dr17-", "aspcapStar-", "apStar-", "asStar-"):
        if stem.startswith(prefix):
            stem = stem[len(prefix):]
            break
    return flux[None, :], weight[None, :], [stem]


def read_spectra(
    files: Iterable[Path],
    fmt: str,
    preprocessing: dict,
    wavelength: np.ndarray,
    input_wavelength: str | None = None,
) -> Spectra:
    """Every file's spectra, preprocessed as the checkpoint's training data was, on its wavelength grid."""
    n_pixels = len(wavelength)
    fluxes, weights, ids, sources = [], [], [], []
    for path in files:
        kind = file_format(path, fmt)
        if kind == "npy":
            flux, weight, names = _read_npy(path, preprocessing, n_pixels, wavelength, input_wavelength)
        else:
            flux, weight, names = _read_apogee(path, kind, preprocessing, n_pixels)
        fluxes.append(flux)
        weights.append(weight)
        ids.extend(names)
        sources.extend([str(path)] * len(names))
    flux = np.concatenate(fluxes).astype(np.float32)
    weight = np.concatenate(weights).astype(np.float32)
    bad = ~np.isfinite(flux) | ~(weight > 0)
    flux[bad] = 1.0
    weight[bad] = 0.0
    empty = bad.all(axis=1)
    if empty.all():
        names = list(dict.fromkeys(sources))
        raise DataError(
            f"no input spectrum has a single usable pixel (all NaN or masked) in {', '.join(names[:3])}"
            f"{' ...' if len(names) > 3 else ''}; check that the files hold finite flux (and errors > 0)"
        )
    return Spectra(ids=ids, files=sources, flux=flux, weight=weight)


# -- predicting and writing ------------------------------------------------------------------------
def predict(model, flux: np.ndarray, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(labels, sigma) in physical units; sigma is NaN for models trained without `model.loss=gaussian_nll`."""
    import torch

    device = next(iter(model.buffers())).device
    means, sigmas = [], []
    with torch.inference_mode():
        for start in range(0, len(flux), batch_size):
            batch = torch.as_tensor(flux[start : start + batch_size], device=device)
            if hasattr(model, "predict_with_sigma"):
                mean, sigma = model.predict_with_sigma(batch)
            else:
                mean, sigma = model.predict_physical(batch), None
            means.append(mean.float().cpu().numpy())
            sigmas.append(np.full_like(means[-1], np.nan) if sigma is None else sigma.float().cpu().numpy())
    return np.concatenate(means), np.concatenate(sigmas)


def catalog_table(spectra: Spectra, label_names: Sequence[str], labels: np.ndarray, sigma: np.ndarray):
    """One row per spectrum: id, file, each label and its uncertainty, and the fraction of usable pixels."""
    from astropy.table import Table

    table = Table()
    table["id"] = np.array(spectra.ids, dtype=str)
    table["file"] = np.array(spectra.files, dtype=str)
    for j, name in enumerate(label_names):
        table[name] = labels[:, j].astype(np.float64)
        table[f"{name}_err"] = sigma[:, j].astype(np.float64)
    table["good_pixel_fraction"] = (spectra.weight > 0).mean(axis=1)
    return table


def write_catalog(table, out_dir: str | os.PathLike, stem: str = "predictions") -> tuple[Path, Path]:
    """FITS and CSV beside each other, each written to a temporary name and renamed."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create the output folder {out} ({err}); choose another with output_dir=...") from err
    paths = []
    for suffix, fmt in ((".fits", "fits"), (".csv", "ascii.csv")):
        final = out / f"{stem}{suffix}"
        try:
            with atomic_path(final) as tmp:
                table.write(tmp, format=fmt, overwrite=True)
        except OSError as err:
            raise ConfigError(f"cannot write {final} ({err}); check the folder is writable or set output_dir=...") from err
        paths.append(final)
    return paths[0], paths[1]
