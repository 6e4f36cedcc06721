"""Which code serves which survey: one `Survey` record each, found by name or from a DataModule.

A DataModule class names its survey with a class attribute, `survey_name: ClassVar[str] = "apogee"`
(subclasses inherit it). The download command finds the survey of a `data` config through its
`_target_` class, predict.py finds the reader of each input file format, and both import only the code
the record names: no module needs to know another survey's classes, and a user's subclass of
APOGEEDataModule is APOGEE.

Code is named by dotted path and imported only when used: this module imports neither torch nor any
survey package. `survey_of_config` does import the config's DataModule class (and with it torch).

To add a survey: give its DataModule a `survey_name`, add its record to `SURVEYS` below with its
download recipe `recipe(cfg, fetcher) -> stellarlab.download.fetch.Report` (or None) and the file
formats predict.py should read, and point a `conf/data/<name>.yaml` `_target_` at the DataModule.
"""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Mapping
from dataclasses import dataclass

from stellarlab.errors import ConfigError


@dataclass(frozen=True)
class InputFormat:
    """A file format predict.py reads (`format=<name>`).

    `reader(path, name, preprocessing, wavelength, input_wavelength) -> (flux (k, P), weight (k, P), ids)`
    returns the file's k spectra on the checkpoint's grid (`wavelength`), preprocessed as its training
    data were (`preprocessing`, saved in the checkpoint).
    """

    name: str
    globs: tuple[str, ...]  # the format's files in an input folder
    names: tuple[str, ...]  # file names `format=auto` takes for this format (fnmatch patterns)
    reader: str  # dotted path of the reader


@dataclass(frozen=True)
class Survey:
    name: str  # what DataModules put in `survey_name`
    download: str | None = None  # dotted path of `recipe(cfg, fetcher) -> Report`; None: no download command
    generated: bool = False  # spectra made on the fly: nothing to download
    formats: tuple[InputFormat, ...] = ()  # survey files predict.py reads


_APOGEE_READER = "stellarlab.data.apogee.files.read_input"

SURVEYS: Mapping[str, Survey] = {
    s.name: s
    for s in (
        Survey(
            "apogee",
            download="stellarlab.data.apogee.download.download",
            formats=(
                InputFormat("aspcapStar", ("aspcapStar-*.fits",), ("aspcapStar*",), _APOGEE_READER),
                InputFormat("apStar", ("apStar-*.fits", "asStar-*.fits"), ("apStar*", "asStar*"), _APOGEE_READER),
            ),
        ),
        Survey("galah4", download="stellarlab.data.galah.download.download"),
        Survey("galah_dr4"),  # Data Central's bulk download: no recipe here
        Survey("synthetic", generated=True),
    )
}

#: Formats of no survey, told by their extension (which wins over a survey's file-name pattern).
COMMON_FORMATS = (InputFormat("npy", ("*.npy",), ("*.npy",), "stellarlab.data.flux.read_npy"),)


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
    "COMMON_FORMATS", "InputFormat", "SURVEYS", "Survey", "format_names", "format_of_file", "get", "input_format",
    "input_formats", "load", "survey_of_class", "survey_of_config",
]
