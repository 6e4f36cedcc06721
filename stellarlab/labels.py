"""Label names, units and the standardisation fitted on the training split only.

Networks regress standardised labels (zero mean, unit variance per label) so that one loss
weighs Teff in K and [Fe/H] in dex alike; metrics are always reported back in physical units.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from stellarlab.errors import DataError

if TYPE_CHECKING:
    import torch

#: Display name and unit of the labels stellarlab knows; others are shown as-is, unit "".
LABEL_INFO: dict[str, tuple[str, str]] = {
    "teff": ("Teff", "K"),
    "logg": ("log g", "dex"),
    "fe_h": ("[Fe/H]", "dex"),
    "m_h": ("[M/H]", "dex"),
    "alpha_fe": ("[alpha/Fe]", "dex"),
    "alpha_m": ("[alpha/M]", "dex"),
}


#: Catalogue units (astropy unit strings) of a label's value and of its uncertainty. log g is the logarithm of
#: an acceleration, its errors are in dex; abundances ([X/H], [X/Fe], [X/M]) are dex. None: unknown.
CATALOG_UNITS: dict[str, tuple[str, str]] = {"teff": ("K", "K"), "logg": ("dex(cm/s2)", "dex")}


def catalog_units(name: str) -> tuple[str | None, str | None]:
    """(value unit, uncertainty unit) of a label in a catalogue; abundance ratios (`*_h`, `*_fe`, `*_m`) in dex."""
    key = name.lower()
    if key in CATALOG_UNITS:
        return CATALOG_UNITS[key]
    if label_unit(key) == "dex" or key.endswith(("_h", "_fe", "_m")):
        return "dex", "dex"
    return None, None


def label_display(name: str) -> str:
    return LABEL_INFO.get(name.lower(), (name, ""))[0]


def label_unit(name: str) -> str:
    return LABEL_INFO.get(name.lower(), (name, ""))[1]


@dataclass(frozen=True)
class LabelScaler:
    """Per-label mean and standard deviation of the training split (NaN labels ignored)."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, labels: np.ndarray, names: list[str] | tuple[str, ...]) -> "LabelScaler":
        labels = np.asarray(labels, dtype=np.float64)
        counts = np.isfinite(labels).sum(axis=0)
        for name, count in zip(names, counts):
            if count < 2:
                raise DataError(
                    f"label '{name}' has {count} finite value(s) in the training split; need at least 2 "
                    "to standardise it. Drop it from data.labels or enlarge the training split."
                )
        mean = np.nanmean(labels, axis=0)
        std = np.nanstd(labels, axis=0)
        for name, s in zip(names, std):
            if not s > 0:
                raise DataError(
                    f"label '{name}' is constant in the training split (std = 0): nothing to learn. "
                    "Drop it from data.labels."
                )
        return cls(mean.astype(np.float32), std.astype(np.float32))

    def transform(self, labels: torch.Tensor | np.ndarray) -> torch.Tensor:
        import torch  # here, not at module level: reports and configs use this module without torch

        labels = torch.as_tensor(labels)
        return (labels - torch.as_tensor(self.mean, device=labels.device)) / torch.as_tensor(self.std, device=labels.device)

    def inverse(self, scaled: torch.Tensor | np.ndarray) -> torch.Tensor:
        import torch

        scaled = torch.as_tensor(scaled)
        return scaled * torch.as_tensor(self.std, device=scaled.device) + torch.as_tensor(self.mean, device=scaled.device)
