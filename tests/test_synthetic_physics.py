"""Physics of the synthetic generator: grids, label dependences, the sanity figures of docs/synthetic-spectra.md sec. 5, gradients."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from stellarlab.grids import (
    APOGEE_CHIP_RANGES,
    GALAH_ARMS,
    air_to_vacuum,
    apogee_chip_mask,
    apogee_wavelength,
    galah_wavelength,
    pixels_per_fwhm,
    survey_grid,
)
from stellarlab.synthetic import LABEL_NAMES, SpectrumGenerator, load_linelist

GIANT = [4800.0, 2.5, 0.0, 0.0]
SUN = [5777.0, 4.44, 0.0, 0.0]


@pytest.fixture(scope="module")
def apogee():
    return SpectrumGenerator("apogee")


@pytest.fixture(scope="module")
def galah():
    return SpectrumGenerator("galah")


@pytest.fixture(scope="module")
def lines():
    return {"apogee": load_linelist("apogee"), "galah": load_linelist("galah")}


def spectra(gen, *labels):
    with torch.no_grad():
        return gen(torch.tensor(labels, dtype=torch.float32)).double().numpy()


def window_ew(gen, flux, center, half=1.5):
    """Equivalent width (mA) of the full spectrum integrated over center +- half Angstrom."""
    w = gen.wavelength
    m = np.abs(w - center) <= half
    return 1000.0 * np.sum((1.0 - flux[..., m]) * np.gradient(w)[m], axis=-1)


def isolated_ew(lines, survey, species, wavelength, label):
    """EW (mA) of one line alone, over the whole grid (resolution-independent)."""
    ll = lines[survey]
    gen = SpectrumGenerator(survey, linelist=ll.select([ll.find(species, wavelength)]))
    f = spectra(gen, label)[0]
    return 1000.0 * np.sum((1.0 - f) * np.gradient(gen.wavelength))


# ---------------------------------------------------------------------------------------------- grids
def test_apogee_grid_facts():
    w = apogee_wavelength()
    assert w.shape == (8575,) and w.dtype == np.float64
    assert w[0] == pytest.approx(15100.80, abs=0.02)
    assert w[-1] == pytest.approx(16999.81, abs=0.02)
    mask = apogee_chip_mask()
    assert mask.sum() == 7514
    assert APOGEE_CHIP_RANGES == ((246, 3274), (3585, 6080), (6344, 8335))
    assert not mask[245] and mask[246] and mask[3273] and not mask[3274] and not mask[8335]
    ppf = pixels_per_fwhm(survey_grid("apogee"))
    assert ppf.min() == pytest.approx(3.22, abs=0.01) and ppf.max() == pytest.approx(3.22, abs=0.01)


def test_galah_grid_facts():
    w = galah_wavelength()
    assert w.shape == (16384,)
    for k, (lo, hi) in enumerate(GALAH_ARMS):
        arm = w[k * 4096:(k + 1) * 4096]
        assert arm[0] == pytest.approx(lo) and arm[-1] == pytest.approx(hi)
        assert np.all(np.diff(arm) > 0) and np.allclose(np.diff(arm), np.diff(arm)[0])
    ppf = pixels_per_fwhm(survey_grid("galah"))
    assert 3.4 < ppf.min() and ppf.max() < 4.0  # note: ~3.7 px per FWHM at R = 28000


def test_air_to_vacuum_matches_line_list():
    shift = air_to_vacuum(np.array([15100.0, 17000.0])) - np.array([15100.0, 17000.0])
    assert 4.0 < shift[0] < 4.7 and 4.0 < shift[1] < 4.7
    # Fe I 15207.526 air is listed at 15211.682 vacuum (docs/synthetic-spectra.md table 1a)
    assert air_to_vacuum(np.array([15207.526]))[0] == pytest.approx(15211.682, abs=0.002)


def test_unknown_survey_lists_valid_names():
    with pytest.raises(ValueError, match="apogee.*galah"):
        SpectrumGenerator("sdss")


def test_label_names():
    assert LABEL_NAMES == ("teff", "logg", "fe_h", "alpha_fe")


# ---------------------------------------------------------------------------------------------- basics
def test_flux_range_and_continuum(apogee, galah):
    labels = [SUN, GIANT, [3600.0, 0.8, 0.3, 0.0], [6800.0, 4.1, -2.0, 0.3]]
    for gen in (apogee, galah):
        f = spectra(gen, *labels)
        assert f.shape == (4, gen.wavelength.size)
        assert np.all(f > 0.0) and np.all(f <= 1.0 + 1e-5)
        # normalised to the true continuum: the highest pixels are ~1 (hot stars: overlapping Brackett wings)
        assert np.all(f.max(axis=1) > 0.998)
    # a solar-type star is mostly continuum in both bands (the H- continuum is the normalisation)
    for gen in (apogee, galah):
        sun = spectra(gen, SUN)[0]
        assert np.median(sun) > 0.995 and np.mean(sun > 0.99) > 0.75


def test_generate_matches_forward_and_is_deterministic(apogee):
    lab = torch.tensor([GIANT, SUN, [4200.0, 1.8, -0.7, 0.25]])
    a = apogee.generate(lab, batch_size=2)
    b = apogee.generate(lab.numpy(), batch_size=3)
    with torch.no_grad():
        c = apogee(lab)
    assert a.dtype == torch.float32 and a.shape == (3, 8575)
    assert torch.equal(a, apogee.generate(lab, batch_size=2))  # bit-identical on repeat
    assert torch.allclose(a, b, atol=1e-6)  # batching only changes float rounding
    assert torch.allclose(a, c, atol=1e-6)


# ---------------------------------------------------------------------------------------------- physics direction
def test_hotter_star_weaker_fe_lines(apogee):
    f = spectra(apogee, [4400.0, 2.5, 0.0, 0.0], [5400.0, 2.5, 0.0, 0.0])
    for center in (15211.68, 16169.45, 15198.65, 15494.57):  # Fe I, high and low excitation (vacuum)
        cool, hot = window_ew(apogee, f, center, 0.8)
        assert hot < cool, center


def test_lower_gravity_narrower_damping_wings(apogee, lines):
    low, high = (isolated_ew(lines, "apogee", "Mg 1", 15770.1, [4800.0, g, 0.0, 0.0]) for g in (1.5, 3.5))
    assert low < high
    assert low == pytest.approx(472, rel=0.3) and high == pytest.approx(744, rel=0.3)  # note: 472 vs 744 mA
    # in the full spectrum the far wing (1.0-1.6 A from the core) is deeper at high gravity
    f = spectra(apogee, [4800.0, 1.5, 0.0, 0.0], [4800.0, 3.5, 0.0, 0.0])
    w = apogee.wavelength
    wing = (np.abs(w - 15770.11) > 1.0) & (np.abs(w - 15770.11) < 1.6)
    assert np.mean(1 - f[1, wing]) > 1.3 * np.mean(1 - f[0, wing])


def test_lower_metallicity_weaker_metal_lines(apogee, galah):
    f = spectra(apogee, GIANT, [4800.0, 2.5, -1.0, 0.0])
    for center in (15211.68, 15770.11, 16723.52, 16155.18):  # Fe, Mg, Al, Ca
        rich, poor = window_ew(apogee, f, center, 0.8)
        assert poor < 0.85 * rich, center
    g = spectra(galah, GIANT, [4800.0, 2.5, -1.0, 0.0])
    rich, poor = window_ew(galah, g, 6494.98, 0.8)
    assert poor < rich


def test_ionised_lines_stronger_at_low_gravity(lines):
    low = isolated_ew(lines, "galah", "Fe 2", 6516.08, [4800.0, 1.5, 0.0, 0.0])
    high = isolated_ew(lines, "galah", "Fe 2", 6516.08, [4800.0, 3.5, 0.0, 0.0])
    assert low == pytest.approx(121, rel=0.3) and high == pytest.approx(52, rel=0.3)  # note: 121 vs 52 mA


def test_co_band_head_depth(apogee):
    w = apogee.wavelength
    lo, hi = air_to_vacuum(np.array([15978.0, 16000.0]))  # CO 5-2 head window (air, docs/synthetic-spectra.md sec. 5)
    m = (w > lo) & (w < hi)
    f = spectra(apogee, SUN, GIANT, [4000.0, 1.5, 0.0, 0.0], [3600.0, 0.8, 0.0, 0.0])
    depth = 1.0 - f[:, m].mean(axis=1)
    assert depth[0] < 0.02
    assert depth[1] == pytest.approx(0.08, rel=0.3)
    assert depth[2] == pytest.approx(0.18, rel=0.3)
    assert depth[3] == pytest.approx(0.24, rel=0.3)
    assert depth[2] > 10 * depth[0]


def test_brackett_lines_present(apogee, lines):
    ll = lines["apogee"]
    br = ll.select(ll.species == "H 1")
    assert len(br) == 10
    ew = isolated_ew(lines, "apogee", "H 1", 16811.18, [6500.0, 4.2, 0.0, 0.0])
    assert ew > 300.0  # Br11 is a strong, broad line in F dwarfs
    f = spectra(apogee, [6500.0, 4.2, 0.0, 0.0])[0]
    core = f[np.argmin(np.abs(apogee.wavelength - 16811.18))]
    assert core < 0.85


def test_balmer_lines_halpha_sun(galah, lines):
    ll = lines["galah"]
    gen = SpectrumGenerator("galah", linelist=ll.select([ll.find("H 1", 6562.8)]))
    w = gen.wavelength
    f = spectra(gen, SUN, [5777.0, 3.0, 0.0, 0.0], [5777.0, 4.44, -1.0, 0.0], [4800.0, 2.5, 0.0, 0.0],
                [6500.0, 4.2, 0.0, 0.0])
    m = np.abs(w - 6562.797) < 15.0
    depth = 1.0 - f[0, m].min()
    assert 0.70 <= depth <= 0.85  # note: 0.81
    assert np.interp(6564.797, w, f[0]) == pytest.approx(0.73, abs=0.05)  # r(+2 A)
    ew = np.sum((1.0 - f[:, m]) * np.gradient(w)[m], axis=1)
    assert ew[0] == pytest.approx(3.2, rel=0.3)
    assert abs(ew[1] - ew[0]) < 0.05 and abs(ew[2] - ew[0]) < 0.05  # Balmer wings barely see g or [Fe/H]
    assert ew[3] < ew[0] < ew[4]  # ... but are a Teff thermometer
    # H-beta present in the full spectrum
    full = spectra(galah, SUN)[0]
    assert full[np.argmin(np.abs(galah.wavelength - 4861.32))] < 0.3


# ---------------------------------------------------------------------------------------------- sanity figures
SANITY = [  # (survey, species, wavelength in the grid frame, expected EW mA for the 4800/2.5/0/0 giant; note sec. 5)
    ("apogee", "Fe 1", 15211.68, 224), ("apogee", "Fe 1", 16169.45, 225), ("apogee", "Fe 1", 15652.79, 155),
    ("apogee", "Fe 1", 15198.65, 107), ("apogee", "Fe 1", 15494.57, 120), ("apogee", "Mg 1", 15770.11, 527),
    ("apogee", "Al 1", 16723.52, 372), ("apogee", "K 1", 15172.52, 80),
    ("galah", "Fe 1", 6494.98, 242), ("galah", "Fe 1", 4891.49, 279), ("galah", "Fe 1", 6593.87, 144),
    ("galah", "Fe 1", 6498.94, 114), ("galah", "Fe 2", 6516.08, 81), ("galah", "Ba 2", 5853.67, 112),
    ("galah", "K 1", 7698.96, 186),
]


@pytest.mark.parametrize("survey,species,wavelength,expected", SANITY)
def test_design_note_equivalent_widths(lines, survey, species, wavelength, expected):
    assert isolated_ew(lines, survey, species, wavelength, GIANT) == pytest.approx(expected, rel=0.3)


def test_solar_and_metal_poor_figures(lines):
    # low-excitation Fe I is strongly T-sensitive: 21-24 mA in the Sun against >100 in the giant
    for wl in (15198.65, 15494.57):
        assert 15.0 < isolated_ew(lines, "apogee", "Fe 1", wl, SUN) < 32.0
    # strong Fe I roughly halves at [Fe/H] = -1 (note: 125 mA)
    assert isolated_ew(lines, "apogee", "Fe 1", 15211.68, [4800.0, 2.5, -1.0, 0.0]) == pytest.approx(125, rel=0.3)


def test_metallicity_rms_difference(apogee):
    f = spectra(apogee, GIANT, [4800.0, 2.5, -0.5, 0.0])
    mask = apogee.valid_mask
    rms = np.sqrt(np.mean((f[0, mask] - f[1, mask]) ** 2))
    assert rms == pytest.approx(0.027, rel=0.3)  # note sec. 5


# ---------------------------------------------------------------------------------------------- numerics
def test_window_samples_outside_grid_are_masked_not_clamped(lines):
    """A line just beyond the red end must absorb in the edge pixel only what its profile gives there."""
    ll = lines["apogee"]
    one = ll.select([ll.find("Fe 1", 15211.68)])
    w = apogee_wavelength()
    dv = 2.6 / 16999.81  # line 2.6 A (~46 km/s) beyond the last pixel: window reaches in, centre outside pad
    edge, mid = one.select([0]), one.select([0])
    edge.wavelength = np.array([w[-1] * (1 + dv)])
    mid.wavelength = np.array([w[6000] * (1 + dv)])
    fe = spectra(SpectrumGenerator("apogee", linelist=edge), GIANT)[0]
    fm = spectra(SpectrumGenerator("apogee", linelist=mid), GIANT)[0]
    a_edge, a_mid = 1 - fe[-1], 1 - fm[6000]
    assert a_edge < 1.2 * a_mid + 1e-6 and a_edge < 0.01


def test_gradients_finite_and_match_finite_differences(apogee):
    lab = torch.tensor([GIANT], requires_grad=True)
    f = apogee(lab)
    weights = torch.from_numpy(apogee.valid_mask.astype(np.float32))
    (f * weights).sum().backward()
    grad = lab.grad[0]
    assert torch.all(torch.isfinite(grad)) and torch.all(grad != 0)
    jac = torch.func.jacfwd(apogee)(lab.detach())[0, :, 0, :]  # (P, 4)
    assert torch.allclose((jac * weights[:, None]).sum(0), grad, rtol=1e-3, atol=1e-6)
    steps = (10.0, 0.02, 0.01, 0.01)  # the note's prototype steps
    for i, h in enumerate(steps):
        d = torch.zeros(1, 4)
        d[0, i] = h
        with torch.no_grad():
            fd = (apogee(lab.detach() + d) - apogee(lab.detach() - d))[0] / (2 * h)
        col = jac[:, i]
        assert torch.all(torch.isfinite(col)) and col.abs().max() > 0
        assert ((fd - col).norm() / col.norm()).item() < 0.02, LABEL_NAMES[i]
