"""python -m benchmarks run [--small] [--only NAME ...] [--json PATH]

Runs each benchmark, prints its table and writes all figures to one JSON file
(default benchmarks/results/<date>_<time>.json). `--small` is the quick mode CI runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import time
from pathlib import Path

import torch

from stellarlab.files import write_text_atomic

# name -> module in this package; each has run(small) -> dict and print_results(dict)
BENCHMARKS = {
    "generator": "benchmarks.generator_speed",
    "training_overhead": "benchmarks.training_overhead",
    "default_run": "benchmarks.default_run",
    "apogee_preprocess": "benchmarks.apogee_preprocess",
    "startup": "benchmarks.startup",
    "crlb": "benchmarks.crlb_ratio",
    "cuda_data_path": "benchmarks.cuda_data_path",
    "memmap_scale": "benchmarks.memmap_scale",
    "malloc_reuse": "benchmarks.malloc_reuse",
    "predict_scale": "benchmarks.predict_scale",
    "data_size_curve": "benchmarks.data_size_curve",
    "emulator_fit": "benchmarks.emulator_fit",
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "list"])
    parser.add_argument("--small", action="store_true", help="quick mode (CI): small sizes, same code paths")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run only these benchmarks")
    parser.add_argument("--json", type=Path, help="where to write the figures")
    args = parser.parse_args(argv)
    if args.command == "list":
        print("\n".join(BENCHMARKS))
        return 0
    report = {
        "small": args.small,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()},
        "results": {},
    }
    for name in args.only or BENCHMARKS:
        module = importlib.import_module(BENCHMARKS[name])
        print(f"\n== {name} ==")
        start = time.perf_counter()
        results = module.run(small=args.small)
        module.print_results(results)
        report["results"][name] = results
        print(f"({time.perf_counter() - start:.1f} s)")
    path = args.json or Path(__file__).parent / "results" / (time.strftime("%Y-%m-%d_%H-%M-%S") + (".small" if args.small else "") + ".json")
    write_text_atomic(path, json.dumps(report, indent=2, default=float) + "\n")  # a kill leaves no half file
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
