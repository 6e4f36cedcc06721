"""The default `python train.py` end to end (cold cache: data generation included), and every model
compared on the same default survey (SNR 100): test RMSE per label against the mean predictor and
against the Cramér–Rao bound, and for models with errors the fraction of test stars within one sigma.

    python benchmarks/default_run.py [--small]

Each model runs with its own config's defaults (the emulator's config sets its 120 epochs:
conf/model/emulator.yaml).
Targets (README): default run under 3 minutes on 2 CPU cores; every model beats the mean predictor
by more than 3x RMSE on every label; the best network clearly beats the linear model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LABELS = ("teff", "logg", "fe_h")


def train(overrides: list[str], log_dir: Path, cache_dir: Path) -> tuple[float, dict]:
    """Run train.py in a fresh process (as a user does); returns wall seconds and metrics.json."""
    cmd = [sys.executable, "train.py", *overrides, f"paths.log_dir={log_dir}", f"paths.cache_dir={cache_dir}", "~callbacks.progress_bar"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    run_dir = max((log_dir / "train" / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
    return seconds, json.loads((run_dir / "metrics.json").read_text())


MODELS = ("mlp", "linear", "ridge", "knn", "cnn", "cannon", "emulator")  # mlp is the default: first, with a cold cache
SMALL_EMULATOR = ["model.hidden_sizes=[32,32]", "model.fit_templates=32"]


def run(small: bool = False) -> dict:
    shrink = ["data.n_stars=400", "trainer.max_epochs=3"] if small else []
    results: dict = {"models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for model in MODELS:
            extra = ["callbacks.model_checkpoint.save_last=false"] if model == "knn" else []  # knn checkpoints hold the training set
            if model == "emulator":
                extra = SMALL_EMULATOR if small else []
            seconds, metrics = train([f"model={model}", *shrink, *extra], tmp / model, tmp / "cache")
            if model == "mlp":
                results["default_run_seconds_cold_cache"] = seconds
            results["models"][model] = {
                "seconds": seconds,
                "epochs": metrics["epochs"],
                "n_parameters": metrics["n_parameters"],
                "crlb_ratio": {label: c["ratio"] for label, c in (metrics.get("crlb") or {}).items()},
                "within_1sigma": {label: c["frac_within_1sigma"] for label, c in (metrics.get("calibration") or {}).items()},
                **{
                    label: {
                        "rmse": metrics["test"][label]["rmse"],
                        "mad_std": metrics["test"][label]["mad_std"],
                        "bias": metrics["test"][label]["bias"],
                        "rmse_mean_predictor": metrics["test"][label]["rmse_mean_predictor"],
                        "gain_vs_mean": metrics["test"][label]["rmse_mean_predictor"] / metrics["test"][label]["rmse"],
                    }
                    for label in LABELS
                },
            }
    linear = results["models"]["linear"]
    for name, r in results["models"].items():
        r["rmse_ratio_vs_linear"] = {label: r[label]["rmse"] / linear[label]["rmse"] for label in LABELS}
    return results


def print_results(results: dict) -> None:
    print(f"default python train.py, cold cache: {results['default_run_seconds_cold_cache']:.0f} s")
    head = "".join(f"{l + ' RMSE':>14s}{'gain':>7s}{'/lin':>6s}" for l in LABELS)
    print(f"{'model':8s}{'s':>6s}{'ep':>4s}{head}")
    for name, r in results["models"].items():
        cells = "".join(
            f"{r[l]['rmse']:14.4g}{r[l]['gain_vs_mean']:6.1f}x{r['rmse_ratio_vs_linear'][l]:6.2f}" for l in LABELS
        )
        crlb = " ".join(f"{v:.2f}" for v in r["crlb_ratio"].values())
        within = " ".join(f"{v:.2f}" for v in r["within_1sigma"].values()) or "-"
        print(f"{name:8s}{r['seconds']:6.0f}{r['epochs']:4d}{cells}   RMSE/CRLB {crlb}   |z|<1 {within}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", action="store_true")
    print_results(run(parser.parse_args().small))
