"""Loggers that need a word more than Lightning's own (`conf/logger/*.yaml` name them)."""

from __future__ import annotations

import os
import sys

from pytorch_lightning.loggers import MLFlowLogger as _LightningMLFlowLogger


class MLFlowLogger(_LightningMLFlowLogger):
    """Lightning's MLflow logger with MLflow's local file store allowed.

    MLflow 3 refuses a file store (`file:<folder>`, Lightning's default) unless MLFLOW_ALLOW_FILE_STORE=true;
    a folder of files beside the runs needs no database or server, so that is the default here. A
    `tracking_uri` of a server or a database is used as given.
    """

    def __init__(self, *args, tracking_uri: str | None = None, **kwargs) -> None:
        tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not tracking_uri or str(tracking_uri).startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        super().__init__(*args, tracking_uri=tracking_uri, **kwargs)


def finish_open_runs() -> None:
    """End the W&B run a WandbLogger left open. Lightning never ends it (the process's exit does), so the next
    run in the same process (a job of a single-process sweep, a second `stellarlab.train`) would log into it.

    `wandb.finish` only tells W&B's service process that the run is over; the service writes the run's
    records to disk after that. Tearing the service down waits for it, so the run folder is complete when
    training returns (a sync or a copy made straight after would otherwise catch a file with no records).
    """
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
        wandb.teardown()
