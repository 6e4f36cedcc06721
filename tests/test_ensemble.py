"""Deep ensembles and MC dropout end to end: `train.py -m experiment=ensemble`, then eval.py on the multirun folder
or on a list of checkpoints, and MC dropout on one model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, TINY

pytestmark = pytest.mark.slow

N_MEMBERS = 3


@pytest.fixture(scope="module")
def ensemble_runs(tmp_path_factory, warm_cache) -> Path:
    """Three tiny gaussian_nll MLPs with dropout (seeds 0, 1, 2) from the experiment=ensemble recipe."""
    tmp = tmp_path_factory.mktemp("ensemble")
    cmd = [sys.executable, "train.py", "-m", "experiment=ensemble", "seed=0,1,2",
           *TINY, "trainer.max_epochs=6", "model.dropout=0.1", f"paths.log_dir={tmp}/out", f"paths.cache_dir={warm_cache}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return next((tmp / "out" / "ensemble" / "multiruns").iterdir())


def _eval(*args: str, log_dir: Path) -> tuple[subprocess.CompletedProcess, dict | None]:
    proc = subprocess.run([sys.executable, "eval.py", *args, f"paths.log_dir={log_dir}"], cwd=ROOT,
                          capture_output=True, text=True)
    runs = sorted((log_dir / "eval" / "runs").glob("*/metrics.json")) if (log_dir / "eval" / "runs").is_dir() else []
    return proc, json.loads(runs[-1].read_text()) if runs else None


def _members(folder: Path) -> list[Path]:
    return sorted(folder.glob("*/checkpoints/best-*.ckpt"))


def test_recipe_trains_one_member_per_seed(ensemble_runs):
    members = _members(ensemble_runs)
    assert len(members) == N_MEMBERS
    seeds = {json.loads((m.parent.parent / "metrics.json").read_text())["status"] for m in members}
    assert seeds == {"ok"}


def test_eval_of_a_multirun_folder_reports_the_ensemble(ensemble_runs, tmp_path):
    proc, summary = _eval(f"ckpt_path={ensemble_runs}", log_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary["ensemble"]["members"] == [str(m) for m in _members(ensemble_runs)]
    assert summary["checkpoint"] == summary["ensemble"]["members"]
    calib = summary["calibration"]
    assert set(calib) == {"teff", "logg", "fe_h"} and all(0 < c["frac_within_1sigma"] <= 1 for c in calib.values())
    member_rmse = []
    for member in _members(ensemble_runs):
        member_rmse.append(json.loads((member.parent.parent / "metrics.json").read_text())["test"]["teff"]["rmse"])
    # the members' mean is at least as good as the average member (errors partly cancel)
    assert summary["test"]["teff"]["rmse"] <= np.mean(member_rmse) * 1.02
    table = np.genfromtxt(Path(summary["test_predictions"]), delimiter=",", names=True)
    assert len(table) == summary["split_sizes"]["test"] and "teff_sigma" in table.dtype.names


def test_eval_of_a_list_equals_the_folder(ensemble_runs, tmp_path):
    members = _members(ensemble_runs)
    proc, summary = _eval(f"ckpt_path=[{','.join(map(str, members))}]", log_dir=tmp_path / "a")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc2, folder = _eval(f"ckpt_path={ensemble_runs}", log_dir=tmp_path / "b")
    assert summary["test"]["teff"]["rmse"] == pytest.approx(folder["test"]["teff"]["rmse"], rel=1e-9)


def test_mc_dropout_on_one_member(ensemble_runs, tmp_path):
    member = _members(ensemble_runs)[0]
    proc, summary = _eval(f"ckpt_path={member}", "mc_dropout=8", log_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary["ensemble"] == {"members": [str(member)], "mc_dropout": 8}
    single = json.loads((member.parent.parent / "metrics.json").read_text())
    # MC dropout adds the passes' spread to the member's own sigma: never a smaller mean sigma
    assert summary["calibration"]["teff"]["mean_sigma"] >= single["calibration"]["teff"]["mean_sigma"] * 0.99


def test_bad_ensemble_options_are_one_line(ensemble_runs, tmp_path):
    member = _members(ensemble_runs)[0]
    for args, message in (
        ([f"ckpt_path=[{member},{member}]"], "more than once"),
        ([f"ckpt_path={member}", "mc_dropout=1"], "mc_dropout=1"),
        ([f"ckpt_path={tmp_path / 'nothing'}"], "no such file or folder of runs"),
    ):
        proc, _ = _eval(*args, log_dir=tmp_path / "bad")
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr


def test_predict_with_an_ensemble_and_with_mc_dropout(ensemble_runs, tmp_path):
    """The catalogue of an ensemble: the members' mean, total sigma >= spread, the spread in its own column with
    the label's unit, the members named in the provenance; MC dropout the same from one model."""
    from astropy.table import Table

    rng = np.random.default_rng(0)
    flux = (1 - 0.3 * rng.random((12, 8575))).astype(np.float32)
    np.save(tmp_path / "spectra.npy", flux)
    members = _members(ensemble_runs)
    for name, args in (("ens", [f"ckpt_path={ensemble_runs}"]), ("mc", [f"ckpt_path={members[0]}", "mc_dropout=5"])):
        out = tmp_path / name
        proc = subprocess.run([sys.executable, "predict.py", *args, f"input={tmp_path / 'spectra.npy'}",
                               f"output_dir={out}", "progress=false"], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        table = Table.read(out / "predictions.fits")
        assert str(table["TEFF_SPREAD"].unit) == "K" and str(table["LOGG_SPREAD"].unit) == "dex"
        spread, total = np.asarray(table["TEFF_SPREAD"]), np.asarray(table["TEFF_ERR"])
        assert (spread > 0).all() and (total >= spread - 1e-3).all()
        meta = json.loads((out / "predictions.json").read_text())["provenance"]["ensemble"]
        expected = [str(m.resolve()) for m in members] if name == "ens" else [str(members[0].resolve())]
        assert meta["members"] == expected and meta["mc_dropout"] == (5 if name == "mc" else 0)
