"""The sweep's MLflow writer, in the driver only: the parent run of the sweep and, by a Tune
callback, a child run per trial (params, per-epoch and final metrics, the certification's
files). Trials never open the store, so a SQLite file takes no concurrent writers. The names
it writes are :mod:`cadis.tracking.contract`'s.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Mapping

from ray.tune import Callback

from cadis.sweeps.layout import EPOCH, trial_certify_dir
from cadis.sweeps.schema import SweepConfig, describe, trial_config
from cadis.tracking.contract import (
    ACR,
    BEST_PREFIX,
    BEST_TRIAL_TAG,
    CERTIFIED_ACCURACY_PREFIX,
    CLEAN_ACCURACY,
    OUTCOME_COMPLETED,
    OUTCOME_FAILED,
    OUTCOME_STOPPED,
    OUTCOME_TAG,
    PARENT_RUN_TAG,
    ROLE_SWEEP,
    ROLE_TAG,
    ROLE_TRIAL,
    SEARCHED_TAG,
    SWEEP_TAG,
    TRIAL_ID_TAG,
    artifact_location,
    flatten_params,
    trial_runs,
)

# Results that are Tune's bookkeeping, not the trial's metrics.
TUNE_KEYS = {"training_iteration", "time_total_s", "time_this_iter_s", "timestamp",
             "time_since_restore", "iterations_since_restore", "timesteps_total",
             "episodes_total", "timesteps_since_restore", "pid", "done", "checkpoint_path",
             "should_checkpoint"}
MAX_PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch
MAX_METRICS_PER_BATCH = 1000
# What a certified trial's run keeps of its certification folder.
CERTIFY_ARTIFACTS = ("records.tsv", "summary.json", "certified_accuracy.png")


class SweepTracker:
    """The sweep's parent run: opened (or reopened on resume) and closed by the driver."""

    def __init__(self, uri: str, sweep: SweepConfig, results: Path,
                 state: Mapping[str, Any] | None) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.sweep = sweep
        self.results = results
        self.client = MlflowClient(uri)
        self.parent_run_id = state["parent_run_id"] if state else ""
        self.experiment_id = state["experiment_id"] if state else ""

    def open_sweep(self, sweep_file: Path) -> None:
        experiment = self.client.get_experiment_by_name(self.sweep.mlflow.experiment)
        self.experiment_id = experiment.experiment_id if experiment else \
            self.client.create_experiment(self.sweep.mlflow.experiment,
                                          artifact_location=artifact_location(self.uri))
        run = self.client.create_run(self.experiment_id, run_name=self.sweep.name,
                                     tags={ROLE_TAG: ROLE_SWEEP, SWEEP_TAG: self.sweep.name,
                                           SEARCHED_TAG: ",".join(sorted(self.sweep.search))})
        self.parent_run_id = run.info.run_id
        sweep = self.sweep
        params = {"searcher": sweep.searcher, "num_trials": sweep.num_trials,
                  "total_trials": sweep.total_trials,
                  "max_concurrent_trials": sweep.max_concurrent_trials,
                  "objective": ", ".join(f"{o.metric} {o.mode}" for o in sweep.objective),
                  "scheduler": "none" if sweep.scheduler is None else
                  json.dumps(dataclasses.asdict(sweep.scheduler)),
                  "resources": json.dumps(dataclasses.asdict(sweep.resources)),
                  **{f"search.{key}": distribution.describe()
                     for key, distribution in sweep.search.items()},
                  **flatten_params(sweep.base.to_dict(), "base.")}
        _log_params(self.client, self.parent_run_id, params)
        self.client.log_artifact(self.parent_run_id, str(sweep_file))
        self.client.log_text(self.parent_run_id, describe(sweep) + "\n", "sweep_resolved.txt")

    def reopen_sweep(self) -> None:
        self.client.update_run(self.parent_run_id, status="RUNNING")

    def close_sweep(self, finished: bool, failed: bool = False) -> None:
        """Ends every trial run still RUNNING (killed with the driver) and the sweep's run;
        a finished sweep's run gets the best trial's final metrics."""
        for run in trial_runs(self.client, self.experiment_id, self.parent_run_id):
            if run.info.status == "RUNNING":
                self.client.set_terminated(run.info.run_id, "KILLED")
        if finished:
            self._log_best()
        status = "FINISHED" if finished else ("FAILED" if failed else "KILLED")
        self.client.set_terminated(self.parent_run_id, status)

    def _log_best(self) -> None:
        objective = self.sweep.objective[0]
        scored = [run for run in trial_runs(self.client, self.experiment_id, self.parent_run_id)
                  if objective.metric in run.data.metrics]
        if not scored:
            return
        sign = 1 if objective.mode == "max" else -1
        best = max(scored, key=lambda run: sign * run.data.metrics[objective.metric])
        final = {key: value for key, value in best.data.metrics.items() if _is_final_metric(key)}
        for key, value in final.items():
            self.client.log_metric(self.parent_run_id, BEST_PREFIX + key, value)
        self.client.set_tag(self.parent_run_id, BEST_TRIAL_TAG, best.data.tags[TRIAL_ID_TAG])

    def comparison(self) -> str:
        from cadis.tracking.compare import format_comparison, load_trials

        rows = load_trials(self.client, sweep_run_id=self.parent_run_id)
        return format_comparison(rows)


class MlflowTrialCallback(Callback):
    """Tune callback in the driver: a child run per trial, its params, metrics and files.

    Holds only plain values and opens its MLflow client on first use: Tune pickles callbacks
    into its experiment state, and a resumed sweep unpickles this one.
    """

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, sweep: SweepConfig,
                 results: str) -> None:
        self.uri = uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.sweep = sweep
        self.results = results
        self._client = None
        self._run_ids: dict[str, str] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self.uri)
        return self._client

    def run_id(self, trial: Any) -> str:
        """The trial's child run: found by its trial id (a resumed sweep reuses it, so no
        trial appears twice) or created with the trial's params."""
        trial_id = trial.trial_id
        if trial_id in self._run_ids:
            return self._run_ids[trial_id]
        found = [run for run in trial_runs(self.client, self.experiment_id, self.parent_run_id)
                 if run.data.tags.get(TRIAL_ID_TAG) == trial_id]
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            run = self.client.create_run(
                self.experiment_id, run_name=str(trial),
                tags={PARENT_RUN_TAG: self.parent_run_id, ROLE_TAG: ROLE_TRIAL,
                      TRIAL_ID_TAG: trial_id, SEARCHED_TAG: ",".join(sorted(self.sweep.search))})
            run_id = run.info.run_id
            # The whole training config (searched values applied), and each searched value
            # under its own name: a variant's mapping too, as one param.
            config = trial_config(self.sweep, trial.config).to_dict()
            _log_params(self.client, run_id, {
                **flatten_params(config),
                **{key: _param_text(value) for key, value in trial.config.items()}})
        self._run_ids[trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.run_id(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        from mlflow.entities import Metric

        run_id = self.run_id(trial)
        step = int(result.get(EPOCH, 0))
        timestamp = int(result.get("timestamp", 0) * 1000)
        # The final result repeats the last epoch's metrics (ASHA reads them): log only what
        # the certification added.
        final = ACR in result
        metrics = [Metric(key, float(value), timestamp, step) for key, value in result.items()
                   if key not in TUNE_KEYS and isinstance(value, (int, float))
                   and not isinstance(value, bool) and math.isfinite(value)
                   and (not final or _is_final_metric(key))]
        for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=metrics[start:start + MAX_METRICS_PER_BATCH])

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self.run_id(trial)
        certified = ACR in (trial.last_result or {})
        certify_dir = trial_certify_dir(self.results, trial.trial_id)
        if certified and certify_dir.is_dir():
            for name in CERTIFY_ARTIFACTS:
                if (certify_dir / name).is_file():
                    self.client.log_artifact(run_id, str(certify_dir / name))
        self.client.set_tag(run_id, OUTCOME_TAG,
                            OUTCOME_COMPLETED if certified else OUTCOME_STOPPED)
        self.client.set_terminated(run_id, "FINISHED" if certified else "KILLED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self.run_id(trial)
        self.client.set_tag(run_id, OUTCOME_TAG, OUTCOME_FAILED)
        self.client.set_terminated(run_id, "FAILED")


def _log_params(client: Any, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(key, str(value)) for key, value in params.items()]
    for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[start:start + MAX_PARAMS_PER_BATCH])


def _is_final_metric(name: str) -> bool:
    return name.startswith(CERTIFIED_ACCURACY_PREFIX) or name in (ACR, CLEAN_ACCURACY)


def _param_text(value: Any) -> str:
    if isinstance(value, Mapping):
        return ",".join(f"{key}={item}" for key, item in value.items())
    return str(value)
