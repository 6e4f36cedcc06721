"""`data=synthetic_apogee` / `data=synthetic_galah`: the built-in survey, so everything runs with no download."""

from __future__ import annotations

from collections.abc import Sequence

from stellarlab.data.base import SpectraArrays, SpectraDataModule
from stellarlab.errors import ConfigError


class SyntheticDataModule(SpectraDataModule):
    """Spectra from `stellarlab.synthetic.make_survey`, generated once and cached on disk by their parameters."""

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
        if isinstance(snr, (int, float)):
            snr_value = float(snr)
            if not snr_value > 0:
                raise ConfigError(f"data.snr must be > 0, got {snr}")
        else:
            snr_value = tuple(float(s) for s in snr)
            if len(snr_value) != 2 or not 0 < snr_value[0] <= snr_value[1]:
                raise ConfigError(f"data.snr range must be [low, high] with 0 < low <= high, got {list(snr)}")
        if gap_deleted and survey != "apogee":
            raise ConfigError("data.gap_deleted applies to the APOGEE grid only; set it false for survey=galah")
        self.survey_params = dict(
            survey=survey,
            n_stars=int(n_stars),
            snr=snr_value,
            spectra_per_star=int(spectra_per_star),
            gap_deleted=bool(gap_deleted),
            seed=int(seed),
            cache_dir=cache_dir,
        )
        self._survey = None

    def _make(self):
        if self._survey is None:
            from stellarlab.synthetic import make_survey  # heavy physics tables: import on first use

            try:
                self._survey = make_survey(**self.survey_params)
            except ValueError as err:  # the generator validates its parameters
                raise ConfigError(f"synthetic survey: {err}") from err
        return self._survey

    def preprocessing_config(self) -> dict:
        p = self.survey_params
        return {**super().preprocessing_config(), "survey": p["survey"], "gap_deleted": p["gap_deleted"]}

    def prepare_data(self) -> None:
        self._make()

    def load_arrays(self) -> SpectraArrays:
        s = self._make()
        return SpectraArrays(
            flux=s.flux,
            weight=s.ivar,
            labels=s.labels,
            label_names=list(s.label_names),
            star_id=s.star_id,
            wavelength=s.wavelength,
            extra={"snr": s.snr},
        )
