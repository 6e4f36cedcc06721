"""An on-disk array cache that a killed build can never leave half-trusted, and that loads memory-mapped.

Preprocessing survey files takes minutes; training should not repeat it. The cache folder is named by a
hash of the config that made it (plus a format version), so a changed config builds a new one. Arrays
are written into a temporary sibling folder, `meta.json` last, and the folder is renamed into place:
a folder under the final name is always complete. Arrays are plain `.npy` files, loaded with
`np.load(mmap_mode="r")`, so opening a cache costs no memory until rows are read.

`ArrayCache.writer` streams rows into preallocated `.npy` files with positional writes (no mapping), so
building a cache of any size needs only the memory of the rows in flight.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from stellarlab.errors import DataError
from stellarlab.files import atomic_folder

log = logging.getLogger(__name__)

#: Bump when the layout of cache folders changes: old folders are then simply not found.
FORMAT_VERSION = 1
META_FILE = "meta.json"


def config_hash(config: Mapping, length: int = 16) -> str:
    """Hex digest of a JSON-able config (key order does not matter) and the cache format version."""
    payload = json.dumps({"format_version": FORMAT_VERSION, "config": config}, sort_keys=True, default=str)
    return hashlib.sha1(payload.encode()).hexdigest()[:length]


class RowFile:
    """A preallocated `.npy` file filled by rows with `os.pwrite`: `rows[a:b] = values`.

    Positional writes go through the page cache without mapping the file into this process, so the
    resident memory of a build does not grow with the array size (a writable memmap would).
    """

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype):
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        with open(self.path, "wb") as fh:
            np.lib.format.write_array_header_1_0(fh, header)
            self.offset = fh.tell()
            fh.truncate(self.offset + self.row_bytes * self.shape[0])  # sparse: unwritten rows read as zeros
        self._fd = os.open(self.path, os.O_WRONLY)

    def __setitem__(self, rows: slice | int, values) -> None:
        if isinstance(rows, int):
            rows = slice(rows, rows + 1)
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise ValueError("RowFile takes contiguous row ranges only")
        values = np.ascontiguousarray(np.broadcast_to(np.asarray(values, dtype=self.dtype), (stop - start, *self.shape[1:])))
        data = memoryview(values.reshape(-1).view(np.uint8))
        position = self.offset + start * self.row_bytes
        while len(data):
            written = os.pwrite(self._fd, data, position)
            data, position = data[written:], position + written

    def close(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1


class CacheWriter:
    """What `ArrayCache.writer` yields: `writer["flux"][a:b] = rows`, `writer.meta[...] = ...`."""

    def __init__(self, folder: Path, specs: Mapping[str, tuple[tuple[int, ...], np.dtype]]):
        self.folder = folder
        self.files = {name: RowFile(folder / f"{name}.npy", shape, dtype) for name, (shape, dtype) in specs.items()}
        self.meta: dict = {}

    def __getitem__(self, name: str) -> RowFile:
        return self.files[name]

    def close(self) -> None:
        for f in self.files.values():
            f.close()


class ArrayCache:
    """A folder `<root>/<name>-<hash of config>/` of `.npy` arrays plus `meta.json` (the config and extras)."""

    def __init__(self, root: str | os.PathLike, name: str, config: Mapping):
        self.root = Path(root)
        self.name = str(name)
        self.config = json.loads(json.dumps(dict(config), sort_keys=True, default=str))  # plain, JSON-able copy
        self.key = config_hash(self.config)
        self.path = self.root / f"{self.name}-{self.key}"

    def __repr__(self) -> str:
        return f"ArrayCache({str(self.path)!r})"

    def exists(self) -> bool:
        """True when a complete cache for this config is on disk (meta.json is written last)."""
        return (self.path / META_FILE).is_file()

    @property
    def meta(self) -> dict:
        """The contents of meta.json: `config`, `arrays` (shape and dtype of each) and what the builder added."""
        try:
            return json.loads((self.path / META_FILE).read_text())
        except FileNotFoundError:
            raise DataError(f"no cache at {self.path}: build it first (prepare_data)") from None
        except (OSError, ValueError) as err:
            raise DataError(
                f"unreadable cache metadata {self.path / META_FILE} ({err}); delete {self.path} to rebuild it"
            ) from err

    def load(self, mmap: bool = True) -> dict[str, np.ndarray]:
        """Every array of the cache, memory-mapped read-only (`mmap=False` reads them into memory)."""
        meta = self.meta
        arrays = {}
        for name, spec in meta["arrays"].items():
            file = self.path / f"{name}.npy"
            try:
                arr = np.load(file, mmap_mode="r" if mmap else None, allow_pickle=False)
            except (OSError, ValueError) as err:
                raise DataError(f"unreadable cache file {file} ({err}); delete {self.path} to rebuild it") from err
            if list(arr.shape) != list(spec["shape"]) or arr.dtype.str != spec["dtype"]:
                raise DataError(
                    f"cache file {file} holds {arr.dtype.str} {list(arr.shape)}, meta.json says {spec['dtype']} "
                    f"{spec['shape']}; delete {self.path} to rebuild it"
                )
            arrays[name] = arr
        return arrays

    def remove(self) -> None:
        """Delete this config's cache (a rebuild then starts from scratch)."""
        if self.path.exists():
            shutil.rmtree(self.path)

    @contextlib.contextmanager
    def writer(
        self, specs: Mapping[str, tuple[tuple[int, ...], np.dtype | str]], meta: Mapping | None = None
    ) -> Iterator[CacheWriter]:
        """Preallocate every array in a temporary folder, yield a CacheWriter to fill them, then publish.

        On an exception nothing is published and the temporary folder is removed. If another process
        published the same cache meanwhile, its copy is kept and this one discarded.
        """
        specs = {name: (tuple(int(s) for s in shape), np.dtype(dtype)) for name, (shape, dtype) in specs.items()}
        with atomic_folder(self.path, META_FILE) as tmp:
            writer = CacheWriter(tmp, specs)
            try:
                writer.meta.update(meta or {})
                yield writer
            finally:
                writer.close()
            full_meta = {
                **writer.meta,
                "config": self.config,
                "key": self.key,
                "format_version": FORMAT_VERSION,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "arrays": {n: {"shape": list(s), "dtype": d.str} for n, (s, d) in specs.items()},
            }
            with open(tmp / META_FILE, "w") as fh:  # last: its presence marks a complete folder
                json.dump(full_meta, fh, indent=2, sort_keys=True, default=str)
                fh.flush()
                os.fsync(fh.fileno())

    def write(self, arrays: Mapping[str, np.ndarray], meta: Mapping | None = None) -> None:
        """Write whole in-memory arrays at once (same atomic publication as `writer`)."""
        arrays = {name: np.asarray(a) for name, a in arrays.items()}
        with self.writer({n: (a.shape, a.dtype) for n, a in arrays.items()}, meta) as w:
            for name, a in arrays.items():
                if a.ndim == 0:
                    raise ValueError(f"array {name!r} is a scalar; store scalars in meta instead")
                w[name][0 : a.shape[0]] = a


__all__ = ["ArrayCache", "CacheWriter", "FORMAT_VERSION", "RowFile", "config_hash"]
