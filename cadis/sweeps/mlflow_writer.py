"""The sweep's parent run in MLflow, written by the driver only: opened (or reopened on
resume), its stage, the stored draws' costs, the finalists' test figures and the closing
``best.*``. Trials never open the tracking server, so a SQLite file takes no concurrent
writers; the trials' own runs are :mod:`cadis.sweeps.trial_callback`'s, what a person reads at
the end :mod:`cadis.sweeps.summary`'s. The names it writes are
:mod:`cadis.tracking.contract`'s.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from cadis.errors import CadisError
from cadis.sweeps.layout import SweepState
from cadis.sweeps.ranking import rank_trials
from cadis.sweeps.describe import describe
from cadis.sweeps.spec import SweepConfig
from cadis.tracking.client import PatientClient, log_files, log_metrics, log_params
from cadis.tracking.contract import (
    ACR,
    BEST_PREFIX,
    BEST_TRIAL_TAG,
    CERTIFY_ARTIFACTS,
    CHOICE_ARTIFACT,
    CHOSEN_VS_INCUMBENT,
    EXPERIMENT_KIND_TAG,
    EXPERIMENT_KIND_TRAINING,
    FAILURE_TAG,
    FINALIST_TAG,
    OUTCOME_FAILED,
    OUTCOME_TAG,
    PRIMARY_METRIC_GREATER_TAG,
    PRIMARY_METRIC_TAG,
    ROLE_SWEEP,
    ROLE_TAG,
    SEARCHED_TAG,
    SEEDS_HIGH_PREFIX,
    SEEDS_LOW_PREFIX,
    SEEDS_MEAN_PREFIX,
    STAGE_TAG,
    SWEEP_TAG,
    VS_LEADER,
    WARM_START_TAG,
    flatten_params,
    is_final_metric,
    is_validation_metric,
    seed_metric,
    verdict_metric,
)
from cadis.tracking.server import artifact_location
from cadis.tracking.sweep_reader import find_trial_run, trial_runs

if TYPE_CHECKING:
    from cadis.sweeps.choice import Choice
    from cadis.sweeps.objective import Objective
    from cadis.sweeps.warm_start import WarmStart


def experiment_tags(objectives: Sequence[Objective]) -> dict[str, str]:
    """The tags that mark a sweep's experiment in MLflow as model training, its primary
    metric the first objective as the trial runs carry it (``val_certified_accuracy_r0.5``)
    and that metric's direction (:mod:`cadis.tracking.contract` says what MLflow's UI does
    with them)."""
    first = objectives[0]
    return {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND_TRAINING, PRIMARY_METRIC_TAG: first.searched,
            PRIMARY_METRIC_GREATER_TAG: str(first.mode == "max")}


class SweepTracker:
    """The sweep's parent run: opened (or reopened on resume) and closed by the driver."""

    def __init__(self, uri: str, sweep: SweepConfig, results: Path,
                 state: SweepState | None) -> None:
        self.uri = uri
        self.sweep = sweep
        self.results = results
        self.client = PatientClient(uri)
        self.parent_run_id = state.parent_run_id if state else ""
        self.experiment_id = state.experiment_id if state else ""

    def open_sweep(self, sweep_file: Path, warm: WarmStart | None = None) -> None:
        """The sweep's parent run: its params, the sweep file and, for a warm start, where
        its search started (``cadis.warm_start_from`` and ``warm_start.*``)."""
        experiment = self.client.get_experiment_by_name(self.sweep.mlflow.experiment)
        self.experiment_id = experiment.experiment_id if experiment else \
            self.client.create_experiment(self.sweep.mlflow.experiment,
                                          artifact_location=artifact_location(self.uri))
        self.tag_experiment()
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
                  **{f"certify.race.{key}": value
                     for key, value in dataclasses.asdict(sweep.race).items()},
                  **{f"certify.final.{key}": value
                     for key, value in dataclasses.asdict(sweep.certify).items()},
                  "certify.final.top_k": sweep.top_k, "shares_draws": sweep.shares_draws,
                  **{f"search.{key}": distribution.describe()
                     for key, distribution in sweep.search.items()},
                  **flatten_params(sweep.base.to_dict(), "base."),
                  **({} if warm is None else flatten_params(warm.record(), "warm_start."))}
        log_params(self.client, self.parent_run_id, params)
        self.client.log_artifact(self.parent_run_id, str(sweep_file))
        self.client.log_text(self.parent_run_id, describe(sweep) + "\n", "sweep_resolved.txt")

    def reopen_sweep(self) -> None:
        self.tag_experiment()
        self.client.update_run(self.parent_run_id, status="RUNNING")

    def tag_experiment(self) -> None:
        """Set :func:`experiment_tags` on the sweep's experiment, new or not: a tag it has
        already is set again (the last sweep opened names the primary metric)."""
        for key, value in experiment_tags(self.sweep.objective).items():
            self.client.set_experiment_tag(self.experiment_id, key, value)

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

    def log_final(self, trial_id: str, figures: Mapping[str, float], certify_dir: Path,
                  finalist: bool) -> None:
        """A configuration's test figures and files on its trial run, and the finalist tag
        where it is one (the incumbent is certified on test whether or not it is)."""
        run_id = self.run_of(trial_id)
        log_metrics(self.client, run_id, figures, step=0)
        log_files(self.client, run_id, certify_dir, CERTIFY_ARTIFACTS)
        if finalist:
            self.client.set_tag(run_id, FINALIST_TAG, "true")

    def log_choice(self, choice: Choice) -> None:
        """The choice's verdicts: on each compared trial's run its ``vs_leader.*`` (``val_``
        first on validation), on the parent the chosen trial against the incumbent
        (``chosen_vs_incumbent.*``) and the decisions in words (``choice.md``)."""
        from cadis.sweeps.choice import VALIDATION, verdict_fields

        parent: dict[str, float] = {}
        for decision in choice.decisions:
            validation = decision.split == VALIDATION

            def name(comparison: str, field: str) -> str:
                metric = verdict_metric(comparison, decision.objective, field, validation)
                return metric if decision.train_seed is None else \
                    seed_metric(decision.train_seed, metric)

            for verdict in decision.verdicts:
                trial = decision.trial_of(verdict.other)
                log_metrics(self.client, self.run_of(trial),
                            {name(VS_LEADER, field): value
                             for field, value in verdict_fields(verdict).items()}, step=0)
                if trial == choice.incumbent:
                    parent.update({name(CHOSEN_VS_INCUMBENT, field): value
                                   for field, value in verdict_fields(verdict, turned=True
                                                                      ).items()})
        log_metrics(self.client, self.parent_run_id, parent, step=0)
        self.client.log_text(self.parent_run_id, choice.markdown(), CHOICE_ARTIFACT)

    def log_seed_figures(self, figures: Mapping[str, Mapping[str, Any]]) -> None:
        """Each configuration's test figures per training seed on its trial run
        (``seed<s>.<metric>``) and their mean, lowest and highest over its seeds
        (``seeds_mean.*``, ``seeds_low.*``, ``seeds_high.*``); ``figures``:
        :func:`~cadis.sweeps.final_stage.seed_figures`."""
        for trial_id, per_trial in figures.items():
            metrics = {seed_metric(seed, metric): value
                       for seed, entry in per_trial["seeds"].items()
                       for metric, value in entry["figures"].items()}
            for metric, mean in per_trial["mean"].items():
                low, high = per_trial["range"][metric]
                metrics.update({SEEDS_MEAN_PREFIX + metric: mean, SEEDS_LOW_PREFIX + metric: low,
                                SEEDS_HIGH_PREFIX + metric: high})
            log_metrics(self.client, self.run_of(trial_id), metrics, step=0)

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
        """The run id of the sweep's trial ``trial_id``; :class:`CadisError` when it has none."""
        run = find_trial_run(self.client, self.experiment_id, self.parent_run_id, trial_id)
        if run is not None:
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
            log_metrics(self.client, self.parent_run_id, final, step=0)
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

    def comparison(self) -> str:
        """The table of ``cadis compare --sweep`` of this sweep."""
        from cadis.tracking.compare import compared_trials, format_trial_table

        rows, val_reach = compared_trials(self.client, sweep_run_id=self.parent_run_id)
        return format_trial_table(rows, val_reach=val_reach)
