"""`model=knn`: k nearest training spectra (Euclidean on the absorption depth), averaged labels.

The training spectra and labels are buffers, so a checkpoint predicts on its own (it holds the
training split: ~220 MB for the default 6400 x 8575 survey). Distances are computed a block of
queries at a time with `torch.cdist` (BLAS, on the module's device, memory bounded by
`BLOCK_ELEMENTS`), the k nearest are taken with `topk`, and their distances are then recomputed
exactly from the differences: the BLAS form |a|^2 + |b|^2 - 2ab loses digits to cancellation, which
matters for `weights: distance` (1/d) and for recognising a query identical to a training spectrum.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Annotated

import torch

from stellarlab.checks import Choice, IntList
from stellarlab.errors import ConfigError
from stellarlab.models.closed_form import ClosedFormRegressor, candidate_list, label_groups
from stellarlab.models.losses import masked_mse

log = logging.getLogger(__name__)

#: Largest float32 temporary per block of queries (elements): 64 MB.
BLOCK_ELEMENTS = 1 << 24
WEIGHTS = ("uniform", "distance")


def neighbour_weights(dist: torch.Tensor, scheme: str) -> torch.Tensor:
    """Weights of the neighbours (B, k) as scikit-learn defines them: 1/d, or only the exact matches if d = 0."""
    if scheme == "uniform":
        return torch.ones_like(dist)
    inverse = 1.0 / dist
    exact = torch.isinf(inverse)
    return torch.where(exact.any(dim=1, keepdim=True), exact.to(dist.dtype), inverse)


class KNNRegressor(ClosedFormRegressor):
    """k-nearest-neighbour regression on the whole spectrum.

    `k` is one value or a list of candidates, tuned on the validation split (all candidates come
    from one neighbour search with the largest k). `weights`: `uniform` (mean of the k labels) or
    `distance` (weighted by 1/distance). A label missing for some training stars is averaged over
    the k nearest stars that have it. Before the fit it predicts the training mean.
    """

    tuned = "k"

    def __init__(
        self,
        n_pixels: int,
        label_names,
        k: Annotated[int | Sequence[int], IntList(scalar_ok=True, allow_empty=False, example="model.k=[5,10,20]")] = 10,
        weights: Annotated[str, Choice(*WEIGHTS)] = "uniform",
        **kwargs,
    ):
        super().__init__(n_pixels=n_pixels, label_names=label_names, **kwargs)
        self.k_candidates = [int(v) for v in candidate_list(k)]
        self.weights = str(weights)
        n_labels = len(label_names)
        self.register_buffer("train_depth", torch.zeros(0, n_pixels))
        self.register_buffer("train_labels", torch.zeros(0, n_labels))
        self.register_buffer("k", torch.tensor(0))  # the k fitted with (0: not fitted)

    @property
    def chosen(self) -> int:
        return int(self.k)

    # -- prediction ---------------------------------------------------------------------------
    def forward(self, flux: torch.Tensor) -> torch.Tensor:
        if int(self.k) == 0:
            return torch.zeros(len(flux), len(self.label_names), device=flux.device)
        k = int(self.k)
        return self.predict_depth(1.0 - flux.float(), [k])[k]

    @torch.no_grad()
    def predict_depth(self, depth: torch.Tensor, ks: Sequence[int]) -> dict[int, torch.Tensor]:
        """Standardised predictions for absorption depths `depth` (B, P), one (B, L) tensor per k in `ks`."""
        with torch.autocast(device_type=depth.device.type, enabled=False):
            return self._predict(depth.float(), sorted(set(ks)))

    def _predict(self, depth: torch.Tensor, ks: list[int]) -> dict[int, torch.Tensor]:
        train, labels = self.train_depth, self.train_labels
        n_train, n_pixels = train.shape
        k_max = ks[-1]
        out = {k: torch.full((len(depth), labels.shape[1]), math.nan, device=depth.device) for k in ks}
        groups = label_groups(torch.isfinite(labels))
        query_block = max(1, BLOCK_ELEMENTS // max(n_train, 1))
        gather_block = max(1, BLOCK_ELEMENTS // (k_max * n_pixels))
        for q0 in range(0, len(depth), query_block):
            queries = depth[q0 : q0 + query_block]
            dist_all = torch.cdist(queries, train)  # (b, N), BLAS: used for ranking only
            for columns, rows in groups:
                ranked = dist_all if bool(rows.all()) else dist_all.masked_fill(~rows, math.inf)
                index = ranked.topk(k_max, dim=1, largest=False, sorted=True).indices
                # exact distances of the k_max candidates, then re-sorted on them
                dist = torch.cat([
                    (train[index[i : i + gather_block]] - queries[i : i + gather_block, None, :]).norm(dim=2)
                    for i in range(0, len(queries), gather_block)
                ])
                dist, order = dist.sort(dim=1, stable=True)
                index = index.gather(1, order)
                y = labels[index][:, :, columns]  # (b, k_max, L_group)
                for k in ks:
                    w = neighbour_weights(dist[:, :k], self.weights)
                    pred = (w[:, :, None] * y[:, :k]).sum(1) / w.sum(1, keepdim=True)
                    out[k][q0 : q0 + len(queries), columns] = pred
        return out

    # -- the fit: keep the training split, choose k on validation -------------------------------
    def _fit_depth(self, depth, labels, val_depth, val_labels) -> dict[str, float]:
        known = torch.isfinite(labels).sum(0)
        k_max = max(self.k_candidates)
        if k_max > int(known.min()):
            short = ", ".join(f"{self.label_names[i]}: {int(n)}" for i, n in enumerate(known) if n < k_max)
            raise ConfigError(
                f"model.k={k_max} is larger than the training set (spectra with a known label: {short}); "
                "lower model.k or use more stars"
            )
        self._resize_buffers(depth.shape[0])
        self.train_depth.copy_(depth)
        self.train_labels.copy_(labels)
        if len(self.k_candidates) == 1:
            self.k.fill_(self.k_candidates[0])
            return {str(self.k_candidates[0]): math.nan}
        preds = self.predict_depth(val_depth, self.k_candidates)
        tuning = {str(k): float(masked_mse(preds[k], val_labels)) for k in self.k_candidates}
        best = min(self.k_candidates, key=lambda k: tuning[str(k)])  # first of equals, in the given order
        self.k.fill_(best)
        return tuning

    def _resize_buffers(self, n_rows: int) -> None:
        # The training set's size is only known at fit or load time: the buffers follow it.
        for name in ("train_depth", "train_labels"):
            old = getattr(self, name)
            setattr(self, name, torch.empty(n_rows, old.shape[1], dtype=old.dtype, device=old.device))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "train_depth"
        if key in state_dict:
            self._resize_buffers(state_dict[key].shape[0])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
