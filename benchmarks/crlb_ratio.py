"""How close do the networks get to the Cramér–Rao bound of the synthetic survey, and are their sigmas right?

    python benchmarks/crlb_ratio.py                       # train mlp, mlp + gaussian_nll, cnn on the default survey
    python benchmarks/crlb_ratio.py --small               # tiny survey, a few epochs (CI, < 1 min)
    python benchmarks/crlb_ratio.py --run-dir outputs/train/runs/<run> [...]   # evaluate finished runs instead (any model)

For each run: test RMSE per label, the RMS over the test spectra of the per-spectrum Cramér–Rao bound
(`stellarlab.synthetic.crlb`, Fisher matrix from the generator's exact Jacobian, all four generator labels free),
and their ratio (target: < 2 for the best network at SNR 100). Then a bias-variance split: the model
predicts R fresh noise realisations of every test star (noise drawn as the survey draws it), so
MSE = bias^2 + variance per label. The variance (scatter from the noise) is what the Cramér–Rao bound
speaks to; the bias (the same error on every realisation of a star) is the network's own
approximation error, which more signal would not remove. (Predicting noise-free spectra instead would
put the networks out of distribution: the CNN's batch norm is tuned to noisy input.) With
`model.loss=gaussian_nll` it also reports the calibration of the predicted sigmas on the test set.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LABELS = ("teff", "logg", "fe_h")
MODELS = {  # name -> train.py overrides
    "mlp": ["model=mlp"],
    "mlp_nll": ["model=mlp", "model.loss=gaussian_nll"],
    "cnn": ["model=cnn"],
}
SMALL = ["data.n_stars=300", "trainer.max_epochs=2", "data.batch_size=32", "model.hidden_sizes=[32]"]
SMALL_CNN = ["model.channels=[4]", "model.kernel_sizes=[5]", "model.pool_sizes=[8]"]


def train(overrides: list[str], log_dir: Path, cache_dir: Path) -> Path:
    """Run train.py in a fresh process (as a user does); returns the run folder."""
    cmd = [sys.executable, "train.py", *overrides, f"paths.log_dir={log_dir}", f"paths.cache_dir={cache_dir}",
           "~callbacks.progress_bar", "~callbacks.figures"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return max((log_dir / "train" / "runs").iterdir(), key=lambda p: p.stat().st_mtime)


def _datamodule(run_dir: Path, cache_dir: Path | None):
    """The run's DataModule, rebuilt from its saved config (the survey comes back from the cache)."""
    import hydra
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    data = OmegaConf.to_container(cfg.data, resolve=False)  # paths.* need Hydra's runtime: set the cache here
    data["cache_dir"] = str(Path(cache_dir or ROOT / "data" / "cache") / "synthetic")
    dm = hydra.utils.instantiate(data)
    dm.prepare_data()
    dm.setup("fit")
    return dm, cfg


def _resampled_predictions(dm, model, n_realisations: int, seed: int = 0) -> np.ndarray:
    """(R, N, L) physical predictions for R fresh noise draws of each test spectrum (noise as the survey draws it)."""
    import torch

    from stellarlab.synthetic.crlb import pixel_index

    survey = dm.synthetic_survey()
    idx = dm.split_index["test"]
    gen = survey.generator()
    clean = gen.generate(np.asarray(survey.labels[idx]))
    pixels = pixel_index(gen.wavelength, dm.wavelength)
    if pixels is not None:
        clean = clean[:, pixels]
    weight = dm.tensors["test"]["weight"]
    sigma = torch.where(weight > 0, weight.clamp(min=1e-30).rsqrt(), 0.0)  # 1/SNR on the detector, 0 in the gaps
    gen_rng = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for _ in range(n_realisations):
            flux = torch.where(weight > 0, clean + sigma * torch.randn(clean.shape, generator=gen_rng), 1.0)
            out.append(torch.cat([_predict(model, f, w) for f, w in zip(flux.split(512), weight.split(512))]).numpy())
    return np.stack(out)


def _predict(model, flux, weight):
    """Physical labels; a model that fits each spectrum (the emulator, the Cannon) reads the noise from the weights."""
    if hasattr(model, "fit_spectra"):
        return model.fit_spectra(flux, weight).labels
    return model.predict_physical(flux)


def bias_variance(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RMSE, RMS bias and RMS noise scatter per label from (R, N, L) predictions of N stars (truth (N, L)), R draws each.

    variance = mean over stars of the unbiased variance over draws; bias^2 = mean squared error of the
    per-star mean prediction minus variance / R (that mean still carries 1/R of the noise).
    """
    r = pred.shape[0]
    rmse = np.sqrt(np.mean((pred - true[None]) ** 2, axis=(0, 1)))
    variance = np.mean(np.var(pred, axis=0, ddof=1), axis=0)
    bias2 = np.mean((pred.mean(axis=0) - true) ** 2, axis=0) - variance / r
    return rmse, np.sqrt(np.clip(bias2, 0.0, None)), np.sqrt(variance)


def evaluate_run(run_dir: str | Path, cache_dir: str | Path | None = None, n_realisations: int = 8) -> dict:
    """RMSE, CRLB and their ratio per label for a finished run; bias and noise scatter; calibration (gaussian_nll)."""
    import torch
    from hydra.utils import get_class

    from stellarlab.metrics import calibration
    from stellarlab.synthetic.crlb import crlb_vs_rmse

    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    dm, cfg = _datamodule(run_dir, cache_dir)
    start = time.perf_counter()
    ratios = crlb_vs_rmse(dm, metrics["test"])
    crlb_seconds = time.perf_counter() - start
    if ratios is None:
        raise ValueError(f"{run_dir} was not trained on a synthetic survey: it has no Cramér–Rao bound")

    model = get_class(cfg.model._target_).load_from_checkpoint(metrics["best_checkpoint"], weights_only=True, map_location="cpu")
    model.eval()
    test = dm.tensors["test"]
    resampled = _resampled_predictions(dm, model, n_realisations)
    rmse_r, bias, scatter = bias_variance(resampled, test["labels_phys"].numpy())
    with torch.no_grad():
        calib = None
        if model.loss_name == "gaussian_nll":
            pairs = [model.predict_with_uncertainty(f) for f in test["flux"].split(512)]
            mean = torch.cat([p[0] for p in pairs]).numpy()
            sigma = torch.cat([p[1] for p in pairs]).numpy()
            calib = calibration(mean, test["labels_phys"].numpy(), sigma, dm.label_names)
    out = {"run_dir": str(run_dir), "loss": model.loss_name, "epochs": metrics.get("epochs"),
           "train_seconds": metrics.get("train_seconds"), "crlb_seconds": crlb_seconds,
           "snr": dm.survey_params["snr"], "n_test": int(len(dm.split_index["test"])),
           "n_realisations": n_realisations, "labels": {}}
    for label, row in ratios.items():
        j = dm.label_names.index(label)
        row["rmse_resampled"] = float(rmse_r[j])  # the same stars with fresh noise: a second RMSE estimate
        row["bias"] = float(bias[j])
        row["scatter"] = float(scatter[j])
        row["scatter_ratio"] = row["scatter"] / row["crlb"]
        row["bias_ratio"] = row["bias"] / row["crlb"]
        if calib is not None:
            row["calibration"] = calib[label]
        out["labels"][label] = row
    return out


def run(small: bool = False, run_dirs: list[str] | None = None, cache_dir: str | None = None) -> dict:
    """Train (or read) each model and compare its test RMSE with the Cramér–Rao bound of its test set."""
    results: dict = {"small": small, "runs": {}}
    n_realisations = 4 if small else 8
    if run_dirs:
        for d in run_dirs:
            results["runs"][Path(d).name] = evaluate_run(d, cache_dir, n_realisations)
        return results
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = Path(cache_dir) if cache_dir else tmp / "cache"
        for name, overrides in MODELS.items():
            extra = (SMALL + (SMALL_CNN if name == "cnn" else [])) if small else []
            start = time.perf_counter()
            run_dir = train([*overrides, *extra], tmp / name, cache)
            seconds = time.perf_counter() - start
            results["runs"][name] = evaluate_run(run_dir, cache, n_realisations)
            results["runs"][name]["wall_seconds"] = seconds
    return results


def print_results(results: dict) -> None:
    for name, r in results["runs"].items():
        print(f"{name} (loss={r['loss']}, {r['epochs']} epochs, {r['n_test']} test spectra at SNR {r['snr']}; "
              f"bound computed in {r['crlb_seconds']:.0f} s)")
        print(f"  {'label':6s}{'RMSE':>10s}{'CRLB':>10s}{'ratio':>7s}   over {r['n_realisations']} noise draws:"
              f"{'RMSE':>9s}{'bias':>10s}{'/CRLB':>7s}{'scatter':>10s}{'/CRLB':>7s}")
        for label, row in r["labels"].items():
            print(f"  {label:6s}{row['rmse']:10.4g}{row['crlb']:10.4g}{row['ratio']:7.2f}{'':22s}{row['rmse_resampled']:9.4g}"
                  f"{row['bias']:10.4g}{row['bias_ratio']:7.2f}{row['scatter']:10.4g}{row['scatter_ratio']:7.2f}")
        if any("calibration" in row for row in r["labels"].values()):
            print(f"  {'label':6s}{'|z|<1':>8s}{'|z|<2':>8s}{'std z':>8s}{'mad_std z':>10s}{'mean sigma':>12s}   (Gaussian: 0.683, 0.954, 1, 1)")
            for label, row in r["labels"].items():
                c = row["calibration"]
                print(f"  {label:6s}{c['frac_within_1sigma']:8.3f}{c['frac_within_2sigma']:8.3f}{c['z_std']:8.2f}"
                      f"{c['z_mad_std']:10.2f}{c['mean_sigma']:12.4g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny survey and networks, 2 epochs (CI)")
    parser.add_argument("--run-dir", nargs="+", help="evaluate these finished runs instead of training")
    parser.add_argument("--cache-dir", help="survey cache of those runs (default: ./data/cache)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    res = run(small=args.small, run_dirs=args.run_dir, cache_dir=args.cache_dir)
    if args.json:
        print(json.dumps(res, indent=2, default=float))
    else:
        print_results(res)


if __name__ == "__main__":
    main()
