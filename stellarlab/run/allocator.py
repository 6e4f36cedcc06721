"""Keep freed batch-sized memory blocks in the process for reuse (Linux with glibc; elsewhere a no-op).

glibc's malloc hands any block above its mmap threshold (at most 32 MB when left to adapt) back to
the kernel as soon as it is freed. A CNN activation at batch 128 (128 x 8 x 8575 float32 = 35 MB)
or a large batch of spectra is then faulted in again page by page on every step, which costs a CPU
CNN epoch ~40% (`python -m benchmarks run --only training_overhead`). Raising the mmap and trim
thresholds keeps such blocks for the next step, the effect PyTorch's CPU tuning guide gets by
preloading jemalloc or tcmalloc, without a second allocator to install.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
INT_MAX = 2**31 - 1
ENV_NAMES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
#: the values this process exported: a later call (the next job of a multirun) may replace its own
#: export; a value the user set is never touched
_EXPORTED: dict[str, str] = {}


def keep_freed_blocks(max_block_mb: float | None) -> bool:
    """Serve blocks up to `max_block_mb` from the heap and keep up to twice that free before trimming.

    Also exported as MALLOC_*_THRESHOLD_ so processes started from this one (DDP spawn, Slurm jobs
    launched by a sweep) do the same. Returns whether the setting took effect; None/0 leaves malloc alone,
    and so does a MALLOC_*_THRESHOLD_ the user set in the environment (glibc has applied it already).
    """
    if not max_block_mb or not sys.platform.startswith("linux"):
        return False
    mmap_bytes = min(int(float(max_block_mb) * 2**20), INT_MAX)
    trim_bytes = min(2 * mmap_bytes, INT_MAX)
    values = dict(zip(ENV_NAMES, (str(mmap_bytes), str(trim_bytes))))
    # a value other than ours (this call's, or this process's earlier export) is the user's; an inherited
    # export of the same setting (a DDP process spawned by train.py) is not
    user_set = [name for name in ENV_NAMES if os.environ.get(name, values[name]) not in (values[name], _EXPORTED.get(name))]
    if user_set:
        log.info("%s set in the environment: malloc_keep_block_mb=%s not applied", " and ".join(user_set), max_block_mb)
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    if not (mallopt(M_MMAP_THRESHOLD, mmap_bytes) and mallopt(M_TRIM_THRESHOLD, trim_bytes)):
        log.debug("mallopt refused thresholds %d/%d bytes; malloc left at its defaults", mmap_bytes, trim_bytes)
        return False
    os.environ.update(values)
    _EXPORTED.update(values)
    return True


MALLOC_EXAMPLE = "malloc_keep_block_mb=1024 (null: malloc's defaults)"


def apply_command_setting(max_block_mb) -> bool:
    """What the commands call with the config's `malloc_keep_block_mb`: a bad value is one error line, a good
    one is applied. The notebook API never calls it: a library call leaves its process's malloc alone."""
    from stellarlab.checks import check_number

    check_number("malloc_keep_block_mb", max_block_mb, MALLOC_EXAMPLE, minimum=0, allow_null=True)
    return keep_freed_blocks(max_block_mb)
