"""Throughput of the synthetic-spectrum generator (target: >= 10,000 APOGEE spectra per minute on 2 cores).

    python benchmarks/generator_speed.py           # 10,000 spectra per survey (docs/synthetic-spectra.md sec. 3)
    python benchmarks/generator_speed.py --small   # a few hundred, for CI

Labels come from the realistic prior, so the mix of cool giants (many molecular lines) and hot dwarfs
(broad hydrogen lines) is the one make_survey sees.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from stellarlab.synthetic import SpectrumGenerator, sample_labels

BATCH_SIZE = 512


def _measure(survey: str, n: int) -> dict:
    gen = SpectrumGenerator(survey, oversample=3)
    labels = torch.from_numpy(sample_labels(n, seed=0))
    gen.generate(labels[:32])  # warm-up (allocator, FFT plans)
    t0 = time.perf_counter()
    flux = gen.generate(labels, batch_size=BATCH_SIZE)
    dt = time.perf_counter() - t0
    assert torch.isfinite(flux).all()
    return {"n_spectra": n, "seconds": dt, "spectra_per_s": n / dt, "spectra_per_min": 60.0 * n / dt,
            "n_pixels": int(flux.shape[1]), "batch_size": BATCH_SIZE}


def run(small: bool = False) -> dict:
    """Measure both surveys; returns {"apogee": {...}, "galah": {...}, "threads": 2}."""
    torch.set_num_threads(2)
    n = 300 if small else 10_000
    return {"threads": torch.get_num_threads(), "apogee": _measure("apogee", n), "galah": _measure("galah", n)}


def print_results(res: dict) -> None:
    for survey in ("apogee", "galah"):
        r = res[survey]
        print(f"{survey:7s} {r['n_spectra']:6d} spectra x {r['n_pixels']} px in {r['seconds']:6.2f} s: "
              f"{r['spectra_per_s']:7.1f} spectra/s = {r['spectra_per_min']:8.0f} spectra/min "
              f"({res['threads']} threads)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a few hundred spectra (CI)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    res = run(small=args.small)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print_results(res)


if __name__ == "__main__":
    main()
