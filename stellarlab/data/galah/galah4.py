"""`data=galah`: the `simbaswe/galah4` arrays (`spectra.npy`, `labels.npy`), memory-mapped.

Only the rows that pass the cuts are read. `python -m stellarlab.download data=galah` fetches the files
(`stellarlab.data.galah.download`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import ClassVar

import numpy as np

from stellarlab.data.base import SpectraArrays
from stellarlab.data.flux import transform_flux
from stellarlab.data.galah.common import CHUNK_ROWS, GALAHDataModuleBase, canonical_label, require_rows
from stellarlab.errors import ConfigError, DataError
from stellarlab.grids import GALAH_ARMS, GALAH_NPIX_PER_ARM, galah_wavelength

log = logging.getLogger(__name__)

#: Column order of galah4's `labels.npy` (docs/data-formats.md): mass, age, bolometric luminosity, distance,
#: Teff, log g, [Fe/H], SNR.
GALAH4_COLUMNS = ("mass", "age", "l_bol", "dist", "t_eff", "log_g", "fe_h", "SNR")
GALAH4_PIXELS = len(GALAH_ARMS) * GALAH_NPIX_PER_ARM  # 16384: four HERMES CCDs of 4096 pixels, end to end
GALAH4_DOWNLOAD = "python -m stellarlab.download data=galah"


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


class GALAH4DataModule(GALAHDataModuleBase):
    """`data=galah`: the `simbaswe/galah4` arrays, memory-mapped; labels by name, an SNR cut, optional log flux.

    galah4 has no star identifier and no per-pixel uncertainties: every row is its own star (the split
    unit is the row, identified by its index in the files), and every finite pixel gets weight 1.
    """

    survey_name: ClassVar[str] = "galah4"
    star_id_name: ClassVar[str] = "galah4_row"  # the row of the galah4 files: the same spectrum in any selection
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
            require_rows(keep, f"SNR cut (SNR >= {self.snr_min:g}): the SNR column spans {span}",
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
        return self._finish(flux, weight, labels, rows.astype(np.int64), galah_wavelength(), snr[rows], "galah4",
                            ids={"galah4_row": rows.astype(np.int64)})

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
