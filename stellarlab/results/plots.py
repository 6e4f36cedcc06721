"""Figures to check a model and a catalogue with, for papers and TensorBoard.

- a test run: predicted vs true per label, RMSE vs SNR (with the Cramér–Rao bound on the synthetic
  survey), the z-scores of predicted sigmas against the unit Gaussian; example spectra at the start;
- a catalogue: the Kiel diagram (Teff vs log g, coloured by [Fe/H]) and a histogram of each label.

Built with matplotlib's object API and the Agg canvas (no pyplot state), so they are safe in workers
and headless runs. Builders return a `Figure` (tests inspect it); `save_png` writes one atomically.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

from stellarlab.files import atomic_path
from stellarlab.labels import label_display, label_unit
from stellarlab.metrics import GAUSSIAN_COVERAGE, calibration_summary, label_metrics, z_scores

log = logging.getLogger(__name__)

#: Above this many stars the Kiel diagram is a hexbin (mean [Fe/H] per cell): a scatter of
#: hundreds of thousands of points is one blot, slow to draw and heavy to store.
HEXBIN_ABOVE = 5000
#: Labels that colour the Kiel diagram, first found wins.
METALLICITY_LABELS = ("fe_h", "m_h")
#: RMSE vs SNR: bins hold at least this many test spectra (equal-count bins), at most MAX_SNR_BINS of them.
MIN_PER_SNR_BIN = 40
MAX_SNR_BINS = 10
#: z-score histograms span +-Z_RANGE; what falls outside is counted on the figure.
Z_RANGE = 5.0
DPI = 110


def _axis_label(name: str) -> str:
    unit = label_unit(name)
    return f"{label_display(name)} [{unit}]" if unit else label_display(name)


def save_png(fig: Figure, path: str | Path, dpi: int = DPI) -> Path:
    """Render with Agg to a temporary file beside `path`, then rename: a killed run leaves no half PNG."""
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return Path(path)


def _robust_range(x: np.ndarray) -> tuple[float, float]:
    """The data's range, cut where a few wild values (a star far outside the training range) would squash
    the rest into one bin: at most half the 1-99 percentile span beyond it (a Gaussian loses nothing).
    Padded by 3 %; +-0.5 around a single value."""
    if not x.size:
        return 0.0, 1.0
    p_lo, p_hi = (float(v) for v in np.percentile(x, [1, 99]))
    span = p_hi - p_lo
    a, b = max(float(x.min()), p_lo - 0.5 * span), min(float(x.max()), p_hi + 0.5 * span)
    if not b > a:
        return a - 0.5, b + 0.5
    pad = 0.03 * (b - a)
    return a - pad, b + pad


def _as_float(values: Mapping[str, np.ndarray], name: str, n: int | None) -> np.ndarray | None:
    """One label as a float64 1-D array with NaN for masked entries; None when `values` lacks it."""
    if name not in values:
        return None
    arr = np.ma.filled(np.ma.asarray(values[name], dtype=np.float64), np.nan).ravel()
    if n is not None and arr.size != n:
        raise ValueError(f"values[{name!r}] has {arr.size} rows, another label has {n}")
    return arr


# -- a catalogue ---------------------------------------------------------------------------------------
def kiel_figure(values: Mapping[str, np.ndarray], label_names: Sequence[str], hexbin_above: int = HEXBIN_ABOVE) -> Figure | None:
    """Teff vs log g, both axes inverted (hot stars left, giants up), coloured by [Fe/H] (or [M/H]).

    A scatter up to `hexbin_above` stars, a hexbin of the mean [Fe/H] per cell above. None without teff or logg.
    """
    if "teff" not in label_names or "logg" not in label_names:
        return None
    teff, logg = _as_float(values, "teff", None), _as_float(values, "logg", None)
    if teff is None or logg is None or teff.size != logg.size:
        raise ValueError("values must hold 1-D arrays of one length for teff and logg")
    colour_name = next((c for c in METALLICITY_LABELS if c in label_names and c in values), None)
    colour = _as_float(values, colour_name, teff.size) if colour_name else None
    ok = np.isfinite(teff) & np.isfinite(logg)
    n_total, n = teff.size, int(ok.sum())
    fig = Figure(figsize=(6.4, 5.4), layout="constrained")
    ax = fig.subplots()
    ax.set_xlabel(_axis_label("teff"))
    ax.set_ylabel(_axis_label("logg"))
    if n == 0:
        ax.text(0.5, 0.5, "no star with both Teff and log g", transform=ax.transAxes, ha="center")
        ax.set_title(f"Kiel diagram\n0 of {n_total} stars")
        return fig
    t, g = teff[ok], logg[ok]
    c = colour[ok] if colour is not None else None
    has_c = np.isfinite(c) if c is not None else np.zeros(n, dtype=bool)
    (x0, x1), (y0, y1) = _robust_range(t), _robust_range(g)
    shown = (t >= x0) & (t <= x1) & (g >= y0) & (g <= y1)
    clabel = _axis_label(colour_name) if colour_name else ""
    cmin, cmax = (float(v) for v in np.percentile(c[has_c], [1, 99])) if has_c.any() else (None, None)
    if n > hexbin_above:
        if has_c.any():
            art = ax.hexbin(t[has_c], g[has_c], C=c[has_c], reduce_C_function=np.mean, gridsize=90,
                            extent=(x0, x1, y0, y1), cmap="viridis", vmin=cmin, vmax=cmax, mincnt=1)
            fig.colorbar(art, ax=ax, label=f"mean {clabel} per cell")
        else:
            art = ax.hexbin(t, g, gridsize=90, extent=(x0, x1, y0, y1), cmap="viridis", norm=LogNorm(), mincnt=1)
            fig.colorbar(art, ax=ax, label="stars per cell")
    else:
        size = float(np.clip(3000.0 / n, 2.0, 25.0))
        if (~has_c).any():
            ax.scatter(t[~has_c], g[~has_c], s=size, color="0.6", lw=0, label=f"no {label_display(colour_name)}" if colour_name else None)
        if has_c.any():
            art = ax.scatter(t[has_c], g[has_c], c=c[has_c], s=size, lw=0, cmap="viridis", vmin=cmin, vmax=cmax)
            fig.colorbar(art, ax=ax, label=clabel)
        if colour_name and (~has_c).any():
            ax.legend(loc="lower left", fontsize=8)
    ax.set_xlim(x1, x0)  # inverted: hot stars on the left
    ax.set_ylim(y1, y0)  # inverted: low gravity (giants) at the top
    notes = [f"{n} stars" + (f" of {n_total}" if n < n_total else "")]
    if colour_name and not has_c.all():
        notes.append(f"{int((~has_c).sum())} without {label_display(colour_name)}" + ("" if n <= hexbin_above else " (not shown)"))
    if not shown.all():
        notes.append(f"{int((~shown).sum())} outside the axes")
    ax.set_title("Kiel diagram\n" + ", ".join(notes), fontsize=10)
    return fig


def label_histograms_figure(values: Mapping[str, np.ndarray], label_names: Sequence[str]) -> Figure:
    """One histogram per label in its physical unit, with N, the median and how many rows have no value."""
    names = list(label_names)
    ncols = min(len(names), 4) or 1
    nrows = math.ceil(len(names) / ncols) or 1
    fig = Figure(figsize=(3.6 * ncols, 3.0 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes, names):
        arr = _as_float(values, name, None)
        x = arr[np.isfinite(arr)] if arr is not None else np.empty(0)
        ax.set_xlabel(_axis_label(name))
        ax.set_ylabel("stars")
        if x.size == 0:
            ax.text(0.5, 0.5, "no values", transform=ax.transAxes, ha="center")
            continue
        lo, hi = _robust_range(x)
        inside = (x >= lo) & (x <= hi)
        bins = int(np.clip(np.sqrt(x.size), 10, 100))
        counts, edges = np.histogram(x[inside], bins=bins, range=(lo, hi))
        ax.stairs(counts, edges, fill=True, color="C0", alpha=0.8)
        missing = (arr.size - x.size) if arr is not None else 0
        text = f"N {x.size}\nmedian {np.median(x):.4g}"
        text += f"\nno value {missing}" if missing else ""
        text += f"\noutside {int((~inside).sum())}" if not inside.all() else ""
        ax.text(0.97, 0.96, text, transform=ax.transAxes, ha="right", va="top", fontsize=8,
                bbox={"facecolor": "white", "alpha": 0.8, "lw": 0})
        ax.set_title(label_display(name))
    return fig


def write_prediction_figures(values: Mapping[str, np.ndarray], label_names: Sequence[str], out_dir: Path) -> list[Path]:
    """The Kiel diagram (`kiel.png`; when teff and logg are both predicted) and `label_histograms.png`.

    `values`: label name -> 1-D predictions (NaN or masked = no value). Returns the files written.
    """
    out_dir = Path(out_dir)
    names = [n for n in label_names]
    written = []
    kiel = kiel_figure(values, names)
    if kiel is None:
        log.info("no Kiel diagram: the model predicts %s, not both teff and logg; writing label histograms only", names)
    else:
        written.append(save_png(kiel, out_dir / "kiel.png"))
    if names:
        written.append(save_png(label_histograms_figure(values, names), out_dir / "label_histograms.png"))
    return written


# -- a test run ----------------------------------------------------------------------------------------
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


def snr_bins(snr: np.ndarray, min_per_bin: int = MIN_PER_SNR_BIN, max_bins: int = MAX_SNR_BINS) -> np.ndarray:
    """Bin number of each spectrum (-1: no finite SNR): equal-count bins of SNR with >= min_per_bin spectra each.

    Equal counts, not equal widths: surveys hold many more faint stars than bright ones, and an RMSE of
    a handful of stars is noise. Ties stay in one bin, so a single-SNR survey has one bin.
    """
    snr = np.asarray(snr, dtype=np.float64)
    ok = np.isfinite(snr)
    out = np.full(snr.shape, -1, dtype=np.int64)
    if not ok.any():
        return out
    n_bins = int(np.clip(ok.sum() // max(min_per_bin, 1), 1, max_bins))
    edges = np.unique(np.quantile(snr[ok], np.linspace(0, 1, n_bins + 1)[1:-1]))
    out[ok] = np.searchsorted(edges, snr[ok], side="right")
    return _renumber(out)


def _renumber(bins: np.ndarray) -> np.ndarray:
    """Bin numbers 0..k-1 without gaps (-1 kept), in SNR order."""
    used = np.unique(bins[bins >= 0])
    out = bins.copy()
    out[bins >= 0] = np.searchsorted(used, bins[bins >= 0])
    return out


def rmse_by_snr(pred: np.ndarray, true: np.ndarray, snr: np.ndarray, bound: np.ndarray | None = None,
                min_per_bin: int = MIN_PER_SNR_BIN, max_bins: int = MAX_SNR_BINS) -> dict[str, np.ndarray]:
    """Per SNR bin (rows) and label (columns): median SNR, N, RMSE and the RMS Cramér–Rao bound.

    `bound` (N, L) is each spectrum's bound (NaN where unknown); its RMS over a bin's stars is what an
    efficient unbiased estimator's RMSE would be on them. A label with fewer than 5 truths in a bin gets NaN.
    """
    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    bins = snr_bins(snr, min_per_bin, max_bins)
    k, n_labels = int(bins.max()) + 1, pred.shape[1]
    out = {"snr": np.full(k, np.nan), "snr_lo": np.full(k, np.nan), "snr_hi": np.full(k, np.nan),
           "n": np.zeros((k, n_labels), dtype=np.int64), "rmse": np.full((k, n_labels), np.nan),
           "bound": np.full((k, n_labels), np.nan)}
    for b in range(k):
        rows = bins == b
        s = np.asarray(snr, dtype=np.float64)[rows]
        out["snr"][b], out["snr_lo"][b], out["snr_hi"][b] = np.median(s), s.min(), s.max()
        for j in range(n_labels):
            ok = rows & np.isfinite(true[:, j]) & np.isfinite(pred[:, j])
            out["n"][b, j] = int(ok.sum())
            if ok.sum() < 5:
                continue
            out["rmse"][b, j] = np.sqrt(np.mean((pred[ok, j] - true[ok, j]) ** 2))
            if bound is not None:
                bj = bound[ok, j]
                bj = bj[np.isfinite(bj)]
                if bj.size:
                    out["bound"][b, j] = np.sqrt(np.mean(bj**2))
    return out


def rmse_vs_snr_figure(pred: np.ndarray, true: np.ndarray, snr: np.ndarray, names: Sequence[str],
                       bound: np.ndarray | None = None, min_per_bin: int = MIN_PER_SNR_BIN) -> Figure:
    """One panel per label: test RMSE in equal-count SNR bins (error bar RMSE/sqrt(2N)), and the
    Cramér–Rao bound of the same stars where known."""
    stats = rmse_by_snr(pred, true, snr, bound, min_per_bin)
    n = len(names)
    fig = Figure(figsize=(4.0 * n, 3.8), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    x = stats["snr"]
    xerr = np.vstack([x - stats["snr_lo"], stats["snr_hi"] - x])
    for j, (ax, name) in enumerate(zip(axes, names)):
        rmse, counts = stats["rmse"][:, j], stats["n"][:, j]
        err = rmse / np.sqrt(2.0 * np.maximum(counts, 1))
        ax.errorbar(x, rmse, yerr=err, xerr=xerr, fmt="o-", color="C0", ms=4, capsize=2, label="test RMSE")
        b = stats["bound"][:, j]
        if np.isfinite(b).any():
            ax.plot(x, b, "s--", color="C3", ms=4, label="Cramér–Rao bound")
            ratio = np.nanmedian(rmse / b)
            ax.text(0.03, 0.04, f"median RMSE / bound {ratio:.2f}", transform=ax.transAxes, fontsize=8)
        ax.set_xscale("log")
        log_axes = [ax.xaxis]
        if np.nanmin(np.r_[rmse, b], initial=np.inf) > 0 and np.isfinite(rmse).any():
            ax.set_yscale("log")
            log_axes.append(ax.yaxis)
        for axis in log_axes:  # ticks at 1, 2, 5 x 10^k, written plainly (20, 50, 0.02)
            axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(FormatStrFormatter("%g"))
            axis.set_minor_formatter(NullFormatter())
        ax.margins(x=0.08, y=0.2)  # a single SNR bin's points stay clear of the frame and the notes
        ax.set_xlabel("SNR (per pixel)")
        ax.set_ylabel(f"RMSE {_axis_label(name)}")
        ax.set_title(f"{label_display(name)}: {len(x)} bin(s), N >= {int(counts.min()) if counts.size else 0} per bin", fontsize=9)
        ax.legend(fontsize=8, loc="best")
    return fig


def zscore_figure(pred: np.ndarray, true: np.ndarray, sigma: np.ndarray, names: Sequence[str]) -> Figure:
    """One panel per label: the histogram of z = (pred - true) / sigma over the unit Gaussian, with the
    fraction |z| < 1 (68.3 % if the sigmas are right) and the spread of z."""
    z = z_scores(pred, true, sigma)
    n = len(names)
    fig = Figure(figsize=(3.8 * n, 3.4), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    grid = np.linspace(-Z_RANGE, Z_RANGE, 301)
    gauss = np.exp(-0.5 * grid**2) / math.sqrt(2 * math.pi)
    for j, (ax, name) in enumerate(zip(axes, names)):
        zj = z[:, j][np.isfinite(z[:, j])]
        summary = calibration_summary(zj)
        inside = np.abs(zj) <= Z_RANGE
        top = gauss.max()
        if zj.size:
            counts, edges = np.histogram(zj[inside], bins=50, range=(-Z_RANGE, Z_RANGE))
            density = counts / (zj.size * np.diff(edges))
            ax.stairs(density, edges, fill=True, alpha=0.6, color="C0", label="test z")
            top = max(top, density.max())
        ax.set_ylim(0, 1.45 * top)  # room for the numbers and the legend above the peak
        ax.plot(grid, gauss, color="k", lw=1.2, label="unit Gaussian")
        text = (f"|z|<1: {100 * summary['frac_within_1sigma']:.1f} % (Gaussian {100 * GAUSSIAN_COVERAGE[1]:.1f} %)\n"
                f"std z {summary['z_std']:.2f}, mad_std {summary['z_mad_std']:.2f}\nN {summary['n']}")
        if (~inside).any():
            text += f", |z|>{Z_RANGE:g}: {int((~inside).sum())}"
        ax.text(0.02, 0.97, text, transform=ax.transAxes, va="top", fontsize=7.5,
                bbox={"facecolor": "white", "alpha": 0.8, "lw": 0})
        ax.set_xlim(-Z_RANGE, Z_RANGE)
        ax.set_xlabel(f"z = (pred - true) / sigma, {label_display(name)}")
        ax.set_ylabel("density")
        ax.legend(fontsize=7, loc="upper right")
    return fig


def _as_numpy(x) -> np.ndarray:
    return x.numpy() if hasattr(x, "numpy") else np.asarray(x)


def split_snr(datamodule, n_rows: int, split: str = "test") -> np.ndarray | None:
    """The test split's `snr` extra in split order (the order of the test predictions); None, with a log
    line, when the data have none or the test did not cover the split (debug=fdr tests one batch)."""
    arrays = datamodule.split_arrays(split) if hasattr(datamodule, "split_arrays") else {}
    if "snr" not in arrays:
        log.info("no RMSE-vs-SNR figure: %s has no per-spectrum SNR", type(datamodule).__name__)
        return None
    snr = _as_numpy(arrays["snr"]).astype(np.float64).ravel()
    if snr.size != n_rows:
        log.info("no RMSE-vs-SNR figure: the test predicted %d rows of a %d-spectrum split", n_rows, snr.size)
        return None
    if not np.isfinite(snr).any():
        log.info("no RMSE-vs-SNR figure: no test spectrum has a finite SNR")
        return None
    return snr


def split_bound(datamodule, names: Sequence[str], split: str = "test") -> np.ndarray | None:
    """Per test spectrum Cramér–Rao bounds (N, L) of `names` (NaN for a label the generator lacks), or
    None for data other than the synthetic survey. `survey_crlb` caches its Fisher matrices beside the
    survey, so the test step's own `crlb_vs_rmse` reads them back instead of computing them again."""
    from stellarlab.errors import DataError
    from stellarlab.synthetic.crlb import survey_crlb

    try:
        bounds = survey_crlb(datamodule, split)
    except DataError as err:
        log.warning("no Cramér–Rao bound on the RMSE-vs-SNR figure: %s", err)
        return None
    if bounds is None:
        return None
    sigma = bounds["sigma"]
    cols = [sigma[:, bounds["labels"].index(n)] if n in bounds["labels"] else np.full(len(sigma), np.nan) for n in names]
    return np.column_stack(cols)


def figures_of_test(results: Mapping, datamodule, names: Sequence[str], with_bound: bool = True) -> dict[str, Figure]:
    """The figures of a test: tag -> Figure (`test/pred_vs_true`, `test/rmse_vs_snr` when the data have an
    SNR, `test/z_scores` when the model predicts sigmas). A figure that fails is logged and left out:
    a figure is never worth a run's metrics."""
    names = list(names)
    pred, true = np.asarray(results["pred"]), np.asarray(results["true"])
    makers = {"test/pred_vs_true": lambda: pred_vs_true_figure(pred, true, names)}
    snr = split_snr(datamodule, len(pred))
    if snr is not None:
        makers["test/rmse_vs_snr"] = lambda: rmse_vs_snr_figure(
            pred, true, snr, names, split_bound(datamodule, names) if with_bound else None)
    if results.get("sigma") is not None:
        makers["test/z_scores"] = lambda: zscore_figure(pred, true, np.asarray(results["sigma"]), names)
    figures = {}
    for tag, make in makers.items():
        try:
            figures[tag] = make()
        except Exception as err:  # noqa: BLE001 - a broken figure must not cost the test results
            log.warning("figure %s not drawn: %s: %s", tag, type(err).__name__, err, exc_info=True)
    return figures


def write_figures(figures: Mapping[str, Figure], out_dir: str | Path) -> list[Path]:
    """Each figure as `<tag with / as _>.png` in `out_dir` (e.g. `test_rmse_vs_snr.png`)."""
    return [save_png(fig, Path(out_dir) / (tag.replace("/", "_") + ".png")) for tag, fig in figures.items()]


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
