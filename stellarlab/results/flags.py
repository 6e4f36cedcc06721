"""The catalogue's `FLAG` bitmask: one bit per reason not to trust a row, and the scores behind the bits.

A row with FLAG == 0 is a spectrum like the training spectra, predicted inside the training labels'
range. Each bit is documented in the FITS header (`FLAGBIT<n>`) and in the README; the scores are
columns of their own, so a user can choose a stricter cut than the bits'.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence

import numpy as np


class Flag(enum.IntFlag):
    """Bits of the `FLAG` column."""

    FEW_PIXELS = 1  # fewer usable pixels than min_usable_fraction of a training spectrum's median: labels masked
    OUTSIDE_RANGE = 2  # a label outside the training labels' range widened by outside_tolerance
    UNLIKE_TRAINING = 4  # UNLIKENESS above the threshold calibrated on the validation split (~1 % of in-domain spectra)
    LOW_SNR = 8  # SNR below the lowest SNR of the training spectra
    MEMBERS_DISAGREE = 16  # ensemble / MC-dropout spread above disagreement_factor times the members' own sigma
    FIT_FAILED = 32  # spectrum fit did not converge, or its reduced chi-square is above max_reduced_chi2


#: One line per bit, for the FITS header, the README and the log.
DESCRIPTIONS = {
    Flag.FEW_PIXELS: "too few usable pixels (labels masked)",
    Flag.OUTSIDE_RANGE: "a label outside the training range (+ outside_tolerance)",
    Flag.UNLIKE_TRAINING: "spectrum unlike the training spectra (UNLIKENESS > threshold)",
    Flag.LOW_SNR: "SNR below the training spectra's lowest",
    Flag.MEMBERS_DISAGREE: "ensemble members disagree beyond their own sigmas",
    Flag.FIT_FAILED: "spectrum fit not converged or reduced chi2 too high",
}


def bit_number(flag: Flag) -> int:
    return int(math.log2(int(flag)))


def header_cards() -> dict[str, str]:
    """{FLAGBIT<n>: '<NAME>: <what it means>'} for the catalogue's header (FITS) and meta (ECSV)."""
    return {f"FLAGBIT{bit_number(f)}": f"{f.name}: {DESCRIPTIONS[f]}"[:68] for f in Flag}


def flag_column(n: int, **bits: np.ndarray | None) -> np.ndarray:
    """(n,) int32 bitmask from boolean arrays keyed by bit name (`FEW_PIXELS=...`); None leaves a bit unset."""
    flag = np.zeros(n, dtype=np.int32)
    for name, on in bits.items():
        if on is not None:
            flag |= np.where(np.asarray(on, dtype=bool), np.int32(Flag[name]), np.int32(0))
    return flag


def summary(flag: np.ndarray) -> dict[str, int]:
    """How many rows carry each bit, and how many carry none (`clean`)."""
    counts = {f.name: int(((flag & int(f)) != 0).sum()) for f in Flag}
    counts["clean"] = int((flag == 0).sum())
    return counts


def describe(counts: dict[str, int], n: int) -> str:
    """The log line: '12 of 1000 spectra flagged: UNLIKE_TRAINING 10, LOW_SNR 2'."""
    parts = [f"{name} {counts[name]}" for name in (f.name for f in Flag) if counts.get(name)]
    return f"{n - counts['clean']} of {n} spectra flagged" + (": " + ", ".join(parts) if parts else "")


def names_of(value: int) -> Sequence[str]:
    """The bit names set in one FLAG value."""
    return [f.name for f in Flag if value & int(f)]


__all__ = ["DESCRIPTIONS", "Flag", "describe", "flag_column", "header_cards", "names_of", "summary"]
