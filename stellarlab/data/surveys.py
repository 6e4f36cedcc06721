"""Which code serves which survey: one `Survey` record each, found by name or from a DataModule.

A DataModule class names its survey with a class attribute, `survey_name: ClassVar[str] = "apogee"`
(subclasses inherit it). The download command finds the survey of a `data` config through its
`_target_` class, predict.py finds the reader of each input file format, and both import only the code
the record names: no module needs to know another survey's classes, and a user's subclass of
APOGEEDataModule is APOGEE.

Code is named by dotted path and imported only when used: this module imports neither torch nor any
survey package. `survey_of_config` does import the config's DataModule class (and with it torch).

To add a survey: give its DataModule a `survey_name`, add its record to `SURVEYS` below with its
download recipe `recipe(cfg, fetcher) -> stellarlab.download.fetch.Report` (or None), the file
formats predict.py should read and the naming of its catalogue (`CatalogNames`), and point a
`conf/data/<name>.yaml` `_target_` at the DataModule.

The catalogue names live here, once: predict.py writes label columns as the survey's own catalogue
calls them (APOGEE allStar `TEFF`, `TEFF_ERR`; GALAH DR4 `teff`, `e_teff`), for spectra of a survey
and for models trained on the survey's grid (the synthetic survey names its grid in `survey`).
"""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from stellarlab.errors import ConfigError


@dataclass
class InputRows:
    """Rows of one input file on the model's grid, with what identifies them.

    `ids` holds per-row identifier columns under the survey's own names (APOGEE_ID, TELESCOPE, FIELD, or
    `id` = `<file>:<row>` for arrays); `snr` the signal-to-noise ratio the file itself states (a header's
    SNR), NaN where it states none."""

    flux: np.ndarray  # (k, P) float32
    weight: np.ndarray  # (k, P) float32 inverse variance, 0 = no data
    ids: dict[str, list] = field(default_factory=dict)
    snr: np.ndarray | None = None  # (k,)
    labels: np.ndarray | None = None  # (k, L) the data's own labels, for rows of a DataModule


@dataclass(frozen=True)
class InputFormat:
    """A file format predict.py reads (`format=<name>`).

    `reader(path, name, preprocessing, wavelength, input_wavelength)` opens one file (a DataError when it
    cannot be read) and returns an input of it: picklable, with `n_rows`, `parallel` ("process": each
    file is slow to read, several are read at once in worker processes; "thread": rows are cheap and
    big, read in a thread beside the model) and `read(start, stop) -> InputRows` on the checkpoint's grid
    (`wavelength`), preprocessed as its training data were (`preprocessing`, saved in the checkpoint).
    """

    name: str
    globs: tuple[str, ...]  # the format's files in an input folder
    names: tuple[str, ...]  # file names `format=auto` takes for this format (fnmatch patterns)
    reader: str  # dotted path of the reader
    skip: tuple[str, ...] = ()  # files matching a glob that are not spectra (companions), fnmatch patterns


@dataclass(frozen=True)
class CatalogNames:
    """How a survey's catalogue names columns: the case of every name and the spelling of a label's error.

    `label("teff")` is the label's column, `error("teff")` its uncertainty's, `column("snr")` any other
    column in the survey's case; `renamed` maps a stellarlab label name to the survey's where they differ."""

    upper: bool = False
    error_format: str = "{}_err"  # from the label's column name
    renamed: tuple[tuple[str, str], ...] = ()

    def column(self, name: str) -> str:
        return name.upper() if self.upper else name.lower()

    def label(self, name: str) -> str:
        return self.column(dict(self.renamed).get(name.lower(), name))

    def error(self, name: str) -> str:
        return self.error_format.format(self.label(name))


#: allStar: TEFF, TEFF_ERR, LOGG, FE_H, ALPHA_M, X_FE; GALAH DR4 allstar: teff, e_teff, logg, fe_h, mg_fe.
CATALOG_NAMES: Mapping[str, CatalogNames] = {
    "apogee": CatalogNames(upper=True, error_format="{}_ERR"),
    "galah": CatalogNames(upper=False, error_format="e_{}"),
    "stellarlab": CatalogNames(upper=False, error_format="{}_err"),  # a survey without a catalogue of its own
}


@dataclass(frozen=True)
class Survey:
    name: str  # what DataModules put in `survey_name`
    download: str | None = None  # dotted path of `recipe(cfg, fetcher) -> Report`; None: no download command
    generated: bool = False  # spectra made on the fly: nothing to download
    formats: tuple[InputFormat, ...] = ()  # survey files predict.py reads
    catalog: str | None = None  # its catalogue's naming, a key of CATALOG_NAMES (None: the grid's survey names it)


_APOGEE_READER = "stellarlab.data.apogee.files.open_input"

SURVEYS: Mapping[str, Survey] = {
    s.name: s
    for s in (
        Survey(
            "apogee",
            download="stellarlab.data.apogee.download.download",
            catalog="apogee",
            formats=(
                InputFormat("aspcapStar", ("aspcapStar-*.fits",), ("aspcapStar*",), _APOGEE_READER),
                InputFormat("apStar", ("apStar-*.fits", "asStar-*.fits"), ("apStar*", "asStar*"), _APOGEE_READER),
            ),
        ),
        Survey("galah4", download="stellarlab.data.galah.download.download", catalog="galah"),
        Survey("galah_dr4", catalog="galah"),  # Data Central's bulk download: no recipe here
        Survey("synthetic", generated=True),  # names its grid's survey: preprocessing["survey"]
    )
}

#: Formats of no survey, told by their extension (which wins over a survey's file-name pattern). A `.npy`
#: of flux may have its inverse variance beside it, `<name>_ivar.npy`; `<name>_wavelength.npy` is a grid.
COMMON_FORMATS = (InputFormat("npy", ("*.npy",), ("*.npy",), "stellarlab.data.flux.open_npy",
                              skip=("*_wavelength.npy", "*_ivar.npy")),)

#: DataModule class names of checkpoints written before the preprocessing named its survey.
_OLD_DATAMODULES = {"APOGEEDataModule": "apogee", "GALAH4DataModule": "galah4", "GALAHDR4DataModule": "galah_dr4",
                    "SyntheticDataModule": "synthetic"}


def get(name: str) -> Survey:
    """The survey called `name`; ConfigError listing the known ones otherwise."""
    try:
        return SURVEYS[name]
    except KeyError:
        raise ConfigError(f"unknown survey {name!r}; known surveys: {', '.join(SURVEYS)}") from None


def survey_of_class(cls: type) -> Survey | None:
    """The survey a DataModule class names in `survey_name`; None for a class that names none."""
    name = getattr(cls, "survey_name", None)
    return None if name is None else get(name)


def survey_of_config(data: Mapping) -> Survey | None:
    """The survey of a `data` config's `_target_` class (imported, not instantiated); None without one."""
    target = str(data.get("_target_") or "")
    if not target:
        return None
    from hydra._internal.utils import _locate

    try:
        cls = _locate(target)
    except Exception as err:  # ImportError, or whatever the module raises while importing
        reason = " ".join(str(err).split())
        raise ConfigError(f"data._target_={target} cannot be imported ({reason}); check the data config") from err
    return survey_of_class(cls) if isinstance(cls, type) else None


def survey_of_preprocessing(preprocessing: Mapping) -> Survey | None:
    """The survey a checkpoint's training data came from (its preprocessing's `survey_name`); None if unknown."""
    name = preprocessing.get("survey_name") or _OLD_DATAMODULES.get(str(preprocessing.get("datamodule")))
    return SURVEYS.get(str(name)) if name else None


def catalog_names(preprocessing: Mapping) -> tuple[str, CatalogNames]:
    """(style, names) of the catalogue of a model trained on data with this preprocessing: its survey's, the
    synthetic survey's grid's (`survey: apogee|galah`), else stellarlab's own lower-case names."""
    survey = survey_of_preprocessing(preprocessing)
    style = survey.catalog if survey is not None else None
    if style is None and survey is not None and survey.generated:
        style = str(preprocessing.get("survey") or "")
    style = style if style in CATALOG_NAMES else "stellarlab"
    return style, CATALOG_NAMES[style]


def input_formats() -> tuple[InputFormat, ...]:
    """Every format predict.py reads: the surveys' own, then the survey-independent ones."""
    return (*(f for s in SURVEYS.values() for f in s.formats), *COMMON_FORMATS)


def input_format(name: str) -> InputFormat:
    """The format called `name` (KeyError otherwise: callers check names against `format_names`)."""
    for fmt in input_formats():
        if fmt.name == name:
            return fmt
    raise KeyError(name)


def format_names() -> tuple[str, ...]:
    return tuple(f.name for f in input_formats())


def format_of_file(filename: str) -> InputFormat | None:
    """The format `format=auto` takes a file name for; None when no format claims it."""
    for fmt in (*COMMON_FORMATS, *input_formats()):
        if any(fnmatch.fnmatchcase(filename, pattern) for pattern in fmt.names):
            return fmt
    return None


def load(dotted: str):
    """The function or class a record names ('package.module.attribute'), imported now."""
    module, _, attr = dotted.rpartition(".")
    return getattr(importlib.import_module(module), attr)


__all__ = [
    "CATALOG_NAMES", "COMMON_FORMATS", "CatalogNames", "InputFormat", "InputRows", "SURVEYS", "Survey", "catalog_names",
    "format_names", "format_of_file", "get", "input_format", "input_formats", "load", "survey_of_class",
    "survey_of_config", "survey_of_preprocessing",
]
