"""`model=ridge`: least squares with an L2 penalty, solved in closed form in one pass (`ClosedFormRegressor`).

Solver: features are centred (the intercept is not penalised) and the normal equations are
solved by Cholesky in float64, the Gram matrix accumulated in float64 too, so that small alphas
stay exact (a float32 Gram of the centred data changed default-survey predictions by 4e-5 standard
deviations at alpha = 0.01: small, but not nothing). With n training spectra and p pixels the system is n x n in the dual (kernel) form,
w = Xc^T (Xc Xc^T + alpha I)^-1 yc, and p x p in the primal form, (Xc^T Xc + alpha I) w = Xc^T yc;
both give the same w, and the smaller one is solved. On the default survey (n = 6400, p = 8575,
2 busy cores) the dual took 25 s for the Gram and 6 s per Cholesky, the primal 30 s and 10 s; for
large surveys (n > p) the primal keeps the system at p x p. A Cholesky per candidate alpha rather
than one eigendecomposition for all: MKL's symmetric eigensolver took ~60 s for n = 4000 on two
cores, a Cholesky ~1 s. Memory: the training split once in float32, plus the float64 Gram matrix
and its factor (2 x 330 MB on the default survey); the Gram is built in 64 MB blocks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import torch
from torch import nn

from stellarlab.checks import PositiveNumbers
from stellarlab.errors import ConfigError
from stellarlab.models.closed_form import ClosedFormRegressor, candidate_list, label_groups
from stellarlab.models.losses import masked_mse

log = logging.getLogger(__name__)

#: Largest temporary a block of the float64 Gram products may take (elements): 64 MB.
BLOCK_ELEMENTS = 1 << 23


def _row_blocks(n: int, width: int):
    step = max(1, BLOCK_ELEMENTS // max(width, 1))
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def centred_gram(x: torch.Tensor, mean: torch.Tensor, dual: bool) -> torch.Tensor:
    """Xc Xc^T (dual, n x n) or Xc^T Xc (primal, p x p) in float64 with Xc = x - mean, a block at a time."""
    n, p = x.shape
    size = n if dual else p
    gram = torch.zeros(size, size, dtype=torch.float64, device=x.device)
    if dual:
        for j0, j1 in _row_blocks(p, n):  # pixel blocks: n x block float64 at a time
            xb = x[:, j0:j1].double() - mean[j0:j1]
            gram.addmm_(xb, xb.T)
    else:
        for i0, i1 in _row_blocks(n, p):
            xb = x[i0:i1].double() - mean
            gram.addmm_(xb.T, xb)
    return gram


def centred_xt(x: torch.Tensor, mean: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Xc^T z in float64 (p x m) for z (n x m), a block of rows at a time."""
    out = torch.zeros(x.shape[1], z.shape[1], dtype=torch.float64, device=x.device)
    for i0, i1 in _row_blocks(len(x), x.shape[1]):
        out.addmm_((x[i0:i1].double() - mean).T, z[i0:i1])
    return out


def ridge_solutions(x: torch.Tensor, y: torch.Tensor, alphas: Sequence[float]) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """(w, b) in float64 minimising |y - x w - b|^2 + alpha |w|^2 for each alpha (None where numerically singular).

    x (n, p) float32 with no missing values, y (n, m) with all values known.
    """
    n, p = x.shape
    dual = n <= p
    mean = torch.zeros(p, dtype=torch.float64, device=x.device)
    for i0, i1 in _row_blocks(n, p):
        mean += x[i0:i1].double().sum(0)
    mean /= n
    y64 = y.double()
    y_mean = y64.mean(0)
    yc = y64 - y_mean
    gram = centred_gram(x, mean, dual)
    rhs = yc if dual else centred_xt(x, mean, yc)
    diagonal = gram.diagonal().clone()
    solutions: list[torch.Tensor | None] = []
    for alpha in alphas:
        gram.diagonal().copy_(diagonal + alpha)
        factor, info = torch.linalg.cholesky_ex(gram)
        solutions.append(None if int(info) != 0 else torch.cholesky_solve(rhs, factor))
        del factor
    del gram
    solved = [s for s in solutions if s is not None]
    if dual and solved:  # w = Xc^T z for every alpha at once: one more pass over x
        weights = centred_xt(x, mean, torch.cat(solved, dim=1)).split(y.shape[1], dim=1)
        it = iter(weights)
        solutions = [None if s is None else next(it) for s in solutions]
    return [None if w is None else (w, y_mean - mean @ w) for w in solutions]


class RidgeRegressor(ClosedFormRegressor):
    """Linear map spectrum -> labels with an L2 penalty on the pixel weights, in closed form.

    `alpha` is one value or a list of candidates; a list is tuned on the validation split
    (lowest val loss, the masked MSE on standardised labels) and the chosen value is logged as
    `model/alpha`. Before the fit the weights are zero: it predicts the training mean.
    """

    tuned = "alpha"

    @classmethod
    def logged_metrics(cls, label_names: Sequence[str], values: Mapping[str, Any]) -> list[str]:
        """Ridge also logs the training loss of its solution (`_train_loss`)."""
        return [*super().logged_metrics(label_names, values), "train/loss"]

    def __init__(
        self,
        n_pixels: int,
        label_names,
        alpha: Annotated[float | Sequence[float], PositiveNumbers(example="model.alpha=[0.01,0.1,1,10]")] = 1.0,
        **kwargs,
    ):
        super().__init__(n_pixels=n_pixels, label_names=label_names, **kwargs)
        self.alpha_candidates = [float(a) for a in candidate_list(alpha)]
        self.net = nn.Linear(n_pixels, len(label_names))
        nn.init.zeros_(self.net.weight)
        nn.init.zeros_(self.net.bias)
        self.net.requires_grad_(False)
        self.register_buffer("alpha", torch.tensor(math.nan))  # the value fitted with (NaN: not fitted)

    @property
    def chosen(self) -> float:
        return float(f"{float(self.alpha):.6g}")  # the float32 buffer, back to the value as configured

    def forward(self, flux: torch.Tensor) -> torch.Tensor:
        # Ridge weights are large and cancel across pixels: bf16 autocast would ruin them.
        with torch.autocast(device_type=flux.device.type, enabled=False):
            return self.net(1.0 - flux.float())

    def _fit_depth(self, depth, labels, val_depth, val_labels) -> dict[str, float]:
        device = depth.device
        solve_device = torch.device("cpu") if device.type == "mps" else device  # MPS has no float64
        n_labels = labels.shape[1]
        candidates = self.alpha_candidates
        weights = torch.zeros(len(candidates), depth.shape[1], n_labels, dtype=torch.float64, device=solve_device)
        biases = torch.zeros(len(candidates), n_labels, dtype=torch.float64, device=solve_device)
        usable = [True] * len(candidates)
        for columns, rows in label_groups(torch.isfinite(labels)):
            x = depth if bool(rows.all()) else depth[rows]  # no copy of the training set when no label is missing
            x, y = x.to(solve_device), labels[rows][:, columns].to(solve_device)
            if len(x) < 2:
                raise ConfigError(
                    f"labels {[self.label_names[int(c)] for c in columns]} are known for {len(x)} training spectra; "
                    "ridge needs at least 2 (drop the label from data.labels or use more stars)"
                )
            for i, solution in enumerate(ridge_solutions(x, y, candidates)):
                if solution is None:
                    usable[i] = False
                    continue
                weights[i][:, columns.to(solve_device)] = solution[0]
                biases[i][columns.to(solve_device)] = solution[1]
        failed = [a for a, ok in zip(candidates, usable) if not ok]
        if failed:
            log.warning("ridge: alpha=%s left the system numerically singular; those candidates are skipped", failed)
        if not any(usable):
            raise ConfigError(f"every model.alpha candidate {candidates} is too small for these data; use larger values")

        tuning: dict[str, float] = {}
        best = None
        for i, alpha in enumerate(candidates):
            if not usable[i]:
                tuning[repr(alpha)] = math.inf
                continue
            w, b = weights[i].T.float().to(device), biases[i].float().to(device)
            if len(candidates) == 1:
                best = (alpha, w, b)
                break
            loss = float(masked_mse(nn.functional.linear(val_depth, w, b), val_labels))
            tuning[repr(alpha)] = loss
            if best is None or loss < tuning[repr(best[0])]:
                best = (alpha, w, b)
        alpha, w, b = best
        self.net.weight.copy_(w)
        self.net.bias.copy_(b)
        self.alpha.fill_(alpha)
        return tuning or {repr(alpha): math.nan}

    def _train_loss(self, depth, labels) -> torch.Tensor:
        with torch.autocast(device_type=depth.device.type, enabled=False):
            return masked_mse(self.net(depth), labels)
