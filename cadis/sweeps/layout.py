"""The layout of a sweep's ``results_dir``, shared by the driver, the trials and the MLflow
writer::

    sweep.json        the parent run, the store and the resolved sweep (what --resume checks)
    sweep.yaml        the sweep file as given
    optuna.db         Optuna's study (optuna-dashboard sqlite:///.../optuna.db)
    tune/             Tune's experiment (Tuner.restore reads it)
    train/<trial>/    each trial's Ray Train run and checkpoints
    trials/<trial>/certify/   records.tsv, summary.json, certified_accuracy.png
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

STATE_FILE: Final = "sweep.json"
SWEEP_FILE_COPY: Final = "sweep.yaml"
OPTUNA_DB: Final = "optuna.db"
TUNE_NAME: Final = "tune"
TRAIN_DIR: Final = "train"
TRIALS_DIR: Final = "trials"
CERTIFY_DIR: Final = "certify"
# The per-epoch time axis of ASHA and MLflow's step: an epoch survives resume, Tune's
# iteration count does not.
EPOCH: Final = "epoch"


def trial_certify_dir(results: str | Path, trial_id: str) -> Path:
    """Where a trial's final certification writes its records, summary and plot."""
    return Path(results) / TRIALS_DIR / trial_id / CERTIFY_DIR
