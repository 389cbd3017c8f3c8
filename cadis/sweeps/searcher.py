"""What searches a sweep: Tune's domains for the search space, Optuna's TPE (or Tune's grid
and random search), and ASHA. Imported by the driver only when a sweep runs (it loads Ray).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from cadis.sweeps.layout import EPOCH, OPTUNA_DB
from cadis.sweeps.spec import SEARCHER_OPTUNA, Distribution, SweepConfig
from cadis.tracking.contract import PROXY_ACR


def tune_search_space(sweep: SweepConfig) -> dict[str, Any]:
    """The Tune ``param_space``: ``uniform``, ``loguniform``, ``randint(low, high + 1)`` (Tune's
    upper bound is exclusive; the sweep file's ``int`` includes ``high``), ``choice`` and
    ``grid_search`` (``variant``: a grid of mappings; apply a trial's with
    :func:`cadis.sweeps.search_space.trial_config`)."""
    def domain(distribution: Distribution) -> Any:
        values = distribution.values
        if distribution.kind == "uniform":
            return tune.uniform(*values)
        if distribution.kind == "loguniform":
            return tune.loguniform(*values)
        if distribution.kind == "int":
            return tune.randint(values[0], values[1] + 1)
        if distribution.kind == "choice":
            return tune.choice(list(values))
        return tune.grid_search(list(values))

    return {key: domain(distribution) for key, distribution in sweep.search.items()}


def build_searcher(sweep: SweepConfig, results: Path,
                   finished: Sequence[tuple[Mapping[str, Any], Sequence[float]]] = ()) -> Any:
    """Optuna's TPE (a Pareto front for two objectives), its study in ``optuna.db``, told
    the ``finished`` trials of a warm start (searched values, objective values) before its
    first proposal; None (Tune's grid and random search) when the sweep has a grid."""
    if sweep.searcher != SEARCHER_OPTUNA:
        return None
    import optuna

    metrics = [objective.searched for objective in sweep.objective]
    modes = [objective.mode for objective in sweep.objective]
    storage = optuna.storages.RDBStorage(f"sqlite:///{results / OPTUNA_DB}")
    return FinalMetricOptunaSearch(metric=metrics if len(metrics) > 1 else metrics[0],
                                   mode=modes if len(modes) > 1 else modes[0], storage=storage,
                                   study_name=sweep.name, seed=sweep.base.seed,
                                   intermediate=intermediate_metric(sweep),
                                   finished=finished)


def intermediate_metric(sweep: SweepConfig) -> str | None:
    """The per-epoch metric Optuna is told as a trial's intermediate values (so that TPE
    learns from trials ASHA stopped, ranked by them): the scheduler's, else the proxy ACR;
    none for two objectives (Optuna keeps no intermediate values there) or when the
    scheduler's direction is not the objective's."""
    if len(sweep.objective) != 1:
        return None
    if sweep.scheduler is None:
        return PROXY_ACR if sweep.objective[0].mode == "max" else None
    return sweep.scheduler.metric if sweep.scheduler.mode == sweep.objective[0].mode else None


class FinalMetricOptunaSearch(OptunaSearch):
    """Optuna told a trial's per-epoch proxy as intermediate values and its certified
    figures as its value. Ray's searcher would look the objective up in every per-epoch
    result; a trial that ends without its objective (stopped by ASHA) is told as pruned, in
    one objective or two, with the intermediate values it reported. ``finished`` trials
    (a warm start) enter the study as complete before the first proposal, in one objective
    or two (Ray's own ``evaluated_rewards`` takes one)."""

    def __init__(self, *args: Any, intermediate: str | None = None,
                 finished: Sequence[tuple[Mapping[str, Any], Sequence[float]]] = (),
                 **kwargs: Any) -> None:
        # Set first: Ray sets up the study in __init__ when it is given a space.
        self.intermediate = intermediate
        self.finished = [(dict(point), list(values)) for point, values in finished]
        super().__init__(*args, **kwargs)

    def _setup_study(self, mode: str | list[str]) -> None:
        import optuna

        super()._setup_study(mode)
        for point, values in self.finished:
            self._ot_study.add_trial(optuna.trial.create_trial(
                values=values, params=point, distributions=self._space))

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        objective_known = any(metric in result for metric in self._metrics())
        if (self.intermediate is None or objective_known or self.intermediate not in result
                or trial_id in self._completed_trials or trial_id not in self._ot_trials):
            return
        self._ot_trials[trial_id].report(float(result[self.intermediate]),
                                         step=int(result.get(EPOCH, 0)))

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if result is not None and any(metric not in result for metric in self._metrics()):
            result = None
        super().on_trial_complete(trial_id, result, error)

    def _metrics(self) -> list[str]:
        return self.metric if isinstance(self.metric, list) else [self.metric]


def build_scheduler(sweep: SweepConfig) -> Any:
    """ASHA on the per-epoch metric, or FIFO (every trial runs all its epochs)."""
    asha = sweep.scheduler
    if asha is None:
        return FIFOScheduler()
    # ASHA stops a trial the moment it reports max_t; one more lets the last epoch's trial
    # go on to its certification, reported under the same epoch.
    return ASHAScheduler(time_attr=EPOCH, metric=asha.metric, mode=asha.mode,
                         grace_period=asha.grace_period, reduction_factor=asha.reduction_factor,
                         max_t=asha.max_t + 1)
