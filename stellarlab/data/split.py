"""Train/val/test split by star, never by spectrum.

Two spectra of one star (visits, or repeated observations) on both sides of a split leak the
answer into the test set (the astroNN DR14 headline numbers did this). Stars are shuffled with
their own seed, so a sweep over model seeds keeps the same test stars.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from stellarlab.errors import ConfigError


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
