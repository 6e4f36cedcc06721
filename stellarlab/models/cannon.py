"""The Cannon's spectral model: the flux of every pixel is a quadratic polynomial in the (standardised) labels.

flux_p(x) = theta_p . v(x), v(x) = [1, x_1 .. x_L, x_i x_j (i <= j)]: 10 coefficients per pixel for three labels.
Given the training labels the model is linear in theta, so each pixel is a weighted least-squares problem of
its own, solved for all pixels at once: M_p = sum_n c_np v_n v_n^T with one matrix product of the training
set's outer products (N, Q^2) against the weights (N, P). Each spectrum's pixel has the variance 1/w_np plus
the pixel's intrinsic scatter s_p^2 (what the quadratic cannot follow), so c_np = w_np / (1 + w_np s_p^2).
theta and s^2 are found in turn: least squares at fixed scatter, then the maximum-likelihood scatter of
the residuals (`spectrum_fit.fit_scatter`, on up to SCATTER_ROWS spectra), until the scatter settles.
A quadratic misses the same spectral shapes in many stars at once (a line's curve of growth, a band that
changes with gravity), so its errors are correlated across pixels: `error_basis` measures their leading
patterns on the same spectra, and the label fit counts them as noise (`spectrum_fit.ErrorBasis`).
Float64 throughout the solve: the quadratic terms of standardised labels reach ~10 and the Gram sums run
over thousands of stars.
"""

from __future__ import annotations

import torch
from torch import nn

from stellarlab.errors import ConfigError
from stellarlab.models.spectrum_fit import ErrorBasis, fit_error_basis, fit_scatter, inverse_variance, wide_dtype

#: Rounds of (least squares, scatter) at most.
ROUNDS = 6
#: Relative change of every pixel's scatter s^2 below which the rounds stop (a percent of s^2 moves theta by far
#: less than its own uncertainty).
SCATTER_RTOL = 1e-2
#: Pixels solved at once (a block's float64 normal matrices and weights).
PIXEL_BLOCK = 2048
#: Training spectra whose residuals measure the scatter (evenly spaced through the split): s^2 to a few percent.
SCATTER_ROWS = 2000


def n_terms(n_labels: int) -> int:
    """Coefficients per pixel: constant, linear and quadratic (with cross) terms."""
    return 1 + n_labels + n_labels * (n_labels + 1) // 2


def quadratic_design(x: torch.Tensor) -> torch.Tensor:
    """v(x) = [1, x_i, x_i x_j (i <= j)] along the last axis: (..., L) -> (..., n_terms(L))."""
    n = x.shape[-1]
    rows, cols = torch.triu_indices(n, n, device=x.device)
    return torch.cat([torch.ones_like(x[..., :1]), x, x[..., rows] * x[..., cols]], dim=-1)


class QuadraticFlux(nn.Module):
    """labels (B, L) -> flux (B, P) = v(labels) theta^T, and the patterns of its error; fitted in closed form (`fit`),
    never by gradients."""

    def __init__(self, n_labels: int, n_pixels: int, error_components: int = 0):
        super().__init__()
        if error_components > n_pixels:
            raise ConfigError(f"model.error_components={error_components} is more than the spectra's {n_pixels} pixels: "
                              "each pattern is a spectrum's worth of flux; lower it (model=cannon uses 12)")
        theta = torch.zeros(n_pixels, n_terms(n_labels))
        theta[:, 0] = 1.0  # the continuum until fitted
        self.theta = nn.Parameter(theta, requires_grad=False)
        self.register_buffer("error_patterns", torch.zeros(n_pixels, error_components))
        self.register_buffer("error_variance", torch.ones(error_components))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quadratic_design(x) @ self.theta.T

    @property
    def error_basis(self) -> ErrorBasis | None:
        """The correlated part of the model's error for the label fit; None without error components."""
        return ErrorBasis(self.error_patterns, self.error_variance) if self.error_variance.numel() else None

    @torch.no_grad()
    def fit(self, labels: torch.Tensor, flux: torch.Tensor, weight: torch.Tensor, scatter: bool = True) -> torch.Tensor:
        """Fit theta and the error patterns to training spectra at their standardised labels; returns the per-pixel
        scatter s^2 the patterns leave (zeros without `scatter`)."""
        k, rows = self.error_variance.numel(), len(scatter_rows(len(flux), flux.device))
        if k > rows:
            raise ConfigError(f"model.error_components={k} is more than the {rows} training spectra its patterns are "
                              "measured on; lower it or train on more stars")
        theta, s2 = fit_quadratic(labels, flux, weight, scatter=scatter)
        self.theta.copy_(theta)
        if k:
            basis, s2 = error_basis(labels, flux, weight, theta, s2, k)
            self.error_patterns.copy_(basis.patterns)
            self.error_variance.copy_(basis.variance)
        return s2


def weighted_least_squares(design: torch.Tensor, flux: torch.Tensor, cinv: torch.Tensor) -> torch.Tensor:
    """theta (P, Q) minimising sum_n cinv_np (flux_np - design_n . theta_p)^2 for every pixel p (float64 solve).

    A pixel no spectrum has data on gets the continuum (theta = [1, 0, ...]); a tiny ridge keeps a pixel with too
    few spectra for its Q coefficients solvable.
    """
    wide = wide_dtype(flux.device)
    v = design.to(wide)
    n, q = v.shape
    outer = (v[:, :, None] * v[:, None, :]).reshape(n, q * q)
    theta = torch.zeros(flux.shape[1], q, dtype=wide, device=flux.device)
    eye = torch.eye(q, dtype=wide, device=flux.device)
    for p0 in range(0, flux.shape[1], PIXEL_BLOCK):
        cols = slice(p0, p0 + PIXEL_BLOCK)
        c = cinv[:, cols].to(wide)
        m = (c.T @ outer).view(-1, q, q)
        b = (c * flux[:, cols].to(wide)).T @ v
        scale = m.diagonal(dim1=-2, dim2=-1).amax(-1)
        empty = scale <= 0
        m = m + (1e-12 * scale.clamp(min=1e-300))[:, None, None] * eye
        m[empty] = eye
        solved = torch.linalg.solve(m, b.unsqueeze(-1)).squeeze(-1)
        solved[empty] = 0.0
        solved[empty, 0] = 1.0
        theta[cols] = solved
    return theta


def fit_quadratic(labels: torch.Tensor, flux: torch.Tensor, weight: torch.Tensor,
                  scatter: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(theta (P, Q) float32, scatter s^2 (P,)) of The Cannon on training spectra with known standardised labels.

    labels (N, L), flux and weight (N, P), weight the inverse variance (0: no data). Without `scatter` it is the
    plain weighted least-squares solution (s = 0).
    """
    design = quadratic_design(labels.float())
    s2 = torch.zeros(flux.shape[1], dtype=flux.dtype, device=flux.device)
    theta = weighted_least_squares(design, flux, weight)
    if not scatter:
        return theta.float(), s2
    rows = scatter_rows(len(flux), flux.device)
    for _ in range(ROUNDS):
        resid = flux[rows] - (design[rows].to(theta.dtype) @ theta.T).to(flux.dtype)
        new = fit_scatter(resid, weight[rows])
        del resid
        settled = bool(((new - s2).abs() <= SCATTER_RTOL * new.clamp(min=1e-30)).all())
        s2 = new
        theta = weighted_least_squares(design, flux, inverse_variance(weight, s2))
        if settled:
            break
    return theta.float(), s2


def scatter_rows(n: int, device: torch.device) -> torch.Tensor:
    """The training spectra the scatter and the error patterns are measured on: up to SCATTER_ROWS, evenly spaced."""
    return torch.linspace(0, n - 1, min(n, SCATTER_ROWS), device=device).round().long().unique()


def error_basis(labels: torch.Tensor, flux: torch.Tensor, weight: torch.Tensor, theta: torch.Tensor,
                scatter2: torch.Tensor, n_components: int) -> tuple[ErrorBasis, torch.Tensor]:
    """(the `n_components` leading patterns of the fitted quadratic's error, the scatter s^2 they leave per pixel),
    from its residuals on the training spectra at their labels (`spectrum_fit.fit_error_basis`)."""
    rows = scatter_rows(len(flux), flux.device)
    resid = flux[rows] - (quadratic_design(labels[rows].float()) @ theta.T.to(flux)).to(flux.dtype)
    return fit_error_basis(resid, weight[rows], scatter2, n_components)


__all__ = ["QuadraticFlux", "error_basis", "fit_quadratic", "n_terms", "quadratic_design", "scatter_rows", "weighted_least_squares"]
