"""Files that a kill can never leave half-written, and the liveness test behind every lock.

Every output (metrics.json, checkpoints, caches, catalogues, sweep summaries, figures) is written to a
temporary name beside its final one and renamed into place, so a reader (another job of a sweep,
`compare`, a crashed run's successor) never sees half a file. Temporaries have one naming scheme,
`.<final name>.tmp-<host>-<pid>-<random><suffix>`, so that whatever a killed process left is
recognised and removed by the next writer in the same folder.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from stellarlab.errors import DataError

log = logging.getLogger(__name__)

TMP_MARK = ".tmp-"
# Files are created 0600 by mkstemp-like calls; give them the mode a plain open() would (0666 less the umask).
_UMASK = os.umask(0)
os.umask(_UMASK)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host (a lock's or a temporary file's owner)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temporary_name(final: Path, keep_suffix: bool = True) -> Path:
    """A fresh temporary path beside `final`; with `keep_suffix` it ends like `final` (for writers that go by
    the suffix), without it no glob for the final kind of file (`*.ckpt`) can pick it up."""
    suffix = final.suffix if keep_suffix else ""
    return final.parent / f".{final.name}{TMP_MARK}{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}{suffix}"


def _owner(tmp: Path) -> tuple[str, int] | None:
    """(host, pid) that made a temporary of `temporary_name`'s scheme; None for any other name."""
    try:
        host, pid, _ = tmp.name.rsplit(TMP_MARK, 1)[1].rsplit("-", 2)
        return host, int(pid)
    except (IndexError, ValueError):
        return None


def remove_stale_temporaries(folder: Path, final_name: str | None = None) -> None:
    """Remove temporaries in `folder` (of `final_name` only, if given) whose process on this host is gone."""
    host = socket.gethostname()
    pattern = f".{final_name}{TMP_MARK}*" if final_name else f".*{TMP_MARK}*"
    for tmp in folder.glob(pattern):
        owner = _owner(tmp)
        if owner is None or owner[0] != host or owner[1] == os.getpid() or pid_alive(owner[1]):
            continue
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        log.info("removed %s, left by a killed write", tmp)


#: Free bytes below which a failed write is taken for a full disk: torch's checkpoint writer reports one as a
#: RuntimeError ("unexpected pos"), not as the OSError(ENOSPC) of a plain write (numpy as an OSError without errno).
FULL_DISK_BYTES = 1 << 20


def full_disk(err: BaseException, final: Path) -> DataError | None:
    """One line for a write of `final` that failed because its disk is full (checked while the failed temporary
    still holds its space), else None."""
    if not isinstance(err, Exception) or isinstance(err, DataError):
        return None
    cause: BaseException | None = err
    full = False
    while cause is not None and not full:
        full = isinstance(cause, OSError) and (cause.errno in (errno.ENOSPC, errno.EDQUOT)
                                               or "Not enough free space" in str(cause))  # numpy's check before it writes
        cause = cause.__cause__ or cause.__context__
    if not full:
        try:
            full = shutil.disk_usage(final.parent).free < FULL_DISK_BYTES
        except OSError:
            return None
    if not full:
        return None
    return DataError(f"the disk is full: writing {final} failed ({type(err).__name__}: {str(err).strip()[:120]}); free "
                     "space there, or point paths.log_dir (outputs) or paths.cache_dir (surveys) at a disk with room; "
                     "the files written before are intact (a training run that saved checkpoints/last.ckpt continues with "
                     "resume=<run folder>)")


def fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (best effort: some file systems refuse to open folders)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, keep_suffix: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` when the block succeeds, remove it otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, path.name)
    tmp = temporary_name(path, keep_suffix)
    try:
        yield tmp
        if tmp.exists() and not tmp.is_dir():
            os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException as err:
        disk = full_disk(err, path)
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if disk is not None:
            raise disk from err
        raise
    fsync_folder(path.parent)


def temporary_sibling(final: Path) -> Path:
    """A new empty folder beside `final` to fill and rename into place; stale ones of dead builds are removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final.parent, final.name)
    tmp = temporary_name(final)
    tmp.mkdir()
    return tmp


@contextlib.contextmanager
def atomic_folder(final: Path, marker: str) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`; when the block succeeds, rename it to `final`.

    The block writes `marker` (a file inside) last: its presence marks a complete folder. A folder under
    the final name without it (a crash, an interrupted copy) is replaced; a complete one that another
    process published meanwhile is kept and this copy dropped. On an exception nothing is published.
    """
    try:
        tmp = temporary_sibling(final)
    except OSError as err:  # a read-only folder: one line, not a traceback
        raise DataError(f"cannot write {final} ({err.strerror or err}); set paths.cache_dir to a folder you can write") from err
    try:
        yield tmp
        fsync_folder(tmp)
        if final.exists() and not (final / marker).is_file():
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / marker).is_file():
                raise
            log.info("another process published %s first; keeping its copy", final)
        fsync_folder(final.parent)
    except Exception as err:
        disk = full_disk(err, final)  # while the temporary still holds its space; `finally` removes it
        if disk is None:
            raise
        raise disk from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_bytes_atomic(path: str | os.PathLike, write) -> Path:
    """Call `write(binary file)` on a temporary beside `path`, fsync, rename into place."""
    with atomic_path(path, keep_suffix=False) as tmp:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to a temporary file in the same folder, then rename: readers never see half a file."""
    return write_bytes_atomic(path, lambda fh: fh.write(text.encode()))


def write_json_atomic(path: str | os.PathLike, data: dict) -> Path:
    """`data` as indented JSON (NaN allowed), written atomically."""
    return write_text_atomic(path, json.dumps(data, indent=2, allow_nan=True) + "\n")
