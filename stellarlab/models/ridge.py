"""`model=ridge`: least squares with an L2 penalty, solved in closed form; and the one-epoch fit it shares with knn.

Baselines go through the same `train.py`, Trainer, metrics, checkpoints and TensorBoard as the
networks, so their numbers are directly comparable. `ClosedFormRegressor` turns Lightning's loop
into "read the training split once, solve, stop": the first epoch collects the training spectra,
the last training batch triggers the solve (validation runs right after it, inside the same epoch),
the candidates (`alpha: [...]`, `k: [...]`) are compared on the validation split, and
`trainer.should_stop` ends the fit whatever `trainer.max_epochs` says.

Ridge solver: features are centred (the intercept is not penalised) and the normal equations are
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
from collections.abc import Sequence

import torch
from omegaconf import OmegaConf
from torch import nn

from stellarlab.errors import ConfigError, DataError
from stellarlab.models.base import SpectrumRegressor, masked_mse

log = logging.getLogger(__name__)

#: Largest temporary a block of the float64 Gram products may take (elements): 64 MB.
BLOCK_ELEMENTS = 1 << 23


def candidate_list(value, name: str) -> list:
    """One value or a list of them (tuned on validation), as a plain non-empty list."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise ConfigError(f"model.{name} is an empty list; give one value or a list of candidates, e.g. model.{name}=[1,10]")
    return values


class ClosedFormRegressor(SpectrumRegressor):
    """Base for models fitted in one pass over the training split, with no optimizer.

    Subclasses implement `_fit_depth(depth, labels, val_depth, val_labels) -> {candidate: val loss}`
    and set `self.chosen` (the candidate kept), on standardised labels and absorption depth 1 - flux.
    """

    #: Name of the hyperparameter tuned on validation (`alpha`, `k`): logged as `model/<name>`.
    tuned: str = ""

    def __init__(self, n_pixels: int, label_names, **kwargs):
        if str(kwargs.get("loss", "mse")) != "mse":
            raise ConfigError(
                f"{type(self).__name__} fits the labels' means only (least squares / neighbour average): "
                f"model.loss={kwargs['loss']} is not available for it; use a network (model=mlp, cnn, linear)"
            )
        super().__init__(n_pixels=n_pixels, label_names=label_names, **kwargs)
        self.automatic_optimization = False
        self._train_rows: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.tuning: dict[str, float] = {}
        if kwargs.get("optimizer") is not None or kwargs.get("scheduler") is not None:
            logging.getLogger(type(self).__module__).info(
                "%s is fitted in closed form in one pass over the training split: the optimizer and scheduler "
                "configs are ignored",
                type(self).__name__,
            )

    # -- the public fit (tests, notebooks): the same solve the Trainer runs ---------------------
    @torch.no_grad()
    def fit(self, flux, labels, val_flux=None, val_labels=None) -> dict[str, float]:
        """Fit on spectra `flux` (N, P) and standardised `labels` (N, L), NaN = missing; choose on the validation pair."""
        device = self.label_mean.device
        as_t = lambda a: None if a is None else torch.as_tensor(a, dtype=torch.float32, device=device)  # noqa: E731
        flux, labels, val_flux, val_labels = map(as_t, (flux, labels, val_flux, val_labels))
        val_depth = None if val_flux is None else 1.0 - val_flux
        return self._fit_checked(1.0 - flux, labels, val_depth, val_labels)

    def _fit_checked(self, depth, labels, val_depth, val_labels) -> dict[str, float]:
        if labels.ndim != 2 or labels.shape[1] != len(self.label_names) or len(labels) != len(depth):
            raise DataError(
                f"labels of shape {tuple(labels.shape)} do not match {len(depth)} spectra x {len(self.label_names)} labels"
            )
        n_candidates = len(getattr(self, f"{self.tuned}_candidates"))
        if n_candidates > 1 and (val_depth is None or len(val_depth) == 0):
            raise ConfigError(
                f"model.{self.tuned} lists {n_candidates} candidates but there is no validation split to choose "
                f"among them; give one value (model.{self.tuned}=...) or a validation split (data.split)"
            )
        with torch.autocast(device_type=depth.device.type, enabled=False):
            self.tuning = self._fit_depth(depth.float(), labels.float(), val_depth, val_labels)
        return self.tuning

    def _fit_depth(self, depth, labels, val_depth, val_labels) -> dict[str, float]:
        raise NotImplementedError

    def _report_choice(self) -> None:
        chosen, log_ = self.chosen, logging.getLogger(type(self).__module__)
        if len(self.tuning) > 1:
            table = ", ".join(f"{c}: {loss:.5g}" for c, loss in self.tuning.items())
            log_.info("%s: %s=%s chosen on the validation split (val loss by %s: %s)", type(self).__name__, self.tuned, chosen, self.tuned, table)
        else:
            log_.info("%s: %s=%s (one candidate, nothing to tune)", type(self).__name__, self.tuned, chosen)

    @property
    def chosen(self):
        raise NotImplementedError

    # -- Lightning: one epoch, no optimizer -------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.trainer is not None and self.trainer.world_size > 1:
            raise ConfigError(
                f"{type(self).__name__} is fitted in closed form on one device; set trainer.devices=1 "
                f"(this run has {self.trainer.world_size} processes)"
            )

    def configure_optimizers(self):
        # No optimizer. Lightning 2.x accepts an empty list silently; returning None works too but
        # warns on every fit ("configure_optimizers returned None, this fit will run with no optimizer").
        return []

    def on_train_epoch_start(self) -> None:
        self._train_rows = []

    def training_step(self, batch, batch_idx):
        self._train_rows.append(((1.0 - batch["flux"]).detach().float(), batch["labels"].detach().float()))
        return None

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # Validation runs right after the last batch, before on_train_epoch_end: solve here.
        if self.trainer.is_last_batch:
            self._fit_from_epoch()

    def on_train_epoch_end(self) -> None:
        if self._train_rows:  # the loop never flagged a last batch (an iterable of unknown length)
            logging.getLogger(type(self).__module__).warning("%s: fitted at the end of the epoch, after this epoch's validation", type(self).__name__)
            self._fit_from_epoch()

    def _val_split(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        dm = self.trainer.datamodule
        loader = dm.val_dataloader() if dm is not None else self.trainer.val_dataloaders
        if loader is None:
            return None, None
        depth, labels = [], []
        for batch in loader:
            depth.append(1.0 - batch["flux"].to(self.device, torch.float32))
            labels.append(batch["labels"].to(self.device, torch.float32))
        if not depth:
            return None, None
        return torch.cat(depth), torch.cat(labels)

    @torch.no_grad()
    def _fit_from_epoch(self) -> None:
        depth = torch.cat([d for d, _ in self._train_rows])
        labels = torch.cat([y for _, y in self._train_rows])
        self._train_rows = []
        self._fit_checked(depth, labels, *self._val_split())
        self._report_choice()
        self.log(f"model/{self.tuned}", float(self.chosen), on_step=False, on_epoch=True)
        train_loss = self._train_loss(depth, labels)
        if train_loss is not None:
            self.log("train/loss", train_loss, on_step=False, on_epoch=True, batch_size=len(depth))
        # Lightning counts global_step in optimizer steps and ModelCheckpoint saves nothing at step 0;
        # there is no optimizer here, so the solve counts as the one step.
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        progress.increment_ready()
        progress.increment_completed()
        self.trainer.should_stop = True  # one epoch is the whole fit, whatever trainer.max_epochs says

    def _train_loss(self, depth, labels) -> torch.Tensor | None:
        return None

    # -- checkpoint extras ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["tuning"] = dict(self.tuning)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.tuning = dict(checkpoint.get("tuning", {}))


def label_groups(known: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Labels that are known on exactly the same rows share one system: [(label indices, row mask)].

    `known` is the (N, L) finite mask. Without missing labels this is one group of all labels.
    """
    patterns, inverse = torch.unique(known.T.cpu(), dim=0, return_inverse=True)  # on CPU: MPS lacks unique(dim=)
    return [
        (torch.nonzero(inverse == g).flatten().to(known.device), patterns[g].to(known.device))
        for g in range(len(patterns))
    ]


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

    def __init__(self, n_pixels: int, label_names, alpha: float | Sequence[float] = 1.0, **kwargs):
        super().__init__(n_pixels=n_pixels, label_names=label_names, **kwargs)
        values = candidate_list(alpha, "alpha")
        try:
            self.alpha_candidates = [float(a) for a in values]
        except (TypeError, ValueError):
            raise ConfigError(f"model.alpha must be numbers, got {values}; e.g. model.alpha=[0.01,0.1,1,10]") from None
        bad = [a for a in self.alpha_candidates if not (a > 0 and math.isfinite(a))]
        if bad:
            raise ConfigError(f"model.alpha must be positive and finite, got {bad}; e.g. model.alpha=[0.01,0.1,1,10]")
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
