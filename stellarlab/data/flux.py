"""Flux arrays that belong to no survey: the log flux transform, resampling, `.npy` inputs, and reading inputs in parallel.

`flux_transform=log` stores `1 + ln(max(flux, flux_floor))`: the continuum stays at 1 and models read
the absorption depth `1 - flux` as an optical depth `-ln(flux)`. The GALAH DataModules offer it;
checkpoints record it (`flux_transform`, `flux_floor` in the preprocessing), and `.npy` inputs get it
just as training did. numpy only: reading needs neither torch nor a survey package, and the functions
here run in worker processes.

predict.py reads a `.npy` a block of rows at a time (`NpyInput.read`): positional reads of the rows asked
for, so memory stays that of a block whatever the file's size (pages touched through a memory map would
count in the process's resident memory until unmapped).
"""

from __future__ import annotations

import mmap
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stellarlab.data.surveys import InputRows
from stellarlab.errors import DataError

FLUX_TRANSFORMS = ("none", "log")
PARALLEL = ("process", "thread")


def transform_flux(flux: np.ndarray, kind: str, floor: float) -> np.ndarray:
    """`none`: float32 flux as is. `log`: 1 + ln(max(flux, floor)); NaN stays NaN (a masked pixel)."""
    flux = np.asarray(flux, dtype=np.float32)
    if kind == "none":
        return flux
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.float32(1.0) + np.log(np.maximum(flux, np.float32(floor)))).astype(np.float32)


def interpolation_weights(wave_in: np.ndarray, wave_out: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(left, right, t, inside) of linear interpolation from sorted `wave_in` onto `wave_out`:
    out = (1 - t) * in[left] + t * in[right], for output pixels `inside` the input range."""
    inside = (wave_out >= wave_in[0]) & (wave_out <= wave_in[-1])
    right = np.clip(np.searchsorted(wave_in, wave_out), 1, len(wave_in) - 1)
    left = right - 1
    step = wave_in[right] - wave_in[left]
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.where(step > 0, (wave_out - wave_in[left]) / np.where(step > 0, step, 1.0), 0.0)
    return left, right, np.clip(t, 0.0, 1.0), inside


def resample(flux: np.ndarray, weight: np.ndarray, wave_in: np.ndarray, wave_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Linear interpolation onto the model grid, the inverse variance carried through the same coefficients.

    An output pixel is the linear map (1 - t) f_l + t f_r of its two neighbours, so its variance is
    (1 - t)^2 var_l + t^2 var_r (var = 1 / weight): errors are propagated, not interpolated (interpolating
    them would claim the noise of one pixel halfway between two, where averaging two has less). Neighbouring
    output pixels share inputs, so their errors are correlated; the weight is each pixel's own variance.
    Pixels outside the input range, or that take a share of a bad pixel, get weight 0 (and flux 1)."""
    order = np.argsort(wave_in, kind="stable")
    wave_in = np.asarray(wave_in, dtype=np.float64)[order]
    flux, weight = np.asarray(flux)[:, order], np.asarray(weight)[:, order]
    left, right, t, inside = interpolation_weights(wave_in, np.asarray(wave_out, dtype=np.float64))
    a, b = (1.0 - t).astype(np.float32), t.astype(np.float32)
    bad = ~(weight > 0) | ~np.isfinite(flux) | ~np.isfinite(weight)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        var = np.where(bad, np.float32(0.0), np.float32(1.0) / np.where(bad, np.float32(1.0), weight))
        clean = np.where(bad, np.float32(1.0), flux).astype(np.float32)
        out_flux = a * clean[:, left] + b * clean[:, right]
        out_var = a * a * var[:, left] + b * b * var[:, right]
        out_bad = (bad[:, left] & (a > 0)) | (bad[:, right] & (b > 0)) | ~inside | ~(out_var > 0) | ~np.isfinite(out_var)
        out_weight = np.where(out_bad, np.float32(0.0), np.float32(1.0) / np.where(out_bad, np.float32(1.0), out_var))
    out_flux[out_bad] = 1.0
    return out_flux.astype(np.float32), out_weight.astype(np.float32)


# -- .npy inputs ----------------------------------------------------------------------------------
NPY_MAGIC = b"\x93NUMPY"
IVAR_SUFFIX = "_ivar"
RESAMPLE_ROWS = 128


def _check_npy_header(path: Path) -> None:
    """DataError for a file that is no .npy file, or one of Python objects: numpy's own errors for both read
    like a damaged file. A header it cannot parse is left to the reader (a truncated file)."""
    dtype = None
    try:
        with open(path, "rb") as fh:
            start = fh.read(len(NPY_MAGIC))
            if start == NPY_MAGIC:
                fh.seek(0)
                version = np.lib.format.read_magic(fh)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                dtype = read(fh)[2]
    except (OSError, ValueError, EOFError):
        return
    if start.startswith(b"SIMPLE"):
        raise DataError(f"{path} is not a .npy file (a FITS file? use format=auto, which tells the format from the name)")
    if start != NPY_MAGIC and len(start) == len(NPY_MAGIC):
        raise DataError(f"{path} is not a .npy file (it lacks numpy's header); write the spectra with np.save, "
                        "or give the file's own format with format=")
    if dtype is not None and dtype.hasobject:
        raise DataError(f"{path} holds Python objects (dtype {dtype}), not numbers; save the flux as a float array, "
                        "e.g. np.save(path, np.asarray(flux, dtype=np.float32))")


#: numpy parses a .npy header with `ast.literal_eval`, which CPython 3.11 does not make safe in concurrent threads
#: ("AST constructor recursion depth mismatch" when blocks are read by parallel workers): one header at a time.
_HEADER_LOCK = threading.Lock()


def _open_rows(path: Path, what: str) -> np.memmap:
    """The array memory-mapped (nothing read yet), as (N, pixels); DataError naming the file otherwise."""
    with _HEADER_LOCK:
        _check_npy_header(path)
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise DataError(f"{path}: not a readable .npy array ({err}); is the file truncated?") from err
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.dtype.kind not in "iuf":
        raise DataError(f"{path}: expected a real-valued (N, pixels) or (pixels,) {what} array, got {array.dtype} "
                        f"{list(array.shape)}")
    if array.size == 0:
        raise DataError(f"{path}: the array {list(array.shape)} holds no spectra; save the spectra as an (N, pixels) array")
    return array


def read_rows(array: np.memmap, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a memory-mapped (N, P) array as native float32, read with one positional read when
    the rows lie end to end in the file; otherwise copied through the map, whose pages are then released."""
    n_pixels = array.shape[1]
    if isinstance(array, np.memmap) and array.flags.c_contiguous and array.filename and getattr(array, "_mmap", None):
        raw = np.empty((stop - start, n_pixels), dtype=array.dtype)
        position = array.offset + start * n_pixels * array.dtype.itemsize
        buffer = memoryview(raw.reshape(-1).view(np.uint8))
        with open(array.filename, "rb", buffering=0) as fh:
            fh.seek(position)
            while len(buffer):
                got = fh.readinto(buffer)
                if not got:
                    raise DataError(f"{array.filename} ended early: the file is truncated; write it again")
                buffer = buffer[got:]
        return raw if raw.dtype == np.float32 and raw.dtype.isnative else raw.astype(np.float32)
    rows = np.array(array[start:stop], dtype=np.float32)
    mapping = getattr(array, "_mmap", None)
    if mapping is not None and hasattr(mapping, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)  # a Fortran-ordered file: let the pages go (they stay in the page cache)
    return rows


@dataclass
class NpyInput:
    """An (N, pixels) or (pixels,) `.npy` of flux (its inverse variance optionally in `<name>_ivar.npy`),
    read a block of rows at a time onto the model's grid: the flux transform of training, resampling when
    its grid is another (`input_wavelength`). Without an ivar file every finite pixel has weight 1."""

    path: Path
    n_rows: int
    one_d: bool
    wavelength: np.ndarray  # the model's grid
    preprocessing: dict = field(default_factory=dict)
    wave_in: np.ndarray | None = None  # the file's grid, when it is not the model's
    ivar_path: Path | None = None
    parallel: str = "thread"

    def read(self, start: int = 0, stop: int | None = None) -> InputRows:
        stop = self.n_rows if stop is None else stop
        flux = read_rows(_open_rows(self.path, "flux"), start, stop)
        finite = np.isfinite(flux)
        if self.ivar_path is None:
            weight = finite.astype(np.float32)
        else:
            ivar = read_rows(_open_rows(self.ivar_path, "inverse-variance"), start, stop)
            with np.errstate(invalid="ignore"):
                weight = np.where(finite & np.isfinite(ivar) & (ivar > 0), ivar, np.float32(0.0)).astype(np.float32)
        transform = self.preprocessing.get("flux_transform", "none")
        if transform != "none":
            flux = transform_flux(flux, transform, float(self.preprocessing.get("flux_floor", 0.0)))
        if self.wave_in is not None:  # in blocks: resampling makes a few temporaries of the block's size
            parts = [resample(flux[i : i + RESAMPLE_ROWS], weight[i : i + RESAMPLE_ROWS], self.wave_in, self.wavelength)
                     for i in range(0, len(flux), RESAMPLE_ROWS)]
            flux, weight = np.concatenate([f for f, _ in parts]), np.concatenate([w for _, w in parts])
        ids = [self.path.stem] if self.one_d else [f"{self.path.stem}:{i}" for i in range(start, stop)]
        return InputRows(flux=flux, weight=weight, ids={"id": ids}, snr=np.full(stop - start, np.nan, dtype=np.float32))


def _input_grid(path: Path, n_in: int, wavelength: np.ndarray, input_wavelength: str | None) -> np.ndarray | None:
    """None when the file's pixels are the model's; else its wavelengths, checked to cover the model's grid.

    A grid given is always read and checked, also for a file with as many pixels as the model's (another
    wavelength solution of the same length is resampled, not taken for the model's)."""
    n_pixels = len(wavelength)
    if input_wavelength is None and n_in == n_pixels:
        return None
    if input_wavelength is None:
        raise DataError(
            f"{path}: spectra have {n_in} pixels but the checkpoint's grid has {n_pixels} "
            f"({wavelength[0]:.2f}-{wavelength[-1]:.2f} A); pass input_wavelength=<.npy of {n_in} wavelengths in A> "
            "to resample them onto it"
        )
    try:
        wave_in = np.load(input_wavelength, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"input_wavelength={input_wavelength}: not a readable .npy array ({err})") from err
    if wave_in.shape != (n_in,) or wave_in.dtype.kind not in "iuf" or not np.isfinite(wave_in).all():
        raise DataError(
            f"input_wavelength={input_wavelength} holds {wave_in.dtype} {list(wave_in.shape)}; {path} needs "
            f"{n_in} finite wavelengths in A, one per pixel"
        )
    wave_in = wave_in.astype(np.float64)
    if n_in == n_pixels and np.allclose(wave_in, wavelength, rtol=1e-7, atol=0.0):
        return None  # the model's own grid: nothing to resample
    overlap = np.mean((wavelength >= wave_in.min()) & (wavelength <= wave_in.max()))
    if overlap < 0.5:
        raise DataError(
            f"{path}: its grid ({wave_in.min():.1f}-{wave_in.max():.1f} A) covers {overlap:.0%} of the checkpoint's "
            f"({wavelength[0]:.1f}-{wavelength[-1]:.1f} A); this model cannot read these spectra"
        )
    return wave_in


def open_npy(path: Path, fmt: str, preprocessing: dict, wavelength: np.ndarray,
             input_wavelength: str | None = None) -> NpyInput:
    """predict.py's reader of a `.npy` (registered in `stellarlab.data.surveys`): header, shape and grid checked
    now, rows read later (`NpyInput.read`)."""
    path = Path(path)
    flux = _open_rows(path, "flux")
    one_d = np.load(path, mmap_mode="r", allow_pickle=False).ndim == 1
    wave_in = _input_grid(path, flux.shape[1], np.asarray(wavelength, dtype=np.float64), input_wavelength)
    ivar_path = path.with_name(f"{path.stem}{IVAR_SUFFIX}.npy")
    if ivar_path.is_file():
        ivar = _open_rows(ivar_path, "inverse-variance")
        if ivar.shape != flux.shape:
            raise DataError(f"{ivar_path} holds {list(ivar.shape)} but {path} {list(flux.shape)}: the inverse variance "
                            f"beside a flux file ({path.stem}{IVAR_SUFFIX}.npy) needs one value per pixel; fix or remove it")
    else:
        ivar_path = None
    return NpyInput(path=path, n_rows=int(flux.shape[0]), one_d=one_d, wavelength=np.asarray(wavelength, dtype=np.float64),
                    preprocessing=dict(preprocessing), wave_in=wave_in, ivar_path=ivar_path)


def read_npy(path: Path, fmt: str, preprocessing: dict, wavelength: np.ndarray,
             input_wavelength: str | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Every row of a `.npy` at once: (flux, weight, ids) on the model's grid (the whole file in memory)."""
    rows = open_npy(path, fmt, preprocessing, wavelength, input_wavelength).read()
    return rows.flux, rows.weight, rows.ids["id"]


# -- reading inputs in parallel -----------------------------------------------------------------------
@dataclass
class Block:
    """What `read_block` returns: the rows of one task's inputs that could be read, and the files that could not."""

    index: int  # the task's position: blocks are put back in input order
    rows: list[tuple[int, InputRows]]  # (position of the input in the task, its rows)
    bad: list[tuple[int, str]]  # (position of the input in the task, message)


def read_block(task: tuple[int, list[tuple[object, int, int]]]) -> Block:
    """Worker entry point: rows [start, stop) of each input of the task. An input that cannot be read (truncated,
    wrong HDUs, unreadable header) does not stop the others: its DataError message is returned instead."""
    index, parts = task
    rows, bad = [], []
    for k, (source, start, stop) in enumerate(parts):
        try:
            rows.append((k, source.read(start, stop)))
        except DataError as err:
            bad.append((k, str(err)))
    return Block(index, rows, bad)


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask, e.g. under Slurm or taskset), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


#: Seconds a stopped pool's worker processes get to finish the block they are reading before they are killed.
STOP_GRACE_SECONDS = 10.0


def _leave_signals_to_the_main_process() -> None:
    """A reading worker ignores Ctrl-C and SIGTERM, which a terminal or Slurm sends to every process of the job:
    one killed while it sends a block back leaves half a message in the pool's pipe, and the main process would
    wait for the rest forever. The main process stops the pool instead (`_stop_pool`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _stop_pool(pool, grace: float) -> None:
    """Stop a pool whose results are no longer wanted (an error, a signal): no new task starts, and a worker
    process still busy after `grace` seconds (a file that never answers: a pipe, a hung network mount) is killed,
    so the command can exit. Not killed at once: a worker killed while sending its block back would leave half a
    message in the pool's pipe, which the pool's reader would wait on forever."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # shutdown() forgets them
    pool.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + grace
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


def parallel_results(function: Callable, tasks: Iterable, workers: int, parallel: str = "process",
                     in_flight: int | None = None, stop_grace: float = STOP_GRACE_SECONDS) -> Iterator:
    """`function(task)` for every task, in the order they finish, by `workers` processes or threads (1: here).

    At most `in_flight` tasks (default 2 per worker) are submitted at a time, so memory does not grow with the
    number of tasks. Results are yielded as they complete; the caller puts them in order if it needs to.
    Stopped early (an error, a signal, the caller done), the pool starts no other task (`_stop_pool`): use it
    in `contextlib.closing`, so that happens when the caller stops, not when the interpreter exits."""
    if workers <= 1:
        yield from map(function, tasks)
        return
    limit = in_flight or 2 * workers
    if parallel == "process":
        pool = ProcessPoolExecutor(max_workers=workers, initializer=_leave_signals_to_the_main_process)
    else:
        pool = ThreadPoolExecutor(max_workers=workers)
    try:
        pending: set = set()
        for task in tasks:
            pending.add(pool.submit(function, task))
            if len(pending) >= limit:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()
    except BaseException:
        _stop_pool(pool, stop_grace)
        raise
    pool.shutdown(wait=True)


__all__ = [
    "Block", "FLUX_TRANSFORMS", "NpyInput", "PARALLEL", "interpolation_weights", "open_npy", "parallel_results",
    "read_block", "read_npy", "read_rows", "resample", "transform_flux", "usable_cores",
]
