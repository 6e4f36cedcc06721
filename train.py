"""Train a model on stellar spectra: `python train.py [overrides]`, the same as the `stellarlab-train` command.

    python train.py                                   # MLP on the built-in synthetic APOGEE survey
    python train.py model=cnn trainer.accelerator=mps # any group option, any override
    python train.py -m model=linear,mlp,cnn           # Hydra multirun: one folder per job
    python train.py hparams_search=optuna             # Optuna study (TPE) over lr, widths, dropout, ...
    python train.py resume=last                       # continue the newest unfinished run in its folder

The code is `stellarlab.commands.train`; this file keeps the command where a clone has always had it.
"""

from stellarlab.commands.train import cli, main, train  # noqa: F401  (train.main(cfg), train.train(cfg) in tests)

if __name__ == "__main__":
    cli()
