"""On a CUDA device: training samples/s with the data resident on the device vs copied host-to-device
per batch, and with bf16 mixed precision vs fp32 (both through train.py's machinery, side by side),
and the naive course-style pipeline (`benchmarks/training_overhead.py`) on the same device and net.

    python benchmarks/cuda_data_path.py [--small]

Without a CUDA device it reports why it was skipped (CPU machines, CI).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.training_overhead import naive_epoch_time, stellarlab_epoch_time

VARIANTS = {
    "fp32, copied per batch": ("data.device_resident=false", "trainer.precision=32-true"),
    "fp32, resident": ("data.device_resident=true", "trainer.precision=32-true"),
    "bf16-mixed, resident": ("data.device_resident=true", "trainer.precision=bf16-mixed"),
}


def run(small: bool = False) -> dict:
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device on this machine"}
    results: dict = {"device": torch.cuda.get_device_name(0)}
    with tempfile.TemporaryDirectory() as tmp:
        for model, n in (("linear", 8192), ("mlp", 8192), ("cnn", 4096)):
            n = 1024 if small else n
            row = {}
            for name, overrides in VARIANTS.items():
                seconds, _, parts = stellarlab_epoch_time(model, n, 1 if small else 3, Path(tmp) / f"{model}-{len(row)}", overrides, accelerator="cuda")
                row[name] = (n - 2) / seconds
            train = parts["dm"].tensors["train"]
            naive_s = naive_epoch_time(parts["net"], train["flux"].numpy(), train["labels"].numpy(), parts["lr"], 1 if small else 2, device="cuda")
            row["naive (batch 32)"] = len(train["flux"]) / naive_s
            row["resident_vs_naive"] = row["fp32, resident"] / row["naive (batch 32)"]
            row["resident_speedup"] = row["fp32, resident"] / row["fp32, copied per batch"]
            row["bf16_speedup"] = row["bf16-mixed, resident"] / row["fp32, resident"]
            results[model] = row
    return results


def print_results(results: dict) -> None:
    if "skipped" in results:
        print(f"skipped: {results['skipped']}")
        return
    print(f"device: {results['device']}")
    names = [*VARIANTS, "naive (batch 32)"]
    print("samples/s per variant, then ratios")
    print(f"{'model':8s}" + "".join(f"{n:>24s}" for n in names) + f"{'resident/copied':>17s}{'bf16/fp32':>11s}{'resident/naive':>16s}")
    for model, row in results.items():
        if model == "device":
            continue
        cells = "".join(f"{row[n]:24.0f}" for n in names)
        print(f"{model:8s}{cells}{row['resident_speedup']:16.2f}x{row['bf16_speedup']:10.2f}x{row['resident_vs_naive']:15.2f}x")


if __name__ == "__main__":
    print_results(run("--small" in sys.argv))
