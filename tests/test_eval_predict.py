"""eval.py re-tests a checkpoint to the same numbers; predict.py applies it to new spectra (npy, aspcapStar, apStar).

The catalogue of a model of the synthetic APOGEE survey has allStar's names (ID, TEFF, TEFF_ERR, ...)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table

from stellarlab.data.apogee.mock import write_apstar, write_aspcapstar
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture
def trained(trained_run) -> dict:
    """The session's tiny MLP run through train.py (conftest.trained_run)."""
    return trained_run


def _script(name: str, *args: str, log_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, name, *args, f"paths.log_dir={log_dir}"], cwd=ROOT, capture_output=True, text=True)


def _test_flux(trained) -> np.ndarray:
    from omegaconf import OmegaConf

    from stellarlab.data.synthetic import SyntheticDataModule

    data = OmegaConf.to_container(OmegaConf.load(trained["run"] / ".hydra" / "config.yaml").data)
    data.pop("_target_")
    data["cache_dir"] = str(trained["cache"] / "synthetic")
    dm = SyntheticDataModule(**data)
    dm.setup()
    return dm.tensors["test"]["flux"].numpy()


def test_eval_reproduces_the_test_metrics_of_training(trained):
    out = _script("eval.py", f"ckpt_path={trained['ckpt']}", log_dir=trained["tmp"] / "eval")
    assert out.returncode == 0, out.stderr[-2000:]
    at_training = json.loads((trained["run"] / "metrics.json").read_text())["test"]
    evaluated = json.loads(next((trained["tmp"] / "eval").rglob("metrics.json")).read_text())
    assert evaluated["checkpoint"] == str(trained["ckpt"])
    for label, m in at_training.items():
        for key in ("rmse", "mae", "bias", "mad_std", "n", "rmse_ci"):
            assert evaluated["test"][label][key] == pytest.approx(m[key], rel=1e-6), (label, key)


def test_eval_on_other_labels_is_a_clear_error(trained):
    out = _script("eval.py", f"ckpt_path={trained['ckpt']}", "data.labels=[teff]", log_dir=trained["tmp"] / "eval-bad")
    assert out.returncode == 2
    assert "data.labels" in out.stderr and "['teff', 'logg', 'fe_h']" in out.stderr


def test_predict_on_npy_gives_the_test_step_predictions(trained, tmp_path):
    np.save(tmp_path / "test_flux.npy", _test_flux(trained))
    out = _script("predict.py", f"ckpt_path={trained['ckpt']}", f"input={tmp_path / 'test_flux.npy'}", log_dir=tmp_path / "out")
    assert out.returncode == 0, out.stderr[-2000:]
    catalog = Table.read(next((tmp_path / "out").rglob("predictions.fits")))
    expected = np.genfromtxt(trained["run"] / "test_predictions.csv", delimiter=",", names=True)
    assert len(catalog) == len(expected)
    assert catalog["ID"][3] == "test_flux:3"  # the synthetic APOGEE grid: allStar's names
    for label in ("TEFF", "LOGG", "FE_H"):
        np.testing.assert_allclose(catalog[label], expected[f"{label.lower()}_pred"], rtol=1e-5)
        assert catalog[f"{label}_ERR"].mask.all()  # an MSE model predicts no uncertainty: masked, not NaN
        assert not catalog[f"{label}_OUTSIDE"].any()  # the test stars lie within the training range
    csv = Table.read(next((tmp_path / "out").rglob("predictions.csv")), format="ascii.csv")
    np.testing.assert_allclose(csv["TEFF"], catalog["TEFF"], rtol=1e-6)


def test_predict_flags_a_spectrum_of_nonsense_instead_of_returning_a_plain_row(trained, tmp_path):
    flux = _test_flux(trained)[:3].copy()
    flux[1] = 1e30
    np.save(tmp_path / "flux.npy", flux)
    out = _script("predict.py", f"ckpt_path={trained['ckpt']}", f"input={tmp_path / 'flux.npy'}", log_dir=tmp_path / "out")
    assert out.returncode == 0, out.stderr[-2000:]
    catalog = Table.read(next((tmp_path / "out").rglob("predictions.fits")))
    for label in ("TEFF", "LOGG", "FE_H"):
        assert list(catalog[f"{label}_OUTSIDE"]) == [False, True, False], label
    csv = Table.read(next((tmp_path / "out").rglob("predictions.csv")), format="ascii.csv")
    assert [str(v) for v in csv["TEFF_OUTSIDE"]] == ["False", "True", "False"]
    assert "1 of 3 spectra have a prediction outside the training labels' range widened by 0.2 of its width" in out.stdout + out.stderr
    log = next((tmp_path / "out").rglob("predict.log")).read_text()
    assert "1 of 3 spectra have a prediction outside" in log


def test_eval_and_predict_refuse_a_checkpoint_with_flipped_bytes(trained, tmp_path):
    import torch

    data = bytearray(trained["ckpt"].read_bytes())
    weights = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)["state_dict"]
    needle = max(weights.values(), key=lambda t: t.numel()).reshape(-1)[:16].numpy().tobytes()
    data[data.find(needle) + 5] ^= 0x10
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(bytes(data))
    np.save(tmp_path / "flux.npy", _test_flux(trained)[:2])
    line = f"error: checkpoint {damaged} is damaged: its weights do not match their checksum; "
    for argv in (["eval.py", f"ckpt_path={damaged}"], ["predict.py", f"ckpt_path={damaged}", f"input={tmp_path / 'flux.npy'}"]):
        out = _script(*argv, log_dir=tmp_path / argv[0])
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert out.stderr.strip().splitlines()[-1].startswith(line), out.stderr[-2000:]
        assert not list((tmp_path / argv[0]).rglob("*.csv")) and not list((tmp_path / argv[0]).rglob("metrics.json"))


def _stopped(command: str, hook: str, *args: str, log_dir: Path) -> subprocess.CompletedProcess:
    """`command`'s cli run with `hook` (a line that patches a function in this process) sending the signal
    at a known point, so the stop lands in the phase under test every time."""
    code = "\n".join(["import os, signal, sys", hook, f"sys.argv = [{command!r}, *sys.argv[1:]]",
                      f"from stellarlab.commands.{command.removesuffix('.py')} import cli", "cli()"])
    return subprocess.run([sys.executable, "-c", code, *args, f"paths.log_dir={log_dir}"], cwd=ROOT,
                          capture_output=True, text=True, start_new_session=True, timeout=300)  # its own group: killpg


def _assert_stopped_by_sigterm(trained, hook: str, spectra: Path, log_dir: Path) -> None:
    """predict.py with two reading workers, stopped by SIGTERM through `hook`: exit 143, one line, no catalogue."""
    out = _stopped("predict.py", hook, f"ckpt_path={trained['ckpt']}", f"input={spectra}", "data.workers=2",
                   "data.chunk_size=2", log_dir=log_dir)
    assert out.returncode == 143 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == "interrupted: run the same command again"
    assert not list(log_dir.rglob("predictions*"))


def test_a_signal_stops_eval_and_predict_with_one_line_its_exit_code_and_no_output(trained, tmp_path):
    # Ctrl-C inside Lightning's test loop: Lightning alone would end the process with exit 1 and no line
    hook = ("from stellarlab.run.callbacks import FigureLogger\n"
            "FigureLogger.on_test_batch_start = lambda *a: os.kill(os.getpid(), signal.SIGINT)")
    out = _stopped("eval.py", hook, f"ckpt_path={trained['ckpt']}", log_dir=tmp_path / "eval")
    assert out.returncode == 130 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == "interrupted: run the same command again"
    assert not list((tmp_path / "eval").rglob("metrics.json")) and not list((tmp_path / "eval").rglob("*.csv"))

    # SIGTERM (scancel, kill) while the spectra are read and predicted: no catalogue, no temporary left
    np.save(tmp_path / "flux.npy", _test_flux(trained)[:8])
    hook = ("from stellarlab.results import prediction\nreal = prediction.stream_predictions\n"
            "def stream(*a, **k):\n    os.kill(os.getpid(), signal.SIGTERM)\n    return real(*a, **k)\n"
            "prediction.stream_predictions = stream")
    out = _stopped("predict.py", hook, f"ckpt_path={trained['ckpt']}", f"input={tmp_path / 'flux.npy'}",
                   log_dir=tmp_path / "predict")
    assert out.returncode == 143 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == "interrupted: run the same command again"
    written = [p.name for p in (tmp_path / "predict").rglob("*") if p.is_file()]
    assert not [n for n in written if n.startswith("predictions") or ".tmp-" in n], written

    # SIGTERM to the whole job, as Slurm and a terminal send it, while two worker processes read blocks: the
    # workers leave the stop to the main process (one killed mid-reply would leave it waiting forever)
    flux = _test_flux(trained)
    for i in range(48):
        write_aspcapstar(tmp_path / "many" / f"aspcapStar-dr17-2M{i:08d}.fits", flux[i % len(flux)],
                         np.full(flux.shape[1], 0.01, np.float32), objid=f"2M{i:08d}")
    hook = ("from stellarlab.results import prediction\nreal = prediction.parallel_results\n"
            "def blocks(*a, **k):\n    for i, block in enumerate(real(*a, **k)):\n"
            "        if i == 1:\n            os.killpg(0, signal.SIGTERM)\n        yield block\n"
            "prediction.parallel_results = blocks")
    _assert_stopped_by_sigterm(trained, hook, tmp_path / "many", tmp_path / "group")

    # a worker whose file never answers (a hung network mount): the stop kills it after the grace period
    hook = ("import time\nfrom stellarlab.results import prediction\nfrom stellarlab.data import flux\n"
            "flux.STOP_GRACE_SECONDS = 1.0\nreal_read, real_blocks = prediction.read_block, prediction.parallel_results\n"
            "def read(task):\n    if task[0] == 1:\n        time.sleep(3600)\n    return real_read(task)\n"
            "def blocks(*a, **k):\n    for block in real_blocks(*a, stop_grace=flux.STOP_GRACE_SECONDS, **k):\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n        yield block\n"
            "prediction.read_block, prediction.parallel_results = read, blocks")
    _assert_stopped_by_sigterm(trained, hook, tmp_path / "many", tmp_path / "stuck")


def test_predict_reads_apogee_files_and_resamples_or_refuses_other_grids(trained, tmp_path):
    flux = _test_flux(trained)[:2].astype(np.float64)
    err = np.full_like(flux[0], 0.01)
    files = tmp_path / "spectra"
    write_aspcapstar(files / "aspcapStar-dr17-2M00000001+0000001.fits", flux[0], err, objid="2M00000001+0000001")
    mask = np.zeros(flux.shape[1], dtype=np.int64)
    write_apstar(files / "apStar-dr17-2M00000002+0000002.fits", 1000.0 * flux[1], 1000.0 * err, mask, objid="2M00000002+0000002")
    out = _script("predict.py", f"ckpt_path={trained['ckpt']}", f"input={files}", log_dir=tmp_path / "out")
    assert out.returncode == 0, out.stderr[-2000:]
    catalog = Table.read(next((tmp_path / "out").rglob("predictions.csv")), format="ascii.csv")
    assert list(catalog["APOGEE_ID"]) == ["2M00000002+0000002", "2M00000001+0000001"]  # apStar-* sorts before aspcapStar-*
    expected = np.genfromtxt(trained["run"] / "test_predictions.csv", delimiter=",", names=True)
    assert catalog["TEFF"][1] == pytest.approx(expected["teff_pred"][0], rel=1e-4)  # aspcapStar: flux as given
    assert np.isfinite(catalog["TEFF"][0])  # apStar: continuum-normalised here first
    assert catalog["SNR"][0] == pytest.approx(100.0)  # the apStar header's SNR; aspcapStar: flux * sqrt(ivar)
    assert catalog["SNR"][1] == pytest.approx(np.median(np.abs(flux[0]) / 0.01), rel=0.05)

    # npy spectra on another grid: refused without a wavelength array, resampled with one
    from stellarlab.grids import apogee_wavelength

    wave = apogee_wavelength()
    coarse = wave[::2]
    np.save(tmp_path / "coarse.npy", flux[:1, ::2])
    np.save(tmp_path / "coarse_wavelength.npy", coarse)
    refused = _script("predict.py", f"ckpt_path={trained['ckpt']}", f"input={tmp_path / 'coarse.npy'}", log_dir=tmp_path / "o2")
    assert refused.returncode == 2
    assert "4288 pixels" in refused.stderr and "input_wavelength" in refused.stderr
    resampled = _script(
        "predict.py", f"ckpt_path={trained['ckpt']}", f"input={tmp_path / 'coarse.npy'}",
        f"input_wavelength={tmp_path / 'coarse_wavelength.npy'}", log_dir=tmp_path / "o3",
    )
    assert resampled.returncode == 0, resampled.stderr[-2000:]
    row = Table.read(next((tmp_path / "o3").rglob("predictions.csv")), format="ascii.csv")
    assert abs(row["TEFF"][0] - expected["teff_pred"][0]) < 150  # same star, half the pixels interpolated back


def test_predict_errors_name_the_problem(trained, tmp_path):
    missing = _script("predict.py", f"ckpt_path={tmp_path / 'nope.ckpt'}", f"input={tmp_path}", log_dir=tmp_path / "o")
    assert missing.returncode == 2 and "nope.ckpt" in missing.stderr and "checkpoints/" in missing.stderr
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(trained["ckpt"].read_bytes()[:5000])
    bad = _script("predict.py", f"ckpt_path={truncated}", f"input={tmp_path}", log_dir=tmp_path / "o")
    assert bad.returncode == 2 and "truncated.ckpt" in bad.stderr and "cannot be read" in bad.stderr
    (tmp_path / "empty").mkdir()
    empty = _script("predict.py", f"ckpt_path={trained['ckpt']}", f"input={tmp_path / 'empty'}", log_dir=tmp_path / "o")
    assert empty.returncode == 2 and "holds no spectra" in empty.stderr
    np.save(tmp_path / "nan.npy", np.full((2, 8575), np.nan, dtype=np.float32))
    nan = _script("predict.py", f"ckpt_path={trained['ckpt']}", f"input={tmp_path / 'nan.npy'}", log_dir=tmp_path / "o")
    assert nan.returncode == 2 and "no input spectrum has a single usable pixel" in nan.stderr
    assert not list((tmp_path / "o").rglob("predictions.*"))  # a failed run leaves no catalogue


def test_predict_finds_each_format_and_its_reader_through_the_survey_registry(tmp_path):
    from stellarlab.data import surveys
    from stellarlab.data.apogee.files import open_input
    from stellarlab.data.flux import open_npy
    from stellarlab.results.prediction import FORMATS, file_format, find_inputs

    assert FORMATS == ("auto", "aspcapStar", "apStar", "npy")
    names = ["aspcapStar-dr17-2M1.fits", "apStar-dr17-2M2.fits", "asStar-dr17-2M3.fits", "flux.npy",
             "flux_wavelength.npy", "flux_ivar.npy", "notes.txt"]
    for name in names:
        (tmp_path / name).touch()
    os.mkfifo(tmp_path / "apStar-dr17-2M4.fits")  # a pipe would never answer: passed over, as is a folder
    (tmp_path / "aspcapStar-dr17-2M5.fits").mkdir()
    assert [p.name for p in find_inputs(str(tmp_path), "auto")] == sorted(names[:4])
    assert [p.name for p in find_inputs(str(tmp_path), "apStar")] == ["apStar-dr17-2M2.fits", "asStar-dr17-2M3.fits"]
    kinds = [file_format(tmp_path / name, "auto") for name in names[:4]]
    assert kinds == ["aspcapStar", "apStar", "apStar", "npy"]
    assert file_format(tmp_path / "aspcapStar-x.npy", "auto") == "npy"  # the extension wins over the name
    readers = {kind: surveys.load(surveys.input_format(kind).reader) for kind in FORMATS[1:]}
    assert readers == {"aspcapStar": open_input, "apStar": open_input, "npy": open_npy}
