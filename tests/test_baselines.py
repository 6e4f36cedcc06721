"""`model=ridge` and `model=knn`: the same numbers as scikit-learn, and the same train.py path as the networks."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from sklearn.linear_model import Ridge
from sklearn.neighbors import KNeighborsRegressor

import train as train_script
from stellarlab.errors import ConfigError
from stellarlab.models import knn as knn_module
from stellarlab.models.knn import KNNRegressor
from stellarlab.models.losses import masked_mse
from stellarlab.models.ridge import RidgeRegressor
from tests.conftest import compose_config

LABELS = ["teff", "logg", "fe_h"]


def arrays(n: int, p: int, seed: int = 0, n_query: int = 25):
    """Spectrum-like flux in (0.3, 1), labels linear in the depth plus noise, and unseen query spectra."""
    rng = np.random.default_rng(seed)
    flux = rng.uniform(0.3, 1.0, (n + n_query, p)).astype(np.float32)
    coef = rng.normal(size=(p, 3))
    labels = ((1 - flux) @ coef / np.sqrt(p) + 0.3 * rng.normal(size=(n + n_query, 3))).astype(np.float32)
    return flux[:n], labels[:n], flux[n:], labels[n:]


def fitted(cls, flux, labels, **kwargs):
    model = cls(flux.shape[1], LABELS, **kwargs)
    model.fit(flux, labels)
    return model


def predict(model, flux) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(flux)).numpy()


def mse(pred, target) -> float:
    return float(masked_mse(torch.as_tensor(pred, dtype=torch.float32), torch.as_tensor(target, dtype=torch.float32)))


# -- ridge against scikit-learn ------------------------------------------------------------------
@pytest.mark.parametrize("n, p", [(60, 40), (30, 80)], ids=["primal-n>p", "dual-n<p"])
@pytest.mark.parametrize("alpha", [0.01, 3.0])
def test_ridge_matches_sklearn_with_intercept(n, p, alpha):
    flux, labels, query, _ = arrays(n, p)
    model = fitted(RidgeRegressor, flux, labels, alpha=alpha)
    ref = Ridge(alpha=alpha).fit(1.0 - flux.astype(np.float64), labels)
    np.testing.assert_allclose(predict(model, query), ref.predict(1.0 - query.astype(np.float64)), atol=1e-5)
    np.testing.assert_allclose(model.net.weight.numpy(), ref.coef_, atol=1e-5)
    np.testing.assert_allclose(model.net.bias.numpy(), ref.intercept_, atol=1e-5)
    assert model.chosen == alpha


def test_ridge_missing_labels_are_fitted_on_the_rows_that_have_them():
    flux, labels, query, _ = arrays(50, 30, seed=1)
    labels[::3, 1] = np.nan  # log g missing for a third of the stars; the other labels complete
    pred = predict(fitted(RidgeRegressor, flux, labels, alpha=0.5), query)
    for j in range(3):
        known = np.isfinite(labels[:, j])
        ref = Ridge(alpha=0.5).fit(1.0 - flux[known].astype(np.float64), labels[known, j])
        np.testing.assert_allclose(pred[:, j], ref.predict(1.0 - query.astype(np.float64)), atol=1e-5)


def test_ridge_alpha_list_keeps_the_lowest_validation_loss():
    flux, labels, val_flux, val_labels = arrays(40, 60, seed=2, n_query=30)
    alphas = [1e-3, 0.1, 1.0, 10.0, 1e3]
    model = RidgeRegressor(60, LABELS, alpha=alphas)
    tuning = model.fit(flux, labels, val_flux, val_labels)
    singles = {a: fitted(RidgeRegressor, flux, labels, alpha=a) for a in alphas}  # independent single-alpha fits
    expected = {a: mse(predict(m, val_flux), val_labels) for a, m in singles.items()}
    assert list(tuning) == [repr(a) for a in alphas]
    np.testing.assert_allclose([tuning[repr(a)] for a in alphas], [expected[a] for a in alphas], rtol=1e-5)
    best = min(alphas, key=expected.get)
    assert best not in (alphas[0], alphas[-1])  # the data make the choice non-trivial
    assert model.chosen == best
    np.testing.assert_allclose(predict(model, val_flux), predict(singles[best], val_flux), atol=1e-6)


# -- knn against scikit-learn ---------------------------------------------------------------------
@pytest.mark.parametrize("weights", ["uniform", "distance"])
@pytest.mark.parametrize("k", [1, 5])
def test_knn_matches_sklearn(weights, k):
    flux, labels, query, _ = arrays(80, 50, seed=3)
    query = np.concatenate([query, flux[:3]])  # three queries identical to training spectra (distance 0)
    model = fitted(KNNRegressor, flux, labels, k=k, weights=weights)
    ref = KNeighborsRegressor(n_neighbors=k, weights=weights).fit(1.0 - flux.astype(np.float64), labels)
    expected = ref.predict(1.0 - query.astype(np.float64))
    np.testing.assert_allclose(predict(model, query), expected, atol=1e-5)
    if weights == "distance":  # an exact match is the prediction, as in scikit-learn
        np.testing.assert_allclose(predict(model, flux[:3]), labels[:3], atol=1e-6)


def test_knn_in_many_small_blocks_gives_the_same_predictions(monkeypatch):
    flux, labels, query, _ = arrays(80, 50, seed=4, n_query=40)
    model = fitted(KNNRegressor, flux, labels, k=7, weights="distance")
    whole = predict(model, query)
    monkeypatch.setattr(knn_module, "BLOCK_ELEMENTS", 7 * 50 * 3)  # 3 queries per block
    np.testing.assert_array_equal(predict(model, query), whole)


def test_knn_missing_labels_use_the_nearest_stars_that_have_them():
    flux, labels, query, _ = arrays(60, 40, seed=5)
    labels[::2, 2] = np.nan
    pred = predict(fitted(KNNRegressor, flux, labels, k=4, weights="distance"), query)
    for j in range(3):
        known = np.isfinite(labels[:, j])
        ref = KNeighborsRegressor(4, weights="distance").fit(1.0 - flux[known].astype(np.float64), labels[known, j])
        np.testing.assert_allclose(pred[:, j], ref.predict(1.0 - query.astype(np.float64)), atol=1e-5)


def test_knn_k_list_keeps_the_lowest_validation_loss():
    flux, labels, val_flux, val_labels = arrays(100, 30, seed=6, n_query=40)
    ks = [1, 3, 10, 30, 100]
    model = KNNRegressor(30, LABELS, k=ks, weights="uniform")
    tuning = model.fit(flux, labels, val_flux, val_labels)
    expected = {k: mse(KNeighborsRegressor(k).fit(1.0 - flux, labels).predict(1.0 - val_flux), val_labels) for k in ks}
    np.testing.assert_allclose([tuning[str(k)] for k in ks], [expected[k] for k in ks], rtol=1e-5)
    best = min(ks, key=expected.get)
    assert best not in (ks[0], ks[-1])
    assert model.chosen == best


def test_knn_checkpoint_state_carries_the_training_set():
    flux, labels, query, _ = arrays(30, 20, seed=7)
    model = fitted(KNNRegressor, flux, labels, k=3)
    fresh = KNNRegressor(20, LABELS, k=3)
    assert fresh.train_depth.shape == (0, 20)
    fresh.load_state_dict(model.state_dict())  # buffers take the checkpoint's training-set size
    assert fresh.train_depth.shape == (30, 20) and fresh.chosen == 3
    np.testing.assert_array_equal(predict(fresh, query), predict(model, query))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls, kwargs", [(KNNRegressor, {"k": 5, "weights": "distance"}), (RidgeRegressor, {"alpha": 0.1})])
def test_cuda_fit_and_predictions_match_cpu(cls, kwargs):
    flux, labels, query, _ = arrays(70, 90, seed=8)
    cpu = fitted(cls, flux, labels, **kwargs)
    gpu = cls(90, LABELS, **kwargs).cuda()
    gpu.fit(flux, labels)
    with torch.no_grad():
        out = gpu(torch.as_tensor(query).cuda()).cpu().numpy()
    np.testing.assert_allclose(out, predict(cpu, query), atol=1e-4)


# -- configuration and clear errors --------------------------------------------------------------
@pytest.mark.parametrize("name, cls", [("ridge", RidgeRegressor), ("knn", KNNRegressor)])
def test_config_builds_ignores_the_optimizer_and_predicts_the_mean_before_fitting(name, cls, tmp_path, caplog):
    cfg = compose_config([f"model={name}"], tmp_path=tmp_path)
    spec = {"n_pixels": 8575, "label_names": LABELS, "label_mean": [4800.0, 2.5, -0.2], "label_std": [700.0, 1.2, 0.4]}
    with caplog.at_level(logging.INFO, logger="stellarlab.models"):
        model = hydra.utils.instantiate(cfg.model, **spec, optimizer=cfg.optimizer, scheduler=cfg.get("scheduler"))
    assert isinstance(model, cls)
    assert "optimizer and scheduler configs are ignored" in caplog.text
    assert model.configure_optimizers() == []
    flux = torch.rand(2, 8575)
    assert torch.equal(model(flux), torch.zeros(2, 3))
    np.testing.assert_allclose(model.predict_physical(flux).numpy(), [[4800.0, 2.5, -0.2]] * 2, rtol=1e-6)


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (RidgeRegressor, {"alpha": 0.0}, r"model\.alpha=0\.0 is not valid: it must be numbers > 0; e\.g\. model\.alpha="),
        (RidgeRegressor, {"alpha": [1.0, -1.0]}, r"model\.alpha=\[1\.0,-1\.0\] is not valid: it must be numbers > 0"),
        (RidgeRegressor, {"alpha": []}, r"model\.alpha=\[\] is not valid: it must be numbers > 0"),
        (RidgeRegressor, {"alpha": ["small"]}, r"model\.alpha=\[small\] is not valid: it must be numbers > 0"),
        (KNNRegressor, {"k": ["ten"]}, r"model\.k=\[ten\] is not valid: it must be integers >= 1; e\.g\. model\.k=\[5,10,20\]"),
        (KNNRegressor, {"k": 0}, r"model\.k=0 is not valid: it must be integers >= 1"),
        (KNNRegressor, {"k": [2.5]}, r"model\.k=\[2\.5\] is not valid: it must be integers >= 1"),
        (KNNRegressor, {"k": []}, r"model\.k=\[\] is empty; give at least one value"),
        (KNNRegressor, {"weights": "cosine"}, r"model\.weights=cosine is not valid; valid values: uniform, distance"),
        (KNNRegressor, {"loss": "gaussian_nll"}, "model.loss=gaussian_nll is not available"),
    ],
)
def test_bad_hyperparameters_are_config_errors(cls, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        cls(10, LABELS, **kwargs)


def test_k_larger_than_the_training_set_and_a_list_without_validation_are_config_errors():
    flux, labels, *_ = arrays(12, 10)
    with pytest.raises(ConfigError, match=r"model.k=20 is larger than the training set \(spectra with a known label: teff: 12, logg: 12, fe_h: 12\); lower model.k"):
        KNNRegressor(10, LABELS, k=20).fit(flux, labels)
    with pytest.raises(ConfigError, match=r"model.alpha lists 2 candidates but there is no validation split"):
        RidgeRegressor(10, LABELS, alpha=[1.0, 2.0]).fit(flux, labels)


# -- end to end through train.py on the tiny synthetic survey -------------------------------------
def sklearn_val_losses(name: str, candidates, dm, weights: str = "distance") -> dict:
    """Validation loss (masked MSE on standardised labels) of scikit-learn's model for each candidate."""
    train, val = dm.tensors["train"], dm.tensors["val"]
    x, y = 1.0 - train["flux"].double().numpy(), train["labels"].numpy()
    xv = 1.0 - val["flux"].double().numpy()
    losses = {}
    for c in candidates:
        ref = Ridge(alpha=c) if name == "ridge" else KNeighborsRegressor(n_neighbors=c, weights=weights)
        losses[c] = mse(ref.fit(x, y).predict(xv), val["labels"])
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("name, cls, candidates", [("ridge", RidgeRegressor, [0.01, 1.0, 100.0]), ("knn", KNNRegressor, [1, 4, 16])])
def test_baseline_end_to_end(name, cls, candidates, tiny_cfg):
    listed = "[" + ",".join(str(c) for c in candidates) + "]"
    cfg = tiny_cfg(f"model={name}", f"model.{'alpha' if name == 'ridge' else 'k'}={listed}")
    best = train_script.main(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert best == pytest.approx(metrics["best_val_loss"])
    assert metrics["epochs"] == 1  # one pass, although trainer.max_epochs=20
    for label in LABELS:
        m = metrics["test"][label]
        assert m["n"] == 90
        assert m["rmse"] < 0.5 * m["rmse_mean_predictor"], (label, m)

    # the candidate kept is the one scikit-learn finds best on the same validation split
    dm = hydra.utils.instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    reference = sklearn_val_losses(name, candidates, dm)
    ckpt = torch.load(metrics["best_checkpoint"], weights_only=True)
    chosen = cls.load_from_checkpoint(metrics["best_checkpoint"], weights_only=True).chosen
    assert chosen == min(candidates, key=reference.get)
    np.testing.assert_allclose([ckpt["tuning"][str(c) if name == "knn" else repr(c)] for c in candidates], [reference[c] for c in candidates], rtol=1e-4)
    assert metrics["best_val_loss"] == pytest.approx(reference[chosen], rel=1e-4)

    # the checkpoint alone reproduces the test metrics
    model = cls.load_from_checkpoint(metrics["best_checkpoint"], weights_only=True)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.test(model, datamodule=dm, verbose=False)
    for label in LABELS:
        for key in ("rmse", "mae", "bias", "mad_std"):
            assert model.test_results["metrics"][label][key] == metrics["test"][label][key], (label, key)
