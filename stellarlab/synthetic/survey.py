"""Synthetic surveys: labels from the prior, noise-free spectra from the generator, Gaussian noise, a disk cache.

The cache exists because generating 100k spectra takes minutes; it is keyed by everything that changes
the arrays (parameters, generator version, line-list contents) and written atomically (temporary sibling
directory, then rename) so an interrupted run can never leave a half-written cache that a later run trusts.
Arrays are stored as separate .npy files so loaders can memory-map them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from stellarlab.errors import DataError
from stellarlab.files import atomic_folder
from stellarlab.grids import SURVEYS, survey_grid
from stellarlab.synthetic.generator import (
    GENERATOR_VERSION,
    LABEL_NAMES,
    SpectrumGenerator,
)
from stellarlab.synthetic.linelist import linelist_hashes
from stellarlab.synthetic.prior import sample_labels

log = logging.getLogger("stellarlab.synthetic")

ARRAY_FIELDS = ("flux", "ivar", "labels", "star_id", "snr", "wavelength")


@dataclass
class SyntheticSurvey:
    """A synthetic survey as numpy arrays (N = n_stars * spectra_per_star spectra, P pixels)."""

    flux: np.ndarray  # float32 (N, P)
    ivar: np.ndarray  # float32 (N, P), inverse variance, 0 = no data
    labels: np.ndarray  # float32 (N, 4), LABEL_NAMES order
    star_id: np.ndarray  # int64 (N,), shared by the spectra of one star
    snr: np.ndarray  # float32 (N,)
    wavelength: np.ndarray  # float64 (P,)
    survey: str
    label_names: tuple = LABEL_NAMES
    params: dict = field(default_factory=dict)
    cache_path: Optional[str] = None

    def __len__(self) -> int:
        return int(self.flux.shape[0])

    def generator(self) -> SpectrumGenerator:
        """The generator of this survey's noise-free spectra (its grid and oversampling), for bounds and truths."""
        return _generator(self.params.get("survey", self.survey), int(self.params.get("oversample", 3)))


@lru_cache(maxsize=4)
def _generator(survey: str, oversample: int) -> SpectrumGenerator:
    """Generators are cheap to build but reused across calls (the line windows are precomputed)."""
    return SpectrumGenerator(survey=survey, oversample=oversample, device="cpu")


def _canonical_params(survey, n_stars, snr, seed, spectra_per_star, gap_deleted, oversample) -> dict:
    if str(survey).lower() not in SURVEYS:
        raise ValueError(f"unknown survey {survey!r}; valid surveys: {', '.join(SURVEYS)}")
    if isinstance(n_stars, bool) or int(n_stars) != n_stars or int(n_stars) < 1:
        raise ValueError(f"n_stars must be an integer >= 1, got {n_stars!r}")
    if int(spectra_per_star) != spectra_per_star or int(spectra_per_star) < 1:
        raise ValueError(f"spectra_per_star must be an integer >= 1, got {spectra_per_star!r}")
    if int(oversample) != oversample or int(oversample) < 1:
        raise ValueError(f"oversample must be an integer >= 1, got {oversample!r}")
    if isinstance(snr, (tuple, list)):
        if len(snr) != 2:
            raise ValueError(f"snr range must be (lo, hi), got {snr!r}")
        lo, hi = float(snr[0]), float(snr[1])
        if not (lo > 0 and hi > 0):
            raise ValueError(f"snr must be > 0, got {snr!r}")
        if lo > hi:
            raise ValueError(f"snr range needs lo <= hi, got {snr!r}")
        snr_c = [lo, hi]
    else:
        s = float(snr)
        if not s > 0 or not np.isfinite(s):
            raise ValueError(f"snr must be > 0, got {snr!r}")
        snr_c = s
    return {
        "survey": str(survey).lower(), "n_stars": int(n_stars), "snr": snr_c, "seed": int(seed),
        "spectra_per_star": int(spectra_per_star), "gap_deleted": bool(gap_deleted), "oversample": int(oversample),
    }


def cache_key(params: dict) -> str:
    """16 hex of sha1(canonical params + generator version + line-list file hashes)."""
    payload = json.dumps({"params": params, "generator_version": GENERATOR_VERSION,
                          "linelists": linelist_hashes(params["survey"])}, sort_keys=True)
    return hashlib.sha1(payload.encode()).hexdigest()[:16]


def _generate(params: dict, progress: bool) -> SyntheticSurvey:
    survey = params["survey"]
    n_stars, per_star = params["n_stars"], params["spectra_per_star"]
    gen = _generator(survey, params["oversample"])
    grid = survey_grid(survey)
    labels_star = sample_labels(n_stars, params["seed"])

    t0 = time.perf_counter()
    if progress:
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task(f"synthesising {survey} spectra", total=n_stars)
            clean = gen.generate(torch.from_numpy(labels_star),
                                 progress=lambda done, total: bar.update(task, completed=done))
    else:
        clean = gen.generate(torch.from_numpy(labels_star))
    clean = clean.numpy()
    dt = time.perf_counter() - t0

    n = n_stars * per_star
    star_id = np.repeat(np.arange(n_stars, dtype=np.int64), per_star)
    # Independent stream for the noise so the labels do not depend on the SNR settings.
    rng = np.random.default_rng(np.random.SeedSequence([params["seed"], 0x4015E]))
    if isinstance(params["snr"], list):
        lo, hi = params["snr"]
        snr = np.exp(rng.uniform(np.log(lo), np.log(hi), n)).astype(np.float32)
    else:
        snr = np.full(n, params["snr"], dtype=np.float32)
    flux = clean[star_id]
    flux += rng.standard_normal(flux.shape, dtype=np.float32) / snr[:, None]
    if not np.isfinite(flux).all():  # sigma = 1/snr beyond float32: refuse, never cache non-finite spectra
        raise ValueError(f"snr={params['snr']} makes the noise (sigma = 1/snr per pixel) overflow float32; "
                         "give data.snr of at least 1e-3 (real spectra have SNR 5-1000)")
    ivar = np.broadcast_to((snr.astype(np.float64) ** 2).astype(np.float32)[:, None], flux.shape).copy()
    valid = grid.valid_mask
    flux[:, ~valid] = 1.0  # no detector there: like real apStar files, no information (ivar = 0)
    ivar[:, ~valid] = 0.0
    wavelength = grid.wavelength
    if params["gap_deleted"]:
        flux, ivar, wavelength = flux[:, valid], ivar[:, valid], wavelength[valid]
    log.info("generated %d spectra in %.1f s", n, dt)
    return SyntheticSurvey(flux=np.ascontiguousarray(flux, dtype=np.float32), ivar=np.ascontiguousarray(ivar),
                           labels=labels_star[star_id].astype(np.float32), star_id=star_id, snr=snr,
                           wavelength=wavelength.astype(np.float64), survey=survey, params=dict(params))


def _write_cache(result: SyntheticSurvey, final: Path, key: str) -> None:
    """Write into a temporary sibling folder, `params.json` last, then rename it into place."""
    with atomic_folder(final, "params.json") as tmp:
        for name in ARRAY_FIELDS:
            np.save(tmp / f"{name}.npy", getattr(result, name))
        meta = {"params": result.params, "key": key, "generator_version": GENERATOR_VERSION,
                "label_names": list(result.label_names), "survey": result.survey,
                "linelists": linelist_hashes(result.survey)}
        with open(tmp / "params.json", "w") as fh:
            json.dump(meta, fh, indent=2, sort_keys=True)


def _discard(path: Path, why: str) -> None:
    """Remove a cache folder that cannot be trusted, so the fresh survey takes its place."""
    log.warning("the synthetic survey cache %s %s: building it again", path, why)
    try:
        shutil.rmtree(path)
    except OSError as err:
        raise DataError(
            f"the synthetic survey cache {path} {why}, and it cannot be removed ({err}); "
            "delete it, or set paths.cache_dir to a folder you can write"
        ) from err


def _load_cache(path: Path) -> Optional[SyntheticSurvey]:
    """The survey cached in `path`; None when there is none yet, or when the folder is incomplete or
    damaged (an interrupted copy, a truncated array): then it is removed, and the caller rebuilds it."""
    if not path.exists():
        return None
    meta_path = path / "params.json"
    if not meta_path.is_file():
        _discard(path, "has no params.json (an interrupted copy?)")
        return None
    try:
        meta = json.loads(meta_path.read_text())
        arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in ARRAY_FIELDS}
        n = int(meta["params"]["n_stars"]) * int(meta["params"]["spectra_per_star"])
        rows = {name: arrays[name].shape[0] for name in ARRAY_FIELDS if name != "wavelength"}
        if set(rows.values()) != {n} or arrays["flux"].shape != arrays["ivar"].shape:
            raise ValueError(f"arrays of {rows} rows, {n} expected")
        survey = SyntheticSurvey(**arrays, survey=meta["survey"], label_names=tuple(meta["label_names"]),
                                 params=meta["params"], cache_path=str(path))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        _discard(path, f"is damaged ({exc})")
        return None
    return survey


def make_survey(survey: str = "apogee", n_stars: int = 1000, snr: Union[float, tuple] = 100.0, seed: int = 0,
                spectra_per_star: int = 1, gap_deleted: bool = False,
                cache_dir: Optional[Union[str, os.PathLike]] = None, oversample: int = 3,
                progress: bool = True) -> SyntheticSurvey:
    """Generate (or load from cache) a synthetic survey; deterministic for (all parameters, seed).

    snr: a fixed per-pixel SNR, or (lo, hi) for a per-spectrum SNR drawn log-uniform in that range.
    APOGEE full grid: pixels between the chips have flux 1 and ivar 0; gap_deleted=True keeps only the
    7514 chip pixels. Cached results come back memory-mapped (read-only arrays).
    """
    params = _canonical_params(survey, n_stars, snr, seed, spectra_per_star, gap_deleted, oversample)
    if cache_dir is None:
        return _generate(params, progress)
    key = cache_key(params)
    final = Path(cache_dir) / f"{params['survey']}-{key}"
    cached = _load_cache(final)
    if cached is not None:
        log.info("loaded cached synthetic survey from %s", final)
        return cached
    result = _generate(params, progress)
    _write_cache(result, final, key)
    result.cache_path = str(final)
    return result


__all__ = ["SyntheticSurvey", "make_survey", "cache_key"]
