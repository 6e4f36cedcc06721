"""Streaming from a memory-mapped cache: the same batches, predictions and metrics as in memory, no full copy."""

from __future__ import annotations

import json
import pickle
import sys
import textwrap

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from benchmarks.peak_rss import run_measured
from stellarlab.data import SpectraArrays, SpectraDataModule
from stellarlab.data.cache import ArrayCache
from stellarlab.data.rows import RowReader, SplitRows
from stellarlab.errors import ConfigError
from stellarlab.models import LinearRegressor


class CachedSpectra(SpectraDataModule):
    """Arrays from an ArrayCache folder, memory-mapped: what APOGEE/GALAH/synthetic caches hand over."""

    def __init__(self, cache: ArrayCache, mmap: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.cache, self.mmap = cache, mmap

    def load_arrays(self) -> SpectraArrays:
        a = self.cache.load(mmap=self.mmap)
        n, p = a["flux"].shape
        return SpectraArrays(a["flux"], a["weight"], a["labels"], ["teff", "logg", "fe_h"], a["star_id"],
                             np.linspace(15100, 17000, p), extra={"snr": a["snr"]})


def write_cache(root, n=300, p=40, seed=0, bad=False) -> ArrayCache:
    rng = np.random.default_rng(seed)
    flux = (1 - 0.2 * rng.random((n, p))).astype(np.float32)
    weight = rng.uniform(10, 100, (n, p)).astype(np.float32)
    labels = np.column_stack([rng.normal(5000, 500, n), rng.normal(3, 1, n), rng.normal(-0.2, 0.3, n)]).astype(np.float32)
    labels[7, 1] = np.nan  # a missing label: masked, row kept
    if bad:
        flux[3, 5], flux[4, 6], weight[5, 7], weight[6, 8] = np.nan, np.inf, 0.0, np.nan
        flux[9] = np.nan  # no valid pixel: the row is dropped
    cache = ArrayCache(root, "spectra", {"n": n, "p": p, "seed": seed, "bad": bad})
    cache.write({"flux": flux, "weight": weight, "labels": labels, "star_id": np.arange(n) // 2,
                 "snr": np.arange(n, dtype=np.float32)})
    return cache


def both(cache, **kwargs) -> tuple[CachedSpectra, CachedSpectra]:
    kwargs = {"split": [0.6, 0.2, 0.2], "batch_size": 16, "eval_batch_size": 32, **kwargs}
    memory, stream = CachedSpectra(cache, in_memory=True, **kwargs), CachedSpectra(cache, in_memory=False, **kwargs)
    memory.setup()
    stream.setup()
    return memory, stream


def test_streaming_holds_a_file_reader_not_a_copy(tmp_path):
    memory, stream = both(write_cache(tmp_path))
    assert not memory.streaming and stream.streaming
    for split in ("train", "val", "test"):
        flux = stream.split_arrays(split)["flux"]
        assert isinstance(flux, SplitRows) and isinstance(memory.split_arrays(split)["flux"], torch.Tensor)
        reader = flux.source.readers["flux"]
        assert reader.mapped and reader.array is None  # rows come from the file, no array is held
    dataset = stream.train_dataloader().dataset
    pickled = pickle.dumps(dataset)  # what a spawned DataLoader worker or DDP process receives
    assert len(pickled) < 20_000 < stream.tensors["train"]["flux"].numel() * 4
    clone = pickle.loads(pickled)
    torch.testing.assert_close(clone.__getitems__([0, 5]), dataset.__getitems__([0, 5]), equal_nan=True)


def test_streaming_and_in_memory_give_identical_batches(tmp_path):
    memory, stream = both(write_cache(tmp_path))
    assert memory.split_index.keys() == stream.split_index.keys()
    for split in ("train", "val", "test"):
        m, s = memory.split_arrays(split), stream.split_arrays(split)
        assert s["flux"].shape == m["flux"].shape
        torch.testing.assert_close(s["flux"][:], m["flux"], rtol=0, atol=0)
        torch.testing.assert_close(torch.from_numpy(s["weight"].numpy()), m["weight"], rtol=0, atol=0)
        torch.testing.assert_close(s["labels"], m["labels"], rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(s["snr"], m["snr"])
        torch.testing.assert_close(s["flux"][3], m["flux"][3])
        torch.testing.assert_close(s["flux"][torch.tensor([4, 0, 4])], m["flux"][torch.tensor([4, 0, 4])])
    for loader in ("train_dataloader", "val_dataloader"):
        torch.manual_seed(3)
        a = list(getattr(memory, loader)())
        torch.manual_seed(3)
        b = list(getattr(stream, loader)())
        assert len(a) == len(b) > 1
        for x, y in zip(a, b):
            assert x.keys() == y.keys()
            for k in x:
                torch.testing.assert_close(x[k], y[k], rtol=0, atol=0, equal_nan=True)
    val = next(iter(stream.val_dataloader()))
    assert val["index"].tolist() == list(range(32))  # eval batches carry their split positions
    assert "index" not in next(iter(stream.train_dataloader()))


def test_bad_pixels_of_a_memory_map_are_fixed_per_batch(tmp_path):
    memory, stream = both(write_cache(tmp_path, bad=True))
    assert stream.tensors["train"]["flux"].source.needs_fix
    assert sum(len(i) for i in stream.split_index.values()) == 299  # the row with no valid pixel is dropped
    flux = torch.cat([stream.split_arrays(s)["flux"][:] for s in ("train", "val", "test")])
    weight = torch.cat([stream.split_arrays(s)["weight"][:] for s in ("train", "val", "test")])
    assert torch.isfinite(flux).all() and torch.isfinite(weight).all()
    assert int((weight == 0).sum()) == 4 and torch.all(flux[weight == 0] == 1.0)
    for split in ("train", "val", "test"):
        for key in ("flux", "weight"):
            torch.testing.assert_close(stream.split_arrays(split)[key][:], memory.split_arrays(split)[key], rtol=0, atol=0)
    batch = next(iter(stream.val_dataloader()))
    assert torch.isfinite(batch["flux"]).all()


def test_auto_streams_only_large_memory_maps(tmp_path):
    cache = write_cache(tmp_path)
    small = CachedSpectra(cache, split=[0.6, 0.2, 0.2], batch_size=16)  # auto, 1 GB threshold
    small.setup()
    large = CachedSpectra(cache, split=[0.6, 0.2, 0.2], batch_size=16, in_memory_max_gb=1e-6)
    large.setup()
    in_ram = CachedSpectra(cache, mmap=False, split=[0.6, 0.2, 0.2], batch_size=16, in_memory_max_gb=1e-6)
    in_ram.setup()
    assert (small.streaming, large.streaming, in_ram.streaming) == (False, True, False)
    with pytest.raises(ConfigError, match="data.in_memory must be auto, true or false"):
        CachedSpectra(cache, in_memory="sometimes")


def test_streamed_splits_reach_a_device_a_block_at_a_time(tmp_path, monkeypatch):
    monkeypatch.setattr("stellarlab.data.base.SCAN_BLOCK_BYTES", 4 * 40 * 7)  # 7 rows per block: several blocks
    memory, stream = both(write_cache(tmp_path))
    moved = stream._on_device("val", torch.device("cpu"))  # the path CUDA/MPS take with device_resident
    torch.testing.assert_close(moved["flux"], memory.tensors["val"]["flux"], rtol=0, atol=0)
    torch.testing.assert_close(moved["labels"], memory.tensors["val"]["labels"], rtol=0, atol=0, equal_nan=True)


def test_reader_reads_any_rows_of_a_mapped_file_including_views(tmp_path):
    path = tmp_path / "a.npy"
    data = np.arange(50 * 7, dtype=">f8").reshape(50, 7)  # big-endian float64: converted per read
    np.save(path, data)
    mm = np.load(path, mmap_mode="r")
    for array, expected in ((mm, data), (mm[10:30], data[10:30])):
        reader = RowReader(array)
        assert reader.mapped
        rows = np.array([5, 6, 7, 0, 19, 19, 2])
        out = reader.read(rows)
        assert out.dtype == np.float32 and out.flags.c_contiguous
        np.testing.assert_array_equal(out, expected[rows].astype(np.float32))
    with pytest.raises(IndexError):
        RowReader(mm).read([50])


def train_and_test(dm, tmp_path, name):
    pl.seed_everything(0, verbose=False)
    model = LinearRegressor(**dm.model_spec())
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, deterministic=True,
                         default_root_dir=tmp_path / name)
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    return model


@pytest.mark.slow
def test_training_streamed_or_in_memory_gives_identical_predictions_and_metrics(tmp_path):
    memory, stream = both(write_cache(tmp_path, n=400))
    a, b = train_and_test(memory, tmp_path, "memory"), train_and_test(stream, tmp_path, "stream")
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value, rtol=0, atol=0)
    np.testing.assert_array_equal(a.test_results["pred"], b.test_results["pred"])
    assert a.test_results["metrics"] == b.test_results["metrics"]
    assert a.test_results["loss"] == b.test_results["loss"]


# Peak RSS of set-up plus one pass over every split, in a fresh process (benchmarks/peak_rss.py).
_PASS = textwrap.dedent(
    """
    import json, sys
    from tests.test_streaming import CachedSpectra
    from stellarlab.data.cache import ArrayCache
    args = json.loads(sys.argv[1])
    cache = ArrayCache(args["root"], "spectra", args["config"])
    dm = CachedSpectra(cache, in_memory=args["in_memory"], split=[0.8, 0.1, 0.1], batch_size=256, eval_batch_size=1024)
    dm.setup()
    rows = sum(len(b["flux"]) for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()) for b in loader)
    print(json.dumps({"rows": rows, "streaming": dm.streaming}))
    """
)


def peak_rss_mb(cache: ArrayCache, in_memory: bool) -> float:
    args = json.dumps({"root": str(cache.root), "config": cache.config, "in_memory": in_memory})
    out, _, peak = run_measured([sys.executable, "-c", _PASS, args], timeout=300)
    result = json.loads(out.splitlines()[-1])
    assert result["streaming"] is not in_memory
    return peak


def write_large(root, n, p) -> ArrayCache:
    """flux and weight of n x p float32 rows written a block at a time (the test itself stays small)."""
    cache = ArrayCache(root, "spectra", {"n": n, "p": p})
    rng = np.random.default_rng(n)
    with cache.writer({"flux": ((n, p), np.float32), "weight": ((n, p), np.float32), "labels": ((n, 3), np.float32),
                       "star_id": ((n,), np.int64), "snr": ((n,), np.float32)}) as w:
        for i in range(0, n, 5000):
            m = min(5000, n - i)
            w["flux"][i : i + m] = 1 - 0.2 * rng.random((m, p), dtype=np.float32)
            w["weight"][i : i + m] = np.float32(50.0)
            w["labels"][i : i + m] = rng.normal(size=(m, 3)).astype(np.float32)
            w["star_id"][i : i + m] = np.arange(i, i + m)
            w["snr"][i : i + m] = np.float32(100.0)
    return cache


@pytest.mark.slow
def test_streaming_peak_memory_does_not_grow_with_the_number_of_spectra(tmp_path):
    p = 1000
    small, large = write_large(tmp_path / "a", 20_000, p), write_large(tmp_path / "b", 60_000, p)
    data_mb = 2 * 40_000 * p * 4 / 2**20  # flux + weight of the 40,000 extra rows: 305 MB
    stream_small, stream_large = peak_rss_mb(small, False), peak_rss_mb(large, False)
    memory_large = peak_rss_mb(large, True)
    assert stream_large - stream_small < 0.15 * data_mb, (stream_small, stream_large)
    assert memory_large - stream_large > 0.8 * 2 * 60_000 * p * 4 / 2**20, (memory_large, stream_large)  # the measurement sees copies
