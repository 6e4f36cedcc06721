"""The DataModule every survey shares: tensors once, split by star, labels standardised on train.

A survey subclass only says how to get its arrays (`load_arrays`); everything a user must be able
to trust (the split, the label scaling, bad-pixel handling, batching) lives here, once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from stellarlab.data.split import split_by_star
from stellarlab.errors import ConfigError, DataError
from stellarlab.labels import LabelScaler

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
BATCH_KEYS = ("flux", "labels")  # what a training/eval batch holds


@dataclass
class SpectraArrays:
    """What a survey loader hands over: one row per spectrum, physical-unit labels (NaN = missing)."""

    flux: np.ndarray  # (N, P) continuum-normalised flux
    weight: np.ndarray  # (N, P) inverse variance; 0 marks a pixel with no usable data
    labels: np.ndarray  # (N, L_all) physical units
    label_names: Sequence[str]  # names of the L_all label columns
    star_id: np.ndarray  # (N,) rows of one star share an id: the split unit
    wavelength: np.ndarray  # (P,) Angstrom
    extra: dict = field(default_factory=dict)  # per-spectrum extras, e.g. "snr": (N,)


class BatchDataset(Dataset):
    """Tensors indexed a whole batch at a time (`__getitems__`): one gather per tensor, no per-item Python."""

    def __init__(self, **tensors: torch.Tensor):
        lengths = {len(t) for t in tensors.values()}
        if len(lengths) != 1:
            raise ValueError(f"tensors of different lengths: { {k: len(t) for k, t in tensors.items()} }")
        self.tensors = tensors
        self.length = lengths.pop()

    def __len__(self) -> int:
        return self.length

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long, device=next(iter(self.tensors.values())).device)
        return {k: t[index] for k, t in self.tensors.items()}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: t[i] for k, t in self.tensors.items()}


def keep_batch(batch):
    """collate_fn for BatchDataset: the batch is already stacked (module-level so workers can pickle it)."""
    return batch


class SpectraDataModule(pl.LightningDataModule):
    """Base DataModule. Subclasses implement `load_arrays()` (and `prepare_data()` for downloads/caches)."""

    def __init__(
        self,
        labels: Sequence[str] = ("teff", "logg", "fe_h"),
        split: Sequence[float | int] = (0.8, 0.1, 0.1),
        split_seed: int = 42,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool | str = "auto",
        device_resident: bool | str = "auto",
        device_resident_max_gb: float = 4.0,
    ):
        super().__init__()
        if not labels:
            raise ConfigError("data.labels is empty: name at least one label, e.g. data.labels=[teff,logg,fe_h]")
        if batch_size is None or int(batch_size) < 1:
            raise ConfigError(f"data.batch_size must be a positive integer, got {batch_size}")
        if num_workers is None or int(num_workers) < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {num_workers}")
        self.label_names = [str(n) for n in labels]
        self.split = list(split)
        self.split_seed = int(split_seed)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = pin_memory
        if device_resident not in ("auto", True, False):
            raise ConfigError(f"data.device_resident must be auto, true or false, got {device_resident!r}")
        self.device_resident = device_resident
        self.device_resident_max_gb = float(device_resident_max_gb)
        self.scaler: LabelScaler | None = None
        self.wavelength: np.ndarray | None = None
        self.split_index: dict[str, np.ndarray] = {}
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}
        self._device_tensors: dict[str, dict[str, torch.Tensor]] = {}

    # -- what a survey provides -------------------------------------------------------------
    def load_arrays(self) -> SpectraArrays:
        raise NotImplementedError

    # -- set-up -------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.tensors:
            return
        arrays = self.load_arrays()
        flux, weight, labels, star_id, keep = self._validated(arrays)
        self.wavelength = np.asarray(arrays.wavelength, dtype=np.float64)

        self.split_index = dict(zip(SPLITS, split_by_star(star_id, self.split, self.split_seed)))
        train = self.split_index["train"]
        self.scaler = LabelScaler.fit(labels[train], self.label_names)
        if self.batch_size > len(train):
            raise ConfigError(
                f"data.batch_size={self.batch_size} is larger than the training set ({len(train)} spectra); "
                "lower data.batch_size or use more stars"
            )
        for name, idx in self.split_index.items():
            phys = torch.from_numpy(np.ascontiguousarray(labels[idx], dtype=np.float32))
            self.tensors[name] = {
                "flux": torch.from_numpy(np.ascontiguousarray(flux[idx], dtype=np.float32)),
                "weight": torch.from_numpy(np.ascontiguousarray(weight[idx], dtype=np.float32)),
                "labels": self.scaler.transform(phys).float(),
                "labels_phys": phys,
            }
        for name, extra in arrays.extra.items():
            kept = np.asarray(extra)[keep]  # split indices count the rows _validated kept
            for split, idx in self.split_index.items():
                self.tensors[split][name] = torch.as_tensor(kept[idx])
        log.info(
            "split by star (seed %d): %s spectra; labels %s standardised with train mean %s, std %s",
            self.split_seed,
            "/".join(str(len(i)) for i in self.split_index.values()),
            self.label_names,
            np.round(self.scaler.mean, 4).tolist(),
            np.round(self.scaler.std, 4).tolist(),
        )

    def _validated(self, a: SpectraArrays):
        """Pick the requested labels, check shapes, and make bad pixels harmless (flux 1, weight 0)."""
        names = list(a.label_names)
        missing = [n for n in self.label_names if n not in names]
        if missing:
            raise DataError(f"label(s) {missing} not in the data; available labels: {names}")
        labels = np.asarray(a.labels, dtype=np.float32)[:, [names.index(n) for n in self.label_names]]
        flux = np.asarray(a.flux)
        weight = np.asarray(a.weight)
        n, p = flux.shape
        if weight.shape != (n, p) or labels.shape[0] != n or len(a.star_id) != n or len(a.wavelength) != p:
            raise DataError(
                f"inconsistent array shapes: flux {flux.shape}, weight {weight.shape}, labels {labels.shape}, "
                f"star_id {np.shape(a.star_id)}, wavelength {np.shape(a.wavelength)}"
            )
        if np.isinf(labels).any():
            raise DataError("labels contain +-inf; mark missing labels with NaN instead")
        # Check in blocks of rows: a memory-mapped cache is scanned without N x P temporaries, and arrays
        # that are already clean (all finite, flux 1 wherever weight is 0) are not copied.
        needs_fix, no_pixel = False, np.zeros(n, dtype=bool)
        step = max(1, (1 << 22) // max(p, 1))
        for i in range(0, n, step):
            f, w = flux[i : i + step], weight[i : i + step]
            finite = np.isfinite(f) & np.isfinite(w)
            needs_fix = needs_fix or not (finite.all() and (w >= 0).all() and (f[w == 0] == 1).all())
            no_pixel[i : i + step] = ~(finite & (w > 0)).any(axis=1)
        if needs_fix:
            bad = ~np.isfinite(flux) | ~np.isfinite(weight) | (weight <= 0)
            flux = np.where(bad, np.float32(1.0), flux)
            weight = np.where(bad, np.float32(0.0), weight)
        keep = np.isfinite(labels).any(axis=1) & ~no_pixel
        if not keep.all():
            log.warning("dropping %d of %d spectra with no usable label or no valid pixel", (~keep).sum(), n)
            flux, weight, labels = flux[keep], weight[keep], labels[keep]
        return flux, weight, labels, np.asarray(a.star_id)[keep], keep

    # -- what the model needs to know about the data ----------------------------------------------
    @property
    def n_pixels(self) -> int:
        return int(self.tensors["train"]["flux"].shape[1])

    def model_spec(self) -> dict:
        """Facts the model is built from and carries in its checkpoint (never typed twice in config)."""
        return {
            "n_pixels": self.n_pixels,
            "label_names": list(self.label_names),
            "label_mean": [float(x) for x in self.scaler.mean],
            "label_std": [float(x) for x in self.scaler.std],
        }

    def preprocessing_config(self) -> dict:
        """What must be done to a new spectrum before a model trained on this data sees it.

        Saved in every checkpoint (via `state_dict`) so `predict.py` repeats it; surveys extend it.
        """
        return {"datamodule": type(self).__name__}

    def state_dict(self) -> dict:
        return {"preprocessing": self.preprocessing_config(), "label_names": list(self.label_names)}

    # -- loaders --------------------------------------------------------------------------------
    def transfer_batch_to_device(self, batch: dict, device: torch.device, dataloader_idx: int) -> dict:
        # Batches are flat dicts of tensors: move them directly (Lightning's generic walk costs ~1 ms a step).
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    def _target_device(self) -> torch.device:
        trainer = getattr(self, "trainer", None)
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _keep_on_device(self, device: torch.device) -> bool:
        """Whole splits live on the accelerator when they fit under `device_resident_max_gb`: no copy per batch."""
        if device.type == "cpu" or self.device_resident is False:
            return False
        size_gb = sum(t[k].numel() * t[k].element_size() for t in self.tensors.values() for k in BATCH_KEYS) / 1e9
        fits = size_gb <= self.device_resident_max_gb
        if self.device_resident is True and not fits:
            log.warning(
                "data.device_resident=true: %.2f GB exceeds data.device_resident_max_gb=%.2f; copying anyway",
                size_gb,
                self.device_resident_max_gb,
            )
        return self.device_resident is True or fits

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        device = self._target_device()
        on_device = self._keep_on_device(device)
        batch_tensors = {k: self.tensors[split][k] for k in BATCH_KEYS}
        if on_device:
            if split not in self._device_tensors:
                self._device_tensors[split] = {k: v.to(device) for k, v in batch_tensors.items()}
                log.info("%s split kept on %s: batches are gathered there, no host-to-device copy per step", split, device)
            batch_tensors = self._device_tensors[split]
        dataset = BatchDataset(**batch_tensors)
        pin = torch.cuda.is_available() if self.pin_memory == "auto" else bool(self.pin_memory)
        return DataLoader(
            dataset,
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            shuffle=shuffle,
            collate_fn=keep_batch,
            num_workers=0 if on_device else self.num_workers,
            persistent_workers=self.num_workers > 0 and not on_device,
            pin_memory=pin and not on_device,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
