"""The commands (`stellarlab-train`, `-eval`, `-predict`; `train.py`, `eval.py`, `predict.py` in a clone) and the
notebook API (`api`: `stellarlab.train`, `stellarlab.load`, `stellarlab.load_runs`). The top layer: each
composes the packaged config (`stellarlab.config.conf_dir`) and hands the run to `stellarlab.run`."""
