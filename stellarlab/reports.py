"""What a run leaves for its user: the printed table of test metrics and `metrics.json`, written atomically.

Every output file (metrics.json, sweep summaries, comparison tables and figures) is written to a
temporary file in its folder and renamed into place, so a reader (another job of a sweep, `compare`,
a crashed run's successor) never sees half a file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from stellarlab.labels import label_display, label_unit

# Files are created 0600 by mkstemp; give them the mode a plain open() would (0666 less the umask).
_UMASK = os.umask(0)
os.umask(_UMASK)
TABLE_METRICS = (("rmse", "RMSE"), ("mae", "MAE"), ("bias", "bias (median)"), ("mad_std", "mad_std"))


def format_value(value: float | None, ci=None, signed: bool = False) -> str:
    """`25.77`, or `25.77 [24.1, 27.6]` with an interval; `-` where there is no value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    text = f"{value:+.4g}" if signed else f"{value:.4g}"
    if ci:
        text += f" [{ci[0]:.4g}, {ci[1]:.4g}]"
    return text


def metrics_table(metrics: dict[str, dict[str, float]], title: str = "test metrics", caption: str | None = None) -> Table:
    """One row per label; a metric with a bootstrap interval (`rmse_ci`, ...) shows as `value [lo, hi]`."""
    table = Table(title=title, caption=escape(caption) if caption else None)
    for col in ("label", "unit", *(name for _, name in TABLE_METRICS), "N", "mean-predictor RMSE", "gain"):
        table.add_column(col, justify="left" if col in ("label", "unit") else "right")
    for name, m in metrics.items():
        base = m.get("rmse_mean_predictor", math.nan)
        gain = base / m["rmse"] if m["rmse"] > 0 else math.nan
        table.add_row(
            escape(label_display(name)),  # '[alpha/Fe]' is not a markup tag
            escape(label_unit(name)),
            *(format_value(m[key], m.get(f"{key}_ci"), signed=key == "bias") for key, _ in TABLE_METRICS),
            str(m["n"]),
            f"{base:.4g}",
            f"{gain:.1f}x",
        )
    return table


def print_metrics(metrics: dict, title: str = "test metrics", caption: str | None = None) -> None:
    Console(width=170).print(metrics_table(metrics, title, caption))


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix, so writers that go by it still work); rename on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    return path


def write_json_atomic(path: str | Path, data: dict) -> Path:
    """`data` as indented JSON (NaN allowed), written atomically."""
    return write_text_atomic(path, json.dumps(data, indent=2, allow_nan=True) + "\n")
