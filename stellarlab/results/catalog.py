"""predict.py's catalogue: gathered a chunk at a time, named and unit-tagged in the survey's own terms, written once.

Columns arrive per chunk under stellarlab's names (`teff`, `teff_err`, `teff_outside`, `snr`, ...) next to
the ids the reader or DataModule gives under the survey's names (APOGEE_ID, FIELD; sobject_id; `id`).
At the end they are renamed as the survey's catalogue names them (`stellarlab.data.surveys.CatalogNames`:
TEFF, TEFF_ERR, ... for APOGEE; teff, e_teff, ... for GALAH), get units (`stellarlab.labels.catalog_units`),
masks where there is no value (an MSE model's errors, an unknown FIELD), and the provenance of the model.
Only per-row numbers and names are kept, never spectra: a few floats per row.

FITS: the table in HDU1, provenance in both headers. astropy reads every unit back (K directly; dex and
dex(cm/s2), which the FITS standard lacks, through astropy's column serialisation in the header; the
TTYPEn comments spell every unit for other readers). ECSV keeps units and masks as text; CSV the values.
Each file is written under a temporary name and renamed, so a killed run leaves none half-written.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import hashlib
import io
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from stellarlab.data.surveys import CatalogNames
from stellarlab.errors import ConfigError
from stellarlab.files import atomic_path, write_json_atomic
from stellarlab.labels import catalog_units, label_display

#: The suffixes of per-label columns, and whether they carry the label's value unit or its error unit.
VALUE_SUFFIXES = ("", "_true", "_mean")
ERROR_SUFFIXES = ("_err", "_sigma", "_spread")
#: Generic id columns that take the catalogue's case (survey ids such as APOGEE_ID keep their own names).
GENERIC_IDS = ("id", "star_id", "row")
#: FITS header keywords of the provenance (ECSV meta and predictions.json use the long names).
PROVENANCE_KEYWORDS = {
    "stellarlab_version": "STLVERS", "checkpoint": "CKPT", "checkpoint_sha256": "CKPTSHA", "model_class": "MODEL",
    "label_names": "LABELS", "training_data": "TRAINDAT", "catalog_names": "NAMESTYL", "input": "INPUT",
    "date": "DATE", "n_spectra": "NSPECTRA", "n_skipped": "NSKIPPED",
}
DESCRIPTIONS = {
    "file": "input file", "split": "training split of the star (none: not trained on)",
    "snr": "signal-to-noise per pixel (file header, else median flux*sqrt(ivar))",
    "usable_fraction": "fraction of pixels with data",
    "flag": "bitmask of reasons not to trust the row (FLAGBITn), 0: none",
    "unlikeness": "residual vs training spectra per pixel (~1 in domain)",
    "rchi2": "reduced chi-square of the spectrum fit",
    "fit_converged": "the spectrum fit converged",
}
FORMATS = (".fits", ".csv", ".ecsv")
TEXT_ROWS = 65536  # rows formatted at a time for CSV/ECSV


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def provenance(ckpt_path: str | os.PathLike, model, preprocessing: Mapping, style: str, source: str) -> dict:
    """Where the catalogue came from: stellarlab's version, the checkpoint (path, SHA-256 of the file), the model
    class and labels, the training data's preprocessing, the naming, the input and the date (UTC, ISO 8601)."""
    import stellarlab

    return {
        "stellarlab_version": stellarlab.__version__,
        "checkpoint": str(Path(ckpt_path).resolve()),
        "checkpoint_sha256": sha256_of(ckpt_path),
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "label_names": list(model.label_names),
        "training_data": dict(preprocessing),
        "catalog_names": style,
        "input": source,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
    }


class CatalogColumns:
    """A catalogue's rows, added a chunk at a time in any order (`position` orders them), joined at the end.

    `ids` are columns under the survey's names, `values` under stellarlab's (`predict_chunk`'s, `file`, `split`).
    A column some chunks lack (a folder of apStar and .npy files) is empty (masked) in their rows."""

    def __init__(self) -> None:
        self._chunks: dict[int, tuple[dict, dict]] = {}

    def add(self, position: int, ids: Mapping[str, Sequence], values: Mapping[str, np.ndarray]) -> None:
        n = {len(v) for v in (*ids.values(), *values.values())}
        if len(n) > 1:
            raise ValueError(f"columns of different lengths in one chunk: {sorted(n)}")
        self._chunks[position] = ({k: np.asarray(v) for k, v in ids.items()}, {k: np.asarray(v) for k, v in values.items()})

    @property
    def n_rows(self) -> int:
        return sum(len(next(iter({**i, **v}.values()), [])) for i, v in self._chunks.values())

    def joined(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(ids, values): each column over all rows, in position order."""
        chunks = [self._chunks[k] for k in sorted(self._chunks)]
        return tuple(_join([c[part] for c in chunks]) for part in (0, 1))


def _join(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    names = list(dict.fromkeys(k for p in parts for k in p))
    out = {}
    for name in names:
        pieces = [p[name] for p in parts if name in p]
        kind = np.result_type(*pieces)
        filled = []
        for p in parts:
            n = len(next(iter(p.values()))) if p else 0
            if name in p:
                filled.append(p[name])
            elif kind.kind in "US":
                filled.append(np.full(n, "", dtype=kind))
            else:
                filled.append(np.full(n, np.nan))
        out[name] = np.concatenate(filled) if filled else np.array([])
    return out


def _label_key(key: str, label_names: Sequence[str]) -> tuple[str | None, str]:
    """(label, suffix) for a per-label column such as `fe_h_err` (the longest label that prefixes it), else (None, key)."""
    best = None
    for label in label_names:
        if (key == label or key.startswith(label + "_")) and (best is None or len(label) > len(best)):
            best = label
    return (best, key[len(best):]) if best is not None else (None, key)


def column_name(key: str, label_names: Sequence[str], names: CatalogNames) -> str:
    """A stellarlab column name in the survey's terms: TEFF, TEFF_ERR, TEFF_OUTSIDE, SNR (APOGEE); e_teff (GALAH)."""
    label, suffix = _label_key(key, label_names)
    if label is None:
        return names.column(key)
    if suffix == "_err":
        return names.error(label)
    return names.column(names.label(label) + suffix)


def column_unit(key: str, label_names: Sequence[str]) -> str | None:
    label, suffix = _label_key(key, label_names)
    if label is None:
        return None
    value, error = catalog_units(label)
    return value if suffix in VALUE_SUFFIXES else error if suffix in ERROR_SUFFIXES else None


def _description(key: str, label_names: Sequence[str]) -> str:
    label, suffix = _label_key(key, label_names)
    if label is None:
        return DESCRIPTIONS.get(key, key)
    what = {"": "predicted", "_err": "uncertainty of", "_true": "the data's own", "_outside": "outside training range:",
            "_spread": "spread across models of"}
    return f"{what.get(suffix, suffix.strip('_'))} {label_display(label)}"


def _ordered(values: Mapping[str, np.ndarray], label_names: Sequence[str]) -> list[str]:
    """file, split, then each label's columns together (value, error, the rest), then everything else."""
    keys = [k for k in ("file", "split") if k in values]
    for label in label_names:
        group = [k for k in values if _label_key(k, label_names)[0] == label]
        keys += sorted(group, key=lambda k: (k != label, k != f"{label}_err", 0))
    return keys + [k for k in values if k not in keys]


def _masked(values: np.ndarray):
    """A column with its missing values masked: non-finite floats, empty strings."""
    from astropy.table import Column, MaskedColumn

    values = np.asarray(values)
    if values.dtype.kind == "f":
        missing = ~np.isfinite(values)
    elif values.dtype.kind in "US":
        missing = np.char.str_len(values.astype(str)) == 0
    else:
        return Column(values)
    return MaskedColumn(values, mask=missing) if missing.any() else Column(values)


def build_table(ids: Mapping[str, np.ndarray], values: Mapping[str, np.ndarray], label_names: Sequence[str],
                names: CatalogNames, meta: Mapping | None = None):
    """The catalogue as an astropy Table: ids, then `values` renamed by `names`, with units, masks and `meta`."""
    from astropy.table import Table

    table = Table(meta=dict(meta or {}))
    for key, column in ids.items():
        name = names.column(key) if key in GENERIC_IDS else key
        table[name] = _masked(column)
        table[name].description = "identifier"
    for key in _ordered(values, label_names):
        name = column_name(key, label_names, names)
        if name in table.colnames:
            raise ValueError(f"two catalogue columns named {name}")
        table[name] = _masked(values[key])
        table[name].unit = column_unit(key, label_names)
        table[name].description = _description(key, label_names)
    return table


def _header_value(value):
    return value if isinstance(value, (bool, int, float, str)) else json.dumps(value, default=str)


def write_fits(table, path: Path) -> None:
    """The table in HDU1, with units astropy reads back (its serialised columns), provenance in both headers, and
    a TTYPEn comment giving each column's description and unit to other FITS readers."""
    import astropy.units as u
    from astropy.io import fits
    from astropy.table import Column, QTable

    meta = {PROVENANCE_KEYWORDS.get(k, k.upper()[:8]): _header_value(v) for k, v in table.meta.items()}
    plain = table.copy(copy_data=False)
    plain.meta = meta
    for col in plain.itercols():
        col.description = None  # kept in the ECSV; here the TTYPEn comments say it
    for name in plain.colnames:
        col = plain[name]
        if getattr(col, "mask", None) is not None and isinstance(col.unit, u.FunctionUnitBase):
            # astropy has no masked function quantity (log g in dex(cm/s2)): its unit would be lost, so the missing
            # values (a spectrum with too few pixels) are NaN here, as FITS stores missing floats; the ECSV masks them
            plain[name] = Column(col.filled(np.nan), name=name, unit=col.unit)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*could not be saved in native FITS format.*")
        QTable(plain).write(path, format="fits")
    with fits.open(path, mode="update") as hdul:
        for key, value in meta.items():
            hdul[0].header[key] = value
        header = hdul[1].header
        for i, col in enumerate(table.itercols(), start=1):
            unit = f" [{col.unit}]" if col.unit is not None else ""
            room = 80 - 10 - max(len(col.name) + 2, 20) - 3
            header.comments[f"TTYPE{i}"] = f"{col.description or ''}{unit}"[-room:] if unit else (col.description or "")[:room]


def _text(column) -> np.ndarray:
    """A column as CSV fields: floats in their shortest round-trip form (float32 as float32), missing values empty."""
    values = np.asarray(column)
    text = values.astype(str) if values.dtype.kind != "b" else np.where(values, "True", "False")
    mask = getattr(column, "mask", None)
    return np.where(mask, "", text) if mask is not None and np.any(mask) else text


def write_text(table, paths: Mapping[str, Path]) -> None:
    """The table as CSV (`paths[".csv"]`: a header line of names) and/or ECSV (`paths[".ecsv"]`: astropy's YAML header
    with units, descriptions and meta, then the same lines; an empty field reads back as masked). Each block of rows is
    formatted once by numpy and written by the csv module, many times faster than astropy's writers for masked columns."""
    with contextlib.ExitStack() as stack:
        writers = []
        for suffix, path in paths.items():
            fh = stack.enter_context(open(path, "w", newline=""))
            if suffix == ".ecsv":
                header = io.StringIO()
                table[:0].write(header, format="ascii.ecsv", delimiter=",")
                fh.write(header.getvalue())
            else:
                csv.writer(fh, lineterminator="\n").writerow(table.colnames)
            writers.append(csv.writer(fh, lineterminator="\n"))
        for start in range(0, len(table), TEXT_ROWS):
            block = table[start : start + TEXT_ROWS]
            rows = list(zip(*[_text(col).tolist() for col in block.itercols()]))
            for writer in writers:
                writer.writerows(rows)


def write_catalog(table, out_dir: str | os.PathLike, stem: str = "predictions",
                  formats: Sequence[str] = (".fits", ".csv", ".ecsv")) -> dict[str, Path]:
    """The table as `<stem>.fits`, `.csv` and `.ecsv`, each written to a temporary name and renamed."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create the output folder {out} ({err}); choose another with output_dir=...") from err
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ConfigError(f"unknown catalogue format(s) {unknown}; valid: {', '.join(FORMATS)}")
    finals = {suffix: out / f"{stem}{suffix}" for suffix in formats}
    try:
        with contextlib.ExitStack() as stack:  # every file under a temporary name, all renamed when all are written
            tmps = {suffix: stack.enter_context(atomic_path(final)) for suffix, final in finals.items()}
            if ".fits" in tmps:
                write_fits(table, tmps[".fits"])
            texts = {suffix: tmp for suffix, tmp in tmps.items() if suffix != ".fits"}
            if texts:
                write_text(table, texts)
    except OSError as err:
        raise ConfigError(f"cannot write the catalogue {', '.join(p.name for p in finals.values())} in {out} ({err}); "
                          "check the folder is writable or set output_dir=...") from err
    return {suffix.lstrip("."): final for suffix, final in finals.items()}


def write_summary(out_dir: str | os.PathLike, summary: Mapping, stem: str = "predictions") -> Path:
    """`<stem>.json`: counts, skipped files with their reasons, the files written, provenance, speed."""
    return write_json_atomic(Path(out_dir) / f"{stem}.json", json.loads(json.dumps(summary, default=str)))


__all__ = [
    "CatalogColumns", "PROVENANCE_KEYWORDS", "build_table", "column_name", "column_unit", "provenance", "sha256_of",
    "write_catalog", "write_fits", "write_summary", "write_text",
]
