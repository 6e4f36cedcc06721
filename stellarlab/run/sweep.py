"""Sweeps that survive their failures: a failed job is recorded, the others go on, the summary lists it.

In a multirun (`python train.py -m ...`, `hparams_search=optuna`, `launcher=local|slurm`) a job that
raises (diverging loss -> TrainingError, impossible config -> ConfigError, anything else) writes
`<run folder>/metrics.json` with `status: failed` and the error, and returns a value instead of
raising: Hydra's sweepers stop the whole sweep on the first exception. For Optuna the value is the
worst possible one (+inf when minimising), which the study accepts and TPE learns to avoid;
`max_failure_rate` (a root config key, set by `hparams_search=optuna`) bounds how many trials may fail
before the study stops. hydra-optuna-sweeper 1.2 has no failure budget; 1.3 has a
`hydra.sweeper.max_failure_rate`, but it counts the failures of each batch of `n_jobs` trials, not of
the study: with the default `n_jobs=1` any single failure exceeds any rate below 1 and stops the study,
and it stops with the failed job's traceback. stellarlab's budget counts the whole study (failed
metrics.json files in the sweep folder) and stops with one error line, so it is used with both
releases; the trials never raise, so the sweeper's own option never fires.
`SweepSummary`, a Hydra callback, writes `<sweep folder>/summary.json` and prints the table at the end.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from stellarlab.errors import StellarlabError, root_cause
from stellarlab.files import write_json_atomic
from stellarlab.results.summary import FAILED, METRICS_FILE, failed_summary, read_summary, write_summary

log = logging.getLogger("stellarlab.run.sweep")


class TooManyFailures(StellarlabError, RuntimeError):
    """More trials of an Optuna study failed than `max_failure_rate` allows: the study stops."""


def in_multirun() -> bool:
    """True inside a job of a Hydra multirun (also in the processes of the submitit launchers)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _sweeper_directions(hydra_cfg) -> list[str] | None:
    """['minimize'] etc. for an Optuna sweep; None for sweepers without a direction (the basic one)."""
    direction = hydra_cfg.sweeper.get("direction")
    if direction is None:
        return None
    items = list(direction) if OmegaConf.is_list(direction) or isinstance(direction, (list, tuple)) else [direction]
    # 'minimize', or optuna_sweeper's Direction enum (Direction.minimize)
    return [str(getattr(d, "name", d)).rsplit(".", 1)[-1].lower() for d in items]


def failed_value(directions: list[str] | None) -> float | list[float]:
    """What a failed job returns: the worst value for an Optuna study, NaN for other sweepers."""
    if directions is None:
        return math.nan
    worst = [math.inf if d == "minimize" else -math.inf for d in directions]
    return worst[0] if len(worst) == 1 else worst


def count_failed(sweep_dir: Path) -> int:
    """Jobs of this sweep whose metrics.json says failed."""
    return sum(1 for path in sweep_dir.rglob(METRICS_FILE) if (read_summary(path) or {}).get("status") == FAILED)


def record_failure(cfg: DictConfig, err: BaseException) -> float | list[float]:
    """Write the failed job's metrics.json and log it; return the value the sweeper gets instead of the error.

    Raises TooManyFailures once more than `max_failure_rate * n_trials` trials of an Optuna study failed.
    """
    cause = root_cause(err)
    output_dir = Path(cfg.paths.output_dir)
    hydra_cfg = HydraConfig.get()
    write_summary(output_dir, failed_summary(output_dir, cfg.get("optimized_metric"), err, cause))
    if isinstance(cause, StellarlabError):
        log.error("job %s failed: %s: %s", hydra_cfg.job.get("num"), type(cause).__name__, cause)
    else:  # not a known failure mode: keep the traceback in the job's log
        log.error("job %s failed", hydra_cfg.job.get("num"), exc_info=err)

    directions = _sweeper_directions(hydra_cfg)
    n_trials = hydra_cfg.sweeper.get("n_trials")
    if directions is not None and n_trials:  # an Optuna study: failures are bounded
        rate = float(cfg.get("max_failure_rate", 0.0))
        n_failed = count_failed(Path(hydra_cfg.sweep.dir))
        if n_failed > rate * int(n_trials):
            raise TooManyFailures(
                f"{n_failed} of at most {int(n_trials)} trials failed, more than max_failure_rate={rate} allows; "
                f"the study stops. Last failure: {type(cause).__name__}: {cause}"
            ) from err
    log.info("recorded as failed in %s; the other jobs of the sweep go on", output_dir / METRICS_FILE)
    return failed_value(directions)


def _sqlite_file(storage: Any) -> Path | None:
    url = str(storage or "")
    if not url.startswith("sqlite:///") or url.endswith(":memory:"):
        return None
    return Path(url[len("sqlite:///") :])


class SweepSummary(Callback):
    """At the end of a multirun: `<sweep folder>/summary.json` and a printed table, one row per job."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Optuna creates its sqlite file before any job folder exists: make the folder it lives in.
        path = _sqlite_file(config.hydra.sweeper.get("storage"))
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from stellarlab.results.compare import collect_runs, print_runs

        sweep_dir = Path(str(config.hydra.sweep.dir))
        runs = collect_runs(sweep_dir) if sweep_dir.is_dir() else []
        summary = sweep_summary(sweep_dir, runs)
        write_json_atomic(sweep_dir / "summary.json", summary)
        if runs:  # comparison.md/.csv/.png beside the summary: the sweep's result in one place
            from stellarlab.results.compare import compare

            compare(sweep_dir)
        print_runs(runs, title=f"sweep {sweep_dir}: {summary['n_ok']} ok, {summary['n_failed']} failed, {summary['n_incomplete']} incomplete")
        log.info("sweep summary: %s; full table: %s", sweep_dir / "summary.json", sweep_dir / "comparison.md")
        not_done = summary["n_failed"] + summary["n_incomplete"]
        if not_done and _sweeper_directions(config.hydra) is None:  # a grid: every job was asked for
            # (an Optuna study's failed trials are part of its search; its budget ends it with exit 2)
            print(f"error: {not_done} of {summary['n_jobs']} jobs of the sweep did not finish (listed above, and in "
                  f"{sweep_dir / 'summary.json'}); fix the cause and rerun them, e.g. python train.py resume=<job folder>",
                  file=sys.stderr)
            sys.exit(1)


def sweep_summary(sweep_dir: Path, runs: list[dict]) -> dict:
    """The content of summary.json: counts, then each job's overrides, status, best value and error."""
    statuses = [r["status"] for r in runs]
    return {
        "sweep_dir": str(sweep_dir),
        "n_jobs": len(runs),
        "n_ok": statuses.count("ok"),
        "n_failed": statuses.count("failed"),
        "n_incomplete": statuses.count("incomplete"),
        "jobs": [
            {
                "run": r["run"],
                "overrides": r["overrides"],
                "status": r["status"],
                "optimized_metric": r["summary"].get("optimized_metric"),
                "best_value": r["summary"].get("best_value"),
                "error": r["error"],
            }
            for r in runs
        ],
    }
