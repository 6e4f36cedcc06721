"""Line lists shipped with the package (atomic, hydrogen and molecular lines for each survey).

Wavelengths are returned in the frame of the survey grid: vacuum for APOGEE (molecular air wavelengths
converted with the VALD formula), air for GALAH. Files are read as package data, so an
installed package finds them wherever it lives.
"""
from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, fields
from importlib import resources

import numpy as np

from stellarlab.grids import air_to_vacuum
from stellarlab.synthetic.physics import (
    CHI_H_ION,
    ELEMENTS,
    LOG_GAMMA6_DEFAULT,
    MOL_MASS,
    RYDBERG_H,
)

KIND_ATOM, KIND_HYDROGEN, KIND_MOLECULE = 0, 1, 2
LINELIST_FILES = {
    "apogee": ("apogee_atomic.csv", "apogee_molecules.csv"),
    "galah": ("galah_atomic.csv",),
}
_ROMAN = {1: "I", 2: "II"}


@dataclass
class LineList:
    """Columnar line data (numpy arrays, one entry per line)."""

    wavelength: np.ndarray  # Angstrom, in the grid's frame (vacuum APOGEE, air GALAH)
    species: np.ndarray  # str: "Fe 1", "H 1", "CO 12C16O", ...
    element: np.ndarray  # str, element symbol ("" for molecules)
    stage: np.ndarray  # int, 1 neutral, 2 singly ionised (1 for molecules)
    chi: np.ndarray  # lower-level excitation, eV
    log_gf: np.ndarray
    log_gamma6: np.ndarray  # van der Waals, log10(rad s^-1 cm^3)
    mass: np.ndarray  # amu of the absorber
    kind: np.ndarray  # KIND_ATOM / KIND_HYDROGEN / KIND_MOLECULE
    n_lower: np.ndarray  # hydrogen principal quantum numbers (0 otherwise)
    n_upper: np.ndarray

    def __len__(self) -> int:
        return int(self.wavelength.size)

    def select(self, mask) -> "LineList":
        """Subset of the lines (boolean mask or index array); e.g. a single line for an isolated EW."""
        return LineList(**{f.name: getattr(self, f.name)[mask] for f in fields(self)})

    def names(self) -> list[str]:
        out = []
        for sp, el, stg, wl in zip(self.species, self.element, self.stage, self.wavelength):
            out.append(f"{el} {_ROMAN.get(int(stg), stg)} {wl:.3f}" if el else f"{sp} {wl:.3f}")
        return out

    def find(self, species: str, wavelength: float, tol: float = 0.6) -> int:
        """Index of the line of `species` ("Fe 1", "Mg 1", "H 1", ...) closest to `wavelength`."""
        idx = np.flatnonzero(self.species == species)
        if idx.size == 0:
            raise KeyError(f"no {species} lines")
        best = idx[np.argmin(np.abs(self.wavelength[idx] - wavelength))]
        if abs(self.wavelength[best] - wavelength) > tol:
            raise KeyError(f"no {species} line within {tol} A of {wavelength}")
        return int(best)


def _rows(filename: str) -> list[dict]:
    text = resources.files(__package__).joinpath("linelists", filename).read_text(encoding="utf-8")
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    return list(csv.DictReader(lines))


def linelist_hashes(survey: str) -> dict[str, str]:
    """sha1 of each shipped line-list file of a survey (part of the survey cache key)."""
    out = {}
    for fn in LINELIST_FILES[survey]:
        data = resources.files(__package__).joinpath("linelists", fn).read_bytes()
        out[fn] = hashlib.sha1(data).hexdigest()
    return out


def _hydrogen_levels(wavelength_vac: float, chi: float) -> tuple[int, int]:
    """Principal quantum numbers from the lower-level energy and the vacuum wavelength (Rydberg)."""
    n_l = int(round((1.0 - chi / CHI_H_ION) ** -0.5))
    inv = 1.0 / n_l ** 2 - 1.0 / (wavelength_vac * 1e-8 * RYDBERG_H)
    return n_l, int(round(inv ** -0.5))


def _atom(wl, el, stage, chi, loggf, gamma6, wl_vac):
    if el == "H":
        n_l, n_u = _hydrogen_levels(wl_vac, chi)
        return dict(wavelength=wl, species="H 1", element="H", stage=1, chi=chi, log_gf=loggf,
                    log_gamma6=LOG_GAMMA6_DEFAULT, mass=ELEMENTS["H"][3], kind=KIND_HYDROGEN,
                    n_lower=n_l, n_upper=n_u)
    return dict(wavelength=wl, species=f"{el} {stage}", element=el, stage=stage, chi=chi, log_gf=loggf,
                log_gamma6=gamma6, mass=ELEMENTS[el][3], kind=KIND_ATOM, n_lower=0, n_upper=0)


def _to_linelist(recs: list[dict]) -> LineList:
    cols = {f.name: np.array([r[f.name] for r in recs]) for f in fields(LineList)}
    for name in ("wavelength", "chi", "log_gf", "log_gamma6", "mass"):
        cols[name] = cols[name].astype(np.float64)
    for name in ("stage", "kind", "n_lower", "n_upper"):
        cols[name] = cols[name].astype(np.int64)
    order = np.argsort(cols["wavelength"], kind="stable")
    return LineList(**{k: v[order] for k, v in cols.items()})


def load_linelist(survey: str) -> LineList:
    """All lines of a survey, wavelengths in the survey's frame."""
    recs = []
    if survey == "apogee":
        for r in _rows("apogee_atomic.csv"):
            wl = float(r["wavelength_vac"])
            recs.append(_atom(wl, r["element"], int(r["ion_stage"]), float(r["chi_eV"]), float(r["log_gf"]),
                              LOG_GAMMA6_DEFAULT, wl))
        mol = _rows("apogee_molecules.csv")
        wl_vac = air_to_vacuum(np.array([float(r["wavelength_air"]) for r in mol]))
        for r, wl in zip(mol, wl_vac):
            iso = r["isotopologue"]
            recs.append(dict(wavelength=float(wl), species=f"{r['molecule']} {iso}", element="", stage=1,
                             chi=float(r["chi_eV"]), log_gf=float(r["log_gf"]), log_gamma6=LOG_GAMMA6_DEFAULT,
                             mass=MOL_MASS[iso], kind=KIND_MOLECULE, n_lower=0, n_upper=0))
    elif survey == "galah":
        for r in _rows("galah_atomic.csv"):
            vdw = float(r["vdW"])
            # The vdW column mixes log gamma6 (negative) with packed ABO sigma.alpha: use the default then.
            gamma6 = vdw if vdw < 0 else LOG_GAMMA6_DEFAULT
            recs.append(_atom(float(r["wavelength_air"]), r["element"], int(r["ion_stage"]), float(r["chi_eV"]),
                              float(r["log_gf"]), gamma6, float(r["wavelength_vac"])))
    else:
        raise ValueError(f"unknown survey {survey!r}; valid surveys: apogee, galah")
    return _to_linelist(recs)
