"""Time to first output of the command line: `train.py --help` and a config error answer without torch.

Each command runs in a fresh process (median of a few runs); `import torch` alone is the reference
for what a command would cost if it imported the training stack before looking at its arguments.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

COMMANDS = {
    "train.py --help": ["train.py", "--help"],
    "train.py model=nope (config error)": ["train.py", "model=nope"],
    "train.py --cfg job (print the config)": ["train.py", "--cfg", "job"],
    "import torch, pytorch_lightning (reference)": ["-c", "import torch, pytorch_lightning"],
}


def _time(args: list[str], repeats: int) -> tuple[float, bool]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
    torch_loaded = False
    if args[0] == "train.py":  # did the command import torch? ask the interpreter that ran it
        probe = subprocess.run(
            [sys.executable, "-X", "importtime", *args], cwd=ROOT, capture_output=True, text=True
        )
        torch_loaded = any(line.rstrip().endswith("| torch") for line in probe.stderr.splitlines())
    return statistics.median(times), torch_loaded


def run(small: bool = False) -> dict:
    repeats = 1 if small else 3
    results = {}
    for name, args in COMMANDS.items():
        seconds, torch_loaded = _time(args, repeats)
        results[name] = {"seconds": seconds, "imports_torch": torch_loaded}
    ref = results["import torch, pytorch_lightning (reference)"]["seconds"]
    for r in results.values():
        r["ratio_to_torch_import"] = r["seconds"] / ref
    return results


def print_results(results: dict) -> None:
    print(f"{'command':45s} {'seconds':>8s} {'vs import torch':>16s} {'imports torch':>14s}")
    for name, r in results.items():
        print(f"{name:45s} {r['seconds']:8.2f} {r['ratio_to_torch_import']:15.2f}x {str(r['imports_torch']):>14s}")


if __name__ == "__main__":
    print_results(run("--small" in sys.argv))
