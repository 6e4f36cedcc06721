"""How the networks' test error falls with the number of training stars (default synthetic survey, SNR 100).

    python benchmarks/data_size_curve.py                      # MLP and CNN on 6.4k, 12.8k, 25.6k, 51.2k training stars
    python benchmarks/data_size_curve.py --small              # two tiny sizes, tiny networks (< 60 s)
    python benchmarks/data_size_curve.py --estimate           # time the epochs at the smallest size, extrapolate the curve
    python benchmarks/data_size_curve.py --accelerator auto   # on a GPU where there is one
    python benchmarks/data_size_curve.py --models mlp --sizes 6400 12800 --json /tmp/curve.json
    python benchmarks/data_size_curve.py --models emulator --sizes 12800   # the emulator too (its config's 120 epochs)

Size N trains on a survey of N + 1600 stars (`data.n_stars`, default seed and SNR; 8000 is the default
survey) split by star counts, `data.split=[N,800,800]`, so validation and test always hold 800 stars. The
split must use every star of the survey (the Cramér–Rao bound maps split rows back to survey rows), so each
size has its own survey and its own 800 test stars: compare sizes through RMSE / Cramér–Rao bound
(`metrics.json` -> `crlb`) as well as the RMSE and its bootstrap interval. The surveys are cached under
`paths.cache_dir` (flux and weights: 0.55 GB at 8000 stars, 3.6 GB at 52 800) and streamed from the cache when
larger than `data.in_memory_max_gb`. Each run is `train.py` in a fresh process (as a user runs it, with its
allocator setting) with the repository's default model configs, stopped by early stopping (patience 10 on
val/loss) or `--max-epochs`; `--small` runs `stellarlab.train` in this process. Results are written after
every run (`--json`), so a curve cut short keeps the sizes it finished.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stellarlab.files import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
LABELS = ("teff", "logg", "fe_h")
HELD_OUT = 800  # validation and test stars at every size
SIZES = (6400, 12800, 25600, 51200)
MODELS = ("mlp", "cnn")  # the default curve; the emulator on request (--models emulator)
CHOICES = (*MODELS, "emulator")
# the networks: the repository default (conf/trainer/default.yaml), early stopping may end a run first; the
# emulator: its config's epochs (conf/model/emulator.yaml), early stopping off under its cosine decay
MAX_EPOCHS = {"mlp": 30, "cnn": 30, "emulator": 120}
SMALL_SIZES = (32, 64)
SMALL_HELD_OUT = 16
SMALL = {"mlp": ["model.hidden_sizes=[32]", "data.batch_size=16"],
         "cnn": ["model.channels=[4]", "model.kernel_sizes=[5]", "model.pool_sizes=[8]", "model.hidden_sizes=[16]",
                 "data.batch_size=16"],
         "emulator": ["model.hidden_sizes=[32]", "model.fit_templates=16", "data.batch_size=16"]}


def overrides(model: str, n_train: int, held_out: int, max_epochs: int, in_memory: str, accelerator: str = "cpu") -> list[str]:
    return [f"model={model}", f"data.n_stars={n_train + 2 * held_out}", f"data.split=[{n_train},{held_out},{held_out}]",
            f"data.in_memory={in_memory}", f"trainer.max_epochs={max_epochs}", f"trainer.accelerator={accelerator}",
            "~callbacks.progress_bar", "~callbacks.figures"]


def train(args: list[str], log_dir: Path, cache_dir: Path, in_process: bool = False) -> tuple[float, dict]:
    """`train.py` in a fresh process (as a user runs it), or `stellarlab.train` in this one: wall seconds and
    the run's metrics.json."""
    args = [*args, f"paths.log_dir={log_dir}", f"paths.cache_dir={cache_dir}"]
    start = time.perf_counter()
    if in_process:
        import stellarlab

        metrics = stellarlab.train(args)
        return time.perf_counter() - start, metrics
    cmd = [sys.executable, "train.py", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    run_dir = max((log_dir / "train" / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
    return seconds, json.loads((run_dir / "metrics.json").read_text())


def summary(seconds: float, metrics: dict, max_epochs: int) -> dict:
    """What the curve keeps of one run: per label RMSE (and its interval), the bound and their ratio; times."""
    epochs = int(metrics["epochs"])
    out = {"seconds": seconds, "train_seconds": metrics["train_seconds"], "epochs": epochs,
           "seconds_per_epoch": metrics["train_seconds"] / max(epochs, 1), "stopped_early": epochs < max_epochs,
           "split_sizes": metrics["split_sizes"], "best_checkpoint": Path(metrics["best_checkpoint"]).name, "labels": {}}
    for label in LABELS:
        test, bound = metrics["test"][label], (metrics.get("crlb") or {}).get(label, {})
        out["labels"][label] = {"rmse": test["rmse"], "rmse_ci": test.get("rmse_ci"), "crlb": bound.get("crlb"),
                                "ratio": bound.get("ratio")}
    return out


def run(small: bool = False, max_epochs: dict | None = None, sizes=None, models=MODELS, cache_dir: str | None = None,
        json_path: str | None = None, in_memory: str = "auto", accelerator: str = "cpu") -> dict:
    """Train each model at each size (smallest first, so a curve cut short keeps its small end)."""
    sizes = tuple(sizes or (SMALL_SIZES if small else SIZES))
    held_out = SMALL_HELD_OUT if small else HELD_OUT
    epochs = {m: 2 for m in models} if small else {**MAX_EPOCHS, **(max_epochs or {})}
    results: dict = {"small": small, "held_out": held_out, "snr": 100, "max_epochs": epochs,
                     "runs": {m: {} for m in models}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = Path(cache_dir) if cache_dir else tmp / "cache" if small else ROOT / "data" / "cache"
        start = time.perf_counter()
        for n_train in sizes:
            for model in models:
                args = overrides(model, n_train, held_out, epochs[model], in_memory, accelerator) + (SMALL[model] if small else [])
                seconds, metrics = train(args, tmp / f"{model}-{n_train}", cache, in_process=small)
                results["runs"][model][n_train] = summary(seconds, metrics, epochs[model])
                results["total_seconds"] = time.perf_counter() - start
                if json_path:
                    # replaced whole: a kill while writing keeps the sizes finished before
                    write_text_atomic(json_path, json.dumps(results, indent=2, default=float) + "\n")
    return results


def estimate(max_epochs: dict | None = None, cache_dir: str | None = None, in_memory: str = "auto",
             accelerator: str = "cpu") -> dict:
    """Seconds per epoch of each model at the smallest size (2 epochs each), and the whole curve extrapolated:
    epoch time grows with the training stars; each run adds its set-up, test and bound (the surveys of the larger
    sizes, generated once, are not counted: `generator_seconds_per_star` says what they cost)."""
    epochs = {**MAX_EPOCHS, **(max_epochs or {})}
    n_train = SIZES[0]
    cache = Path(cache_dir) if cache_dir else ROOT / "data" / "cache"
    out: dict = {"max_epochs": epochs, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for model in MODELS:
            seconds, metrics = train(overrides(model, n_train, HELD_OUT, 2, in_memory, accelerator), Path(tmp) / model, cache)
            per_epoch = metrics["train_seconds"] / metrics["epochs"]
            fixed = seconds - metrics["train_seconds"]  # start-up, data, test, bound (the bound is cached after a first run)
            out["models"][model] = {"seconds_per_epoch_at_%d" % n_train: per_epoch, "other_seconds": fixed,
                                    "curve_seconds_at_most": sum(per_epoch * epochs[model] * n / n_train + fixed for n in SIZES)}
    from stellarlab.synthetic import make_survey

    start = time.perf_counter()
    make_survey("apogee", n_stars=200, snr=100.0, seed=1, progress=False)  # no cache: the generator's own speed
    out["generator_seconds_per_star"] = (time.perf_counter() - start) / 200
    out["survey_seconds_if_not_cached"] = out["generator_seconds_per_star"] * sum(n + 2 * HELD_OUT for n in SIZES)
    out["curve_seconds_at_most"] = sum(m["curve_seconds_at_most"] for m in out["models"].values())
    return out


def print_results(results: dict) -> None:
    if "runs" not in results:  # --estimate
        for model, m in results["models"].items():
            print(f"{model}: " + ", ".join(f"{k} {v:.0f} s" for k, v in m.items()))
        print(f"whole curve with max_epochs {results['max_epochs']}: at most {results['curve_seconds_at_most'] / 60:.0f} min, "
              f"plus {results['survey_seconds_if_not_cached'] / 60:.0f} min for the surveys that are not cached yet "
              f"({results['generator_seconds_per_star'] * 1e3:.1f} ms per star)")
        return
    print(f"surveys of N + {2 * results['held_out']} stars at SNR {results['snr']}, val/test {results['held_out']} stars each; "
          f"max_epochs {results['max_epochs']}; {results.get('total_seconds', 0):.0f} s in all")
    head = "".join(f"{label + ' RMSE':>14s}{'/CRLB':>7s}" for label in LABELS)
    print(f"{'model':8s}{'train':>7s}{'epochs':>8s}{'s':>7s}{head}")
    for model, by_size in results["runs"].items():
        for n_train, r in by_size.items():
            cells = "".join(f"{r['labels'][label]['rmse']:14.4g}{(r['labels'][label]['ratio'] or float('nan')):7.2f}"
                            for label in LABELS)
            stop = "" if r["stopped_early"] else "+"
            print(f"{model:8s}{int(n_train):7d}{str(r['epochs']) + stop:>8s}{r['seconds']:7.0f}{cells}")
    print("(+: reached max_epochs, early stopping had not ended it)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="two tiny sizes and networks, 2 epochs (< 60 s)")
    parser.add_argument("--estimate", action="store_true", help="time 2 epochs of each model at the smallest size")
    parser.add_argument("--max-epochs", nargs="+", default=[], metavar="MODEL=N", help="e.g. mlp=30 cnn=8")
    parser.add_argument("--sizes", nargs="+", type=int, help=f"training stars (default {' '.join(map(str, SIZES))})")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=CHOICES)
    parser.add_argument("--in-memory", default="auto", choices=["auto", "true", "false"], help="data.in_memory")
    parser.add_argument("--accelerator", default="cpu", help="trainer.accelerator (auto: a GPU where there is one)")
    parser.add_argument("--cache-dir", help="survey cache (default: ./data/cache, shared with train.py)")
    parser.add_argument("--json", help="write the figures here after every run")
    args = parser.parse_args()
    max_epochs = {k: int(v) for k, v in (item.split("=", 1) for item in args.max_epochs)}
    if args.estimate:
        res = estimate(max_epochs, args.cache_dir, args.in_memory, args.accelerator)
    else:
        res = run(args.small, max_epochs, args.sizes, tuple(args.models), args.cache_dir, args.json, args.in_memory,
                  args.accelerator)
    print_results(res)


if __name__ == "__main__":
    main()
