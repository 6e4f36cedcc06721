"""Errors stellarlab raises on purpose: a user mistake or bad input, with the fix in the message.

Every command (train, eval, predict, download, compare) runs inside `command_errors`: these errors are
printed as one `error:` line and exit with code 2 instead of showing a traceback; Ctrl-C and SIGTERM are
one `interrupted:` line and exit 128 + the signal's number (130, 143).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence


class StellarlabError(Exception):
    """Base class: something the user can fix (config, data, hardware choice)."""


class ConfigError(StellarlabError, ValueError):
    """A config value is wrong or impossible on this machine."""


class DataError(StellarlabError, ValueError):
    """Input data are missing, malformed or unusable for training."""


class TrainingError(StellarlabError, RuntimeError):
    """Training went numerically wrong (non-finite loss)."""


class CommandInterrupted(BaseException):
    """Ctrl-C or SIGTERM in a command (`command_errors`). A BaseException, so that no `except Exception` on the
    way swallows it, and not a KeyboardInterrupt, which Lightning turns into exit 1 inside `trainer.test`."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def missing_extra(option: str, what: str, extra: str, modules: Sequence[str]) -> ConfigError | None:
    """`<option> needs <what>: pip install "stellarlab[<extra>]"` when one of `modules` cannot be imported, else None.

    Optional features (sweeps, launchers, loggers, downloads) come with extras; this is their one message."""
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a missing parent package, or a module without a spec
            found = False
        if not found:
            return ConfigError(f'{option} needs {what}: pip install "stellarlab[{extra}]"')
    return None


def weights_mismatch(err: BaseException, ckpt_path, what: str, fix: str) -> DataError | None:
    """One line for torch's `load_state_dict` failure (a checkpoint whose weights `what` does not have: another
    version's model), else None (another error)."""
    if not isinstance(err, RuntimeError) or "Error(s) in loading state_dict" not in str(err):
        return None
    detail = str(err).strip().splitlines()[-1].strip()  # torch's last line: a tensor that does not fit
    return DataError(f"checkpoint {ckpt_path}: its weights do not fit {what} ({detail}); {fix}")


def root_cause(err: BaseException) -> BaseException:
    """The stellarlab error behind Hydra's InstantiationException (or another wrapper), if there is one."""
    cause = err
    while cause.__cause__ is not None and not isinstance(cause, StellarlabError):
        cause = cause.__cause__
    return cause if isinstance(cause, StellarlabError) else err


@contextlib.contextmanager
def _signals_raise_interrupted() -> Iterator[None]:
    """While the block runs, Ctrl-C and SIGTERM raise `CommandInterrupted` in this process. A forked worker (a
    DataLoader's) ignores them, as the workers of a reading pool do: the main process stops them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pid = os.getpid()

    def on_signal(signum: int, frame) -> None:
        if os.getpid() == pid:
            raise CommandInterrupted(signum)

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, on_signal)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def command_errors(log: logging.Logger, interrupted: str = "run the same command again",
                   signals: bool = True) -> Iterator[None]:
    """The one error exit of every command.

    A stellarlab error, however deeply wrapped (Hydra's InstantiationException), becomes one line on stderr
    and exit code 2; Ctrl-C and SIGTERM become `interrupted: <interrupted>` and exit code 128 + the signal
    (130, 143); any other exception keeps its traceback (a bug, not a user mistake). `signals=False` leaves
    the signals to the command's own handler (train.py saves a checkpoint first).
    """
    try:
        with _signals_raise_interrupted() if signals else contextlib.nullcontext():
            yield
    except (KeyboardInterrupt, CommandInterrupted) as stop:
        signum = getattr(stop, "signum", signal.SIGINT)
        if log.hasHandlers():  # the run's log file too; without handlers logging would print the line twice
            log.error("interrupted by %s", signal.Signals(signum).name)
        print(f"interrupted: {interrupted}", file=sys.stderr)
        sys.exit(128 + int(signum))
    except Exception as err:
        cause = root_cause(err)
        if not isinstance(cause, StellarlabError):
            raise
        if log.hasHandlers():
            log.error("%s", cause)
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)
