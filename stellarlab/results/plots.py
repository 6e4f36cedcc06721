"""Figures for papers and TensorBoard: predicted vs true per label, and example spectra.

Built with matplotlib's object API (no pyplot state), so they are safe in workers and headless runs.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from stellarlab.labels import label_display, label_unit
from stellarlab.metrics import label_metrics


def _axis_label(name: str) -> str:
    unit = label_unit(name)
    return f"{label_display(name)} [{unit}]" if unit else label_display(name)


def pred_vs_true_figure(pred: np.ndarray, true: np.ndarray, names) -> Figure:
    """One column per label: predicted vs true with the one-to-one line, and residuals below."""
    metrics = label_metrics(pred, true, names)
    n = len(names)
    fig = Figure(figsize=(4.2 * n, 6.0), layout="constrained")
    axes = fig.subplots(2, n, sharex="col", gridspec_kw={"height_ratios": [3, 1.3]}, squeeze=False)
    for j, name in enumerate(names):
        ok = np.isfinite(true[:, j])
        t, p = true[ok, j], pred[ok, j]
        top, bottom = axes[0, j], axes[1, j]
        lo, hi = np.nanmin(np.r_[t, p]) if ok.any() else 0.0, np.nanmax(np.r_[t, p]) if ok.any() else 1.0
        top.scatter(t, p, s=4, alpha=0.5, lw=0, color="C0")
        top.plot([lo, hi], [lo, hi], color="k", lw=1, label="one to one")
        m = metrics[name]
        top.text(
            0.04,
            0.96,
            f"RMSE {m['rmse']:.4g}\nbias {m['bias']:+.3g}\nmad_std {m['mad_std']:.4g}\nN {m['n']}",
            transform=top.transAxes,
            va="top",
            fontsize=9,
            bbox={"facecolor": "white", "alpha": 0.8, "lw": 0},
        )
        top.set_ylabel(f"predicted {_axis_label(name)}")
        top.set_title(label_display(name))
        bottom.scatter(t, p - t, s=4, alpha=0.5, lw=0, color="C1")
        bottom.axhline(0, color="k", lw=1)
        bottom.set_xlabel(f"true {_axis_label(name)}")
        bottom.set_ylabel("pred - true")
    return fig


def example_spectra_figure(wavelength: np.ndarray, flux: np.ndarray, labels: np.ndarray, names) -> Figure:
    """A few spectra, whole range (offset for clarity) and a zoom on the strongest absorption."""
    fig = Figure(figsize=(12, 6.5), layout="constrained")
    full, zoom = fig.subplots(2, 1, gridspec_kw={"height_ratios": [1.2, 1]})
    depth = np.nanmean(1.0 - flux, axis=0)
    centre = int(np.nanargmax(depth))
    lo, hi = max(centre - 120, 0), min(centre + 120, len(wavelength))
    for i, (f, lab) in enumerate(zip(flux, labels)):
        text = ", ".join(f"{label_display(n)} {v:.4g}" for n, v in zip(names, lab))
        full.plot(wavelength, f + 0.6 * i, lw=0.5, label=text)
        zoom.plot(wavelength[lo:hi], f[lo:hi], lw=1)
    full.set_ylabel("normalised flux (+ offset)")
    full.legend(fontsize=8, loc="lower left", ncols=2)
    full.axvspan(wavelength[lo], wavelength[hi - 1], color="0.85", zorder=0)
    zoom.set_xlabel("wavelength [Å]")
    zoom.set_ylabel("normalised flux")
    return fig
