"""APOGEE preprocessing speed and memory (targets: >= 50 aspcapStar files/s on 2 cores; peak memory of
preprocessing and of training from the cache that does not grow with the number of stars).

    python benchmarks/apogee_preprocess.py           # 2,000 and 20,000 stars side by side
    python benchmarks/apogee_preprocess.py --small   # 200 and 400 stars, for CI (well under a minute)

Files are generated in a temporary folder in the DR17 aspcapStar layout (flux from the built-in synthetic
generator plus noise), so they sit in the page cache: the speed is that of warm local disk. Each
measurement runs in a fresh subprocess; peak RSS is the kernel's ru_maxrss of that process (os.wait4),
and for preprocessing also of its largest worker process.
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

WORKERS = 2

_PREPROCESS = textwrap.dedent(
    """
    import json, logging, resource, sys, time
    args = json.loads(sys.argv[1])
    from stellarlab.data.apogee.datamodule import APOGEEDataModule
    dm = APOGEEDataModule(catalog=args["catalog"], spectra_dir=args["spectra_dir"], cache_dir=args["cache_dir"],
                          workers=args["workers"], parallel=args["parallel"], progress=False, rebuild=True)
    t0 = time.perf_counter()
    dm.prepare_data()
    total = time.perf_counter() - t0
    r = dm.build_report
    print(json.dumps({"n_files": r["n_stars"], "read_seconds": r["read_seconds"], "total_seconds": total,
                      "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                      "cache_mb": sum(f.stat().st_size for f in dm.cache.path.iterdir()) / 2**20}))
    """
)


def make_files(root: Path, n_stars: int, pool: np.ndarray, seed: int = 0) -> tuple[Path, Path, float]:
    """A DR17-layout survey of `n_stars` aspcapStar files; returns (catalogue, spectra folder, seconds).

    Each file gets one of the noise-free `pool` spectra plus its own noise (generating 20,000 distinct
    spectra would time the generator, not the reader).
    """
    from stellarlab.data.apogee.mock import (
        AspcapStarTemplate,
        aspcapstar_arrays,
        make_catalog,
        write_allstar,
    )

    t0 = time.perf_counter()
    cols, _ = make_catalog(n_stars, seed)
    catalog = write_allstar(root / "allStar-dr17-synspec_rev1.fits", cols)
    template = AspcapStarTemplate()
    rng = np.random.default_rng(seed)
    spectra = root / "aspcapStar"
    for i, (tel, field, sid) in enumerate(zip(cols["TELESCOPE"], cols["FIELD"], cols["APOGEE_ID"])):
        flux, err = aspcapstar_arrays(pool[i % len(pool)], 100.0, rng)
        template.write(spectra / tel / field / f"aspcapStar-dr17-{sid}.fits", flux, err)
    return catalog, spectra, time.perf_counter() - t0


def preprocess(catalog: Path, spectra: Path, cache_dir: Path, parallel: str = "process", workers: int = WORKERS) -> dict:
    args = {"catalog": str(catalog), "spectra_dir": str(spectra), "cache_dir": str(cache_dir), "workers": workers, "parallel": parallel}
    out, wall, peak = run_measured([sys.executable, "-c", _PREPROCESS, json.dumps(args)])
    res = json.loads(out.strip().splitlines()[-1])
    res.update(parallel=parallel, workers=workers, files_per_s=res["n_files"] / res["read_seconds"], peak_rss_mb=peak, wall_s=wall)
    return res


def train_from_cache(catalog: Path, spectra: Path, cache_dir: Path, log_dir: Path, n_stars: int) -> dict:
    """`python train.py data=apogee ...` for one epoch of the linear model, on the cache built before."""
    cmd = [
        sys.executable, "train.py", "data=apogee", f"data.catalog={catalog}", f"data.spectra_dir={spectra}",
        f"paths.cache_dir={cache_dir.parent}", f"data.cache_dir={cache_dir}", f"paths.log_dir={log_dir}",
        "data.progress=false", "model=linear", "logger=csv", "trainer.max_epochs=1", "trainer.accelerator=cpu",
        "~callbacks.progress_bar", "~callbacks.figures", "data.batch_size=128",
    ]
    _, wall, peak = run_measured(cmd)
    n_pixels = 8575
    tensors_mb = n_stars * n_pixels * 4 * 2 / 2**20  # flux and weight as float32 tensors
    return {"wall_s": wall, "peak_rss_mb": peak, "tensors_mb": tensors_mb, "overhead_mb": peak - tensors_mb}


def baseline_rss() -> float:
    """Peak RSS of a process that only imports the training stack (torch, Lightning, the DataModule)."""
    _, _, peak = run_measured([sys.executable, "-c", "import train, stellarlab.data.apogee.datamodule, pytorch_lightning"])
    return peak


def run(small: bool = False) -> dict:
    """Preprocess and train at two sizes (plus, in full mode, thread pool and single process at the smaller)."""
    from stellarlab.data.apogee.mock import clean_spectra
    from stellarlab.synthetic import sample_labels

    sizes = (200, 400) if small else (2_000, 20_000)
    pool = clean_spectra(sample_labels(32 if small else 128, seed=0))
    results: dict = {"sizes": list(sizes), "workers": WORKERS, "baseline_rss_mb": baseline_rss(), "by_size": {}}
    tmp = Path(tempfile.mkdtemp(prefix="stellarlab-apogee-bench-"))
    try:
        for n in sizes:
            root = tmp / f"n{n}"
            catalog, spectra, make_s = make_files(root, n, pool, seed=n)
            cache = root / "cache" / "apogee"
            entry = {"make_files_s": make_s, "preprocess": preprocess(catalog, spectra, cache, "process")}
            if n == sizes[0] and not small:
                entry["preprocess_thread"] = preprocess(catalog, spectra, root / "cache-thread", "thread")
                entry["preprocess_one_worker"] = preprocess(catalog, spectra, root / "cache-one", "process", workers=1)
            entry["train"] = train_from_cache(catalog, spectra, cache, root / "outputs", n)
            results["by_size"][str(n)] = entry
            shutil.rmtree(root, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def print_results(res: dict) -> None:
    sizes = [str(n) for n in res["sizes"]]
    by = res["by_size"]
    print(f"APOGEE aspcapStar preprocessing, {res['workers']} workers (process pool), warm page cache; "
          f"import-only process: {res['baseline_rss_mb']:.0f} MB")
    print(f"{'stars':>7} | {'files/s':>8} | {'build s':>7} | {'cache MB':>8} | {'peak RSS prep':>13} | {'worker peak':>11} | "
          f"{'peak RSS train':>14} | {'of which tensors':>16} | {'train wall s':>12}")
    for n in sizes:
        p, t = by[n]["preprocess"], by[n]["train"]
        print(f"{int(n):>7} | {p['files_per_s']:>8.0f} | {p['total_seconds']:>7.1f} | {p['cache_mb']:>8.0f} | "
              f"{p['peak_rss_mb']:>10.0f} MB | {p['worker_peak_rss_mb']:>8.0f} MB | {t['peak_rss_mb']:>11.0f} MB | "
              f"{t['tensors_mb']:>13.0f} MB | {t['wall_s']:>12.1f}")
    first = by[sizes[0]]
    for key, label in (("preprocess_thread", f"thread pool, {res['workers']} workers"), ("preprocess_one_worker", "one process, no pool")):
        if key in first:
            q = first[key]
            print(f"  {sizes[0]} stars with {label}: {q['files_per_s']:.0f} files/s (peak RSS {q['peak_rss_mb']:.0f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="200 and 400 stars (CI)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    res = run(small=args.small)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print_results(res)


if __name__ == "__main__":
    main()
