"""What keeping freed blocks in the process (`malloc_keep_block_mb`, stellarlab/allocator.py) is worth:
bare-loop training samples/s of the CNN at batch 128 and the linear model at batch 1024, each in fresh
processes with malloc's defaults and with train.py's setting, alternating rounds.

    python benchmarks/malloc_reuse.py [--small]

On Linux/glibc only (elsewhere the setting does nothing and this reports why it was skipped).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import textwrap

from benchmarks.peak_rss import run_measured

# One measured process: a bare loop (benchmarks/training_overhead.py) over random spectrum-like rows.
_MEASURE = textwrap.dedent(
    """
    import json, sys
    import torch
    from omegaconf import OmegaConf
    from stellarlab.run.allocator import keep_freed_blocks

    args = json.loads(sys.argv[1])
    applied = keep_freed_blocks(OmegaConf.load("conf/train.yaml").malloc_keep_block_mb) if args["keep"] else False
    from benchmarks.training_overhead import N_PIXELS, bare_epoch_time
    from stellarlab.models import CNNRegressor, LinearRegressor

    torch.manual_seed(0)
    model = (CNNRegressor if args["model"] == "cnn" else LinearRegressor)(n_pixels=N_PIXELS, label_names=["teff", "logg", "fe_h"])
    flux = 1.0 - 0.3 * torch.rand(args["n"], N_PIXELS)
    labels = torch.randn(args["n"], 3)
    seconds = bare_epoch_time(model.net, flux, labels, args["batch"], 1e-3, args["epochs"])
    print(json.dumps({"samples_per_s": args["n"] / seconds, "applied": applied}))
    """
)

CASES = {"cnn": (128, 1024), "linear": (1024, 8192)}  # model: (batch size, spectra)


def _measure(model: str, batch: int, n: int, epochs: int, keep: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # "off" means malloc's defaults
    args = json.dumps({"model": model, "batch": batch, "n": n, "epochs": epochs, "keep": keep})
    out, _, _ = run_measured([sys.executable, "-c", _MEASURE, args], env=env)
    return json.loads(out.strip().splitlines()[-1])


def run(small: bool = False) -> dict:
    if not sys.platform.startswith("linux"):
        return {"skipped": "malloc_keep_block_mb is a Linux/glibc setting"}
    rounds, epochs = (1, 1) if small else (3, 2)
    results = {}
    for model, (batch, n) in CASES.items():
        n = 2 * batch if small else n
        off, on = [], []
        for _ in range(rounds):
            off.append(_measure(model, batch, n, epochs, keep=False)["samples_per_s"])
            measured = _measure(model, batch, n, epochs, keep=True)
            if not measured["applied"]:
                return {"skipped": "mallopt refused the thresholds on this machine"}
            on.append(measured["samples_per_s"])
        results[model] = {"batch_size": batch, "defaults_samples_per_s": statistics.median(off),
                          "kept_samples_per_s": statistics.median(on), "speedup": statistics.median(on) / statistics.median(off)}
    return results


def print_results(results: dict) -> None:
    if "skipped" in results:
        print(f"skipped: {results['skipped']}")
        return
    print(f"{'model':8s} {'batch':>5s} {'malloc defaults/s':>18s} {'blocks kept/s':>14s} {'speed-up':>9s}")
    for model, r in results.items():
        print(f"{model:8s} {r['batch_size']:5d} {r['defaults_samples_per_s']:18.0f} {r['kept_samples_per_s']:14.0f} {r['speedup']:8.2f}x")


if __name__ == "__main__":
    print_results(run("--small" in sys.argv))
