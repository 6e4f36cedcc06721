"""Apply a trained model to new spectra: `python predict.py ckpt_path=... input=...`, the same as `stellarlab-predict`.

    python predict.py ckpt_path=outputs/train/runs/<run>/checkpoints/last.ckpt input=spectra/
    python predict.py ckpt_path=... input=flux.npy input_wavelength=wave.npy   # resampled onto the model grid

The code is `stellarlab.commands.predict`; this file keeps the command where a clone has always had it.
"""

from stellarlab.commands.predict import cli, main, run_predict  # noqa: F401  (predict.main(cfg) in tests)

if __name__ == "__main__":
    cli()
