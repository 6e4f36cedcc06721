"""The Payne's network: standardised labels -> continuum-normalised flux, with latent labels for what they leave out.

The spectra depend on more than the labels a run asks for (the synthetic survey's [alpha/Fe] when
data.labels=[teff,logg,fe_h]; any unlisted abundance in real spectra). An emulator of the listed labels alone
averages over the rest, and fitting it biases the labels by several times their noise. The network therefore
adds a response to k latent labels z, linear in z and shaped by the labels: flux = m(y) + A c(y) z, with A a
learnt basis of `LATENT_RANK` spectra. In training, z of each spectrum is solved for exactly (weighted least
squares with a N(0, 1) prior), so the network learns what the listed labels leave unexplained; in a fit, z is
free beside the labels (with the same prior) and the labels' formal errors include what not knowing z costs.

Each pixel's output is in units of its own spread: how far that pixel's flux varies across the training
stars, their noise taken out (`set_output`, from the emulator's preparation). Adam moves every weight by a
similar step whatever its gradient's size, so with raw flux outputs a line core that varies by tenths and a
continuum pixel that varies by thousandths get the same steps: the first crawls and the second jitters. In
units of the spread every pixel learns at the same relative pace, and the emulator ends far closer to the
spectra it learns.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from stellarlab.models.base import activation
from stellarlab.models.spectrum_fit import wide_dtype

#: Spectra in the basis A of the latent response (its shape per star is mixed from these by the labels).
LATENT_RANK = 32
#: Smallest output unit of a pixel (flux units): a pixel whose flux barely varies across the training stars
#: still gets a unit its weights can reach.
FLUX_SCALE_FLOOR = 1e-4


def pixel_mean_and_spread(flux: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pixel's (P,) weighted mean flux over the spectra (B, P), and its spread: the flux's variance about that
    mean less the noise variance 1/w, square-rooted (1 where no spectrum has data: any unit will do)."""
    used, total = weight > 0, weight.sum(0)
    mean = torch.where(total > 0, (weight * flux).sum(0) / total.clamp(min=1e-30), torch.ones_like(total))
    excess = torch.where(used, (flux - mean) ** 2 - 1.0 / weight.clamp(min=1e-30), 0.0)
    var = excess.sum(0) / used.sum(0).clamp(min=1)
    return mean, torch.where(used.any(0), var.clamp(min=0).sqrt(), torch.ones_like(var))


class FluxNetwork(nn.Module):
    """(labels, latent) -> flux: m(y) from a dense network, plus A c(y) z for the k latent labels z."""

    def __init__(self, n_labels: int, n_pixels: int, hidden_sizes: Sequence[int], act: str, latent_dims: int):
        super().__init__()
        self.n_labels, self.latent_dims = n_labels, latent_dims
        layers: list[nn.Module] = []
        width = n_labels
        for size in hidden_sizes:
            layers += [nn.Linear(width, int(size)), activation(act)]
            width = int(size)
        self.trunk = nn.Sequential(*layers)
        self.out = nn.Linear(width, n_pixels)
        self.register_buffer("flux_scale", torch.ones(n_pixels))  # each pixel's output unit (set_output)
        if latent_dims:
            self.mix = nn.Linear(width, LATENT_RANK * latent_dims)
            self.basis = nn.Parameter(torch.randn(n_pixels, LATENT_RANK) * 1e-3)

    def _mean_and_mix(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(m(y) (..., P), the basis mixing c(y) (..., rank, k) or None)."""
        h = self.trunk(labels)
        flux = self.out(h) * self.flux_scale
        if not self.latent_dims:
            return flux, None
        return flux, self.mix(h).unflatten(-1, (LATENT_RANK, self.latent_dims))

    def parts(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(m(y) (..., P), the latent response A c(y) (..., P, k) or None)."""
        flux, mix = self._mean_and_mix(labels)
        return flux, None if mix is None else self.basis @ mix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """m(y) + A c(y) z, with c(y) z (..., rank) formed first: one product with the basis, not one per spectrum."""
        flux, mix = self._mean_and_mix(x[..., : self.n_labels])
        if mix is None:
            return flux
        coefficients = (mix @ x[..., self.n_labels :].unsqueeze(-1)).squeeze(-1)
        return flux + coefficients @ self.basis.T

    @torch.no_grad()
    def set_output(self, mean: torch.Tensor, spread: torch.Tensor) -> None:
        """Start every pixel's output at its mean flux (P,), in units of its spread (P,) across the training stars."""
        scale = spread.to(self.flux_scale).clamp(min=FLUX_SCALE_FLOOR)
        self.flux_scale.copy_(scale)
        self.out.bias.copy_(mean.to(scale) / scale)

    @staticmethod
    @torch.no_grad()
    def solve_latent(mean: torch.Tensor, response: torch.Tensor, flux: torch.Tensor, cinv: torch.Tensor) -> torch.Tensor:
        """z (B, k) maximising each spectrum's posterior at its known labels: flux is linear in z, so exactly."""
        weighted = response * cinv.unsqueeze(-1)
        a = weighted.transpose(-1, -2) @ response + torch.eye(response.shape[-1], device=flux.device)
        b = weighted.transpose(-1, -2) @ (flux - mean).unsqueeze(-1)
        wide = wide_dtype(flux.device)
        return torch.linalg.solve(a.to(wide), b.to(wide)).squeeze(-1).to(flux.dtype)

    def emulate_known(self, labels: torch.Tensor, flux: torch.Tensor, cinv: torch.Tensor) -> torch.Tensor:
        """The emulated flux at known labels, latent labels solved for each spectrum (gradients through the network)."""
        mean, response = self.parts(labels)
        if response is None:
            return mean
        z = self.solve_latent(mean.detach(), response.detach(), flux, cinv)
        return mean + (response @ z.unsqueeze(-1)).squeeze(-1)


__all__ = ["FLUX_SCALE_FLOOR", "LATENT_RANK", "FluxNetwork", "pixel_mean_and_spread"]
