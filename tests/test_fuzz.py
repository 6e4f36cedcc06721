"""Fuzzing the readers and the config validation with hypothesis.

Property: a reader given any file returns finite native float32 arrays of the right shape (flux 1 and
weight 0 at unusable pixels), or raises the project's documented error (`StellarlabError`: DataError
for data, ConfigError for config). Any other exception is a bug: a user would see a library traceback.
For config values: validation either refuses a value with a ConfigError naming the key, or the value
really works in the code that consumes it (torch's optimizer, the survey generator, the split, Lightning's
Trainer, the model constructors), so the checks are as strict as the consumers and no stricter than needed.

Deterministic (derandomize, no example database) and modest in size, so CI time stays small.
"""

from __future__ import annotations

import copy
import io
import math
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf, open_dict

from stellarlab.data.apogee.files import (
    PixelConfig,
    load_spectrum,
    read_apstar,
    read_aspcapstar,
    spectrum_arrays,
)
from stellarlab.errors import ConfigError, DataError, StellarlabError
from stellarlab.grids import APOGEE_DLOGLAM, APOGEE_LOGLAM0, APOGEE_NPIX
from tests.conftest import TINY, compose_config

pytestmark = pytest.mark.filterwarnings("ignore")  # astropy's truncation/verify warnings, numpy's overflow-in-cast: expected here

FUZZ = settings(
    # no shrinking: a failing example of 8575-pixel arrays takes minutes to shrink, and is printed as drawn
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)

SPECIAL = [np.nan, np.inf, -np.inf, 0.0, -0.0, -1.0, 1.0, 1e-30, 1e30, 3.4e38, 1e300, -1e300, 5e-324, 1e-45]
FITS_DTYPES = [">f8", "<f8", ">f4", "<f4", ">i2", "<i2", "u1", ">i4", ">i8"]


# -- arrays ---------------------------------------------------------------------------------------
@st.composite
def values(draw, shape, dtype):
    """An array of `shape` and `dtype`: a base pattern with special values, NaN runs and sometimes all NaN."""
    size = int(np.prod(shape, dtype=np.int64))
    base = draw(st.sampled_from(["ones", "noise", "zeros", "counts", "errors"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    arr = {
        "ones": np.ones(size),
        "noise": 1.0 + 0.05 * rng.standard_normal(size),
        "zeros": np.zeros(size),
        "counts": 600.0 * (1.0 + 0.05 * rng.standard_normal(size)),
        "errors": np.abs(0.01 * (1.0 + rng.standard_normal(size))),
    }[base]
    if size:
        for index, value in draw(st.lists(st.tuples(st.integers(0, size - 1), st.sampled_from(SPECIAL)), max_size=12)):
            arr[index] = value
        if draw(st.booleans()):
            start = draw(st.integers(0, size - 1))
            arr[start : start + draw(st.integers(1, 3000))] = draw(st.sampled_from([np.nan, np.inf, 0.0, -5.0]))
        if draw(st.integers(0, 9)) == 0:
            arr[:] = np.nan
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        arr = np.clip(np.nan_to_num(arr, nan=0, posinf=info.max, neginf=info.min), info.min, info.max)
    with np.errstate(all="ignore"):
        return arr.reshape(shape).astype(dtype)


SHAPES_1D = [(APOGEE_NPIX,)] * 6 + [(7514,), (APOGEE_NPIX - 1,), (APOGEE_NPIX + 1,), (0,), (1,)]
SHAPES_2D = [(3, APOGEE_NPIX), (1, APOGEE_NPIX), (2, APOGEE_NPIX), (0, APOGEE_NPIX), (2, 8000), (2, 2, APOGEE_NPIX)]


@st.composite
def image_hdu(draw, mask: bool = False):
    """An extension: image data of a random shape/dtype/byte order (or none, or a table), with a random grid header."""
    kind = draw(st.sampled_from(["image"] * 8 + ["empty", "table"]))
    header = fits.Header()
    crval = draw(st.sampled_from([None, APOGEE_LOGLAM0, APOGEE_LOGLAM0, 4.2, "abc", True, 1e300, -4.179]))
    cdelt = draw(st.sampled_from([None, APOGEE_DLOGLAM, APOGEE_DLOGLAM, 1e-5, "x", 0]))
    if crval is not None:
        header["CRVAL1"] = crval
    if cdelt is not None:
        header["CDELT1"] = cdelt
    if kind == "empty":
        return fits.ImageHDU(None, header=header)
    if kind == "table":
        return fits.BinTableHDU.from_columns([fits.Column(name="FLUX", format="E", array=np.ones(APOGEE_NPIX, np.float32))])
    shape = draw(st.sampled_from(SHAPES_1D + SHAPES_2D))
    dtype = draw(st.sampled_from([">i8", ">i4", "<i2", "u1", ">f4"] if mask and draw(st.booleans()) else FITS_DTYPES))
    return fits.ImageHDU(draw(values(shape, dtype)), header=header)


def _patch_naxis1(raw: bytes, value: str) -> bytes:
    """Make HDU1's header lie about its length: replace the value of its NAXIS1 card."""
    at = raw.find(b"NAXIS1  =", 2880)
    if at < 0:
        return raw
    card = (b"NAXIS1  = " + value.encode().rjust(20)).ljust(80)
    return raw[:at] + card + raw[at + 80 :]


class Blob(bytes):
    """File contents that print as their size, not as 300 kB of bytes, in a failing example."""

    def __repr__(self) -> str:
        return f"<{len(self)} bytes>"


@st.composite
def fits_bytes(draw):
    """A FITS file with 0-5 random extensions, sometimes with a lying NAXIS1."""
    n = draw(st.sampled_from([0, 1, 2, 3, 3, 4, 4, 4, 5]))
    hdus = [fits.PrimaryHDU()] + [draw(image_hdu(mask=i == 2)) for i in range(n)]
    buf = io.BytesIO()
    fits.HDUList(hdus).writeto(buf, output_verify="silentfix")
    raw = buf.getvalue()
    naxis1 = draw(st.sampled_from([None] * 6 + ["8574", "9000", "0", "-1", "'abc'", "99999999"]))
    return Blob(raw if naxis1 is None else _patch_naxis1(raw, naxis1))


def pixel_config(draw_source: str, gap_deleted: bool, pixmask: int) -> PixelConfig:
    return PixelConfig(source=draw_source, gap_deleted=gap_deleted, pixmask=pixmask)


def assert_valid_spectrum(flux: np.ndarray, weight: np.ndarray, n_pixels: int) -> None:
    """What every reader promises: native float32 (n_pixels,), finite, weight >= 0, flux 1 where weight is 0."""
    for arr in (flux, weight):
        assert arr.dtype == np.float32 and arr.dtype.isnative, arr.dtype
        assert arr.shape == (n_pixels,), arr.shape
        assert np.isfinite(arr).all()
    assert (weight >= 0).all()
    assert (flux[weight == 0] == 1.0).all()


def load_or_data_error(path: Path, cfg: PixelConfig):
    try:
        return load_spectrum(path, cfg)
    except DataError:
        return None


# -- the FITS readers -------------------------------------------------------------------------------
@settings(FUZZ, max_examples=150)
@given(raw=fits_bytes(), source=st.sampled_from(["aspcapStar", "apStar"]), gap_deleted=st.booleans(),
       pixmask=st.sampled_from([0, 0b1111, 1 << 12]))
def test_apogee_readers_return_valid_arrays_or_a_data_error(raw, source, gap_deleted, pixmask, tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "fuzz-apogee.fits"
    path.write_bytes(raw)
    cfg = pixel_config(source, gap_deleted, pixmask)
    loaded = load_or_data_error(path, cfg)
    if loaded is not None:
        assert_valid_spectrum(*loaded, cfg.n_pixels)
    # the readers on their own: native float32 flux and error of 8575 pixels (int64 mask), or a DataError
    try:
        arrays = read_aspcapstar(path) if source == "aspcapStar" else read_apstar(path)
    except DataError:
        return
    for arr in arrays[:2]:
        assert arr.dtype == np.float32 and arr.dtype.isnative and arr.shape == (APOGEE_NPIX,)
    if source == "apStar":
        assert arrays[2].dtype == np.int64 and arrays[2].shape == (APOGEE_NPIX,)


@pytest.fixture(scope="module")
def valid_fits(tmp_path_factory) -> dict[str, bytes]:
    """The bytes of one good aspcapStar and one good apStar file (two rows), to cut and corrupt."""
    from stellarlab.data.apogee.mock import write_apstar, write_aspcapstar

    folder = tmp_path_factory.mktemp("valid-fits")
    flux = 1.0 + 0.02 * np.random.default_rng(1).standard_normal(APOGEE_NPIX)
    rows = np.vstack([600 * flux, 600 * flux])
    return {
        "aspcapStar": write_aspcapstar(folder / "aspcapStar.fits", flux, np.full(APOGEE_NPIX, 0.01)).read_bytes(),
        "apStar": write_apstar(folder / "apStar.fits", rows, np.full_like(rows, 6.0), np.zeros(rows.shape, np.int64)).read_bytes(),
    }


@settings(FUZZ, max_examples=120)
@given(source=st.sampled_from(["aspcapStar", "apStar"]), cut=st.floats(0.0, 1.0), flips=st.lists(
    st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 255)), max_size=8))
def test_truncated_or_corrupted_fits_files(source, cut, flips, tmp_path_factory, valid_fits):
    """A download cut at any byte, or bytes overwritten anywhere (header or data): valid arrays or a DataError."""
    data = bytearray(valid_fits[source][: int(len(valid_fits[source]) * cut)])
    for where, byte in flips:
        if data:
            data[int(where * len(data))] = byte
    path = tmp_path_factory.getbasetemp() / f"fuzz-cut-{source}"
    path.write_bytes(bytes(data))
    cfg = PixelConfig(source=source, pixmask=0b1111)
    loaded = load_or_data_error(path, cfg)
    if loaded is not None:
        assert_valid_spectrum(*loaded, cfg.n_pixels)


@settings(FUZZ, max_examples=150)
@given(data=st.data(), source=st.sampled_from(["aspcapStar", "apStar"]), gap_deleted=st.booleans(),
       dtype=st.sampled_from([">f8", "<f8", ">f4", "<f4", "<f2", ">i2", "u1"]), pixmask=st.sampled_from([0, 0b1111]))
def test_spectrum_arrays_on_any_dtype_byte_order_and_nan_pattern(data, source, gap_deleted, dtype, pixmask):
    """The preprocessing itself, fed arrays as a caller might (not only the readers' native float32)."""
    flux = data.draw(values((APOGEE_NPIX,), dtype))
    err = data.draw(values((APOGEE_NPIX,), dtype))
    mask = data.draw(values((APOGEE_NPIX,), data.draw(st.sampled_from([">i8", "<i4", "u1"])))) if source == "apStar" else None
    cfg = PixelConfig(source=source, gap_deleted=gap_deleted, pixmask=pixmask)
    assert_valid_spectrum(*spectrum_arrays(flux, err, mask, cfg), cfg.n_pixels)


# -- npy readers ----------------------------------------------------------------------------------
NPY_DTYPES = ["<f4", ">f4", ">f8", "<f2", "<i2", "u1", "?", "<c8", "<U3", "<m8[s]", "O"]


def _save_npy(path: Path, arr: np.ndarray, fortran: bool, cut: float | None) -> None:
    if fortran:
        arr = np.asfortranarray(arr)
    np.save(path, arr, allow_pickle=True)
    if cut is not None:
        raw = path.read_bytes()
        path.write_bytes(raw[: int(len(raw) * cut)])


@st.composite
def npy_array(draw, pixels: list[int], n_columns: int | None = None):
    dtype = draw(st.sampled_from(["<f4"] * 6 + NPY_DTYPES))
    n = draw(st.sampled_from([0, 1, 2, 5, 12, 12, 12]))
    width = n_columns if n_columns is not None else draw(st.sampled_from(pixels))
    shape = draw(st.sampled_from([(n, width)] * 6 + [(width,), (n, width, 1), ()]))
    if np.dtype(dtype).kind in "UmO?c":
        with np.errstate(all="ignore"):
            base = draw(values(shape, "<f8"))
            return base.astype(dtype) if dtype != "O" else base.astype(object)
    return draw(values(shape, dtype))


@settings(FUZZ, max_examples=80)
@given(data=st.data(), fortran=st.booleans(), cut=st.sampled_from([None] * 6 + [0.0, 0.05, 0.5, 0.99]),
       which=st.sampled_from(["spectra.npy", "labels.npy"]), transform=st.sampled_from(["none", "log"]))
def test_galah4_reader_returns_finite_tensors_or_a_stellarlab_error(data, fortran, cut, which, transform, tmp_path_factory):
    from stellarlab.data.galah.galah4 import GALAH4DataModule

    root = tmp_path_factory.getbasetemp() / "fuzz-galah4"
    root.mkdir(exist_ok=True)
    spectra = data.draw(npy_array([16384, 16384, 16383, 8575, 0]))
    labels = data.draw(npy_array([8], n_columns=data.draw(st.sampled_from([8, 8, 8, 7]))))
    _save_npy(root / "spectra.npy", spectra, fortran, cut if which == "spectra.npy" else None)
    _save_npy(root / "labels.npy", labels, fortran, cut if which == "labels.npy" else None)
    dm = GALAH4DataModule(root=str(root), labels=["teff", "logg"], split=[0.6, 0.2, 0.2], batch_size=1,
                          flux_transform=transform, snr_min=data.draw(st.sampled_from([None, None, 0.0, 50.0])))
    try:
        dm.setup()
    except StellarlabError:
        return
    for split in dm.tensors.values():
        flux, weight = split["flux"].numpy(), split["weight"].numpy()
        assert flux.dtype == np.float32 and flux.ndim == 2 and flux.shape[1] == 16384
        assert np.isfinite(flux).all() and np.isfinite(weight).all() and (weight >= 0).all()
        assert (flux[weight == 0] == 1.0).all()
        assert np.isfinite(split["labels"].numpy()).any(axis=1).all()  # every kept row has a label


@settings(FUZZ, max_examples=80)
@given(data=st.data(), fortran=st.booleans(), cut=st.sampled_from([None] * 6 + [0.0, 0.3, 0.9]),
       preprocessing=st.sampled_from([{}, {"flux_transform": "log", "flux_floor": 0.2}]),
       resample=st.booleans())
def test_predict_npy_reader_returns_finite_spectra_or_a_data_error(data, fortran, cut, preprocessing, resample, tmp_path_factory):
    from stellarlab.grids import apogee_wavelength
    from stellarlab.results.prediction import read_spectra

    folder = tmp_path_factory.getbasetemp() / "fuzz-predict"
    folder.mkdir(exist_ok=True)
    flux = data.draw(npy_array([APOGEE_NPIX, APOGEE_NPIX, 4000, 1, 0]))
    _save_npy(folder / "flux.npy", flux, fortran, cut)
    wavelength = apogee_wavelength()
    input_wavelength = None
    if resample:
        n = flux.shape[-1] if flux.ndim else 1
        wave = data.draw(st.sampled_from(["inside", "outside", "reversed", "short", "nan", "2-D", "garbage"]))
        grid = {"inside": np.linspace(15000, 17100, n), "outside": np.linspace(5000, 6000, n),
                "reversed": np.linspace(17100, 15000, n), "short": np.linspace(15000, 17100, max(n - 1, 0)),
                "nan": np.full(n, np.nan), "2-D": np.ones((2, n)), "garbage": None}[wave]
        if grid is None:
            (folder / "wave.npy").write_bytes(b"\x93NUMPY garbage")
        else:
            np.save(folder / "wave.npy", grid)
        input_wavelength = str(folder / "wave.npy")
    try:
        spectra = read_spectra([folder / "flux.npy"], "auto", preprocessing, wavelength, input_wavelength)
    except DataError:
        return
    assert spectra.flux.dtype == np.float32 and spectra.weight.dtype == np.float32
    assert spectra.flux.shape == spectra.weight.shape == (len(spectra.ids), APOGEE_NPIX)
    assert np.isfinite(spectra.flux).all() and np.isfinite(spectra.weight).all() and (spectra.weight >= 0).all()
    assert (spectra.flux[spectra.weight == 0] == 1.0).all()


# -- config validation ------------------------------------------------------------------------------
SIZES = st.one_of(  # layer widths: any shape of value, but integers small enough to allocate
    st.lists(st.one_of(st.integers(-2, 512), st.sampled_from([0.5, 8.0, None, "x", math.nan])), max_size=4),
    st.sampled_from([0, 64, -1, "abc", None, 1.5, [], [64], [8, 16, 32], [8, 16]]),
)
ANY_VALUE = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.integers(-(2**40), 2**40),
    st.sampled_from([0, 1, -1, 2, 0.5, 1.0, 1e-3, 3e4, "1e-3", "abc", "", "auto", True, False, None]),
    st.lists(st.one_of(st.floats(-2, 2000), st.integers(-3, 2000), st.sampled_from([None, "x", math.nan])), max_size=4),
)


class _Keep:
    def __repr__(self) -> str:
        return "KEEP"


KEEP = _Keep()  # leave the config's own (valid) value: most examples then break one or two keys, not all


def maybe(strategy):
    return st.one_of(st.just(KEEP), strategy)


@pytest.fixture(scope="module")
def base_cfg(tmp_path_factory):
    return compose_config([*TINY, "data.n_stars=50"], tmp_path=tmp_path_factory.mktemp("fuzz-config"))


def with_values(base, **updates):
    cfg = copy.deepcopy(base)
    with open_dict(cfg):
        for key, value in updates.items():
            if value is KEEP:
                continue
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    return cfg


def validated(cfg, *keys: str) -> bool:
    """True if validation accepts cfg; a refusal must be a ConfigError naming one of `keys`."""
    from stellarlab.run.validation import validate_train_config

    try:
        validate_train_config(cfg)
    except ConfigError as err:
        assert any(k in str(err) for k in keys), str(err)
        return False
    return True


def plain(cfg, key):
    value = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


@settings(FUZZ, max_examples=60)
@given(lr=maybe(ANY_VALUE), weight_decay=maybe(ANY_VALUE), optimizer=st.sampled_from(["adam", "adamw", "sgd"]), momentum=maybe(ANY_VALUE))
def test_optimizer_values_are_refused_or_accepted_by_torch(base_cfg, lr, weight_decay, optimizer, momentum):
    import torch

    base = with_values(base_cfg, optimizer=OmegaConf.load(Path("conf/optimizer") / f"{optimizer}.yaml"))
    updates = {"optimizer.lr": lr, "optimizer.weight_decay": weight_decay}
    if optimizer == "sgd":
        updates["optimizer.momentum"] = momentum
    cfg = with_values(base, **updates)
    if not validated(cfg, "optimizer.lr", "optimizer.weight_decay", "optimizer.momentum"):
        return
    import hydra

    hydra.utils.instantiate(cfg.optimizer)(params=[torch.zeros(2, requires_grad=True)])


@settings(FUZZ, max_examples=100)
@given(snr=maybe(ANY_VALUE), split=maybe(ANY_VALUE), n_stars=maybe(ANY_VALUE), batch_size=maybe(ANY_VALUE),
       per_star=st.sampled_from([1, 1, 2, 0, 1.5]))
def test_data_values_are_refused_or_work_in_the_generator_and_the_split(base_cfg, snr, split, n_stars, batch_size, per_star):
    from stellarlab.data.split import resolve_split_sizes
    from stellarlab.synthetic.survey import _canonical_params

    cfg = with_values(base_cfg, **{"data.snr": snr, "data.split": split, "data.n_stars": n_stars, "data.batch_size": batch_size,
                                   "data.spectra_per_star": per_star})
    if not validated(cfg, "data.snr", "data.split", "data.n_stars", "data.batch_size", "data.spectra_per_star"):
        return
    snr, split, n_stars = plain(cfg, "data.snr"), plain(cfg, "data.split"), plain(cfg, "data.n_stars")
    _canonical_params("apogee", n_stars, tuple(snr) if isinstance(snr, list) else snr, 1, per_star, False, 1)
    n_train, n_val, n_test = resolve_split_sizes(split, n_stars)
    assert n_train >= 1 and n_val >= 1 and n_train + n_val + n_test <= n_stars
    assert 1 <= plain(cfg, "data.batch_size") <= n_train * per_star
    # the DataModule's own constructor agrees (it does not generate anything until prepare_data)
    import hydra

    hydra.utils.instantiate(cfg.data)


@settings(FUZZ, max_examples=60)
@given(snr=ANY_VALUE, n_stars=ANY_VALUE, per_star=ANY_VALUE, seed=ANY_VALUE, survey=st.sampled_from(["apogee", "galah", "sdss", 3]))
def test_synthetic_data_module_constructor_raises_only_config_errors(snr, n_stars, per_star, seed, survey, tmp_path_factory):
    """Called directly (as a notebook would), the constructor refuses bad values with a ConfigError, not a TypeError."""
    from stellarlab.data.synthetic import SyntheticDataModule

    try:
        SyntheticDataModule(survey=survey, snr=snr, n_stars=n_stars, spectra_per_star=per_star, seed=seed,
                            cache_dir=str(tmp_path_factory.getbasetemp() / "unused"))
    except ConfigError:
        pass


@settings(FUZZ, max_examples=60)
@given(max_epochs=maybe(ANY_VALUE),
       precision=maybe(st.one_of(ANY_VALUE, st.sampled_from(["32-true", "bf16-mixed", "16-mixed", "16mixed", "64", "bf16-true",
                                                             "transformer-engine", "32"]))),
       devices=maybe(st.one_of(ANY_VALUE, st.sampled_from([1, "auto", -1, [0], [0, 1], "2", 2]))))
def test_trainer_values_are_refused_or_accepted_by_lightning(base_cfg, max_epochs, precision, devices):
    cfg = with_values(base_cfg, **{"trainer.max_epochs": max_epochs, "trainer.precision": precision, "trainer.devices": devices})
    if not validated(cfg, "trainer.max_epochs", "trainer.precision", "trainer.devices", "scheduler.T_max"):
        return
    import hydra

    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                      enable_model_summary=False, default_root_dir=str(Path(cfg.paths.output_dir)))
    assert trainer.fit_loop.max_epochs is None or isinstance(trainer.fit_loop.max_epochs, int)  # the fit loop asserts this


@settings(FUZZ, max_examples=80)
@given(model=st.sampled_from(["mlp", "cnn", "knn", "ridge"]), hidden=maybe(SIZES), dropout=maybe(ANY_VALUE), k=maybe(ANY_VALUE),
       alpha=maybe(ANY_VALUE), channels=maybe(SIZES), activation=maybe(st.sampled_from(["gelu", "relu", "rleu", "", "GELU"])))
def test_model_values_are_refused_or_build_a_model(base_cfg, model, hidden, dropout, k, alpha, channels, activation):
    import hydra

    base = with_values(base_cfg, model=OmegaConf.load(Path("conf/model") / f"{model}.yaml"))
    updates = {"mlp": {"model.hidden_sizes": hidden, "model.dropout": dropout, "model.activation": activation},
               "cnn": {"model.channels": channels, "model.hidden_sizes": hidden, "model.dropout": dropout},
               "knn": {"model.k": k}, "ridge": {"model.alpha": alpha}}[model]
    cfg = with_values(base, **updates)
    if not validated(cfg, *updates):
        return
    spec = {"n_pixels": 256, "label_names": ["teff"], "label_mean": [5000.0], "label_std": [500.0]}
    try:
        hydra.utils.instantiate(cfg.model, **spec)
    except Exception as err:  # Hydra wraps constructor errors: the cause must be a ConfigError (data-dependent checks)
        from stellarlab.errors import root_cause

        assert isinstance(root_cause(err), ConfigError), repr(err)
