"""Resume after a real SIGKILL, stop on a real SIGTERM or Ctrl-C, requeue through submitit: no run is lost,
and a run killed mid-epoch and resumed ends with the same test metrics as one never interrupted (CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra.core.plugins import Plugins
from hydra.types import HydraContext

import train as train_script
from stellarlab.errors import ConfigError
from stellarlab.run.resume import LOCK_FILE, resume_argv
from tests.conftest import CONF_DIR, ROOT, TINY, compose_config

STEPS_PER_EPOCH = 14  # 420 training spectra in batches of 32
# The tiny survey, 4 epochs, no figures or bootstrap (not what is tested here, and they take seconds).
RUN = [*TINY, "trainer.max_epochs=4", "~callbacks.figures", "bootstrap.n_resamples=0"]


class Pace(pl.Callback):
    """Test helper, loaded into a training subprocess with `+callbacks.pace._target_=tests.test_resume.Pace`:
    writes `<pid> <epoch> <batch>` to `marker` after every training batch and, the first time it reaches
    `hold` ("epoch:batch"), waits there (up to a minute, or until Lightning has seen a SIGTERM) so a test
    can signal the run at a known point without racing it; the resumed run (same overrides) goes on.
    It draws no random numbers, so it changes no result."""

    def __init__(self, marker: str, hold: str | None = None):
        self.marker = Path(marker)
        self.hold = tuple(int(x) for x in hold.split(":")) if hold else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        tmp = self.marker.with_name(self.marker.name + ".tmp")
        tmp.write_text(f"{os.getpid()} {trainer.current_epoch} {batch_idx}\n")
        os.replace(tmp, self.marker)
        held = self.marker.with_name(self.marker.name + ".held")
        if (trainer.current_epoch, batch_idx) == self.hold and not held.exists():
            held.touch()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not trainer.received_sigterm:
                time.sleep(0.01)


def start(log_dir: Path, cache: Path, marker: Path, *extra: str, hold: str | None = None, flags=()) -> subprocess.Popen:
    """`python train.py` on the tiny survey with a Pace callback, in the background."""
    pace = [f"+callbacks.pace._target_={Pace.__module__}.Pace", f"+callbacks.pace.marker={marker}"]
    if hold:
        pace.append(f"+callbacks.pace.hold='{hold}'")
    cmd = [sys.executable, "train.py", *flags, *RUN, f"paths.log_dir={log_dir}", f"paths.cache_dir={cache}", *pace, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_batch(proc: subprocess.Popen, marker: Path, epoch: int, batch: int, timeout: float = 240) -> int:
    """Block until the run holds at (epoch, batch); returns the pid of the process that reported it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before epoch {epoch}: {proc.stderr.read()[-3000:]}")
        try:
            pid, e, b = (int(x) for x in marker.read_text().split())
        except (OSError, ValueError):
            pid, e, b = 0, -1, -1
        if (e, b) == (epoch, batch):
            return pid
        time.sleep(0.01)
    raise AssertionError(f"no epoch {epoch} batch {batch} within {timeout} s")


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def resume(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def only_run(log_dir: Path) -> Path:
    (run_dir,) = (log_dir / "train" / "runs").iterdir()
    return run_dir


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.fixture
def cache(warm_cache) -> Path:
    return warm_cache


# -- SIGKILL mid-epoch, then resume=last ---------------------------------------------------------------
@pytest.mark.slow
def test_killed_mid_epoch_and_resumed_ends_exactly_like_an_uninterrupted_run(tmp_path, cache):
    reference = start(tmp_path / "ref", cache, tmp_path / "ref.marker")
    killed = start(tmp_path / "out", cache, tmp_path / "marker", hold="2:5")
    wait_for_batch(killed, tmp_path / "marker", epoch=2, batch=5)  # epoch 1's last.ckpt exists, epoch 2 is half done
    killed.send_signal(signal.SIGKILL)
    assert finish(killed)[0] == -signal.SIGKILL
    run_dir = only_run(tmp_path / "out")
    assert not (run_dir / "metrics.json").exists()
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)  # loads, no trust issue
    assert (ckpt["epoch"], ckpt["global_step"]) == (1, 2 * STEPS_PER_EPOCH)

    resumed = resume("resume=last", f"paths.log_dir={tmp_path / 'out'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    code, err = finish(reference)
    assert code == 0, err[-3000:]

    assert only_run(tmp_path / "out") == run_dir  # the same folder, no new one
    ref_dir = only_run(tmp_path / "ref")
    got, want = metrics(run_dir), metrics(ref_dir)
    assert got["status"] == "ok" and got["run_dir"] == str(run_dir)
    assert got["resumed_from"]["global_step"] == 2 * STEPS_PER_EPOCH
    assert got["test"] == want["test"]  # bit for bit: RNG states came back with the checkpoint
    assert (got["best_val_loss"], got["epochs"]) == (want["best_val_loss"], want["epochs"])
    assert (run_dir / "test_predictions.csv").read_bytes() == (ref_dir / "test_predictions.csv").read_bytes()
    # TensorBoard: one event folder whose curves continue: one val/loss point per epoch, same as uninterrupted
    assert scalars(run_dir, "val/loss") == scalars(ref_dir, "val/loss")
    steps = [s for s, _ in scalars(run_dir, "train/loss_step")]
    assert steps == sorted(set(steps)) == [s for s, _ in scalars(ref_dir, "train/loss_step")]
    log = (run_dir / "train.log").read_text()
    assert f"resuming from {run_dir / 'checkpoints' / 'last.ckpt'} (epoch 1, step 28)" in log
    assert not (run_dir / LOCK_FILE).exists()


# -- SIGTERM / Ctrl-C: checkpoint, exit code, resume --------------------------------------------------
def interrupt(sig: int, tmp_path: Path, cache: Path) -> tuple[Path, dict]:
    """Send `sig` to a run held at epoch 1, batch 5; the run folder and its last.ckpt."""
    proc = start(tmp_path / "out", cache, tmp_path / "marker", hold="1:5")
    wait_for_batch(proc, tmp_path / "marker", epoch=1, batch=5)
    proc.send_signal(sig)
    returncode, err = finish(proc)
    assert returncode == 128 + sig, err[-3000:]
    run_dir = only_run(tmp_path / "out")
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert (ckpt["epoch"], ckpt["global_step"]) == (1, STEPS_PER_EPOCH + 6)  # mid-epoch, right after that batch
    assert {"state_dict", "optimizer_states", "loops", "callbacks"} <= set(ckpt)
    assert f"Resume with: python train.py resume={run_dir}" in (run_dir / "train.log").read_text()
    assert not (run_dir / "metrics.json").exists()
    return run_dir, ckpt


@pytest.mark.slow
def test_sigterm_saves_last_ckpt_mid_epoch_exits_143_and_the_run_resumes(tmp_path, cache):
    run_dir, ckpt = interrupt(signal.SIGTERM, tmp_path, cache)
    resumed = resume(f"resume={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = metrics(run_dir)
    assert summary["status"] == "ok" and summary["epochs"] == 4
    assert summary["resumed_from"]["global_step"] == ckpt["global_step"]
    val_steps = [s for s, _ in scalars(run_dir, "val/loss")]
    assert len(val_steps) == 4 and val_steps == sorted(val_steps)


@pytest.mark.slow
def test_ctrl_c_saves_last_ckpt_mid_epoch_exits_130_and_train_resumes_it_through_the_api(tmp_path, cache):
    import train as train_script

    run_dir, ckpt = interrupt(signal.SIGINT, tmp_path, cache)
    overrides = [*RUN, f"+callbacks.pace._target_={Pace.__module__}.Pace", f"+callbacks.pace.marker={tmp_path / 'marker'}",
                 f"resume={run_dir}"]
    cfg = compose_config(overrides, tmp_path=tmp_path / "api", cache_dir=cache)
    train_script.main(cfg)  # train(cfg) with resume= set runs in that folder
    summary = metrics(run_dir)
    assert summary["status"] == "ok" and summary["epochs"] == 4
    assert summary["resumed_from"]["global_step"] == ckpt["global_step"]


# -- a preempted job of a submitit sweep: saved, requeued, resumed in its folder ----------------------------
@pytest.mark.slow
def test_preempted_sweep_job_saves_is_requeued_and_resumes_in_its_own_folder(tmp_path, cache):
    """launcher=local runs the code path of launcher=slurm: submitit's USR2 handler requeues the job."""
    proc = start(tmp_path / "out", cache, tmp_path / "marker", hold="1:5", flags=["-m", "launcher=local"])
    pid = wait_for_batch(proc, tmp_path / "marker", epoch=1, batch=5)
    os.kill(pid, signal.SIGUSR2)  # what Slurm sends (--signal=USR2@120) before the time limit or on preemption
    returncode, err = finish(proc)
    assert returncode == 0, err[-3000:]
    (sweep,) = (tmp_path / "out" / "train" / "multiruns").iterdir()
    summary = json.loads((sweep / "summary.json").read_text())
    assert (summary["n_jobs"], summary["n_ok"]) == (1, 1)
    job = metrics(sweep / "0")
    assert job["status"] == "ok" and job["epochs"] == 4
    assert job["resumed_from"]["global_step"] == STEPS_PER_EPOCH + 6
    log = (sweep / "0" / "train.log").read_text()
    assert "stopped by SIGUSR2 at epoch 1" in log and "Requeued job" in log and "resuming from" in log


# -- the Slurm launcher's batch script ---------------------------------------------------------------
class _Submitted(Exception):
    pass


def test_slurm_jobs_get_the_requeue_signal_and_are_requeued(tmp_path, monkeypatch):
    import submitit.slurm.slurm

    import train as train_script

    cfg = compose_config(["launcher=slurm", "hydra.job.name=train"], tmp_path=tmp_path)
    launcher = Plugins.instance().instantiate_launcher(
        hydra_context=HydraContext(config_loader=None, callbacks=None), task_function=train_script.main, config=cfg
    )
    seen = {}

    def fake_sbatch(self, command):  # what `sbatch` would receive; no cluster here
        seen["script"] = self._make_submission_file_text(command, "uid")
        seen["max_num_timeout"] = self.max_num_timeout
        raise _Submitted

    monkeypatch.setattr(submitit.slurm.slurm.SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    monkeypatch.setattr(submitit.slurm.slurm.SlurmExecutor, "_submit_command", fake_sbatch)
    with pytest.raises(_Submitted):
        launcher.launch([["model=linear"]], initial_job_idx=0)
    assert "#SBATCH --signal=USR2@120" in seen["script"]
    assert "#SBATCH --requeue" in seen["script"]
    assert seen["max_num_timeout"] == int(cfg.hydra.launcher.max_num_timeout) >= 10


# -- resume= on the command line -------------------------------------------------------------------------
def fake_run(runs: Path, name: str, overrides=("model=linear",), ckpt=True, status=None) -> Path:
    run_dir = runs / name
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if ckpt:
        (run_dir / "checkpoints").mkdir()
        (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"x")
    if status:
        (run_dir / "metrics.json").write_text(json.dumps({"status": status}))
    return run_dir


def test_resume_last_picks_the_newest_unfinished_run_and_replays_its_overrides(tmp_path):
    runs = tmp_path / "train" / "runs"
    fake_run(runs, "2026-01-01_10-00-00_aaaaaa", ["model=cnn"])
    wanted = fake_run(runs, "2026-01-02_10-00-00_bbbbbb", ["model=linear", "seed=3"])
    fake_run(runs, "2026-01-03_10-00-00_cccccc", status="ok")  # finished
    fake_run(runs, "2026-01-04_10-00-00_dddddd", ckpt=False)  # killed before its first epoch ended
    argv = resume_argv(["resume=last", f"paths.log_dir={tmp_path}", "trainer.accelerator=cpu"], CONF_DIR)
    assert argv == ["model=linear", "seed=3", f"paths.log_dir={tmp_path}", "trainer.accelerator=cpu", f"hydra.run.dir='{wanted}'"]
    # the rewritten command line composes, and runs in the old folder
    cfg = compose_config(argv[:-1])
    assert cfg.model._target_.endswith("LinearRegressor") and cfg.seed == 3
    assert resume_argv(["model=mlp", "seed=1"], CONF_DIR) == ["model=mlp", "seed=1"]  # no resume: untouched


@pytest.mark.slow
def test_resume_refuses_what_cannot_be_resumed_and_says_why(tmp_path):
    runs = tmp_path / "train" / "runs"
    with pytest.raises(ConfigError, match=r"resume=last: .*train/runs does not exist"):
        resume_argv(["resume=last", f"paths.log_dir={tmp_path}"], CONF_DIR)
    fake_run(runs, "2026-01-03_10-00-00_cccccc", status="ok")
    fake_run(runs, "2026-01-04_10-00-00_dddddd", ckpt=False)
    with pytest.raises(ConfigError, match=r"none of the 2 run folders under .* \(1 finished, 1 without checkpoints/last.ckpt, 0 still"):
        resume_argv(["resume=last", f"paths.log_dir={tmp_path}"], CONF_DIR)
    with pytest.raises(ConfigError, match="already finished"):
        resume_argv([f"resume={runs / '2026-01-03_10-00-00_cccccc'}"], CONF_DIR)
    with pytest.raises(ConfigError, match="nothing to continue"):
        resume_argv([f"resume={runs / '2026-01-04_10-00-00_dddddd'}"], CONF_DIR)
    with pytest.raises(ConfigError, match="no such run folder"):
        resume_argv([f"resume={tmp_path / 'nope'}"], CONF_DIR)
    run_dir = fake_run(runs, "2026-01-05_10-00-00_eeeeee", ["model=linear", "seed=3"])
    with pytest.raises(ConfigError, match=r"model=cnn seed=4 would change what it computes"):
        resume_argv([f"resume={run_dir}", "model=cnn", "seed=4", "trainer.max_epochs=50"], CONF_DIR)
    with pytest.raises(ConfigError, match="not a multirun"):
        resume_argv(["-m", f"resume={run_dir}"], CONF_DIR)
    # a live process training the folder: refused, and resume=last passes over it
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        (run_dir / LOCK_FILE).write_text(json.dumps({"pid": other.pid, "host": socket.gethostname()}))
        with pytest.raises(ConfigError, match=f"being trained right now by process {other.pid}"):
            resume_argv([f"resume={run_dir}"], CONF_DIR)
        with pytest.raises(ConfigError, match="1 still running"):
            resume_argv(["resume=last", f"paths.log_dir={tmp_path}"], CONF_DIR)
    finally:
        other.kill()
        other.wait()
    assert resume_argv([f"resume={run_dir}"], CONF_DIR)[-1] == f"hydra.run.dir='{run_dir}'"  # its process is gone
    (run_dir / LOCK_FILE).write_text('{"pid": "abc", "host": "x"}')  # a lock file that is not ours to read
    assert resume_argv([f"resume={run_dir}"], CONF_DIR)[-1] == f"hydra.run.dir='{run_dir}'"
    (run_dir / LOCK_FILE).write_text("[1, 2]")
    assert resume_argv([f"resume={run_dir}"], CONF_DIR)[-1] == f"hydra.run.dir='{run_dir}'"
    # resume= with no value is a mistake, not "start a new run"; resume=null is how to say that
    with pytest.raises(ConfigError, match=r"resume= is empty; give resume=last .*resume=<run folder>"):
        resume_argv(["resume=", f"paths.log_dir={tmp_path}"], CONF_DIR)
    with pytest.raises(ConfigError, match=r"resume= is empty"):
        train_script.train(compose_config(["resume=''"], tmp_path=tmp_path / "api"))
    assert resume_argv(["resume=null", "seed=1"], CONF_DIR) == ["resume=null", "seed=1"]


@pytest.mark.slow
def test_resume_error_on_the_command_line_is_one_line_and_exit_2(tmp_path):
    proc = resume("resume=last", f"paths.log_dir={tmp_path}", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: resume=last: {tmp_path / 'train' / 'runs'} does not exist, so there is no run to resume; pass resume=<run folder>"
    ]


# -- what the checkpoint carries ---------------------------------------------------------------------------
def test_rng_states_survive_a_weights_only_checkpoint_round_trip(tmp_path):
    import random

    import numpy as np

    from stellarlab.run.callbacks import ExactResume

    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    callback = ExactResume()
    torch.save({"callbacks": {"ExactResume": callback.state_dict()}}, tmp_path / "c.ckpt")
    first = (torch.rand(3), np.random.rand(3), random.random())
    callback.load_state_dict(torch.load(tmp_path / "c.ckpt", weights_only=True)["callbacks"]["ExactResume"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_an_early_stop_decided_before_the_checkpoint_stays_decided():
    from pytorch_lightning.callbacks import EarlyStopping

    from stellarlab.run.callbacks import ExactResume

    stopper = EarlyStopping(monitor="val/loss", patience=3)
    stopper.load_state_dict({"wait_count": 3, "stopped_epoch": 7, "best_score": torch.tensor(0.1), "patience": 3})
    trainer = pl.Trainer(callbacks=[stopper], logger=False, enable_checkpointing=False, enable_progress_bar=False)
    fresh, resumed = ExactResume(), ExactResume()
    fresh.on_train_start(trainer, None)
    assert not trainer.should_stop  # a fresh run is left alone
    resumed.load_state_dict({})
    resumed.on_train_start(trainer, None)
    assert trainer.should_stop
    trainer.should_stop = False
    stopper.load_state_dict({"wait_count": 0, "stopped_epoch": 0, "best_score": torch.tensor(0.1), "patience": 0})
    resumed.on_train_start(trainer, None)  # patience 0, last epoch improved: go on
    assert not trainer.should_stop


# -- last.ckpt is the end of the last epoch, not of the last best one --------------------------------
@pytest.mark.slow
def test_last_ckpt_is_written_at_the_end_of_every_epoch_even_without_a_new_best(tiny_cfg):
    import train as train_script

    # mode=max on a falling val/loss: the first epoch stays the "best", every later epoch is not
    cfg = tiny_cfg(*RUN[len(TINY):], "trainer.max_epochs=3", "callbacks.model_checkpoint.mode=max",
                   "~callbacks.early_stopping", "test=false")
    train_script.train(cfg)
    folder = Path(cfg.paths.output_dir) / "checkpoints"
    assert [p.name for p in folder.glob("best-*.ckpt")] == ["best-epoch000.ckpt"]
    last = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 2 and last["global_step"] == 3 * STEPS_PER_EPOCH


# -- stopped after training: the test, the bound, the reports --------------------------------------------
class StopIn(pl.Callback):
    """Test helper: sends this process the signal `sig` when `hook` runs (e.g. on_test_start), once per marker."""

    def __init__(self, hook: str, sig: str, marker: str):
        self.signum = getattr(signal, sig)
        self.marker = Path(marker)
        setattr(self, hook, self._fire)

    def _fire(self, *args, **kwargs) -> None:
        if not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), self.signum)
            time.sleep(5)  # the handler raises before this ends


def stop_in(hook: str, sig: str, marker: Path) -> list[str]:
    """train.py overrides that add `StopIn`: the run signals itself with `sig` when `hook` first runs."""
    return [f"+callbacks.stop._target_={StopIn.__module__}.StopIn", f"+callbacks.stop.hook={hook}",
            f"+callbacks.stop.sig={sig}", f"+callbacks.stop.marker={marker}"]



@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGKILL"])
def test_stopped_during_the_test_resumes_straight_to_the_test(tmp_path, cache, sig):
    """Killed after the last epoch: the resumed run trains nothing and finishes the test, bound and reports."""
    stopper = stop_in("on_test_start", sig, tmp_path / "stopped")
    first = resume(*RUN, "trainer.max_epochs=2", f"paths.log_dir={tmp_path}", f"paths.cache_dir={cache}", *stopper)
    expected = {"SIGTERM": 143, "SIGINT": 130, "SIGKILL": -9}[sig]
    assert first.returncode == expected, first.stderr[-3000:]
    run_dir = only_run(tmp_path)
    assert not (run_dir / "metrics.json").exists()
    if sig != "SIGKILL":
        assert "Traceback" not in first.stderr
        assert first.stderr.strip().splitlines()[-1] == f"interrupted: stopped by {sig}; resume with: python train.py resume={run_dir}"
        assert not (run_dir / LOCK_FILE).exists()

    resumed = resume("resume=last", f"paths.log_dir={tmp_path}", f"paths.cache_dir={cache}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = metrics(run_dir)
    assert summary["status"] == "ok" and summary["epochs"] == 2 and summary["test"]["teff"]["n"] > 0
    assert summary["resumed_from"]["global_step"] == 2 * STEPS_PER_EPOCH
    assert summary["best_value"] == pytest.approx(summary["best_val_loss"])
    assert "training was already complete" in (run_dir / "train.log").read_text()


@pytest.mark.slow
def test_a_signal_after_the_last_batch_stops_the_run_and_the_resumed_emulator_calibrates_as_an_uninterrupted_one(tmp_path, cache):
    """SIGTERM after the last training batch (the last validation) has no batch left to stop after: the run
    stops at the end of training (exit 143), before the emulator calibrates its errors, and the resumed run,
    with no epoch to train, calibrates them: its test ends as the uninterrupted run's does."""
    emulator = ["model=emulator", "trainer.max_epochs=2", "model.hidden_sizes=[32,32]", "model.fit_templates=32",
                f"paths.cache_dir={cache}"]
    stopper = stop_in("on_train_end", "SIGTERM", tmp_path / "stopped")
    whole = resume(*RUN, *emulator, f"paths.log_dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = resume(*RUN, *emulator, f"paths.log_dir={tmp_path / 'cut'}", *stopper)
    assert first.returncode == 143, first.stderr[-3000:]
    run_dir = only_run(tmp_path / "cut")
    assert first.stderr.strip().splitlines()[-1] == f"interrupted: stopped by SIGTERM; resume with: python train.py resume={run_dir}"
    assert not (run_dir / "metrics.json").exists() and "errors calibrated" not in (run_dir / "train.log").read_text()

    resumed = resume(f"resume={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (run_dir / "train.log").read_text()
    assert log.index("errors calibrated") > log.index("resuming from")
    got, expected = metrics(run_dir), metrics(only_run(tmp_path / "whole"))
    for label, values in expected["test"].items():
        assert got["test"][label]["rmse"] == pytest.approx(values["rmse"], rel=1e-6)
        assert got["calibration"][label]["frac_within_1sigma"] == expected["calibration"][label]["frac_within_1sigma"]
        assert got["calibration"][label]["mean_sigma"] == pytest.approx(expected["calibration"][label]["mean_sigma"], rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["cannon", "ridge"])
def test_a_one_pass_fit_stopped_mid_epoch_saves_nothing_to_resume_from(tmp_path, cache, model):
    """Ridge, knn and the Cannon keep their epoch's rows in memory and fit at its end. A checkpoint in the middle
    of that epoch would resume into a fit of the later batches alone, on fewer stars than the run was given:
    none is written, and the message says to start again."""
    stopper = stop_in("on_train_batch_end", "SIGTERM", tmp_path / "stopped")
    first = resume(*RUN, f"model={model}", f"paths.log_dir={tmp_path}", f"paths.cache_dir={cache}", *stopper)
    assert first.returncode == 143, first.stderr[-3000:]
    assert first.stderr.strip().splitlines()[-1] == "interrupted: stopped by SIGTERM"
    run_dir = only_run(tmp_path)
    assert not (run_dir / "checkpoints" / "last.ckpt").exists()
    assert "before a first epoch ended: nothing to resume; start the run again" in (run_dir / "train.log").read_text()


@pytest.mark.slow
def test_a_cannon_stopped_during_the_test_resumes_without_fitting_again(tmp_path, cache):
    """The Cannon is fitted in its one epoch, whatever trainer.max_epochs says. Resumed after it, it must not fit
    again (another epoch's batch order picks other spectra for its scatter and error patterns): it tests the
    model it had, and its report is the uninterrupted run's."""
    cannon = ["model=cannon", "model.error_components=4", f"paths.cache_dir={cache}"]
    stopper = stop_in("on_test_start", "SIGTERM", tmp_path / "stopped")
    whole = resume(*RUN, *cannon, f"paths.log_dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = resume(*RUN, *cannon, f"paths.log_dir={tmp_path / 'cut'}", *stopper)
    assert first.returncode == 143, first.stderr[-3000:]
    run_dir = only_run(tmp_path / "cut")
    fitted = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]

    resumed = resume(f"resume={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    kept = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    for name in ("net.theta", "scatter2", "net.error_patterns", "net.error_variance"):
        assert torch.equal(kept[name], fitted[name]), name
    got, expected = metrics(run_dir), metrics(only_run(tmp_path / "whole"))
    assert got["epochs"] == expected["epochs"] == 1
    for label, values in expected["test"].items():
        assert got["test"][label]["rmse"] == pytest.approx(values["rmse"], rel=1e-6)
        assert got["calibration"][label]["mean_sigma"] == pytest.approx(expected["calibration"][label]["mean_sigma"], rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_survey_is_generated_is_one_line_and_leaves_nothing_behind(tmp_path, sig):
    cmd = [sys.executable, "train.py", *TINY, "data.n_stars=6000", f"paths.log_dir={tmp_path / 'out'}",
           f"paths.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    logs: list[Path] = []
    while time.monotonic() < deadline and not (logs and "run folder:" in logs[0].read_text()):
        time.sleep(0.1)  # once the run has logged its folder, the survey is being generated
        logs = list((tmp_path / "out").rglob("train.log"))
    time.sleep(1)
    proc.send_signal(sig)
    code, err = finish(proc)
    assert code == 128 + sig, err[-3000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"interrupted: stopped by {signal.Signals(sig).name}")
    run_dir = only_run(tmp_path / "out")
    assert not (run_dir / LOCK_FILE).exists() and not (run_dir / "metrics.json").exists()
    assert not list((tmp_path / "cache").rglob("params.json"))  # no survey half-made under a final name
