"""Apply a trained checkpoint to new spectra: read them as training did, predict a chunk at a time, gather a catalogue.

A checkpoint carries everything needed: the model class and weights (with their SHA-256, checked on
reading), the label names, their normalisation and training range, the wavelength grid, the
preprocessing of the data it was trained on and a record of its split (saved by the DataModule's
`state_dict`). `predict.py` is the command-line front end.

Spectra stream: inputs are read a block at a time (FITS files in worker processes, `.npy` rows by
positional reads in threads, a DataModule's splits through `split_arrays`), each block goes through
`predict_chunk` (the one per-chunk step: every catalogue column computed from a block of spectra), and
only its columns are kept, so memory does not grow with the number of spectra. A file that cannot be
read is skipped and listed. A prediction outside the training labels' range (widened by a tolerance)
is flagged (`<label>_outside`): a model extrapolates there, or was fed garbage.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

import numpy as np

from stellarlab.data import surveys
from stellarlab.data.flux import Block, parallel_results, read_block
from stellarlab.errors import ConfigError, DataError, weights_mismatch
from stellarlab.results.catalog import CatalogColumns
from stellarlab.results.predict_block import clean, predict_chunk

log = logging.getLogger(__name__)

#: predict.py's `format=` values: auto, then each reader `stellarlab.data.surveys` knows (aspcapStar, apStar, npy).
FORMATS = ("auto", *surveys.format_names())
READER_THREADS = 2  # .npy rows are read beside the model by this many threads
READ_ROWS = 256  # rows of a .npy or a DataModule per block: a few blocks in flight stay ~100 MB whatever the input


@dataclass
class Spectra:
    """New spectra on the model's grid held in memory: one row each, with an id and the file it came from."""

    ids: list[str]
    files: list[str]
    flux: np.ndarray  # (N, P) float32, bad pixels 1
    weight: np.ndarray  # (N, P) float32, bad pixels 0
    notes: list[str] = field(default_factory=list)


# -- the checkpoint --------------------------------------------------------------------------------
def read_checkpoint(ckpt_path: str | os.PathLike) -> dict:
    """The raw checkpoint dict (tensors and plain types only), with a clear error for a bad path or file.

    Its weights are checked against the checksum saved with them: flipped bytes still unpickle."""
    import torch

    from stellarlab.models import checksum

    path = Path(ckpt_path)
    if not path.is_file():
        raise ConfigError(f"ckpt_path={ckpt_path}: no such file; checkpoints are in <run folder>/checkpoints/ (best-*.ckpt, last.ckpt)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickle from elsewhere, ...
        raise DataError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); is the file complete?") from err
    checksum.verify(checkpoint, path, "copy it again from where it was trained, or use another checkpoint of the run "
                                      "(<run folder>/checkpoints/best-*.ckpt, last.ckpt)")
    return checkpoint


def model_class_of(checkpoint: dict, ckpt_path: str | os.PathLike):
    """The LightningModule class that wrote the checkpoint (recorded by the model, or by the run's config)."""
    import hydra

    target = checkpoint.get("stellarlab", {}).get("model_class")
    if target is None:  # older checkpoints: the run folder's Hydra config names the model
        config = Path(ckpt_path).resolve().parent.parent / ".hydra" / "config.yaml"
        if config.is_file():
            from omegaconf import OmegaConf

            target = OmegaConf.load(config).model.get("_target_")
    if target is None:
        raise DataError(f"checkpoint {ckpt_path} does not say which model wrote it, and no run config lies beside it")
    return hydra.utils.get_class(target)


def _datamodule_state(checkpoint: dict) -> dict:
    for value in checkpoint.values():
        if isinstance(value, dict) and isinstance(value.get("preprocessing"), dict):
            return value
    return {}


def preprocessing_of(checkpoint: dict) -> dict:
    """The DataModule's preprocessing settings saved with the checkpoint ({} if the data did not save any)."""
    return dict(_datamodule_state(checkpoint).get("preprocessing") or {})


def split_record_of(checkpoint: dict) -> dict | None:
    """The training split's record (`SpectraDataModule.split_record`) saved with the checkpoint; None if older."""
    return _datamodule_state(checkpoint).get("split")


def load_checkpoint(ckpt_path: str | os.PathLike, map_location: str = "cpu"):
    """(model in eval mode, the raw checkpoint dict) from a checkpoint written by train.py."""
    checkpoint = read_checkpoint(ckpt_path)
    cls = model_class_of(checkpoint, ckpt_path)
    try:
        model = cls.load_from_checkpoint(str(ckpt_path), map_location=map_location, weights_only=True)
    except RuntimeError as err:  # weights whose shapes the saved settings no longer build (another version's model)
        mismatch = weights_mismatch(err, ckpt_path, f"the {cls.__name__} its settings build", "it was written by another "
                                    "version of the model: retrain, or predict with the version that wrote it")
        if mismatch is None:
            raise
        raise mismatch from err
    model.eval()
    return model, checkpoint


def load_model(ckpt_path: str | os.PathLike, map_location: str = "cpu"):
    """(model in eval mode, preprocessing dict) from a checkpoint written by train.py."""
    model, checkpoint = load_checkpoint(ckpt_path, map_location)
    return model, preprocessing_of(checkpoint)


# -- finding and opening inputs ----------------------------------------------------------------------
def find_inputs(inputs: str | Sequence[str], fmt: str) -> list[Path]:
    """Files named directly, or every file of the format in a folder (sorted, so output order is stable)."""
    _check_format(fmt)
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else [str(i) for i in inputs]
    formats = surveys.input_formats() if fmt == "auto" else [surveys.input_format(fmt)]
    patterns = list(dict.fromkeys(g for f in formats for g in f.globs))
    companions = [g for f in surveys.input_formats() for g in f.skip]  # `<name>_ivar.npy`, `<name>_wavelength.npy`
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted({p for pattern in patterns for p in path.glob(pattern)  # files only: a pipe would
                            if p.is_file() and not any(fnmatchcase(p.name, c) for c in companions)})  # never answer
            if not found:
                raise DataError(f"input folder {path} holds no spectra (looked for {', '.join(patterns)})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif path.exists():
            raise DataError(f"input {path} is not a regular file (a pipe or a device); give input=<file>, <folder> "
                            f"or [<file>,<file>,...]")
        else:
            raise DataError(f"input {path}: no such file or folder; give input=<file>, <folder> or [<file>,<file>,...]")
    seen: dict[Path, Path] = {}
    for path in files:  # the same spectra twice would be two rows with one id
        if path.resolve() in seen:
            raise DataError(f"input names {path} more than once (input={_listed(items)}); give each file or folder once")
        seen[path.resolve()] = path
    return files


def _listed(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else "[" + ",".join(items) + "]"


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r} is not one of {list(FORMATS)}; format=auto tells it from each file's name")


def file_format(path: Path, fmt: str) -> str:
    """`fmt`, or for format=auto the format the file's name says (`stellarlab.data.surveys.format_of_file`)."""
    if fmt != "auto":
        return fmt
    found = surveys.format_of_file(path.name)
    if found is None:
        raise DataError(f"cannot tell the format of {path} from its name; pass format={'|'.join(FORMATS[1:])}")
    return found.name


def open_input(path: Path, fmt: str, preprocessing: dict, wavelength: np.ndarray, input_wavelength: str | None = None):
    """The input of one file through its format's registered reader (`stellarlab.data.surveys.InputFormat`)."""
    kind = file_format(path, fmt)
    return surveys.load(surveys.input_format(kind).reader)(path, kind, preprocessing, wavelength, input_wavelength)


def read_spectra(files: Iterable[Path], fmt: str, preprocessing: dict, wavelength: np.ndarray,
                 input_wavelength: str | None = None) -> Spectra:
    """Every file's spectra in memory, preprocessed as the checkpoint's training data was, on its grid; the first
    file that cannot be read raises. predict.py streams instead (`stream_predictions`); this is for small inputs."""
    _check_format(fmt)
    fluxes, weights, ids, sources = [], [], [], []
    for path in files:
        rows = open_input(path, fmt, preprocessing, wavelength, input_wavelength).read()
        fluxes.append(rows.flux)
        weights.append(rows.weight)
        names = next(iter(rows.ids.values()))
        ids.extend(str(n) for n in names)
        sources.extend([str(path)] * len(names))
    flux, weight = clean(np.concatenate(fluxes), np.concatenate(weights))
    if not (weight > 0).any():
        raise no_usable_pixel(sources)
    return Spectra(ids=ids, files=sources, flux=flux, weight=weight)


def no_usable_pixel(sources: Sequence[str]) -> DataError:
    names = list(dict.fromkeys(str(s) for s in sources))
    return DataError(
        f"no input spectrum has a single usable pixel (all NaN or masked) in {', '.join(names[:3])}"
        f"{' ...' if len(names) > 3 else ''}; check that the files hold finite flux (and errors > 0)"
    )


# -- streaming ---------------------------------------------------------------------------------------
@dataclass
class Pass:
    """What a streamed pass over the inputs gathered: the catalogue's columns, the files skipped, counts."""

    columns: CatalogColumns = field(default_factory=CatalogColumns)
    skipped: list[dict] = field(default_factory=list)  # {"file": ..., "error": ...}
    n_files: int = 0
    n_usable: int = 0  # rows with at least one usable pixel
    sources: list[str] = field(default_factory=list)  # the first few files read
    seconds: float = 0.0


@dataclass
class Task:
    """A block of rows to read: (input, start, stop) parts, the file of each part (none for a DataModule's rows),
    and extra columns per row."""

    index: int
    parts: list[tuple[object, int, int]]
    files: list[str]
    parallel: str
    extra: dict = field(default_factory=dict)


def file_tasks(files: Sequence[Path], fmt: str, preprocessing: dict, wavelength: np.ndarray, input_wavelength: str | None,
               rows_per_task: int, files_per_task: int, skipped: list[dict]) -> list[Task]:
    """Open every file (a file that cannot be opened goes to `skipped`) and cut them into tasks: up to
    `files_per_task` one-spectrum files of a format per task, a file of many rows in blocks of `rows_per_task`."""
    tasks: list[Task] = []
    group: list = []

    def flush():
        if group:
            tasks.append(Task(len(tasks), [(src, 0, src.n_rows) for _, src in group], [str(p) for p, _ in group], "process"))
            group.clear()

    for path in files:
        try:
            source = open_input(path, fmt, preprocessing, wavelength, input_wavelength)
        except DataError as err:
            skipped.append({"file": str(path), "error": str(err)})
            continue
        if source.parallel == "process" and source.n_rows <= files_per_task:
            if group and type(group[0][1]) is not type(source):
                flush()
            group.append((path, source))
            if len(group) >= files_per_task:
                flush()
            continue
        flush()
        for start in range(0, source.n_rows, rows_per_task):
            stop = min(start + rows_per_task, source.n_rows)
            tasks.append(Task(len(tasks), [(source, start, stop)], [str(path)], source.parallel))
    flush()
    return tasks


class _SplitRowsInput:
    """Rows of one split of a set-up DataModule, for `read_block` (read in a thread of this process)."""

    parallel = "thread"

    def __init__(self, datamodule, split: str):
        arrays = datamodule.split_arrays(split)
        self.flux, self.weight = arrays["flux"], arrays["weight"]
        self.ids = datamodule.split_ids(split)
        self.snr = arrays.get("snr")
        self.labels = arrays["labels_phys"]
        self.label_names = list(datamodule.label_names)
        self.n_rows = len(self.flux)

    def read(self, start: int, stop: int) -> surveys.InputRows:
        def rows(t):
            block = t[start:stop]
            return block.numpy() if hasattr(block, "numpy") else np.asarray(block)

        snr = np.asarray(rows(self.snr), dtype=np.float32) if self.snr is not None else None
        return surveys.InputRows(rows(self.flux), rows(self.weight), {k: v[start:stop] for k, v in self.ids.items()}, snr,
                                 labels=rows(self.labels))


def data_tasks(datamodule, rows_per_task: int, split_values: dict[str, np.ndarray] | None) -> list[Task]:
    """Blocks of every split of a set-up DataModule (train, val, test), with the SPLIT of each row when known."""
    tasks = []
    for split in datamodule.split_index:
        source = _SplitRowsInput(datamodule, split)
        for start in range(0, source.n_rows, rows_per_task):
            stop = min(start + rows_per_task, source.n_rows)
            extra = {} if split_values is None else {"split": split_values[split][start:stop]}
            tasks.append(Task(len(tasks), [(source, start, stop)], [], "thread", extra))
    return tasks


def stream_predictions(models, tasks: Sequence[Task], *, batch_size: int, trust, workers: int,
                       progress: bool = True, result: Pass | None = None) -> Pass:
    """Read every task's rows (FITS files in `workers` processes, rows in threads), predict each block as it
    arrives (`predict_chunk`) and keep only its catalogue columns. Files that cannot be read are skipped and
    recorded in the result (`skipped`); the caller decides whether that is an error."""
    from tqdm.auto import tqdm

    result = result or Pass()
    start = time.perf_counter()
    total = sum(stop - begin for t in tasks for _, begin, stop in t.parts)
    by_index = {t.index: t for t in tasks}
    result.n_files = len({f for t in tasks for f in t.files}) + len(result.skipped)
    with tqdm(total=total, desc="predicting", unit="spectra", unit_scale=True, disable=None if progress else True,
              mininterval=0.5, dynamic_ncols=True, smoothing=0.1) as bar:
        for kind, workers_of_kind in (("process", workers), ("thread", READER_THREADS)):
            work = [(t.index, t.parts) for t in tasks if t.parallel == kind]
            # closing(): an error or a signal while a block is predicted stops the readers now, not at exit
            with contextlib.closing(parallel_results(read_block, work, workers_of_kind, kind,
                                                     in_flight=workers_of_kind + 1)) as blocks:
                for block in blocks:
                    task = by_index[block.index]
                    bar.update(_predict_block(models, task, block, batch_size, trust, result))
                    if result.skipped:
                        bar.set_postfix(skipped=len(result.skipped), refresh=False)
    result.skipped.sort(key=lambda s: s["file"])  # workers finish in any order; the listing does not
    result.seconds = time.perf_counter() - start
    return result


def _predict_block(models, task: Task, block: Block, batch_size: int, trust, result: Pass) -> int:
    """Predict one block that was read and add its columns; returns the number of rows it held (read or not)."""
    for k, message in block.bad:
        result.skipped.append({"file": task.files[k] if len(task.files) > k else task.files[0], "error": message})
    n_bad = sum(task.parts[k][2] - task.parts[k][1] for k, _ in block.bad)
    if not block.rows:
        return n_bad
    rows = [r for _, r in block.rows]
    flux = rows[0].flux if len(rows) == 1 else np.concatenate([r.flux for r in rows])
    weight = rows[0].weight if len(rows) == 1 else np.concatenate([r.weight for r in rows])
    values = predict_chunk(models, flux, weight, batch_size, trust)
    header_snr = np.concatenate([r.snr if r.snr is not None else np.full(len(r.flux), np.nan) for r in rows])
    values["snr"] = np.where(np.isfinite(header_snr) & (header_snr > 0), header_snr, values["snr"]).astype(np.float32)
    files = {"file": np.concatenate([[task.files[k]] * len(r.flux) for k, r in block.rows])} if task.files else {}
    values = {**files, **task.extra, **values}
    if rows[0].labels is not None:  # a DataModule's rows: its own labels beside the predictions
        truth = np.concatenate([r.labels for r in rows])
        for j, name in enumerate(getattr(task.parts[0][0], "label_names", [])):
            values[f"{name}_true"] = truth[:, j].astype(np.float32)
    id_names = list(dict.fromkeys(k for r in rows for k in r.ids))
    ids = {name: np.concatenate([np.asarray(r.ids.get(name, [""] * len(r.flux))) for r in rows]) for name in id_names}
    result.columns.add(task.index, ids, values)
    result.n_usable += int((values["usable_fraction"] > 0).sum())
    if len(result.sources) < 4:  # named by the error when no spectrum has a usable pixel
        result.sources.extend(f for f in dict.fromkeys(task.files) if f not in result.sources)
    return len(flux) + n_bad


__all__ = [
    "FORMATS", "Pass", "Spectra", "Task", "data_tasks", "file_format", "file_tasks",
    "find_inputs", "load_checkpoint", "load_model", "model_class_of", "no_usable_pixel", "open_input",
    "preprocessing_of", "read_checkpoint", "read_spectra", "split_record_of", "stream_predictions",
]
