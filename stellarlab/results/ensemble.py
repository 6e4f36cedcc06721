"""Model uncertainty: several models' predictions of the same spectra, combined.

Two ways to get members: a deep ensemble (`ckpt_path=[a.ckpt,b.ckpt,...]`, or a multirun folder such as
the one `python train.py -m experiment=ensemble` writes: the best checkpoint of every job that finished)
and MC dropout (`mc_dropout=N`: one model, its dropout layers left on, N passes).

Each member gives a mean per label and, for models trained with `model.loss=gaussian_nll` (or a fit
with formal errors), its own sigma. The ensemble reports the mean of the members' means, their spread
(standard deviation across members: what the models do not agree on, i.e. the model uncertainty) and the
total sigma sqrt(mean member sigma^2 + spread^2). Members without sigmas give a total equal to the spread.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stellarlab.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass
class Combined:
    """Per spectrum and label (N, L): the ensemble's mean, spread, the members' RMS sigma (NaN without) and total sigma."""

    mean: np.ndarray
    spread: np.ndarray
    member_sigma: np.ndarray
    sigma: np.ndarray
    n_members: int

    def disagree(self, factor: float) -> np.ndarray:
        """(N,) True where, for some label, the spread exceeds `factor` times the members' own sigma (needs sigmas)."""
        with np.errstate(invalid="ignore"):
            return (self.spread > factor * self.member_sigma).any(axis=1)


def combine(means: Sequence[np.ndarray], sigmas: Sequence[np.ndarray | None]) -> Combined:
    """Combine M members' (N, L) means and sigmas (None or NaN for a member without sigmas)."""
    stack = np.stack([np.asarray(m, dtype=np.float64) for m in means])
    mean = stack.mean(axis=0)
    spread = stack.std(axis=0, ddof=1) if len(stack) > 1 else np.zeros_like(mean)
    if all(s is not None for s in sigmas):
        member = np.sqrt(np.mean(np.stack([np.asarray(s, dtype=np.float64) for s in sigmas]) ** 2, axis=0))
    else:
        member = np.full_like(mean, np.nan)
    total = np.where(np.isfinite(member), np.sqrt(np.nan_to_num(member) ** 2 + spread**2), spread)
    return Combined(mean=mean, spread=spread, member_sigma=member, sigma=total, n_members=len(stack))


def member_predictions(models: Sequence, flux, weight, mc_dropout: int = 0) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Each member's (mean, sigma) of one batch in physical units: one per model, or with `mc_dropout=N` N passes of
    each model. `flux`, `weight`: (B, P) tensors on the models' device."""
    import torch

    out = []
    with torch.inference_mode():
        for model in models:
            passes = model.predict_mc_dropout(flux, weight, mc_dropout) if mc_dropout else [model.predict_with_sigma(flux, weight)]
            out += [(m.double().cpu().numpy(), None if s is None else s.double().cpu().numpy()) for m, s in passes]
    return out


def combine_members(predictions: Sequence[tuple[np.ndarray, np.ndarray | None]]) -> Combined:
    """`combine` of `member_predictions`' output."""
    return combine([m for m, _ in predictions], [s for _, s in predictions])


def test_split_results(models: Sequence, datamodule, mc_dropout: int = 0, batch_size: int = 1024) -> dict:
    """The ensemble on the DataModule's test split, as the test step reports a single model: `pred`, `true`,
    `sigma` (total), `spread`, per-label `metrics`, `calibration` of the total sigma, and the Gaussian NLL `loss` (standardised labels, as a model's test loss)."""
    import torch

    from stellarlab.metrics import calibration, label_metrics

    test = datamodule.split_arrays("test")
    device = next(iter(models[0].buffers())).device
    parts: list[Combined] = []
    for start in range(0, len(test["flux"]), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(test["flux"])))
        flux, weight = (test[key][rows].to(device) for key in ("flux", "weight"))
        parts.append(combine_members(member_predictions(models, flux, weight, mc_dropout)))
    joined = {key: np.concatenate([getattr(p, key) for p in parts]) for key in ("mean", "spread", "member_sigma", "sigma")}
    true = test["labels_phys"].double().numpy()
    names = list(models[0].label_names)
    metrics = label_metrics(joined["mean"], true, names, models[0].label_mean.cpu().numpy())
    sigma = np.maximum(joined["sigma"], 1e-12)
    std = models[0].label_std.double().cpu().numpy()
    with np.errstate(invalid="ignore"):  # on standardised labels, like a single model's test loss
        nll = 0.5 * ((joined["mean"] - true) / sigma) ** 2 + np.log(sigma / std) + 0.5 * np.log(2 * np.pi)
    return {"pred": joined["mean"], "true": true, "sigma": joined["sigma"], "spread": joined["spread"],
            "metrics": metrics, "calibration": calibration(joined["mean"], true, joined["sigma"], names),
            "loss": float(np.nanmean(nll)), "n_members": parts[0].n_members if parts else 0}


def _best_checkpoint(run_dir: Path, summary: dict) -> Path | None:
    """The run's best checkpoint: as metrics.json names it (relative to the run when it moved), else the newest best-*.ckpt."""
    named = summary.get("best_checkpoint")
    if named:
        for candidate in (Path(named), run_dir / "checkpoints" / Path(named).name):
            if candidate.is_file():
                return candidate
    found = sorted((run_dir / "checkpoints").glob("best-*.ckpt"))
    return found[-1] if found else None


def member_checkpoints(spec: str | os.PathLike | Sequence[str]) -> list[Path]:
    """The checkpoints `ckpt_path` names: one file, a list of files, or a multirun folder (the best checkpoint of
    each job whose metrics.json says it finished; failed and unfinished jobs are left out, and logged)."""
    from stellarlab.results.compare import collect_runs

    items = [spec] if isinstance(spec, (str, os.PathLike)) else [str(s) for s in spec]
    if not items:
        raise ConfigError("ckpt_path=[] names no checkpoint; give ckpt_path=<file>, [<file>,<file>,...] or a multirun folder")
    members: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_file():
            members.append(path)
            continue
        if not path.is_dir():
            raise ConfigError(f"ckpt_path={path}: no such file or folder of runs (an ensemble: a list of checkpoints or a "
                              "multirun folder); checkpoints are in <run folder>/checkpoints/ (best-*.ckpt, last.ckpt)")
        found, left_out = [], []
        for run in collect_runs(path):
            best = _best_checkpoint(Path(run["dir"]), run["summary"]) if run["status"] == "ok" else None
            (found if best is not None else left_out).append(best if best is not None else f"{run['run']} ({run['status']})")
        if left_out:
            log.warning("ckpt_path=%s: left out %d job(s) without a finished best checkpoint: %s", path, len(left_out),
                        ", ".join(map(str, left_out)))
        if not found:
            raise DataError(f"ckpt_path={path}: no finished run with a best checkpoint below it (looked for metrics.json "
                            "with status ok and checkpoints/best-*.ckpt)")
        members.extend(found)
    resolved = [m.resolve() for m in members]
    if len(set(resolved)) != len(resolved):
        raise ConfigError("ckpt_path names the same checkpoint more than once; an ensemble needs distinct members")
    return members


def check_members_agree(models: Sequence, names: Sequence[Path], preprocessing: Sequence[dict]) -> None:
    """Members must read the same spectra the same way and predict the same labels."""
    first = models[0]
    for model, name, prep in zip(models[1:], names[1:], preprocessing[1:]):
        if list(model.label_names) != list(first.label_names):
            raise ConfigError(f"ensemble members predict different labels: {names[0]} {first.label_names}, {name} "
                              f"{model.label_names}; combine models trained on the same labels")
        if model.wavelength.shape != first.wavelength.shape or not bool((model.wavelength == first.wavelength).all()):
            raise ConfigError(f"ensemble members read different wavelength grids ({names[0]}, {name}); combine models "
                              "trained on the same data")
        if prep != preprocessing[0]:
            raise ConfigError(f"ensemble members were trained on differently preprocessed data ({names[0]}: "
                              f"{preprocessing[0]}, {name}: {prep}); combine models trained on the same data")


def check_mc_dropout(model, n_passes: int) -> None:
    """`mc_dropout=N` needs N >= 2 and a model with dropout."""
    if isinstance(n_passes, bool) or not isinstance(n_passes, int) or n_passes < 0 or n_passes == 1:
        raise ConfigError(f"mc_dropout={n_passes!r}: give the number of passes, an integer >= 2 (0 or null: off)")
    if n_passes and not model.dropout_layers():
        raise ConfigError(f"mc_dropout={n_passes}: {type(model).__name__} has no dropout layer (model.dropout=0); "
                          "train with model.dropout=0.1 (say), or use an ensemble: ckpt_path=[a,b,c]")


__all__ = ["Combined", "check_mc_dropout", "check_members_agree", "combine", "combine_members", "member_checkpoints",
           "member_predictions", "test_split_results"]
