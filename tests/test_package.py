"""stellarlab as an installed package: the declared dependencies are the imported ones, the wheel carries the
configs, the console commands and the notebook API work from an empty folder outside the clone, and a
missing optional plugin is one error line naming the extra to install."""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
import sysconfig
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from stellarlab.errors import ConfigError
from tests.conftest import ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
#: distributions used through a config's _target_ or a Hydra plugin, never by an import statement
USED_BY_CONFIG = {"tensorboard", "hydra-optuna-sweeper", "optuna", "sqlalchemy", "hydra-submitit-launcher",
                  "mlflow-skinny", "wandb"}
TEST_ONLY = {"pytest", "hypothesis", "scikit-learn"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(extra: str | None = None) -> dict[str, Requirement]:
    reqs = PROJECT["dependencies"] if extra is None else PROJECT["optional-dependencies"][extra]
    return {_norm(r.name): r for r in map(Requirement, reqs)}


def imported_distributions() -> set[str]:
    """The distributions whose modules stellarlab/ imports (at any depth of a file)."""
    top = set()
    for path in (ROOT / "stellarlab").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                top |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                top.add(node.module.split(".")[0])
    owners = metadata.packages_distributions()
    return {_norm(d) for name in top - {"stellarlab"} - set(sys.stdlib_module_names) for d in owners.get(name, [name])}


def test_every_imported_distribution_is_declared_and_every_declared_one_is_used():
    everything = {**declared(), **{n: r for extra in PROJECT["optional-dependencies"] for n, r in declared(extra).items()}}
    imported = imported_distributions()
    assert not imported - set(everything), "imported but not declared"
    unused = set(declared()) - imported - USED_BY_CONFIG
    assert not unused, "declared but never imported"
    assert "torchmetrics" not in everything  # Lightning brings it; stellarlab never imports it


def test_the_installed_metadata_declares_httpx_and_lightning_2_6():
    requires = [Requirement(r) for r in metadata.requires("stellarlab")]
    lightning = next(r for r in requires if r.name == "pytorch-lightning")
    assert lightning.marker is None and "2.5.9" not in lightning.specifier and "2.6.0" in lightning.specifier
    httpx = next(r for r in requires if r.name == "httpx")
    assert httpx.marker is not None and httpx.marker.evaluate({"extra": "download"})
    assert not any(r.name == "torchmetrics" for r in requires)
    import stellarlab

    assert stellarlab.__version__ == metadata.version("stellarlab") == PROJECT["version"]


def test_the_package_list_names_every_package_folder_and_the_configs():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "stellarlab").rglob("__init__.py")}
    assert listed == folders | {"stellarlab.conf"}
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {"stellarlab.conf": "conf"}
    assert not list((ROOT / "conf").rglob("*.py"))  # configs only: nothing Hydra or setuptools would import


def test_every_console_command_points_at_a_callable():
    for name, target in PROJECT["scripts"].items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), name
    assert set(PROJECT["scripts"]) == {f"stellarlab-{c}" for c in ("train", "eval", "predict", "download", "compare")}


def test_the_all_extra_holds_every_other_extra():
    extras = set(PROJECT["optional-dependencies"]) - {"all", "test"}
    (req,) = map(Requirement, PROJECT["optional-dependencies"]["all"])
    assert req.name == "stellarlab" and set(req.extras) == extras


# -- a missing plugin ----------------------------------------------------------------------------------
class Blocker:
    """A meta path finder that hides some modules, as if their distributions were not installed."""

    def __init__(self, *names: str) -> None:
        self.names = names

    def find_spec(self, name, path=None, target=None):
        if any(name == n or name.startswith(n + ".") for n in self.names):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


@pytest.fixture
def hide(monkeypatch):
    def block(*names: str) -> None:
        for loaded in [m for m in sys.modules if any(m == n or m.startswith(n + ".") for n in names)]:
            monkeypatch.delitem(sys.modules, loaded)
        monkeypatch.setattr(sys, "meta_path", [Blocker(*names), *sys.meta_path])

    return block


@pytest.mark.parametrize(
    "argv, message",
    [
        (["hparams_search=optuna"], 'hparams_search=optuna needs the Optuna sweeper: pip install "stellarlab[sweep]"'),
        (["-m", "hparams_search=optuna_cnn", "model=cnn"],
         'hparams_search=optuna_cnn needs the Optuna sweeper: pip install "stellarlab[sweep]"'),
        (["-m", "launcher=slurm", "model=linear,mlp"], 'launcher=slurm needs the submitit launcher: pip install "stellarlab[slurm]"'),
        (["-m", "launcher=local"], 'launcher=local needs the submitit launcher: pip install "stellarlab[slurm]"'),
        (["-m", "hydra/sweeper=optuna"], 'hydra/sweeper=optuna needs the Optuna sweeper: pip install "stellarlab[sweep]"'),
    ],
)
def test_a_missing_plugin_is_one_line_naming_the_extra_before_hydra_starts(argv, message, hide, monkeypatch, capsys):
    from stellarlab.commands import train

    hide("hydra_plugins.hydra_optuna_sweeper", "hydra_plugins.hydra_submitit_launcher")
    monkeypatch.setattr(sys, "argv", ["stellarlab-train", *argv])
    monkeypatch.setattr(train, "main", lambda: pytest.fail("Hydra started"))
    with pytest.raises(SystemExit) as stopped:
        train.cli()
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {message}"]


def test_the_check_passes_when_the_plugins_are_there_and_ignores_other_options():
    from stellarlab.run.extras import check_command_line

    check_command_line(["hparams_search=optuna", "-m", "launcher=slurm", "experiment=quick", "model=cnn", "hparams_search=nope"])


def test_the_api_and_the_loggers_name_their_extra_too(hide):
    import stellarlab
    from stellarlab.run.extras import check_loggers

    hide("hydra_plugins.hydra_optuna_sweeper", "mlflow", "wandb")
    with pytest.raises(ConfigError, match=re.escape('hparams_search=optuna needs the Optuna sweeper: pip install "stellarlab[sweep]"')):
        stellarlab.train(["hparams_search=optuna"])
    with pytest.raises(ConfigError, match=re.escape('logger.mlflow (pytorch_lightning.loggers.MLFlowLogger) needs MLflow: pip install "stellarlab[mlflow]"')):
        check_loggers([("tensorboard", "pytorch_lightning.loggers.TensorBoardLogger"), ("mlflow", "pytorch_lightning.loggers.MLFlowLogger")])
    with pytest.raises(ConfigError, match=re.escape('pip install "stellarlab[wandb]"')):
        check_loggers([("wandb", "pytorch_lightning.loggers.WandbLogger")])


BLOCK_AND_RUN = """
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.startswith({blocked!r}):
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Blocker())
sys.argv = [{command!r}, *sys.argv[1:]]
from {module} import {func}
{func}()
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "blocked, module, func, argv, message",
    [
        ("hydra_plugins.hydra_optuna_sweeper", "stellarlab.commands.train", "cli", ["hparams_search=optuna"],
         'error: hparams_search=optuna needs the Optuna sweeper: pip install "stellarlab[sweep]"'),
        ("hydra_plugins.hydra_submitit_launcher", "stellarlab.commands.train", "cli", ["-m", "launcher=slurm", "model=linear,mlp"],
         'error: launcher=slurm needs the submitit launcher: pip install "stellarlab[slurm]"'),
        ("httpx", "stellarlab.download.command", "main", ["data=apogee"],
         'error: stellarlab-download needs httpx and huggingface_hub: pip install "stellarlab[download]"'),
    ],
)
def test_a_command_without_the_plugin_in_a_real_process(blocked, module, func, argv, message, tmp_path):
    code = BLOCK_AND_RUN.format(blocked=blocked, command="stellarlab", module=module, func=func)
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [message]
    assert not (tmp_path / "outputs").exists()


# -- the wheel ---------------------------------------------------------------------------------------------
API_SCRIPT = """
import os, sys
import numpy as np
import stellarlab
assert stellarlab.__file__.startswith(sys.prefix), stellarlab.__file__   # the wheel, not the clone
assert "torch" not in sys.modules and "hydra" not in sys.modules          # import stellarlab stays light
malloc_before = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
summary = stellarlab.train(["data.n_stars=200", "trainer.max_epochs=1", "trainer.accelerator=cpu",
                            "~callbacks.progress_bar", "bootstrap.n_resamples=20"])
assert summary["status"] == "ok", summary
assert {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")} == malloc_before  # the API leaves malloc alone
model = stellarlab.load(summary["best_checkpoint"])
labels = model.predict(np.ones((2, len(model.wavelength)), dtype=np.float32))
assert sorted(labels) == ["fe_h", "logg", "teff"] and labels["teff"].shape == (2,), labels
runs = stellarlab.load_runs("outputs")
assert len(runs) == 2 and set(runs["status"]) == {"ok"}, runs
print("api ok", stellarlab.__version__, len(runs))
"""


def _run(argv, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{argv}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    """A wheel built from a copy of the clone, installed into a fresh venv that borrows the dev venv's
    dependencies (torch & co., pip too: the venv gets none of its own) through a .pth line instead of
    downloading them."""
    tmp = tmp_path_factory.mktemp("wheel")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    src = tmp / "src"
    for name in files:
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((ROOT / name).read_bytes())
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", src], tmp)
    (wheel,) = (tmp / "dist").glob("stellarlab-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp)
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp).stdout.strip())
    (site / "dev_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", wheel], tmp)
    return {"wheel": wheel, "venv": venv, "python": python, "tmp": tmp}


@pytest.mark.slow
def test_the_wheel_carries_the_package_and_its_configs(wheel_venv):
    names = zipfile.ZipFile(wheel_venv["wheel"]).namelist()
    configs = sorted(p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*.yaml"))
    assert sorted(n[len("stellarlab/conf/"):] for n in names if n.startswith("stellarlab/conf/")) == configs
    assert "stellarlab/synthetic/linelists/" in "".join(names) and "stellarlab/commands/api.py" in names
    assert not [n for n in names if n.startswith(("tests/", "conf/", "benchmarks/"))]
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel_venv["wheel"]).read(entry_points).decode()
    assert "stellarlab-train = stellarlab.commands.train:cli" in text


@pytest.mark.slow
def test_the_installed_wheel_trains_from_an_empty_folder_and_serves_the_api(wheel_venv, tmp_path):
    bin_dir, python = wheel_venv["venv"] / "bin", wheel_venv["python"]
    run = _run([bin_dir / "stellarlab-train", "debug=fdr", "data.n_stars=200"], tmp_path)
    assert "wrote" in run.stdout + run.stderr
    (metrics,) = (tmp_path / "outputs" / "debug" / "runs").glob("*/metrics.json")  # outputs/ and data/ where it ran
    assert (tmp_path / "data" / "cache").is_dir()
    where = _run([python, "-c", "import stellarlab.config as c; print(c.conf_dir())"], tmp_path).stdout.strip()
    assert where.startswith(str(wheel_venv["venv"])) and where.endswith("stellarlab/conf")
    # resume= is rewritten with the packaged configs before Hydra starts: nothing to resume here, one line
    proc = subprocess.run([bin_dir / "stellarlab-train", "resume=last"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: resume=last:"), proc.stderr[-2000:]
    api = _run([python, "-c", API_SCRIPT], tmp_path)
    assert "api ok" in api.stdout
    assert _run([bin_dir / "stellarlab-compare", "outputs"], tmp_path).returncode == 0
    for command in ("stellarlab-eval", "stellarlab-predict", "stellarlab-download"):
        assert "powered by Hydra" in _run([bin_dir / command, "--help"], tmp_path).stdout
    assert _run([python, "-m", "pip", "check"], tmp_path).returncode == 0


@pytest.mark.slow
def test_pip_check_is_clean_in_this_environment():
    proc = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.slow
def test_import_stellarlab_loads_neither_torch_nor_hydra():
    code = ("import sys, stellarlab; stellarlab.load_runs; print(stellarlab.__version__, "
            "sorted(m for m in ('torch', 'hydra', 'pytorch_lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.split() == [PROJECT["version"], "[]"]
