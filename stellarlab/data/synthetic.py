"""`data=synthetic_apogee` / `data=synthetic_galah`: the built-in survey, so everything runs with no download."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar

from stellarlab.checks import Choice, Number, _is_number, _show, check_number, with_defaults
from stellarlab.data.base import SpectraArrays, SpectraDataModule
from stellarlab.data.split import PlannedSize
from stellarlab.errors import ConfigError
from stellarlab.synthetic import LABEL_NAMES


def _plain_snr(snr: Any) -> Any:
    """A range as a list (a tuple or an OmegaConf list from Hydra), a single value as it is."""
    return list(snr) if isinstance(snr, Sequence) and not isinstance(snr, str) else snr


class SyntheticDataModule(SpectraDataModule):
    """Spectra from `stellarlab.synthetic.make_survey`, generated once and cached on disk by their parameters."""

    survey_name: ClassVar[str] = "synthetic"  # its entry in stellarlab.data.surveys: nothing to download

    def __init__(
        self,
        survey: Annotated[str, Choice("apogee", "galah")] = "apogee",
        n_stars: Annotated[int, Number(minimum=1, integer=True, example="data.n_stars=8000")] = 8000,
        snr: float | Sequence[float] = 100.0,  # checked in check_together: a number or a range
        spectra_per_star: Annotated[int, Number(minimum=1, integer=True, example="data.spectra_per_star=1")] = 1,
        gap_deleted: bool = False,
        seed: Annotated[int, Number(minimum=0, integer=True, example="data.seed=1")] = 1,
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
        self._survey = None

    @classmethod
    def check_together(cls, values: Mapping[str, Any]) -> None:
        """The SNR (one value, or a range drawn from), the grid the gaps belong to, the labels the survey has."""
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
        unknown = [n for n in given["labels"] if n not in LABEL_NAMES]
        if unknown:
            raise ConfigError(
                f"data.labels={_show(list(given['labels']))}: the synthetic survey has no label {', '.join(unknown)}; "
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
