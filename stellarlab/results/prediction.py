"""Apply a trained checkpoint to new spectra: read them as training did, predict, write a catalogue.

A checkpoint carries everything needed: the model class and weights (with their SHA-256, checked on
reading), the label names, their normalisation and training range, the wavelength grid, and the
preprocessing of the data it was trained on (saved by the DataModule's `state_dict`). `predict.py` is
the command-line front end. A prediction outside the training labels' range (widened by a tolerance)
is flagged in the catalogue (`<label>_outside`): a model extrapolates there, or was fed garbage.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stellarlab.data import surveys
from stellarlab.errors import ConfigError, DataError
from stellarlab.files import atomic_path

log = logging.getLogger(__name__)

#: predict.py's `format=` values: auto, then each reader `stellarlab.data.surveys` knows (aspcapStar, apStar, npy).
FORMATS = ("auto", *surveys.format_names())


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
    """The raw checkpoint dict (tensors and plain types only), with a clear error for a bad path or file.

    Its weights are checked against the checksum saved with them: flipped bytes still unpickle."""
    import torch

    from stellarlab.models import checksum

    path = Path(ckpt_path)
    if not path.is_file():
        raise ConfigError(f"ckpt_path={ckpt_path}: no such file; checkpoints are in <run folder>/checkpoints/ (best-*.ckpt, last.ckpt)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickle from elsewhere, ...
        raise DataError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); is the file complete?") from err
    checksum.verify(checkpoint, path, "copy it again from where it was trained, or use another checkpoint of the run "
                                      "(<run folder>/checkpoints/best-*.ckpt, last.ckpt)")
    return checkpoint


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
    _check_format(fmt)
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else [str(i) for i in inputs]
    formats = surveys.input_formats() if fmt == "auto" else [surveys.input_format(fmt)]
    patterns = list(dict.fromkeys(g for f in formats for g in f.globs))
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted({p for pattern in patterns for p in path.glob(pattern) if not p.name.endswith("_wavelength.npy")})
            if not found:
                raise DataError(f"input folder {path} holds no spectra (looked for {', '.join(patterns)})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"input {path}: no such file or folder; give input=<file>, <folder> or [<file>,<file>,...]")
    seen: dict[Path, Path] = {}
    for path in files:  # the same spectra twice would be two rows with one id
        if path.resolve() in seen:
            raise DataError(f"input names {path} more than once (input={_listed(items)}); give each file or folder once")
        seen[path.resolve()] = path
    return files


def _listed(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else "[" + ",".join(items) + "]"


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r} is not one of {list(FORMATS)}; format=auto tells it from each file's name")


def file_format(path: Path, fmt: str) -> str:
    """`fmt`, or for format=auto the format the file's name says (`stellarlab.data.surveys.format_of_file`)."""
    if fmt != "auto":
        return fmt
    found = surveys.format_of_file(path.name)
    if found is None:
        raise DataError(f"cannot tell the format of {path} from its name; pass format={'|'.join(FORMATS[1:])}")
    return found.name


def read_spectra(
    files: Iterable[Path],
    fmt: str,
    preprocessing: dict,
    wavelength: np.ndarray,
    input_wavelength: str | None = None,
) -> Spectra:
    """Every file's spectra, preprocessed as the checkpoint's training data was, on its wavelength grid.

    Each format's reader is the one its survey registers (`stellarlab.data.surveys`)."""
    _check_format(fmt)
    fluxes, weights, ids, sources = [], [], [], []
    for path in files:
        kind = file_format(path, fmt)
        reader = surveys.load(surveys.input_format(kind).reader)
        flux, weight, names = reader(path, kind, preprocessing, wavelength, input_wavelength)
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
def predict(model, flux: np.ndarray, batch_size: int = 1024, weight: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(labels, sigma) in physical units; sigma is NaN for models trained without `model.loss=gaussian_nll`.

    `weight` (inverse variance, 0 = no data) is passed on to models that fit the spectrum."""
    import torch

    device = next(iter(model.buffers())).device
    means, sigmas = [], []
    with torch.inference_mode():
        for start in range(0, len(flux), batch_size):
            batch = torch.as_tensor(flux[start : start + batch_size], device=device)
            if hasattr(model, "predict_with_sigma"):
                w = None if weight is None else torch.as_tensor(weight[start : start + batch_size], device=device)
                mean, sigma = model.predict_with_sigma(batch, w)
            else:
                mean, sigma = model.predict_physical(batch), None
            means.append(mean.float().cpu().numpy())
            sigmas.append(np.full_like(means[-1], np.nan) if sigma is None else sigma.float().cpu().numpy())
    return np.concatenate(means), np.concatenate(sigmas)


def outside_training_range(model, labels: np.ndarray, tolerance: float) -> np.ndarray:
    """(N, L) True where a predicted label is not finite or lies outside the training labels' range widened by
    `tolerance` times its width on each side (a checkpoint without a saved range: label_mean -/+ 3 label_std)."""
    low, high, saved = model.training_range()
    if not saved:
        log.warning("the checkpoint predates saved training ranges: predictions are flagged outside label_mean -/+ "
                    "3 label_std instead")
    low, high = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
    margin = tolerance * (high - low)
    with np.errstate(invalid="ignore"):
        return ~np.isfinite(labels) | (labels < low - margin) | (labels > high + margin)


def report_outside(label_names: Sequence[str], outside: np.ndarray, tolerance: float) -> str | None:
    """The warning line for flagged rows, or None when no row is flagged."""
    rows = outside.any(axis=1)
    if not rows.any():
        return None
    per_label = ", ".join(f"{name}: {int(n)}" for name, n in zip(label_names, outside.sum(axis=0)) if n)
    return (f"{int(rows.sum())} of {len(rows)} spectra have a prediction outside the training labels' range widened by "
            f"{tolerance:g} of its width ({per_label}); their rows have <label>_outside=True: do not trust those values")


def catalog_table(spectra: Spectra, label_names: Sequence[str], labels: np.ndarray, sigma: np.ndarray,
                  outside: np.ndarray | None = None):
    """One row per spectrum: id, file, each label, its uncertainty and whether it lies outside the training range
    (`<label>_outside`, when `outside` is given), and the fraction of usable pixels."""
    from astropy.table import Table

    table = Table()
    table["id"] = np.array(spectra.ids, dtype=str)
    table["file"] = np.array(spectra.files, dtype=str)
    for j, name in enumerate(label_names):
        table[name] = labels[:, j].astype(np.float64)
        table[f"{name}_err"] = sigma[:, j].astype(np.float64)
        if outside is not None:
            table[f"{name}_outside"] = outside[:, j]
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
