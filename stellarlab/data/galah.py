"""GALAH spectra: `data=galah` (the `simbaswe/galah4` arrays) and `data=galah_dr4` (the official release).

Two layouts, one set of conventions:

* Labels use stellarlab's names (`teff`, `logg`, `fe_h`, ...). galah4 calls its columns `t_eff`,
  `log_g` and `SNR`; those spellings are accepted as aliases, so one experiment (`labels: [teff, logg,
  fe_h]`) runs on galah4, on the DR4 catalogue (whose columns already are `teff`, `logg`, `fe_h`) and on
  the synthetic GALAH-like survey alike, and checkpoints carry the same label names whatever the source.
* `flux_transform=log` stores `1 + ln(max(flux, flux_floor))`: the coursework preprocessing
  `log(max(flux, 0.2))` shifted so the continuum stays at 1. Models read the absorption depth `1 - flux`,
  which becomes `-ln(flux)` (an optical depth): 0 on the continuum and at masked pixels, as without it.
* Every cut logs how many rows it removed; a cut that leaves nothing stops with an error naming it.
  Rows with none of the requested labels, or no usable pixel, are dropped here (and logged) rather than
  in the base class, so per-spectrum extras such as `snr` stay aligned with the rows.

galah4 memory-maps its two `.npy` files and reads only the rows that pass the cuts. The official
release (allstar FITS catalogue + one FITS file per star and CCD) is read once into an `ArrayCache`
(resampled or concatenated arms), because opening four FITS files per star takes far longer than training.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from stellarlab.data.base import SpectraArrays, SpectraDataModule
from stellarlab.errors import ConfigError, DataError
from stellarlab.grids import GALAH_ARMS, GALAH_NPIX_PER_ARM, galah_wavelength

log = logging.getLogger(__name__)

C_KMS = 299792.458

#: Column order of galah4's `labels.npy` (dataset card of `simbaswe/galah4`).
GALAH4_COLUMNS = ("mass", "age", "l_bol", "dist", "t_eff", "log_g", "fe_h", "SNR")
GALAH4_PIXELS = len(GALAH_ARMS) * GALAH_NPIX_PER_ARM  # 16384: four HERMES CCDs of 4096 pixels, end to end
#: Other spellings of stellarlab's label names (compared in lower case).
LABEL_ALIASES = {"t_eff": "teff", "log_g": "logg", "feh": "fe_h"}
FLUX_TRANSFORMS = ("none", "log")
GRIDS = ("resample", "concat")
CHUNK_ROWS = 256


def canonical_label(name: str) -> str:
    """stellarlab's name for a label column: lower case, galah4's `t_eff`/`log_g` mapped to `teff`/`logg`."""
    key = str(name).strip().lower()
    return LABEL_ALIASES.get(key, key)


def transform_flux(flux: np.ndarray, kind: str, floor: float) -> np.ndarray:
    """`none`: float32 flux as is. `log`: 1 + ln(max(flux, floor)); NaN stays NaN (a masked pixel)."""
    flux = np.asarray(flux, dtype=np.float32)
    if kind == "none":
        return flux
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.float32(1.0) + np.log(np.maximum(flux, np.float32(floor)))).astype(np.float32)


def hermes_grid(arms: Sequence[Sequence[float]], pixels_per_arm: int) -> np.ndarray:
    """Air wavelengths (Angstrom) of the arms, each linear with `pixels_per_arm` pixels, end to end."""
    return np.concatenate([np.linspace(float(lo), float(hi), int(pixels_per_arm)) for lo, hi in arms])


class _GALAHDataModule(SpectraDataModule):
    """What both layouts share: label aliases, the flux transform, and the last row filter."""

    layout = "galah"

    def __init__(self, flux_transform: str = "none", flux_floor: float = 0.2, **kwargs):
        super().__init__(**kwargs)
        if flux_transform not in FLUX_TRANSFORMS:
            raise ConfigError(f"data.flux_transform must be one of {list(FLUX_TRANSFORMS)}, got {flux_transform!r}")
        if flux_transform == "log" and not (flux_floor is not None and float(flux_floor) > 0):
            raise ConfigError(f"data.flux_floor must be > 0 for data.flux_transform=log (log of it is taken), got {flux_floor}")
        self.flux_transform = str(flux_transform)
        self.flux_floor = float(flux_floor) if flux_floor is not None else None
        self.requested_labels = list(self.label_names)
        self.label_names = [canonical_label(n) for n in self.requested_labels]
        seen: dict[str, str] = {}
        for given, name in zip(self.requested_labels, self.label_names):
            if name in seen:
                raise ConfigError(f"data.labels names '{name}' twice ({seen[name]!r} and {given!r} are the same column)")
            seen[name] = given

    def preprocessing_config(self) -> dict:
        return {
            **super().preprocessing_config(),
            "layout": self.layout,
            "flux_transform": self.flux_transform,
            "flux_floor": self.flux_floor,
        }

    def _check_labels(self, available: Sequence[str], where: str) -> None:
        """DataError listing what there is when a requested label is not a column of the data."""
        have = {canonical_label(a) for a in available}
        missing = [given for given, name in zip(self.requested_labels, self.label_names) if name not in have]
        if missing:
            raise DataError(
                f"label(s) {missing} not in {where}; available labels: {list(available)} "
                f"(also accepted: {', '.join(f'{k} for {v}' for k, v in LABEL_ALIASES.items())}). "
                "Set data.labels to some of them."
            )

    def _finish(self, flux, weight, labels, star_id, wavelength, snr, what: str) -> SpectraArrays:
        """Drop rows with no requested label or no usable pixel (logged), and hand the arrays over."""
        has_label = np.isfinite(labels).any(axis=1)
        has_pixel = np.zeros(len(flux), dtype=bool)
        for start in range(0, len(flux), CHUNK_ROWS):
            f = flux[start : start + CHUNK_ROWS]
            w = weight[start : start + CHUNK_ROWS]
            has_pixel[start : start + len(f)] = (np.isfinite(f) & np.isfinite(w) & (w > 0)).any(axis=1)
        keep = has_label & has_pixel
        if not keep.all():
            log.info(
                "%s: dropped %d of %d spectra: %d with none of the labels %s, %d with no usable pixel",
                what, int((~keep).sum()), len(keep), int((~has_label).sum()), self.label_names, int((~has_pixel).sum()),
            )
        if not keep.any():
            fixes = []
            if not has_label.any():
                fixes.append("choose data.labels that these spectra have values for")
            if not has_pixel.any():
                fixes.append("the flux is NaN/inf or weight 0 everywhere: check the spectrum files (download them again)")
            raise DataError(
                f"{what}: no spectrum left: {int((~has_label).sum())} of {len(keep)} have none of the labels "
                f"{self.label_names} (NaN) and {int((~has_pixel).sum())} have no usable pixel; "
                + ("; ".join(fixes) or "no spectrum has both a label and a usable pixel: check data.labels and the files")
            )
        if not keep.all():
            flux, weight, labels, star_id, snr = flux[keep], weight[keep], labels[keep], star_id[keep], snr[keep]
        return SpectraArrays(
            flux=flux,
            weight=weight,
            labels=labels,
            label_names=list(self.label_names),
            star_id=star_id,
            wavelength=wavelength,
            extra={"snr": np.asarray(snr, dtype=np.float32)},
        )


def _require_rows(keep: np.ndarray, cut: str, hint: str) -> None:
    if not keep.any():
        raise DataError(f"no spectrum left after the {cut}; {hint}")


# ------------------------------------------------------------------------------------------------
# simbaswe/galah4: spectra.npy + labels.npy
# ------------------------------------------------------------------------------------------------


def open_npy(path: Path, download_command: str) -> np.ndarray:
    """Memory-map one `.npy` file; a missing or truncated file is a DataError naming it."""
    if not path.is_file():
        raise DataError(f"{path} not found; get the galah4 files with `{download_command}` (or point data.root at them)")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataError(
            f"{path} is not a readable .npy file ({err}); it is probably truncated by an interrupted download: "
            f"delete it and run `{download_command}` again"
        ) from err


GALAH4_DOWNLOAD = "python -m stellarlab.download data=galah"
DR4_CATALOGUE_URL = "https://cloud.datacentral.org.au/teamdata/GALAH/public/GALAH_DR4/catalogs/"
DR4_SPECTRA_HOWTO = (
    "the DR4 spectra come from Data Central's bulk download (https://datacentral.org.au/services/download/: "
    "a list of sobject_id, 'HERMES 1D spectra'), unpacked so that files are named {sobject_id}{ccd}.fits"
)


class GALAH4DataModule(_GALAHDataModule):
    """`data=galah`: the `simbaswe/galah4` arrays, memory-mapped; labels by name, an SNR cut, optional log flux.

    galah4 has no star identifier and no per-pixel uncertainties: every row is its own star (the split
    unit is the row, identified by its index in the files), and every finite pixel gets weight 1.
    """

    layout = "galah4"
    download_command = GALAH4_DOWNLOAD

    def __init__(self, root: str, snr_min: float | None = None, **kwargs):
        super().__init__(**kwargs)
        if snr_min is not None and not float(snr_min) >= 0:
            raise ConfigError(f"data.snr_min must be >= 0 or null (no cut), got {snr_min}")
        self.root = Path(root)
        self.snr_min = None if snr_min is None else float(snr_min)

    def prepare_data(self) -> None:
        self._open()  # fail before the model is built when the files are missing or broken

    def _open(self) -> tuple[np.ndarray, np.ndarray]:
        spectra = open_npy(self.root / "spectra.npy", self.download_command)
        labels = open_npy(self.root / "labels.npy", self.download_command)
        if spectra.ndim != 2 or spectra.shape[1] != GALAH4_PIXELS:
            raise DataError(
                f"{self.root / 'spectra.npy'} has shape {spectra.shape}; the galah4 layout is (N, {GALAH4_PIXELS}): "
                "four HERMES CCDs of 4096 pixels end to end"
            )
        if labels.ndim != 2 or labels.shape[1] != len(GALAH4_COLUMNS):
            raise DataError(
                f"{self.root / 'labels.npy'} has shape {labels.shape}; the galah4 layout is (N, {len(GALAH4_COLUMNS)}) "
                f"with columns {list(GALAH4_COLUMNS)}"
            )
        if labels.shape[0] != spectra.shape[0]:
            raise DataError(
                f"{self.root / 'spectra.npy'} has {spectra.shape[0]} rows but {self.root / 'labels.npy'} has "
                f"{labels.shape[0]}: the two files must come from the same download; fetch them again with "
                f"`{self.download_command}`"
            )
        if not (np.issubdtype(spectra.dtype, np.number) and np.issubdtype(labels.dtype, np.number)):
            raise DataError(f"galah4 arrays must be numeric; got {spectra.dtype} and {labels.dtype} in {self.root}")
        return spectra, labels

    def load_arrays(self) -> SpectraArrays:
        spectra, labels_file = self._open()
        n = spectra.shape[0]
        self._check_labels(GALAH4_COLUMNS, f"{self.root / 'labels.npy'} (columns {list(GALAH4_COLUMNS)})")
        table = np.asarray(labels_file, dtype=np.float32)
        snr = table[:, GALAH4_COLUMNS.index("SNR")]

        keep = np.ones(n, dtype=bool)
        if self.snr_min is not None:
            keep = snr >= self.snr_min  # NaN SNR fails: it cannot be shown to pass
            log.info("galah4 SNR cut (SNR >= %g): removed %d of %d rows", self.snr_min, int((~keep).sum()), n)
            finite = snr[np.isfinite(snr)]
            span = f"{finite.min():.3g}..{finite.max():.3g}" if finite.size else "all NaN"
            _require_rows(keep, f"SNR cut (SNR >= {self.snr_min:g}): the SNR column spans {span}",
                          "lower data.snr_min or set it to null")
        rows = np.flatnonzero(keep)

        columns = [canonical_label(c) for c in GALAH4_COLUMNS]
        labels = table[rows][:, [columns.index(name) for name in self.label_names]]
        flux = np.empty((len(rows), spectra.shape[1]), dtype=np.float32)
        contiguous = len(rows) == n
        for start in range(0, len(rows), CHUNK_ROWS):
            stop = min(start + CHUNK_ROWS, len(rows))
            block = spectra[start:stop] if contiguous else spectra[rows[start:stop]]
            flux[start:stop] = transform_flux(block, self.flux_transform, self.flux_floor)
        self._warn_if_not_normalised(spectra)
        weight = np.broadcast_to(np.float32(1.0), flux.shape)  # no uncertainties in galah4: finite pixels count alike
        log.info(
            "galah4: %d spectra x %d pixels from %s (flux_transform=%s); no star ids in galah4: each row is its own star",
            len(rows), spectra.shape[1], self.root, self.flux_transform,
        )
        # galah4 ships no wavelengths: the nominal HERMES grid (4 x 4096, air), the one data=synthetic_galah uses
        return self._finish(flux, weight, labels, rows.astype(np.int64), galah_wavelength(), snr[rows], "galah4")

    def _warn_if_not_normalised(self, spectra: np.ndarray) -> None:
        """Bad pixels become flux 1 (the continuum): say so when the flux does not look normalised."""
        sample = np.asarray(spectra[: min(len(spectra), 32)], dtype=np.float64)
        sample = sample[np.isfinite(sample)]
        median = float(np.median(sample)) if sample.size else 1.0
        if not 0.3 <= median <= 3.0:
            log.warning(
                "galah4 flux median is %.4g, not ~1: the spectra may not be continuum-normalised, and masked "
                "pixels are filled with 1", median,
            )

    def preprocessing_config(self) -> dict:
        return {**super().preprocessing_config(), "n_pixels": GALAH4_PIXELS}


# ------------------------------------------------------------------------------------------------
# Official release: allstar catalogue + {sobject_id}{ccd}.fits
# ------------------------------------------------------------------------------------------------


class _Catalogue:
    """The allstar table, memory-mapped; columns by name (case-insensitive), read one at a time."""

    def __init__(self, path: Path, hdu: int | str):
        from astropy.io import fits

        self.path = path
        if not path.is_file():
            raise DataError(
                f"GALAH catalogue {path} not found; download {path.name} from {DR4_CATALOGUE_URL} into "
                f"{path.parent} (or set data.root / data.catalogue)"
            )
        try:
            self._hdul = fits.open(path, memmap=True)
            self._table = self._hdul[hdu]
            self.names = list(self._table.columns.names)
            self.n_rows = int(self._table.header["NAXIS2"])
        except Exception as err:  # astropy raises many kinds for a damaged file
            raise DataError(f"cannot read the GALAH catalogue {path} (HDU {hdu}): {err}; download it again") from err
        self._by_lower = {n.lower(): n for n in self.names}

    def close(self) -> None:
        self._hdul.close()

    def has(self, name: str) -> bool:
        return str(name).lower() in self._by_lower

    def column(self, name: str, option: str) -> np.ndarray:
        actual = self._by_lower.get(str(name).lower())
        if actual is None:
            raise DataError(
                f"column '{name}' ({option}) is not in {self.path}; it has {len(self.names)} columns: {self.names}"
            )
        values = np.asarray(self._table.data[actual])
        if values.ndim != 1:
            raise DataError(f"column '{actual}' of {self.path} ({option}) has shape {values.shape}; a scalar per row is needed")
        return values

    def numeric(self, name: str, option: str) -> np.ndarray:
        values = self.column(name, option)
        if not np.issubdtype(values.dtype, np.number):
            raise DataError(f"column '{name}' of {self.path} ({option}) is {values.dtype}, not numeric")
        return values.astype(np.float64)

    def numeric_names(self) -> list[str]:
        """Columns with one number per row (FITS formats B, I, J, K, E, D with a repeat count of 1)."""
        out = []
        for col in self._table.columns:
            match = re.fullmatch(r"(\d*)([A-Z])(.*)", str(col.format).upper())
            if match and match.group(2) in "BIJKED" and int(match.group(1) or 1) == 1:
                out.append(col.name)
        return out


def _linear_wavelength(header, fallback, n: int, path: Path, what: str) -> np.ndarray:
    """lambda_i = CRVAL1 + (i + 1 - CRPIX1) * CDELT1 (FITS convention, i from 0)."""
    def key(*names):
        for h in (header, fallback):
            for k in names:
                if h is not None and k in h:
                    return float(h[k])
        return None

    crval, cdelt = key("CRVAL1"), key("CDELT1", "CD1_1")
    crpix = key("CRPIX1")
    if crval is None or cdelt is None:
        raise DataError(f"{path} ({what}) has no CRVAL1/CDELT1 header keywords: not a GALAH spectrum file")
    if not cdelt > 0:
        raise DataError(f"{path} ({what}) has CDELT1 = {cdelt}; wavelengths must increase")
    crpix = 1.0 if crpix in (None, 0.0) else crpix  # GALAH DR3 files can carry CRPIX1 = 0 meaning 1
    return crval + (np.arange(n, dtype=np.float64) + 1.0 - crpix) * cdelt


def _hdu(hdul, which: int | str, path: Path, option: str):
    try:
        return hdul[which]
    except (KeyError, IndexError):
        names = [h.name for h in hdul]
        raise DataError(f"{path} has no extension {which!r} ({option}); its extensions are {names}") from None


class GALAHDR4DataModule(_GALAHDataModule):
    """`data=galah_dr4`: the GALAH DR4 (or DR3) allstar catalogue plus one FITS file per star and CCD.

    Cuts on the catalogue (`flag_sp`, SNR), then per star the normalised flux of each CCD, shifted to the
    rest frame with the file's radial velocity (`rv_keyword`) and either resampled onto fixed arm grids
    (`grid=resample`, default: the grid of `data=synthetic_galah`) or concatenated pixel for pixel
    (`grid=concat`, like galah4). The result is cached by everything that shapes it. The split unit is
    the star (`star_id_column`, Gaia DR3 source id), so repeat observations never straddle the split.
    """

    layout = "galah_dr4"

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
            "layout": self.layout,
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

    def _select_rows(self, cat: _Catalogue) -> tuple[np.ndarray, np.ndarray, dict]:
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
            _require_rows(keep, f"flag_sp cut ({self.flag_sp_column} <= {self.flag_sp_max})",
                          "raise data.flag_sp_max or set it to null")
        if self.snr_min is not None:
            snr = cat.numeric(self.snr_column, "data.snr_column")
            passed = snr >= self.snr_min  # NaN fails
            removed["snr"] = int((keep & ~passed).sum())
            before = int(keep.sum())
            keep &= passed
            log.info("GALAH SNR cut (%s >= %g): removed %d of %d rows", self.snr_column, self.snr_min, removed["snr"], before)
            _require_rows(keep, f"SNR cut ({self.snr_column} >= {self.snr_min:g})", "lower data.snr_min or set it to null")
        rows = np.flatnonzero(keep)
        if self.max_spectra is not None and len(rows) > self.max_spectra:
            rng = np.random.default_rng(self.subset_seed)
            rows = np.sort(rng.choice(rows, self.max_spectra, replace=False))
            removed["max_spectra"] = int(keep.sum()) - len(rows)
            log.info("GALAH data.max_spectra=%d: kept a random subset (seed %d) of %d rows",
                     self.max_spectra, self.subset_seed, int(keep.sum()))
        return rows, ids[rows], removed

    def _read_ccd(self, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, float | None]:
        """Observed wavelengths, normalised flux, its sigma (NaN where unknown) and the header RV of one file."""
        from astropy.io import fits

        try:
            with warnings.catch_warnings():
                # astropy only warns about a truncated file and hands back the HDUs it could read
                warnings.filterwarnings("error", message=".*truncated.*")
                hdul = fits.open(path, memmap=False, lazy_load_hdus=False)
            with hdul:
                primary = hdul[0].header
                fhdu = _hdu(hdul, self.flux_hdu, path, "data.flux_hdu")
                flux = np.asarray(fhdu.data, dtype=np.float64)
                if flux.ndim != 1 or flux.size < 2:
                    raise DataError(f"{path}: extension {self.flux_hdu!r} holds shape {flux.shape}; a 1-D spectrum is needed")
                wl = _linear_wavelength(fhdu.header, primary, flux.size, path, f"extension {self.flux_hdu!r}")
                sigma = np.full(flux.size, np.nan)
                if self.error_hdu is not None:
                    ehdu = _hdu(hdul, self.error_hdu, path, "data.error_hdu")
                    rel = np.asarray(ehdu.data, dtype=np.float64)
                    if rel.ndim != 1:
                        raise DataError(f"{path}: extension {self.error_hdu!r} holds shape {rel.shape}; a 1-D array is needed")
                    if rel.size != flux.size:  # e.g. DR3's normalised CCD4 is shorter: match by wavelength
                        wl_err = _linear_wavelength(ehdu.header, primary, rel.size, path, f"extension {self.error_hdu!r}")
                        rel = np.interp(wl, wl_err, rel, left=np.nan, right=np.nan)
                    with np.errstate(invalid="ignore"):
                        sigma = np.where(rel > 0, rel * np.abs(flux), np.nan)  # relative error x flux (DR4 data model)
                value = primary.get(self.rv_keyword) if self.rv_keyword else None
                rv = None if value is None else float(value)
        except DataError:
            raise
        except Exception as err:  # truncated or foreign files raise OSError, ValueError, TypeError, ...
            raise DataError(f"cannot read {path}: {err}; it may be truncated: delete it and download it again") from err
        return wl, flux, sigma, rv

    def _build(self, cache) -> None:
        cat = _Catalogue(self.catalogue, self.catalogue_hdu)
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
            for j, ccd in enumerate(self.ccds):  # native length of each CCD, from its first file
                first = int(np.flatnonzero(present[:, j])[0]) if present[:, j].any() else None
                if first is None:
                    raise DataError(f"no selected star has a CCD{ccd} file; drop it with data.ccds (e.g. without {ccd})")
                lengths.append(self._read_ccd(paths[first][j])[1].size)
            wavelength = None
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        n, p = len(rows), int(offsets[-1])
        wl_sum = np.zeros(p)
        wl_count = np.zeros(p)
        no_rv = 0
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
                    has_rv = self._read_star(paths[i], present[i], lengths, offsets,
                                             flux[i - start], sigma[i - start], wl_sum, wl_count)
                    if not has_rv:
                        ok[i - start] = False
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
            w.meta["removed"] = removed
        if no_rv:
            log.warning("GALAH: %d stars have a non-finite %s and are left out", no_rv, self.rv_keyword)
        log.info("GALAH: cached %d spectra x %d pixels in %s", n - no_rv, p, cache.path)

    def _weight(self, flux: np.ndarray, sigma: np.ndarray) -> np.ndarray:
        """Inverse variance 1/sigma^2; 0 where flux or sigma is unusable. Without an error extension: 1 per finite pixel."""
        finite = np.isfinite(flux)
        if self.error_hdu is None:
            return finite.astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            ivar = 1.0 / sigma.astype(np.float64) ** 2
        return np.where(finite & np.isfinite(ivar) & (sigma > 0), ivar, 0.0).astype(np.float32)

    def _read_star(self, paths, present, lengths, offsets, flux_row, sigma_row, wl_sum, wl_count) -> bool:
        """Fill one star's row (NaN where no data); False when its radial velocity is not finite."""
        parts = []
        rv = None
        for j, path in enumerate(paths):
            if present[j]:
                wl, flux, sigma, rv_file = self._read_ccd(path)
                parts.append((j, path, wl, flux, sigma))
                rv = rv_file if rv is None else rv
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

        cat = _Catalogue(self.catalogue, self.catalogue_hdu)
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
        finally:
            cat.close()

        index = np.flatnonzero(ok)
        flux = np.empty((len(index), arrays["flux"].shape[1]), dtype=np.float32)
        for start in range(0, len(index), CHUNK_ROWS):
            block = arrays["flux"][index[start : start + CHUNK_ROWS]]
            flux[start : start + len(block)] = transform_flux(block, self.flux_transform, self.flux_floor)
        weight = np.asarray(arrays["weight"])[index] if len(index) < len(ok) else arrays["weight"]
        return self._finish(flux, weight, labels, star_id, np.asarray(arrays["wavelength"]), snr, "GALAH")

    def _star_ids(self, cat: _Catalogue, rows: np.ndarray) -> np.ndarray:
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


__all__ = ["GALAH4DataModule", "GALAHDR4DataModule", "canonical_label", "transform_flux", "hermes_grid", "GALAH4_COLUMNS"]
