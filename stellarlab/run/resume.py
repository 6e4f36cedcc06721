"""Resuming a run in its own folder: `python train.py resume=last` or `resume=<run folder>`.

Hydra picks a run folder before `train.py`'s code runs, so `resume=` is resolved first, on the
command line (`resume_argv`): it becomes the old run's own overrides (`.hydra/overrides.yaml`) plus
`hydra.run.dir=<that folder>`. The resumed run then writes where the first one did (checkpoints,
TensorBoard event folder, metrics.json, train.log appended) with the same config, and `train.py`
continues from `<run folder>/checkpoints/last.ckpt`, which it finds there by itself
(`resume_point`). A requeued Slurm job lands in the same folder the same way. While a run trains,
`<run folder>/.running` names its process, so `resume=` never picks a run that is still alive.

No torch import here: `python train.py --help` and config errors stay fast.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path

from stellarlab.errors import ConfigError
from stellarlab.files import pid_alive
from stellarlab.results.summary import read_summary

log = logging.getLogger("stellarlab.run.resume")

LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"
LOCK_FILE = ".running"
EMPTY_RESUME = "resume= is empty; give resume=last (the newest unfinished run), resume=<run folder>, or leave it out to start a new run"
# What a resumed run may change: where and how fast it runs, never what it computes (model, data, seeds, ...).
RESUME_MAY_CHANGE = (
    "trainer.accelerator",
    "trainer.devices",
    "trainer.max_epochs",
    "data.num_workers",
    "data.pin_memory",
    "data.device_resident",
    "data.device_resident_max_gb",
    "callbacks.progress_bar",
    "paths.*",
    "hydra.*",
)


# -- small facts about a run folder ------------------------------------------------------------


def run_status(run_dir: Path) -> str | None:
    """`status` of the run's metrics.json (ok, failed), or None while it has none (running, killed, stopped)."""
    return (read_summary(run_dir) or {}).get("status")


def running_process(run_dir: Path) -> int | None:
    """The pid of a live process on this machine that holds the run's lock file, else None."""
    try:
        info = json.loads((run_dir / LOCK_FILE).read_text())
        pid = int(info.get("pid", 0))
    except (OSError, ValueError, TypeError, AttributeError):  # unreadable or foreign: no live owner to respect
        return None
    if info.get("host") != socket.gethostname() or pid == os.getpid() or pid <= 0:
        return None  # another machine's process cannot be checked; our own is not a rival
    return pid if pid_alive(pid) else None


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """Mark the folder as being trained by this process, so `resume=` refuses it until this process is gone.

    A killed process leaves the file behind; it is ignored once its pid is dead.
    """
    from stellarlab.files import write_json_atomic

    path = Path(run_dir) / LOCK_FILE
    if os.environ.get("LOCAL_RANK", "0") != "0":  # DDP workers share rank 0's folder and lock
        yield
        return
    write_json_atomic(path, {"pid": os.getpid(), "host": socket.gethostname()})
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()


def checkpoint_to_resume(run_dir: str | Path) -> Path | None:
    """`<run folder>/checkpoints/last.ckpt` if it exists: the run was interrupted and is continued here."""
    path = Path(run_dir) / LAST_CHECKPOINT
    return path if path.is_file() else None


# -- finding the run ---------------------------------------------------------------------------------
def check_resumable(run_dir: Path, asked: str) -> None:
    """ConfigError unless `run_dir` holds an unfinished run with a checkpoint and nobody is training it."""
    if not run_dir.is_dir():
        raise ConfigError(f"resume={asked}: no such run folder {run_dir}")
    if not (run_dir / LAST_CHECKPOINT).is_file():
        raise ConfigError(
            f"resume={asked}: {run_dir / LAST_CHECKPOINT} does not exist, so there is nothing to continue "
            "(the run stopped before its first epoch ended, or ran with callbacks=none); start a new run"
        )
    if run_status(run_dir) == "ok":
        raise ConfigError(f"resume={asked}: {run_dir} already finished (metrics.json says status ok); nothing to resume")
    pid = running_process(run_dir)
    if pid is not None:
        raise ConfigError(
            f"resume={asked}: {run_dir} is being trained right now by process {pid}; stop it first "
            f"(`kill -TERM {pid}` saves a checkpoint), or delete {run_dir / LOCK_FILE} if that process is not this run"
        )


def find_last_run(runs_dir: Path) -> Path:
    """The newest run folder under `runs_dir` (run ids sort by start time) that can be resumed."""
    if not runs_dir.is_dir():
        raise ConfigError(f"resume=last: {runs_dir} does not exist, so there is no run to resume; pass resume=<run folder>")
    folders = sorted((d for d in runs_dir.iterdir() if d.is_dir()), key=lambda d: d.name, reverse=True)
    finished, no_checkpoint, running = 0, 0, 0
    for run_dir in folders:
        if run_status(run_dir) == "ok":
            finished += 1
        elif not (run_dir / LAST_CHECKPOINT).is_file():
            no_checkpoint += 1
        elif running_process(run_dir) is not None:
            running += 1
        else:
            log.info("resume=last: the newest unfinished run under %s is %s", runs_dir, run_dir.name)
            return run_dir
    raise ConfigError(
        f"resume=last: none of the {len(folders)} run folders under {runs_dir} can be resumed ({finished} finished, "
        f"{no_checkpoint} without {LAST_CHECKPOINT}, {running} still running); pass resume=<run folder> or start a new run"
    )


def runs_dir_of(overrides: Sequence[str], conf_dir: str | Path) -> Path:
    """`${paths.log_dir}/${task_name}/runs` of the config these overrides compose (an experiment may set task_name)."""
    from hydra import compose, initialize_config_dir

    import stellarlab.config  # noqa: F401  (the run_id and cwd resolvers)

    task_overrides = [o for o in overrides if not override_key(o).startswith("hydra")]
    try:
        with initialize_config_dir(config_dir=str(Path(conf_dir).resolve()), version_base="1.3"):
            cfg = compose(config_name="train", overrides=task_overrides)
            return Path(str(cfg.paths.log_dir)) / str(cfg.task_name) / "runs"
    except ConfigError:
        raise
    except Exception as err:  # a bad override: say so here, Hydra would say the same a moment later
        raise ConfigError(f"resume=last: cannot compose the config to find the runs folder: {err}") from err


# -- the command line --------------------------------------------------------------------------------
def override_key(override: str) -> str:
    """`model` for `model=cnn`, `callbacks.x` for `+callbacks.x=..` / `~callbacks.x`."""
    return override.split("=", 1)[0].lstrip("+~")


def _hydra_quoted(path: Path) -> str:
    text = str(path).replace("\\", "\\\\").replace("'", "\\'").replace("${", "\\${")
    return f"'{text}'"


def _may_change(key: str) -> bool:
    return any(key == k or (k.endswith(".*") and key.startswith(k[:-1])) for k in RESUME_MAY_CHANGE)


def merge_overrides(saved: Sequence[str], given: Sequence[str], run_dir: Path) -> list[str]:
    """The run's own overrides, then those given now that only change where/how it runs; anything else is refused."""
    merged = list(saved)
    conflicts = []
    for override in given:
        key = override_key(override)
        if override in saved:
            continue
        if not _may_change(key):
            conflicts.append(override)
            continue
        merged = [o for o in merged if override_key(o) != key] + [override]
    if conflicts:
        raise ConfigError(
            f"resume continues {run_dir} with its own config (overrides: {' '.join(saved) or 'none'}); "
            f"{' '.join(conflicts)} would change what it computes. With resume you may change only "
            f"{', '.join(RESUME_MAY_CHANGE)}; for another config start a new run"
        )
    return merged


def resume_argv(argv: Sequence[str], conf_dir: str | Path) -> list[str]:
    """Turn `resume=last|<folder>` on train.py's command line into the run's overrides + `hydra.run.dir=<folder>`.

    Anything else is returned unchanged, as is a command line that already names `hydra.run.dir`
    (Lightning's DDP workers re-run the rewritten one). Raises ConfigError with what to do instead.
    """
    argv = list(argv)
    overrides = [a for a in argv if not a.startswith("-") and ("=" in a or a.startswith("~"))]
    asked = [a.split("=", 1)[1].strip().strip("'\"") for a in overrides if override_key(a) == "resume" and "=" in a]
    if not asked or asked[-1].lower() in ("null", "none") or any(override_key(a) == "hydra.run.dir" for a in overrides):
        return argv
    if not asked[-1]:
        raise ConfigError(EMPTY_RESUME)
    if "-m" in argv or "--multirun" in argv:
        raise ConfigError(
            "resume= continues one run, not a multirun; resume a job of a sweep with resume=<its folder> "
            "(jobs of launcher=slurm are requeued and resume by themselves)"
        )
    value = asked[-1]
    given = [a for a in overrides if override_key(a) != "resume"]
    run_dir = find_last_run(runs_dir_of(given, conf_dir)) if value == "last" else Path(value).expanduser().resolve()
    check_resumable(run_dir, value)
    saved_file = run_dir / ".hydra" / "overrides.yaml"
    if not saved_file.is_file():
        raise ConfigError(f"resume={value}: {saved_file} is missing, so the run's config is unknown; start a new run")
    import yaml

    saved = [str(o) for o in (yaml.safe_load(saved_file.read_text()) or []) if override_key(str(o)) != "resume"]
    merged = merge_overrides(saved, given, run_dir)
    flags = [a for a in argv if a not in overrides]
    log.info("resuming %s with overrides %s", run_dir, merged)
    return [*flags, *merged, f"hydra.run.dir={_hydra_quoted(run_dir)}"]


def use_resume_folder(cfg) -> None:
    """`train(cfg)` called with `resume` set (the API; the command line resolves it before Hydra): run in that folder."""
    from omegaconf import open_dict

    value = cfg.get("resume")
    if value is None or str(value).lower() in ("null", "none"):
        return
    if not str(value).strip():
        raise ConfigError(EMPTY_RESUME)
    value = str(value)
    if value == "last":
        run_dir = find_last_run(Path(str(cfg.paths.log_dir)) / str(cfg.task_name) / "runs")
    else:
        run_dir = Path(value).expanduser().resolve()
    check_resumable(run_dir, value)
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)


def resume_point(run_dir: str | Path) -> dict | None:
    """{checkpoint, epoch, global_step} of `<run folder>/checkpoints/last.ckpt`, or None for a fresh run."""
    path = checkpoint_to_resume(run_dir)
    if path is None:
        return None
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        point = {"checkpoint": str(path), "epoch": int(state["epoch"]), "global_step": int(state["global_step"])}
    except Exception as err:  # checkpoints are written atomically, so this is not a half-written one
        raise ConfigError(f"cannot resume from {path}: {err}; move it away to start this run over") from err
    log.info("resuming from %s (epoch %d, step %d)", path, point["epoch"], point["global_step"])
    return point


def tensorboard_continuing(logger_cfg, resumed_from: dict | None):
    """The logger group, with TensorBoard's `purge_step` at the checkpoint's step when resuming: what a killed
    process logged after its checkpoint (a replayed part of an epoch) is hidden, so curves continue once."""
    from omegaconf import OmegaConf, open_dict

    if not logger_cfg or resumed_from is None:
        return logger_cfg
    logger_cfg = OmegaConf.create(OmegaConf.to_container(logger_cfg, resolve=True))
    for node in logger_cfg.values():
        if node is not None and str(node.get("_target_", "")).endswith("TensorBoardLogger"):
            with open_dict(node):
                node.purge_step = int(resumed_from["global_step"])
    return logger_cfg


__all__ = [
    "checkpoint_to_resume",
    "find_last_run",
    "merge_overrides",
    "resume_argv",
    "resume_point",
    "run_lock",
    "tensorboard_continuing",
    "use_resume_folder",
]
