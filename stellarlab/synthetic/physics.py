"""One-layer LTE physics of the synthetic generator (docs/synthetic-spectra.md, sec. 1d and 2), in differentiable torch.

Everything here is a smooth function of the four labels so that autograd / jacfwd give the exact
Jacobian used for Cramer-Rao bounds. Quantities are cgs unless stated; pressures in dyn cm^-2.
The model is deliberately simple (a single line-forming layer with scaling-law pressures), but each
ingredient is the textbook one, so the label dependences (and degeneracies) are the real ones.
"""
from __future__ import annotations

import math

import numpy as np
import torch

# --------------------------------------------------------------------------------------------------
# Physical constants (CODATA 2018)
# --------------------------------------------------------------------------------------------------
K_B = 1.380649e-16  # erg/K
C_CGS = 2.99792458e10  # cm/s
H_PLANCK = 6.62607015e-27  # erg s
AMU = 1.66053907e-24  # g
E_CHARGE2 = (4.80320471e-10) ** 2  # e^2, erg cm
R_ELECTRON = 2.8179403262e-13  # classical electron radius e^2/(m_e c^2), cm
A0_BOHR = 5.29177210903e-9  # cm
HC_OVER_K_ANGSTROM = 1.438776877e8  # hc/k in Angstrom K
EV_THETA = 5040.0  # theta = 5040 / T: chi[eV] * theta = chi / (k T ln 10)
LN10 = math.log(10.0)
LOG_SQRT_PI_RE = math.log10(math.sqrt(math.pi) * R_ELECTRON)

# --------------------------------------------------------------------------------------------------
# Calibration (docs/synthetic-spectra.md sec. 2): one log-gf offset per band, fitted to VALD3 solar central depths.
# --------------------------------------------------------------------------------------------------
DELTA_H = -0.75  # H band (APOGEE)
DELTA_OPT = -0.40  # optical (GALAH)

# Layer scalings, fitted to MARCS Sun and 5000/3.0 at log tau_R = -1 (docs/synthetic-spectra.md sec. 2).
T_LAYER_FACTOR = 0.88
T_SURFACE_FACTOR = 0.70  # Eddington-Barbier boundary temperature for D_max
T_HYDROGEN_FACTOR = 0.97  # hydrogen lines form deeper
PE_HYDROGEN_FACTOR = 4.0  # MARCS solar P_e(log tau=-0.3)/P_e(log tau=-1) = 13.7/3.45
LOG_GAMMA6_DEFAULT = -7.5  # van der Waals log10 gamma6 (rad s^-1 cm^3) when the list gives none
GAMMA_RAD = 1e8  # radiative damping, s^-1
TEFF_SUN = 5777.0
LOGG_SUN = 4.44

# --------------------------------------------------------------------------------------------------
# Element data.
# Solar abundances: Asplund et al. 2009 (ARA&A 47, 481), photospheric.
# First ionisation energies (eV): Barklem & Collet 2016 as quoted in docs/synthetic-spectra.md; Li, N, V, Co, Cu,
# Zn, Rb, Sr, Zr, La, Nd from NIST ASD.
# Masses: IUPAC standard atomic weights (amu).
# --------------------------------------------------------------------------------------------------
ELEMENTS = {
    #      Z   A(X)   chi_ion  mass
    "H": (1, 12.00, 13.598, 1.008),
    "Li": (3, 1.05, 5.392, 6.94),
    "C": (6, 8.43, 11.260, 12.011),
    "N": (7, 7.83, 14.534, 14.007),
    "O": (8, 8.69, 13.618, 15.999),
    "Na": (11, 6.24, 5.139, 22.990),
    "Mg": (12, 7.60, 7.646, 24.305),
    "Al": (13, 6.45, 5.986, 26.982),
    "Si": (14, 7.51, 8.152, 28.085),
    "S": (16, 7.12, 10.360, 32.06),
    "K": (19, 5.03, 4.341, 39.098),
    "Ca": (20, 6.34, 6.113, 40.078),
    "Sc": (21, 3.15, 6.562, 44.956),
    "Ti": (22, 4.95, 6.828, 47.867),
    "V": (23, 3.93, 6.746, 50.942),
    "Cr": (24, 5.64, 6.767, 51.996),
    "Mn": (25, 5.43, 7.434, 54.938),
    "Fe": (26, 7.50, 7.903, 55.845),
    "Co": (27, 4.99, 7.881, 58.933),
    "Ni": (28, 6.22, 7.640, 58.693),
    "Cu": (29, 4.19, 7.726, 63.546),
    "Zn": (30, 4.56, 9.394, 65.38),
    "Rb": (37, 2.52, 4.177, 85.468),
    "Sr": (38, 2.87, 5.695, 87.62),
    "Y": (39, 2.21, 6.217, 88.906),
    "Zr": (40, 2.58, 6.634, 91.224),
    "Ba": (56, 2.18, 5.212, 137.327),
    "La": (57, 1.10, 5.577, 138.905),
    "Nd": (60, 1.42, 5.525, 144.242),
    "Eu": (63, 0.52, 5.670, 151.964),
}
# ASPCAP-style alpha set: these follow [Fe/H] + [alpha/Fe].
ALPHA_ELEMENTS = frozenset({"O", "Mg", "Si", "S", "Ca", "Ti"})

# Partition functions U(T) at these temperatures (K).
PF_TEMPERATURES = np.array([3500.0, 4500.0, 5500.0, 7000.0])
# (U_I, U_II). Rows marked "note" are the Korg.jl/NIST values of docs/synthetic-spectra.md (sec. 1d). The rest
# are approximate (~10-20 %): ground-term statistical weights plus low-lying levels, rounded; they only
# matter for the minor GALAH species and for the second stage of elements that are mostly neutral.
PARTITION = {
    "H": ((2.0, 2.0, 2.0, 2.0), (1.0, 1.0, 1.0, 1.0)),
    "Li": ((2.0, 2.02, 2.1, 2.4), (1.0, 1.0, 1.0, 1.0)),
    "C": ((9.1, 9.2, 9.3, 9.4), (5.8, 5.85, 5.9, 5.95)),
    "N": ((4.0, 4.0, 4.0, 4.05), (8.8, 8.9, 9.0, 9.1)),
    "O": ((8.73, 8.81, 8.90, 9.05), (4.0, 4.0, 4.0, 4.0)),  # O I note
    "Na": ((2.01, 2.03, 2.11, 2.50), (1.0, 1.0, 1.0, 1.0)),  # Na I note
    "Mg": ((1.00, 1.01, 1.03, 1.11), (2.0, 2.0, 2.0, 2.01)),  # Mg I note
    "Al": ((5.82, 5.86, 5.90, 6.02), (1.0, 1.0, 1.0, 1.0)),  # Al I note
    "Si": ((8.85, 9.26, 9.64, 10.16), (5.6, 5.7, 5.8, 5.9)),  # Si I note
    "S": ((8.3, 8.5, 8.7, 9.0), (4.0, 4.0, 4.0, 4.1)),
    "K": ((2.03, 2.13, 2.38, 3.41), (1.0, 1.0, 1.0, 1.0)),  # K I note
    "Ca": ((1.02, 1.10, 1.28, 1.86), (2.04, 2.13, 2.29, 2.63)),  # note
    "Sc": ((8.5, 10.0, 12.5, 17.0), (19.1, 21.6, 24.0, 27.3)),  # Sc II note
    "Ti": ((22.5, 26.7, 32.6, 44.8), (47.0, 52.6, 58.2, 66.7)),  # note
    "V": ((24.0, 30.0, 38.0, 52.0), (22.0, 26.0, 31.0, 40.0)),
    "Cr": ((8.2, 9.5, 11.5, 15.9), (6.1, 6.4, 7.0, 8.2)),  # Cr I note
    "Mn": ((6.0, 6.2, 6.7, 8.2), (7.0, 7.1, 7.4, 8.3)),  # Mn I note
    "Fe": ((23.2, 26.1, 29.7, 36.7), (36.8, 41.3, 45.5, 51.9)),  # note
    "Co": ((26.0, 29.0, 32.0, 37.0), (20.0, 22.0, 25.0, 29.0)),
    "Ni": ((27.7, 29.9, 31.8, 34.4), (7.2, 7.9, 8.8, 10.5)),  # Ni I note
    "Cu": ((2.0, 2.05, 2.15, 2.5), (1.0, 1.0, 1.02, 1.1)),
    "Zn": ((1.0, 1.0, 1.0, 1.02), (2.0, 2.0, 2.0, 2.0)),
    "Rb": ((2.0, 2.1, 2.4, 3.3), (1.0, 1.0, 1.0, 1.0)),
    "Sr": ((1.0, 1.1, 1.3, 2.0), (2.0, 2.0, 2.1, 2.3)),
    "Y": ((8.0, 9.5, 11.5, 15.0), (12.2, 14.7, 17.0, 20.4)),  # Y II note
    "Zr": ((22.0, 28.0, 36.0, 52.0), (38.0, 45.0, 53.0, 66.0)),
    "Ba": ((1.2, 1.6, 2.5, 5.0), (3.1, 3.8, 4.5, 5.4)),  # Ba II note
    "La": ((20.0, 26.0, 33.0, 45.0), (18.0, 22.0, 27.0, 35.0)),
    "Nd": ((100.0, 150.0, 210.0, 300.0), (120.0, 160.0, 210.0, 290.0)),
    "Eu": ((8.0, 8.05, 8.3, 9.5), (9.0, 9.1, 9.6, 11.0)),
}

# Diatomic molecules (docs/synthetic-spectra.md sec. 1d): Barklem & Collet 2016 via Korg.jl.
# log10 K_D = log10(P_A P_B / P_AB) in Pa at these temperatures; +1 dex converts to dyn cm^-2.
KD_TEMPERATURES = np.array([3000.0, 3500.0, 4000.0, 4500.0, 5000.0, 6000.0])
LOG_KD_PA = {
    "CO": (-6.66, -4.27, -1.88, -0.43, 1.01, 2.95),
    "OH": (3.13, 4.12, 5.11, 5.71, 6.31, 7.12),
    "CN": (-1.69, -0.01, 1.66, 2.67, 3.68, 5.03),
}
MOL_PF_TEMPERATURES = np.array([3500.0, 4000.0, 5000.0, 6000.0])
MOL_PARTITION = {
    "CO": (2239.0, 2760.0, 4066.0, 5644.0),
    "OH": (734.0, 891.0, 1288.0, 1781.0),
    "CN": (4867.0, 6081.0, 9372.0, 13674.0),
}
MOL_MASS = {"12C16O": 27.995, "13C16O": 28.998, "16O1H": 17.003, "12C14N": 26.003}
# Carbon isotope ratio: solar 89 for dwarfs, ~15 after first dredge-up on the giant branch (typical of
# APOGEE giants); blended with the same logistic in log g as the microturbulence.
C12_C13_DWARF = 89.0
C12_C13_GIANT = 15.0

# Hydrogen
RYDBERG_H = 109677.58  # cm^-1
CHI_H_ION = 13.598


def log1p10(x: torch.Tensor) -> torch.Tensor:
    """log10(1 + 10**x), stable for large |x| (ionisation fractions)."""
    return torch.nn.functional.softplus(x * LN10) / LN10


def interp_extrap(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation with linear extrapolation, differentiable in x.

    x: (B,), xp: (n,) increasing, fp: (n, S) -> (B, S). Extrapolating (rather than clamping) keeps
    the derivative nonzero at the edges of the tables (T_layer spans ~3080-6160 K).
    """
    n = xp.shape[0]
    idx = torch.searchsorted(xp, x.detach().contiguous()).clamp(1, n - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    w = ((x - x0) / (x1 - x0)).unsqueeze(-1)
    return fp[idx - 1] + w * (fp[idx] - fp[idx - 1])


# --------------------------------------------------------------------------------------------------
# Layer
# --------------------------------------------------------------------------------------------------
def metallicity(fe_h: torch.Tensor, alpha_fe: torch.Tensor) -> torch.Tensor:
    """[M/H] including alpha enhancement, Salaris, Chieffi & Straniero 1993 (ApJ 414, 580)."""
    return fe_h + torch.log10(0.638 * 10.0 ** alpha_fe + 0.362)


def layer(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Thermodynamic state of the line-forming layer for labels (B, 4) = (Teff, logg, [Fe/H], [a/Fe]).

    Scaling laws of docs/synthetic-spectra.md sec. 2, fitted to MARCS at log tau_R = -1; P_e ~ g^(1/3) (Gray 2005).
    """
    teff, logg, feh, afe = labels.unbind(-1)
    mh = metallicity(feh, afe)
    lt = torch.log10(teff / TEFF_SUN)
    t_l = T_LAYER_FACTOR * teff
    log_pe = 0.54 + (logg - LOGG_SUN) / 3.0 + 6.0 * lt + 0.3 * mh
    log_pg = 4.61 + (2.0 / 3.0) * (logg - LOGG_SUN) - 3.0 * lt - 0.3 * mh
    # Microturbulence: Kirby et al. 2008 (giants) and Reddy et al. 2003 (dwarfs), logistic blend.
    w_giant = torch.sigmoid(-(logg - 3.5) / 0.2)
    xi_giant = 2.70 - 0.509 * logg
    xi_dwarf = 1.28 + 3.3e-4 * (teff - 6000.0) - 0.64 * (logg - 4.5)
    xi = (w_giant * xi_giant + (1.0 - w_giant) * xi_dwarf).clamp(0.5, 3.0)
    return {
        "teff": teff, "logg": logg, "feh": feh, "afe": afe, "mh": mh,
        "t": t_l, "theta": EV_THETA / t_l, "log_pe": log_pe, "log_pg": log_pg,
        "xi_kms": xi, "w_giant": w_giant,
        "t_h": T_HYDROGEN_FACTOR * teff, "theta_h": EV_THETA / (T_HYDROGEN_FACTOR * teff),
        "log_pe_h": log_pe + math.log10(PE_HYDROGEN_FACTOR),
    }


# --------------------------------------------------------------------------------------------------
# Continuum: H- (Gray 2005, eqs. 8.12-8.13)
# --------------------------------------------------------------------------------------------------
_WISHART = (1.99654, -1.18267e-5, 2.64243e-6, -4.40524e-10, 3.23992e-14, -1.39568e-18, 2.78701e-23)
H_MINUS_THRESHOLD = 16420.0  # Angstrom; no bound-free absorption beyond


def h_minus_bf_cross_section(wavelength: np.ndarray) -> np.ndarray:
    """H- bound-free cross-section alpha_bf (cm^2), Wishart 1979 polynomial; zero beyond threshold."""
    lam = np.asarray(wavelength, dtype=np.float64)
    a = sum(c * lam ** k for k, c in enumerate(_WISHART)) * 1e-18
    return np.where(lam < H_MINUS_THRESHOLD, np.clip(a, 0.0, None), 0.0)


def h_minus_ff_coefficients(wavelength: np.ndarray) -> np.ndarray:
    """(f0, f1, f2) of the Bell & Berrington 1987 free-free fit (Gray eq. 8.13), shape (3, L)."""
    x = np.log10(np.asarray(wavelength, dtype=np.float64))
    f0 = -2.2763 - 1.6850 * x + 0.76661 * x ** 2 - 0.053346 * x ** 3
    f1 = 15.2827 - 9.2846 * x + 1.99381 * x ** 2 - 0.142631 * x ** 3
    f2 = -197.789 + 190.266 * x - 67.9775 * x ** 2 + 10.6913 * x ** 3 - 0.625151 * x ** 4
    return np.stack([f0, f1, f2])


def log_kappa_continuum(alpha_bf: torch.Tensor, ff: torch.Tensor, theta: torch.Tensor,
                        log_pe: torch.Tensor) -> torch.Tensor:
    """log10 of the H- opacity per neutral H atom (cm^2) at each line wavelength.

    alpha_bf, ff[0..2]: (L,) per line; theta, log_pe: (B,) or (B, L) -> (B, L).
    """
    if theta.dim() == 1:
        theta = theta[:, None]
        log_pe = log_pe[:, None]
    lth = torch.log10(theta)
    k_bf = 4.158e-10 * alpha_bf * theta ** 2.5 * 10.0 ** (0.754 * theta)
    k_ff = 1e-26 * 10.0 ** (ff[0] + ff[1] * lth + ff[2] * lth ** 2)
    return log_pe + torch.log10(k_bf + k_ff)


def d_max(wavelength: torch.Tensor, teff: torch.Tensor) -> torch.Tensor:
    """Maximum line depth 1 - B_lambda(0.70 Teff)/B_lambda(Teff) (Eddington-Barbier), (B, n)."""
    u = HC_OVER_K_ANGSTROM / (wavelength[None, :] * teff[:, None])
    return 1.0 - torch.expm1(u) / torch.expm1(u / T_SURFACE_FACTOR)


# --------------------------------------------------------------------------------------------------
# Populations
# --------------------------------------------------------------------------------------------------
def log_partition(t: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """log10 U(T) from a (4, S) table of log10 U at PF_TEMPERATURES -> (B, S)."""
    return interp_extrap(t, torch.as_tensor(PF_TEMPERATURES, dtype=t.dtype, device=t.device), table)


def log_ion_fraction(st: dict, log_u1: torch.Tensor, log_u2: torch.Tensor, chi_ion: torch.Tensor,
                     stage: torch.Tensor) -> torch.Tensor:
    """log10 of the fraction of an element in the given stage (1 or 2), Saha with the note's constant.

    log(N_II/N_I) = log(2 U_II/U_I) + 2.5 log T - theta chi_ion - 0.1762 - log P_e (docs/synthetic-spectra.md sec. 2;
    second ionisation ignored). The prototype's delta calibration was fitted with exactly this form.
    """
    t = st["t"][:, None]
    log_phi = (math.log10(2.0) + log_u2 - log_u1 + 2.5 * torch.log10(t)
               - st["theta"][:, None] * chi_ion - 0.1762 - st["log_pe"][:, None])
    denom = log1p10(log_phi)
    return torch.where(stage == 2, log_phi - denom, -denom)


def molecular_log_fractions(st: dict, log_eps_c: torch.Tensor, log_eps_n: torch.Tensor,
                            log_eps_o: torch.Tensor) -> dict[str, torch.Tensor]:
    """log10(P_mol / P_H) for CO, OH, CN from the C-N-O dissociation equilibrium (docs/synthetic-spectra.md sec. 2).

    P_X = eps_X P_H with P_H = 0.9 P_g; CO first (quadratic), then OH and CN from the free C and O.
    """
    dtype, dev = st["t"].dtype, st["t"].device
    tk = torch.as_tensor(KD_TEMPERATURES, dtype=dtype, device=dev)
    table = torch.as_tensor(np.stack([LOG_KD_PA[m] for m in ("CO", "OH", "CN")], axis=1) + 1.0,
                            dtype=dtype, device=dev)  # +1 dex: Pa -> dyn cm^-2
    log_kd = interp_extrap(st["t"], tk, table)  # (B, 3)
    log_ph = math.log10(0.9) + st["log_pg"]
    # Work in units of P_H so every quantity is O(eps) and float32 is comfortable.
    pc, pn, po = 10.0 ** log_eps_c, 10.0 ** log_eps_n, 10.0 ** log_eps_o
    k_co = 10.0 ** (log_kd[:, 0] - log_ph)
    s = pc + po + k_co
    p_co = 2.0 * pc * po / (s + torch.sqrt((s * s - 4.0 * pc * po).clamp_min(0.0)))  # stable small root
    pc_free = (pc - p_co).clamp_min(1e-30)
    po_free = (po - p_co).clamp_min(1e-30)
    # OH = P_O,free P_H / K_OH -> in units of P_H: po_free * P_H / K_OH ; CN likewise with P_N.
    log_oh = torch.log10(po_free) + log_ph - log_kd[:, 1]
    log_cn = torch.log10(pc_free) + torch.log10(pn) + log_ph - log_kd[:, 2]
    return {"CO": torch.log10(p_co), "OH": log_oh, "CN": log_cn}


# --------------------------------------------------------------------------------------------------
# Profiles
# --------------------------------------------------------------------------------------------------
def pseudo_voigt(dx: torch.Tensor, fwhm_g: torch.Tensor, fwhm_l: torch.Tensor) -> torch.Tensor:
    """Area-normalised pseudo-Voigt (Thompson, Cox & Hastings 1987, ~1 % accurate), units 1/Angstrom."""
    g, l = fwhm_g, fwhm_l
    f = (g ** 5 + 2.69269 * g ** 4 * l + 2.42843 * g ** 3 * l ** 2 + 4.47163 * g ** 2 * l ** 3
         + 0.07842 * g * l ** 4 + l ** 5) ** 0.2
    q = l / f
    eta = 1.36603 * q - 0.47719 * q ** 2 + 0.11116 * q ** 3
    hw = 0.5 * f
    x2 = dx * dx
    lorentz = (hw / math.pi) / (x2 + hw * hw)
    gauss = (math.sqrt(4.0 * math.log(2.0) / math.pi) / f) * torch.exp(-4.0 * math.log(2.0) * x2 / (f * f))
    return eta * lorentz + (1.0 - eta) * gauss


def hydrogen_profile(dx: torch.Tensor, doppler: torch.Tensor, w_stark: torch.Tensor) -> torch.Tensor:
    """max(Doppler core, Holtsmark-like wing), both area-normalised (docs/synthetic-spectra.md sec. 2, hydrogen).

    The wing S = [2.642 w (1 + |x/w|^(5/2))]^-1 has the asymptotic x^(-5/2) of linear Stark broadening
    by the Holtsmark field; 2.642 = integral of 1/(1+|u|^2.5).
    """
    core = torch.exp(-(dx / doppler) ** 2) / (math.sqrt(math.pi) * doppler)
    return torch.maximum(core, stark_wing(dx, w_stark))


def stark_wing(dx: torch.Tensor, w_stark: torch.Tensor) -> torch.Tensor:
    """The Holtsmark-like wing alone; |u|^2.5 as u^2 sqrt|u| (much cheaper than pow on CPU)."""
    u = dx / w_stark
    return 1.0 / (2.642 * w_stark * (1.0 + u * u * torch.sqrt(u.abs())))


def stark_width_coefficient(wavelength_a: np.ndarray, n_lower: np.ndarray, n_upper: np.ndarray) -> np.ndarray:
    """w_S / N_e^(2/3) in Angstrom cm^2: 2 (lambda^2/hc) 3.915 e^2 a0 (n_u^2 - n_l^2).

    Linear Stark shift in the normal field F0 = 2.61 e N_e^(2/3); the leading 2 is a calibration (docs/synthetic-spectra.md sec. 2).
    """
    lam_cm = np.asarray(wavelength_a, dtype=np.float64) * 1e-8
    return 2.0 * lam_cm ** 2 / (H_PLANCK * C_CGS) * 3.915 * E_CHARGE2 * A0_BOHR * (n_upper ** 2 - n_lower ** 2) * 1e8
