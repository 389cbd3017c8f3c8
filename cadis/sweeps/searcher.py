"""What searches a sweep: Tune's domains for the search space, Optuna's TPE (or Tune's grid
and random search), and ASHA. Imported by the driver only when a sweep runs (it loads Ray).

The incumbent (the sweep's base as a trial, :mod:`cadis.sweeps.spec`) is Optuna's first
trial: the searcher enqueues its point, marks the suggestion that evaluates it with
:data:`cadis.sweeps.spec.INCUMBENT_PARAM` and keeps its trial id in its saved state; the
scheduler never stops a trial so marked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from cadis.sweeps.asha_cuts import TUNE_MAX_T_EXTRA
from cadis.sweeps.layout import EPOCH, OPTUNA_DB
from cadis.sweeps.spec import (
    INCUMBENT_PARAM,
    SEARCHER_OPTUNA,
    Distribution,
    SweepConfig,
    is_incumbent,
)
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
    """Optuna's TPE (a Pareto front for two objectives) with the sweep's ``searcher:``
    settings (:class:`cadis.sweeps.spec.TpeSettings`), its study in ``optuna.db``, told
    the ``finished`` trials of a warm start (searched values, objective values) before its
    first proposal, its first trial the incumbent (when the sweep has one, warm-started or
    not); None (Tune's grid and random search) when the sweep has a grid."""
    if sweep.searcher != SEARCHER_OPTUNA:
        return None
    import optuna

    tpe = sweep.tpe
    if tpe is None:
        raise ValueError(f"sweep {sweep.name} searches with Optuna but has no TPE settings: "
                         "build it with cadis.sweeps.parse")
    metrics = [objective.searched for objective in sweep.objective]
    modes = [objective.mode for objective in sweep.objective]
    storage = optuna.storages.RDBStorage(f"sqlite:///{results / OPTUNA_DB}")
    # The sampler carries the seed: Ray ignores its own seed argument once given a sampler.
    sampler = optuna.samplers.TPESampler(n_startup_trials=tpe.n_startup_trials,
                                         multivariate=tpe.multivariate,
                                         constant_liar=tpe.constant_liar, seed=tpe.seed)
    return FinalMetricOptunaSearch(metric=metrics if len(metrics) > 1 else metrics[0],
                                   mode=modes if len(modes) > 1 else modes[0], storage=storage,
                                   study_name=sweep.name, sampler=sampler,
                                   intermediate=intermediate_metric(sweep),
                                   finished=finished, incumbent=sweep.incumbent_point)


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
    or two (Ray's own ``evaluated_rewards`` takes one).

    ``incumbent`` (searched values) is enqueued as the study's first trial (Ray's
    ``points_to_evaluate``; Optuna asks a waiting trial before it samples, finished trials
    or not), and the suggestion that evaluates it carries ``INCUMBENT_PARAM: True``. Its
    trial id, :attr:`incumbent_trial_id`, is part of the searcher's state, which Ray saves
    whole (``save`` pickles the attributes) and a resumed sweep restores."""

    def __init__(self, *args: Any, intermediate: str | None = None,
                 finished: Sequence[tuple[Mapping[str, Any], Sequence[float]]] = (),
                 incumbent: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        # Set first: Ray sets up the study in __init__ when it is given a space.
        self.intermediate = intermediate
        self.finished = [(dict(point), list(values)) for point, values in finished]
        self.incumbent = None if incumbent is None else dict(incumbent)
        self.incumbent_trial_id: str | None = None
        super().__init__(*args, points_to_evaluate=None if incumbent is None else [incumbent],
                         **kwargs)

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        if config is None or self.incumbent is None:
            return config
        # The first suggestion is the enqueued point; matching on it too keeps a suggestion
        # Tune lost (a driver killed before saving the searcher) from marking another trial.
        if trial_id == self.incumbent_trial_id or (self.incumbent_trial_id is None
                                                   and config == self.incumbent):
            self.incumbent_trial_id = trial_id
            return {**config, INCUMBENT_PARAM: True}
        return config

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
    """ASHA on the per-epoch metric, sparing the incumbent, or FIFO (every trial runs all its
    epochs)."""
    asha = sweep.scheduler
    if asha is None:
        return FIFOScheduler()
    # ASHA stops a trial the moment it reports max_t; one more lets the last epoch's trial
    # go on to its certification, reported under the same epoch.
    return IncumbentSparingASHA(time_attr=EPOCH, metric=asha.metric, mode=asha.mode,
                         grace_period=asha.grace_period, reduction_factor=asha.reduction_factor,
                         max_t=asha.max_t + TUNE_MAX_T_EXTRA)


class IncumbentSparingASHA(ASHAScheduler):
    """ASHA that never stops the incumbent (a trial whose config carries
    :data:`INCUMBENT_PARAM`): it trains to the end and is ranked like any trial.

    Its results still enter the rungs, as any trial's do: the recipe is a fair bar for the
    others at each rung, and the cuts ASHA makes among them are the ones it would make with
    the incumbent as an ordinary trial; only the incumbent's own stop is overruled."""

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP and is_incumbent(trial.config):
            self._num_stopped -= 1  # ASHA's count of the trials it stopped, in Tune's status
            return TrialScheduler.CONTINUE
        return action
