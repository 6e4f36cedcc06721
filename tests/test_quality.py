"""Trust in a prediction: the training domain a model carries (unlikeness score, SNR), the FLAG bits, ensembles
and MC dropout."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from stellarlab.data.synthetic import SyntheticDataModule
from stellarlab.errors import ConfigError, DataError
from stellarlab.models.mlp import MLPRegressor
from stellarlab.models.quality import TrainingDomain, der_snr_noise, domain_of, noise_weight, sample_rows, snr_estimate
from stellarlab.results import ensemble, flags
from tests.conftest import REAL_APSTAR


@pytest.fixture(scope="module")
def survey(survey_cache):
    dm = SyntheticDataModule(n_stars=600, snr=100, cache_dir=str(survey_cache), batch_size=32)
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def domain(survey):
    return domain_of(survey)


def test_in_domain_test_spectra_are_rarely_flagged(survey, domain):
    """The threshold is calibrated on validation spectra: held-out test spectra of the same survey pass."""
    flux, weight = sample_rows(survey.split_arrays("test"))
    score = domain.score(flux, weight)
    assert float((score > domain.threshold).float().mean()) <= 0.05
    assert 0.9 < float(score.median()) < 1.2  # about one: noise-dominated residual in units of the errors
    assert math.isfinite(domain.threshold) and domain.threshold > 1.0


def test_foreign_spectra_are_flagged(survey, domain):
    """Spectra of another kind: not shifted to the rest frame, a badly normalised continuum, lines no training star
    has, a real APOGEE star (given to a model of the synthetic survey)."""
    flux, weight = sample_rows(survey.split_arrays("test"))
    shifted = torch.roll(flux, 2, dims=1)  # ~8 km/s radial velocity left in
    tilted = flux * (1 + 0.02 * torch.linspace(-1, 1, flux.shape[1]))  # a 2 % continuum slope
    deep = 1 - 2 * (1 - flux)  # lines twice as deep as any training star's
    for name, foreign in (("shifted", shifted), ("tilted continuum", tilted), ("deeper lines", deep)):
        flagged = float((domain.score(foreign, weight) > domain.threshold).float().mean())
        assert flagged > 0.9, name
    from stellarlab.data.apogee.files import read_input

    real, real_weight, _ = read_input(REAL_APSTAR, "apStar", {}, survey.wavelength)
    assert float(domain.score(torch.as_tensor(real), torch.as_tensor(real_weight))[0]) > domain.threshold


def test_inputs_without_errors_are_scored_on_the_same_scale(survey, domain):
    """A .npy of flux only (weights 0/1): the noise comes from the flux itself, so in-domain spectra still pass."""
    flux, weight = sample_rows(survey.split_arrays("test"))
    binary = (weight > 0).float()
    assert float((domain.score(flux, binary) > domain.threshold).float().mean()) <= 0.05
    noise = der_snr_noise(flux, weight)
    assert 0.009 < float(noise.median()) < 0.014  # the survey's SNR is 100 (lines make the estimate a little high)
    assert torch.equal(noise_weight(flux, weight), weight)  # real inverse variances are kept


def test_spectra_given_without_errors_are_judged_by_limits_measured_the_same_way(survey, domain):
    """A .npy of flux alone (chip gaps saved as 1.0, every pixel weight 1): its SNR and score come from the flux
    itself, which reads lines as noise; compared with the limits of spectra with errors half of these in-domain
    spectra were LOW_SNR. With limits measured on the training and validation spectra given the same way, they
    pass as the spectra with errors do, and foreign ones are still caught."""
    from stellarlab.results.flags import Flag
    from stellarlab.results.predict_block import predict_chunk

    model = MLPRegressor(survey.n_pixels, survey.label_names, hidden_sizes=[8]).eval()
    model.training_domain = domain
    flux, weight = (t.numpy() for t in sample_rows(survey.split_arrays("test")))
    assert domain.snr_min_no_errors < domain.snr_min and math.isfinite(domain.threshold_no_errors)
    for given in (weight, np.ones_like(weight)):
        flag = predict_chunk(model, flux, given)["flag"]
        assert (flag & Flag.LOW_SNR).astype(bool).mean() <= 0.05 and (flag & Flag.UNLIKE_TRAINING).astype(bool).mean() <= 0.05
    shifted = np.roll(flux, 2, axis=1)
    assert (predict_chunk(model, shifted, np.ones_like(weight))["flag"] & Flag.UNLIKE_TRAINING).astype(bool).mean() > 0.9


def test_snr_and_domain_numbers(survey, domain):
    flux, weight = sample_rows(survey.split_arrays("test"))
    snr = snr_estimate(flux.numpy(), weight.numpy())
    assert float(np.median(snr)) == pytest.approx(100, rel=0.05)
    no_errors = snr_estimate(flux.numpy(), (weight > 0).float().numpy())  # flux only: the noise from the flux
    assert 70 < float(np.median(no_errors)) < 110
    assert 90 < domain.snr_min < 100
    assert domain.usable_median == 7514  # the detector pixels of the 8575-pixel grid
    empty = domain.score(torch.ones(1, flux.shape[1]), torch.zeros(1, flux.shape[1]))
    assert math.isinf(float(empty[0]))


def test_domain_is_deterministic_and_survives_a_checkpoint_dict(survey, domain):
    again = domain_of(survey)
    assert torch.equal(again.components, domain.components) and again.threshold == domain.threshold
    back = TrainingDomain.from_state(domain.state())
    flux, weight = sample_rows(survey.split_arrays("val"), 20)
    assert torch.allclose(back.score(flux, weight), domain.score(flux, weight))


def test_flag_column_bits_and_header():
    flag = flags.flag_column(4, FEW_PIXELS=[True, False, False, False], UNLIKE_TRAINING=[True, True, False, False],
                             LOW_SNR=None)
    assert flag.tolist() == [5, 4, 0, 0]
    counts = flags.summary(flag)
    assert counts["FEW_PIXELS"] == 1 and counts["UNLIKE_TRAINING"] == 2 and counts["clean"] == 2
    assert flags.describe(counts, 4) == "2 of 4 spectra flagged: FEW_PIXELS 1, UNLIKE_TRAINING 2"
    assert flags.names_of(5) == ["FEW_PIXELS", "UNLIKE_TRAINING"]
    cards = flags.header_cards()
    assert cards["FLAGBIT0"] == "FEW_PIXELS: too few usable pixels (labels masked)"
    assert list(cards) == [f"FLAGBIT{i}" for i in range(6)] and all(len(v) <= 68 for v in cards.values())


def test_combine_members():
    means = [np.array([[1.0, 10.0]]), np.array([[3.0, 10.0]])]
    sigmas = [np.array([[1.0, 2.0]]), np.array([[1.0, 2.0]])]
    c = ensemble.combine(means, sigmas)
    assert c.mean.tolist() == [[2.0, 10.0]]
    assert c.spread[0, 0] == pytest.approx(math.sqrt(2)) and c.spread[0, 1] == 0
    assert c.sigma[0, 0] == pytest.approx(math.sqrt(1 + 2)) and c.sigma[0, 1] == pytest.approx(2.0)
    assert c.disagree(1.0).tolist() == [True] and c.disagree(2.0).tolist() == [False]
    no_sigma = ensemble.combine(means, [None, None])
    assert np.array_equal(no_sigma.sigma, no_sigma.spread) and not no_sigma.disagree(1.0).any()


def test_member_checkpoints_errors(tmp_path):
    with pytest.raises(ConfigError, match="names no checkpoint"):
        ensemble.member_checkpoints([])
    with pytest.raises(ConfigError, match="no such file or folder of runs"):
        ensemble.member_checkpoints(str(tmp_path / "missing"))
    (tmp_path / "0").mkdir()
    with pytest.raises(DataError, match="no finished run"):
        ensemble.member_checkpoints(str(tmp_path))
    ckpt = tmp_path / "a.ckpt"
    ckpt.write_bytes(b"x")
    with pytest.raises(ConfigError, match="more than once"):
        ensemble.member_checkpoints([str(ckpt), str(ckpt)])


def test_member_checkpoints_from_a_multirun_folder(tmp_path):
    """The best checkpoint of each finished job; a failed job is left out."""
    import json

    for job, status in (("0", "ok"), ("1", "failed"), ("2", "ok")):
        run = tmp_path / job
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "best-epoch003.ckpt").write_bytes(b"x")
        record = {"status": status, "best_value": 1.0, "best_checkpoint": str(run / "checkpoints" / "best-epoch003.ckpt")}
        (run / "metrics.json").write_text(json.dumps(record))
    found = ensemble.member_checkpoints(str(tmp_path))
    assert [p.parent.parent.name for p in found] == ["0", "2"]


def test_mc_dropout_passes_differ_and_are_reproducible():
    model = MLPRegressor(n_pixels=50, label_names=["teff", "logg"], hidden_sizes=[32], dropout=0.3).eval()
    flux = torch.rand(6, 50)
    passes = model.predict_mc_dropout(flux, None, 4)
    assert len(passes) == 4 and not torch.equal(passes[0][0], passes[1][0])
    again = model.predict_mc_dropout(flux, None, 4)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(passes, again))
    assert not model.training and all(not m.training for m in model.dropout_layers())  # left in eval mode
    ensemble.check_mc_dropout(model, 4)
    for bad in (1, -2, 2.5, True, "3"):
        with pytest.raises(ConfigError, match="mc_dropout="):
            ensemble.check_mc_dropout(model, bad)
    plain = MLPRegressor(n_pixels=50, label_names=["teff"], hidden_sizes=[8])
    with pytest.raises(ConfigError, match="has no dropout layer"):
        ensemble.check_mc_dropout(plain, 5)


@pytest.mark.slow
def test_every_checkpoint_of_a_run_carries_its_training_domain(trained_run, survey):
    """Recorded at the start of the fit, so the best checkpoint and last.ckpt both have it, equal to the data's own."""
    from stellarlab.results.prediction import load_model

    ckpts = [trained_run["ckpt"], trained_run["run"] / "checkpoints" / "last.ckpt"]
    domains = [load_model(c)[0].training_domain for c in ckpts]
    assert all(d is not None for d in domains)
    assert torch.equal(domains[0].components, domains[1].components)
    assert domains[0].threshold == pytest.approx(domain_of(survey).threshold, rel=1e-5)


@pytest.mark.slow
def test_predict_flags_foreign_spectra_and_masks_empty_ones(trained_run, survey, tmp_path):
    """predict.py on a folder: held-out test spectra of the training survey mostly pass, the same spectra with a
    radial velocity left in and a real APOGEE star are flagged UNLIKE_TRAINING, a spectrum with few usable
    pixels gets FEW_PIXELS and masked labels; the bits are named in the FITS header."""
    import shutil
    import subprocess
    import sys

    from astropy.io import fits
    from astropy.table import Table

    from tests.conftest import ROOT

    test = survey.split_arrays("test")
    flux, weight = test["flux"].numpy(), test["weight"].numpy()
    inputs = tmp_path / "in"
    inputs.mkdir()
    np.save(inputs / "test.npy", flux)
    np.save(inputs / "test_ivar.npy", weight)
    np.save(inputs / "shifted.npy", np.roll(flux[:20], 2, axis=1))
    np.save(inputs / "shifted_ivar.npy", weight[:20])
    sparse = weight[:3].copy()
    sparse[:, 800:] = 0  # about a tenth of the pixels left
    np.save(inputs / "sparse.npy", flux[:3])
    np.save(inputs / "sparse_ivar.npy", sparse)
    shutil.copy(REAL_APSTAR, inputs / REAL_APSTAR.name)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "predict.py", f"ckpt_path={trained_run['ckpt']}", f"input={inputs}",
                           f"output_dir={out}", "progress=false"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = Table.read(out / "predictions.fits")
    source = np.array([Path(f).stem for f in table["FILE"]])
    flag = np.asarray(table["FLAG"])
    unlike = (flag & flags.Flag.UNLIKE_TRAINING) != 0
    assert unlike[source == "test"].mean() <= 0.05
    assert unlike[source == "shifted"].mean() >= 0.9
    assert unlike[source == REAL_APSTAR.stem].all()
    few = source == "sparse"
    assert ((flag[few] & flags.Flag.FEW_PIXELS) != 0).all() and table["TEFF"].mask[few].all()
    assert not table["TEFF"].mask[source == "test"].any()
    assert np.isfinite(np.asarray(table["UNLIKENESS"])[source == "test"]).all()
    header = fits.getheader(out / "predictions.fits", 1)
    assert header["FLAGBIT2"].startswith("UNLIKE_TRAINING")
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["flags"]["FEW_PIXELS"] == 3 and summary["flags"]["UNLIKE_TRAINING"] >= 21


def test_bad_trust_settings_are_one_line():
    from omegaconf import OmegaConf

    from stellarlab.commands.predict import trust_settings

    good = trust_settings(OmegaConf.create({}), 0.2)
    assert (good.min_usable_fraction, good.disagreement_factor, good.max_reduced_chi2, good.mc_dropout) == (0.5, 2.0, 3.0, 0)
    for key, value, message in (("min_usable_fraction", 1.5, "min_usable_fraction=1.5 is not valid"),
                                ("disagreement_factor", 0, "disagreement_factor=0 is not valid"),
                                ("max_reduced_chi2", "big", "max_reduced_chi2=big is not valid"),
                                ("mc_dropout", -3, "mc_dropout=-3 is not valid"),
                                ("mc_dropout", 2.5, "mc_dropout=2.5 is not valid")):
        with pytest.raises(ConfigError, match=message):
            trust_settings(OmegaConf.create({key: value}), 0.2)
