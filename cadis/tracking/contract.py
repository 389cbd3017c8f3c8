"""MLflow bookkeeping of sweeps: one parent run per sweep, one child run per trial.

The names here are the contract between what writes runs (the fine-tuning loop names the
per-epoch proxy metrics, the sweep's MLflow writer everything else) and ``cadis compare``
(which reads): tags that say what a run is, the metric names of the per-epoch proxy and of
the final certification, and the artifacts each trial leaves. It imports neither MLflow nor
torch at module level, so the lowest layers may use its names.

A child run holds: every key of the trial's training configuration as a param (``certify.n``
and so on flattened with dots; a searched ``variant`` also as one param), the per-epoch
metrics with ``step`` = epoch, the final certified accuracy per radius
(``certified_accuracy_r0.25``), ``acr``, ``clean_accuracy`` (certified accuracy at radius 0:
the smoothed classifier is right and does not abstain), ``mean_draws`` (draws an image
spent), the last epoch's
``hallucination_rate`` and ``trainable_fraction``, and the artifacts ``records.tsv``,
``summary.json`` and ``certified_accuracy.png``; a trial that failed, why (the tag
``cadis.failure`` and the artifact ``error.txt``).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Mapping

from cadis.errors import CadisError
from cadis.files import check_creatable_folder
from cadis.validation import non_negative_float

# Tags. ``mlflow.parentRunId`` makes the MLflow UI nest trials under their sweep.
PARENT_RUN_TAG = "mlflow.parentRunId"
ROLE_TAG = "cadis.role"
ROLE_SWEEP = "sweep"
ROLE_TRIAL = "trial"
SWEEP_TAG = "cadis.sweep"
TRIAL_ID_TAG = "cadis.trial_id"
# Comma-separated names of the searched keys (params of the same names hold their values).
SEARCHED_TAG = "cadis.searched"
# How a trial ended: completed (trained and certified), stopped_early (ASHA), failed.
OUTCOME_TAG = "cadis.outcome"
OUTCOME_COMPLETED = "completed"
OUTCOME_STOPPED = "stopped_early"
OUTCOME_FAILED = "failed"
# On a failed trial's run: why it failed, one line naming the innermost exception's type and
# message (``NonFiniteLoss: epoch 1, step 2: the loss is nan (...)``); the whole error text
# Tune kept (every attempt's traceback) is its artifact ERROR_ARTIFACT.
FAILURE_TAG = "cadis.failure"
ERROR_ARTIFACT = "error.txt"
BEST_TRIAL_TAG = "cadis.best_trial_id"
# On a warm-started sweep's run: the parent run id of the sweep its search started from.
WARM_START_TAG = "cadis.warm_start_from"

# Per-epoch metrics of the certified-accuracy proxy (small n on held-out training images):
# accuracy per radius, and the average certified radius, one number that rewards robustness
# at every radius, for early stopping and ranking trials without a large n.
PROXY_PREFIX = "proxy_certified_accuracy_r"
PROXY_ACR = "proxy_acr"

# Final metrics of a certified trial.
CERTIFIED_ACCURACY_PREFIX = "certified_accuracy_r"
ACR = "acr"
# Draws a certification spent per image on average (sequential mode spends fewer than n0 + n).
MEAN_DRAWS = "mean_draws"
# How many images a certification's figures are over.
NUM_IMAGES = "num_images"
CLEAN_ACCURACY = "clean_accuracy"
HALLUCINATION_RATE = "hallucination_rate"
TRAINABLE_FRACTION = "trainable_fraction"
# The parent run repeats the best trial's final metrics under this prefix.
BEST_PREFIX = "best."

# The two stages of a sweep's certification. The rank stage certifies every trial that
# trains to the end on the validation hold-out: its figures carry VALIDATION_PREFIX
# (val_certified_accuracy_r0.5, val_acr, val_clean_accuracy) and the searcher optimises
# them. The final stage certifies the top_k trials by rank on the test set: their figures
# are the unprefixed names above, and a finalist's run is tagged FINALIST_TAG = "true". The
# parent's best.* are the test figures of the trial the validation ranking put first.
VALIDATION_PREFIX = "val_"
FINALIST_TAG = "cadis.finalist"
# The parent run's stage: search (trials run), ranked (stopped before the final stage),
# final (finalists being certified on test), done.
STAGE_TAG = "cadis.stage"
# Where a trial run keeps the rank stage's records, summary and plot (the test's are at the
# run's root).
RANK_ARTIFACTS_DIR = "rank"


def validation_metric(name: str) -> str:
    """The rank stage's (validation) name of a final metric: ``val_acr``."""
    return f"{VALIDATION_PREFIX}{name}"


def is_final_metric(name: str) -> bool:
    """A test figure of the final stage: certified accuracy per radius, ACR, clean accuracy,
    the draws an image spent and the number of images."""
    return name.startswith(CERTIFIED_ACCURACY_PREFIX) or name in (ACR, CLEAN_ACCURACY,
                                                                  MEAN_DRAWS, NUM_IMAGES)


def is_validation_metric(name: str) -> bool:
    """A validation figure of the rank stage."""
    return name.startswith(VALIDATION_PREFIX) and is_final_metric(name[len(VALIDATION_PREFIX):])

SQLITE_SCHEME = "sqlite:///"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
# One local store for every sweep, so that one `mlflow ui` and `cadis compare` see them all.
DEFAULT_STORE = Path("runs/sweeps/mlflow.db")
ARTIFACTS_DIR = "mlartifacts"
HEALTH_TIMEOUT_SECONDS = 5.0
# How long a sweep's driver waits for an unreachable tracking store (a server restarted, a
# network cut) before the sweep ends, resumable; the variable changes it.
TRACKING_RETRY_S = 300.0
TRACKING_RETRY_ENV = "CADIS_TRACKING_RETRY_S"
# MLflow caps a param value at 6000 characters; longer values are cut, never refused.
MAX_PARAM_CHARS = 6000


def certified_accuracy_metric(radius: float) -> str:
    """``certified_accuracy_r0.25``: the metric that holds certified accuracy at ``radius``."""
    return f"{CERTIFIED_ACCURACY_PREFIX}{float(radius)}"


def radius_of_metric(name: str) -> float | None:
    """The radius a ``certified_accuracy_r<radius>`` metric is about; None for other names."""
    if not name.startswith(CERTIFIED_ACCURACY_PREFIX):
        return None
    try:
        return float(name[len(CERTIFIED_ACCURACY_PREFIX):])
    except ValueError:
        return None


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else the local SQLite store :data:`DEFAULT_STORE` (made
    absolute here: a Ray trial runs in another working directory)."""
    return os.environ.get(TRACKING_URI_ENV) or f"{SQLITE_SCHEME}{DEFAULT_STORE.resolve()}"


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps artifacts: beside a SQLite store (MLflow's default is
    ``./mlruns`` of whatever directory a process runs in); a server's own choice otherwise."""
    if uri.startswith(SQLITE_SCHEME):
        return (Path(uri[len(SQLITE_SCHEME):]).parent / ARTIFACTS_DIR).resolve().as_uri()
    return None


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: ``{"certify": {"n": 1}}`` -> ``{"certify.n": "1"}``."""
    params: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            params.update(flatten_params(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            params[name] = text[:MAX_PARAM_CHARS]
    return params


def check_tracking_uri(uri: str, create: bool = True) -> None:
    """Raise :class:`CadisError` (one line) unless ``uri`` can take runs: an HTTP server must
    answer ``/health`` within :data:`HEALTH_TIMEOUT_SECONDS`; a SQLite file's folder must be
    creatable (and is created, unless ``create`` is false: a dry run leaves no trace).
    Checked before a sweep starts any trial: MLflow's own client retries an unreachable
    server for minutes."""
    if uri.startswith(("http://", "https://")):
        health = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(health, timeout=HEALTH_TIMEOUT_SECONDS) as response:
                if response.status != 200:
                    raise CadisError(f"MLflow tracking server {uri} answered {response.status} "
                                     f"on /health")
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise CadisError(f"MLflow tracking server {uri} is unreachable ({reason}); start "
                             f"it (cluster/cadis-cluster start) or name another store"
                             ) from None
    elif uri.startswith(SQLITE_SCHEME):
        folder = Path(uri[len(SQLITE_SCHEME):]).parent
        if not create:
            check_creatable_folder(folder, f"MLflow store {uri}")
            return
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CadisError(f"MLflow store {uri}: cannot create {folder} ({error.strerror})"
                             ) from None
    elif "://" not in uri and not uri.startswith(("databricks", "file:")):
        raise CadisError(f"mlflow.tracking_uri {uri!r} is not a URI; use http://HOST:PORT or "
                         f"sqlite:///PATH")


def tracking_retry_s() -> float:
    """Seconds to wait for an unreachable tracking store: ``$CADIS_TRACKING_RETRY_S`` when
    set (a number >= 0), else :data:`TRACKING_RETRY_S`."""
    text = os.environ.get(TRACKING_RETRY_ENV, "").strip()
    if not text:
        return TRACKING_RETRY_S
    try:
        value: object = float(text)
    except ValueError:
        value = text
    return non_negative_float(value, TRACKING_RETRY_ENV)


def trial_runs(client: Any, experiment_id: str, parent_run_id: str | None = None,
               ) -> list[Any]:
    """Every trial run of an experiment (of one sweep when ``parent_run_id`` is given)."""
    query = f"tags.`{ROLE_TAG}` = '{ROLE_TRIAL}'"
    if parent_run_id:
        query += f" and tags.`{PARENT_RUN_TAG}` = '{parent_run_id}'"
    return list(_all_runs(client, [experiment_id], query))


def _all_runs(client: Any, experiment_ids: list[str], query: str) -> Iterable[Any]:
    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string=query, max_results=1000,
                                  page_token=token)
        yield from page
        token = page.token
        if not token:
            return
