"""Labels by full-spectrum fitting: the emulator (The Payne), stellarlab's Cannon and the reference TheCannon package.

    python benchmarks/emulator_fit.py                 # the default survey (8000 stars, SNR 100, 800 test stars)
    python benchmarks/emulator_fit.py --small         # a tiny survey, a few epochs (CI, well under a minute)

`model=emulator` and `model=cannon` are trained with train.py in fresh processes (as a user runs them), so
their wall time is the whole command's (the small run trains them in this process, to stay under a minute), and their test metrics (RMSE, RMSE / Cramér–Rao bound, the
fraction of test stars within one formal error) come from the run's metrics.json. Fit throughput: the
best checkpoint is loaded and fits every test spectrum again, timed. The reference is the `TheCannon`
package (`pip install thecannon`; quadratic model, per-pixel scatter on a grid, `scipy.optimize.curve_fit`
per star), trained on the same training split and asked for the same test spectra; skipped when it is not
installed. Last, each model's own error apart from the noise, per [Fe/H] range (`emulation_error`): how far a
model trained on noisy spectra is from the generator's noise-free ones, on its training stars and on new ones.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from stellarlab.files import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
LABELS = ("teff", "logg", "fe_h")
MODELS = {"emulator": ["model=emulator"], "cannon": ["model=cannon"]}
SMALL = ["data.n_stars=200", "data.batch_size=32", "bootstrap.n_resamples=0"]
SMALL_EMULATOR = ["trainer.max_epochs=2", "model.hidden_sizes=[32,32]", "model.fit_templates=32"]


def train(overrides: list[str], log_dir: Path, cache_dir: Path, in_process: bool = False) -> Path:
    """Run train.py in a fresh process (or, for the small run, `stellarlab.train` in this one); returns the run folder."""
    args = [*overrides, f"paths.log_dir={log_dir}", f"paths.cache_dir={cache_dir}", "~callbacks.progress_bar",
            "~callbacks.figures", "trainer.accelerator=cpu"]
    if in_process:
        import stellarlab

        return Path(stellarlab.train(args)["run_dir"])
    cmd = [sys.executable, "train.py", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return max((log_dir / "train" / "runs").iterdir(), key=lambda p: p.stat().st_mtime)


def datamodule(run_dir: Path, cache_dir: Path):
    """The run's DataModule from its saved config, set up (the survey comes back from the cache)."""
    import hydra
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml").data, resolve=False)
    data["cache_dir"] = str(cache_dir / "synthetic")
    dm = hydra.utils.instantiate(data)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def crlb(dm) -> np.ndarray:
    """RMS over the test spectra of the Cramér–Rao bound per label (cached beside the survey by the training run)."""
    from stellarlab.synthetic.crlb import rms, survey_crlb

    bounds = survey_crlb(dm, "test")
    return np.array([rms(bounds["sigma"][:, bounds["labels"].index(label)]) for label in LABELS])


def best_model(run_dir: Path):
    """The run's best checkpoint, loaded (a file that cannot be read is a DataError)."""
    import stellarlab

    return stellarlab.load(next((run_dir / "checkpoints").glob("best-*.ckpt")))


def fit_throughput(model, dm) -> dict:
    """Spectra per second of the model's label fit over the whole test split (one process, CPU)."""
    import torch

    from stellarlab.run.allocator import keep_freed_blocks

    keep_freed_blocks(1024)  # as train.py and predict.py do: the fit's large temporaries are reused, not faulted in anew
    test = dm.split_arrays("test")
    flux, weight = torch.as_tensor(test["flux"][:]), torch.as_tensor(test["weight"][:])
    with torch.inference_mode():
        model.fit_spectra(flux, weight)  # warm-up: templates, the allocator's first blocks
    start = time.perf_counter()
    with torch.inference_mode():
        fit = model.fit_spectra(flux, weight)
    seconds = time.perf_counter() - start
    return {"fit_seconds": seconds, "spectra_per_second": len(flux) / seconds,
            "converged": float(fit.converged.float().mean()), "rchi2_median": float(fit.rchi2.median()),
            "iterations_mean": float(fit.iterations.float().mean())}


#: [Fe/H] ranges of the emulation-error table: the metal-poor edge of the training labels apart from the bulk.
FE_H_RANGES = ((-np.inf, -2.3), (-2.3, -1.5), (-1.5, -0.5), (-0.5, np.inf))


def emulation_error(model, dm, per_range: int = 200) -> list[dict]:
    """Per split (train, test) and [Fe/H] range: a trained emulator's own error, apart from the noise.

    Each star's noise-free spectrum (the generator's, at its true labels) is fitted like an observed one: the
    labels that fit returns, minus the true ones, are the model's shift, the same on every noise draw. Beside it
    the chi-square per pixel of the model's spectrum at the true labels against the noise-free one and, for the
    test stars, the observed spectra's fit error and its noise part (observed fit minus noise-free fit), all as
    RMS over the range in units of the RMS bound. Every test star; at most `per_range` training stars per range."""
    import torch

    from stellarlab.synthetic.crlb import crlb_from_fisher, generator_fisher, pixel_index, rms, survey_crlb

    if getattr(dm, "normalization", None) != "true_continuum":
        return []  # the data's spectra are the generator's only with the true continuum
    survey = dm.synthetic_survey()
    generator = survey.generator()
    pixels = pixel_index(generator.wavelength, dm.wavelength)
    names, fitted_labels = list(survey.label_names), list(model.label_names)  # the run's data.labels, in its order
    fe_h, columns = names.index("fe_h"), [names.index(label) for label in fitted_labels]
    rows = []
    for split in ("train", "test"):
        arrays = dm.split_arrays(split)
        true = np.asarray(survey.labels[np.asarray(dm.split_ids(split)["row"], dtype=np.int64)], dtype=np.float32)
        tested = split == "test"  # the test split's bounds are cached beside the survey; training stars' are computed
        bounds = survey_crlb(dm, split)["sigma"][:, columns] if tested else None
        for low, high in FE_H_RANGES:
            chosen = np.flatnonzero((true[:, fe_h] > low) & (true[:, fe_h] <= high))
            if split == "train" and len(chosen) > per_range:
                chosen = np.sort(np.random.default_rng(0).choice(chosen, per_range, replace=False))
            if not len(chosen):
                continue
            labels = torch.as_tensor(true[chosen])
            clean = generator.generate(labels)
            clean = clean if pixels is None else clean[:, pixels]
            weight = torch.as_tensor(arrays["weight"][chosen]).float()
            observed = torch.as_tensor(arrays["flux"][chosen]).float()
            standard = model.inputs({key: arrays[key][chosen] for key in ("labels", "nuisance")})  # as in training
            with torch.inference_mode():
                error = model.emulate_known(standard, clean, weight) - clean
                shift = model.fit_spectra(clean, weight).labels.numpy() - true[chosen][:, columns]
                if tested:  # the observed spectra's fit error, for the test stars
                    fitted = model.fit_spectra(observed, weight).labels.numpy() - true[chosen][:, columns]
            if tested:
                bound = bounds[chosen]
            else:
                fisher = generator_fisher(generator, true[chosen], weight.numpy(), pixels)
                bound = crlb_from_fisher(fisher)[0][:, columns]
            scale = np.array([rms(bound[:, j]) for j in range(len(columns))])
            ratio = lambda e: dict(zip(fitted_labels, (np.sqrt((e**2).mean(0)) / scale).tolist()))  # noqa: E731
            ends = [None if np.isinf(end) else float(end) for end in (low, high)]  # null: open (JSON has no infinity)
            row = {"split": split, "fe_h": ends, "n": len(chosen),
                   "emulation_chi2_per_pixel": float(((weight * error**2).sum(1) / (weight > 0).sum(1)).mean()),
                   "shift_over_bound": ratio(shift)}
            if tested:
                row["fit_rmse_over_bound"], row["noise_over_bound"] = ratio(fitted), ratio(fitted - shift)
            rows.append(row)
    return rows


def from_metrics(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    out = {"epochs": metrics["epochs"], "train_seconds": metrics["train_seconds"], "labels": {}}
    for label in LABELS:
        row = {"rmse": metrics["test"][label]["rmse"], "ratio": metrics["crlb"][label]["ratio"]}
        calibration = (metrics.get("calibration") or {}).get(label)
        if calibration:
            row["within_1sigma"] = calibration["frac_within_1sigma"]
            row["z_std"] = calibration["z_std"]
        out["labels"][label] = row
    return out


def reference_cannon(dm, bound: np.ndarray, pixel_step: int = 1) -> dict | None:
    """TheCannon (the PyPI package `thecannon`) on the same split and the same labels as `model=cannon` (the run's
    labels, then its nuisance labels); None when it is not installed.

    Its training loops over pixels in Python (a grid of scatters, each a least-squares solve), which takes about
    half a minute on any survey of this grid, so the small benchmark gives it every `pixel_step`-th pixel only."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            from TheCannon import dataset
            from TheCannon import model as cannon_model
    except ImportError:
        return None
    train, test = dm.split_arrays("train"), dm.split_arrays("test")
    cols = slice(None, None, pixel_step)
    arrays = {split: (np.array(t["flux"][:][:, cols], dtype=np.float64), np.array(t["weight"][:][:, cols], dtype=np.float64),
                      t["labels_phys"].numpy().astype(np.float64)) for split, t in (("train", train), ("test", test))}
    (tr_flux, tr_ivar, tr_labels), (te_flux, te_ivar, te_labels) = arrays["train"], arrays["test"]
    if dm.nuisance_names:  # trained on them too, like model=cannon; only the labels are scored
        tr_labels = np.hstack([tr_labels, dm.nuisance_scaler.inverse(train["nuisance"]).numpy().astype(np.float64)])
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        ds = dataset.Dataset(dm.wavelength[cols], np.arange(len(tr_flux)).astype(str), tr_flux, tr_ivar, tr_labels,
                             np.arange(len(te_flux)).astype(str), te_flux, te_ivar)
        ds.set_label_names(list(LABELS) + list(dm.nuisance_names))
        model = cannon_model.CannonModel(2, useErrors=False)
        model.train(ds)
        trained = time.perf_counter()
        errors, _ = model.infer_labels(ds)
    done = time.perf_counter()
    pred, errors = np.asarray(ds.test_label_vals)[:, : len(LABELS)], np.asarray(errors)[:, : len(LABELS)]
    rmse = np.sqrt(np.mean((pred - te_labels) ** 2, axis=0))
    z = (pred - te_labels) / errors
    return {"pixel_step": pixel_step, "train_seconds": trained - start, "fit_seconds": done - trained, "spectra_per_second": len(te_flux) / (done - trained),
            "labels": {label: {"rmse": float(rmse[j]), "ratio": float(rmse[j] / bound[j]),
                               "within_1sigma": float(np.mean(np.abs(z[:, j]) < 1))} for j, label in enumerate(LABELS)}}


def optimizer_step(small: bool = False, rounds: int = 5, steps: int = 10) -> dict:
    """ms per emulator training step (forward, backward, Adam) with torch's fused Adam (conf/optimizer/adam.yaml)
    and with its per-operation one, the default network at the default batch size, alternating rounds."""
    import torch

    from stellarlab.models.emulator import EmulatorRegressor

    n_pixels, network, batch = (1000, {"hidden_sizes": [32, 32]}, 32) if small else (8575, {}, 128)  # {}: the default
    torch.manual_seed(0)
    labels, flux = torch.randn(batch, len(LABELS) + 1), 1 + 0.01 * torch.randn(batch, n_pixels)
    weight = torch.full((batch, n_pixels), 1e4)
    # as on the synthetic survey: [alpha/Fe] a fourth input, nothing left for a latent label
    nuisance = {"names": ["alpha_fe"], "complete": True, "mean": [0.0], "std": [1.0], "min": [-3.0], "max": [3.0]}
    models = {fused: EmulatorRegressor(n_pixels, list(LABELS), nuisance_labels=nuisance, **network) for fused in (True, False)}
    optimizers = {fused: torch.optim.Adam(m.parameters(), lr=1e-4, fused=fused) for fused, m in models.items()}
    times: dict[bool, list[float]] = {True: [], False: []}

    def step(fused: bool) -> None:
        emulated = models[fused].net.emulate_known(labels, flux, weight)
        loss = (weight * (flux - emulated) ** 2).mean()
        optimizers[fused].zero_grad()
        loss.backward()
        optimizers[fused].step()

    for fused in (True, False):
        step(fused)  # warm-up
    for _ in range(rounds):
        for fused in (True, False):
            start = time.perf_counter()
            for _ in range(steps):
                step(fused)
            times[fused].append((time.perf_counter() - start) / steps * 1e3)
    fused_ms, plain_ms = float(np.median(times[True])), float(np.median(times[False]))
    return {"fused_ms": fused_ms, "per_operation_ms": plain_ms, "speedup": plain_ms / fused_ms}


def run(small: bool = False, cache_dir: str | None = None) -> dict:
    """Train the emulator and the Cannon, fit the test split with each, and run the reference TheCannon beside them."""
    results: dict = {"small": small, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = Path(cache_dir) if cache_dir else (tmp / "cache" if small else ROOT / "data" / "cache")
        dm = None
        for name, overrides in MODELS.items():
            extra = [*SMALL, *(SMALL_EMULATOR if name == "emulator" else [])] if small else []
            start = time.perf_counter()
            run_dir = train([*overrides, *extra], tmp / name, cache, in_process=small)
            row = {"wall_seconds": time.perf_counter() - start, "overrides": [*overrides, *extra], **from_metrics(run_dir)}
            dm = dm or datamodule(run_dir, cache)
            model = best_model(run_dir)
            row.update(fit_throughput(model, dm))
            row["emulation_error"] = emulation_error(model, dm)
            results["models"][name] = row
        results["n_test"] = len(dm.split_index["test"])
        reference = reference_cannon(dm, crlb(dm), pixel_step=8 if small else 1)
        if reference is not None:
            results["models"]["thecannon"] = reference
    results["optimizer_step"] = optimizer_step(small)
    return results


def print_own_error(models: dict) -> None:
    """The `emulation_error` rows of each model, one table."""
    print("  each model's own error, apart from the noise (over the bound): chi2/pix of its spectrum at the true "
          "labels against\n  the noise-free one; shift = the labels its fit of the noise-free spectrum returns minus "
          "the true ones;\n  test stars: the fit of the observed spectrum (RMSE) and its noise part (observed fit - "
          "noise-free fit)")
    first = next((rows[0] for rows in (m.get("emulation_error") for m in models.values()) if rows), None)
    if first is None:
        return
    print(f"  each cell: {' / '.join(first['shift_over_bound'])}")
    print(f"  {'model':10s}{'split':>6s}{'[Fe/H]':>14s}{'n':>5s}{'chi2/pix':>10s}"
          f"{'shift':>22s}{'noise':>22s}{'fit RMSE':>22s}")
    for name, row in models.items():
        for r in row.get("emulation_error", []):
            low, high = r["fe_h"]
            ranges = f"<= {high:g}" if low is None else f"> {low:g}" if high is None else f"{low:g} .. {high:g}"
            cells = ""
            for key in ("shift_over_bound", "noise_over_bound", "fit_rmse_over_bound"):
                cells += f" {' / '.join(f'{value:.2f}' for value in r[key].values()) if key in r else '':>21s}"
            print(f"  {name:10s}{r['split']:>6s}{ranges:>14s}{r['n']:5d}{r['emulation_chi2_per_pixel']:10.4g}{cells}")


def own_error_of_run(run_dir: str, cache_dir: str | None) -> dict:
    """`emulation_error` of a finished run (its best checkpoint), no training; bad input is a DataError."""
    from omegaconf import OmegaConf

    from stellarlab.errors import DataError

    run = Path(run_dir)
    if not (run / ".hydra" / "config.yaml").is_file() or not any((run / "checkpoints").glob("best-*.ckpt")):
        raise DataError(f"--run {run_dir}: not a finished training run (no .hydra/config.yaml or "
                         "checkpoints/best-*.ckpt); pass a run folder, e.g. outputs/<experiment>/train/runs/<time>")
    model = OmegaConf.load(run / ".hydra" / "config.yaml").model
    if not str(model.get("_target_", "")).endswith(".EmulatorRegressor"):
        raise DataError(f"--run {run_dir}: its model is {model.get('_target_')}; the own error is that of a spectrum "
                         "model (model=emulator or model=cannon)")
    trained = best_model(run)  # before the data: a corrupt checkpoint is found without generating a survey
    dm = datamodule(run, Path(cache_dir) if cache_dir else ROOT / "data" / "cache")
    if not callable(getattr(dm, "synthetic_survey", None)):
        raise DataError(f"--run {run_dir}: its data are not a synthetic survey; the own error needs the generator's "
                         "noise-free spectra")
    rows = emulation_error(trained, dm)
    if not rows:
        raise DataError(f"--run {run_dir}: trained on data.normalization={dm.normalization}; the noise-free "
                         "spectra are the generator's with the true continuum only")
    return {"cannon" if model.get("kind") == "quadratic" else "emulator": {"emulation_error": rows}}


def print_results(results: dict) -> None:
    print(f"labels by fitting the whole spectrum ({results.get('n_test', '?')} test spectra"
          f"{', tiny survey' if results['small'] else ''}); ratio = RMSE / Cramér–Rao bound")
    header = f"  {'model':10s}" + "".join(f"{label + ' RMSE':>13s}{'ratio':>7s}{'|z|<1':>7s}" for label in LABELS)
    print(header + f"{'train s':>9s}{'wall s':>8s}{'fit/s':>8s}")
    for name, row in results["models"].items():
        cells = ""
        for label in LABELS:
            r = row["labels"][label]
            cells += f"{r['rmse']:13.4g}{r['ratio']:7.2f}{r.get('within_1sigma', float('nan')):7.2f}"
        wall = row.get("wall_seconds", float("nan"))
        print(f"  {name:10s}{cells}{row['train_seconds']:9.1f}{wall:8.1f}{row['spectra_per_second']:8.0f}")
    print_own_error(results["models"])
    step = results.get("optimizer_step")
    if step:
        print(f"  emulator training step: fused Adam {step['fused_ms']:.1f} ms, per-operation Adam "
              f"{step['per_operation_ms']:.1f} ms ({step['speedup']:.2f}x)")
    if "thecannon" not in results["models"]:
        print("  (the reference TheCannon is not installed: pip install thecannon)")
    elif results["models"]["thecannon"]["pixel_step"] > 1:
        print(f"  (TheCannon on every {results['models']['thecannon']['pixel_step']}th pixel: the small run's time limit)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny survey and emulator, 2 epochs (CI)")
    parser.add_argument("--cache-dir", help="survey cache folder (default: the repository's data/cache)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--run", help="only the own-error table of this finished run (a synthetic survey), no training")
    args = parser.parse_args()
    if args.run:
        import logging

        from stellarlab.errors import command_errors

        with command_errors(logging.getLogger(__name__)):  # a bad folder or checkpoint: one `error:` line, exit 2
            results = {"models": own_error_of_run(args.run, args.cache_dir)}
        print_own_error(results["models"])
    else:
        results = run(small=args.small, cache_dir=args.cache_dir)
        print_results(results)
    if args.json:
        write_text_atomic(args.json, json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
