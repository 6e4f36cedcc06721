"""What a run leaves for its user: the printed table of test metrics and `metrics.json`, written atomically."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from stellarlab.labels import label_display, label_unit


def metrics_table(metrics: dict[str, dict[str, float]], title: str = "test metrics") -> Table:
    table = Table(title=title)
    for col in ("label", "unit", "RMSE", "MAE", "bias (median)", "mad_std", "N", "mean-predictor RMSE", "gain"):
        table.add_column(col, justify="left" if col in ("label", "unit") else "right")
    for name, m in metrics.items():
        base = m.get("rmse_mean_predictor", math.nan)
        gain = base / m["rmse"] if m["rmse"] > 0 else math.nan
        table.add_row(
            label_display(name),
            label_unit(name),
            f"{m['rmse']:.4g}",
            f"{m['mae']:.4g}",
            f"{m['bias']:+.3g}",
            f"{m['mad_std']:.4g}",
            str(m["n"]),
            f"{base:.4g}",
            f"{gain:.1f}x",
        )
    return table


def print_metrics(metrics: dict, title: str = "test metrics") -> None:
    Console(width=130).print(metrics_table(metrics, title))


def write_json_atomic(path: str | Path, data: dict) -> Path:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, allow_nan=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
