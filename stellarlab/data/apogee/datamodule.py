"""`data=apogee`: APOGEE DR17 spectra and ASPCAP labels from local files, preprocessed once into a cache.

`prepare_data` reads the allStar catalogue, applies the configured cuts (logging what each removed),
reads one aspcapStar or apStar file per star in parallel and streams flux, weights, labels and ids
into a float32 cache folder named by the config (`stellarlab.data.cache.ArrayCache`). Later runs
memory-map the cache; any change to the preprocessing settings builds a new one. The split, label
scaling and bad-pixel handling are the base DataModule's; stars are split by APOGEE_ID.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np

from stellarlab.data.apogee.catalog import (
    DEFAULT_PIXMASK_BITS,
    DOWNLOAD_COMMAND,
    IDENTITY_COLUMNS,
    PIXMASK_BITS,
    QUALITY_COLUMNS,
    SOURCES,
    apply_cuts,
    bit_value,
    find_column,
    label_array,
    missing_values,
    read_catalog,
    resolved_cuts,
    spectrum_relpaths,
)
from stellarlab.data.apogee.files import PixelConfig, load_chunk
from stellarlab.data.base import SpectraArrays, SpectraDataModule
from stellarlab.data.cache import ArrayCache
from stellarlab.data.flux import parallel_results, usable_cores
from stellarlab.errors import ConfigError, DataError
from stellarlab.grids import apogee_wavelength

log = logging.getLogger(__name__)

CONTINUUM_DEFAULTS = {"degree": 3, "iterations": 5, "clip_low": 2.0, "clip_high": 3.0}
PARALLEL = ("process", "thread")


def _plain(value):
    """OmegaConf containers (what Hydra passes) to plain dicts/lists, so they hash and pickle."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with hydra
        pass
    return value


class APOGEEDataModule(SpectraDataModule):
    """APOGEE DR17: allStar labels plus one aspcapStar/apStar spectrum per star, cached as float32 arrays."""

    #: Its entry in `stellarlab.data.surveys` (download recipe, predict.py readers); subclasses inherit it.
    survey_name: ClassVar[str] = "apogee"
    star_id_name: ClassVar[str] = "APOGEE_ID"  # a star is the same star in any selection of the survey

    def __init__(
        self,
        catalog: str,
        spectra_dir: str,
        source: str = "aspcapStar",
        cuts: Mapping | None = None,
        pixmask_bits: Sequence[int | str] = DEFAULT_PIXMASK_BITS,
        max_flux_error: float = 1.0,
        gap_deleted: bool = False,
        continuum: Mapping | None = None,
        strict: bool = False,
        workers: int | None = None,
        parallel: str = "process",
        chunk_size: int = 32,
        progress: bool = True,
        cache_dir: str | None = None,
        rebuild: bool = False,
        labels: Sequence[str] = ("teff", "logg", "fe_h"),
        **kwargs,
    ):
        labels = [str(n).lower() for n in _plain(labels) or ()]  # catalogue columns, matched case-insensitively
        super().__init__(labels=labels, **kwargs)
        if source not in SOURCES:
            raise ConfigError(f"data.source={source!r} is unknown; valid sources: {', '.join(SOURCES)}")
        if parallel not in PARALLEL:
            raise ConfigError(f"data.parallel={parallel!r} is unknown; valid: {', '.join(PARALLEL)}")
        if workers is not None and int(workers) < 1:
            raise ConfigError(f"data.workers must be >= 1 or null (all cores), got {workers}")
        if int(chunk_size) < 1:
            raise ConfigError(f"data.chunk_size must be >= 1, got {chunk_size}")
        if not float(max_flux_error) > 0:
            raise ConfigError(f"data.max_flux_error must be > 0, got {max_flux_error}")
        continuum = {**CONTINUUM_DEFAULTS, **dict(_plain(continuum) or {})}
        unknown = sorted(set(continuum) - set(CONTINUUM_DEFAULTS))
        if unknown:
            raise ConfigError(f"data.continuum: unknown key(s) {unknown}; valid keys: {', '.join(CONTINUUM_DEFAULTS)}")
        if not 0 <= int(continuum["degree"]) <= 10 or int(continuum["iterations"]) < 0:
            raise ConfigError(f"data.continuum: degree must be 0-10 and iterations >= 0, got {continuum}")
        if cache_dir is None:
            raise ConfigError("data.cache_dir is not set; point it at a folder for the preprocessed cache")

        self.catalog = Path(catalog).expanduser()
        self.spectra_dir = Path(spectra_dir).expanduser()
        self.source = source
        self.cuts = resolved_cuts(_plain(cuts))  # ConfigError now, not after reading a 4 GB file
        self.pixmask_bits = [b for b in (_plain(pixmask_bits) or [])]
        self.pixel_config = PixelConfig(
            source=source,
            pixmask=bit_value(self.pixmask_bits, PIXMASK_BITS, "data.pixmask_bits"),
            max_flux_error=float(max_flux_error),
            gap_deleted=bool(gap_deleted),
            continuum_degree=int(continuum["degree"]),
            continuum_iterations=int(continuum["iterations"]),
            clip_low=float(continuum["clip_low"]),
            clip_high=float(continuum["clip_high"]),
        )
        self.strict = bool(strict)
        self.workers = int(workers) if workers is not None else usable_cores()
        self.parallel = parallel
        self.chunk_size = int(chunk_size)
        self.progress = bool(progress)
        self.rebuild = bool(rebuild)
        self._rebuilt = False
        self.cache = ArrayCache(Path(cache_dir).expanduser(), f"apogee-{source}", self.cache_config())
        self.build_report: dict = {}

    # -- the cache ------------------------------------------------------------------------------
    def cache_config(self) -> dict:
        """Everything that changes the cached arrays (not the split, batch size or model): the cache key."""
        pc = self.pixel_config
        config = {
            "catalog": str(self.catalog.resolve()),
            "spectra_dir": str(self.spectra_dir.resolve()),
            "source": self.source,
            "labels": list(self.label_names),
            "cuts": self.cuts,
            "pixmask": pc.pixmask,
            "max_flux_error": pc.max_flux_error,
            "gap_deleted": pc.gap_deleted,
            "strict": self.strict,
        }
        if self.source == "apStar":
            config["continuum"] = {"degree": pc.continuum_degree, "iterations": pc.continuum_iterations,
                                   "clip_low": pc.clip_low, "clip_high": pc.clip_high}
        return config

    def _catalog_stamp(self) -> dict | None:
        """Size and modification time of the catalogue: a re-downloaded or edited catalogue rebuilds the cache."""
        try:
            st = self.catalog.stat()
        except OSError:
            return None
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}

    def _cache_is_current(self) -> bool:
        if not self.cache.exists():
            return False
        stamp = self._catalog_stamp()
        built_from = self.cache.meta.get("catalog_stamp")
        if stamp is not None and built_from is not None and stamp != built_from:
            log.info("the catalogue %s changed since the cache %s was built: rebuilding", self.catalog, self.cache.path)
            return False
        return True

    def prepare_data(self) -> None:
        """Build the cache unless a current one exists (data.rebuild=true forces a new build, once per run)."""
        if self.rebuild and not self._rebuilt:
            self.cache.remove()
            self._rebuilt = True
        if self._cache_is_current():
            log.info("using the APOGEE cache %s", self.cache.path)
            return
        self.cache.remove()
        self._build()

    def load_arrays(self) -> SpectraArrays:
        if not self._cache_is_current():
            self.prepare_data()
        a = self.cache.load()
        return SpectraArrays(
            flux=a["flux"],
            weight=a["weight"],
            labels=a["labels"],
            label_names=list(self.label_names),
            star_id=a["apogee_id"],
            wavelength=a["wavelength"],
            extra={"snr": a["snr"]},
            ids=self._ids(np.asarray(a["apogee_id"]), np.asarray(a["file"])),
        )

    @staticmethod
    def _ids(apogee_id: np.ndarray, relpaths: np.ndarray) -> dict[str, np.ndarray]:
        """allStar's identity columns of each row, from its file's place in the SAS layout (TELESCOPE/FIELD/FILE)."""
        parts = np.char.partition(relpaths.astype(str), "/")
        telescope, rest = parts[:, 0], parts[:, 2]
        parts = np.char.partition(rest, "/")
        return {"APOGEE_ID": apogee_id.astype(str), "TELESCOPE": telescope, "FIELD": parts[:, 0], "FILE": parts[:, 2]}

    # -- building it ----------------------------------------------------------------------------
    def _select(self):
        """Catalogue rows that pass the cuts and have a spectrum file: (table, relative paths, report)."""
        if not self.catalog.is_file():
            read_catalog(self.catalog)  # raises the "not found, download it with ..." error
        if not self.spectra_dir.is_dir():
            raise DataError(
                f"APOGEE spectra folder not found: {self.spectra_dir} (expected {{TELESCOPE}}/{{FIELD}}/{self.source}-... "
                f"files inside). Download them with `{DOWNLOAD_COMMAND} data.source={self.source}` (plus this run's "
                "data.* overrides, e.g. data.cuts.preset=rgb) or point data.spectra_dir at your copy"
            )
        label_cols = [n.upper() for n in self.label_names]
        table = read_catalog(self.catalog, [*IDENTITY_COLUMNS, *QUALITY_COLUMNS, *label_cols, *self.cuts["ranges"]])
        absent = [c for c in [*label_cols, *self.cuts["ranges"]] if c not in table.colnames]
        if absent:
            raise DataError(
                f"the catalogue {self.catalog} has no column(s) {absent}, asked for by data.labels or data.cuts.ranges "
                "(names are catalogue columns, case-insensitive, e.g. teff, logg, fe_h, m_h, alpha_m, mg_fe)"
            )
        for col in ("APOGEE_ID", "TELESCOPE", "FIELD"):
            find_column(table, col, "the star ids and spectrum file names")
        n_catalog = len(table)
        table, removed = apply_cuts(table, self.cuts, labels=label_cols)

        relpaths = spectrum_relpaths(table, self.source)
        exists = np.fromiter(((self.spectra_dir / p).is_file() for p in relpaths), dtype=bool, count=len(relpaths))
        missing = [p for p, ok in zip(relpaths, exists) if not ok]
        if missing:
            examples = ", ".join(str(self.spectra_dir / p) for p in missing[:3])
            message = (
                f"{len(missing)} of {len(relpaths)} selected stars have no {self.source} file under {self.spectra_dir} "
                f"(e.g. {examples})"
            )
            if self.strict or len(missing) == len(relpaths):
                skip_hint = ", or set data.strict=false to skip stars without a file" if len(missing) < len(relpaths) else ""
                raise DataError(f"{message}. Download them with `{DOWNLOAD_COMMAND} data.source={self.source}`{skip_hint}")
            log.warning("%s: skipped (data.strict=true makes this an error)", message)
            table = table[exists]
            relpaths = [p for p, ok in zip(relpaths, exists) if ok]
        removed.append((f"{self.source} file missing", len(missing)))
        report = {"catalog_rows": n_catalog, "cuts": removed, "n_stars": len(table), "missing_examples": missing[:20]}
        return table, relpaths, report

    def _build(self) -> None:
        start = time.perf_counter()
        table, relpaths, report = self._select()
        n = len(table)
        label_cols = [n_.upper() for n_ in self.label_names]
        labels = label_array(table, label_cols)
        ids = np.asarray(table[find_column(table, "APOGEE_ID")]).astype(str)
        try:
            snr = np.asarray(table[find_column(table, "SNR")], dtype=np.float32)
            snr = np.where(missing_values(snr), np.nan, snr).astype(np.float32)
        except DataError:
            snr = np.full(n, np.nan, dtype=np.float32)
        wavelength = apogee_wavelength(self.pixel_config.gap_deleted)
        p = wavelength.size
        specs = {
            "flux": ((n, p), np.float32),
            "weight": ((n, p), np.float32),
            "labels": ((n, len(label_cols)), np.float32),
            "apogee_id": ((n,), ids.dtype),
            "snr": ((n,), np.float32),
            "file": ((n,), np.asarray(relpaths).dtype),
            "wavelength": ((p,), np.float64),
        }
        meta = {"label_names": list(self.label_names), "label_columns": label_cols, "catalog_stamp": self._catalog_stamp(),
                "report": report}
        log.info("preprocessing %d %s files from %s into %s", n, self.source, self.spectra_dir, self.cache.path)
        with self.cache.writer(specs, meta) as w:
            w["labels"][:] = labels
            w["apogee_id"][:] = ids
            w["snr"][:] = snr
            w["file"][:] = np.asarray(relpaths)
            w["wavelength"][:] = wavelength
            read_seconds = self._read_spectra(relpaths, w)
            w.meta["read_seconds"] = read_seconds
            w.meta["files_per_second"] = n / read_seconds if read_seconds > 0 else None
        log.info(
            "APOGEE cache ready: %d stars x %d pixels, %s; read %d files in %.1f s (%.0f files/s, %d %s workers)",
            n, p, self.cache.path, n, read_seconds, n / max(read_seconds, 1e-9), self.workers, self.parallel,
        )
        self.build_report = {**report, "read_seconds": read_seconds, "total_seconds": time.perf_counter() - start}

    def preprocessing_config(self) -> dict:
        """The pixel settings (bit mask, error cut, continuum fit, gap deletion), saved in every checkpoint:
        predict.py reads new aspcapStar/apStar files with exactly these."""
        return {**super().preprocessing_config(), "gap_deleted": self.pixel_config.gap_deleted,
                "pixels": dataclasses.asdict(self.pixel_config)}

    def _read_spectra(self, relpaths: list[str], writer) -> float:
        """Read every file (in parallel, a bounded number of chunks in flight) straight into the cache files."""
        from tqdm.auto import tqdm

        paths = [str(self.spectra_dir / p) for p in relpaths]
        tasks = ((i, paths[i : i + self.chunk_size], self.pixel_config) for i in range(0, len(paths), self.chunk_size))
        flux_file, weight_file = writer["flux"], writer["weight"]

        bad: list[tuple[int, str]] = []

        def store(result) -> int:
            first, flux, weight, failed = result
            flux_file[first : first + len(flux)] = flux
            weight_file[first : first + len(flux)] = weight
            bad.extend(failed)
            return len(flux)

        start = time.perf_counter()
        with tqdm(total=len(paths), desc=f"reading {self.source} files", unit="file", disable=not self.progress,
                  mininterval=0.5, dynamic_ncols=True) as bar:
            with contextlib.closing(parallel_results(load_chunk, tasks, self.workers, self.parallel)) as results:
                for result in results:  # closing(): a failure in store() stops the readers now, not at exit
                    bar.update(store(result))
        if bad:
            bad.sort()
            if self.strict:
                raise DataError(
                    f"{len(bad)} of {len(paths)} {self.source} files cannot be read (data.strict=true); download them "
                    f"again (python -m stellarlab.download data=apogee) or set data.strict=false to skip them: "
                    + "; ".join(message for _, message in bad)
                )
            log.warning("skipped %d of %d %s files that cannot be read (their stars are left out; data.strict=true makes "
                        "this an error):\n  %s", len(bad), len(paths), self.source, "\n  ".join(m for _, m in bad))
        writer.meta["unreadable_files"] = [{"row": row, "file": relpaths[row], "error": message} for row, message in bad]
        return time.perf_counter() - start
