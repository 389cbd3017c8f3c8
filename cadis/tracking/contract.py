"""MLflow bookkeeping of sweeps: one parent run per sweep, one child run per trial.

The names here are the contract between what writes runs (the fine-tuning loop names the
per-epoch proxy metrics, the sweep's MLflow writer everything else) and ``cadis compare``
(which reads): tags that say what a run is, the metric names of the per-epoch proxy and of
the final certification, and the artifacts each trial leaves. It imports nothing of cadis,
neither MLflow nor torch, so the lowest layers may use its names.

A child run holds: every key of the trial's training configuration as a param (``certify.n``
and so on flattened with dots; a searched ``variant`` also as one param), the per-epoch
metrics with ``step`` = epoch, the final certified accuracy per radius
(``certified_accuracy_r0.25``), ``acr``, ``clean_accuracy`` (certified accuracy at radius 0:
the smoothed classifier is right and does not abstain), ``mean_draws`` (draws an image
spent), the last epoch's
``hallucination_rate`` and ``trainable_fraction``, and the artifacts ``records.tsv``,
``summary.json`` and ``certified_accuracy.png``; a trial that failed, why (the tag
``cadis.failure`` and the artifact ``error.txt``).

Only names live here, on the ground floor: where the runs are kept is
:mod:`cadis.tracking.server`, the client that writes them :mod:`cadis.tracking.client`, and
reading a sweep back :mod:`cadis.tracking.sweep_reader`.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

# Tags. ``mlflow.parentRunId`` makes the MLflow UI nest trials under their sweep.
PARENT_RUN_TAG = "mlflow.parentRunId"
# Tags of a sweep's experiment for MLflow's UI. EXPERIMENT_KIND_TAG = EXPERIMENT_KIND_TRAINING
# (the UI's "custom_model_development", "Machine learning") says the experiment trains models,
# not GenAI apps: UIs without MLflow 3.17's sidebar switch open such an experiment on its runs.
# MLflow 3.17.2's UI takes the kind from that switch instead (a page's
# ?workflowType=machine_learning, else the browser's last choice, GenAI at first): a link
# with that query opens on the runs. PRIMARY_METRIC_TAG names the metric the UI's charts lead
# with (the first objective as the trial runs carry it, val_certified_accuracy_r0.5) and
# PRIMARY_METRIC_GREATER_TAG its direction, "True" or "False" as MLflow's fluent API writes it.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND_TRAINING = "custom_model_development"
PRIMARY_METRIC_TAG = "mlflow.experiment.primaryMetric.name"
PRIMARY_METRIC_GREATER_TAG = "mlflow.experiment.primaryMetric.greaterIsBetter"
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
# What a certified trial's run keeps of its certification folder (the rank stage's under
# RANK_ARTIFACTS_DIR, the test's at the run's root).
CERTIFY_ARTIFACTS = ("records.tsv", "summary.json", "certified_accuracy.png")
BEST_TRIAL_TAG = "cadis.best_trial_id"
# The incumbent, the sweep file's base run as a trial of its own (first, never stopped early,
# certified on test in the final stage): its trial run is tagged INCUMBENT_TAG = "true" and
# the sweep's parent run names its trial id under INCUMBENT_TRIAL_TAG.
INCUMBENT_TAG = "cadis.incumbent"
INCUMBENT_TRIAL_TAG = "cadis.incumbent_trial_id"
# On a warm-started sweep's run: the parent run id of the sweep its search started from.
WARM_START_TAG = "cadis.warm_start_from"

# Per-epoch metrics of the certified-accuracy proxy (small n on held-out training images):
# accuracy per radius, and the average certified radius, one number that rewards robustness
# at every radius, for early stopping and ranking trials without a large n.
PROXY_PREFIX = "proxy_certified_accuracy_r"
PROXY_ACR = "proxy_acr"
# The proxy's own noise, logged each epoch beside PROXY_ACR (absent when the proxy has one
# image): the standard error of its mean over the proxy's images, the per-image certified
# radii's sample standard deviation / sqrt(images). Two trials measured on the same stored
# draws have positively correlated errors, so the noise of their difference is smaller than
# their unpaired SEs combined: "within noise" judged by these SEs is conservative (it may call
# noise a difference that a paired comparison would resolve).
# PROXY_NOISE names the SE metric of each per-epoch metric that has one.
PROXY_ACR_SE = "proxy_acr_se"
PROXY_NOISE = {PROXY_ACR: PROXY_ACR_SE}

# Where a trial's slot went (cadis.sweeps.trial_callback logs these on its run when it ends,
# the summary gives their medians). Each epoch's result carries EPOCH_SECONDS (its optimizer
# steps) and PROXY_SECONDS (the proxy after it); the rank stage's result RANK_SECONDS (its
# certification, in the trial's Train worker). Results also carry wall clocks (CLOCK_PREFIX,
# seconds since the epoch, never logged as metrics): when the worker's loop began, when its
# first step began and when the result was made. From these and the slot's own start and end
# (the driver's clock) the run gets PHASE_PREFIX + ``start`` (slot to loop: the trial's
# processes starting), ``setup`` (loop to first step: data, models, stores), ``epochs``,
# ``proxy``, ``rank``, ``end`` (last result to the slot's end) in seconds, and ORCHESTRATION:
# the slot less its epochs, proxy and rank stage, what the trial cost beyond its compute.
EPOCH_SECONDS = "epoch_seconds"
PROXY_SECONDS = "proxy_seconds"
RANK_SECONDS = "rank_seconds"
CLOCK_PREFIX = "clock."
LOOP_STARTED = "clock.loop_started"
FIRST_STEP = "clock.first_step"
REPORTED = "clock.reported"
PHASE_PREFIX = "phase."
PHASES = ("start", "setup", "epochs", "proxy", "rank", "end")
ORCHESTRATION = "orchestration_seconds"

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
# them. The final stage certifies the finalists on the test set (the racing stage's, else the
# top_k trials by rank): their figures are the unprefixed names above, and a finalist's run
# is tagged FINALIST_TAG = "true". The parent's best.* are the test figures of the chosen
# trial: the race's leader, else the trial the validation ranking put first.
VALIDATION_PREFIX = "val_"
FINALIST_TAG = "cadis.finalist"
# The parent run's stage: search (trials run), ranked (stopped before the final stage),
# final (finalists being certified on test), done.
STAGE_TAG = "cadis.stage"
# Where a trial run keeps the rank stage's records, summary and plot (the test's are at the
# run's root).
RANK_ARTIFACTS_DIR = "rank"

# Paired verdicts at the choice (cadis.sweeps.choice): the chosen trial (the leader) against
# every other trial of the decision, per objective, on the same images. On each other trial's
# run ``vs_leader.<objective>.<field>``: ``difference`` (the trial minus the leader),
# ``low``/``high`` (its paired bootstrap 95% interval), ``p`` (raw two-sided), ``p_holm``
# (Holm-adjusted across the decision), ``separated`` (1: p_holm below the family's alpha and
# the interval excludes 0) and ``images``. On the parent run the chosen trial against the
# incumbent as ``chosen_vs_incumbent.<objective>.<field>`` (the chosen minus the incumbent,
# the interval turned round), and the decisions in words in the artifact CHOICE_ARTIFACT.
# Validation's names carry VALIDATION_PREFIX (val_vs_leader.acr.p_holm), test's none.
# The racing stage (cadis.sweeps.racing): on each ranked trial's run RACE_IMAGES, how many
# validation images decided it (those of the look it left the race at, or of the race's last
# look); on the parent run what the race cost beyond the rank stage, RACE_IMAGES_CERTIFIED
# (images certified, summed over contenders) and RACE_SECONDS (seconds of certification and
# of denoising the blocks' stores).
RACE_IMAGES = "race_images"
RACE_IMAGES_CERTIFIED = "race.images_certified"
RACE_SECONDS = "race.seconds"

VS_LEADER = "vs_leader"
CHOSEN_VS_INCUMBENT = "chosen_vs_incumbent"
VERDICT_FIELDS = ("difference", "low", "high", "p", "p_holm", "separated", "images")
CHOICE_ARTIFACT = "choice.md"
# The final stage's training seeds (certify.final.seeds): on each configuration's run its
# test figures per training seed, seed<s>.<metric> (seed_metric: seed1.acr), and over its
# seeds SEEDS_MEAN_PREFIX, SEEDS_LOW_PREFIX and SEEDS_HIGH_PREFIX (seeds_mean.acr, the lowest,
# the highest). The test verdicts of each further seed, on the same shared draws, carry its
# prefix too (seed1.vs_leader.acr.p_holm, on the parent seed1.chosen_vs_incumbent.acr.*).
SEEDS_MEAN_PREFIX = "seeds_mean."
SEEDS_LOW_PREFIX = "seeds_low."
SEEDS_HIGH_PREFIX = "seeds_high."


def seed_metric(train_seed: int, name: str) -> str:
    """``seed1.acr``: ``name`` as measured with training seed ``train_seed``."""
    return f"seed{int(train_seed)}.{name}"


def validation_metric(name: str) -> str:
    """The rank stage's (validation) name of a final metric: ``val_acr``."""
    return f"{VALIDATION_PREFIX}{name}"


def verdict_metric(comparison: str, objective: str, field: str, validation: bool) -> str:
    """``val_vs_leader.acr.p_holm``: where a verdict's ``field`` (:data:`VERDICT_FIELDS`) of
    ``comparison`` (:data:`VS_LEADER` or :data:`CHOSEN_VS_INCUMBENT`) on ``objective`` is
    logged, on validation or test."""
    name = f"{comparison}.{objective}.{field}"
    return validation_metric(name) if validation else name


def is_final_metric(name: str) -> bool:
    """A test figure of the final stage: certified accuracy per radius, ACR, clean accuracy,
    the draws an image spent and the number of images."""
    return name.startswith(CERTIFIED_ACCURACY_PREFIX) or name in (ACR, CLEAN_ACCURACY,
                                                                  MEAN_DRAWS, NUM_IMAGES)


def is_validation_metric(name: str) -> bool:
    """A validation figure of the rank stage."""
    return name.startswith(VALIDATION_PREFIX) and is_final_metric(name[len(VALIDATION_PREFIX):])


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
