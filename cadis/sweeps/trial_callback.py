"""The Tune callback in the sweep's driver that writes each trial's MLflow run: created (or
found again on resume) with the trial's params, its per-epoch and rank-stage metrics, the
rank stage's files, how it ended and, for a failed trial, why (read from Tune's error text,
here beside the only thing that reads it). The incumbent's run (the sweep's base as a trial,
known by its Tune config) is named and tagged so, and the sweep's parent run names its
trial. The names it writes are :mod:`cadis.tracking.contract`'s.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any, Mapping

from ray.tune import Callback

from cadis.errors import RepeatedFailure
from cadis.sweeps.layout import EPOCH, TrainedTrial, trained_file, trial_rank_dir
from cadis.sweeps.search_space import trial_config
from cadis.sweeps.spec import INCUMBENT_PARAM, SweepConfig, is_incumbent
from cadis.sweeps.trial_phases import TrialClock
from cadis.tracking.client import PatientClient, log_files, log_metrics, log_params
from cadis.tracking.contract import (
    ACR,
    CERTIFY_ARTIFACTS,
    CLOCK_PREFIX,
    ERROR_ARTIFACT,
    FAILURE_TAG,
    INCUMBENT_TAG,
    INCUMBENT_TRIAL_TAG,
    OUTCOME_COMPLETED,
    OUTCOME_FAILED,
    OUTCOME_STOPPED,
    OUTCOME_TAG,
    PARENT_RUN_TAG,
    RANK_ARTIFACTS_DIR,
    ROLE_TAG,
    ROLE_TRIAL,
    SEARCHED_TAG,
    TRIAL_ID_TAG,
    flatten_params,
    is_validation_metric,
    validation_metric,
)
from cadis.tracking.sweep_reader import find_trial_run, metric_history

# The rank stage's results carry this: the per-epoch ones do not.
RANKED = validation_metric(ACR)
# The incumbent's run is named this and its trial id (other trials' runs, as Tune names them).
INCUMBENT_RUN_PREFIX = "incumbent-"
# Results that are Tune's bookkeeping, not the trial's metrics.
TUNE_KEYS = {"training_iteration", "time_total_s", "time_this_iter_s", "timestamp",
             "time_since_restore", "iterations_since_restore", "timesteps_total",
             "episodes_total", "timesteps_since_restore", "pid", "done", "checkpoint_path",
             "should_checkpoint"}
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


class MlflowTrialCallback(Callback):
    """Tune callback in the driver: a child run per trial, its params, metrics, files and
    where its slot went (:mod:`cadis.sweeps.trial_phases`).

    Holds only plain values and opens its MLflow client on first use: Tune pickles callbacks
    into its experiment state, and a resumed sweep unpickles this one (without the clocks of
    trials begun before: their slots are not timed).
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
        self._clocks: dict[str, TrialClock] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None, "_clocks": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({"_clocks": {}, **state})

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
        found = find_trial_run(self.client, self.experiment_id, self.parent_run_id, trial_id)
        if found is not None:
            run_id = found.info.run_id
            self.client.update_run(run_id, status="RUNNING")
            # A resumed sweep reruns its failed trials: the old reason no longer holds (the
            # old error text stays, in error.txt, with the attempt that failed).
            if FAILURE_TAG in found.data.tags:
                self.client.delete_tag(run_id, FAILURE_TAG)
        else:
            incumbent = is_incumbent(trial.config)
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"{INCUMBENT_RUN_PREFIX}{trial_id}" if incumbent else str(trial),
                tags={PARENT_RUN_TAG: self.parent_run_id, ROLE_TAG: ROLE_TRIAL,
                      TRIAL_ID_TAG: trial_id, SEARCHED_TAG: ",".join(sorted(self.sweep.search)),
                      **({INCUMBENT_TAG: "true"} if incumbent else {})})
            run_id = run.info.run_id
            if incumbent:
                self.client.set_tag(self.parent_run_id, INCUMBENT_TRIAL_TAG, trial_id)
            # The whole training config (searched values applied), and each searched value
            # under its own name: a variant's mapping too, as one param.
            config = trial_config(self.sweep, trial.config).to_dict()
            log_params(self.client, run_id, {
                **flatten_params(config),
                **{key: _param_text(value) for key, value in trial.config.items()
                   if key != INCUMBENT_PARAM}})
        self._run_ids[trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._clocks[trial.trial_id] = TrialClock(time.time())
        self.run_id(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        run_id = self.run_id(trial)
        if trial.trial_id in self._clocks:
            self._clocks[trial.trial_id].add(result)
        # The rank stage's result repeats the last epoch's metrics (ASHA reads them): log only
        # what the certification added.
        final = RANKED in result
        metrics = {key: value for key, value in result.items()
                   if key not in TUNE_KEYS and not key.startswith(CLOCK_PREFIX)
                   and isinstance(value, (int, float))
                   and not isinstance(value, bool) and math.isfinite(value)
                   and (not final or is_validation_metric(key))}
        log_metrics(self.client, run_id, metrics, step=int(result.get(EPOCH, 0)),
                    timestamp_ms=int(result.get("timestamp", 0) * 1000))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self.run_id(trial)
        certified = RANKED in (trial.last_result or {})
        rank_dir = trial_rank_dir(self.results, trial.trial_id)
        clock = self._clocks.pop(trial.trial_id, None)
        if clock is not None:
            log_metrics(self.client, run_id, clock.phases(time.time()), step=0)
        if certified:
            self._log_missing_epochs(run_id, trial.trial_id)
        if certified:
            log_files(self.client, run_id, rank_dir, CERTIFY_ARTIFACTS, RANK_ARTIFACTS_DIR)
        self.client.set_tag(run_id, OUTCOME_TAG,
                            OUTCOME_COMPLETED if certified else OUTCOME_STOPPED)
        self.client.set_terminated(run_id, "FINISHED" if certified else "KILLED")

    def _log_missing_epochs(self, run_id: str, trial_id: str) -> None:
        """The per-epoch metrics of a trained trial that its run lacks, from its last
        checkpoint's history: a sweep that ended on an unreachable tracking server lost the
        result it could not write, and the resumed Train run starts after that epoch's checkpoint."""
        from cadis.finetuning.checkpoint import read_metadata

        trained = trained_file(self.results, trial_id)
        if not trained.is_file():
            return
        history = read_metadata(Path(TrainedTrial.read(trained).checkpoint))["history"]
        logged = {step for step, _ in metric_history(self.client, run_id, EPOCH)}
        for metrics in history:
            if int(metrics[EPOCH]) not in logged:
                # What on_trial_result would have written of that epoch's result.
                log_metrics(self.client, run_id,
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


def _param_text(value: Any) -> str:
    if isinstance(value, Mapping):
        return ",".join(f"{key}={item}" for key, item in value.items())
    return str(value)
