"""`data=synthetic_apogee` / `data=synthetic_galah`: the built-in survey, so everything runs with no download."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

from stellarlab.data.base import SpectraArrays, SpectraDataModule
from stellarlab.errors import ConfigError


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(key: str, value, minimum: int) -> int:
    """`value` as an int >= minimum, or a ConfigError naming the key (not int()'s ValueError)."""
    if not (_is_number(value) and math.isfinite(value) and float(value).is_integer() and value >= minimum):
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value}")
    return int(value)


class SyntheticDataModule(SpectraDataModule):
    """Spectra from `stellarlab.synthetic.make_survey`, generated once and cached on disk by their parameters."""

    survey_name: ClassVar[str] = "synthetic"  # its entry in stellarlab.data.surveys: nothing to download

    def __init__(
        self,
        survey: str = "apogee",
        n_stars: int = 8000,
        snr: float | Sequence[float] = 100.0,
        spectra_per_star: int = 1,
        gap_deleted: bool = False,
        seed: int = 1,
        cache_dir: str | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if survey not in ("apogee", "galah"):
            raise ConfigError(f"data.survey={survey} is unknown; valid: apogee, galah (or use data=synthetic_galah)")
        if _is_number(snr):
            snr_value = float(snr)
            if not (snr_value > 0 and math.isfinite(snr_value)):
                raise ConfigError(f"data.snr must be > 0, got {snr}; e.g. data.snr=100")
        else:
            pair = list(snr) if isinstance(snr, Sequence) and not isinstance(snr, str) else []
            if not (len(pair) == 2 and all(_is_number(s) and 0 < s < math.inf for s in pair) and pair[0] <= pair[1]):
                raise ConfigError(
                    f"data.snr must be a number > 0 or a range [low, high] with 0 < low <= high, got {snr}; "
                    "e.g. data.snr=[30,200]"
                )
            snr_value = (float(pair[0]), float(pair[1]))
        if gap_deleted and survey != "apogee":
            raise ConfigError("data.gap_deleted applies to the APOGEE grid only; set it false for survey=galah")
        self.survey_params = dict(
            survey=survey,
            n_stars=_integer("data.n_stars", n_stars, 1),
            snr=snr_value,
            spectra_per_star=_integer("data.spectra_per_star", spectra_per_star, 1),
            gap_deleted=bool(gap_deleted),
            seed=_integer("data.seed", seed, 0),
            cache_dir=cache_dir,
        )
        self._survey = None

    def synthetic_survey(self):
        """The `SyntheticSurvey` behind the data (generated, or read from its cache, once): the truth that
        `stellarlab.synthetic.crlb` pairs each spectrum with. Other DataModules have no such method."""
        if self._survey is None:
            from stellarlab.synthetic import (
                make_survey,  # heavy physics tables: import on first use
            )

            try:
                self._survey = make_survey(**self.survey_params)
            except ValueError as err:  # the generator validates its parameters
                raise ConfigError(f"synthetic survey: {err}") from err
        return self._survey

    def preprocessing_config(self) -> dict:
        p = self.survey_params
        return {**super().preprocessing_config(), "survey": p["survey"], "gap_deleted": p["gap_deleted"]}

    def prepare_data(self) -> None:
        self.synthetic_survey()

    def load_arrays(self) -> SpectraArrays:
        s = self.synthetic_survey()
        return SpectraArrays(
            flux=s.flux,
            weight=s.ivar,
            labels=s.labels,
            label_names=list(s.label_names),
            star_id=s.star_id,
            wavelength=s.wavelength,
            extra={"snr": s.snr},
        )
