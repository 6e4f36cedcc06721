"""stellarlab: models that read stellar parameters off spectra, as commands and as a notebook API.

    import stellarlab
    summary = stellarlab.train(["model=cnn", "trainer.max_epochs=5"])   # one run; its metrics.json
    model = stellarlab.load(summary["best_checkpoint"])                  # the trained model
    labels = model.predict(flux)                                         # {label: values}, physical units
    runs = stellarlab.load_runs("outputs/train/multiruns/<sweep>")       # one row per run (astropy Table)

The functions are imported on first use, so `import stellarlab` loads neither torch nor Hydra.
"""

import re
from importlib import metadata
from pathlib import Path

import lazy_loader


def _version() -> str:
    """The installed distribution's version (pyproject.toml's, the one source); in a clone used without
    installing, pyproject.toml's own line."""
    try:
        return metadata.version("stellarlab")
    except metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        found = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.M) if pyproject.is_file() else None
        return found.group(1) if found else "0+unknown"


__version__ = _version()
__getattr__, __dir__, __all__ = lazy_loader.attach(__name__, submod_attrs={"commands.api": ["load", "load_runs", "train"]})
__all__ = [*__all__, "__version__"]
