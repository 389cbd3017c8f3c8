"""What a sweep's figures show, computed from the sweep as read back from MLflow: no drawing,
no matplotlib and no torch here (the drawing is :mod:`cadis.sweeps.figures`'s, as Optuna keeps
``visualization/_pareto_front.py`` apart from ``visualization/matplotlib/_pareto_front.py``).

:func:`load_sweep_view` reads a sweep's parent run and trial runs
(:mod:`cadis.tracking.sweep_reader`) into a :class:`SweepView`: its objectives, searched
ranges, ASHA settings, the two certification stages and the trials ranked as the sweep ranked
them. From the view alone: each trial's curve points up to the radius its stage's n can
certify, each contender's paired interval against the chosen trial (the verdicts the sweep
logged, :mod:`cadis.sweeps.choice`), its legend label, ASHA's rungs and the cuts its
stopped trials met with whether they lay within the proxy's noise
(:mod:`cadis.sweeps.asha_cuts`), whether the sweep supports a figure (else why not),
and the Optuna study behind Optuna's plots, rebuilt in memory (every ranked trial COMPLETE
with its validation objective, the others PRUNED with their per-epoch values), so the
pictures work for any sweep in the tracking server, on any machine.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from cadis.errors import CadisError
from cadis.smoothing.bounds import max_certifiable_radius
from cadis.sweeps.asha_cuts import NOISE_SES, Cut, sweep_cuts, sweep_milestones
from cadis.sweeps.distribution_text import SearchRange, read_description
from cadis.sweeps.objective import Objective
from cadis.sweeps.ranking import rank_trials
from cadis.tracking import contract as tracking
from cadis.tracking.compare import within_reach
from cadis.tracking.sweep_reader import TrialRow, metric_history, read_sweep

#: Trials drawn in the validation panel: the best by the (first) objective.
TOP_CURVES: Final = 5
#: How searched keys read in a legend.
SYMBOLS: Final = {"lambda": "λ", "epsilon": "ε", "num_noises": "M", "lora_rank": "rank",
                  "confidence_threshold": "τ", "confidence_model": "scorer"}
#: Significant digits of a sampled float in a legend.
LEGEND_DIGITS: Final = 3
#: How far apart, as a share of the stage's reach, the contenders' interval bars stand at the
#: objective's radius (side by side, so that they do not hide one another).
BAR_SPREAD: Final = 0.012


# --------------------------------------------------------------------------- the view


@dataclass(frozen=True)
class StageCertification:
    """How one stage certified its figures: the set, n, n0, alpha, the images (None when
    unknown) and whether sequentially (then n is the most an image spent)."""

    name: str
    n: int
    n0: int
    alpha: float
    images: int | None
    sequential: bool

    def reach(self, sigma: float) -> float:
        """The largest radius this stage can certify: every draw the top class, its bound at
        alpha. A sequential stage reaches the same with at most n draws
        (:func:`~cadis.smoothing.sequential.draws_to_reach`: its plan needs exactly the draws
        fixed-n CERTIFY does)."""
        return max_certifiable_radius(sigma, self.n, self.alpha)

    def caption(self) -> str:
        images = "" if self.images is None else f"{self.images} images, "
        mode = " (sequential: n at most)" if self.sequential else ""
        return f"{self.name}: {images}n={self.n}, n0={self.n0}, α={self.alpha:g}{mode}"


@dataclass(frozen=True)
class SweepView:
    """Everything the figures draw, read from MLflow."""

    name: str
    run_id: str
    started: dt.datetime
    sigma: float
    objectives: tuple[Objective, ...]
    searched: tuple[str, ...]
    ranges: Mapping[str, SearchRange]
    scheduler: Mapping[str, Any] | None
    rank: StageCertification
    final: StageCertification
    trials: tuple[TrialRow, ...]
    histories: Mapping[str, Sequence[tuple[int, float]]]
    """The scheduler's metric per epoch, by trial run id."""
    cuts: tuple[Cut, ...] = ()
    """The cut each trial ASHA stopped met, rebuilt (:mod:`cadis.sweeps.asha_cuts`)."""
    stopped: int = 0
    """How many trials ASHA stopped."""

    @property
    def title(self) -> str:
        return f"sweep {self.name}, {self.started:%Y-%m-%d %H:%M} UTC"

    def ranked(self) -> list[TrialRow]:
        """Trials with every objective measured on validation, best first as the sweep
        ranked them (:mod:`cadis.sweeps.ranking`)."""
        return rank_trials(self.trials, self.objectives, lambda row: row.metrics,
                           lambda row: row.start_time)

    def finalists(self) -> list[TrialRow]:
        """Trials certified on test, in rank order."""
        return [row for row in self.ranked() if row.certified]


def load_sweep_view(client: Any, parent_run_id: str) -> SweepView:
    """The view of the sweep whose parent run is ``parent_run_id``; :class:`CadisError` when
    it is not a sweep's run or has no trials."""
    sweep = read_sweep(client, parent_run_id)
    params = sweep.params
    missing = [key for key in REQUIRED_PARAMS if key not in params]
    if missing:
        raise CadisError(f"sweep run {parent_run_id} has no param {missing[0]}: it was made "
                         f"before sweeps had a rank stage, and cannot be drawn")
    objectives = tuple(Objective(*part.split()) for part in params["objective"].split(", "))
    scheduler = None if params.get("scheduler", "none") == "none" else \
        json.loads(params["scheduler"])
    metric = scheduler["metric"] if scheduler else tracking.PROXY_ACR
    histories = {row.run_id: metric_history(client, row.run_id, metric) for row in sweep.trials}
    cuts, stopped = sweep_cuts(client, sweep.trials, scheduler) if scheduler else ([], 0)
    finalist = next((row for row in sweep.trials if row.certified), None)
    return SweepView(
        name=sweep.name,
        run_id=parent_run_id,
        started=dt.datetime.fromtimestamp(sweep.start_time / 1000, dt.timezone.utc),
        sigma=float(params["base.sigma"]),
        objectives=objectives, searched=sweep.searched,
        ranges={key: read_description(params.get(f"search.{key}", ""))
                for key in sweep.searched},
        scheduler=scheduler,
        rank=_certification("validation", params, "certify.rank.",
                            _int_or_none(params.get("certify.rank.images"))),
        final=_certification("test", params, "certify.final.", None if finalist is None
                             else _int_or_none(finalist.metrics.get(tracking.NUM_IMAGES))),
        trials=sweep.trials, histories=histories, cuts=tuple(cuts), stopped=stopped)


def _certification(name: str, params: Mapping[str, str], prefix: str, images: int | None
                   ) -> StageCertification:
    return StageCertification(name, int(params[f"{prefix}n"]), int(params[f"{prefix}n0"]),
                         float(params[f"{prefix}alpha"]), images,
                         params.get(f"{prefix}sequential", "False") == "True")


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(float(value))


#: What the figures read from a sweep's parent run.
REQUIRED_PARAMS: Final = ("objective", "base.sigma", *(f"certify.{stage}.{key}" for stage in
                                                       ("rank", "final")
                                                       for key in ("n", "n0", "alpha")))

# --------------------------------------------------------------------------- the study


def rebuild_study(view: SweepView) -> Any:
    """An in-memory Optuna study of the sweep: every ranked trial COMPLETE with its
    validation objective(s), every other trial PRUNED with its per-epoch values; params as
    the searched values the trials ran (numbers for ranges, the logged text for choices)."""
    import optuna

    directions = ["maximize" if o.mode == "max" else "minimize" for o in view.objectives]
    study = optuna.create_study(directions=directions)
    distributions = _distributions(view)
    ranked = {row.run_id for row in view.ranked()}
    for row in view.trials:
        params = {key: _param_value(view.ranges[key], row.params[key])
                  for key in distributions if key in row.params}
        if set(params) != set(distributions):
            continue
        if row.run_id in ranked:
            trial = optuna.trial.create_trial(
                values=[row.metrics[o.searched] for o in view.objectives], params=params,
                distributions=distributions, user_attrs={"run_id": row.run_id})
        else:
            trial = optuna.trial.create_trial(
                state=optuna.trial.TrialState.PRUNED, params=params,
                distributions=distributions, user_attrs={"run_id": row.run_id},
                intermediate_values=dict(view.histories.get(row.run_id, ())))
        study.add_trial(trial)
    return study


def _distributions(view: SweepView) -> dict[str, Any]:
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    distributions: dict[str, Any] = {}
    for key in view.searched:
        ranges = view.ranges[key]
        values = [row.params[key] for row in view.trials if key in row.params]
        if not values:
            continue
        if ranges.kind == "int":
            numbers = [int(float(value)) for value in values]
            distributions[key] = IntDistribution(min(int(ranges.low), *numbers),
                                                 max(int(ranges.high), *numbers))
        elif ranges.kind in ("uniform", "loguniform"):
            numbers = [float(value) for value in values]
            distributions[key] = FloatDistribution(min(ranges.low, *numbers),
                                                   max(ranges.high, *numbers),
                                                   log=ranges.kind == "loguniform")
        else:
            distributions[key] = CategoricalDistribution(tuple(dict.fromkeys(values)))
    return distributions


def _param_value(ranges: SearchRange, text: str) -> Any:
    if ranges.kind == "int":
        return int(float(text))
    if ranges.kind in ("uniform", "loguniform"):
        return float(text)
    return text


# --------------------------------------------------------------------------- labels and points


def trial_label(view: SweepView, row: TrialRow) -> str:
    """``6c5f8d57: λ=1.84, ε=0.324, M=2``: the trial's id (its run name's last part, Tune's
    ``run_trial_<id>``) and its searched values, short."""
    values = ", ".join(f"{SYMBOLS.get(key, key)}={_short(row.params[key])}"
                       for key in view.searched if key in row.params)
    name = row.name.rsplit("_", 1)[-1]
    return f"{name}: {values}" if values else name


def _short(text: str) -> str:
    try:
        number = float(text)
    except ValueError:
        return text
    return text if "." not in text else f"{number:.{LEGEND_DIGITS}g}"


def curve_points(view: SweepView, row: TrialRow, stage: StageCertification
                 ) -> list[tuple[float, float]]:
    """The (radius, certified accuracy) points a trial's curve in ``stage`` draws: its
    figures at the radii ``stage``'s n can certify."""
    return within_reach(row.val_accuracy if stage is view.rank else row.accuracy,
                        stage.reach(view.sigma))


@dataclass(frozen=True)
class IntervalBar:
    """A contender's verdict against the chosen trial, placed on the certified-accuracy axes
    at the objective's radius (``x``, nudged beside the others): its own figure ``value`` and
    the chosen trial's figure plus the paired 95% interval of the difference (``low`` to
    ``high``). A bar that reaches the chosen trial's level is inseparable from it."""

    run_id: str
    x: float
    value: float
    low: float
    high: float
    separated: bool


def interval_bars(view: SweepView, stage: StageCertification, rows: Sequence[TrialRow]
                  ) -> tuple[float | None, list[IntervalBar]]:
    """The chosen trial's figure at the first objective's radius in ``stage`` and the
    interval bar of each of ``rows`` with a verdict there; (None, []) when the objective is
    not certified accuracy at a radius (ACR has no point on the curves) or no row has one."""
    metric = view.objectives[0].metric
    radius = tracking.radius_of_metric(metric)
    if radius is None:
        return None, []
    validation = stage is view.rank
    found = []
    for row in rows:
        figures = row.val_accuracy if validation else row.accuracy
        verdict = {field: row.metrics.get(tracking.verdict_metric(
            tracking.VS_LEADER, metric, field, validation)) for field in
            ("difference", "low", "high", "separated")}
        if radius in figures and all(value is not None for value in verdict.values()):
            found.append((row, figures[radius], verdict))
    if not found:
        return None, []
    step = BAR_SPREAD * stage.reach(view.sigma)
    # The chosen trial's figure is each contender's own less its difference from it.
    bars = [IntervalBar(row.run_id, radius + step * (position - (len(found) - 1) / 2), value,
                        value - verdict["difference"] + verdict["low"],
                        value - verdict["difference"] + verdict["high"],
                        verdict["separated"] == 1.0)
            for position, (row, value, verdict) in enumerate(found)]
    first_value, first_verdict = found[0][1], found[0][2]
    return first_value - first_verdict["difference"], bars


def asha_rungs(scheduler: Mapping[str, Any] | None) -> list[float]:
    """The epochs at which ASHA compares trials, as Ray makes its rungs: grace_period, times
    reduction_factor, ... up to max_t (a rung at max_t cuts at the last epoch)."""
    return sweep_milestones(scheduler) if scheduler else []


@dataclass(frozen=True)
class RungMarks:
    """What the rungs figure marks of ASHA's cuts: the cut each stopped trial met, as
    (epoch, cut); the stopped trials that lay within the proxy's noise of theirs (drawn apart);
    how many trials ASHA stopped, how many of those have a cut and SEs to judge by, and how
    many of those lay within noise."""

    cuts: tuple[tuple[int, float], ...]
    within: frozenset[str]
    stopped: int
    judged: int

    @property
    def caption(self) -> str:
        """``ASHA stopped 9; 6 of 8 within the proxy's noise of their cut (2 unpaired SEs), 1
        not judged`` (no cut rebuilt, or no SE logged)."""
        if not self.stopped:
            return "ASHA stopped no trial"
        text = (f"ASHA stopped {self.stopped}; {len(self.within)} of {self.judged} within the "
                f"proxy's noise of their cut ({NOISE_SES:g} unpaired SEs)")
        unjudged = self.stopped - self.judged
        return text + (f", {unjudged} not judged" if unjudged else "")


def rung_marks(view: SweepView) -> RungMarks:
    """The cuts ASHA's stopped trials met and which of those trials lay within noise."""
    return RungMarks(
        cuts=tuple(sorted({(cut.epoch, cut.cut) for cut in view.cuts})),
        within=frozenset(cut.trial for cut in view.cuts if cut.within_noise),
        stopped=view.stopped,
        judged=sum(cut.within_noise is not None for cut in view.cuts))


# --------------------------------------------------------------------------- what a figure needs


def needs_ranked(count: int) -> Callable[[SweepView], str | None]:
    def check(view: SweepView) -> str | None:
        have = len(view.ranked())
        return None if have >= count else \
            f"needs {count} ranked trials, the sweep has {have}"
    return check


def needs_spread(view: SweepView) -> str | None:
    """Importances attribute the spread of an objective to the params: two ranked trials at
    least, and some spread in each objective (fANOVA refuses a constant target)."""
    why = needs_ranked(2)(view)
    if why is not None:
        return why
    for objective in view.objectives:
        if len({row.metrics[objective.searched] for row in view.ranked()}) < 2:
            return f"every ranked trial has the same val {objective.metric}: nothing to attribute"
    return None


def needs_two_objectives(view: SweepView) -> str | None:
    if len(view.objectives) != 2:
        return "one objective: no front"
    return needs_ranked(1)(view)
