"""Differentiable, batched synthetic-spectrum generator (docs/synthetic-spectra.md, sec. 2-3).

Pipeline for a batch of B stars:
  labels -> layer state -> per-line (B, L) centre opacity ratio eta0 and widths
  -> (B, L, W) profiles on fixed velocity windows of an oversampled grid
  -> one index_add into tau (B, P_os) (tau is summed before saturation so blends saturate together)
  -> Minnaert residual flux -> Gaussian LSF by FFT -> average the oversampled samples into pixels.
Every step is a torch op on float32, so autograd and torch.func.jacfwd give exact label derivatives.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch

from stellarlab.grids import C_KMS, SurveyGrid, survey_grid
from stellarlab.synthetic import LABEL_NAMES
from stellarlab.synthetic import physics as ph
from stellarlab.synthetic.linelist import KIND_HYDROGEN, LineList, load_linelist

# Bump whenever the physics or numerics change: it is part of the survey cache key.
GENERATOR_VERSION = "stellarlab-synth-1.0"

# Window half-widths (docs/synthetic-spectra.md sec. 3): metals and molecules +-55 km/s; hydrogen in Angstrom.
LINE_WINDOW_KMS = 55.0
# +-200 A keeps the Brackett wings of hot metal-poor dwarfs (2 % deep at 60 A) from being truncated.
HYDROGEN_WINDOW_A = {"apogee": 200.0, "galah": 60.0}
HYDROGEN_CORE_A = 5.0  # >= 7 hydrogen Doppler widths everywhere on both grids
# Stars per internal chunk on CPU: keeps every (stars, lines x window) temporary below glibc's 32 MB mmap
# ceiling, so freed blocks are reused instead of page-faulted in again (with 512 stars at once, minor page
# faults cost more than the arithmetic and throughput fell ~3x).
STAR_CHUNK = 32
N_DMAX_NODES = 16  # D_max varies slowly with wavelength: evaluate on coarse nodes and interpolate


def _next_fast_len(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n (fast FFT sizes)."""
    best = 1 << (n - 1).bit_length()
    p5 = 1
    while p5 < 2 * n:
        p35 = p5
        while p35 < 2 * n:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


class _OSSegment:
    """Oversampled, padded version of one uniformly sampled grid segment (numpy, set up once)."""

    def __init__(self, wl: np.ndarray, log_uniform: bool, oversample: int, resolution: float, offset: int):
        n = wl.size
        self.n_pix = n
        self.log_uniform = log_uniform
        coord = np.log10(wl) if log_uniform else wl
        self.c0 = coord[0]
        self.step = (coord[-1] - coord[0]) / (n - 1) / oversample  # os step in log10(lambda) or Angstrom
        lam_mid = 0.5 * (wl[0] + wl[-1])
        step_a = self.step * math.log(10.0) * lam_mid if log_uniform else self.step
        # LSF: Gaussian of FWHM lambda/R (constant in velocity on a log grid; taken at mid-arm on a linear one).
        self.sigma = (lam_mid / resolution) / step_a / (2.0 * math.sqrt(2.0 * math.log(2.0)))
        self.pad = int(math.ceil(6.0 * self.sigma)) + 2  # absorbs FFT wrap-around and edge lines
        n_os = n * oversample
        self.n_total = _next_fast_len(n_os + 2 * self.pad)
        self.offset = offset  # position of this segment in the concatenated oversampled array
        self.oversample = oversample
        self.n_os = n_os
        # Sample j of the padded array sits at pixel coordinate u = (j - pad - (os - 1)/2) / os.
        u = (np.arange(self.n_total) - self.pad - 0.5 * (oversample - 1)) / oversample
        c = self.c0 + self.step * oversample * u
        self.wavelength = 10.0 ** c if log_uniform else c
        self.min_step_kms = float(np.min(np.diff(self.wavelength) / self.wavelength[1:])) * C_KMS

    def index_of(self, lam: np.ndarray) -> np.ndarray:
        """Nearest padded-array sample of each wavelength (may fall outside [0, n_total))."""
        c = np.log10(lam) if self.log_uniform else lam
        j = (c - self.c0) / self.step + self.pad + 0.5 * (self.oversample - 1)
        return np.rint(j).astype(np.int64)

    def kernel_rfft(self) -> np.ndarray:
        k = np.arange(self.n_total)
        k = np.minimum(k, self.n_total - k).astype(np.float64)  # circular distance
        g = np.exp(-0.5 * (k / self.sigma) ** 2)
        return np.fft.rfft(g / g.sum())

    def node_matrix(self, n_nodes: int) -> tuple[np.ndarray, np.ndarray]:
        """Coarse wavelength nodes and the (n_nodes, n_total) linear-interpolation matrix."""
        pos = np.linspace(0, self.n_total - 1, n_nodes)
        nodes = np.interp(pos, np.arange(self.n_total), self.wavelength)
        j = np.arange(self.n_total)
        mat = np.zeros((n_nodes, self.n_total))
        seg = np.clip(np.searchsorted(pos, j, side="right") - 1, 0, n_nodes - 2)
        w = (j - pos[seg]) / (pos[seg + 1] - pos[seg])
        mat[seg, j] = 1.0 - w
        mat[seg + 1, j] = w
        return nodes, mat


class SpectrumGenerator(torch.nn.Module):
    """Noise-free, continuum-normalised spectra on a survey grid from (Teff, log g, [Fe/H], [alpha/Fe]).

    gen(labels) is differentiable (autograd, torch.func.jacfwd); gen.generate() is the no-grad bulk path.
    `linelist` restricts the lines (e.g. a single line to measure an isolated equivalent width).
    """

    def __init__(self, survey: str = "apogee", oversample: int = 3, device: str | torch.device = "cpu",
                 linelist: Optional[LineList] = None, window_kms: float = LINE_WINDOW_KMS,
                 hydrogen_window_a: Optional[float] = None):
        super().__init__()
        grid: SurveyGrid = survey_grid(survey)
        if int(oversample) < 1:
            raise ValueError(f"oversample must be >= 1, got {oversample}")
        self.survey = grid.name
        self.grid = grid
        self.oversample = int(oversample)
        self.wavelength = grid.wavelength
        self.valid_mask = grid.valid_mask
        self.delta = ph.DELTA_H if grid.name == "apogee" else ph.DELTA_OPT
        lines = load_linelist(grid.name) if linelist is None else linelist
        h_window = HYDROGEN_WINDOW_A[grid.name] if hydrogen_window_a is None else float(hydrogen_window_a)

        segs, offset = [], 0
        for s in grid.segments:
            seg = _OSSegment(grid.wavelength[s.start:s.stop], s.log_uniform, self.oversample, grid.resolution, offset)
            segs.append(seg)
            offset += seg.n_total
        self._segs = segs
        self.n_os = offset
        os_wl = np.concatenate([s.wavelength for s in segs])

        # ---- assign lines to segments and build fixed windows ----
        is_h = lines.kind == KIND_HYDROGEN
        min_kms = min(s.min_step_kms for s in segs)
        w_metal = int(math.ceil(window_kms / min_kms))
        self.groups = {}
        self.groups["voigt"] = self._build_windows("voigt", lines.select(np.flatnonzero(~is_h)),
                                                   np.arange(-w_metal, w_metal + 1), os_wl)
        # Hydrogen: the Doppler core is evaluated only in a narrow window (it is < 1e-20 of the wing beyond
        # +-HYDROGEN_CORE_A, so max(core, wing) = wing there); the long Stark wings use the cheap wing formula.
        h_lines = lines.select(np.flatnonzero(is_h))
        min_step_a = min(float(np.min(np.diff(s.wavelength))) for s in segs)
        h_core = int(math.ceil(HYDROGEN_CORE_A / min_step_a))
        h_half = max(int(math.ceil(h_window / min_step_a)), h_core)
        k = np.arange(-h_half, h_half + 1)
        # both hydrogen groups keep the same lines (selected on the full reach) so per-line factors are shared
        self.groups["hydrogen"] = self._build_windows("hydrogen", h_lines, np.arange(-h_core, h_core + 1), os_wl,
                                                      reach=(-h_half, h_half))
        self.groups["hydrogen_wing"] = self._build_windows("hydrogen_wing", h_lines, k[np.abs(k) > h_core], os_wl,
                                                           reach=(-h_half, h_half))
        self.lines = lines

        # ---- species tables (atomic stages and molecules) ----
        kept = [g["lines"] for g in self.groups.values()]
        species = sorted(set(np.concatenate([k.species for k in kept]).tolist())) if kept else []
        atoms = [s for s in species if not s.split()[0] in ph.MOL_PARTITION]
        self._atom_species = atoms
        self._mol_species = [s for s in species if s.split()[0] in ph.MOL_PARTITION]
        a_el = [s.split()[0] for s in atoms]
        a_stage = [int(s.split()[1]) for s in atoms]
        f32 = torch.float32
        self._buf("a_logeps", torch.tensor([ph.ELEMENTS[e][1] - 12.0 for e in a_el], dtype=f32))
        self._buf("a_alpha", torch.tensor([float(e in ph.ALPHA_ELEMENTS) for e in a_el], dtype=f32))
        self._buf("a_hydrogen", torch.tensor([float(e == "H") for e in a_el], dtype=f32))
        self._buf("a_chi_ion", torch.tensor([ph.ELEMENTS[e][2] for e in a_el], dtype=f32))
        self._buf("a_stage", torch.tensor(a_stage, dtype=torch.int64))
        pf1 = np.log10(np.array([ph.PARTITION[e][0] for e in a_el]).reshape(-1, 4).T)
        pf2 = np.log10(np.array([ph.PARTITION[e][1] for e in a_el]).reshape(-1, 4).T)
        self._buf("a_logu1", torch.tensor(pf1, dtype=f32).reshape(4, len(atoms)))
        self._buf("a_logu2", torch.tensor(pf2, dtype=f32).reshape(4, len(atoms)))
        mol_pf = np.log10(np.array([ph.MOL_PARTITION[s.split()[0]] for s in self._mol_species]).reshape(-1, 4).T)
        self._buf("m_logu", torch.tensor(mol_pf, dtype=f32).reshape(4, len(self._mol_species)))
        # species order in the concatenated (B, S) population table: atoms first, then molecules
        order = {s: i for i, s in enumerate(atoms + self._mol_species)}
        for name, g in self.groups.items():
            if name == "hydrogen_wing":
                continue
            self._buf(f"{name}_species", torch.tensor([order[s] for s in g["lines"].species],
                                                                 dtype=torch.int64))

        # ---- slowly varying factors and the LSF ----
        for i, s in enumerate(segs):
            nodes, mat = s.node_matrix(N_DMAX_NODES)
            self._buf(f"dmax_nodes{i}", torch.tensor(nodes, dtype=f32))
            self._buf(f"dmax_interp{i}", torch.tensor(mat, dtype=f32))
            kr = s.kernel_rfft()
            self._buf(f"lsf{i}", torch.tensor(np.real(kr), dtype=f32))  # Gaussian: real spectrum
        self.to(device)

    # ------------------------------------------------------------------------------------------
    def _buf(self, name: str, value: torch.Tensor) -> None:
        """Non-persistent buffer: moves with .to(device) but stays out of state_dict / checkpoints."""
        self.register_buffer(name, value, persistent=False)

    def _build_windows(self, group: str, sub: LineList, k: np.ndarray, os_wl: np.ndarray,
                       reach: Optional[tuple[int, int]] = None) -> dict:
        """Per-line window indices into the concatenated oversampled array, with a validity mask.

        Samples that fall outside the padded segment are masked (never clamped: clamping would pile fake
        absorption into the edge pixels, docs/synthetic-spectra.md sec. 3).
        """
        L = len(sub)
        lo, hi = reach if reach is not None else ((int(k.min()), int(k.max())) if k.size else (0, 0))
        keep = np.zeros(L, dtype=bool)
        idx = np.zeros((L, k.size), dtype=np.int64)
        mask = np.zeros((L, k.size), dtype=bool)
        for s in self._segs:
            j = s.index_of(sub.wavelength)
            inside = (j + hi >= 0) & (j + lo < s.n_total) & ~keep
            jj = j[inside, None] + k[None, :]
            ok = (jj >= 0) & (jj < s.n_total)
            idx[inside] = np.where(ok, jj, 0) + s.offset
            mask[inside] = ok
            keep |= inside
        sub = sub.select(np.flatnonzero(keep))
        idx, mask = idx[keep], mask[keep]
        # Masked samples get a far, nonzero offset: profiles stay finite there (sqrt|u| has an infinite
        # derivative at 0) and the mask then zeroes them.
        dx = np.where(mask, os_wl[idx] - sub.wavelength[:, None], 1e4)
        lam = sub.wavelength
        f32 = torch.float32
        ff = ph.h_minus_ff_coefficients(lam)
        g = {
            "lines": sub,
            "idx": torch.tensor(idx.reshape(-1)),
            "mask": torch.tensor(mask, dtype=f32),
            "dx": torch.tensor(dx, dtype=f32),
            "lam": torch.tensor(lam, dtype=f32),
            "log_lam2_cm": torch.tensor(np.log10((lam * 1e-8) ** 2), dtype=f32),
            "lam2_fl": torch.tensor(lam ** 2 * 1e-8 / (2.0 * math.pi * ph.C_CGS), dtype=f32),
            "alpha_bf": torch.tensor(ph.h_minus_bf_cross_section(lam), dtype=f32),
            "ff": torch.tensor(ff, dtype=f32),
            "chi": torch.tensor(sub.chi, dtype=f32),
            "log_gf": torch.tensor(sub.log_gf, dtype=f32),
            "log_gamma6": torch.tensor(sub.log_gamma6, dtype=f32),
            "vth2": torch.tensor(2.0 * ph.K_B / (sub.mass * ph.AMU) / 1e10, dtype=f32),  # (km/s)^2 per K
            "stark": torch.tensor(ph.stark_width_coefficient(lam, sub.n_lower, sub.n_upper), dtype=f32),
        }
        for key, val in list(g.items()):
            if isinstance(val, torch.Tensor):
                name = f"_{group}_{key}"
                g[key] = name
                self._buf(name, val)
        return g

    def _g(self, group: dict, key: str) -> torch.Tensor:
        return getattr(self, group[key])

    # ------------------------------------------------------------------------------------------
    def _log_populations(self, st: dict) -> torch.Tensor:
        """log10 of (absorbers in the lower level's species and stage)/(H atoms)/U, (B, S)."""
        feh, afe = st["feh"][:, None], st["afe"][:, None]
        t = st["t"]
        logu1 = ph.log_partition(t, self.a_logu1)
        logu2 = ph.log_partition(t, self.a_logu2)
        frac = ph.log_ion_fraction(st, logu1, logu2, self.a_chi_ion, self.a_stage)
        log_u = torch.where(self.a_stage == 2, logu2, logu1)
        metal = 1.0 - self.a_hydrogen
        log_pop = self.a_logeps + metal * (feh + self.a_alpha * afe + frac) - log_u
        # Hydrogen lines: N_H I / N_H = 1, U_H = 2 (handled through the table: logeps 0, U 2).
        parts = [log_pop]
        if self._mol_species:
            e = ph.ELEMENTS
            mol = ph.molecular_log_fractions(st, e["C"][1] - 12.0 + st["feh"], e["N"][1] - 12.0 + st["feh"],
                                             e["O"][1] - 12.0 + st["feh"] + st["afe"])
            ratio = st["w_giant"] * ph.C12_C13_GIANT + (1.0 - st["w_giant"]) * ph.C12_C13_DWARF
            log_f12 = torch.log10(ratio / (1.0 + ratio))
            log_f13 = -torch.log10(1.0 + ratio)
            log_um = ph.interp_extrap(t, torch.as_tensor(ph.MOL_PF_TEMPERATURES, dtype=t.dtype, device=t.device),
                                      self.m_logu)
            cols = []
            for s in self._mol_species:
                m, iso = s.split()
                iso_f = log_f13 if iso.startswith("13C") else (log_f12 if "12C" in iso else torch.zeros_like(t))
                cols.append(mol[m] + iso_f)
            parts.append(torch.stack(cols, dim=1) - log_um)
        return torch.cat(parts, dim=1)

    def _tau_voigt(self, st: dict, log_pop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.groups["voigt"]
        G = lambda k: self._g(g, k)  # noqa: E731
        t = st["t"][:, None]
        theta = st["theta"][:, None]
        v2 = G("vth2") * t + st["xi_kms"][:, None] ** 2  # (km/s)^2
        dld = G("lam") * torch.sqrt(v2) / C_KMS  # Doppler width, Angstrom (B, L)
        log_kc = ph.log_kappa_continuum(G("alpha_bf"), G("ff"), st["theta"], st["log_pe"])
        log_eta = (self.delta + ph.LOG_SQRT_PI_RE + G("log_lam2_cm") - torch.log10(dld * 1e-8) + G("log_gf")
                   - theta * G("chi") + log_pop[:, self.voigt_species] - log_kc)
        log_nh = math.log10(0.9) + st["log_pg"][:, None] - torch.log10(ph.K_B * t)
        gamma = ph.GAMMA_RAD + 10.0 ** (G("log_gamma6") + log_nh + 0.3 * torch.log10(t / 1e4))
        fwhm_l = G("lam2_fl") * gamma
        fwhm_g = 1.665 * dld
        prof = ph.pseudo_voigt(G("dx"), fwhm_g[..., None], fwhm_l[..., None])
        strength = (10.0 ** log_eta) * math.sqrt(math.pi) * dld
        return (strength[..., None] * prof * G("mask")).reshape(prof.shape[0], -1), G("idx")

    def _tau_hydrogen(self, st: dict, log_pop: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        g = self.groups["hydrogen"]
        G = lambda k: self._g(g, k)  # noqa: E731
        t = st["t_h"][:, None]
        theta = st["theta_h"][:, None]
        v2 = G("vth2") * t + st["xi_kms"][:, None] ** 2
        dld = G("lam") * torch.sqrt(v2) / C_KMS
        log_kc = ph.log_kappa_continuum(G("alpha_bf"), G("ff"), st["theta_h"], st["log_pe_h"])
        log_eta = (self.delta + ph.LOG_SQRT_PI_RE + G("log_lam2_cm") - torch.log10(dld * 1e-8) + G("log_gf")
                   - theta * G("chi") + log_pop[:, self.hydrogen_species] - log_kc)
        log_ne = st["log_pe_h"][:, None] - torch.log10(ph.K_B * t)
        w_stark = G("stark") * 10.0 ** (log_ne * (2.0 / 3.0))
        strength = ((10.0 ** log_eta) * math.sqrt(math.pi) * dld)[..., None]
        w_stark = w_stark[..., None]
        core = ph.hydrogen_profile(G("dx"), dld[..., None], w_stark)
        out = [((strength * core * G("mask")).reshape(core.shape[0], -1), G("idx"))]
        gw = self.groups["hydrogen_wing"]
        if len(gw["lines"]):
            wing = ph.stark_wing(self._g(gw, "dx"), w_stark)
            out.append(((strength * wing * self._g(gw, "mask")).reshape(wing.shape[0], -1), self._g(gw, "idx")))
        return out

    # ------------------------------------------------------------------------------------------
    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """labels (B, 4) float32 in LABEL_NAMES order -> noise-free normalised flux (B, P) float32."""
        if labels.dim() != 2 or labels.shape[-1] != 4:
            raise ValueError(f"labels must have shape (B, 4) in order {LABEL_NAMES}, got {tuple(labels.shape)}")
        labels = labels.to(dtype=torch.float32, device=self.a_logeps.device)
        if labels.shape[0] > STAR_CHUNK and labels.device.type == "cpu":
            return torch.cat([self._forward(x) for x in labels.split(STAR_CHUNK)], dim=0)
        return self._forward(labels)

    def _forward(self, labels: torch.Tensor) -> torch.Tensor:
        st = ph.layer(labels)
        log_pop = self._log_populations(st)
        B = labels.shape[0]
        tau = labels.new_zeros(B, self.n_os)
        parts = []
        if len(self.groups["voigt"]["lines"]):
            parts.append(self._tau_voigt(st, log_pop))
        if len(self.groups["hydrogen"]["lines"]):
            parts.extend(self._tau_hydrogen(st, log_pop))
        for vals, idx in parts:  # tau is summed over all lines before saturation
            tau = tau.index_add(1, idx, vals)
        out = []
        for i, s in enumerate(self._segs):
            tau_s = tau[:, s.offset:s.offset + s.n_total]
            dmax = ph.d_max(getattr(self, f"dmax_nodes{i}"), st["teff"]) @ getattr(self, f"dmax_interp{i}")
            absorb = dmax * tau_s / (dmax + tau_s)  # Minnaert-type saturation, 1 - r
            conv = torch.fft.irfft(torch.fft.rfft(absorb, dim=1) * getattr(self, f"lsf{i}"), n=s.n_total, dim=1)
            core = conv[:, s.pad:s.pad + s.n_os]
            out.append(core.reshape(B, s.n_pix, s.oversample).mean(dim=2))
        return 1.0 - torch.cat(out, dim=1)

    @torch.no_grad()
    def generate(self, labels, batch_size: int = 512,
                 progress: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
        """Bulk, no-grad generation in batches; `progress(done, total)` is called after each batch."""
        labels = torch.as_tensor(np.asarray(labels, dtype=np.float32) if not isinstance(labels, torch.Tensor)
                                 else labels, dtype=torch.float32)
        n = labels.shape[0]
        out = torch.empty(n, self.wavelength.size, dtype=torch.float32)
        for i in range(0, n, batch_size):
            out[i:i + batch_size] = self.forward(labels[i:i + batch_size]).cpu()
            if progress is not None:
                progress(min(i + batch_size, n), n)
        return out
