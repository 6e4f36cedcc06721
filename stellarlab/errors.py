"""Errors stellarlab raises on purpose: a user mistake or bad input, with the fix in the message.

The scripts (`train.py`, `eval.py`, `predict.py`) print these as one line and exit with code 2
instead of showing a traceback (`exit_on_user_error`).
"""

from __future__ import annotations

import logging
import sys


class StellarlabError(Exception):
    """Base class: something the user can fix (config, data, hardware choice)."""


class ConfigError(StellarlabError, ValueError):
    """A config value is wrong or impossible on this machine."""


class DataError(StellarlabError, ValueError):
    """Input data are missing, malformed or unusable for training."""


class TrainingError(StellarlabError, RuntimeError):
    """Training went numerically wrong (non-finite loss)."""


def root_cause(err: BaseException) -> BaseException:
    """The stellarlab error behind Hydra's InstantiationException (or another wrapper), if there is one."""
    cause = err
    while cause.__cause__ is not None and not isinstance(cause, StellarlabError):
        cause = cause.__cause__
    return cause if isinstance(cause, StellarlabError) else err


def exit_on_user_error(err: BaseException, log: logging.Logger) -> None:
    """A script's last word on `err`: a stellarlab error, however deeply wrapped, becomes one line on stderr
    and exit code 2; for anything else this returns, and the caller re-raises it with its traceback."""
    cause = root_cause(err)
    if isinstance(cause, StellarlabError):
        log.error("%s", cause)
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)
