"""Reading sweeps back from MLflow: the one place that searches runs, used by ``cadis
compare``, the sweep's figures, warm start and the sweep's own writer.

A sweep is its parent run (tag ``cadis.role`` = ``sweep``) and its trial runs (role
``trial``, nested under the parent); what each holds is :mod:`cadis.tracking.contract`'s.
A trial run reads back as a :class:`TrialRow`; a sweep as a :class:`SweepRecord`, its
parent run's params and tags with its trials. MLflow is imported when a run is read (it
takes seconds), torch never.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from cadis.errors import CadisError, first_line
from cadis.smoothing.bounds import max_certifiable_radius
from cadis.tracking import contract as tracking
from cadis.tracking.server import resolve_tracking_uri

#: Significant digits a long sampled float param reads with (as logged otherwise).
SHORT_PARAM_DIGITS: Final = 4
#: Runs per page of an MLflow search.
PAGE_SIZE: Final = 1000


class RunNotFound(CadisError):
    """No run has the id asked for: ``reason`` is MLflow's first line."""

    def __init__(self, run_id: str, reason: str) -> None:
        super().__init__(f"no MLflow run with id {run_id!r}")
        self.run_id = run_id
        self.reason = reason


class NotASweepRun(CadisError):
    """The run asked for is not a sweep's parent run (a trial's names its sweep)."""


@dataclass(frozen=True)
class TrialRow:
    """One trial run as read back: its name, how it ended, its params (MLflow strings) and
    its latest metric values."""

    name: str
    outcome: str
    params: Mapping[str, str]
    metrics: Mapping[str, float]
    searched: tuple[str, ...] = ()
    run_id: str = ""
    start_time: int = 0
    accuracy: Mapping[float, float] = field(init=False, repr=False, compare=False)
    """Test certified accuracy by radius (the final stage)."""
    val_accuracy: Mapping[float, float] = field(init=False, repr=False, compare=False)
    """Validation certified accuracy by radius (the rank stage)."""

    def __post_init__(self) -> None:
        by_radius: dict[str, dict[float, float]] = {"": {}, tracking.VALIDATION_PREFIX: {}}
        for name, value in self.metrics.items():
            for prefix, accuracy in by_radius.items():
                radius = tracking.radius_of_metric(name[len(prefix):]) \
                    if name.startswith(prefix) else None
                if radius is not None:
                    accuracy[radius] = float(value)
        object.__setattr__(self, "accuracy", dict(sorted(by_radius[""].items())))
        object.__setattr__(self, "val_accuracy", dict(sorted(
            by_radius[tracking.VALIDATION_PREFIX].items())))

    @property
    def certified(self) -> bool:
        """Whether the trial has final certified accuracy (it completed and was certified)."""
        return bool(self.accuracy)

    @property
    def label(self) -> str:
        """The trial's name with its searched values, sampled floats short
        (:func:`short_param`): ``trial_0 (confidence_threshold=0.5, lambda=1.842)``."""
        values = ", ".join(f"{key}={short_param(self.params[key])}"
                           for key in self.searched if key in self.params)
        return f"{self.name} ({values})" if values else self.name

    @property
    def reach(self) -> float:
        """The largest radius the trial's test certification can certify (its params
        ``sigma``, ``certify.n``, ``certify.alpha``: σ·Φ⁻¹(α^(1/n))); infinite when it does not
        say."""
        try:
            return max_certifiable_radius(float(self.params["sigma"]),
                                          int(self.params["certify.n"]),
                                          float(self.params["certify.alpha"]))
        except (KeyError, ValueError):
            return math.inf


@dataclass(frozen=True)
class SweepRecord:
    """A sweep as read back: its parent run's id, experiment, name, start (ms since the
    epoch), params and searched keys, and its trial runs in the order they started."""

    run_id: str
    experiment_id: str
    name: str
    start_time: int
    params: Mapping[str, str]
    searched: tuple[str, ...]
    trials: tuple[TrialRow, ...]


def short_param(text: str) -> str:
    """A param as logged, except that a long sampled float reads as
    :data:`SHORT_PARAM_DIGITS` significant digits (0.3242 for 0.3242492436303472)."""
    if "." in text and len(text) > SHORT_PARAM_DIGITS + 2:
        try:
            return f"{float(text):.{SHORT_PARAM_DIGITS}g}"
        except ValueError:
            pass
    return text


def searched_keys(tags: Mapping[str, str]) -> tuple[str, ...]:
    """The searched keys a run's :data:`~cadis.tracking.contract.SEARCHED_TAG` names."""
    return tuple(name.strip() for name in tags.get(tracking.SEARCHED_TAG, "").split(",")
                 if name.strip())


def trial_row(run: Any) -> TrialRow:
    """A :class:`TrialRow` of an MLflow run of a trial."""
    tags = run.data.tags
    name = run.info.run_name or tags.get(tracking.TRIAL_ID_TAG) or run.info.run_id
    outcome = tags.get(tracking.OUTCOME_TAG) or str(run.info.status).lower()
    return TrialRow(name=name, outcome=outcome, params=dict(run.data.params),
                    metrics=dict(run.data.metrics), searched=searched_keys(tags),
                    run_id=run.info.run_id, start_time=int(run.info.start_time or 0))


def reading_client(uri: str | None) -> Any:
    """An ``MlflowClient`` of the tracking URI ``uri`` (None: the default), which must exist
    (:func:`~cadis.tracking.server.resolve_tracking_uri`): reading creates nothing."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(resolve_tracking_uri(uri))


# --------------------------------------------------------------------------- runs


def trial_runs(client: Any, experiment_id: str, parent_run_id: str | None = None,
               trial_id: str | None = None) -> list[Any]:
    """Every trial run of an experiment (of one sweep when ``parent_run_id`` is given; the
    runs of one Tune trial when ``trial_id`` is)."""
    query = f"tags.`{tracking.ROLE_TAG}` = '{tracking.ROLE_TRIAL}'"
    if parent_run_id:
        query += f" and tags.`{tracking.PARENT_RUN_TAG}` = '{parent_run_id}'"
    if trial_id:
        query += f" and tags.`{tracking.TRIAL_ID_TAG}` = '{trial_id}'"
    return list(_all_runs(client, [experiment_id], query))


def find_trial_run(client: Any, experiment_id: str, parent_run_id: str, trial_id: str
                   ) -> Any | None:
    """The run of the sweep's trial ``trial_id`` (Tune's id), None when it has none yet."""
    found = trial_runs(client, experiment_id, parent_run_id, trial_id)
    return found[0] if found else None


def metric_history(client: Any, run_id: str, metric: str) -> list[tuple[int, float]]:
    """Every (step, value) the run logged of ``metric``, by step (a step logged twice, as a
    resumed trial may, in the order it was logged)."""
    history = sorted(client.get_metric_history(run_id, metric),
                     key=lambda item: (item.step, item.timestamp))
    return [(item.step, item.value) for item in history]


def _all_runs(client: Any, experiment_ids: list[str], query: str) -> Iterable[Any]:
    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string=query, max_results=PAGE_SIZE,
                                  page_token=token)
        yield from page
        token = page.token
        if not token:
            return


# --------------------------------------------------------------------------- sweeps


def sweep_run(client: Any, run_id: str) -> Any:
    """The parent run of a sweep; :class:`RunNotFound` when no run has ``run_id``,
    :class:`NotASweepRun` when it is another run (a trial's error names its sweep)."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        raise RunNotFound(run_id, first_line(error)) from None
    role = run.data.tags.get(tracking.ROLE_TAG)
    if role == tracking.ROLE_TRIAL:
        parent = run.data.tags.get(tracking.PARENT_RUN_TAG, "?")
        raise NotASweepRun(f"run {run_id} is a trial, not a sweep; its sweep's run id is "
                           f"{parent}")
    if role != tracking.ROLE_SWEEP:
        raise NotASweepRun(f"run {run_id} is not a sweep's run")
    return run


def sweep_runs(client: Any, experiment: str) -> list[Any]:
    """Every sweep's parent run in the experiment named ``experiment``; :class:`CadisError`
    for an unknown experiment."""
    query = f"tags.`{tracking.ROLE_TAG}` = '{tracking.ROLE_SWEEP}'"
    return list(_all_runs(client, [_experiment_id(client, experiment)], query))


def read_sweep(client: Any, run_id: str) -> SweepRecord:
    """The sweep whose parent run is ``run_id``; :class:`CadisError` when it is no sweep's
    run (:func:`sweep_run`) or has no trial runs."""
    parent = sweep_run(client, run_id)
    trials = trial_runs(client, parent.info.experiment_id, parent_run_id=run_id)
    return SweepRecord(
        run_id=run_id, experiment_id=parent.info.experiment_id,
        name=parent.data.tags.get(tracking.SWEEP_TAG, parent.info.run_name),
        start_time=int(parent.info.start_time or 0), params=dict(parent.data.params),
        searched=searched_keys(parent.data.tags),
        trials=tuple(_rows(trials, f"sweep run {run_id}")))


def load_trials(client: Any, experiment: str | None = None,
                sweep_run_id: str | None = None) -> list[TrialRow]:
    """The trial runs of an experiment (by name) or of one sweep (its parent run's id), in
    the order they started. Raises :class:`CadisError` for an unknown experiment or run and
    when there are no trial runs."""
    if (experiment is None) == (sweep_run_id is None):
        raise CadisError("name either an experiment or a sweep's run id")
    if sweep_run_id is not None:
        return list(read_sweep(client, sweep_run_id).trials)
    runs = trial_runs(client, _experiment_id(client, experiment))
    return _rows(runs, f"experiment {experiment!r}")


def _rows(runs: Sequence[Any], where: str) -> list[TrialRow]:
    if not runs:
        raise CadisError(f"{where} has no trial runs")
    return sorted(map(trial_row, runs), key=lambda row: (row.start_time, row.name))


def _experiment_id(client: Any, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is None or found.lifecycle_stage != "active":
        names = sorted(experiment.name for experiment in client.search_experiments())
        raise CadisError(f"no MLflow experiment named {name!r}; existing: "
                         f"{', '.join(names) or 'none'}")
    return found.experiment_id
