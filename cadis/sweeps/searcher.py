"""What searches a sweep: Tune's domains for the search space, Optuna's TPE (or Tune's grid
and random search), and ASHA. Imported by the driver only when a sweep runs (it loads Ray).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from cadis.sweeps.layout import EPOCH, OPTUNA_DB
from cadis.sweeps.schema import SEARCHER_OPTUNA, Distribution, SweepConfig


def tune_search_space(sweep: SweepConfig) -> dict[str, Any]:
    """The Tune ``param_space``: ``uniform``, ``loguniform``, ``randint(low, high + 1)`` (Tune's
    upper bound is exclusive; the sweep file's ``int`` includes ``high``), ``choice`` and
    ``grid_search`` (``variant``: a grid of mappings; apply a trial's with
    :func:`cadis.sweeps.schema.trial_config`)."""
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


def build_searcher(sweep: SweepConfig, results: Path) -> Any:
    """Optuna's TPE (a Pareto front for two objectives), its study in ``optuna.db``; None
    (Tune's grid and random search) when the sweep has a grid."""
    if sweep.searcher != SEARCHER_OPTUNA:
        return None
    import optuna

    metrics = [objective.metric for objective in sweep.objective]
    modes = [objective.mode for objective in sweep.objective]
    storage = optuna.storages.RDBStorage(f"sqlite:///{results / OPTUNA_DB}")
    return FinalMetricOptunaSearch(metric=metrics if len(metrics) > 1 else metrics[0],
                        mode=modes if len(modes) > 1 else modes[0], storage=storage,
                        study_name=sweep.name, seed=sweep.base.seed)


class FinalMetricOptunaSearch(OptunaSearch):
    """Optuna told only a trial's final, certified metrics. Per-epoch results carry the proxy,
    not the objective (Ray's searcher would look it up in each one); a trial that ends
    without its objective (stopped by ASHA) is told as pruned, in one objective or two."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        return None

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        if result is not None and any(metric not in result for metric in metrics):
            result = None
        super().on_trial_complete(trial_id, result, error)


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
