"""A SHA-256 of a checkpoint's weights, written when it is saved and checked whenever it is read.

A checkpoint with a few flipped bytes inside a tensor still unpickles (torch does not check the zip's
CRCs), and the model it gives predicts confidently wrong numbers. The digest covers every entry of the
`state_dict` (name, dtype, shape and raw bytes), so such a file is refused instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping

import torch

from stellarlab.errors import DataError

log = logging.getLogger(__name__)

#: Where in the checkpoint dict the digest lives (beside the model class, under "stellarlab").
CHECKSUM_KEY = "weights_sha256"


def weights_checksum(state_dict: Mapping) -> str:
    """SHA-256 over the state_dict's entries in name order; the same tensors give the same digest on any device."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        value = state_dict[name]
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the raw bytes, no copy
        else:
            digest.update(f"{name}|{value!r}\n".encode())
    return digest.hexdigest()


def stamp(checkpoint: dict) -> None:
    """Record the digest of `checkpoint["state_dict"]` in the checkpoint (called by the model while saving)."""
    checkpoint.setdefault("stellarlab", {})[CHECKSUM_KEY] = weights_checksum(checkpoint.get("state_dict", {}))


def verify(checkpoint: Mapping, path: str | os.PathLike, fix: str) -> None:
    """DataError when the weights do not match the digest saved with them; a warning when there is none."""
    saved = (checkpoint.get("stellarlab") or {}).get(CHECKSUM_KEY)
    if saved is None:
        log.warning("checkpoint %s carries no checksum of its weights (written by an older stellarlab): "
                    "it cannot be checked for damage", path)
        return
    if weights_checksum(checkpoint.get("state_dict", {})) != saved:
        raise DataError(f"checkpoint {path} is damaged: its weights do not match their checksum; {fix}")


def verify_file(path: str | os.PathLike, fix: str) -> None:
    """`verify` for a checkpoint on disk (memory-mapped: a large checkpoint is read once, not held twice)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise DataError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); {fix}") from err
    verify(checkpoint, path, fix)


__all__ = ["CHECKSUM_KEY", "stamp", "verify", "verify_file", "weights_checksum"]
