"""The printed table of test metrics: one row per label, in physical units, with bootstrap intervals."""

from __future__ import annotations

import math

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from stellarlab.labels import label_display, label_unit

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
