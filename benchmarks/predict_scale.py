"""predict.py at survey scale: peak RSS and spectra/s of the whole command on a large `.npy`.

    python -m benchmarks.predict_scale            # 100,000 x 8,575 float32 flux + inverse variance (2 x 3.4 GB)
                                                  # (also without the quality flags, and flux alone)
    python -m benchmarks.predict_scale --small    # 5,000 spectra, the same code path (CI, under a minute)

The spectra are written a block at a time into a temporary folder (`flux.npy` and its inverse variance
`flux_ivar.npy`, what predict.py reads as per-pixel weights; full mode also times flux alone), a default
MLP checkpoint (conf/model/mlp.yaml's architecture on the APOGEE grid, random weights: the speed of a
forward pass does not depend on what the weights learned) is saved beside them, and
`python predict.py ckpt_path=... input=flux.npy` runs in a fresh process measured through a launcher
(benchmarks/peak_rss.py: its ru_maxrss, children included). spectra/s counts reading, predicting and
writing the FITS, CSV and ECSV catalogues (predictions.json's timings); the wall time adds the command's
start-up (Python, torch, Lightning, Hydra imports) and the figures. The files are deleted afterwards
(check free disk space: 6.9 GB for the full run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.peak_rss import run_measured

N_PIXELS = 8575
BLOCK = 2048  # rows generated at a time


def write_spectra(folder: Path, n: int, seed: int = 0, ivar: bool = True) -> Path:
    """`flux.npy` (and `flux_ivar.npy`) of n continuum-normalised noisy spectra, written a block at a time."""
    rng = np.random.default_rng(seed)
    flux = np.lib.format.open_memmap(folder / "flux.npy", mode="w+", dtype=np.float32, shape=(n, N_PIXELS))
    weight = np.lib.format.open_memmap(folder / "flux_ivar.npy", mode="w+", dtype=np.float32, shape=(n, N_PIXELS)) if ivar else None
    for start in range(0, n, BLOCK):
        rows = min(BLOCK, n - start)
        snr = rng.uniform(30, 300, (rows, 1)).astype(np.float32)
        flux[start : start + rows] = 1.0 - 0.1 * rng.random((rows, N_PIXELS), dtype=np.float32) + rng.standard_normal(
            (rows, N_PIXELS), dtype=np.float32) / snr
        if weight is not None:
            weight[start : start + rows] = np.broadcast_to(snr * snr, (rows, N_PIXELS))
        flux.flush()
    del flux, weight
    return folder / "flux.npy"


def write_checkpoint(folder: Path, flux: Path | None = None, name: str = "mlp.ckpt") -> Path:
    """A checkpoint of the default MLP (conf/model/mlp.yaml) on the APOGEE grid, laid out as train.py writes it, with
    the training domain (unlikeness components, threshold) a fit records, from the first rows of `flux`: predict.py
    scores every spectrum against it, so its cost is in the figures. Without `flux`, a checkpoint without one (no
    quality flags but the usable-pixel count): the flags' cost, side by side."""
    import pytorch_lightning as pl
    import torch
    from omegaconf import OmegaConf

    from stellarlab.grids import apogee_wavelength
    from stellarlab.models.mlp import MLPRegressor

    config = OmegaConf.to_container(OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "model" / "mlp.yaml"))
    config.pop("_target_")
    torch.manual_seed(0)
    model = MLPRegressor(N_PIXELS, ["teff", "logg", "fe_h"], label_mean=[4800.0, 2.8, -0.2], label_std=[600.0, 1.0, 0.4],
                         label_min=[3500.0, 0.0, -2.0], label_max=[7000.0, 5.0, 0.5],
                         wavelength=torch.as_tensor(apogee_wavelength()), **config)
    if flux is not None:
        from stellarlab.models.quality import TrainingDomain

        rows = np.load(flux, mmap_mode="r")[:3000]
        ivar = np.load(flux.with_name("flux_ivar.npy"), mmap_mode="r")[:3000]
        train = (torch.from_numpy(np.array(rows[:2000])), torch.from_numpy(np.array(ivar[:2000])))
        val = (torch.from_numpy(np.array(rows[2000:])), torch.from_numpy(np.array(ivar[2000:])))
        model.training_domain = TrainingDomain.fit(train, val)
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                  "pytorch-lightning_version": pl.__version__, "epoch": 0, "global_step": 0,
                  "SyntheticDataModule": {"preprocessing": {"datamodule": "SyntheticDataModule", "survey_name": "synthetic",
                                                            "survey": "apogee", "gap_deleted": False}}}
    model.on_save_checkpoint(checkpoint)
    path = folder / name
    torch.save(checkpoint, path)
    return path


def measure(folder: Path, ckpt: Path, flux: Path, n: int, label: str) -> dict:
    """predict.py on `flux` in a fresh process: wall time, peak RSS, and what its predictions.json says."""
    out = folder / f"out-{label}"
    cmd = [sys.executable, "predict.py", f"ckpt_path={ckpt}", f"input={flux}", f"paths.log_dir={out}", "progress=false"]
    _, wall, peak_mb = run_measured(cmd, timeout=1800)
    summary = json.loads(next(out.rglob("predictions.json")).read_text())
    assert summary["n_spectra"] == n, summary
    catalog_mb = sum(p.stat().st_size for p in out.rglob("predictions.*")) / 1e6
    work = summary["seconds"] + summary["write_seconds"]
    return {"input": label, "n_spectra": n, "spectra_per_s": round(n / work, 1), "read_predict_s": summary["seconds"],
            "write_s": summary["write_seconds"], "figures_s": summary["figure_seconds"], "wall_s": round(wall, 2),
            "wall_spectra_per_s": round(n / wall, 1), "peak_rss_mb": round(peak_mb, 1),
            "input_gb": round(sum(p.stat().st_size for p in folder.glob("flux*.npy")) / 1e9, 2),
            "catalog_mb": round(catalog_mb, 1), "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}


def run(small: bool = False) -> dict:
    n = 5000 if small else 100_000
    folder = Path(tempfile.mkdtemp(prefix="predict-scale-"))
    try:
        start = time.perf_counter()
        flux = write_spectra(folder, n)
        ckpt = write_checkpoint(folder, flux)
        generate = time.perf_counter() - start
        rows = [measure(folder, ckpt, flux, n, "flux+ivar")]
        if not small:
            rows.append(measure(folder, write_checkpoint(folder, name="mlp-no-flags.ckpt"), flux, n, "no-flags"))
            (folder / "flux_ivar.npy").unlink()
            rows.append(measure(folder, ckpt, flux, n, "flux"))
        return {"n_spectra": n, "n_pixels": N_PIXELS, "generate_s": round(generate, 1), "rows": rows,
                "command": "python predict.py ckpt_path=mlp.ckpt input=flux.npy progress=false",
                "targets": {"peak_rss_mb": 1500, "spectra_per_s": 5000}}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def print_results(results: dict) -> None:
    print(f"{results['n_spectra']} x {results['n_pixels']} float32 spectra; {results['command']}")
    print("spectra/s: read + predict + write the catalogue (predictions.json); wall: the whole command, start-up and figures too")
    print(f"{'input':>10} {'GB':>6} {'spectra/s':>10} {'read+pred s':>12} {'write s':>8} {'figures s':>10} {'wall s':>8} "
          f"{'wall /s':>8} {'peak RSS MB':>12} {'catalog MB':>11} {'cores':>6}")
    for r in results["rows"]:
        print(f"{r['input']:>10} {r['input_gb']:>6} {r['spectra_per_s']:>10} {r['read_predict_s']:>12} {r['write_s']:>8} "
              f"{r['figures_s']:>10} {r['wall_s']:>8} {r['wall_spectra_per_s']:>8} {r['peak_rss_mb']:>12} {r['catalog_mb']:>11} "
              f"{r['cores']:>6}")
    speed = {r["input"]: r["spectra_per_s"] for r in results["rows"]}
    if "no-flags" in speed:
        print(f"flux+ivar with the quality flags / without (no-flags: a checkpoint without a training domain): "
              f"{speed['flux+ivar'] / speed['no-flags']:.2f}x the speed")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true")
    print_results(run(parser.parse_args().small))
