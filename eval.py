"""Re-test a trained checkpoint: `python eval.py ckpt_path=...`, the same as the `stellarlab-eval` command.

    python eval.py ckpt_path=outputs/train/runs/<run>/checkpoints/best-epoch012.ckpt
    python eval.py ckpt_path=... data.snr=50            # the same model on noisier spectra

The code is `stellarlab.commands.eval`; this file keeps the command where a clone has always had it.
"""

from stellarlab.commands.eval import cli, evaluate, main, run_config  # noqa: F401  (eval.main(cfg) in tests)

if __name__ == "__main__":
    cli()
