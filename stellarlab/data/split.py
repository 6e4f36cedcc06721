"""Train/val/test split by star, never by spectrum.

Two spectra of one star (visits, or repeated observations) on both sides of a split leak the
answer into the test set (the astroNN DR14 headline numbers did this). Stars are shuffled with
their own seed, so a sweep over model seeds keeps the same test stars.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from stellarlab.checks import Rule, _is_number, _show
from stellarlab.errors import ConfigError


class PlannedSize(NamedTuple):
    """What the split will divide, when a survey knows it from its arguments (`SpectraDataModule.planned_size`)."""

    stars: int
    spectra_per_star: int
    key: str  # the argument that sets `stars`, for messages (e.g. data.n_stars)


def split_problem(split: Any) -> str | None:
    """Why `split` is not three fractions summing to 1 or three star counts (train and val non-empty), or None."""
    if not isinstance(split, (list, tuple)) or len(split) != 3:
        return "it must have 3 entries (train, val, test)"
    if not all(_is_number(s) and math.isfinite(s) and s >= 0 for s in split):
        return "its entries must be numbers >= 0"
    if any(s > 1 for s in split):
        if not all(float(s).is_integer() for s in split):
            return "give three star counts (integers) or three fractions summing to 1"
        if split[0] < 1 or split[1] < 1:
            return "the training and validation sets need at least one star each"
        return None
    total = sum(split)
    if abs(total - 1.0) > 1e-6:
        return f"the fractions sum to {total:.6g}, not 1"
    if split[0] <= 0 or split[1] <= 0:
        return "the training and validation fractions must both be > 0"
    return None


class SplitSizes(Rule):
    """`data.split`: three fractions summing to 1, or three star counts; whether the data have that many stars is
    known only once they are loaded (`resolve_split_sizes`)."""

    def check(self, key: str, value: Any) -> None:
        problem = split_problem(value)
        if problem:
            raise ConfigError(
                f"{key}={_show(value)} is not valid: {problem}; e.g. {key}=[0.8,0.1,0.1] "
                f"or star counts such as {key}=[1024,256,512]"
            )


def resolve_split_sizes(sizes: Sequence[float | int], n_stars: int) -> tuple[int, int, int]:
    """Turn `sizes` (three fractions summing to 1, or three star counts) into star counts."""
    sizes = list(sizes)
    if len(sizes) != 3:
        raise ConfigError(f"data.split must have 3 entries (train, val, test), got {sizes}")
    if any(s is None or s < 0 for s in sizes):
        raise ConfigError(f"data.split entries must be >= 0, got {sizes}")
    if any(s > 1 for s in sizes):
        if not all(float(s).is_integer() for s in sizes):
            raise ConfigError(f"data.split={sizes}: give three star counts (integers) or three fractions summing to 1")
        counts = tuple(int(s) for s in sizes)
        if sum(counts) > n_stars:
            raise ConfigError(
                f"data.split={sizes} asks for {sum(counts)} stars but the data have {n_stars}; "
                "lower the counts or use fractions such as [0.8, 0.1, 0.1]"
            )
    else:
        if abs(sum(sizes) - 1.0) > 1e-6:
            raise ConfigError(
                f"data.split fractions {sizes} sum to {sum(sizes):.6g}, not 1; e.g. use [0.8, 0.1, 0.1] "
                "or give star counts such as [1024, 256, 512]"
            )
        n_val = int(round(sizes[1] * n_stars))
        n_test = int(round(sizes[2] * n_stars))
        counts = (n_stars - n_val - n_test, n_val, n_test)
    if counts[0] < 1 or counts[1] < 1:
        raise ConfigError(
            f"data.split={sizes} leaves {counts[0]} training and {counts[1]} validation stars out of "
            f"{n_stars}; both need at least one. Use more stars or larger fractions."
        )
    return counts


def split_by_star(star_id: np.ndarray, sizes: Sequence[float | int], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices of the train, val and test spectra; every star lands in exactly one set."""
    star_id = np.asarray(star_id)
    stars = np.unique(star_id)
    n_train, n_val, n_test = resolve_split_sizes(sizes, len(stars))
    order = np.random.default_rng(seed).permutation(len(stars))
    shuffled = stars[order]
    groups = (
        shuffled[:n_train],
        shuffled[n_train : n_train + n_val],
        shuffled[n_train + n_val : n_train + n_val + n_test],
    )
    return tuple(np.flatnonzero(np.isin(star_id, g)) for g in groups)
