"""The APOGEE DR17 allStar catalogue: read it, cut it, and find each star's spectrum file.

Kept free of torch (numpy and astropy only) so the download command and worker processes can use it
cheaply. Bit numbers, column names and file names follow the SDSS DR17 data model of allStar and
apStar/aspcapStar files (docs/data-formats.md): spectra live at {TELESCOPE}/{FIELD}/<file> below the
survey's spectra folder.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from stellarlab.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: The command that fetches the catalogue and the spectra (named in every "file missing" error).
DOWNLOAD_COMMAND = "python -m stellarlab.download data=apogee"

#: Spectrum sources: pseudo-continuum-normalised aspcapStar files, or combined apStar/asStar files.
SOURCES = ("aspcapStar", "apStar")

#: ASPCAPFLAG bits (int64 column). STAR_BAD is the usual reject bit: ASPCAPFLAG == 0 is too strict in DR17.
ASPCAPFLAG_BITS = {
    "TEFF_BAD": 16,
    "LOGG_BAD": 17,
    "M_H_BAD": 19,
    "STAR_BAD": 23,
    "CHI2_BAD": 24,
    "NO_ASPCAP_RESULT": 31,
}
#: STARFLAG bits (OR of the visits' flags).
STARFLAG_BITS = {
    "BAD_PIXELS": 0,
    "VERY_BRIGHT_NEIGHBOR": 3,
    "LOW_SNR": 4,
    "BAD_RV_COMBINATION": 18,
    "RV_FAIL": 22,
}
#: EXTRATARG bits: bit 4 (value 16) marks the duplicate entries of a star observed more than once.
EXTRATARG_BITS = {"DUPLICATE": 4}
EXTRATARG_DUPLICATE = 1 << EXTRATARG_BITS["DUPLICATE"]
#: APOGEE_PIXMASK bits (HDU3 of apStar files).
PIXMASK_BITS = {
    "BADPIX": 0,
    "CRPIX": 1,
    "SATPIX": 2,
    "UNFIXABLE": 3,
    "BADDARK": 4,
    "BADFLAT": 5,
    "BADERR": 6,
    "NOSKY": 7,
    "LITTROW_GHOST": 8,
    "PERSIST_HIGH": 9,
    "PERSIST_MED": 10,
    "PERSIST_LOW": 11,
    "SIG_SKYLINE": 12,
    "SIG_TELLURIC": 13,
    "NOT_ENOUGH_PSF": 14,
}
#: The usual "bad pixel" set for machine learning: 0-7 and SIG_SKYLINE. Persistence bits can cover a
#: whole chip, so masking them would throw real data away.
DEFAULT_PIXMASK_BITS = (0, 1, 2, 3, 4, 5, 6, 7, 12)

#: Older releases and some tools write -9999 where DR17 writes NaN: both mean "no value".
MISSING_VALUE = -9999.0

#: Named selections. `rgb`: the common red-giant-branch box of APOGEE machine-learning papers.
PRESETS = {
    "rgb": {"TEFF": (3500.0, 5500.0), "LOGG": (0.0, 3.8), "FE_H": (-2.0, 0.5)},
}

#: What `apply_cuts` does when a key is not given.
DEFAULT_CUTS = {
    "preset": None,  # null or a PRESETS name
    "ranges": {},  # {COLUMN: [low, high]} inclusive; missing values fail; overrides the preset's box
    "snr_min": None,  # keep SNR >= snr_min
    "aspcapflag_bits": ["STAR_BAD"],  # reject stars with any of these ASPCAPFLAG bits (names or numbers)
    "starflag_bits": [],  # reject stars with any of these STARFLAG bits
    "drop_duplicates": True,  # reject EXTRATARG bit 4 (duplicate entries of one star)
    "telescopes": None,  # keep only these TELESCOPE values, e.g. [apo25m, lco25m]
}

#: Columns the loader reads besides the labels (others are never loaded from the 4 GB file).
IDENTITY_COLUMNS = ("APOGEE_ID", "TELESCOPE", "FIELD", "FILE")
QUALITY_COLUMNS = ("SNR", "ASPCAPFLAG", "STARFLAG", "EXTRATARG")


# -- reading ------------------------------------------------------------------------------------
def _plain_column(values: np.ndarray) -> np.ndarray:
    """A native-endian copy; byte strings become stripped str (FITS pads them with spaces)."""
    arr = np.array(values)
    if arr.dtype.kind == "S":
        return np.char.strip(np.char.decode(arr, "ascii", errors="replace"))
    if arr.dtype.kind == "U":
        return np.char.strip(arr)
    if arr.dtype.byteorder not in ("=", "|"):
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


def read_catalog(path: str | os.PathLike, columns: Iterable[str] | None = None) -> Table:
    """The allStar table (HDU 1) as an astropy Table; only `columns` (case-insensitive) when given.

    Columns absent from the file are left out here; the code that needs them says which is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"APOGEE catalogue not found: {path}. Download it with `{DOWNLOAD_COMMAND}` "
            "or point data.catalog at your copy of allStar-dr17-synspec_rev1.fits"
        )
    try:
        with fits.open(path, memmap=True) as hdul:
            try:  # index access reads HDUs 0-1 only (len() would read all of a possibly corrupt file)
                table_hdu = hdul[1]
            except IndexError:
                table_hdu = None
            if not isinstance(table_hdu, fits.BinTableHDU):
                raise DataError(
                    f"{path}: HDU 1 is not a table; an allStar catalogue holds its table in HDU 1 "
                    "(re-download the file if it is truncated)"
                )
            data = table_hdu.data
            names = list(data.columns.names)
            if columns is None:
                wanted = names
            else:
                by_upper = {n.upper(): n for n in names}
                wanted = list(dict.fromkeys(by_upper[c.upper()] for c in columns if c.upper() in by_upper))
            table = Table({n.upper(): _plain_column(data[n]) for n in wanted})
    except DataError:
        raise
    except (OSError, ValueError, TypeError, KeyError, IndexError) as err:
        raise DataError(
            f"cannot read the APOGEE catalogue {path} ({type(err).__name__}: {err}); the file looks corrupt "
            f"or truncated: delete it and download it again with `{DOWNLOAD_COMMAND}`"
        ) from err
    log.info("read %d catalogue rows (%d columns) from %s", len(table), len(table.colnames), path)
    return table


def find_column(table: Table, name: str, purpose: str = "") -> str:
    """The table's column called `name`, matched case-insensitively; DataError naming what needs it."""
    for col in table.colnames:
        if col.upper() == str(name).upper():
            return col
    why = f" (needed by {purpose})" if purpose else ""
    raise DataError(f"the catalogue has no column {str(name).upper()}{why}; its columns: {', '.join(table.colnames)}")


def missing_values(values: np.ndarray) -> np.ndarray:
    """True where a catalogue value means "no value": NaN, +-inf or -9999."""
    v = np.asarray(values, dtype=np.float64)
    return ~np.isfinite(v) | (v <= MISSING_VALUE + 0.5)


def label_array(table: Table, names: Sequence[str]) -> np.ndarray:
    """(N, L) float32 labels from catalogue columns (case-insensitive), NaN where the value is missing."""
    out = np.empty((len(table), len(names)), dtype=np.float32)
    for j, name in enumerate(names):
        col = find_column(table, name, f"label {name}")
        values = np.asarray(table[col], dtype=np.float64)
        if values.ndim != 1:
            raise DataError(f"catalogue column {col} is not a scalar column (shape {values.shape[1:]}) and cannot be a label")
        out[:, j] = np.where(missing_values(values), np.nan, values)
    return out


# -- cuts ---------------------------------------------------------------------------------------
def bit_value(bits: Iterable[int | str] | None, known: Mapping[str, int], what: str) -> int:
    """OR of the given bits, each a number (0-63) or a name from `known` (case-insensitive)."""
    value = 0
    for bit in bits or ():
        if isinstance(bit, str) and not bit.strip().lstrip("-").isdigit():
            key = bit.strip().upper()
            if key not in known:
                raise ConfigError(
                    f"{what}: unknown bit name {bit!r}; known names: "
                    f"{', '.join(f'{n} ({b})' for n, b in known.items())}, or give a bit number 0-63"
                )
            number = known[key]
        else:
            number = int(bit)
        if not 0 <= number <= 63:
            raise ConfigError(f"{what}: bit numbers are 0-63, got {bit}")
        value |= 1 << number
    return value


def _bits_text(bits, known: Mapping[str, int]) -> str:
    names = {b: n for n, b in known.items()}
    out = []
    for bit in bits:
        number = known[bit.strip().upper()] if isinstance(bit, str) and not bit.strip().isdigit() else int(bit)
        out.append(f"{names.get(number, 'bit')} ({number})" if number in names else str(number))
    return ", ".join(out)


def resolved_cuts(cuts: Mapping | None) -> dict:
    """`cuts` with defaults filled in, unknown keys refused, and the preset merged into `ranges`.

    A bare preset name is shorthand for the preset with every other cut at its default:
    `data.cuts=rgb` is `data.cuts.preset=rgb`.
    """
    if isinstance(cuts, str):
        cuts = {"preset": cuts}
    if cuts is not None and not isinstance(cuts, Mapping):
        raise ConfigError(
            f"data.cuts={cuts!r} is not a set of cuts; give a preset name (data.cuts=rgb) or its keys, "
            "e.g. data.cuts.preset=rgb data.cuts.snr_min=70 (see conf/data/apogee.yaml)"
        )
    cuts = dict(cuts or {})
    unknown = sorted(set(cuts) - set(DEFAULT_CUTS))
    if unknown:
        raise ConfigError(f"data.cuts: unknown key(s) {unknown}; valid keys: {', '.join(DEFAULT_CUTS)}")
    out = {**DEFAULT_CUTS, **cuts}
    ranges: dict[str, tuple[float, float]] = {}
    preset = out["preset"]
    if preset is not None:
        if str(preset).lower() not in PRESETS:
            raise ConfigError(f"data.cuts.preset={preset!r} is unknown; valid presets: null, {', '.join(PRESETS)}")
        ranges.update(PRESETS[str(preset).lower()])
    for col, bounds in dict(out["ranges"] or {}).items():
        bounds = list(bounds) if bounds is not None else None
        if bounds is None or len(bounds) != 2:
            raise ConfigError(f"data.cuts.ranges.{col} must be [low, high] (null for an open end), got {bounds}")
        low = -np.inf if bounds[0] is None else float(bounds[0])
        high = np.inf if bounds[1] is None else float(bounds[1])
        if low > high:
            raise ConfigError(f"data.cuts.ranges.{col}: low {low} is above high {high}")
        ranges[str(col).upper()] = (low, high)
    out["ranges"] = ranges
    out["aspcapflag_bits"] = list(out["aspcapflag_bits"] or [])
    out["starflag_bits"] = list(out["starflag_bits"] or [])
    out["telescopes"] = None if out["telescopes"] is None else [str(t) for t in out["telescopes"]]
    if out["snr_min"] is not None:
        out["snr_min"] = float(out["snr_min"])
    out["drop_duplicates"] = bool(out["drop_duplicates"])
    return out


def _bits_set(table: Table, column: str, value: int) -> np.ndarray:
    col = find_column(table, column, f"the {column} cut")
    flags = np.asarray(table[col])
    if flags.dtype.kind not in "iub":
        flags = np.where(np.isfinite(flags.astype(np.float64)), flags, 0).astype(np.int64)
    return (flags.astype(np.int64) & np.int64(value)) != 0


def apply_cuts(table: Table, cuts: Mapping | None, labels: Sequence[str] | None = None) -> tuple[Table, list[tuple[str, int]]]:
    """Apply the quality and parameter cuts in a fixed order; return the kept rows and (cut, n removed).

    Order: telescopes, EXTRATARG duplicates, STARFLAG, ASPCAPFLAG, SNR, each parameter range, then
    (given `labels`) rows whose every label is missing. Raises DataError naming the cut that left no star.
    """
    c = resolved_cuts(cuts)
    steps: list[tuple[str, str, Callable[[Table], np.ndarray]]] = []  # (name, config key, table -> keep mask)
    if c["telescopes"] is not None:
        wanted = set(c["telescopes"])
        steps.append((
            f"TELESCOPE in {sorted(wanted)}", "telescopes",
            lambda t: np.isin(np.asarray(t[find_column(t, "TELESCOPE", "the telescope cut")]).astype(str), list(wanted)),
        ))
    if c["drop_duplicates"]:
        steps.append(("EXTRATARG duplicate (bit 4)", "drop_duplicates",
                      lambda t: ~_bits_set(t, "EXTRATARG", EXTRATARG_DUPLICATE)))
    starflag = bit_value(c["starflag_bits"], STARFLAG_BITS, "data.cuts.starflag_bits")
    if starflag:
        steps.append((f"STARFLAG bits {_bits_text(c['starflag_bits'], STARFLAG_BITS)}", "starflag_bits",
                      lambda t: ~_bits_set(t, "STARFLAG", starflag)))
    aspcapflag = bit_value(c["aspcapflag_bits"], ASPCAPFLAG_BITS, "data.cuts.aspcapflag_bits")
    if aspcapflag:
        steps.append((f"ASPCAPFLAG bits {_bits_text(c['aspcapflag_bits'], ASPCAPFLAG_BITS)}", "aspcapflag_bits",
                      lambda t: ~_bits_set(t, "ASPCAPFLAG", aspcapflag)))
    if c["snr_min"] is not None:
        snr_min = c["snr_min"]

        def snr_keep(t):
            snr = np.asarray(t[find_column(t, "SNR", "data.cuts.snr_min")], dtype=np.float64)
            return ~missing_values(snr) & (snr >= snr_min)

        steps.append((f"SNR >= {snr_min:g}", "snr_min", snr_keep))
    for col, (low, high) in c["ranges"].items():
        def range_keep(t, col=col, low=low, high=high):
            v = np.asarray(t[find_column(t, col, f"the {col} range cut")], dtype=np.float64)
            return ~missing_values(v) & (v >= low) & (v <= high)

        key = "preset" if c["preset"] is not None and col in PRESETS[str(c["preset"]).lower()] else f"ranges.{col}"
        steps.append((f"{low:g} <= {col} <= {high:g}", key, range_keep))
    if labels:
        steps.append((f"every label missing ({', '.join(labels)})", "labels",
                      lambda t: np.isfinite(label_array(t, labels)).any(axis=1)))

    if len(table) == 0:
        raise DataError("the APOGEE catalogue has no rows")
    removed: list[tuple[str, int]] = []
    for name, key, keep_fn in steps:
        keep = np.asarray(keep_fn(table), dtype=bool)
        n_removed = int((~keep).sum())
        if n_removed == len(table):
            fix = ("choose data.labels that these stars have values for" if key == "labels"
                   else f"loosen data.cuts.{key}")
            raise DataError(
                f"no star left after the cut '{name}': it removed all {len(table)} remaining stars "
                f"(earlier cuts removed: {'; '.join(f'{n}: {k}' for n, k in removed) or 'nothing'}); {fix}"
            )
        if n_removed:
            table = table[keep]
        removed.append((name, n_removed))
        log.info("cut %-45s removed %7d stars, %7d left", name, n_removed, len(table))
    return table, removed


# -- file names ---------------------------------------------------------------------------------
def _text(value) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    return str(value).strip()


def _field(row, name: str) -> str:
    try:
        return _text(row[name])
    except (KeyError, IndexError, ValueError) as err:
        raise DataError(f"the catalogue has no column {name}, which names the spectrum files") from err


def spectrum_filename(apogee_id: str, telescope: str, source: str, file: str | None = None) -> str:
    """The file name of one star's spectrum (DR17): aspcapStar-dr17-<id>.fits, or the catalogue's FILE."""
    if source == "aspcapStar":
        return f"aspcapStar-dr17-{apogee_id}.fits"
    if source == "apStar":
        if file:
            return file
        prefix = "asStar" if telescope.lower().startswith("lco") else "apStar"
        return f"{prefix}-dr17-{apogee_id}.fits"
    raise ConfigError(f"data.source={source!r} is unknown; valid sources: {', '.join(SOURCES)}")


def spectrum_relpath(row, source: str) -> str:
    """`{TELESCOPE}/{FIELD}/{file}`: the path of a star's file below the spectra folder, as on the SDSS server."""
    telescope = _field(row, "TELESCOPE")
    field = _field(row, "FIELD")
    apogee_id = _field(row, "APOGEE_ID")
    file = None
    if source == "apStar":
        try:
            file = _text(row["FILE"]) or None
        except (KeyError, IndexError, ValueError):
            file = None
    return f"{telescope}/{field}/{spectrum_filename(apogee_id, telescope, source, file)}"


def spectrum_relpaths(table: Table, source: str) -> list[str]:
    """`spectrum_relpath` for every row of the table at once (column access, not row access: fast for 700k rows)."""
    telescope = np.asarray(table[find_column(table, "TELESCOPE", "the spectrum file names")]).astype(str)
    field = np.asarray(table[find_column(table, "FIELD", "the spectrum file names")]).astype(str)
    apogee_id = np.asarray(table[find_column(table, "APOGEE_ID", "the spectrum file names")]).astype(str)
    if source == "apStar" and any(c.upper() == "FILE" for c in table.colnames):
        files = np.asarray(table[find_column(table, "FILE")]).astype(str)
    else:
        files = [None] * len(table)
    return [
        f"{t.strip()}/{f.strip()}/{spectrum_filename(i.strip(), t.strip(), source, (x or '').strip() or None)}"
        for t, f, i, x in zip(telescope, field, apogee_id, files)
    ]


#: Where the SDSS Science Archive Server keeps each source (append the relative path above).
SAS_BASE = "https://data.sdss.org/sas/dr17/apogee/spectro"
SAS_DIRS = {
    "aspcapStar": f"{SAS_BASE}/aspcap/dr17/synspec_rev1",
    "apStar": f"{SAS_BASE}/redux/dr17/stars",
}
CATALOG_URL = f"{SAS_BASE}/aspcap/dr17/synspec_rev1/allStar-dr17-synspec_rev1.fits"


def spectrum_url(row, source: str) -> str:
    """The SDSS DR17 URL of a star's spectrum file."""
    if source not in SAS_DIRS:
        raise ConfigError(f"data.source={source!r} is unknown; valid sources: {', '.join(SOURCES)}")
    return f"{SAS_DIRS[source]}/{spectrum_relpath(row, source)}"


__all__ = [
    "ASPCAPFLAG_BITS", "CATALOG_URL", "DEFAULT_CUTS", "DEFAULT_PIXMASK_BITS", "DOWNLOAD_COMMAND", "EXTRATARG_BITS",
    "EXTRATARG_DUPLICATE", "IDENTITY_COLUMNS", "MISSING_VALUE", "PIXMASK_BITS", "PRESETS", "QUALITY_COLUMNS",
    "SAS_DIRS", "SOURCES", "STARFLAG_BITS", "apply_cuts", "bit_value", "find_column", "label_array",
    "missing_values", "read_catalog", "resolved_cuts", "spectrum_filename", "spectrum_relpath", "spectrum_relpaths",
    "spectrum_url",
]
