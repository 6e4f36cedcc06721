"""`data=synthetic_apogee` / `data=synthetic_galah`: the built-in survey, so everything runs with no download.

`normalization` says how the model sees the flux. `true_continuum` (default): the generator's own
continuum-normalised flux, continuum exactly 1. `pseudo_continuum` (APOGEE grid): each noisy spectrum goes
through the apStar reader's own pixel step (`stellarlab.data.apogee.files.spectrum_arrays`: per-chip
Chebyshev fit with line clipping, flux and error divided by it), so training sees the biases real apStar
files get (line blanketing pulls the fitted continuum below 1) and predict.py reads apStar files with the
same fit. The normalised arrays are cached inside the survey's cache folder, under a key of their settings.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar

import numpy as np

from stellarlab.checks import Choice, Number, Rule, _is_number, _show, check_number, with_defaults
from stellarlab.data.apogee.files import PixelConfig, spectrum_arrays
from stellarlab.data.base import SpectraArrays, SpectraDataModule
from stellarlab.data.cache import ArrayCache
from stellarlab.data.split import PlannedSize
from stellarlab.errors import ConfigError
from stellarlab.grids import APOGEE_NPIX, apogee_chip_mask
from stellarlab.synthetic import LABEL_NAMES

log = logging.getLogger(__name__)

NORMALIZATIONS = ("true_continuum", "pseudo_continuum")
#: data.continuum keys (as in data=apogee) -> the PixelConfig fields of the apStar fit
CONTINUUM_FIELDS = {"degree": "continuum_degree", "iterations": "continuum_iterations", "clip_low": "clip_low",
                    "clip_high": "clip_high"}
CONTINUUM_DEFAULTS = {key: getattr(PixelConfig(), name) for key, name in CONTINUUM_FIELDS.items()}
NORMALISE_ROWS = 256  # spectra per block while the normalised cache is written


def _plain_snr(snr: Any) -> Any:
    """A range as a list (a tuple or an OmegaConf list from Hydra), a single value as it is."""
    return list(snr) if isinstance(snr, Sequence) and not isinstance(snr, str) else snr


class ContinuumFit(Rule):
    """`data.continuum`: null or a mapping of the apStar fit's settings (degree, iterations, clip_low, clip_high)."""

    def check(self, key: str, value: Any) -> None:
        if value is None:
            return
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}={_show(value)} is not valid: give a mapping such as "
                              f"{key}={{degree:3,iterations:5,clip_low:2.0,clip_high:3.0}}")
        unknown = sorted(str(k) for k in value if k not in CONTINUUM_DEFAULTS)
        if unknown:
            raise ConfigError(f"{key}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(CONTINUUM_DEFAULTS)}")
        if "degree" in value:
            check_number(f"{key}.degree", value["degree"], f"{key}.degree=3", minimum=0, maximum=10, integer=True)
        if "iterations" in value:
            check_number(f"{key}.iterations", value["iterations"], f"{key}.iterations=5", minimum=0, integer=True)
        for clip in ("clip_low", "clip_high"):
            if clip in value:
                check_number(f"{key}.{clip}", value[clip], f"{key}.{clip}={CONTINUUM_DEFAULTS[clip]}", above=0)


def pseudo_continuum_config(continuum: Mapping | None = None, gap_deleted: bool = False) -> PixelConfig:
    """The apStar reader's pixel settings for synthetic rows: its continuum fit, no bit mask (no mask exists)."""
    fit = {**CONTINUUM_DEFAULTS, **dict(continuum or {})}
    return PixelConfig(source="apStar", pixmask=0, gap_deleted=bool(gap_deleted),
                       **{CONTINUUM_FIELDS[k]: type(CONTINUUM_DEFAULTS[k])(v) for k, v in fit.items()})


def pseudo_continuum_rows(flux: np.ndarray, ivar: np.ndarray, config: PixelConfig) -> tuple[np.ndarray, np.ndarray]:
    """(flux, weight) float32 of synthetic rows (N, 8575 or the 7514 chip pixels) as the apStar reader makes
    them: each row is an apStar row with error 1/sqrt(ivar) (infinite where ivar is 0) through `spectrum_arrays`,
    so the flux is divided by the fitted continuum and the weight becomes ivar * continuum^2."""
    flux, ivar = np.atleast_2d(flux), np.atleast_2d(ivar)
    chips = None if flux.shape[1] == APOGEE_NPIX else apogee_chip_mask()
    out_flux = np.empty((len(flux), config.n_pixels), dtype=np.float32)
    out_weight = np.empty_like(out_flux)
    row_flux = np.ones(APOGEE_NPIX, dtype=np.float32)
    row_ivar = np.zeros(APOGEE_NPIX, dtype=np.float32)
    for i in range(len(flux)):
        if chips is None:
            row_flux[:], row_ivar[:] = flux[i], ivar[i]
        else:
            row_flux[chips], row_ivar[chips] = flux[i], ivar[i]
        with np.errstate(divide="ignore"):
            err = np.float32(1.0) / np.sqrt(row_ivar)
        out_flux[i], out_weight[i] = spectrum_arrays(row_flux, err, None, config)
    return out_flux, out_weight


class SyntheticDataModule(SpectraDataModule):
    """Spectra from `stellarlab.synthetic.make_survey`, generated once and cached on disk by their parameters."""

    survey_name: ClassVar[str] = "synthetic"  # its entry in stellarlab.data.surveys: nothing to download
    reads_every_label: ClassVar[bool] = True  # every generator label is in the survey: nuisance labels work

    def __init__(
        self,
        survey: Annotated[str, Choice("apogee", "galah")] = "apogee",
        n_stars: Annotated[int, Number(minimum=1, integer=True, example="data.n_stars=8000")] = 8000,
        snr: float | Sequence[float] = 100.0,  # checked in check_together: a number or a range
        spectra_per_star: Annotated[int, Number(minimum=1, integer=True, example="data.spectra_per_star=1")] = 1,
        gap_deleted: bool = False,
        seed: Annotated[int, Number(minimum=0, integer=True, example="data.seed=1")] = 1,
        normalization: Annotated[str, Choice(*NORMALIZATIONS)] = "true_continuum",
        continuum: Annotated[Mapping | None, ContinuumFit()] = None,
        cache_dir: str | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        snr = _plain_snr(snr)
        self.survey_params = dict(
            survey=str(survey),
            n_stars=int(n_stars),
            snr=tuple(float(s) for s in snr) if isinstance(snr, (list, tuple)) else float(snr),
            spectra_per_star=int(spectra_per_star),
            gap_deleted=bool(gap_deleted),
            seed=int(seed),
            cache_dir=cache_dir,
        )
        self.normalization = str(normalization)
        self.pixel_config = pseudo_continuum_config(continuum, gap_deleted) if self.normalization == "pseudo_continuum" else None
        self._survey = None
        self._normalised = None

    @property
    def fully_labelled(self) -> bool:
        """Every generator label is a label or a nuisance label: nothing else shapes the spectra."""
        return set(LABEL_NAMES) <= {*self.label_names, *self.nuisance_names}

    @classmethod
    def check_together(cls, values: Mapping[str, Any]) -> None:
        """The SNR (one value, or a range drawn from), the grid the gaps and the apStar fit belong to, the labels."""
        if "snr" in values:
            snr = _plain_snr(values["snr"])
            if isinstance(snr, (list, tuple)):
                if not (len(snr) == 2 and all(_is_number(s) and math.isfinite(s) and s > 0 for s in snr) and snr[0] <= snr[1]):
                    raise ConfigError(
                        f"data.snr={_show(snr)} is not valid: a range must be [low, high] with 0 < low <= high; "
                        "e.g. data.snr=[30,200]"
                    )
            else:
                check_number("data.snr", snr, "data.snr=100 or a range data.snr=[30,200]", above=0)
        given = with_defaults(cls, values)
        if given["gap_deleted"] and given["survey"] != "apogee":
            raise ConfigError("data.gap_deleted applies to the APOGEE grid only; set it false for survey=galah")
        if given["normalization"] == "pseudo_continuum" and given["survey"] != "apogee":
            raise ConfigError(
                "data.normalization=pseudo_continuum is the apStar per-chip continuum fit and applies to the APOGEE grid "
                "only; GALAH spectra come normalised by their pipeline: set data.normalization=true_continuum for survey=galah"
            )
        for key in ("labels", "nuisance_labels"):
            unknown = [n for n in given[key] if n not in LABEL_NAMES]
            if unknown:
                raise ConfigError(
                    f"data.{key}={_show(list(given[key]))}: the synthetic survey has no label {', '.join(unknown)}; "
                    f"its labels are {', '.join(LABEL_NAMES)}"
                )

    @classmethod
    def planned_size(cls, values: Mapping[str, Any]) -> PlannedSize:
        """The survey has exactly `n_stars` stars, `spectra_per_star` spectra each."""
        given = with_defaults(cls, values)
        return PlannedSize(int(given["n_stars"]), int(given["spectra_per_star"]), "data.n_stars")

    def synthetic_survey(self):
        """The `SyntheticSurvey` behind the data (generated, or read from its cache, once): the truth that
        `stellarlab.synthetic.crlb` pairs each spectrum with. Other DataModules have no such method."""
        if self._survey is None:
            from stellarlab.synthetic import (
                make_survey,  # heavy physics tables: import on first use
            )

            try:
                self._survey = make_survey(**self.survey_params)
                if self._survey.cache_path and not isinstance(self._survey.flux, np.memmap):
                    # just generated: read it back memory-mapped, as every later run does, so a large survey is
                    # streamed (data.in_memory=auto) and its generated copy freed
                    self._survey = make_survey(**self.survey_params)
            except ValueError as err:  # the generator validates its parameters
                raise ConfigError(f"synthetic survey: {err}") from err
        return self._survey

    def pixel_settings(self) -> dict | None:
        """The apStar reader's settings this data was normalised with (no bit mask: predict.py then applies the
        usual APOGEE_PIXMASK bits to real files); None for `true_continuum`."""
        if self.pixel_config is None:
            return None
        return {k: v for k, v in dataclasses.asdict(self.pixel_config).items() if k != "pixmask"}

    def normalised_cache(self) -> ArrayCache | None:
        """Where the pseudo-continuum-normalised arrays live: inside the survey's cache folder, keyed by the
        survey's key and the fit's settings (never the survey's own arrays). None without either."""
        survey = self.synthetic_survey()
        if self.pixel_config is None or survey.cache_path is None:
            return None
        config = {"survey": Path(survey.cache_path).name, "normalization": self.normalization, "pixels": self.pixel_settings()}
        return ArrayCache(survey.cache_path, self.normalization, config)

    def preprocessing_config(self) -> dict:
        p = self.survey_params
        config = {**super().preprocessing_config(), "survey": p["survey"], "gap_deleted": p["gap_deleted"],
                  "normalization": self.normalization}
        if self.pixel_config is not None:  # predict.py reads apStar files with exactly this fit
            config["pixels"] = self.pixel_settings()
        return config

    def prepare_data(self) -> None:
        self.synthetic_survey()
        if self.pixel_config is not None:
            self._pseudo_continuum()

    def _pseudo_continuum(self) -> tuple[np.ndarray, np.ndarray]:
        """(flux, weight) through the apStar fit: from the cache (memory-mapped), or computed and cached once."""
        if self._normalised is not None:
            return self._normalised
        survey = self.synthetic_survey()
        cache = self.normalised_cache()
        if cache is None:
            self._normalised = pseudo_continuum_rows(survey.flux, survey.ivar, self.pixel_config)
            return self._normalised
        if not cache.exists():
            n = len(survey)
            log.info("fitting the apStar pseudo-continuum to %d synthetic spectra (data.normalization=pseudo_continuum) "
                     "into %s", n, cache.path)
            start = time.perf_counter()
            shape = (n, self.pixel_config.n_pixels)
            with cache.writer({"flux": (shape, np.float32), "weight": (shape, np.float32)}) as writer:
                for a in range(0, n, NORMALISE_ROWS):
                    b = min(a + NORMALISE_ROWS, n)
                    flux, weight = pseudo_continuum_rows(survey.flux[a:b], survey.ivar[a:b], self.pixel_config)
                    writer["flux"][a:b] = flux
                    writer["weight"][a:b] = weight
                writer.meta["seconds"] = time.perf_counter() - start
            log.info("pseudo-continuum cache ready in %.1f s", time.perf_counter() - start)
        arrays = cache.load()
        self._normalised = (arrays["flux"], arrays["weight"])
        return self._normalised

    def load_arrays(self) -> SpectraArrays:
        s = self.synthetic_survey()
        flux, weight = self._pseudo_continuum() if self.pixel_config is not None else (s.flux, s.ivar)
        return SpectraArrays(
            flux=flux,
            weight=weight,
            labels=s.labels,
            label_names=list(s.label_names),
            star_id=s.star_id,
            wavelength=s.wavelength,
            extra={"snr": s.snr},
        )
