"""Training throughput through stellarlab (DataModule + LightningModule + Trainer, as train.py builds
them) against two references with the same network, loss and optimiser:

- the floor: a bare PyTorch loop over the same preloaded tensors at the same batch size;
- a naive course-style pipeline: a `Dataset` turning numpy rows into tensors in `__getitem__` and
  `DataLoader(batch_size=32, shuffle=True)`, the code stellarlab replaces.

    python benchmarks/training_overhead.py [--small]

Prints samples/s of each, the overhead (stellarlab time / bare time - 1), the speed-up over the naive
pipeline, and the ceiling: the bare loop stepping on one preloaded, cache-warm batch, i.e. with no data
path at all; naive / ceiling time is the most any data path could gain over the naive one. All are
timed side by side in one process, alternating rounds, over the same number of training epochs after
one warm-up epoch, with malloc tuned as train.py tunes it (all share it).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import hydra
import numpy as np
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

import stellarlab.config  # noqa: F401  (run_id resolver)
from stellarlab.config import instantiate_group
from stellarlab.data import SpectraArrays, SpectraDataModule
from stellarlab.models.losses import masked_mse
from stellarlab.run.allocator import keep_freed_blocks

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
N_PIXELS = 8575


class RandomSpectra(SpectraDataModule):
    """Spectrum-like arrays: throughput does not depend on what the pixels hold."""

    def __init__(self, n: int, **kwargs):
        super().__init__(**kwargs)
        self.n = n

    def load_arrays(self) -> SpectraArrays:
        rng = np.random.default_rng(0)
        flux = (1.0 - 0.3 * rng.random((self.n, N_PIXELS), dtype=np.float32)).astype(np.float32)
        labels = rng.normal(size=(self.n, 3)).astype(np.float32)
        return SpectraArrays(flux, np.ones_like(flux), labels, ["teff", "logg", "fe_h"], np.arange(self.n), np.arange(N_PIXELS, dtype=float))


class EpochTimer(pl.Callback):
    """Wall time of each training epoch's batches (validation excluded)."""

    def __init__(self):
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        _sync(pl_module.device)
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        _sync(pl_module.device)  # kernels still queued belong to this epoch
        self.times.append(time.perf_counter() - self._start)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def stellarlab_epoch_time(
    model_name: str, n: int, epochs: int, out_dir: Path, overrides: tuple[str, ...] = (), accelerator: str = "cpu"
) -> tuple[float, int, dict]:
    """Median time of a training epoch after the first, with train.py's trainer, logger and step callbacks."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={model_name}", f"trainer.accelerator={accelerator}", *overrides])
    with open_dict(cfg):
        cfg.paths = {"output_dir": str(out_dir), "log_dir": str(out_dir), "cache_dir": str(out_dir), "root_dir": str(out_dir)}
    keep_freed_blocks(cfg.get("malloc_keep_block_mb"))  # as train.py does; process-wide, so the references share it
    pl.seed_everything(0, verbose=False)
    dm = RandomSpectra(n, split=[n - 2, 1, 1], batch_size=cfg.data.batch_size, device_resident=cfg.data.get("device_resident", "auto"))
    dm.setup()
    model = hydra.utils.instantiate(cfg.model, **dm.model_spec(), optimizer=cfg.optimizer)
    timer = EpochTimer()
    callbacks = [c for c in instantiate_group(cfg.callbacks) if type(c).__name__ in ("LearningRateMonitor", "RichProgressBar")]
    trainer = hydra.utils.instantiate(
        cfg.trainer,
        max_epochs=epochs + 1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[*callbacks, timer],
        logger=instantiate_group(cfg.logger),
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    return statistics.median(timer.times[1:]), cfg.data.batch_size, {"net": model.net, "lr": cfg.optimizer.lr, "dm": dm}


def bare_epoch_time(
    net: torch.nn.Module, flux: torch.Tensor, labels: torch.Tensor, batch_size: int, lr: float, epochs: int, gather: bool = True
) -> float:
    """The floor: a hand-written loop over preloaded tensors (same loss as the models: NaN-masked MSE).

    `gather=False` gives the ceiling: every step reuses the first batch (no gather, data cache-warm).
    """
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    times = []
    for _ in range(epochs + 1):
        start = time.perf_counter()
        perm = torch.randperm(len(flux))
        for i in range(0, len(flux), batch_size):
            idx = perm[i : i + batch_size]
            x, y = (flux[idx], labels[idx]) if gather else (flux[: len(idx)], labels[: len(idx)])
            loss = masked_mse(net(1.0 - x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


class NaiveSpectra(torch.utils.data.Dataset):
    """How course code feeds spectra: numpy rows, converted to tensors one item at a time."""

    def __init__(self, flux: np.ndarray, labels: np.ndarray):
        self.flux = flux
        self.labels = labels

    def __len__(self):
        return len(self.flux)

    def __getitem__(self, i):
        return torch.tensor(self.flux[i], dtype=torch.float32), torch.tensor(self.labels[i], dtype=torch.float32)


def naive_epoch_time(
    net: torch.nn.Module, flux: np.ndarray, labels: np.ndarray, lr: float, epochs: int, batch_size: int = 32, device: str = "cpu"
) -> float:
    """The course-style pipeline: per-item Dataset, default collate, DataLoader(batch_size=32), `.to(device)` per batch."""
    loader = torch.utils.data.DataLoader(NaiveSpectra(flux, labels), batch_size=batch_size, shuffle=True)
    net.to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    times = []
    for _ in range(epochs + 1):
        _sync(device)
        start = time.perf_counter()
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = masked_mse(net(1.0 - x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


#: (row name, model, extra overrides): each network at its default batch size, and the linear model at a
#: large batch, where Lightning's fixed cost per step no longer hides how fast the data path is
CASES = (("linear", "linear", ()), ("mlp", "mlp", ()), ("cnn", "cnn", ()), ("linear@1024", "linear", ("data.batch_size=1024",)))


def run(small: bool = False) -> dict:
    """Alternate stellarlab and bare rounds (so drift in machine speed hits both alike); medians of rounds."""
    epochs, rounds = (1, 1) if small else (2, 3)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for row, name, overrides in CASES:
            # the CNN's epoch is ~50x slower than the MLP's: fewer spectra for it
            n = (2048 if row == "linear@1024" else 512) if small else (2048 if name == "cnn" else 8192)
            sl_times, bare_times, naive_times, ceiling_times = [], [], [], []
            for r in range(rounds):
                t_sl, batch_size, parts = stellarlab_epoch_time(name, n, epochs, Path(tmp) / f"{row.replace('@', '_b')}{r}", overrides)
                train = parts["dm"].tensors["train"]
                sl_times.append(t_sl)
                bare_times.append(bare_epoch_time(parts["net"], train["flux"], train["labels"], batch_size, parts["lr"], epochs))
                flux_np, labels_np = train["flux"].numpy(), train["labels"].numpy()
                naive_times.append(naive_epoch_time(parts["net"], flux_np, labels_np, parts["lr"], epochs))
                ceiling_times.append(bare_epoch_time(parts["net"], train["flux"], train["labels"], batch_size, parts["lr"], epochs, gather=False))
            t_sl, t_bare, t_naive, t_ceiling = (statistics.median(t) for t in (sl_times, bare_times, naive_times, ceiling_times))
            n_train = len(train["flux"])
            results[row] = {
                "n_train": n_train,
                "batch_size": batch_size,
                "stellarlab_samples_per_s": n_train / t_sl,
                "bare_samples_per_s": n_train / t_bare,
                "naive_samples_per_s": n_train / t_naive,
                "overhead": t_sl / t_bare - 1.0,
                "speedup_vs_naive": t_naive / t_sl,
                "ceiling_vs_naive": t_naive / t_ceiling,  # the most any data path could reach on this device
            }
    return results


def print_results(results: dict) -> None:
    print(
        f"{'model':12s} {'batch':>5s} {'stellarlab/s':>13s} {'bare loop/s':>12s} {'overhead':>9s}"
        f" {'naive(32)/s':>12s} {'vs naive':>9s} {'ceiling vs naive':>17s}"
    )
    for name, r in results.items():
        print(
            f"{name:12s} {r['batch_size']:5d} {r['stellarlab_samples_per_s']:13.0f} {r['bare_samples_per_s']:12.0f} {r['overhead']:+9.1%}"
            f" {r['naive_samples_per_s']:12.0f} {r['speedup_vs_naive']:8.1f}x {r['ceiling_vs_naive']:16.1f}x"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", action="store_true", help="a few hundred spectra, for CI")
    print_results(run(parser.parse_args().small))
