"""Apply a trained model to new spectra and write a catalogue.

    stellarlab-predict ckpt_path=outputs/train/runs/<run>/checkpoints/last.ckpt input=spectra/   # or python predict.py ...
    stellarlab-predict ckpt_path=... input=[aspcapStar-dr17-2M0000.fits,more.fits]
    stellarlab-predict ckpt_path=... input=flux.npy input_wavelength=wave.npy   # resampled onto the model grid

Reads aspcapStar, apStar and .npy spectra, preprocesses them exactly as the checkpoint's training
data was (pixel masks, continuum, gap deletion, flux transform), and writes predictions.fits and
predictions.csv (id, file, each label, its uncertainty and `<label>_outside`: True when the value lies
outside the training labels' range widened by `outside_tolerance`) into the run folder.
Settings share train.py's names: `trainer.accelerator=`, `data.eval_batch_size=`.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from stellarlab.config import conf_dir, register_resolvers
from stellarlab.errors import command_errors

log = logging.getLogger("stellarlab.predict")
register_resolvers()


def run_predict(cfg: DictConfig) -> dict:
    """Read, predict, write; returns the paths written and the number of spectra."""
    from stellarlab.results import prediction
    from stellarlab.run.validation import predict_settings

    device, batch_size, tolerance = predict_settings(cfg)  # before the checkpoint is read: one line, no traceback
    model, preprocessing = prediction.load_model(cfg.ckpt_path, map_location="cpu")
    if device not in ("cpu", "auto"):
        model = model.to(device)
    wavelength = model.wavelength.cpu().double().numpy()
    files = prediction.find_inputs(cfg.input, cfg.format)
    spectra = prediction.read_spectra(files, cfg.format, preprocessing, wavelength, cfg.input_wavelength)
    labels, sigma = prediction.predict(model, spectra.flux, batch_size, spectra.weight)
    outside = prediction.outside_training_range(model, labels, tolerance)
    table = prediction.catalog_table(spectra, model.label_names, labels, sigma, outside)
    fits_path, csv_path = prediction.write_catalog(table, cfg.output_dir)
    warning = prediction.report_outside(model.label_names, outside, tolerance)
    if warning is not None:
        log.warning("%s", warning)
    log.info("predicted %s for %d spectra from %d files: %s, %s", model.label_names, len(table), len(files), fits_path, csv_path)
    return {"n_spectra": len(table), "fits": str(fits_path), "csv": str(csv_path), "n_outside": int(outside.any(axis=1).sum())}


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="predict")
def main(cfg: DictConfig) -> dict:
    with command_errors(log):
        return run_predict(cfg)


def cli() -> None:
    """`stellarlab-predict` and `python predict.py`."""
    main()


if __name__ == "__main__":
    cli()
