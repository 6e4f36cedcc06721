"""Errors stellarlab raises on purpose: a user mistake or bad input, with the fix in the message.

`train.py` prints these as one line and exits non-zero instead of showing a traceback.
"""


class StellarlabError(Exception):
    """Base class: something the user can fix (config, data, hardware choice)."""


class ConfigError(StellarlabError, ValueError):
    """A config value is wrong or impossible on this machine."""


class DataError(StellarlabError, ValueError):
    """Input data are missing, malformed or unusable for training."""


class TrainingError(StellarlabError, RuntimeError):
    """Training went numerically wrong (non-finite loss)."""
