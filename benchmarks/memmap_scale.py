"""Training from a memory-mapped cache larger than memory: peak RSS, samples/s and cache read speed.

    python benchmarks/memmap_scale.py            # 20,000 and 200,000 x 8,575 float32 (0.7 and 6.9 GB per array)
    python benchmarks/memmap_scale.py --small    # 2,000 and 20,000, for CI (under a minute)

For each size a cache like the APOGEE one (flux and weight, N x 8575 float32 `.npy`, labels, star ids)
is written a block at a time into a temporary folder (generation needs ~100 MB whatever N), then in a
fresh process the linear model trains for a bounded number of steps (one torch thread) through the real
DataModule and a Lightning Trainer, streaming the flux from the file (`data.in_memory=false`). Peak RSS is the kernel's
ru_maxrss of that process (measured through a launcher, as in apogee_preprocess.py; DataLoader workers
are its children and count as a maximum, not a sum). At the smaller size the same run is repeated in
memory (`data.in_memory=true`) and (full mode) with 2 DataLoader workers. Cache read speed is measured with the
DataModule's row reader: sequential blocks and random 128-row batches, from the page cache (warm) and
after evicting the file from it (cold, `posix_fadvise DONTNEED`), beside reading the same random batches
by indexing the np.memmap (what streaming avoids: touched pages stay in the process's RSS).
The files are deleted afterwards; check free disk space (2 x 6.9 GB for the full run) first.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

from benchmarks.peak_rss import run_measured

N_PIXELS = 8575
BATCH = 128
# One intra-op thread in the measured process: on a shared machine torch's thread pool makes a linear
# model's step 3-10x slower and erratic (3,000-8,000 samples/s between identical runs), which would hide
# the data path being compared. With one thread the same runs repeat within ~10%.
THREADS = 1

# The measured training process: the real DataModule over the cache, the linear model, a Lightning Trainer.
_TRAIN = textwrap.dedent(
    """
    import json, logging, sys, time
    import numpy as np, pytorch_lightning as pl, torch
    from stellarlab.data import SpectraArrays, SpectraDataModule
    from stellarlab.models import LinearRegressor

    from omegaconf import OmegaConf
    from stellarlab.run.allocator import keep_freed_blocks

    args = json.loads(sys.argv[1])
    torch.set_num_threads(args["threads"])
    keep_freed_blocks(OmegaConf.load("conf/train.yaml").malloc_keep_block_mb)  # as train.py does

    class CacheSpectra(SpectraDataModule):
        def load_arrays(self):
            arrays = {k: np.load(f"{args['cache']}/{k}.npy", mmap_mode="r") for k in ("flux", "weight", "labels", "star_id", "wavelength")}
            return SpectraArrays(arrays["flux"], arrays["weight"], arrays["labels"], ["teff", "logg", "fe_h"],
                                 arrays["star_id"], arrays["wavelength"])

    class Timer(pl.Callback):  # steps after the warm-up, data loading included
        def on_train_batch_start(self, trainer, module, batch, i):
            if trainer.global_step == args["warmup"]:
                self.start = time.perf_counter()
        def on_train_batch_end(self, trainer, module, outputs, batch, i):
            self.end, self.steps = time.perf_counter(), trainer.global_step - args["warmup"]

    pl.seed_everything(0, verbose=False)
    t0 = time.perf_counter()
    dm = CacheSpectra(batch_size=args["batch"], eval_batch_size=1024, num_workers=args["workers"], in_memory=args["in_memory"])
    dm.setup()
    setup_s = time.perf_counter() - t0
    model = LinearRegressor(**dm.model_spec())
    timer = Timer()
    trainer = pl.Trainer(accelerator="cpu", max_steps=args["steps"], limit_val_batches=0, num_sanity_val_steps=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[timer])
    trainer.fit(model, datamodule=dm)
    steps = timer.steps
    t1 = time.perf_counter()
    trainer.test(model, datamodule=dm, verbose=False)
    test_s = time.perf_counter() - t1
    print(json.dumps({"streaming": dm.streaming, "setup_s": setup_s, "steps": steps,
                      "samples_per_s": steps * args["batch"] / (timer.end - timer.start),
                      "test_rows": len(dm.split_index["test"]), "test_s": test_s}))
    """
)

# Read speed of the cache with the DataModule's reader, and of np.memmap indexing for comparison.
_READ = textwrap.dedent(
    """
    import json, os, sys, time
    import numpy as np
    from stellarlab.data.rows import RowReader

    args = json.loads(sys.argv[1])
    path, budget = args["path"], args["bytes"]
    mm = np.load(path, mmap_mode="r")
    n, p = mm.shape
    row_bytes = p * 4
    reader = RowReader(mm)

    def evict():
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)

    def rss_mb():
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def sequential():
        rows = min(n, max(1, budget // row_bytes))
        t = time.perf_counter()
        for i in range(0, rows, 1024):
            reader.read(np.arange(i, min(i + 1024, rows)))
        return rows * row_bytes / 2**20 / (time.perf_counter() - t)

    def random_batches(read):
        rng = np.random.default_rng(0)
        batches = max(1, budget // (row_bytes * args["batch"]))
        t = time.perf_counter()
        for _ in range(batches):
            read(np.sort(rng.choice(n, args["batch"], replace=False)))
        return batches * args["batch"] * row_bytes / 2**20 / (time.perf_counter() - t)

    out = {}
    if args["cold"]:
        evict(); out["sequential_cold"] = sequential()
        evict(); out["random_cold"] = random_batches(reader.read)
    out["sequential_warm"] = sequential()
    rss0 = rss_mb()
    out["random_warm"] = random_batches(reader.read)
    out["random_warm_rss_growth_mb"] = rss_mb() - rss0
    rss0 = rss_mb()
    out["memmap_index_warm"] = random_batches(lambda rows: np.asarray(mm[rows]))
    out["memmap_index_rss_growth_mb"] = rss_mb() - rss0
    print(json.dumps(out))
    """
)


def _measured(code: str, args: dict) -> tuple[dict, float, float]:
    """Run `python -c code json(args)` in a fresh process; (its last JSON line, wall s, peak RSS MB)."""
    out, wall, peak = run_measured([sys.executable, "-c", code, json.dumps(args)])
    return json.loads(out.strip().splitlines()[-1]), wall, peak


def make_cache(root: Path, n: int, seed: int = 0) -> tuple[Path, float]:
    """An APOGEE-like cache of n spectra written a block of rows at a time; returns (folder, seconds)."""
    from stellarlab.data.cache import ArrayCache

    t0 = time.perf_counter()
    cache = ArrayCache(root, "bench", {"n": n, "seed": seed})
    rng = np.random.default_rng(seed)
    block = 2000
    pixel = np.arange(N_PIXELS, dtype=np.float32)
    specs = {
        "flux": ((n, N_PIXELS), np.float32),
        "weight": ((n, N_PIXELS), np.float32),
        "labels": ((n, 3), np.float32),
        "star_id": ((n,), np.int64),
        "wavelength": ((N_PIXELS,), np.float64),
    }
    with cache.writer(specs) as w:
        w["wavelength"][0:N_PIXELS] = 10 ** (4.179 + 6e-6 * np.arange(N_PIXELS))
        for i in range(0, n, block):
            m = min(block, n - i)
            labels = rng.normal(size=(m, 3)).astype(np.float32)
            # spectrum-like rows: a few label-dependent absorption bands plus noise, around a continuum of 1
            depth = 0.1 + 0.05 * labels[:, :1] * np.sin(pixel / 300.0)[None] + 0.03 * labels[:, 1:2] * np.cos(pixel / 97.0)[None]
            w["flux"][i : i + m] = 1.0 - np.clip(depth, 0, 1) + 0.01 * rng.standard_normal((m, N_PIXELS), dtype=np.float32)
            w["weight"][i : i + m] = np.float32(1e4)
            w["labels"][i : i + m] = labels
            w["star_id"][i : i + m] = np.arange(i, i + m)
    return cache.path, time.perf_counter() - t0


def train(cache: Path, steps: int, in_memory: bool, workers: int = 0) -> dict:
    args = {"cache": str(cache), "steps": steps, "in_memory": in_memory, "workers": workers, "batch": BATCH, "warmup": 10,
            "threads": THREADS}
    res, wall, peak = _measured(_TRAIN, args)
    return {**res, "in_memory": in_memory, "workers": workers, "wall_s": wall, "peak_rss_mb": peak}


def read_speed(cache: Path, budget_mb: int, cold: bool) -> dict:
    res, _, _ = _measured(_READ, {"path": str(cache / "flux.npy"), "bytes": budget_mb * 2**20, "batch": BATCH, "cold": cold})
    return res


def baseline_rss() -> float:
    """Peak RSS of a process that only imports the training stack."""
    _, _, peak = _measured("import pytorch_lightning, stellarlab.data.base, stellarlab.models; print({})", {})
    return peak


def run(small: bool = False) -> dict:
    """Streaming at both sizes; in memory and (full mode) 2 workers at the smaller; read speeds of each cache."""
    sizes = (2_000, 20_000) if small else (20_000, 200_000)
    steps = 60 if small else 200
    tmp = Path(tempfile.mkdtemp(prefix="stellarlab-memmap-bench-"))
    need = 2 * sizes[-1] * N_PIXELS * 4
    free = shutil.disk_usage(tmp).free
    if free < need * 1.1:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"{tmp.parent} has {free / 1e9:.1f} GB free; this benchmark writes {need / 1e9:.1f} GB")
    try:
        results: dict = {"sizes": list(sizes), "n_pixels": N_PIXELS, "batch_size": BATCH, "steps": steps,
                         "threads": THREADS, "baseline_rss_mb": baseline_rss(), "by_size": {}}
        for n in sizes:
            cache, make_s = make_cache(tmp / f"n{n}", n)
            entry = {"cache_gb_per_array": n * N_PIXELS * 4 / 1e9, "make_s": make_s}
            entry["streaming"] = train(cache, steps, in_memory=False)
            if n == sizes[0]:
                if not small:
                    entry["streaming_2_workers"] = train(cache, steps, in_memory=False, workers=2)
                entry["in_memory"] = train(cache, steps, in_memory=True)
            entry["read_mb_s"] = read_speed(cache, 256 if small else 1024, cold=not small)
            results["by_size"][str(n)] = entry
            shutil.rmtree(cache.parent, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def print_results(res: dict) -> None:
    print(f"linear model, batch {res['batch_size']}, {res['steps']} steps, {res['n_pixels']} pixels, CPU, {res['threads']} torch thread; "
          f"import-only process: {res['baseline_rss_mb']:.0f} MB")
    print(f"{'spectra':>8} | {'GB/array':>8} | {'mode':<20} | {'peak RSS':>9} | {'samples/s':>9} | {'setup s':>7} | {'test rows/s':>11}")
    for n, entry in res["by_size"].items():
        for key, label in (("streaming", "streaming"), ("streaming_2_workers", "streaming, 2 workers"), ("in_memory", "in memory")):
            if key in entry:
                r = entry[key]
                print(f"{int(n):>8} | {entry['cache_gb_per_array']:>8.2f} | {label:<20} | {r['peak_rss_mb']:>6.0f} MB | "
                      f"{r['samples_per_s']:>9.0f} | {r['setup_s']:>7.1f} | {r['test_rows'] / r['test_s']:>11.0f}")
    print("cache read speed (MB/s; warm = page cache, cold = file evicted first):")
    for n, entry in res["by_size"].items():
        r = entry["read_mb_s"]
        cold = f", sequential cold {r['sequential_cold']:.0f}, random cold {r['random_cold']:.0f}" if "random_cold" in r else ""
        print(f"  {int(n)}: sequential warm {r['sequential_warm']:.0f}, random {BATCH}-row batches warm {r['random_warm']:.0f} "
              f"(RSS +{r['random_warm_rss_growth_mb']:.0f} MB){cold}; np.memmap indexing warm {r['memmap_index_warm']:.0f} "
              f"(RSS +{r['memmap_index_rss_growth_mb']:.0f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="2,000 and 20,000 spectra (CI)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    res = run(small=args.small)
    print(json.dumps(res, indent=2)) if args.json else print_results(res)


if __name__ == "__main__":
    main()
