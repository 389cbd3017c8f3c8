"""The sweep's MLflow writer, in the driver only: the parent run of the sweep and, by a Tune
callback, a child run per trial (params, per-epoch and final metrics, the certification's
files). Trials never open the store, so a SQLite file takes no concurrent writers. The names
it writes are :mod:`cadis.tracking.contract`'s.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Final, Mapping

from ray.tune import Callback

from cadis.errors import CadisError, RepeatedFailure, first_line
from cadis.smoothing.records import RECORDS_FILENAME
from cadis.sweeps.layout import EPOCH, trained_file, trial_certify_dir, trial_rank_dir
from cadis.sweeps.ranking import rank_trials
from cadis.sweeps.describe import describe
from cadis.sweeps.search_space import trial_config
from cadis.sweeps.spec import SweepConfig
from cadis.tracking.compare import trial_row
from cadis.tracking.contract import (
    ACR,
    BEST_PREFIX,
    BEST_TRIAL_TAG,
    ERROR_ARTIFACT,
    FAILURE_TAG,
    FINALIST_TAG,
    OUTCOME_COMPLETED,
    OUTCOME_FAILED,
    OUTCOME_STOPPED,
    NUM_IMAGES,
    OUTCOME_TAG,
    PARENT_RUN_TAG,
    ROLE_SWEEP,
    ROLE_TAG,
    ROLE_TRIAL,
    SEARCHED_TAG,
    SQLITE_SCHEME,
    RANK_ARTIFACTS_DIR,
    STAGE_TAG,
    SWEEP_TAG,
    TRACKING_RETRY_ENV,
    TRIAL_ID_TAG,
    WARM_START_TAG,
    artifact_location,
    flatten_params,
    is_final_metric,
    is_validation_metric,
    tracking_retry_s,
    trial_runs,
    validation_metric,
)

if TYPE_CHECKING:
    from cadis.sweeps.warm_start import WarmStart

# The rank stage's results carry this: the per-epoch ones do not.
RANKED = validation_metric(ACR)

# Results that are Tune's bookkeeping, not the trial's metrics.
TUNE_KEYS = {"training_iteration", "time_total_s", "time_this_iter_s", "timestamp",
             "time_since_restore", "iterations_since_restore", "timesteps_total",
             "episodes_total", "timesteps_since_restore", "pid", "done", "checkpoint_path",
             "should_checkpoint"}
MAX_PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch
MAX_METRICS_PER_BATCH = 1000
# What a certified trial's run keeps of its certification folder.
CERTIFY_ARTIFACTS = ("records.tsv", "summary.json", "certified_accuracy.png")
# A failure's reason is read in the sweep's last lines: a message longer than this is cut.
MAX_REASON_CHARS = 1000
NO_ERROR_TEXT = "Tune kept no error text for this trial"
# Tune's error file: each attempt's error, after a line "Failure # N (occurred at TIME)".
ATTEMPT_LINE = re.compile(r"^Failure # \d+ \(occurred at [^)\n]*\)$", re.MULTILINE)
# A traceback's exception line, unindented: ``package.module.Type: message`` or ``Type``
# alone (a class name, so capitalised); a Ray wrapper's reads ``RayTaskError(Cause): ...``.
EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*([A-Z]\w*(?:\([\w.]+\))?)(?:: (.*))?$")
# Ray colours the names in its errors for terminals.
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
# The waits between two attempts to reach an unreachable tracking store double from the first
# to the last, for up to tracking_retry_s() seconds in all.
RETRY_FIRST_WAIT_S: Final = 1.0
RETRY_MAX_WAIT_S: Final = 15.0
# MLflow's client retries a failed request itself (MLflow 3.17: 7 retries, waits doubling from
# 2 s to 120 s, about 4 minutes, a warning each): the bound and the lines are the driver's, so
# MLflow tries once unless its retries are set in the environment.
MLFLOW_RETRIES_ENV: Final = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"


class TrackingStoreUnreachable(CadisError):
    """The tracking store did not answer within the retry bound: the sweep ends here."""


class PatientClient:
    """An ``MlflowClient`` whose every call outlasts a short outage of the tracking store.

    A call that does not reach the store (a refused or broken connection, a timeout, HTTP 429
    or 5xx: a ``requests`` error under MLflow's) is made again, the waits doubling from
    :data:`RETRY_FIRST_WAIT_S` to :data:`RETRY_MAX_WAIT_S`, for up to ``retry_s`` seconds
    (:func:`~cadis.tracking.contract.tracking_retry_s` unless given); one line says that the
    store went away, one that it is back. Any other error is the store's answer, raised at
    once. Past the bound the call raises :class:`TrackingStoreUnreachable`, and so does every
    later call, without waiting again: no write is dropped unsaid, the sweep ends (resumable).
    """

    def __init__(self, uri: str, retry_s: float | None = None) -> None:
        from mlflow.tracking import MlflowClient

        os.environ.setdefault(MLFLOW_RETRIES_ENV, "0")
        self.uri = uri
        self.retry_s = tracking_retry_s() if retry_s is None else retry_s
        self._client = MlflowClient(uri)
        self._gave_up: TrackingStoreUnreachable | None = None

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        return functools.partial(self._call, attribute) if callable(attribute) else attribute

    def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self._gave_up is not None:
            raise self._gave_up
        started = time.monotonic()
        wait = RETRY_FIRST_WAIT_S
        away = False
        while True:
            try:
                result = method(*args, **kwargs)
                break
            except Exception as error:  # noqa: BLE001 - only an outage is retried, below
                reason = _outage_reason(error)
                waited = time.monotonic() - started
                if reason is None:
                    raise
                if waited >= self.retry_s:
                    self._gave_up = TrackingStoreUnreachable(
                        f"the MLflow tracking store {self.uri} is unreachable ({reason}; "
                        f"retried for {waited:.0f} s, {TRACKING_RETRY_ENV} sets how long)")
                    raise self._gave_up from None
                if not away:
                    away = True
                    print(f"mlflow: the tracking store {self.uri} is unreachable ({reason}); "
                          f"retrying for up to {self.retry_s:g} s", file=sys.stderr, flush=True)
            time.sleep(min(wait, self.retry_s - waited))
            wait = min(2 * wait, RETRY_MAX_WAIT_S)
        if away:
            print(f"mlflow: the tracking store {self.uri} is back after "
                  f"{time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
        return result


def exception_chain(error: BaseException) -> list[BaseException]:
    """``error`` and the errors it was raised from or while handling, outermost first."""
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def store_given_up(error: BaseException) -> TrackingStoreUnreachable | None:
    """The :class:`TrackingStoreUnreachable` in ``error``'s chain, if any (Tune raises its
    own error while handling a callback's)."""
    return next((item for item in exception_chain(error)
                 if isinstance(item, TrackingStoreUnreachable)), None)


def _outage_reason(error: BaseException) -> str | None:
    """Why the store was not reached, when ``error`` is an HTTP failure (a ``requests`` error
    in its chain): the system's words where a socket error is in the chain or its arguments
    (``Connection refused``; urllib3 keeps a reset connection's error as an argument), else
    the innermost error's first line; None for an answer of the store."""
    import requests

    chain = exception_chain(error)
    if not any(isinstance(item, requests.exceptions.RequestException) for item in chain):
        return None
    sockets = [item for link in chain for item in (link, *link.args)
               if isinstance(item, OSError) and item.strerror]
    return sockets[-1].strerror if sockets else first_line(chain[-1])


class SweepTracker:
    """The sweep's parent run: opened (or reopened on resume) and closed by the driver."""

    def __init__(self, uri: str, sweep: SweepConfig, results: Path,
                 state: Mapping[str, Any] | None) -> None:
        self.uri = uri
        self.sweep = sweep
        self.results = results
        self.client = PatientClient(uri)
        self.parent_run_id = state["parent_run_id"] if state else ""
        self.experiment_id = state["experiment_id"] if state else ""

    def open_sweep(self, sweep_file: Path, warm: WarmStart | None = None) -> None:
        """The sweep's parent run: its params, the sweep file and, for a warm start, where
        its search started (``cadis.warm_start_from`` and ``warm_start.*``)."""
        experiment = self.client.get_experiment_by_name(self.sweep.mlflow.experiment)
        self.experiment_id = experiment.experiment_id if experiment else \
            self.client.create_experiment(self.sweep.mlflow.experiment,
                                          artifact_location=artifact_location(self.uri))
        tags = {ROLE_TAG: ROLE_SWEEP, SWEEP_TAG: self.sweep.name,
                SEARCHED_TAG: ",".join(sorted(self.sweep.search))}
        if warm is not None:
            tags[WARM_START_TAG] = warm.parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=self.sweep.name, tags=tags)
        self.parent_run_id = run.info.run_id
        sweep = self.sweep
        params = {"searcher": sweep.searcher, "num_trials": sweep.num_trials,
                  "total_trials": sweep.total_trials,
                  "max_concurrent_trials": sweep.max_concurrent_trials,
                  "objective": ", ".join(f"{o.metric} {o.mode}" for o in sweep.objective),
                  "scheduler": "none" if sweep.scheduler is None else
                  json.dumps(dataclasses.asdict(sweep.scheduler)),
                  "resources": json.dumps(dataclasses.asdict(sweep.resources)),
                  **{f"certify.rank.{key}": value
                     for key, value in dataclasses.asdict(sweep.rank).items()},
                  **{f"certify.final.{key}": value
                     for key, value in dataclasses.asdict(sweep.certify).items()},
                  "certify.final.top_k": sweep.top_k, "shares_draws": sweep.shares_draws,
                  **{f"search.{key}": distribution.describe()
                     for key, distribution in sweep.search.items()},
                  **flatten_params(sweep.base.to_dict(), "base."),
                  **({} if warm is None else flatten_params(warm.record(), "warm_start."))}
        _log_params(self.client, self.parent_run_id, params)
        self.client.log_artifact(self.parent_run_id, str(sweep_file))
        self.client.log_text(self.parent_run_id, describe(sweep) + "\n", "sweep_resolved.txt")

    def reopen_sweep(self) -> None:
        self.client.update_run(self.parent_run_id, status="RUNNING")

    def set_stage(self, stage: str) -> None:
        self.client.set_tag(self.parent_run_id, STAGE_TAG, stage)

    def log_stores(self, stores: Mapping[str, Mapping[str, Any]]) -> None:
        """What the stored draws cost and hold, per role: ``draws.rank.build_seconds``, ..."""
        metrics = {f"draws.{role}.{key}": float(value) for role, info in stores.items()
                   for key, value in info.items() if key != "folder" and value is not None}
        for key, value in metrics.items():
            self.client.log_metric(self.parent_run_id, key, value)

    def ranked(self) -> list[Any]:
        """The trial runs the rank stage certified, best first by their validation
        objectives (:mod:`cadis.sweeps.ranking`: a Pareto front first for two)."""
        return rank_trials(trial_runs(self.client, self.experiment_id, self.parent_run_id),
                           self.sweep.objective, lambda run: run.data.metrics,
                           lambda run: run.info.start_time)

    def log_final(self, trial_id: str, figures: Mapping[str, float], certify_dir: Path) -> None:
        """A finalist's test figures, files and finalist tag, on its trial run."""
        run_id = self.run_of(trial_id)
        _log_metrics(self.client, run_id, figures, step=0)
        for name in CERTIFY_ARTIFACTS:
            if (certify_dir / name).is_file():
                self.client.log_artifact(run_id, str(certify_dir / name))
        self.client.set_tag(run_id, FINALIST_TAG, "true")

    def has_final(self, trial_id: str) -> bool:
        return ACR in self.client.get_run(self.run_of(trial_id)).data.metrics

    def failures(self) -> list[tuple[str, str]]:
        """(run name, reason) of each of the sweep's trials whose last attempt failed, in the
        order they started: the reason is the run's :data:`FAILURE_TAG` (runs written before
        it existed say so)."""
        failed = [run for run in trial_runs(self.client, self.experiment_id, self.parent_run_id)
                  if run.data.tags.get(OUTCOME_TAG) == OUTCOME_FAILED]
        return [(run.info.run_name, run.data.tags.get(FAILURE_TAG, "no reason recorded"))
                for run in sorted(failed, key=lambda run: run.info.start_time)]

    def run_of(self, trial_id: str) -> str:
        for run in trial_runs(self.client, self.experiment_id, self.parent_run_id):
            if run.data.tags.get(TRIAL_ID_TAG) == trial_id:
                return run.info.run_id
        raise CadisError(f"no MLflow run of trial {trial_id} in sweep run {self.parent_run_id}")

    def close_sweep(self, finished: bool, failed: bool = False,
                    best_trial: str | None = None) -> None:
        """Ends every trial run still RUNNING (killed with the driver) and the sweep's run; a
        finished sweep's run gets ``best_trial``'s test figures as ``best.*``."""
        for run in trial_runs(self.client, self.experiment_id, self.parent_run_id):
            if run.info.status == "RUNNING":
                self.client.set_terminated(run.info.run_id, "KILLED")
        if finished and best_trial is not None:
            best = self.client.get_run(self.run_of(best_trial))
            final = {BEST_PREFIX + key: value for key, value in best.data.metrics.items()
                     if is_final_metric(key) or is_validation_metric(key)}
            _log_metrics(self.client, self.parent_run_id, final, step=0)
            self.client.set_tag(self.parent_run_id, BEST_TRIAL_TAG, best_trial)
        status = "FINISHED" if finished else ("FAILED" if failed else "KILLED")
        self.client.set_terminated(self.parent_run_id, status)

    def log_figures(self) -> Path:
        """Draw the sweep's figures into ``results/figures`` and log them on the parent run
        (artifact folder ``figures``); says which were skipped and why."""
        from cadis.sweeps.figures import FIGURES_DIR, write_sweep_figures

        out = self.results / FIGURES_DIR
        paths, skipped = write_sweep_figures(self.client, self.parent_run_id, out)
        for path in paths:
            self.client.log_artifact(self.parent_run_id, str(path), FIGURES_DIR)
        for name, why in skipped.items():
            print(f"figures: {name} skipped: {why}", flush=True)
        return out

    def summary(self, best_trial: str | None, figures: Path | None) -> str:
        """What a person reads when the sweep ends: the chosen trial and its test figures,
        where its checkpoint and records are, the trials that failed and why, the figures,
        and how to open MLflow's UI."""
        lines = [f"sweep {self.sweep.name} done."]
        if best_trial is None:
            lines.append("no trial was ranked on validation: nothing was chosen")
        else:
            run = self.client.get_run(self.run_of(best_trial))
            metrics = run.data.metrics
            objective = self.sweep.objective[0]
            certify = self.sweep.certify
            accuracy = ", ".join(f"r={radius:g} {value:.3f}"
                                 for radius, value in trial_row(run).accuracy.items())
            lines += [f"chosen: {run.info.run_name} (trial {best_trial}), first by validation "
                      f"{objective.metric} = {metrics.get(objective.searched, math.nan):.3f}",
                      f"  test ({int(metrics.get(NUM_IMAGES, 0))} images, n={certify.n}, "
                      f"n0={certify.n0}, alpha={certify.alpha:g}): {accuracy}; "
                      f"acr {metrics.get(ACR, math.nan):.3f}"]
            trained = trained_file(self.results, best_trial)
            if trained.is_file():
                lines.append(f"  checkpoint: {json.loads(trained.read_text())['checkpoint']}")
            lines.append(f"  records: {trial_certify_dir(self.results, best_trial) / RECORDS_FILENAME}")
        failures = self.failures()
        if failures:
            lines.append(f"{len(failures)} trial(s) failed ({ERROR_ARTIFACT} on their MLflow runs):")
            lines += [f"  {name}: {reason}" for name, reason in failures]
        if figures is not None:
            lines.append(f"figures: {figures} (and on the sweep's MLflow run, folder figures)")
        lines.append(f"MLflow: {mlflow_ui_hint(self.uri, self.experiment_id, self.parent_run_id)}")
        return "\n".join(lines)

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
            self._client = PatientClient(self.uri)
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
            # A resumed sweep reruns its failed trials: the old reason no longer holds (the
            # old error text stays, in error.txt, with the attempt that failed).
            if FAILURE_TAG in found[0].data.tags:
                self.client.delete_tag(run_id, FAILURE_TAG)
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
        # The rank stage's result repeats the last epoch's metrics (ASHA reads them): log only
        # what the certification added.
        final = RANKED in result
        metrics = [Metric(key, float(value), timestamp, step) for key, value in result.items()
                   if key not in TUNE_KEYS and isinstance(value, (int, float))
                   and not isinstance(value, bool) and math.isfinite(value)
                   and (not final or is_validation_metric(key))]
        for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=metrics[start:start + MAX_METRICS_PER_BATCH])

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self.run_id(trial)
        certified = RANKED in (trial.last_result or {})
        rank_dir = trial_rank_dir(self.results, trial.trial_id)
        if certified:
            self._log_missing_epochs(run_id, trial.trial_id)
        if certified and rank_dir.is_dir():
            for name in CERTIFY_ARTIFACTS:
                if (rank_dir / name).is_file():
                    self.client.log_artifact(run_id, str(rank_dir / name), RANK_ARTIFACTS_DIR)
        self.client.set_tag(run_id, OUTCOME_TAG,
                            OUTCOME_COMPLETED if certified else OUTCOME_STOPPED)
        self.client.set_terminated(run_id, "FINISHED" if certified else "KILLED")

    def _log_missing_epochs(self, run_id: str, trial_id: str) -> None:
        """The per-epoch metrics of a trained trial that its run lacks, from its last
        checkpoint's history: a sweep that ended on an unreachable store lost the result it
        could not write, and the resumed Train run starts after that epoch's checkpoint."""
        from cadis.finetuning.checkpoint import read_metadata

        trained = trained_file(self.results, trial_id)
        if not trained.is_file():
            return
        history = read_metadata(Path(json.loads(trained.read_text())["checkpoint"]))["history"]
        logged = {metric.step for metric in self.client.get_metric_history(run_id, EPOCH)}
        for metrics in history:
            if int(metrics[EPOCH]) not in logged:
                # What on_trial_result would have written of that epoch's result.
                _log_metrics(self.client, run_id,
                             {key: value for key, value in metrics.items()
                              if math.isfinite(value)}, step=int(metrics[EPOCH]))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """A trial failed after its last attempt (Tune calls this once it gives up): its run
        ends FAILED with the reason as :data:`FAILURE_TAG` and Tune's error text (every
        attempt's) as the artifact :data:`ERROR_ARTIFACT`."""
        run_id = self.run_id(trial)
        text = _error_text(trial)
        if text:
            self.client.log_text(run_id, text, ERROR_ARTIFACT)
        self.client.set_tag(run_id, FAILURE_TAG, failure_reason(text) if text else NO_ERROR_TEXT)
        self.client.set_tag(run_id, OUTCOME_TAG, OUTCOME_FAILED)
        self.client.set_terminated(run_id, "FAILED")


def failure_reason(error_text: str) -> str:
    """Why a trial failed, in one line, from Tune's error text: the last exception line of
    its last attempt as ``Type: first line of the message`` (module path dropped). A Ray
    wrapper's message ends with its cause's traceback, so that line is the innermost cause's
    (``NonFiniteLoss: ...`` rather than ``WorkerGroupError: ...``); a retry refused as a
    :class:`RepeatedFailure` gives the reason it repeats; a text with no exception line gives
    its first line. Cut at :data:`MAX_REASON_CHARS`."""
    attempt = ATTEMPT_LINE.split(ANSI_ESCAPE.sub("", error_text))[-1]
    lines = [line.rstrip() for line in attempt.splitlines() if line.strip()]
    matches = [match for line in lines if (match := EXCEPTION_LINE.match(line))]
    if matches:
        name, message = matches[-1].groups()
        reason = f"{name}: {message}" if message else name
        if name == RepeatedFailure.__name__ and message:
            reason = message  # the failure the refused retry repeats
    else:
        reason = lines[0].strip() if lines else NO_ERROR_TEXT
    return reason if len(reason) <= MAX_REASON_CHARS else reason[:MAX_REASON_CHARS - 3] + "..."


def _error_text(trial: Any) -> str:
    """Tune's error text of a trial (its error file, written before the callbacks run),
    without terminal colours; empty when Tune kept none."""
    path = trial.error_file
    if not path or not Path(path).is_file():
        return ""
    return ANSI_ESCAPE.sub("", Path(path).read_text(errors="replace"))


def mlflow_ui_hint(uri: str, experiment_id: str, run_id: str) -> str:
    """How to see a run in MLflow's UI: the command that serves a local store on loopback and
    the page, or the server's page."""
    page = f"#/experiments/{experiment_id}/runs/{run_id}"
    if uri.startswith(SQLITE_SCHEME):
        mlflow = Path(sys.executable).with_name("mlflow")
        command = mlflow if mlflow.is_file() else "mlflow"
        return (f"{command} ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000, then "
                f"open http://127.0.0.1:5000/{page}")
    return f"open {uri.rstrip('/')}/{page}"


def _log_params(client: Any, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(key, str(value)) for key, value in params.items()]
    for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[start:start + MAX_PARAMS_PER_BATCH])


def _log_metrics(client: Any, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    from mlflow.entities import Metric

    timestamp = int(time.time() * 1000)
    items = [Metric(key, float(value), timestamp, step) for key, value in metrics.items()]
    for start in range(0, len(items), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=items[start:start + MAX_METRICS_PER_BATCH])


def _param_text(value: Any) -> str:
    if isinstance(value, Mapping):
        return ",".join(f"{key}={item}" for key, item in value.items())
    return str(value)
