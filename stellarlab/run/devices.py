"""Check the requested accelerator and precision before Lightning does, with a one-line answer.

Lightning's own error for a missing device is a long MisconfigurationException; users on a
laptop typing `trainer.accelerator=cuda` deserve "cuda is not available here; available: cpu, mps".
"""

from __future__ import annotations

import torch

from stellarlab.errors import ConfigError

ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps")
#: Lightning 2's precision names and their short aliases (anything else fails deep inside the Trainer).
PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16", "bf16-true", "16-mixed", "16", "16-true", "64-true", "64")


def available_accelerators() -> list[str]:
    found = ["cpu"]
    if torch.cuda.is_available():
        found.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found


def resolve_accelerator(requested: str) -> str:
    """The concrete device type `requested` means here ('gpu' -> cuda or mps, 'auto' -> best); error if absent."""
    name = str(requested).lower()
    available = available_accelerators()
    if name not in ACCELERATORS:
        raise ConfigError(f"trainer.accelerator={requested} is not a known accelerator; use one of {list(ACCELERATORS)}")
    if name == "auto":
        # Lightning's auto prefers MPS over CUDA; the order here is the same.
        return "mps" if "mps" in available else ("cuda" if "cuda" in available else "cpu")
    if name == "gpu":
        gpus = [a for a in ("cuda", "mps") if a in available]
        if not gpus:
            raise ConfigError(
                f"trainer.accelerator=gpu but this machine has no CUDA or MPS device; available: {', '.join(available)} "
                "(use trainer.accelerator=cpu or auto)"
            )
        return gpus[0]
    if name not in available:
        raise ConfigError(
            f"trainer.accelerator={name} is not available on this machine; available: {', '.join(available)} "
            "(use trainer.accelerator=auto to pick the best one)"
        )
    return name


def check_trainer_config(accelerator: str, precision) -> str:
    """Validate accelerator and precision together; returns the concrete device type."""
    device = resolve_accelerator(accelerator)
    precision = str(precision)
    if precision not in PRECISIONS:
        raise ConfigError(
            f"trainer.precision={precision} is not a precision Lightning knows; use 32-true (any device), "
            "bf16-mixed (CPU, CUDA) or 16-mixed (CUDA)"
        )
    if device == "mps" and precision not in ("32", "32-true"):
        raise ConfigError(f"trainer.precision={precision} is not supported on MPS; use trainer.precision=32-true")
    if device == "cpu" and precision in ("16", "16-mixed", "16-true"):
        raise ConfigError(f"trainer.precision={precision} needs CUDA; on CPU use bf16-mixed or 32-true")
    if precision.startswith("bf16") and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"trainer.precision={precision}: this CUDA device has no bfloat16; use 16-mixed or 32-true")
    if precision in ("64", "64-true", "double"):
        raise ConfigError("trainer.precision=64 is not supported: stellarlab keeps all tensors float32 (MPS has no float64)")
    return device
