"""Labels by full-spectrum fitting: chi-square between an observed spectrum and an emulator, minimised over the labels.

`fit_spectra(emulate, flux, weight, ...)` fits a batch of spectra at once. `emulate` maps labels (B, L) to
model flux (B, P), row by row (The Payne's network, The Cannon's quadratic, ...). The noise of pixel p of
spectrum b is its own variance 1/w_bp plus the emulator's intrinsic scatter s_p^2 (what the emulator cannot
reproduce, measured on held-out or training spectra), so C^-1 = w / (1 + w s^2) and a zero-weight pixel
carries nothing. An emulator's error is smooth in wavelength, the same shape in many pixels at once: an
`ErrorBasis` adds it as a covariance of low rank, C = D^-1 + U diag(v) U^T (D the diagonal C^-1 above), which
Woodbury's identity applies at the cost of k x k solves, so the fit gives little weight to what looks like
the emulator's usual mistakes (`fit_error_basis` measures U and v on spectra with known labels).

The minimiser is a batched, bounded Levenberg-Marquardt: every spectrum has its own damping; the Jacobian
d flux / d labels comes from forward-mode autodiff (`torch.func.jacfwd` under `vmap`: one pass per label
direction, exact to the emulator's precision), and a trial point's Jacobian is computed with its flux, so an
accepted step costs no extra pass. Labels stay inside [low, high] (the training range: an emulator
extrapolates badly): steps are clipped there, and a label held at a bound by its gradient is fixed while the
others move. A spectrum has converged when the Gauss-Newton step from its current point promises a
chi-square decrease below `tol` (a distance to the minimum far below one formal sigma); converged spectra
leave the batch, so the remaining iterations cost only the hard ones.

Starts: `template_starts` scores every spectrum against a fixed set of emulated template spectra with two
matrix products and starts from the `n_starts` best; the fit from each start runs and the lowest chi-square is
kept. `retry_poor_fits` fits again, from further starts, the spectra whose best fit is still poor. Formal errors
are sqrt(diag((J^T C^-1 J)^-1)) at the solution.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.func import jacfwd, vmap

Emulator = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ErrorBasis:
    """The emulator's correlated error: k flux patterns U (P, k) with variances v (k,), C = D^-1 + U diag(v) U^T."""

    patterns: torch.Tensor  # (P, k)
    variance: torch.Tensor  # (k,), > 0

    def coupling(self, cinv: torch.Tensor) -> torch.Tensor:
        """(diag(1/v) + U^T D U)^-1 per spectrum (B, k, k), float64: the Woodbury middle factor of C^-1 for D = cinv (B, P)."""
        wide = wide_dtype(cinv.device)
        u = self.patterns.to(cinv)
        m = torch.einsum("pi,bp,pj->bij", u, cinv, u).to(wide)
        return torch.linalg.inv(m + torch.diag(1.0 / self.variance.to(device=cinv.device, dtype=wide)))


#: Damping of the first step, and the factor it is divided by on success and multiplied by on failure.
LAMBDA_START, LAMBDA_FACTOR = 1e-2, 10.0
#: Damping above which a spectrum stops: no step, however small, lowers its chi-square any more.
LAMBDA_MAX = 1e10
#: A retried fit replaces the first one only if its chi-square is lower by more than this (one sigma's worth): the
#: same minimum reached from another start ends within the stopping tolerance of it, and which of two such ends
#: wins would hang on rounding (the batch's size); another basin worth taking is lower by far more.
RETRY_MIN_GAIN = 1.0


@dataclass
class FitResult:
    """One row per spectrum; labels and sigmas in the emulator's label units (standardised for stellarlab's emulator)."""

    labels: torch.Tensor  # (B, L) best fit
    sigma: torch.Tensor  # (B, L) formal errors sqrt(diag((J^T C^-1 J)^-1)), C with the intrinsic scatter
    chi2: torch.Tensor  # (B,) of the pixels (a prior's term left out), float64
    n_pixels: torch.Tensor  # (B,) pixels with C^-1 > 0
    converged: torch.Tensor  # (B,) bool: the stopping rule was met within the iterations allowed
    iterations: torch.Tensor  # (B,) LM iterations taken by the kept start
    at_bound: torch.Tensor  # (B, L) bool: the label ended on its bound (the fit wanted to go beyond)

    @property
    def rchi2(self) -> torch.Tensor:
        """Reduced chi-square chi2 / (pixels - labels): about 1 for a spectrum the emulator describes."""
        dof = (self.n_pixels - self.labels.shape[1]).clamp(min=1)
        return self.chi2 / dof.to(self.chi2.dtype)

    def select(self, index: torch.Tensor) -> FitResult:
        return FitResult(*(getattr(self, f)[index] for f in self.__dataclass_fields__))


def wide_dtype(device: torch.device) -> torch.dtype:
    """float64 for sums over thousands of pixels or stars; MPS has none, so float32 there."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def inverse_variance(weight: torch.Tensor, scatter2: torch.Tensor | None) -> torch.Tensor:
    """C^-1 per pixel: 1 / (1/w + s^2) = w / (1 + w s^2); 0 where w is 0 (no data)."""
    weight = weight.clamp(min=0)
    if scatter2 is None:
        return weight
    return weight / (1.0 + weight * scatter2)


def value_and_jacobian(emulate: Emulator, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(emulate(labels) (B, P), d flux / d labels (B, P, L)) from one forward-mode pass per label direction."""

    def one(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = emulate(x.unsqueeze(0)).squeeze(0)
        return out, out

    jac, value = vmap(jacfwd(one, has_aux=True))(labels)
    return value, jac


def _normal_equations(jac, cinv, resid, x, prior, basis=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(J^T C^-1 J, J^T C^-1 r, chi2) in float64 (the sums run over thousands of pixels), with the prior's terms.

    `basis`: (ErrorBasis, its coupling for these rows) or None. C^-1 = D - D U K U^T D (Woodbury, K the coupling), so
    each product loses the part of it along the patterns: J^T C^-1 r = J^T D r - (U^T D J)^T K (U^T D r)."""
    wide = wide_dtype(jac.device)
    weighted = jac * cinv.unsqueeze(-1)
    a = torch.bmm(weighted.transpose(1, 2), jac).to(wide)
    g = torch.bmm(weighted.transpose(1, 2), resid.unsqueeze(-1)).squeeze(-1).to(wide)
    chi2 = (cinv * resid * resid).sum(1).to(wide)  # a float32 sum: a float64 copy of (B, P) costs more than the fit
    if basis is not None:
        u, coupling = basis[0].patterns.to(jac), basis[1]
        ur = ((cinv * resid) @ u).to(wide)  # (B, k)
        uj = torch.einsum("bpl,pk->bkl", weighted, u).to(wide)  # (B, k, L)
        k_ur, k_uj = torch.bmm(coupling, ur.unsqueeze(-1)), torch.bmm(coupling, uj)
        a = a - torch.bmm(uj.transpose(1, 2), k_uj)
        g = g - torch.bmm(uj.transpose(1, 2), k_ur).squeeze(-1)
        chi2 = chi2 - (ur.unsqueeze(-1) * k_ur).sum((1, 2))
    if prior is not None:  # a Gaussian N(0, 1/prior) on each coordinate: one more "pixel" per label
        xd = x.to(wide)
        a = a + torch.diag_embed(prior.expand_as(xd))
        g = g - prior * xd
        chi2 = chi2 + (prior * xd * xd).sum(1)
    return a, g, chi2


def _free_system(a, g, x, low, high) -> tuple[torch.Tensor, torch.Tensor]:
    """The normal equations with every label that sits on a bound and is pushed outwards fixed (identity row, no gradient)."""
    held = ((x <= low) & (g < 0)) | ((x >= high) & (g > 0))
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    keep = (~held).to(a.dtype)
    a = a * keep.unsqueeze(-1) * keep.unsqueeze(-2) + eye * (1 - keep).unsqueeze(-1)
    return a, g * keep


def _solve(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """A^-1 g per row; a singular A (a label with no effect on the flux) gets a small ridge instead of NaN."""
    ridge = 1e-9 * a.diagonal(dim1=-2, dim2=-1).abs().amax(-1).clamp(min=1e-30)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    return torch.linalg.solve(a + ridge[:, None, None] * eye, g.unsqueeze(-1)).squeeze(-1)


def formal_errors(a: torch.Tensor) -> torch.Tensor:
    """sqrt(diag(A^-1)) per row (inf for a label the spectrum says nothing about)."""
    d = a.diagonal(dim1=-2, dim2=-1).clamp(min=0).sqrt()
    ok = (d > 0).all(-1)
    scale = torch.where(ok.unsqueeze(-1), d, torch.ones_like(d))
    unit = a / (scale.unsqueeze(-1) * scale.unsqueeze(-2))  # unit diagonal: labels of very different sizes
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    unit = torch.where(ok[:, None, None], unit, eye)
    inv, info = torch.linalg.inv_ex(unit)
    var = inv.diagonal(dim1=-2, dim2=-1) / scale**2
    bad = ~ok | (info != 0) | (var <= 0).any(-1)
    return torch.where(bad.unsqueeze(-1), torch.full_like(var, float("inf")), var.clamp(min=0).sqrt())


def levenberg_marquardt(emulate: Emulator, flux: torch.Tensor, cinv: torch.Tensor, start: torch.Tensor,
                        low: torch.Tensor, high: torch.Tensor, max_iter: int = 30, tol: float = 1e-2,
                        prior: torch.Tensor | None = None, basis: ErrorBasis | None = None) -> FitResult:
    """Minimise sum_p C^-1_bp (flux_bp - emulate(x_b)_p)^2 (+ sum_i prior_i x_bi^2) over x_b in [low, high] for every row b.

    `prior` (L,): the precision of a Gaussian prior N(0, 1/prior_i) per coordinate, 0 for none (a nuisance
    coordinate the emulator learnt with such a prior). chi2 and the formal errors then include it. `basis`: the
    emulator's correlated error, part of C."""
    n, n_labels = start.shape
    dev = flux.device
    x = torch.maximum(torch.minimum(start.to(flux.dtype), high), low)
    value, jac = value_and_jacobian(emulate, x)
    resid = flux - value
    wide = wide_dtype(dev)
    prior = None if prior is None else prior.to(device=dev, dtype=wide)
    coupling = None if basis is None else basis.coupling(cinv)

    def low_rank(rows):
        return None if basis is None else (basis, coupling if rows is None else coupling[rows])

    a, g, chi2 = _normal_equations(jac, cinv, resid, x, prior, low_rank(None))
    lam = torch.full((n,), LAMBDA_START, dtype=wide, device=dev)
    done = torch.zeros(n, dtype=torch.bool, device=dev)
    converged = torch.zeros(n, dtype=torch.bool, device=dev)
    iterations = torch.zeros(n, dtype=torch.long, device=dev)
    for it in range(max_iter + 1):
        rows = torch.nonzero(~done).flatten()
        if not len(rows):
            break
        xa, la, ha = x[rows], low.expand(n, -1)[rows], high.expand(n, -1)[rows]
        xw, lw, hw = xa.to(wide), la.to(wide), ha.to(wide)
        af, gf = _free_system(a[rows], g[rows], xw, lw, hw)
        # Convergence: the Gauss-Newton step (clipped to the bounds) promises less than tol of chi-square.
        step = torch.maximum(torch.minimum(xw + _solve(af, gf), hw), lw) - xw
        promised = 2 * (gf * step).sum(-1) - torch.einsum("bi,bij,bj->b", step, af, step)
        now = promised < tol
        stuck = lam[rows] > LAMBDA_MAX
        converged[rows[now]] = True
        done[rows[now | stuck]] = True
        if it == max_iter:
            break
        rows, af, gf = rows[~(now | stuck)], af[~(now | stuck)], gf[~(now | stuck)]
        if not len(rows):
            break
        damped = af + lam[rows, None, None] * torch.diag_embed(af.diagonal(dim1=-2, dim2=-1))
        trial = (x[rows].to(wide) + _solve(damped, gf)).to(x.dtype)
        trial = torch.maximum(torch.minimum(trial, high.expand(n, -1)[rows]), low.expand(n, -1)[rows])
        t_value, t_jac = value_and_jacobian(emulate, trial)
        t_resid = flux[rows] - t_value
        t_a, t_g, t_chi2 = _normal_equations(t_jac, cinv[rows], t_resid, trial, prior, low_rank(rows))
        better = t_chi2 < chi2[rows]
        take = rows[better]
        x[take], jac[take], resid[take] = trial[better], t_jac[better], t_resid[better]
        a[take], g[take], chi2[take] = t_a[better], t_g[better], t_chi2[better]
        lam[rows] = torch.where(better, (lam[rows] / LAMBDA_FACTOR).clamp(min=1e-7), lam[rows] * LAMBDA_FACTOR)
        iterations[rows] += 1
    at_bound = ((x <= low) | (x >= high)) & (high > low)
    n_pixels = (cinv > 0).sum(1)
    if prior is not None:  # the goodness of fit is the pixels' chi-square; the prior only steered the search
        chi2 = chi2 - (prior * x.to(wide) ** 2).sum(1)
    return FitResult(x, formal_errors(a).to(x.dtype), chi2, n_pixels, converged, iterations, at_bound)


def template_starts(flux: torch.Tensor, cinv: torch.Tensor, template_labels: torch.Tensor,
                    template_flux: torch.Tensor, n_starts: int) -> torch.Tensor:
    """(B, n_starts, L): the labels of the templates with the lowest chi-square for each spectrum.

    chi2[b, k] = sum_p C^-1_bp (f_bp - t_kp)^2 = const_b - 2 (C^-1 f) t_k + C^-1 t_k^2: two matrix products for all pairs.
    """
    cross = (cinv * flux) @ template_flux.T
    power = cinv @ (template_flux * template_flux).T
    score = power - 2 * cross
    best = torch.topk(score, k=min(n_starts, len(template_labels)), dim=1, largest=False).indices
    return template_labels[best]


def fit_spectra(emulate: Emulator, flux: torch.Tensor, weight: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
                scatter2: torch.Tensor | None = None, starts: torch.Tensor | None = None, max_iter: int = 30,
                tol: float = 1e-2, prior: torch.Tensor | None = None, basis: ErrorBasis | None = None) -> FitResult:
    """Fit every spectrum of the batch from each of its starts; keep, per spectrum, the start that ends with the lowest chi2.

    `flux`, `weight` (inverse variance, 0 = no data): (B, P). `starts`: (B, S, L) or (S, L) for all spectra alike;
    None starts from the middle of the bounds. `low`, `high`: (L,) bounds in the emulator's label units.
    """
    b = flux.shape[0]
    low, high = low.to(flux), high.to(flux)
    if starts is None:
        starts = ((low + high) / 2).expand(b, 1, -1)
    elif starts.dim() == 2:
        starts = starts.unsqueeze(0).expand(b, -1, -1)
    n_starts = starts.shape[1]
    cinv = inverse_variance(weight, scatter2)
    if n_starts == 1:
        return levenberg_marquardt(emulate, flux, cinv, starts[:, 0], low, high, max_iter, tol, prior, basis)
    result = levenberg_marquardt(emulate, flux.repeat_interleave(n_starts, 0), cinv.repeat_interleave(n_starts, 0),
                                 starts.reshape(b * n_starts, -1), low, high, max_iter, tol, prior, basis)
    best = result.chi2.view(b, n_starts).argmin(1) + torch.arange(b, device=flux.device) * n_starts
    return result.select(best)


def retry_poor_fits(emulate: Emulator, flux: torch.Tensor, weight: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
                    scatter2: torch.Tensor | None, fit: FitResult, starts: torch.Tensor, rchi2_above: float,
                    max_iter: int = 30, tol: float = 1e-2, prior: torch.Tensor | None = None,
                    basis: ErrorBasis | None = None) -> tuple[FitResult, int, int]:
    """(fit, spectra retried, fits improved): every spectrum whose `fit` ended above `rchi2_above` in reduced chi-square
    is fitted again from its `starts` (B, S, L), other starts than the first fit's; a chi-square lower by more than
    RETRY_MIN_GAIN is kept.

    A start in the wrong basin (a giant's spectrum whose best template was a dwarf) ends in a local minimum
    hundreds of chi-square units above the right one, so its reduced chi-square stands out from the good fits'.
    Only those pay for the extra starts."""
    poor = torch.nonzero(fit.rchi2 > rchi2_above).flatten()
    if not len(poor):
        return fit, 0, 0
    again = fit_spectra(emulate, flux[poor], weight[poor], low, high, scatter2, starts[poor], max_iter, tol, prior, basis)
    better = again.chi2 < fit.chi2[poor] - RETRY_MIN_GAIN
    rows = poor[better]
    merged = {}
    for name in FitResult.__dataclass_fields__:
        column = getattr(fit, name).clone()
        column[rows] = getattr(again, name)[better]
        merged[name] = column
    return FitResult(**merged), len(poor), int(better.sum())


#: A unit Gaussian has half of its |z| below this.
HALF_NORMAL_MEDIAN = 0.6744897501960817


def error_scale(labels: torch.Tensor, sigma: torch.Tensor, converged: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per label, median |z| / 0.674 of the converged fits (z = (labels - truth) / sigma): the factor that gives the
    formal errors the spread of a unit Gaussian, robust to the few fits far off; 1 where fewer than 20 converged."""
    z = ((labels - truth) / sigma)[converged]
    z = z[torch.isfinite(z).all(1)]
    if len(z) < 20:
        return torch.ones(labels.shape[1], device=labels.device)
    return (z.abs().median(0).values / HALF_NORMAL_MEDIAN).clamp(min=1e-3)


def fit_scatter(resid: torch.Tensor, weight: torch.Tensor, iterations: int = 10, rtol: float = 1e-3,
                block: int = 512) -> torch.Tensor:
    """Per pixel the intrinsic variance s^2 >= 0 that maximises the Gaussian likelihood of the residuals.

    resid, weight: (N, P). The likelihood's derivative in s^2, g = sum_n (r^2 / v - 1) / v with v = 1/w + s^2 over
    the rows with w > 0, is positive at s^2 = 0 when the residuals exceed their noise (else s^2 = 0) and negative
    once s^2 passes the largest r^2. Its root is found by Newton's method from the moment estimate, kept inside
    the bracket [0, max r^2] that every step narrows (a step leaving it bisects instead); it stops at a relative
    change of `rtol`, far below the estimate's own uncertainty (sqrt(2/N) of s^2 and more). A narrow block of pixels
    at a time, so the temporaries stay in the processor's cache: the work is a few passes over N x P numbers per
    iteration, and memory traffic is its cost.
    """
    wide = wide_dtype(weight.device)
    out = torch.zeros(resid.shape[1], dtype=resid.dtype, device=resid.device)
    for p0 in range(0, resid.shape[1], block):
        cols = slice(p0, p0 + block)
        w = weight[:, cols].float()
        used = w > 0
        var = torch.where(used, 1.0 / w.clamp(min=torch.finfo(w.dtype).tiny), torch.full_like(w, float("inf")))
        r2 = torch.where(used, resid[:, cols].float() ** 2, torch.zeros_like(w))
        n_used = used.sum(0).to(wide)

        def slope(s2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """(g, dg/ds^2) per pixel; a row without data has 1/v = 0."""
            inv = 1.0 / (var + s2.float())
            inv2 = inv * inv
            term = r2 * inv2
            g = term.sum(0).to(wide) - inv.sum(0).to(wide)
            return g, inv2.sum(0).to(wide) - 2.0 * (term * inv).sum(0).to(wide)

        positive = slope(torch.zeros(w.shape[1], dtype=wide, device=w.device))[0] > 0
        lo = torch.zeros(w.shape[1], dtype=wide, device=w.device)
        hi = torch.where(positive, r2.amax(0).to(wide), lo)  # the others are settled at 0
        s2 = ((r2.sum(0).to(wide) - torch.where(used, var, 0.0).sum(0).to(wide)) / n_used.clamp(min=1)).clamp(min=0)
        s2 = torch.where((s2 > lo) & (s2 < hi), s2, (lo + hi) / 2)
        for _ in range(iterations):
            g, dg = slope(s2)
            lo, hi = torch.where(g > 0, s2, lo), torch.where(g > 0, hi, s2)
            newton = s2 - g / torch.where(dg < 0, dg, -torch.ones_like(dg))
            step = torch.where((dg < 0) & (newton > lo) & (newton < hi), newton, (lo + hi) / 2)
            done = bool(((step - s2).abs() <= rtol * step.abs() + 1e-30).all())
            s2 = step
            if done:
                break
        out[cols] = torch.where(positive & (used.sum(0) > 1), s2, torch.zeros_like(s2)).to(out.dtype)
    return out


def fit_error_basis(resid: torch.Tensor, weight: torch.Tensor, scatter2: torch.Tensor,
                    n_components: int) -> tuple[ErrorBasis, torch.Tensor]:
    """(the `ErrorBasis` of the emulator's `n_components` strongest correlated errors, the scatter s^2 left per pixel).

    resid (N, P): observed minus emulated flux at known labels; weight (N, P) their inverse variance; scatter2 (P,)
    the per-pixel scatter measured on them. The residuals in units of their per-pixel sigma sqrt(1/w + s^2)
    would have the identity as covariance if pixels erred independently; its leading eigenvectors (an SVD of the
    N x P matrix) are the shapes the emulator gets wrong together, and eigenvalue - 1 their variance in those
    units. Back in flux units (each pixel's typical sigma), the patterns' share of each pixel's variance is taken
    out of s^2, which had counted it as independent. Computed on the CPU in float64 (MPS has neither an SVD nor
    float64; the matrix is a few thousand spectra), returned on the residuals' device.
    """
    device, dtype = resid.device, resid.dtype
    resid, weight, scatter2 = resid.cpu(), weight.cpu(), scatter2.cpu()
    wide = torch.float64
    used = weight > 0
    var = torch.where(used, 1.0 / weight.clamp(min=torch.finfo(weight.dtype).tiny) + scatter2, torch.ones_like(weight))
    z = torch.where(used, resid / var.sqrt(), torch.zeros_like(resid)).to(wide)
    typical = torch.where(used, var, torch.nan).nanmedian(0).values.sqrt().nan_to_num(0.0).to(wide)
    k = min(int(n_components), *z.shape)
    _, singular, vh = torch.linalg.svd(z, full_matrices=False)
    eigen = singular[:k] ** 2 / used.any(1).sum().clamp(min=1)
    variance = (eigen - 1.0).clamp(min=1e-6)
    patterns = typical[:, None] * vh[:k].T
    left = (scatter2.to(wide) - (patterns**2 * variance).sum(1)).clamp(min=0)
    return ErrorBasis(patterns.to(device, dtype), variance.to(device, dtype)), left.to(device, dtype)


__all__ = ["HALF_NORMAL_MEDIAN", "ErrorBasis", "FitResult", "error_scale", "fit_error_basis", "fit_spectra", "fit_scatter", "formal_errors", "inverse_variance",
           "levenberg_marquardt", "template_starts", "value_and_jacobian", "wide_dtype"]
