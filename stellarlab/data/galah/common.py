"""What galah4 (`data=galah`) and the DR4 release (`data=galah_dr4`) share: label names, the flux transform, the row filter.

* Labels use stellarlab's names (`teff`, `logg`, `fe_h`, ...). galah4 calls its columns `t_eff`,
  `log_g` and `SNR`; those spellings are accepted as aliases, so one experiment (`labels: [teff, logg,
  fe_h]`) runs on galah4, on the DR4 catalogue (whose columns already are `teff`, `logg`, `fe_h`) and on
  the synthetic GALAH-like survey alike, and checkpoints carry the same label names whatever the source.
* `flux_transform=log` (`stellarlab.data.flux.transform_flux`) stores `1 + ln(max(flux, flux_floor))`:
  the `log(max(flux, 0.2))` used with galah4 (docs/data-formats.md), shifted so the continuum stays at 1;
  models read the absorption depth `1 - flux`, which becomes an optical depth `-ln(flux)`.
* Every cut logs how many rows it removed; a cut that leaves nothing stops with an error naming it.
  Rows with none of the requested labels, or no usable pixel, are dropped here (and logged) rather than
  in the base class, so per-spectrum extras such as `snr` stay aligned with the rows.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from stellarlab.data.base import SpectraArrays, SpectraDataModule
from stellarlab.data.flux import FLUX_TRANSFORMS
from stellarlab.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: Other spellings of stellarlab's label names (compared in lower case).
LABEL_ALIASES = {"t_eff": "teff", "log_g": "logg", "feh": "fe_h"}
CHUNK_ROWS = 256


def canonical_label(name: str) -> str:
    """stellarlab's name for a label column: lower case, galah4's `t_eff`/`log_g` mapped to `teff`/`logg`."""
    key = str(name).strip().lower()
    return LABEL_ALIASES.get(key, key)


class GALAHDataModuleBase(SpectraDataModule):
    """What both layouts share: label aliases, the flux transform, and the last row filter.

    Subclasses set `survey_name` (their entry in `stellarlab.data.surveys`), also saved as the `layout`."""

    survey_name: ClassVar[str]

    @classmethod
    def planned_label_names(cls, values) -> list[str]:
        """GALAH spellings (t_eff, log_g, feh) are renamed to the canonical names the metrics are logged under."""
        return [canonical_label(str(n)) for n in values["labels"]]

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
            "layout": self.survey_name,
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

    def _finish(self, flux, weight, labels, star_id, wavelength, snr, what: str, ids: dict | None = None) -> SpectraArrays:
        """Drop rows with no requested label or no usable pixel (logged), and hand the arrays over with `ids`
        (per-row identifier columns under GALAH's names, e.g. sobject_id)."""
        ids = {k: np.asarray(v) for k, v in (ids or {}).items()}
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
            ids = {k: v[keep] for k, v in ids.items()}
        return SpectraArrays(
            flux=flux,
            weight=weight,
            labels=labels,
            label_names=list(self.label_names),
            star_id=star_id,
            wavelength=wavelength,
            extra={"snr": np.asarray(snr, dtype=np.float32)},
            ids=ids,
        )


def require_rows(keep: np.ndarray, cut: str, hint: str) -> None:
    if not keep.any():
        raise DataError(f"no spectrum left after the {cut}; {hint}")
