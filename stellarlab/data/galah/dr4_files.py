"""GALAH DR4 files: the allstar catalogue, and one spectrum file per star and CCD (`{sobject_id}{ccd}.fits`).

The catalogue is a FITS table read column by column (memory-mapped); a spectrum file holds the
normalised flux and its relative error in named extensions, with a linear observed-frame wavelength
(CRVAL1, CDELT1, CRPIX1) and the radial velocity in its primary header. numpy and astropy only.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np

from stellarlab.errors import DataError

DR4_CATALOGUE_URL = "https://cloud.datacentral.org.au/teamdata/GALAH/public/GALAH_DR4/catalogs/"
DR4_SPECTRA_HOWTO = (
    "the DR4 spectra come from Data Central's bulk download (https://datacentral.org.au/services/download/: "
    "a list of sobject_id, 'HERMES 1D spectra'), unpacked so that files are named {sobject_id}{ccd}.fits"
)


class Catalogue:
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


def linear_wavelength(header, fallback, n: int, path: Path, what: str) -> np.ndarray:
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


def find_hdu(hdul, which: int | str, path: Path, option: str):
    try:
        return hdul[which]
    except (KeyError, IndexError):
        names = [h.name for h in hdul]
        raise DataError(f"{path} has no extension {which!r} ({option}); its extensions are {names}") from None


def read_ccd(path: Path, flux_hdu: int | str, error_hdu: int | str | None,
             rv_keyword: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, float | None]:
    """Observed wavelengths, normalised flux, its sigma (NaN where unknown) and the header RV of one CCD file.

    `error_hdu` holds the relative error (DR4 data model): sigma = it x |flux|; None: sigma is NaN."""
    from astropy.io import fits

    try:
        with warnings.catch_warnings():
            # astropy only warns about a truncated file and hands back the HDUs it could read
            warnings.filterwarnings("error", message=".*truncated.*")
            hdul = fits.open(path, memmap=False, lazy_load_hdus=False)
        with hdul:
            primary = hdul[0].header
            fhdu = find_hdu(hdul, flux_hdu, path, "data.flux_hdu")
            flux = np.asarray(fhdu.data, dtype=np.float64)
            if flux.ndim != 1 or flux.size < 2:
                raise DataError(f"{path}: extension {flux_hdu!r} holds shape {flux.shape}; a 1-D spectrum is needed")
            wl = linear_wavelength(fhdu.header, primary, flux.size, path, f"extension {flux_hdu!r}")
            sigma = np.full(flux.size, np.nan)
            if error_hdu is not None:
                ehdu = find_hdu(hdul, error_hdu, path, "data.error_hdu")
                rel = np.asarray(ehdu.data, dtype=np.float64)
                if rel.ndim != 1:
                    raise DataError(f"{path}: extension {error_hdu!r} holds shape {rel.shape}; a 1-D array is needed")
                if rel.size != flux.size:  # e.g. DR3's normalised CCD4 is shorter: match by wavelength
                    wl_err = linear_wavelength(ehdu.header, primary, rel.size, path, f"extension {error_hdu!r}")
                    rel = np.interp(wl, wl_err, rel, left=np.nan, right=np.nan)
                with np.errstate(invalid="ignore"):
                    sigma = np.where(rel > 0, rel * np.abs(flux), np.nan)  # relative error x flux (DR4 data model)
            value = primary.get(rv_keyword) if rv_keyword else None
            rv = None if value is None else float(value)
    except DataError:
        raise
    except Exception as err:  # truncated or foreign files raise OSError, ValueError, TypeError, ...
        raise DataError(f"cannot read {path}: {err}; it may be truncated: delete it and download it again") from err
    return wl, flux, sigma, rv
