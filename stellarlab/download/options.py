"""The `download.*` options of `python -m stellarlab.download`, each with its rule: one owner for all of them.

The command checks the composed `download` node against these fields (`stellarlab.checks`) before it
fetches anything, and `Fetcher` applies the same rules to the settings it is built with, so a value
like `download.timeout=nan` or `download.verify=maybe` is refused with one line instead of being
used. The survey-specific nodes (`apogee`, `galah4`) are read by each survey's recipe.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any

from stellarlab.checks import Flag, Number, _plain, check_arguments

#: The options `Fetcher` is built from (the rest steer the recipes).
FETCHER_KEYS = ("workers", "retries", "backoff", "backoff_max", "timeout", "verify", "progress")


@dataclass(frozen=True)
class DownloadOptions:
    max_stars: Annotated[int | None, Number(minimum=1, integer=True, allow_null=True,
                                            example="download.max_stars=5000 (null: all stars)")] = None
    workers: Annotated[int, Number(minimum=1, integer=True, example="download.workers=4")] = 4
    retries: Annotated[int, Number(minimum=0, integer=True, example="download.retries=5")] = 5
    backoff: Annotated[float, Number(minimum=0, example="download.backoff=2.0 (seconds)")] = 2.0
    backoff_max: Annotated[float, Number(minimum=0, example="download.backoff_max=120.0 (seconds)")] = 120.0
    timeout: Annotated[float, Number(above=0, example="download.timeout=60.0 (seconds)")] = 60.0
    verify: Annotated[bool, Flag()] = True
    dry_run: Annotated[bool, Flag()] = False
    progress: Annotated[bool, Flag()] = True
    apogee: Any = field(default=None, compare=False)
    galah4: Any = field(default=None, compare=False)

    @classmethod
    def from_config(cls, node: Mapping) -> DownloadOptions:
        """The `download` node, every key known and every value within its rule (ConfigError otherwise)."""
        check_arguments(cls, node, "download")
        return cls(**{str(k): _plain(v) for k, v in node.items()})

    def fetcher_settings(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k in FETCHER_KEYS}


__all__ = ["FETCHER_KEYS", "DownloadOptions"]
