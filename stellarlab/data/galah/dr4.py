"""`data=galah_dr4`: the official GALAH release (DR4, or DR3), read once into an `ArrayCache`.

The allstar FITS catalogue plus one FITS file per star and CCD (`stellarlab.data.galah.dr4_files`)
become resampled or concatenated arms in a cache keyed by everything that shapes them, because
opening four FITS files per star takes far longer than training. There is no download recipe:
the spectra come from Data Central's bulk download service.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np

from stellarlab.data.base import SpectraArrays
from stellarlab.data.flux import transform_flux
from stellarlab.data.galah.common import CHUNK_ROWS, GALAHDataModuleBase, canonical_label, require_rows
from stellarlab.data.galah.dr4_files import DR4_SPECTRA_HOWTO, Catalogue, read_ccd
from stellarlab.errors import ConfigError, DataError
from stellarlab.grids import C_KMS, GALAH_ARMS, GALAH_NPIX_PER_ARM

log = logging.getLogger(__name__)

GRIDS = ("resample", "concat")


def hermes_grid(arms: Sequence[Sequence[float]], pixels_per_arm: int) -> np.ndarray:
    """Air wavelengths (Angstrom) of the arms, each linear with `pixels_per_arm` pixels, end to end."""
    return np.concatenate([np.linspace(float(lo), float(hi), int(pixels_per_arm)) for lo, hi in arms])


class GALAHDR4DataModule(GALAHDataModuleBase):
    """`data=galah_dr4`: the GALAH DR4 (or DR3) allstar catalogue plus one FITS file per star and CCD.

    Cuts on the catalogue (`flag_sp`, SNR), then per star the normalised flux of each CCD, shifted to the
    rest frame with the file's radial velocity (`rv_keyword`) and either resampled onto fixed arm grids
    (`grid=resample`, default: the grid of `data=synthetic_galah`) or concatenated pixel for pixel
    (`grid=concat`, like galah4). The result is cached by everything that shapes it. The split unit is
    the star (`star_id_column`, Gaia DR3 source id), so repeat observations never straddle the split.
    """

    survey_name: ClassVar[str] = "galah_dr4"

    def __init__(
        self,
        root: str,
        catalogue: str = "galah_dr4_allstar_240705.fits",
        catalogue_hdu: int | str = 1,
        spectra_dir: str = "spectra",
        spectra_pattern: str = "{sobject_id}{ccd}.fits",
        ccds: Sequence[int] = (1, 2, 3, 4),
        flux_hdu: int | str = "normalized",
        error_hdu: int | str | None = "relative_error",
        rv_keyword: str | None = "RVCOM",
        grid: str = "resample",
        arms: Sequence[Sequence[float]] = GALAH_ARMS,
        pixels_per_arm: int = GALAH_NPIX_PER_ARM,
        id_column: str = "sobject_id",
        star_id_column: str | None = "gaiadr3_source_id",
        flag_sp_column: str = "flag_sp",
        flag_sp_max: int | None = 0,
        snr_column: str = "snr_px_ccd3",
        snr_min: float | None = 30.0,
        max_spectra: int | None = None,
        subset_seed: int = 0,
        cache_dir: str | None = None,
        strict: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.root = Path(root)
        self.catalogue = self._under_root(catalogue)
        self.catalogue_hdu = catalogue_hdu
        self.spectra_dir = self._under_root(spectra_dir)
        self.spectra_pattern = str(spectra_pattern)
        try:
            self.spectra_pattern.format(sobject_id=1, ccd=1, date="000000")
        except (KeyError, IndexError, ValueError) as err:
            raise ConfigError(
                f"data.spectra_pattern={spectra_pattern!r} is not a valid pattern ({err}); it may use "
                "{sobject_id}, {ccd} and {date} (the first 6 digits of sobject_id), e.g. '{sobject_id}{ccd}.fits'"
            ) from None
        self.ccds = [int(c) for c in ccds]
        if not self.ccds or any(c not in (1, 2, 3, 4) for c in self.ccds) or len(set(self.ccds)) != len(self.ccds):
            raise ConfigError(f"data.ccds must list distinct HERMES CCDs from 1..4 (blue, green, red, IR), got {list(ccds)}")
        self.ccds.sort()
        self.flux_hdu = flux_hdu
        self.error_hdu = error_hdu
        self.rv_keyword = rv_keyword or None
        if grid not in GRIDS:
            raise ConfigError(f"data.grid must be one of {list(GRIDS)}, got {grid!r}")
        if grid == "concat" and self.rv_keyword:
            raise ConfigError(
                "data.grid=concat keeps the native pixels, so it cannot shift spectra to the rest frame; "
                "add data.rv_keyword=null (concatenate observed-frame pixels) or use data.grid=resample"
            )
        self.grid = grid
        self.arms = [[float(lo), float(hi)] for lo, hi in arms]
        if len(self.arms) != 4 or any(not lo < hi for lo, hi in self.arms):
            raise ConfigError(f"data.arms must give 4 increasing [start, end] ranges in Angstrom (CCD 1..4), got {arms}")
        self.pixels_per_arm = int(pixels_per_arm)
        if self.pixels_per_arm < 2:
            raise ConfigError(f"data.pixels_per_arm must be >= 2, got {pixels_per_arm}")
        self.id_column = id_column
        self.star_id_column = star_id_column or None
        self.flag_sp_column = flag_sp_column
        self.flag_sp_max = None if flag_sp_max is None else int(flag_sp_max)
        self.snr_column = snr_column
        self.snr_min = None if snr_min is None else float(snr_min)
        if max_spectra is not None and int(max_spectra) < 1:
            raise ConfigError(f"data.max_spectra must be >= 1 or null (all), got {max_spectra}")
        self.max_spectra = None if max_spectra is None else int(max_spectra)
        self.subset_seed = int(subset_seed)
        self.cache_dir = Path(cache_dir) if cache_dir else self.root / "cache"
        self.strict = bool(strict)

    def _under_root(self, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() else self.root / p

    # -- the cache ------------------------------------------------------------------------------
    def cache(self):
        """The ArrayCache for this config: keyed by the catalogue file and everything that shapes the arrays."""
        from stellarlab.data.cache import ArrayCache

        try:
            stat = self.catalogue.stat()
            catalogue_id = {"path": str(self.catalogue.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        except FileNotFoundError:
            catalogue_id = {"path": str(self.catalogue)}
        config = {
            "layout": self.survey_name,
            "version": 1,
            "catalogue": catalogue_id,
            "catalogue_hdu": self.catalogue_hdu,
            "spectra_dir": str(self.spectra_dir.resolve()),
            "spectra_pattern": self.spectra_pattern,
            "ccds": self.ccds,
            "flux_hdu": self.flux_hdu,
            "error_hdu": self.error_hdu,
            "rv_keyword": self.rv_keyword,
            "grid": self.grid,
            "arms": self.arms if self.grid == "resample" else None,
            "pixels_per_arm": self.pixels_per_arm if self.grid == "resample" else None,
            "id_column": self.id_column,
            "flag_sp": [self.flag_sp_column, self.flag_sp_max],
            "snr": [self.snr_column, self.snr_min],
            "max_spectra": self.max_spectra,
            "subset_seed": self.subset_seed if self.max_spectra else None,
        }
        return ArrayCache(self.cache_dir, "galah_dr4", config)

    def prepare_data(self) -> None:
        cache = self.cache()
        if cache.exists():
            log.info("GALAH spectra: using the cache %s", cache.path)
            return
        self._build(cache)

    # -- building -------------------------------------------------------------------------------
    def _spectrum_path(self, sobject_id: int, ccd: int) -> Path:
        sid = str(int(sobject_id))
        return self.spectra_dir / self.spectra_pattern.format(sobject_id=sid, ccd=ccd, date=sid[:6])

    def _select_rows(self, cat: Catalogue) -> tuple[np.ndarray, np.ndarray, dict]:
        """Catalogue rows passing the cuts, their sobject_ids, and how many rows each cut removed."""
        ids = cat.column(self.id_column, "data.id_column")
        if not np.issubdtype(ids.dtype, np.integer):
            raise DataError(f"column '{self.id_column}' of {cat.path} is {ids.dtype}; sobject_id must be an integer")
        ids = ids.astype(np.int64)
        n = len(ids)
        keep = np.ones(n, dtype=bool)
        removed = {"catalogue_rows": n}
        if self.flag_sp_max is not None:
            flag = cat.numeric(self.flag_sp_column, "data.flag_sp_column")
            passed = np.isfinite(flag) & (flag <= self.flag_sp_max)
            removed["flag_sp"] = int((keep & ~passed).sum())
            keep &= passed
            log.info("GALAH flag_sp cut (%s <= %d): removed %d of %d rows",
                     self.flag_sp_column, self.flag_sp_max, removed["flag_sp"], n)
            require_rows(keep, f"flag_sp cut ({self.flag_sp_column} <= {self.flag_sp_max})",
                          "raise data.flag_sp_max or set it to null")
        if self.snr_min is not None:
            snr = cat.numeric(self.snr_column, "data.snr_column")
            passed = snr >= self.snr_min  # NaN fails
            removed["snr"] = int((keep & ~passed).sum())
            before = int(keep.sum())
            keep &= passed
            log.info("GALAH SNR cut (%s >= %g): removed %d of %d rows", self.snr_column, self.snr_min, removed["snr"], before)
            require_rows(keep, f"SNR cut ({self.snr_column} >= {self.snr_min:g})", "lower data.snr_min or set it to null")
        rows = np.flatnonzero(keep)
        if self.max_spectra is not None and len(rows) > self.max_spectra:
            rng = np.random.default_rng(self.subset_seed)
            rows = np.sort(rng.choice(rows, self.max_spectra, replace=False))
            removed["max_spectra"] = int(keep.sum()) - len(rows)
            log.info("GALAH data.max_spectra=%d: kept a random subset (seed %d) of %d rows",
                     self.max_spectra, self.subset_seed, int(keep.sum()))
        return rows, ids[rows], removed

    def _read_ccd(self, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, float | None]:
        return read_ccd(path, self.flux_hdu, self.error_hdu, self.rv_keyword)

    def _build(self, cache) -> None:
        cat = Catalogue(self.catalogue, self.catalogue_hdu)
        try:
            rows, ids, removed = self._select_rows(cat)
        finally:
            cat.close()

        paths = [[self._spectrum_path(sid, ccd) for ccd in self.ccds] for sid in ids]
        present = np.array([[p.is_file() for p in per_star] for per_star in paths], dtype=bool).reshape(len(ids), len(self.ccds))
        no_file = ~present.any(axis=1)
        removed["no_spectrum_file"] = int(no_file.sum())
        partial = int((present.any(axis=1) & ~present.all(axis=1)).sum())
        log.info(
            "GALAH spectra files in %s: %d of %d stars have none (removed), %d lack some of CCDs %s (those arms get weight 0)",
            self.spectra_dir, removed["no_spectrum_file"], len(ids), partial, self.ccds,
        )
        if no_file.all():
            raise DataError(
                f"none of the {len(ids)} selected GALAH spectra is in {self.spectra_dir} (e.g. {paths[0][0]} is missing); "
                f"{DR4_SPECTRA_HOWTO}; or set data.spectra_dir / data.spectra_pattern"
            )
        rows, ids, present = rows[~no_file], ids[~no_file], present[~no_file]
        paths = [p for p, gone in zip(paths, no_file) if not gone]

        if self.grid == "resample":
            wavelength = hermes_grid([self.arms[c - 1] for c in self.ccds], self.pixels_per_arm)
            lengths = [self.pixels_per_arm] * len(self.ccds)
        else:
            lengths = []
            for j, ccd in enumerate(self.ccds):  # native length of each CCD, from its first readable file
                length = None
                for i in np.flatnonzero(present[:, j]):
                    try:
                        length = self._read_ccd(paths[i][j])[1].size
                        break
                    except DataError:
                        continue  # listed when the star is read below
                if length is None:
                    raise DataError(f"no selected star has a readable CCD{ccd} file; drop it with data.ccds (e.g. "
                                    f"without {ccd}), or download the files again")
                lengths.append(length)
            wavelength = None
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        n, p = len(rows), int(offsets[-1])
        wl_sum = np.zeros(p)
        wl_count = np.zeros(p)
        no_rv = no_readable = 0
        unreadable: list[dict] = []  # {"file", "error"}: skipped (their arm gets weight 0), or all listed with strict
        log.info("GALAH: reading %d stars x %d CCD files into %s", n, len(self.ccds), cache.path)
        specs = {"flux": ((n, p), np.float32), "weight": ((n, p), np.float32), "row": ((n,), np.int64),
                 "ok": ((n,), np.bool_), "wavelength": ((p,), np.float64)}
        with cache.writer(specs, meta={"removed": removed}) as w:
            for start in range(0, n, CHUNK_ROWS):
                stop = min(start + CHUNK_ROWS, n)
                flux = np.full((stop - start, p), np.nan, dtype=np.float32)
                sigma = np.full((stop - start, p), np.nan, dtype=np.float32)
                ok = np.ones(stop - start, dtype=bool)
                for i in range(start, stop):
                    before = len(unreadable)
                    has_rv = self._read_star(paths[i], present[i], lengths, offsets,
                                             flux[i - start], sigma[i - start], wl_sum, wl_count, unreadable)
                    if not has_rv:
                        ok[i - start] = False
                        if len(unreadable) - before == int(present[i].sum()):
                            no_readable += 1  # every file of the star was bad
                        else:
                            no_rv += 1
                w["flux"][start:stop] = flux
                w["weight"][start:stop] = self._weight(flux, sigma)
                w["ok"][start:stop] = ok
                if (start // CHUNK_ROWS) % 10 == 9 or stop == n:
                    log.info("GALAH: %d of %d stars read", stop, n)
            w["row"][0:n] = rows
            if wavelength is None:  # concat: the mean observed wavelength of each native pixel
                wavelength = wl_sum / np.maximum(wl_count, 1)
            w["wavelength"][0:p] = wavelength
            removed["no_radial_velocity"] = no_rv
            removed["no_readable_file"] = no_readable
            w.meta["removed"] = removed
            w.meta["unreadable_files"] = unreadable
            if unreadable and len(unreadable) == int(present.sum()):  # a setting, not a bad download: say it once
                raise DataError(f"none of the {len(unreadable)} GALAH spectrum files can be read; the first: "
                                f"{unreadable[0]['error']}")
            if unreadable and self.strict:  # after the whole pass: every bad file in one message; no cache is kept
                raise DataError(f"{len(unreadable)} GALAH spectrum files cannot be read (data.strict=true); download "
                                "them again or set data.strict=false to skip them: "
                                + "; ".join(u["error"] for u in unreadable))
        if unreadable:
            log.warning("GALAH: skipped %d spectrum files that cannot be read (their arms get weight 0, a star with "
                        "none left is dropped; listed in the cache's meta.json; data.strict=true makes this an "
                        "error):\n  %s", len(unreadable), "\n  ".join(u["error"] for u in unreadable))
        if no_rv:
            log.warning("GALAH: %d stars have a non-finite %s and are left out", no_rv, self.rv_keyword)
        log.info("GALAH: cached %d spectra x %d pixels in %s", n - no_rv - no_readable, p, cache.path)

    def _weight(self, flux: np.ndarray, sigma: np.ndarray) -> np.ndarray:
        """Inverse variance 1/sigma^2; 0 where flux or sigma is unusable. Without an error extension: 1 per finite pixel."""
        finite = np.isfinite(flux)
        if self.error_hdu is None:
            return finite.astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            ivar = 1.0 / sigma.astype(np.float64) ** 2
        return np.where(finite & np.isfinite(ivar) & (sigma > 0), ivar, 0.0).astype(np.float32)

    def _read_star(self, paths, present, lengths, offsets, flux_row, sigma_row, wl_sum, wl_count,
                   unreadable: list[dict]) -> bool:
        """Fill one star's row (NaN where no data); False when its radial velocity is not finite or none of its
        files can be read (those go to `unreadable`)."""
        parts = []
        rv = None
        for j, path in enumerate(paths):
            if present[j]:
                try:
                    wl, flux, sigma, rv_file = self._read_ccd(path)
                except DataError as err:  # truncated, wrong HDUs, unreadable header: skipped and listed
                    unreadable.append({"file": str(path), "error": str(err)})
                    continue
                parts.append((j, path, wl, flux, sigma))
                rv = rv_file if rv is None else rv
        if not parts:
            return False
        if self.rv_keyword:
            if rv is None:
                raise DataError(
                    f"{parts[0][1]} has no {self.rv_keyword} header keyword (the radial velocity used to shift it to "
                    "the rest frame); set data.rv_keyword to the right keyword, or to null if the spectra are "
                    "already in the rest frame"
                )
            if not math.isfinite(rv):
                return False
        for j, path, wl, flux, sigma in parts:
            bad = ~np.isfinite(flux)
            if self.error_hdu is not None:
                bad |= ~np.isfinite(sigma)  # no measured error: the pixel is not usable
            flux = np.where(bad, np.nan, flux)
            lo, hi = offsets[j], offsets[j + 1]
            if self.grid == "resample":
                rest = wl / (1.0 + rv / C_KMS) if self.rv_keyword else wl
                target = np.linspace(*self.arms[self.ccds[j] - 1], self.pixels_per_arm)
                flux_row[lo:hi] = np.interp(target, rest, flux, left=np.nan, right=np.nan)
                sigma_row[lo:hi] = np.interp(target, rest, sigma, left=np.nan, right=np.nan)
            else:
                if flux.size != lengths[j]:
                    raise DataError(
                        f"{path} has {flux.size} pixels but other CCD{self.ccds[j]} files have {lengths[j]}; "
                        "data.grid=concat needs equal lengths: use data.grid=resample"
                    )
                flux_row[lo:hi] = flux
                sigma_row[lo:hi] = sigma
                wl_sum[lo:hi] += wl
                wl_count[lo:hi] += 1
        return True

    # -- loading --------------------------------------------------------------------------------
    def load_arrays(self) -> SpectraArrays:
        cache = self.cache()
        if not cache.exists():
            self._build(cache)
        arrays = cache.load()
        removed = cache.meta.get("removed", {})
        ok = np.asarray(arrays["ok"])
        rows = np.asarray(arrays["row"])[ok]
        log.info("GALAH: %d spectra from the cache %s (rows removed per cut: %s)", len(rows), cache.path, removed)
        if not len(rows):
            raise DataError(f"GALAH: no spectrum left after reading the files (rows removed per cut: {removed})")

        cat = Catalogue(self.catalogue, self.catalogue_hdu)
        try:
            self._check_labels(cat.numeric_names(), f"the catalogue {self.catalogue}")
            by_label = {canonical_label(name): name for name in cat.names}
            labels = np.stack(
                [cat.numeric(by_label[name], "data.labels")[rows] for name in self.label_names], axis=1
            ).astype(np.float32)
            labels[~np.isfinite(labels)] = np.nan
            snr = (cat.numeric(self.snr_column, "data.snr_column")[rows] if cat.has(self.snr_column)
                   else np.full(len(rows), np.nan))
            star_id = self._star_ids(cat, rows)
            ids = {self.id_column: cat.column(self.id_column, "data.id_column")[rows]}
            if self.star_id_column is not None:
                ids[self.star_id_column] = cat.column(self.star_id_column, "data.star_id_column")[rows]
        finally:
            cat.close()

        index = np.flatnonzero(ok)
        flux = np.empty((len(index), arrays["flux"].shape[1]), dtype=np.float32)
        for start in range(0, len(index), CHUNK_ROWS):
            block = arrays["flux"][index[start : start + CHUNK_ROWS]]
            flux[start : start + len(block)] = transform_flux(block, self.flux_transform, self.flux_floor)
        weight = np.asarray(arrays["weight"])[index] if len(index) < len(ok) else arrays["weight"]
        return self._finish(flux, weight, labels, star_id, np.asarray(arrays["wavelength"]), snr, "GALAH", ids=ids)

    def _star_ids(self, cat: Catalogue, rows: np.ndarray) -> np.ndarray:
        """Integer star ids from `star_id_column`; a row without one (empty, <= 0) is its own star."""
        if self.star_id_column is None:
            log.info("GALAH: data.star_id_column=null: each spectrum is its own star in the split")
            return rows.astype(np.int64)
        values = cat.column(self.star_id_column, "data.star_id_column")[rows]
        if np.issubdtype(values.dtype, np.number):
            valid = np.isfinite(values.astype(np.float64)) & (values > 0)
            keys = values.astype(np.int64)
        else:
            keys = np.char.strip(values.astype(str))
            valid = (keys != "") & (keys != "-")
        _, inverse = np.unique(keys[valid], return_inverse=True)
        star_id = np.empty(len(rows), dtype=np.int64)
        star_id[valid] = inverse
        star_id[~valid] = inverse.max(initial=-1) + 1 + np.arange(int((~valid).sum()))
        n_stars = len(np.unique(star_id))
        log.info(
            "GALAH: %d spectra of %d stars by %s (%d without one are their own star); the split keeps each star on one side",
            len(rows), n_stars, self.star_id_column, int((~valid).sum()),
        )
        return star_id

    def preprocessing_config(self) -> dict:
        return {
            **super().preprocessing_config(),
            "grid": self.grid,
            "ccds": list(self.ccds),
            "arms": [list(a) for a in self.arms] if self.grid == "resample" else None,
            "pixels_per_arm": self.pixels_per_arm if self.grid == "resample" else None,
            "flux_hdu": str(self.flux_hdu),
            "rest_frame": bool(self.rv_keyword),
        }
