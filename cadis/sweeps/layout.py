"""The layout of a sweep's ``results_dir``, shared by the driver, the trials and the MLflow
writer::

    sweep.json        the parent run, the store and the resolved sweep (what --resume checks)
    sweep.yaml        the sweep file as given
    optuna.db         Optuna's study (optuna-dashboard sqlite:///.../optuna.db)
    tune/             Tune's experiment (Tuner.restore reads it)
    train/<trial>/    each trial's Ray Train run and checkpoints
    draws/            the denoised draws of the rank stage and the proxy, made once (unless
                      draws_dir puts them elsewhere)
    figures/          the sweep's figures (cadis.sweeps.figures), also on the parent run
    trials/<trial>/trained.json   the trial's last checkpoint and config
    trials/<trial>/failure.txt    why the trial failed, when a retry cannot change it
    trials/<trial>/rank/     the rank stage (validation): records.tsv, summary.json, plot
    trials/<trial>/certify/  the final stage (test), for finalists: the same files
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

from cadis.errors import CadisError

STATE_FILE: Final = "sweep.json"
SWEEP_FILE_COPY: Final = "sweep.yaml"
OPTUNA_DB: Final = "optuna.db"
TUNE_NAME: Final = "tune"
TRAIN_DIR: Final = "train"
TRIALS_DIR: Final = "trials"
CERTIFY_DIR: Final = "certify"
RANK_DIR: Final = "rank"
TRAINED_FILE: Final = "trained.json"
FAILURE_FILE: Final = "failure.txt"
DRAWS_DIR: Final = "draws"
# The per-epoch time axis of ASHA and MLflow's step: an epoch survives resume, Tune's
# iteration count does not.
EPOCH: Final = "epoch"
# A trial id names a folder under results_dir. Tune's ids fit this; an id that does not (one
# read back from an edited MLflow tag, say) could climb out of the results folder.
TRIAL_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def trial_folder(results: str | Path, trial_id: str) -> Path:
    """``results/trials/<trial_id>``; :class:`CadisError` for an id that is not one plain
    folder name (a ``/``, a leading ``.``, so no ``..``): nothing is written outside
    ``results``."""
    if not isinstance(trial_id, str) or not TRIAL_ID_PATTERN.fullmatch(trial_id):
        raise CadisError(f"trial id {trial_id!r} is not a plain folder name (letters, digits, "
                         f"'.', '_', '-'): refusing to write outside {results}")
    return Path(results) / TRIALS_DIR / trial_id


def trial_certify_dir(results: str | Path, trial_id: str) -> Path:
    """Where a finalist's final stage (test) writes its records, summary and plot."""
    return trial_folder(results, trial_id) / CERTIFY_DIR


def trial_rank_dir(results: str | Path, trial_id: str) -> Path:
    """Where a trial's rank stage (validation) writes its records, summary and plot."""
    return trial_folder(results, trial_id) / RANK_DIR


def trained_file(results: str | Path, trial_id: str) -> Path:
    """Where a trained trial names its last checkpoint and config."""
    return trial_folder(results, trial_id) / TRAINED_FILE


def trial_failure_file(results: str | Path, trial_id: str) -> Path:
    """Where a trial that failed deterministically keeps its reason, for its retries."""
    return trial_folder(results, trial_id) / FAILURE_FILE
