"""Download a survey's files into the folders the `data` config reads.

    stellarlab-download data=apogee data.cuts.preset=rgb download.max_stars=5000    # or python -m stellarlab.download
    stellarlab-download data=galah
    stellarlab-download data=apogee download.dry_run=true    # what would be fetched

The survey is the one the data config's DataModule class names (`survey_name`, looked up in
`stellarlab.data.surveys`), so a subclass of APOGEEDataModule gets APOGEE's recipe; the recipe
itself lives with the survey's code (`stellarlab.data.apogee.download`, `stellarlab.data.galah.download`).
Files already present are skipped; `.part` files are resumed. Exit status: 0 when every file is in
place, 1 when some failed (listed in the summary), 2 for a config or data error, or when the download
extra (httpx, huggingface_hub) is not installed.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from stellarlab.data import surveys
from stellarlab.download.options import DownloadOptions
from stellarlab.errors import ConfigError, command_errors, missing_extra

if TYPE_CHECKING:
    from stellarlab.download.fetch import Fetcher, Report

#: what the download extra installs: `pip install "stellarlab[download]"`
DOWNLOAD_MODULES = ("httpx", "huggingface_hub")

log = logging.getLogger("stellarlab.download.command")


def recipe_of(data: DictConfig) -> Callable[[DictConfig, Fetcher], Report]:
    """The download recipe of the survey the `data` config's DataModule class names (`survey_name`)."""
    survey = surveys.survey_of_config(data)
    if survey is not None and survey.generated:
        raise ConfigError(
            "the synthetic survey is generated on the fly and needs no download; "
            "use data=apogee or data=galah to fetch real spectra"
        )
    if survey is None or survey.download is None:
        target = str(data.get("_target_", ""))
        raise ConfigError(
            f"the download command has no recipe for this data config ({target or 'no _target_'}); "
            "it fetches data=apogee (allStar + spectra) and data=galah (the galah4 arrays)"
        )
    return surveys.load(survey.download)


# ---------------------------------------------------------------------------------------- entry point
def download(cfg: DictConfig) -> Report:
    """Run the download `cfg` describes; the report says what happened to every file."""
    from stellarlab.download.fetch import Fetcher  # httpx: the download extra

    options = DownloadOptions.from_config(cfg.download)  # every download.* value checked before anything runs
    recipe = recipe_of(cfg.data)
    with Fetcher(**options.fetcher_settings()) as fetcher:
        start = time.perf_counter()
        report = recipe(cfg, fetcher)
    report.seconds = time.perf_counter() - start
    return report


def run(cfg: DictConfig) -> int:
    """Download, print the summary; exit status 0 (all in place) or 1 (files failed); a user error exits 2 and
    Ctrl-C 130 (`command_errors`)."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request would drown the log
    with command_errors(log, interrupted="partial files are kept as *.part; run the same command again to resume"):
        report = download(cfg)
    print(report.summary())
    if report.failed:
        print(f"error: {len(report.failed)} file(s) failed (listed above); run the same command again to retry them",
              file=sys.stderr)
        return 1
    return 0


def main() -> None:
    """`stellarlab-download` and `python -m stellarlab.download`."""
    import hydra

    from stellarlab.config import conf_dir

    with command_errors(log):
        error = missing_extra("stellarlab-download", "httpx and huggingface_hub", "download", DOWNLOAD_MODULES)
        if error is not None:
            raise error

    @hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="download")
    def _main(cfg: DictConfig) -> None:
        code = run(cfg)
        if code:
            sys.exit(code)

    _main()
