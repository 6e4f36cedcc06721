"""Rows of the (N, P) pixel arrays, read in memory or streamed from a memory-mapped cache, and the batches built from them.

`RowReader` reads rows of one array with positional reads (`os.preadv`) into fresh buffers, not
through the mapping: pages a mapping touched count in the process's resident memory until the kernel
drops them, the page cache behind a read does not. `PixelSource` pairs flux and weight (cleaning bad
pixels as rows are read), `SplitRows` is one split's row-indexable view of them, `BatchDataset` gathers
whole batches with one index operation.
"""

from __future__ import annotations

import mmap
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from stellarlab.errors import DataError

SCAN_BLOCK_BYTES = 1 << 24  # rows read per step of the bad-pixel scan and of copies: 16 MB
EVAL_INDEX_KEY = "index"  # val/test batches also carry their rows' positions in the split (exact DDP metrics)


def _file_region(array) -> tuple[str, int] | None:
    """(path, byte offset of row 0) when `array` is a C-contiguous 2-D view of a memory-mapped file, else None."""
    if not isinstance(array, np.memmap) or getattr(array, "_mmap", None) is None or not array.filename:
        return None
    if array.ndim != 2 or not array.flags.c_contiguous or array.size == 0:
        return None
    # np.memmap maps the file from `offset` rounded down to the allocation granularity; views keep the
    # creation offset, so the file position of this view follows from its address inside the mapping.
    mapping_start = array.offset - array.offset % mmap.ALLOCATIONGRANULARITY
    mapping_address = np.frombuffer(array._mmap, dtype=np.uint8).ctypes.data
    return str(array.filename), mapping_start + array.ctypes.data - mapping_address


class RowReader:
    """Rows of a 2-D array, any set of them at once, as native float32 (C-contiguous, shape (n, P)).

    A memory-mapped `.npy` is read with one positional read per run of consecutive rows (runs issued in
    file order), straight into the result: nothing stays mapped, so resident memory is the rows asked
    for. Any other array (in RAM, broadcast) is indexed directly. Pickles as (path, offset) for mapped
    files, so DataLoader workers and DDP processes reopen the file instead of copying the array.
    """

    def __init__(self, array: np.ndarray):
        if np.ndim(array) != 2:
            raise DataError(f"expected a 2-D (spectra, pixels) array, got shape {np.shape(array)}")
        self.shape = tuple(int(s) for s in array.shape)
        self.file_dtype = np.dtype(array.dtype)
        region = _file_region(array)
        self.path, self.offset = region if region else (None, 0)
        self.array = None if region else array
        self.row_bytes = self.shape[1] * self.file_dtype.itemsize
        self._fd = -1
        self._fh = None

    @property
    def mapped(self) -> bool:
        return self.path is not None

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": -1, "_fh": None}

    def __del__(self):
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
        if getattr(self, "_fh", None) is not None:
            self._fh.close()

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The given rows (any order, repeats allowed) as a new (len(rows), P) float32 array."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"row index out of range for an array of {self.shape[0]} rows")
        if not self.mapped:
            out = np.take(self.array, rows, axis=0)
            return out if out.dtype == np.float32 and out.dtype.isnative else out.astype(np.float32)
        out = np.empty((len(rows), self.shape[1]), dtype=self.file_dtype)
        if len(rows):
            self._read_into(rows, out.reshape(len(rows), -1).view(np.uint8))
        return out if self.file_dtype == np.float32 and self.file_dtype.isnative else out.astype(np.float32)

    def _read_into(self, rows: np.ndarray, raw: np.ndarray) -> None:
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1  # runs of consecutive rows: one read each
        starts = np.concatenate(([0], breaks))
        stops = np.concatenate((breaks, [len(rows)]))
        for k in np.argsort(rows[starts], kind="stable").tolist():  # in file order: readahead-friendly
            a, b = int(starts[k]), int(stops[k])
            self._pread(memoryview(raw[a:b]).cast("B"), self.offset + int(rows[a]) * self.row_bytes)

    def _pread(self, buffer: memoryview, position: int) -> None:
        if hasattr(os, "preadv"):
            if self._fd < 0:
                self._fd = os.open(self.path, os.O_RDONLY)
            while len(buffer):
                got = os.preadv(self._fd, [buffer], position)
                if got <= 0:
                    raise DataError(f"{self.path} ended early (truncated cache?); delete its cache folder to rebuild it")
                buffer, position = buffer[got:], position + got
        else:  # platforms without preadv: a private file object per process
            if self._fh is None:
                self._fh = open(self.path, "rb", buffering=0)
            self._fh.seek(position)
            while len(buffer):
                got = self._fh.readinto(buffer)
                if not got:
                    raise DataError(f"{self.path} ended early (truncated cache?); delete its cache folder to rebuild it")
                buffer = buffer[got:]


class PixelSource:
    """Flux and weight of every usable spectrum, read by row; applies the bad-pixel rule when the scan asked for it.

    The rule (non-finite or zero-weight pixels get flux 1 and weight 0) is applied per read: a read-only
    memory map cannot be fixed in place, and copying it to fix it would defeat streaming. Clean data
    (what the caches and the synthetic survey hold) skip it.
    """

    def __init__(self, flux: RowReader, weight: RowReader, needs_fix: bool):
        self.readers = {"flux": flux, "weight": weight}
        self.needs_fix = bool(needs_fix)
        self.n_pixels = flux.shape[1]

    @property
    def mapped(self) -> bool:
        return self.readers["flux"].mapped

    def read(self, key: str, rows: np.ndarray) -> np.ndarray:
        if not self.needs_fix:
            return self.readers[key].read(rows)
        flux, weight = self.readers["flux"].read(rows), self.readers["weight"].read(rows)
        bad = ~np.isfinite(flux) | ~np.isfinite(weight) | (weight <= 0)
        return np.where(bad, np.float32(1.0), flux) if key == "flux" else np.where(bad, np.float32(0.0), weight)

    def copy(self, key: str, rows: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        """All the given rows into one float32 tensor (on `out`'s device if given), a block at a time."""
        out = torch.empty((len(rows), self.n_pixels), dtype=torch.float32) if out is None else out
        step = max(1, SCAN_BLOCK_BYTES // (4 * max(self.n_pixels, 1)))
        for i in range(0, len(rows), step):
            out[i : i + step] = torch.from_numpy(self.read(key, rows[i : i + step]))
        return out


class SplitRows:
    """One split's rows of `flux` or `weight` in streaming mode: indexes like a tensor, reads on demand.

    `rows[i]`, `rows[a:b]`, `rows[index_tensor]` return float32 tensors; `numpy()` reads the whole split
    (as much memory as the in-memory copy: meant for small splits and tests).
    """

    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(self, source: PixelSource, key: str, rows: np.ndarray):
        self.source, self.key = source, key
        self.rows = np.asarray(rows, dtype=np.int64)
        self.shape = torch.Size((len(self.rows), source.n_pixels))

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"SplitRows({self.key}, {tuple(self.shape)}, streamed)"

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def element_size(self) -> int:
        return 4

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, torch.Tensor):
            key = key.cpu().numpy()
        if isinstance(key, (int, np.integer)):
            return torch.from_numpy(self.source.read(self.key, self.rows[[key]]))[0]
        return torch.from_numpy(self.source.read(self.key, self.rows[key]))

    def numpy(self) -> np.ndarray:
        return self.source.copy(self.key, self.rows).numpy()


def _gather(t: torch.Tensor | SplitRows, index: torch.Tensor) -> torch.Tensor:
    """Rows `index` of `t`. CPU tensors go through np.take, one memcpy per row: torch's index kernel is slower."""
    if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dtype == torch.float32 and not t.requires_grad:
        return torch.from_numpy(np.take(t.numpy(), index.numpy(), axis=0))
    return t[index]


class BatchDataset(Dataset):
    """Tensors indexed a whole batch at a time (`__getitems__`): one gather per tensor, no per-item Python.

    A `SplitRows` in place of a tensor reads the batch's rows from the file. `with_index=True` adds the
    rows' positions (`index`), which lets DDP evaluation drop the rows its sampler repeated.
    """

    def __init__(self, with_index: bool = False, **tensors: torch.Tensor | SplitRows):
        lengths = {len(t) for t in tensors.values()}
        if len(lengths) != 1:
            raise ValueError(f"tensors of different lengths: { {k: len(t) for k, t in tensors.items()} }")
        self.tensors = tensors
        self.length = lengths.pop()
        self.with_index = with_index
        self.device = next(iter(tensors.values())).device

    def __len__(self) -> int:
        return self.length

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long, device=self.device)
        batch = {k: _gather(t, index) for k, t in self.tensors.items()}
        if self.with_index:
            batch[EVAL_INDEX_KEY] = index
        return batch

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: t[i] for k, t in self.tensors.items()}


def keep_batch(batch):
    """collate_fn for BatchDataset: the batch is already stacked (module-level so workers can pickle it)."""
    return batch
