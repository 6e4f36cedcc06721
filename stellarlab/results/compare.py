"""Compare every run below a folder: `python -m stellarlab.compare outputs/train/multiruns/<sweep>`.

Reads each run's `metrics.json` and `.hydra/overrides.yaml` (a multirun's job folders, an Optuna
study's trials, the submitit launchers' jobs, or any folder of single runs) and writes, into that
folder, `comparison.md` and `comparison.csv` (one row per run: overrides, status, parameter count,
training time, per-label test metrics with their bootstrap intervals, error) and `comparison.png`
(test RMSE per label, one bar per run, interval as error bar). Failed runs are listed with their
error; a job folder without metrics.json (killed, still running) as `incomplete`. The CSV columns are
named like the TensorBoard tags (`test/rmse_teff`, `test/rmse_lo_teff`, ...), so the table and the
HPARAMS tab of `tensorboard --logdir <folder>` show the same numbers under the same names.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import re
from pathlib import Path

from omegaconf import OmegaConf

from stellarlab.errors import DataError, command_errors
from stellarlab.files import atomic_path, write_text_atomic
from stellarlab.metrics import METRIC_NAMES
from stellarlab.results.hparams import TRAIN_SECONDS, metric_tag, summary_metrics
from stellarlab.results.reports import format_value
from stellarlab.results.summary import METRICS_FILE, read_summary, summary_problem

log = logging.getLogger("stellarlab.compare")
OUTPUTS = ("comparison.md", "comparison.csv", "comparison.png")
MARKDOWN_METRICS = (("rmse", "RMSE"), ("bias", "bias"), ("mad_std", "mad_std"))


class NoRunsError(DataError):
    """The folder holds no run: nothing to compare."""


def read_overrides(run_dir: Path) -> list[str]:
    """The command-line overrides Hydra saved for the run (`.hydra/overrides.yaml`); [] if there are none."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    return [str(o) for o in OmegaConf.to_container(OmegaConf.load(path)) or []]


def _natural_key(name: str):
    """Job folders sort as 0, 1, 2, ..., 10, not 0, 1, 10, 2."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part]


def find_run_dirs(folder: Path) -> list[Path]:
    """Folders below `folder` (or itself) with a metrics.json or Hydra's `.hydra/overrides.yaml`."""
    dirs = {p.parent for p in folder.rglob(METRICS_FILE)}
    dirs |= {p.parent.parent for p in folder.rglob("overrides.yaml") if p.parent.name == ".hydra"}
    return sorted(dirs)


def collect_runs(folder: str | Path) -> list[dict]:
    """One record per run below `folder`, in job order: name, status, overrides, error, summary, flat metrics."""
    folder = Path(folder)
    runs = []
    for run_dir in find_run_dirs(folder):
        rel = run_dir.relative_to(folder).as_posix()
        summary = read_summary(run_dir / METRICS_FILE) if (run_dir / METRICS_FILE).exists() else None
        error = None
        if summary is None:
            status = "incomplete"
            error = (
                "metrics.json unreadable"
                if (run_dir / METRICS_FILE).exists()
                else "no metrics.json: the job was killed, crashed hard or is still running"
            )
            summary = {}
        elif summary_problem(summary):
            status, error = "incomplete", f"metrics.json unusable: {summary_problem(summary)}"
            summary = {}
        else:
            status = summary.get("status") or ("ok" if "best_value" in summary else "incomplete")
            if status == "failed":
                err = summary.get("error") or {}
                error = f"{err.get('type', 'Error')}: {err.get('message', '')}"
        runs.append(
            {
                "run": rel if rel != "." else run_dir.name,
                "dir": str(run_dir),
                "status": status,
                "overrides": read_overrides(run_dir),
                "error": error,
                "summary": summary,
                "metrics": summary_metrics(summary) if status == "ok" else {},
            }
        )
    runs.sort(key=lambda r: _natural_key(r["run"]))
    return runs


def label_names(runs: list[dict]) -> list[str]:
    """Every label of every run, in the order first seen."""
    names: list[str] = []
    for run in runs:
        for name in run["summary"].get("label_names") or list(run["summary"].get("test") or {}):
            if name not in names:
                names.append(name)
    return names


def varying_overrides(runs: list[dict]) -> tuple[list[str], dict[str, list[str]]]:
    """(overrides common to every run, {run: its other overrides}): the part that tells the runs apart."""
    if len(runs) < 2:
        return [], {r["run"]: r["overrides"] for r in runs}
    common = set(runs[0]["overrides"]).intersection(*(set(r["overrides"]) for r in runs[1:]))
    ordered_common = [o for o in runs[0]["overrides"] if o in common]
    return ordered_common, {r["run"]: [o for o in r["overrides"] if o not in common] for r in runs}


def csv_columns(labels: list[str]) -> list[str]:
    cols = ["run", "status", "overrides", "optimized_metric", "best_value", "model/n_parameters", TRAIN_SECONDS, "epochs"]
    cols += ["val/loss_best", "test/loss"]
    for label in labels:
        for metric in METRIC_NAMES:
            cols += [metric_tag(metric, label), metric_tag(metric, label, "lo"), metric_tag(metric, label, "hi")]
        cols.append(metric_tag("n", label))
    return cols + ["error", "run_dir"]


TEXT_COLUMNS = ("run", "status", "overrides", "optimized_metric", "error", "run_dir")


def comparison_rows(runs: list[dict]) -> tuple[list[str], list[dict]]:
    """The comparison table: its columns and one row per run (None where a run has no value); the CSV and
    `stellarlab.load_runs` are this table."""
    labels = label_names(runs)
    cols = csv_columns(labels)
    rows = []
    for run in runs:
        s = run["summary"]
        row = {
            "run": run["run"],
            "status": run["status"],
            "overrides": " ".join(run["overrides"]),
            "optimized_metric": s.get("optimized_metric"),
            "best_value": s.get("best_value"),
            "model/n_parameters": s.get("n_parameters"),
            "epochs": s.get("epochs"),
            "error": run["error"],
            "run_dir": run["dir"],
            **run["metrics"],
        }
        for label, m in (s.get("test") or {}).items():
            row[metric_tag("n", label)] = m.get("n")
        rows.append({c: row.get(c) for c in cols})
    return cols, rows


def to_csv(runs: list[dict]) -> str:
    """One row per run; empty cells where a run has no value (failed runs, no interval)."""
    cols, rows = comparison_rows(runs)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: "" if row[c] is None else row[c] for c in cols})
    return buf.getvalue()


def _md(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _metric_header(label: str, metric: str) -> str:
    """'Teff RMSE [K]'."""
    from stellarlab.labels import label_display, label_unit

    unit = label_unit(label)
    return f"{label_display(label)} {metric}" + (f" [{unit}]" if unit else "")


def _interval_note(runs: list[dict]) -> str:
    for run in runs:
        b = run["summary"].get("bootstrap")
        if b:
            return f"{100 * float(b['level']):g}% bootstrap intervals in brackets ({b['n_resamples']} resamples of the test set)."
    return "No bootstrap intervals (bootstrap.n_resamples=0)."


def to_markdown(runs: list[dict], title: str) -> str:
    """The comparison as a Markdown table: overrides that differ, status, size, time, test metrics with intervals."""
    labels = label_names(runs)
    common, varying = varying_overrides(runs)
    counts = {s: sum(r["status"] == s for r in runs) for s in ("ok", "failed", "incomplete")}
    lines = [f"# {title}", ""]
    lines.append(f"{len(runs)} runs: {counts['ok']} ok, {counts['failed']} failed, {counts['incomplete']} incomplete.")
    if common:
        lines.append(f"Overrides common to all runs: `{' '.join(common)}`.")
    lines += [f"Test set metrics; {_interval_note(runs)}", ""]
    header = ["run", "status", "overrides", "parameters", "train time [s]", "best val loss"]
    for label in labels:
        header += [_metric_header(label, name) for _, name in MARKDOWN_METRICS]
    header.append("error")
    lines.append("| " + " | ".join(_md(h) for h in header) + " |")
    lines.append("|" + "|".join("---" if h in ("run", "status", "overrides", "error") else "---:" for h in header) + "|")
    for run in runs:
        s = run["summary"]
        cells = [
            run["run"],
            run["status"],
            " ".join(f"`{o}`" for o in varying[run["run"]]),
            f"{s['n_parameters']:,}" if s.get("n_parameters") is not None else "-",
            f"{s['train_seconds']:.1f}" if s.get("train_seconds") is not None else "-",
            format_value(s.get("best_val_loss")) if run["status"] == "ok" else "-",
        ]
        for label in labels:
            row = (s.get("test") or {}).get(label, {}) if run["status"] == "ok" else {}
            cells += [format_value(row.get(key), row.get(f"{key}_ci"), signed=key == "bias") for key, _ in MARKDOWN_METRICS]
        cells.append(run["error"] or "")
        lines.append("| " + " | ".join(_md(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def plot_comparison(runs: list[dict], path: Path) -> Path | None:
    """Test RMSE per label (one panel each), one bar per successful run with its bootstrap interval; None if no run succeeded."""
    from matplotlib.figure import Figure

    from stellarlab.labels import label_display, label_unit

    ok = [r for r in runs if r["status"] == "ok" and r["summary"].get("test")]
    if not ok:
        return None
    labels = label_names(ok)
    _, varying = varying_overrides(runs)
    names = [r["run"] + ("\n" + "\n".join(varying[r["run"]]) if varying[r["run"]] else "") for r in ok]
    colors = [f"C{i % 10}" for i in range(len(ok))]
    fig = Figure(figsize=(max(4.0, 0.9 * len(ok) + 1.5) * len(labels), 4.8), layout="constrained")
    axes = fig.subplots(1, len(labels), squeeze=False)[0]
    x = list(range(len(ok)))
    for ax, label in zip(axes, labels):
        values, lo_err, hi_err = [], [], []
        for run in ok:
            m = run["summary"]["test"].get(label, {})
            v = m.get("rmse", math.nan)
            ci = m.get("rmse_ci") or [v, v]
            values.append(v)
            lo_err.append(max(0.0, v - ci[0]))
            hi_err.append(max(0.0, ci[1] - v))
        ax.bar(x, values, color=colors, yerr=[lo_err, hi_err], capsize=4, ecolor="black")
        unit = label_unit(label)
        ax.set_title(label_display(label))
        ax.set_ylabel(f"test RMSE [{unit}]" if unit else "test RMSE")
        ax.set_xticks(x, names, rotation=45 if len(ok) > 3 else 0, ha="right" if len(ok) > 3 else "center", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    level = next((r["summary"]["bootstrap"]["level"] for r in ok if r["summary"].get("bootstrap")), None)
    title = "test RMSE per label" + (f"; error bars: {100 * float(level):g}% bootstrap interval" if level else "")
    missing = [r["run"] for r in runs if r not in ok]
    if missing:
        title += f"; not shown (failed or incomplete): {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else "")
    fig.suptitle(title, fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    return path


def print_runs(runs: list[dict], title: str) -> None:
    """A compact table for the terminal: run, status, overrides that differ, best value, test RMSE per label, error."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    labels = label_names(runs)
    _, varying = varying_overrides(runs)
    table = Table(title=title)
    for col in ("run", "status", "overrides", "best value", *(_metric_header(lb, "RMSE") for lb in labels), "error"):
        table.add_column(escape(col), justify="right" if "RMSE" in col or col == "best value" else "left", overflow="fold")
    for run in runs:
        s = run["summary"]
        rmse = [
            format_value(m.get("rmse"), m.get("rmse_ci")) if run["status"] == "ok" else "-"
            for m in ((s.get("test") or {}).get(lb, {}) for lb in labels)
        ]
        table.add_row(
            escape(run["run"]),
            {"ok": "[green]ok[/]", "failed": "[red]failed[/]"}.get(run["status"], f"[yellow]{run['status']}[/]"),
            escape(" ".join(varying[run["run"]])),
            format_value(s.get("best_value")) if run["status"] == "ok" else "-",
            *rmse,
            escape(run["error"] or ""),
        )
    Console(width=170).print(table)


def compare(folder: str | Path) -> dict[str, Path]:
    """Write comparison.md, comparison.csv and (if any run succeeded) comparison.png into `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NoRunsError(f"{folder} is not a folder; give a sweep folder such as outputs/train/multiruns/<date>_<time>_<id>")
    runs = collect_runs(folder)
    if not runs:
        raise NoRunsError(
            f"no runs under {folder}: searched it and every folder below for metrics.json and .hydra/overrides.yaml "
            "(give the folder of a multirun, an Optuna study or of single runs, e.g. outputs/train/multiruns/<sweep>)"
        )
    written = {
        "md": write_text_atomic(folder / "comparison.md", to_markdown(runs, f"Comparison of {folder.name}")),
        "csv": write_text_atomic(folder / "comparison.csv", to_csv(runs)),
    }
    png = plot_comparison(runs, folder / "comparison.png")
    if png is not None:
        written["png"] = png
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="stellarlab-compare",
        description="Compare every run below a folder (a multirun, an Optuna study, a folder of runs): "
        "writes comparison.md, comparison.csv and comparison.png into it.",
    )
    parser.add_argument("folder", type=Path, help="e.g. outputs/train/multiruns/<date>_<time>_<id>")
    args = parser.parse_args(argv)
    with command_errors(log):
        written = compare(args.folder)
        runs = collect_runs(args.folder)
    print_runs(runs, title=f"{args.folder}: {len(runs)} runs")
    for path in written.values():
        print(f"wrote {path}")
    if "png" not in written:
        print("no successful run: comparison.png not written")
    return 0
