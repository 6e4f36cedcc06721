"""SpectraDataModule: tensors once, bad pixels harmless, NaN labels kept for masking, train-only scaling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stellarlab.data import SpectraArrays, SpectraDataModule
from stellarlab.errors import ConfigError, DataError


class ArraysDataModule(SpectraDataModule):
    """A DataModule over arrays the test makes."""

    def __init__(self, arrays: SpectraArrays, **kwargs):
        super().__init__(**kwargs)
        self.arrays = arrays

    def load_arrays(self) -> SpectraArrays:
        return self.arrays


def make_arrays(n=200, p=50, seed=0) -> SpectraArrays:
    rng = np.random.default_rng(seed)
    labels = np.column_stack([rng.normal(5000, 500, n), rng.normal(3, 1, n), rng.normal(-0.2, 0.3, n)]).astype(np.float32)
    flux = (1 - 0.1 * rng.random((n, p))).astype(">f8")  # big-endian float64, as FITS files deliver
    weight = np.full((n, p), 1e4)
    return SpectraArrays(flux, weight, labels, ["teff", "logg", "fe_h"], np.arange(n) // 2, np.linspace(15100, 17000, p))


def test_bad_pixels_become_continuum_with_zero_weight():
    a = make_arrays()
    a.flux[3, 5] = np.nan
    a.flux[4, 6] = np.inf
    a.weight[5, 7] = 0.0
    a.weight[6, 8] = np.nan
    dm = ArraysDataModule(a, split=[0.6, 0.2, 0.2], batch_size=16)
    dm.setup()
    for t in dm.tensors.values():
        assert t["flux"].dtype == torch.float32 and t["flux"].is_contiguous()
        assert torch.isfinite(t["flux"]).all() and torch.isfinite(t["weight"]).all()
    flux = torch.cat([dm.tensors[s]["flux"] for s in dm.tensors])
    weight = torch.cat([dm.tensors[s]["weight"] for s in dm.tensors])
    assert int((weight == 0).sum()) == 4
    assert torch.all(flux[weight == 0] == 1.0)


def test_missing_labels_stay_nan_and_rows_without_labels_are_dropped():
    a = make_arrays()
    a.labels[10, 1] = np.nan
    a.labels[11, :] = np.nan
    dm = ArraysDataModule(a, split=[0.6, 0.2, 0.2], batch_size=16)
    dm.setup()
    total = sum(len(i) for i in dm.split_index.values())
    assert total == 199
    nan_count = sum(int(torch.isnan(t["labels"]).sum()) for t in dm.tensors.values())
    assert nan_count == 1


def test_scaler_uses_training_split_only():
    a = make_arrays(n=400)
    dm = ArraysDataModule(a, split=[0.5, 0.25, 0.25], batch_size=16, split_seed=3)
    dm.setup()
    train_rows = a.labels[dm.split_index["train"]]
    np.testing.assert_allclose(dm.scaler.mean, train_rows.mean(0), rtol=1e-5)
    np.testing.assert_allclose(dm.scaler.std, train_rows.std(0), rtol=1e-5)
    assert not np.allclose(dm.scaler.mean, a.labels.mean(0), rtol=1e-6)
    spec = dm.model_spec()
    assert spec["n_pixels"] == 50 and spec["label_names"] == ["teff", "logg", "fe_h"]
    np.testing.assert_allclose(spec["label_mean"], dm.scaler.mean)


def test_batches_are_gathered_whole_and_match_the_tensors():
    dm = ArraysDataModule(make_arrays(), split=[0.6, 0.2, 0.2], batch_size=16)
    dm.setup()
    batches = list(dm.val_dataloader())
    assert [len(b["flux"]) for b in batches] == [16, 16, 8]
    torch.testing.assert_close(torch.cat([b["flux"] for b in batches]), dm.tensors["val"]["flux"])
    torch.testing.assert_close(torch.cat([b["labels"] for b in batches]), dm.tensors["val"]["labels"])
    train = next(iter(dm.train_dataloader()))
    assert train["flux"].shape == (16, 50) and train["labels"].shape == (16, 3)


def test_a_label_that_does_not_exist_is_named():
    dm = ArraysDataModule(make_arrays(), labels=["teff", "vsini"], batch_size=16)
    with pytest.raises(DataError, match=r"\['vsini'\] not in the data; available labels: \['teff', 'logg', 'fe_h'\]"):
        dm.setup()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": "abc"}, r"data\.batch_size=abc is not valid: it must be an integer >= 1; e\.g\. data\.batch_size=128"),
        ({"batch_size": 0}, r"data\.batch_size=0 is not valid: it must be an integer >= 1"),
        ({"batch_size": 2.5}, r"data\.batch_size=2\.5 is not valid: it must be an integer >= 1"),
        ({"eval_batch_size": -1}, r"data\.eval_batch_size=-1 is not valid: it must be an integer >= 1 or null"),
        ({"num_workers": None}, r"data\.num_workers=null is not valid: it must be an integer >= 0"),
        ({"num_workers": True}, r"data\.num_workers=true is not valid: it must be an integer >= 0"),
        ({"labels": []}, r"data\.labels=\[\] is not valid: name one or more labels"),
        ({"split": [0.5, 0.5]}, r"data\.split=\[0\.5,0\.5\] is not valid: it must have 3 entries"),
    ],
)
def test_batch_sizes_and_workers_built_in_code_are_checked_like_the_config(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ArraysDataModule(make_arrays(), **kwargs)


def test_batch_larger_than_training_set_is_refused():
    dm = ArraysDataModule(make_arrays(n=40), split=[0.5, 0.25, 0.25], batch_size=64)
    with pytest.raises(ConfigError, match="larger than the training set"):
        dm.setup()


def test_extras_stay_aligned_with_their_rows_when_rows_are_dropped():
    a = make_arrays()
    a.labels[10] = np.nan  # no label: dropped
    a.flux[20] = np.nan  # no valid pixel: dropped
    a.extra = {"snr": np.arange(len(a.flux), dtype=np.float32)}  # snr == original row number
    a.labels[:, 0] = np.where(np.isnan(a.labels[:, 0]), np.nan, np.arange(len(a.flux)))  # teff == row number too
    dm = ArraysDataModule(a, labels=["teff"], split=[0.6, 0.2, 0.2], batch_size=16)
    dm.setup()
    for t in dm.tensors.values():
        assert torch.equal(t["snr"], t["labels_phys"][:, 0])
    assert sum(len(t["snr"]) for t in dm.tensors.values()) == len(a.flux) - 2


def one_spectrum_per_star(n: int) -> SpectraArrays:
    a = make_arrays(n=n)
    a.star_id = np.arange(n)
    return a


def test_a_last_training_batch_of_one_spectrum_is_left_out_and_evaluation_keeps_every_row():
    dm = ArraysDataModule(one_spectrum_per_star(130), split=[65, 33, 32], batch_size=16, split_seed=1)  # 65 = 4 x 16 + 1
    dm.setup()
    train = [len(b["flux"]) for b in dm.train_dataloader()]
    assert train == [16, 16, 16, 16] and len(dm.train_dataloader()) == 4
    assert [len(b["flux"]) for b in dm.val_dataloader()] == [16, 16, 1]  # validation and test keep every row
    assert sum(len(b["flux"]) for b in dm.test_dataloader()) == 32
    dm = ArraysDataModule(one_spectrum_per_star(130), split=[66, 32, 32], batch_size=16, split_seed=1)  # a last batch of 2 stays
    dm.setup()
    assert [len(b["flux"]) for b in dm.train_dataloader()] == [16, 16, 16, 16, 2]


@pytest.mark.slow
def test_batch_norm_trains_when_the_training_set_leaves_one_spectrum_over():
    import pytorch_lightning as pl

    from stellarlab.models import MLPRegressor

    dm = ArraysDataModule(one_spectrum_per_star(130), split=[65, 33, 32], batch_size=16, split_seed=1)
    dm.setup()
    model = MLPRegressor(**dm.model_spec(), hidden_sizes=[8], batch_norm=True)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 8 and torch.isfinite(trainer.callback_metrics["val/loss"])


class EveryLabelDataModule(ArraysDataModule):
    """Arrays holding every label of the data, as the synthetic surveys hand over theirs."""

    reads_every_label = True


def test_nuisance_labels_are_standardised_on_the_training_split_and_passed_to_the_model():
    a = make_arrays(n=400)
    dm = EveryLabelDataModule(a, labels=["teff", "logg"], nuisance_labels=["fe_h"], split=[0.5, 0.25, 0.25],
                              batch_size=16, split_seed=3)
    dm.setup()
    train_fe_h = a.labels[dm.split_index["train"], 2]
    spec = dm.model_spec()["nuisance_labels"]
    assert spec["names"] == ["fe_h"]
    np.testing.assert_allclose(spec["mean"], [train_fe_h.mean()], rtol=1e-5)
    np.testing.assert_allclose(spec["std"], [train_fe_h.std()], rtol=1e-5)
    for split, rows in dm.split_index.items():  # standardised with the training split's mean and std, row by row
        expected = (a.labels[rows, 2] - train_fe_h.mean()) / train_fe_h.std()
        np.testing.assert_allclose(dm.tensors[split]["nuisance"][:, 0].numpy(), expected, rtol=1e-4, atol=1e-5)
    train = dm.tensors["train"]["nuisance"][:, 0]
    assert spec["min"] == pytest.approx([float(train.min())]) and spec["max"] == pytest.approx([float(train.max())])
    assert dm.tensors["train"]["labels"].shape[1] == 2  # the targets are the labels alone


def test_a_nuisance_label_that_is_also_a_label_is_a_target_and_none_means_none():
    dm = EveryLabelDataModule(make_arrays(), nuisance_labels=["fe_h"], batch_size=16)
    dm.setup()
    assert dm.nuisance_names == [] and dm.model_spec()["nuisance_labels"] is None
    assert dm.tensors["train"]["nuisance"].shape == (len(dm.split_index["train"]), 0)


def test_nuisance_labels_that_are_not_in_the_data_or_that_a_survey_reader_cannot_read_are_refused():
    dm = EveryLabelDataModule(make_arrays(), labels=["teff"], nuisance_labels=["alpha_fe"], batch_size=16)
    with pytest.raises(DataError, match=r"^nuisance label\(s\) \['alpha_fe'\] \(data\.nuisance_labels\) not in the data; "
                                        r"available labels: \['teff', 'logg', 'fe_h'\]"):
        dm.setup()
    with pytest.raises(ConfigError, match=r"^data\.nuisance_labels=\['fe_h'\]: ArraysDataModule reads the columns of "
                                          r"data\.labels alone"):
        ArraysDataModule(make_arrays(), labels=["teff"], nuisance_labels=["fe_h"], batch_size=16)
    with pytest.raises(ConfigError, match=r"^data\.nuisance_labels=fe_h is not valid: name zero or more labels"):
        EveryLabelDataModule(make_arrays(), nuisance_labels="fe_h", batch_size=16)


@pytest.mark.parametrize("labels, nuisance, names, complete", [
    (["teff", "logg", "fe_h"], ["alpha_fe"], ["alpha_fe"], True),  # the default: nothing is left out
    (["teff", "logg"], ["alpha_fe"], ["alpha_fe"], False),  # [Fe/H] shapes the spectra, and is neither
    (["teff", "logg", "fe_h", "alpha_fe"], ["alpha_fe"], [], True),  # a label in both lists is a target
    (["teff", "logg", "fe_h"], [], None, False),
])
def test_a_synthetic_survey_says_whether_its_labels_are_all_the_spectra_depend_on(labels, nuisance, names, complete,
                                                                                 survey_cache):
    from stellarlab.data import SyntheticDataModule

    dm = SyntheticDataModule(n_stars=50, split=[40, 4, 6], batch_size=8, cache_dir=str(survey_cache), seed=3,
                             labels=labels, nuisance_labels=nuisance)
    dm.setup()
    spec = dm.model_spec()["nuisance_labels"]
    assert dm.fully_labelled is complete
    assert (spec is None) if names is None else (spec["names"] == names and spec["complete"] is complete)
