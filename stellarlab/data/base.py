"""The DataModule every survey shares: split by star, labels standardised on train, batches gathered whole.

A survey subclass only says how to get its arrays (`load_arrays`); everything a user must be able
to trust (the split, the label scaling, bad-pixel handling, batching) lives here, once.

Two ways to hold the spectra (`in_memory`):

- in memory: every split is copied once into native float32 tensors; a batch is one index op.
- streaming: the flux stays in its memory-mapped `.npy` file and each batch reads only its rows
  (`stellarlab.data.rows`), so training on a cache larger than RAM needs the memory of a few batches.
  `in_memory=auto` streams memory-mapped data whose flux + weight exceed `in_memory_max_gb`.

Either way `datamodule.tensors[split]` (also `split_arrays(split)`) holds `flux`, `weight`, `labels`
(standardised), `labels_phys`, `nuisance` (the `nuisance_labels`, standardised on train; no columns without
them) and the extras; in streaming mode `flux` and `weight` are `SplitRows`,
row-indexable views that read on demand. `split_ids(split)` holds what names each row (the star id and
the survey's own ids, e.g. APOGEE_ID, FIELD), for catalogues and test_predictions.csv.

Every checkpoint carries a record of the split (`split_record`): which stars went where, as digests and,
for surveys whose star ids are survey-wide names, hashes of them. predict.py compares it with the data
it is given, so a catalogue can say which rows are training stars.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from stellarlab.checks import NameList, Number, Switch, check_call
from stellarlab.data.rows import (  # noqa: F401  (SCAN_BLOCK_BYTES, EVAL_INDEX_KEY: names tests and callers use)
    EVAL_INDEX_KEY,
    SCAN_BLOCK_BYTES,
    BatchDataset,
    PixelSource,
    RowReader,
    SplitRows,
    keep_batch,
)
from stellarlab.data.split import PlannedSize, SplitSizes, split_by_star
from stellarlab.errors import ConfigError, DataError
from stellarlab.labels import LabelScaler

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
BATCH_KEYS = ("flux", "labels")  # what a training/eval batch holds
PIXEL_KEYS = ("flux", "weight")  # the (N, P) arrays; everything else per spectrum is small and kept in RAM
EVAL_BATCH_SIZE = Number(minimum=1, integer=True, allow_null=True, example="data.eval_batch_size=512")  # null: batch_size


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
    ids: dict = field(default_factory=dict)  # per-spectrum identifiers under the survey's names (any dtype), e.g. "FIELD"


def id_hashes(star_id: np.ndarray) -> np.ndarray:
    """A 63-bit hash of each star id (as text), row by row: compact and comparable across processes."""
    unique, inverse = np.unique(np.asarray(star_id).astype(str), return_inverse=True)
    hashes = [int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") >> 1 for s in unique.tolist()]
    return np.asarray(hashes, dtype=np.int64)[inverse.reshape(-1)]


def star_hashes(star_id: np.ndarray) -> np.ndarray:
    """Sorted unique hashes of a set of stars' ids (`id_hashes`): a training split's record of its stars."""
    return np.unique(id_hashes(star_id))


def _same_stars(a: Mapping[str, str], b: Mapping[str, str]) -> bool:
    """Two `split_digests`: the same star ids with the same values of every label both have (at least one)."""
    common = (set(a) & set(b)) - {"star_id"}
    return a.get("star_id") == b.get("star_id") and bool(common) and all(a[k] == b[k] for k in common)


def split_digests(star_id: np.ndarray, labels: np.ndarray, label_names: Sequence[str]) -> dict[str, str]:
    """SHA-256 of a split's star ids (`star_id`) and of the ids with each label's values (`<label>`), row order
    ignored: equal digests are the same stars, with the same labels, on this side of the split."""
    ids = np.asarray(star_id).astype(str)
    order = np.argsort(ids, kind="stable")
    key = "\0".join(ids[order].tolist()).encode()
    out = {"star_id": hashlib.sha256(key).hexdigest()}
    for j, name in enumerate(label_names):
        column = np.ascontiguousarray(np.asarray(labels, dtype=np.float32)[order, j])
        out[str(name)] = hashlib.sha256(key + b"\0" + column.tobytes()).hexdigest()
    return out


class SpectraDataModule(pl.LightningDataModule):
    """Base DataModule. Subclasses implement `load_arrays()` (and `prepare_data()` for downloads/caches).

    Arguments state their rules in their annotations, a subclass's too (`stellarlab.checks`): `__new__`
    applies them to each call, `validate_train_config` to the config."""

    #: What the star ids are when they name a star across the whole survey (APOGEE's "APOGEE_ID"), so that
    #: another selection of it can be checked against a training split star by star; None: ids of this data only.
    star_id_name: ClassVar[str | None] = None
    #: Whether `load_arrays` hands over every label the data has (the synthetic surveys), so `nuisance_labels` can
    #: be read beside `labels`; the survey readers read the columns of `labels` alone.
    reads_every_label: ClassVar[bool] = False

    def __new__(cls, *args, **kwargs):
        check_call(cls, args, kwargs, "data")
        return super().__new__(cls)

    def __init__(
        self,
        labels: Annotated[Sequence[str], NameList(example="data.labels=[teff,logg,fe_h]")] = ("teff", "logg", "fe_h"),
        split: Annotated[Sequence[float | int], SplitSizes()] = (0.8, 0.1, 0.1),
        split_seed: Annotated[int, Number(minimum=0, integer=True, example="data.split_seed=42")] = 42,
        batch_size: Annotated[int, Number(minimum=1, integer=True, example="data.batch_size=128")] = 128,
        eval_batch_size: Annotated[int | None, EVAL_BATCH_SIZE] = None,
        num_workers: Annotated[int, Number(minimum=0, integer=True, example="data.num_workers=0")] = 0,
        pin_memory: Annotated[bool | str, Switch()] = "auto",
        device_resident: Annotated[bool | str, Switch()] = "auto",
        device_resident_max_gb: Annotated[float, Number(minimum=0, example="data.device_resident_max_gb=4")] = 4.0,
        in_memory: Annotated[bool | str, Switch()] = "auto",
        in_memory_max_gb: Annotated[float, Number(minimum=0, example="data.in_memory_max_gb=1")] = 1.0,
        nuisance_labels: Annotated[Sequence[str], NameList(example="data.nuisance_labels=[alpha_fe]",
                                                           allow_empty=True)] = (),
    ):
        super().__init__()
        self.label_names = [str(n) for n in labels]
        # labels the spectra depend on that the run does not predict; one that is also in data.labels is a target
        self.nuisance_names = [str(n) for n in nuisance_labels if str(n).lower() not in {m.lower() for m in labels}]
        self.split = list(split)
        self.split_seed = int(split_seed)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = pin_memory
        self.device_resident = device_resident
        self.device_resident_max_gb = float(device_resident_max_gb)
        self.in_memory = in_memory
        self.in_memory_max_gb = float(in_memory_max_gb)
        self.streaming = False  # decided in setup: True when flux/weight are read from their file per batch
        self.scaler: LabelScaler | None = None
        self.nuisance_scaler: LabelScaler | None = None
        self.wavelength: np.ndarray | None = None
        self.split_index: dict[str, np.ndarray] = {}
        self._split_ids: dict[str, dict[str, np.ndarray]] = {}
        self._split_record: dict | None = None
        self.tensors: dict[str, dict[str, torch.Tensor | SplitRows]] = {}
        self._device_tensors: dict[str, dict[str, torch.Tensor]] = {}

    @classmethod
    def check_together(cls, values: Mapping[str, Any]) -> None:
        nuisance = list(values.get("nuisance_labels") or ())
        if nuisance and not cls.reads_every_label:
            raise ConfigError(
                f"data.nuisance_labels={nuisance}: {cls.__name__} reads the columns of data.labels alone; nuisance "
                "labels work with the synthetic surveys (data=synthetic_apogee, data=synthetic_galah): set "
                "data.nuisance_labels=[]"
            )

    @classmethod
    def planned_size(cls, values: Mapping[str, Any]) -> PlannedSize | None:
        """The survey's size from its arguments (None: known once read): the config check tests split and batch on it."""
        return None

    @classmethod
    def planned_label_names(cls, values: Mapping[str, Any]) -> list[str]:
        """The label names a run logs metrics under, from the arguments with their defaults (`checks.with_defaults`)."""
        return [str(n) for n in values["labels"]]

    # -- what a survey provides -------------------------------------------------------------
    def load_arrays(self) -> SpectraArrays:
        raise NotImplementedError

    # -- set-up -------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.tensors:
            return
        arrays = self.load_arrays()
        source, labels, star_id, keep = self._validated(arrays)
        nuisance = self._nuisance(arrays)[keep]
        self.wavelength = np.asarray(arrays.wavelength, dtype=np.float64)

        self.split_index = dict(zip(SPLITS, split_by_star(star_id, self.split, self.split_seed)))
        train = self.split_index["train"]
        self.scaler = LabelScaler.fit(labels[train], self.label_names)
        self.nuisance_scaler = LabelScaler.fit(nuisance[train], self.nuisance_names) if self.nuisance_names else None
        if self.batch_size > len(train):
            raise ConfigError(f"data.batch_size={self.batch_size} is larger than the training set ({len(train)} spectra); "
                              "lower data.batch_size or use more stars")
        kept_rows = np.flatnonzero(keep)  # split indices count the kept rows; the source is indexed by file row
        self.streaming = self._decide_streaming(source, len(kept_rows))
        for name, idx in self.split_index.items():
            phys = torch.from_numpy(np.ascontiguousarray(labels[idx], dtype=np.float32))
            rows = kept_rows[idx]
            pixels = {key: SplitRows(source, key, rows) if self.streaming else source.copy(key, rows) for key in PIXEL_KEYS}
            self.tensors[name] = {**pixels, "labels": self.scaler.transform(phys).float(), "labels_phys": phys}
            self.tensors[name]["nuisance"] = self._standard_nuisance(nuisance[idx])
        for name, extra in arrays.extra.items():
            kept = np.asarray(extra)[keep]  # split indices count the rows _validated kept
            for split, idx in self.split_index.items():
                self.tensors[split][name] = torch.as_tensor(kept[idx])
        ids = {"star_id": star_id, **{k: np.asarray(v)[keep] for k, v in arrays.ids.items()}} if arrays.ids else \
            {"star_id": star_id, "row": kept_rows}
        self._split_ids = {split: {k: v[idx] for k, v in ids.items()} for split, idx in self.split_index.items()}
        self._split_record = None
        log.info("split by star (seed %d): %s spectra; labels %s standardised with train mean %s, std %s", self.split_seed,
                 "/".join(str(len(i)) for i in self.split_index.values()), self.label_names,
                 np.round(self.scaler.mean, 4).tolist(), np.round(self.scaler.std, 4).tolist())

    def _nuisance(self, a: SpectraArrays) -> np.ndarray:
        """The nuisance labels' columns (N, K), physical units (K may be 0)."""
        names = list(a.label_names)
        missing = [n for n in self.nuisance_names if n not in names]
        if missing:
            raise DataError(f"nuisance label(s) {missing} (data.nuisance_labels) not in the data; available labels: "
                            f"{names}; set data.nuisance_labels=[] or name columns the data has")
        nuisance = np.asarray(a.labels, dtype=np.float32)[:, [names.index(n) for n in self.nuisance_names]]
        if np.isinf(nuisance).any():
            raise DataError("nuisance labels contain +-inf; mark missing labels with NaN instead")
        return nuisance

    def _standard_nuisance(self, phys: np.ndarray) -> torch.Tensor:
        """Standardised nuisance labels (N, K) of some rows: with the training split's mean and std, like the labels."""
        phys_t = torch.from_numpy(np.ascontiguousarray(phys, dtype=np.float32))
        return phys_t if self.nuisance_scaler is None else self.nuisance_scaler.transform(phys_t).float()

    def _decide_streaming(self, source: PixelSource, n_rows: int) -> bool:
        """in_memory=auto streams memory-mapped arrays whose float32 flux + weight exceed in_memory_max_gb."""
        size_gb = 2 * n_rows * source.n_pixels * 4 / 1e9
        if self.in_memory == "auto":
            streaming = source.mapped and size_gb > self.in_memory_max_gb
        else:
            streaming = not self.in_memory
        if streaming:
            log.info("streaming %.2f GB of spectra from %s: each batch reads its rows (data.in_memory=%s, in_memory_max_gb=%g)",
                     size_gb, source.readers["flux"].path or "arrays in memory", self.in_memory, self.in_memory_max_gb)
        return streaming

    def _validated(self, a: SpectraArrays):
        """Pick the requested labels, check shapes, scan for bad pixels and rows without data.

        Returns (pixel source over all rows, labels of kept rows, star ids of kept rows, keep mask). The
        scan reads a block of rows at a time through `RowReader`, so a memory-mapped cache is checked
        without N x P temporaries and without leaving its pages resident; nothing is copied here.
        """
        names = list(a.label_names)
        missing = [n for n in self.label_names if n not in names]
        if missing:
            raise DataError(f"label(s) {missing} not in the data; available labels: {names}")
        labels = np.asarray(a.labels, dtype=np.float32)[:, [names.index(n) for n in self.label_names]]
        n, p = np.shape(a.flux) if np.ndim(a.flux) == 2 else (None, None)
        if n is None or np.shape(a.weight) != (n, p) or labels.shape[0] != n or len(a.star_id) != n or len(a.wavelength) != p:
            raise DataError(
                f"inconsistent array shapes: flux {np.shape(a.flux)}, weight {np.shape(a.weight)}, labels {labels.shape}, "
                f"star_id {np.shape(a.star_id)}, wavelength {np.shape(a.wavelength)}"
            )
        if np.isinf(labels).any():
            raise DataError("labels contain +-inf; mark missing labels with NaN instead")
        flux, weight = RowReader(a.flux), RowReader(a.weight)
        needs_fix, no_pixel = False, np.zeros(n, dtype=bool)
        step = max(1, SCAN_BLOCK_BYTES // (4 * max(p, 1)))
        for i in range(0, n, step):
            rows = np.arange(i, min(i + step, n))
            f, w = flux.read(rows), weight.read(rows)
            finite = np.isfinite(f) & np.isfinite(w)
            needs_fix = needs_fix or not (finite.all() and (w >= 0).all() and (f[w == 0] == 1).all())
            no_pixel[i : i + step] = ~(finite & (w > 0)).any(axis=1)
        keep = np.isfinite(labels).any(axis=1) & ~no_pixel
        if not keep.all():
            log.warning("dropping %d of %d spectra with no usable label or no valid pixel", (~keep).sum(), n)
        return PixelSource(flux, weight, needs_fix), labels[keep], np.asarray(a.star_id)[keep], keep

    def split_ids(self, split: str) -> dict[str, np.ndarray]:
        """What names each row of a split, in split order: `star_id`, then the survey's own ids (APOGEE_ID,
        TELESCOPE, FIELD, FILE; sobject_id; ...) or, for data without any, `row` (the spectrum's row in the data)."""
        self.split_arrays(split)  # the error for a split that is not set up
        return self._split_ids[split]

    def split_record(self) -> dict:
        """Which stars are on which side of the split, saved in every checkpoint (plain types and tensors only).

        `digests`: per split, SHA-256 of its star ids and of the ids with each label (`split_digests`);
        `star_id_name` and, when it is set, `stars`: per split the sorted 63-bit hashes of its star ids."""
        if self._split_record is None:
            record: dict = {"seed": self.split_seed, "sizes": {k: len(v) for k, v in self.split_index.items()},
                            "star_id_name": self.star_id_name, "digests": {}}
            for split, ids in self._split_ids.items():
                labels = self.tensors[split]["labels_phys"].numpy()
                record["digests"][split] = split_digests(ids["star_id"], labels, self.label_names)
            if self.star_id_name:
                record["stars"] = {split: torch.from_numpy(star_hashes(ids["star_id"])) for split, ids in self._split_ids.items()}
            self._split_record = record
        return self._split_record

    def splits_of_training(self, record: Mapping | None, trained_survey: str | None) -> tuple[dict[str, np.ndarray] | None, str]:
        """Per split of this data, the side of a checkpoint's training split each row's star was on: `train`,
        `val`, `test`, or `none` (a star it never saw); and how that was decided. (None, why) when it cannot be told.

        The same stars with the same labels in the same splits (`record`'s digests): each row's own split. Star ids
        that name stars survey-wide (APOGEE_ID) on both sides: star by star. A generated survey against a real
        one: no star in common. Otherwise (another synthetic survey, other cuts of a survey without such names)
        the stars cannot be matched."""
        from stellarlab.data.surveys import SURVEYS, survey_of_class

        own = self.split_record()
        sizes = {split: len(ids["star_id"]) for split, ids in self._split_ids.items()}
        digests = (record or {}).get("digests") or {}
        if digests and set(digests) == set(own["digests"]) and all(_same_stars(digests[s], own["digests"][s]) for s in digests):
            return {s: np.full(n, s) for s, n in sizes.items()}, "the data and split the checkpoint was trained on"
        name = (record or {}).get("star_id_name")
        if name and name == self.star_id_name and (record or {}).get("stars"):
            known = {split: np.asarray(stars.numpy() if hasattr(stars, "numpy") else stars, dtype=np.int64)
                     for split, stars in record["stars"].items()}
            out = {}
            for split, ids in self._split_ids.items():
                column = np.full(sizes[split], "none", dtype="<U5")
                hashes = id_hashes(ids["star_id"])
                for side, stars in known.items():
                    column[np.isin(hashes, stars)] = side
                out[split] = column
            return out, f"other data of the same survey: matched star by star ({name})"
        trained, this = SURVEYS.get(str(trained_survey)), survey_of_class(type(self))
        if trained is not None and this is not None and trained.generated != this.generated:
            return ({s: np.full(n, "none", dtype="<U5") for s, n in sizes.items()},
                    f"the checkpoint was trained on {trained.name} spectra, this data is {this.name}: no star in common")
        why = "no record of its split in the checkpoint" if not digests else "other stars, labels or split than the training data"
        return None, f"{why}, and star ids that name no star outside their data"

    def split_arrays(self, split: str) -> dict[str, torch.Tensor | SplitRows]:
        """flux, weight, labels (standardised), labels_phys and extras of one split, in split order.

        In memory these are tensors; when streaming, flux and weight are `SplitRows` (index them to read
        rows: `split_arrays("train")["flux"][:4]`). Code that must work in both modes uses this.
        """
        if split not in self.tensors:
            raise DataError(f"no split {split!r} set up; call setup() first (splits: {list(self.tensors) or 'none'})")
        return self.tensors[split]

    # -- what the model needs to know about the data ----------------------------------------------
    @property
    def n_pixels(self) -> int:
        return int(self.tensors["train"]["flux"].shape[1])

    def model_spec(self) -> dict:
        """Facts the model is built from and carries in its checkpoint (never typed twice in config)."""
        train = self.tensors["train"]["labels_phys"].numpy()  # the range predict.py flags predictions outside of
        return {
            "n_pixels": self.n_pixels,
            "label_names": list(self.label_names),
            "label_mean": [float(x) for x in self.scaler.mean],
            "label_std": [float(x) for x in self.scaler.std],
            "label_min": [float(x) for x in np.nanmin(train, axis=0)],
            "label_max": [float(x) for x in np.nanmax(train, axis=0)],
            "nuisance_labels": self.nuisance_spec(),
        }

    @property
    def fully_labelled(self) -> bool:
        """Whether the labels and nuisance labels are everything the spectra depend on (a synthetic survey's
        generator labels); real spectra depend on more than any catalogue lists."""
        return False

    def nuisance_spec(self) -> dict | None:
        """Names, training mean and std, and standardised training range of the nuisance labels, and whether the
        data is `fully_labelled` (None: no nuisance labels, not fully labelled). A model that emulates spectra
        (`model=emulator`) takes them as inputs and fits them beside the labels."""
        spec = {"names": list(self.nuisance_names), "complete": self.fully_labelled, "mean": [], "std": [], "min": [], "max": []}
        if self.nuisance_scaler is None:
            return spec if spec["complete"] else None
        train = self.tensors["train"]["nuisance"].numpy()
        spec.update(mean=[float(x) for x in self.nuisance_scaler.mean], std=[float(x) for x in self.nuisance_scaler.std],
                    min=[float(x) for x in np.nanmin(train, axis=0)], max=[float(x) for x in np.nanmax(train, axis=0)])
        return spec

    def preprocessing_config(self) -> dict:
        """What must be done to a new spectrum before a model trained on this data sees it.

        Saved in every checkpoint (via `state_dict`) so `predict.py` repeats it; surveys extend it. `survey_name`
        names the survey (`stellarlab.data.surveys`): predict.py writes the catalogue in its terms.
        """
        return {"datamodule": type(self).__name__, "survey_name": getattr(type(self), "survey_name", None)}

    def state_dict(self) -> dict:
        state = {"preprocessing": self.preprocessing_config(), "label_names": list(self.label_names)}
        if self._split_ids:
            state["split"] = self.split_record()
        return state

    # -- loaders --------------------------------------------------------------------------------
    def transfer_batch_to_device(self, batch: dict, device: torch.device, dataloader_idx: int) -> dict:
        # Batches are flat dicts of tensors: move them directly, without Lightning's generic walk over the batch.
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    def _target_device(self) -> torch.device:
        trainer = getattr(self, "trainer", None)
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _keep_on_device(self, device: torch.device) -> bool:
        """Whole splits live on the accelerator when they fit under `device_resident_max_gb`: no copy per batch."""
        if device.type == "cpu" or self.device_resident is False:
            return False
        size_gb = sum(t[k].numel() * t[k].element_size() for t in self.tensors.values() for k in self._batch_keys()) / 1e9
        fits = size_gb <= self.device_resident_max_gb
        if self.device_resident is True and not fits:
            log.warning("data.device_resident=true: %.2f GB exceeds data.device_resident_max_gb=%.2f; copying anyway",
                        size_gb, self.device_resident_max_gb)
        return self.device_resident is True or fits

    def _batch_keys(self) -> tuple[str, ...]:
        """What a batch holds: `BATCH_KEYS`, or the model's own `batch_keys` (a spectrum fit also reads `weight`)."""
        model = getattr(getattr(self, "trainer", None), "lightning_module", None)
        return tuple(getattr(model, "batch_keys", BATCH_KEYS))

    def _on_device(self, split: str, device: torch.device, keys: tuple[str, ...] = BATCH_KEYS) -> dict[str, torch.Tensor]:
        """The split's batch tensors on `device`, made once; streamed rows go to the device a block at a time."""
        if split not in self._device_tensors:
            moved = {}
            for k in keys:
                t = self.tensors[split][k]
                if isinstance(t, SplitRows):
                    moved[k] = t.source.copy(t.key, t.rows, out=torch.empty(tuple(t.shape), dtype=torch.float32, device=device))
                else:
                    moved[k] = t.to(device)
            self._device_tensors[split] = moved
            log.info("%s split kept on %s: batches are gathered there, no host-to-device copy per step", split, device)
        return self._device_tensors[split]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        device = self._target_device()
        on_device = self._keep_on_device(device)
        keys = self._batch_keys()
        batch_tensors = self._on_device(split, device, keys) if on_device else {k: self.tensors[split][k] for k in keys}
        dataset = BatchDataset(with_index=split != "train", **batch_tensors)
        pin = torch.cuda.is_available() if self.pin_memory == "auto" else bool(self.pin_memory)
        return DataLoader(
            dataset, batch_size=self.batch_size if split == "train" else self.eval_batch_size, shuffle=shuffle,
            drop_last=split == "train" and self._last_batch_of_one(len(dataset)), collate_fn=keep_batch,
            num_workers=0 if on_device else self.num_workers, persistent_workers=self.num_workers > 0 and not on_device,
            pin_memory=pin and not on_device,
        )

    def _last_batch_of_one(self, n_rows: int) -> bool:
        """Whether an epoch (per process) would end in a training batch of one spectrum, which BatchNorm cannot
        normalise: the loader then drops that batch, a different row each epoch; other partial batches are kept."""
        world = getattr(getattr(self, "trainer", None), "world_size", 1) or 1
        alone = self.batch_size > 1 and -(-n_rows // world) % self.batch_size == 1
        if alone:
            log.info("the last training batch would hold one spectrum (%d rows, data.batch_size=%d): it is left out "
                     "of each epoch", n_rows, self.batch_size)
        return alone

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
