"""Pictures of a sweep, read back from MLflow: what a person looks at to learn which settings
matter.

:func:`load_sweep_view` reads a sweep's parent run and its trial runs; :func:`sweep_figures`
draws, from that view alone:

* ``certified_accuracy.png``: certified accuracy over radius of the top trials on validation
  (the rank stage) beside the finalists on test (the final stage), each panel saying which
  images, n, n0 and alpha made it; radii beyond what its n can certify are not drawn, and
  the limit is marked (a cliff to 0 there is an artefact of n, not of the model);
* ``parallel_coordinates.png``: the searched values of every ranked trial against the
  (first) objective, by Optuna's own plot (one file per objective for a Pareto front);
* ``importance.png``: parameter importances by Optuna's fANOVA evaluator and plot;
* ``pareto_front.png``: for two objectives, Optuna's front with the trials certified on
  test marked and the chosen one named;
* ``rungs.png``: ASHA's rungs, the scheduler's metric per epoch of every trial, stopped
  trials in grey ending where ASHA stopped them.

The Optuna study behind the Optuna plots is rebuilt in memory from the MLflow runs (every
ranked trial COMPLETE with its validation objective, the others PRUNED with their per-epoch
values), so the pictures work for any sweep in the store, on any machine. A figure the data
cannot support (importances of fewer than two ranked trials) is skipped with its reason.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cadis.errors import CadisError, first_line
from cadis.files import atomic_write_bytes
from cadis.smoothing.bounds import certified_radius, lower_confidence_bound
from cadis.smoothing.sequential import draws_to_reach
from cadis.sweeps.ranking import rank_trials
from cadis.sweeps.objective import Objective
from cadis.tracking import contract as tracking
from cadis.tracking.compare import TrialRow, load_trials, resolve_tracking_uri, within_reach

#: The parent run's artifact folder of the figures, and the results folder's.
FIGURES_DIR: Final = "figures"
#: Trials drawn in the validation panel: the best by the (first) objective.
TOP_CURVES: Final = 5
#: How searched keys read in a legend.
SYMBOLS: Final = {"lambda": "λ", "epsilon": "ε", "num_noises": "M", "lora_rank": "rank",
                  "confidence_threshold": "τ", "confidence_model": "scorer"}
#: Significant digits of a sampled float in a legend.
LEGEND_DIGITS: Final = 3
STOPPED_COLOUR: Final = "0.6"
TRIAL_COLOURMAP: Final = "viridis"
DPI: Final = 110
#: How finely a sequential stage's reach is found below fixed n's (its plan may need a few
#: more draws for the same radius).
SEQUENTIAL_REACH_STEP: Final = 0.01


# --------------------------------------------------------------------------- what is drawn


@dataclass(frozen=True)
class Certification:
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
        alpha (when sequential, the largest radius whose plan of n draws can, to 0.01)."""
        reach = certified_radius(lower_confidence_bound(self.n, self.n, self.alpha), sigma)
        while (self.sequential and reach > 0
               and draws_to_reach(reach, sigma, self.alpha) > self.n):
            reach = round(reach - SEQUENTIAL_REACH_STEP, 10)
        return reach

    def caption(self) -> str:
        images = "" if self.images is None else f"{self.images} images, "
        mode = " (sequential: n at most)" if self.sequential else ""
        return f"{self.name}: {images}n={self.n}, n0={self.n0}, α={self.alpha:g}{mode}"


@dataclass(frozen=True)
class Ranges:
    """A searched key's distribution as the parent run logged it: kind and, for ranges, the
    bounds (choices are taken from the values the trials ran)."""

    kind: str
    low: float | None = None
    high: float | None = None


@dataclass(frozen=True)
class SweepView:
    """Everything the figures draw, read from MLflow."""

    name: str
    run_id: str
    started: dt.datetime
    sigma: float
    objectives: tuple[Objective, ...]
    searched: tuple[str, ...]
    ranges: Mapping[str, Ranges]
    scheduler: Mapping[str, Any] | None
    rank: Certification
    final: Certification
    trials: tuple[TrialRow, ...]
    histories: Mapping[str, Sequence[tuple[int, float]]]
    """The scheduler's metric per epoch, by trial run id."""

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
    rows = load_trials(client, sweep_run_id=parent_run_id)
    parent = client.get_run(parent_run_id)
    params = parent.data.params
    missing = [key for key in REQUIRED_PARAMS if key not in params]
    if missing:
        raise CadisError(f"sweep run {parent_run_id} has no param {missing[0]}: it was made "
                         f"before sweeps had a rank stage, and cannot be drawn")
    objectives = tuple(Objective(*part.split()) for part in params["objective"].split(", "))
    scheduler = None if params.get("scheduler", "none") == "none" else \
        json.loads(params["scheduler"])
    metric = scheduler["metric"] if scheduler else tracking.PROXY_ACR
    histories = {row.run_id: [(m.step, m.value) for m in sorted(
        client.get_metric_history(row.run_id, metric), key=lambda m: (m.step, m.timestamp))]
        for row in rows}
    searched = tuple(key for key in parent.data.tags.get(tracking.SEARCHED_TAG, "").split(",")
                     if key)
    finalist = next((row for row in rows if row.certified), None)
    return SweepView(
        name=parent.data.tags.get(tracking.SWEEP_TAG, parent.info.run_name),
        run_id=parent_run_id,
        started=dt.datetime.fromtimestamp(parent.info.start_time / 1000, dt.timezone.utc),
        sigma=float(params["base.sigma"]),
        objectives=objectives, searched=searched,
        ranges={key: _ranges(params.get(f"search.{key}", "")) for key in searched},
        scheduler=scheduler,
        rank=_certification("validation", params, "certify.rank.",
                            _int_or_none(params.get("certify.rank.images"))),
        final=_certification("test", params, "certify.final.", None if finalist is None
                             else _int_or_none(finalist.metrics.get(tracking.NUM_IMAGES))),
        trials=tuple(rows), histories=histories)


def _certification(name: str, params: Mapping[str, str], prefix: str, images: int | None
                   ) -> Certification:
    return Certification(name, int(params[f"{prefix}n"]), int(params[f"{prefix}n0"]),
                         float(params[f"{prefix}alpha"]), images,
                         params.get(f"{prefix}sequential", "False") == "True")


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(float(value))


#: What the figures read from a sweep's parent run.
REQUIRED_PARAMS: Final = ("objective", "base.sigma", *(f"certify.{stage}.{key}" for stage in
                                                       ("rank", "final")
                                                       for key in ("n", "n0", "alpha")))

RANGE_PATTERN = re.compile(r"(uniform|loguniform|int) \[([^,\]]+), ([^\]]+)\]")


def _ranges(described: str) -> Ranges:
    """A search param as :meth:`cadis.sweeps.spec.Distribution.describe` wrote it."""
    match = RANGE_PATTERN.match(described)
    if match is None:
        return Ranges(described.split(" ", 1)[0] or "choice")
    return Ranges(match.group(1), float(match.group(2)), float(match.group(3)))


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


def _param_value(ranges: Ranges, text: str) -> Any:
    if ranges.kind == "int":
        return int(float(text))
    if ranges.kind in ("uniform", "loguniform"):
        return float(text)
    return text


# --------------------------------------------------------------------------- the figures


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


def curve_points(view: SweepView, row: TrialRow, stage: Certification
                 ) -> list[tuple[float, float]]:
    """The (radius, certified accuracy) points a trial's curve in ``stage`` draws: its
    figures at the radii ``stage``'s n can certify."""
    return within_reach(row.val_accuracy if stage is view.rank else row.accuracy,
                        stage.reach(view.sigma))


def plot_certified_accuracy(view: SweepView) -> Any:
    """Validation curves of the top :data:`TOP_CURVES` ranked trials beside the test curves
    of the finalists; the reach of each stage's n marked."""
    figure, (validation, test) = _figure(ncols=2, width=11.0, height=5.0)
    panels = ((validation, view.rank, view.ranked()[:TOP_CURVES]),
              (test, view.final, view.finalists()))
    colours = _colours([row.run_id for row in view.ranked()[:TOP_CURVES]])
    for axes, stage, rows in panels:
        for row in rows:
            points = curve_points(view, row, stage)
            axes.plot([r for r, _ in points], [a for _, a in points], marker="o",
                      color=colours.get(row.run_id), label=trial_label(view, row))
        reach = stage.reach(view.sigma)
        axes.axvline(reach, color="0.4", linestyle=":", linewidth=1)
        axes.annotate(f"n={stage.n} reaches r≤{reach:.2f}", (reach, 0.98), rotation=90,
                      ha="right", va="top", fontsize="small", color="0.3")
        axes.set_xlim(0.0, max(reach * 1.08, 0.1))
        axes.set_ylim(0.0, 1.0)
        axes.set_xlabel("radius (ℓ2)")
        axes.set_ylabel("certified accuracy")
        axes.set_title(stage.caption(), fontsize="medium")
        axes.grid(alpha=0.3)
        if rows:
            axes.legend(fontsize="small", loc="lower left")
        else:
            axes.text(0.5, 0.5, f"no trial certified on {stage.name} yet", ha="center",
                      transform=axes.transAxes, color="0.4")
    figure.suptitle(f"{view.title}: certified accuracy, top trials (σ={view.sigma:g})")
    return figure


def plot_rungs(view: SweepView) -> Any:
    """The scheduler's metric per epoch of every trial: ranked ones in colour, the others
    grey with an x where they stopped; the rungs at which ASHA compares trials as lines."""
    metric = view.scheduler["metric"] if view.scheduler else tracking.PROXY_ACR
    figure, (axes,) = _figure(ncols=1, width=8.0, height=5.0)
    ranked = {row.run_id for row in view.ranked()}
    colours = _colours([row.run_id for row in view.ranked()])
    reached: dict[int, int] = {}
    for row in view.trials:
        history = view.histories.get(row.run_id, [])
        if not history:
            continue
        epochs, values = [e for e, _ in history], [v for _, v in history]
        for epoch in epochs:
            reached[epoch] = reached.get(epoch, 0) + 1
        if row.run_id in ranked:
            axes.plot(epochs, values, marker="o", color=colours[row.run_id],
                      label=trial_label(view, row))
        else:
            axes.plot(epochs, values, color=STOPPED_COLOUR, linestyle="--", linewidth=1)
            axes.plot(epochs[-1:], values[-1:], marker="x", color=STOPPED_COLOUR,
                      linestyle="none")
    for rung in _rungs(view.scheduler):
        axes.axvline(rung, color="0.85", linewidth=6, zorder=0)
    axes.plot([], [], color=STOPPED_COLOUR, linestyle="--", marker="x",
              label="stopped early or failed")
    ticks = sorted(reached)
    axes.set_xticks(ticks)
    axes.set_xticklabels([f"{epoch}\n({reached[epoch]} trials)" for epoch in ticks])
    axes.set_xlabel("epoch (trials that reached it)")
    axes.set_ylabel(metric)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    where = "" if not view.scheduler else (
        f"; ASHA rungs (shaded) at grace_period {view.scheduler['grace_period']}, "
        f"reduction_factor {view.scheduler['reduction_factor']:g}")
    axes.set_title(f"{view.title}\n{metric} per epoch{where}", fontsize="medium")
    return figure


def _rungs(scheduler: Mapping[str, Any] | None) -> list[int]:
    """The epochs at which ASHA compares trials: grace_period, times reduction_factor, ...
    below max_t."""
    if not scheduler:
        return []
    rungs, epoch = [], float(scheduler["grace_period"])
    while epoch < scheduler["max_t"]:
        rungs.append(int(epoch))
        epoch *= scheduler["reduction_factor"]
    return rungs


def plot_parallel_coordinates(view: SweepView, study: Any, objective: int) -> Any:
    """Optuna's parallel coordinates of the ranked trials against objective ``objective``."""
    from optuna.visualization.matplotlib import plot_parallel_coordinate

    from matplotlib.collections import LineCollection

    target = view.objectives[objective]
    axes = _quietly(plot_parallel_coordinate, study,
                    target=lambda trial: trial.values[objective],
                    target_name=f"val {target.metric}")
    # Optuna's reversed blues draw the best trial white on its grey background.
    for lines in axes.collections:
        if isinstance(lines, LineCollection):
            lines.set_cmap(TRIAL_COLOURMAP)
    axes.set_title(f"{view.title}: searched values against val {target.metric}\n"
                   f"{view.rank.caption()}; {len(view.ranked())} ranked trials",
                   fontsize="medium")
    return _sized(axes.figure, 9.0, 5.0)


def plot_importance(view: SweepView, study: Any) -> Any:
    """Optuna's fANOVA parameter importances for each objective."""
    from optuna.importance import FanovaImportanceEvaluator
    from optuna.visualization.matplotlib import plot_param_importances

    single = len(view.objectives) == 1
    axes = _quietly(plot_param_importances, study, evaluator=FanovaImportanceEvaluator(seed=0),
                    **({"target": lambda trial: trial.values[0],
                        "target_name": f"val {view.objectives[0].metric}"} if single else {}))
    axes.set_title("", loc="left")  # Optuna's own title, over ours
    axes.set_title(f"{view.title}: parameter importances (fANOVA)\n{view.rank.caption()}; "
                   f"{len(view.ranked())} ranked trials", fontsize="medium")
    if not single:
        _relabel(axes, {f"Objective Value {index}": f"val {objective.metric}"
                        for index, objective in enumerate(view.objectives)})
    return _sized(axes.figure, 9.0, 5.0)


def plot_pareto(view: SweepView, study: Any) -> Any:
    """Optuna's Pareto front of the two validation objectives, the trials certified on test
    marked and the chosen one (the rank winner) named."""
    from optuna.visualization.matplotlib import plot_pareto_front

    first, second = view.objectives
    axes = _quietly(plot_pareto_front, study,
                    target_names=[f"val {first.metric}", f"val {second.metric}"])
    finalists = view.finalists()
    if finalists:
        axes.scatter([row.metrics[first.searched] for row in finalists],
                     [row.metrics[second.searched] for row in finalists], s=260,
                     facecolors="none", edgecolors="crimson", linewidths=1.5,
                     label="certified on test", zorder=5)
        chosen = finalists[0]
        axes.annotate(f"chosen: {trial_label(view, chosen)}",
                      (chosen.metrics[first.searched], chosen.metrics[second.searched]),
                      xytext=(8, -14), textcoords="offset points", fontsize="small",
                      color="crimson")
    _relabel(axes, {"Trial": "dominated", "Best Trial": "on the front"})
    axes.set_title(f"{view.title}: Pareto front on validation\n{view.rank.caption()}",
                   fontsize="medium")
    return _sized(axes.figure, 8.0, 6.0)


#: Each figure: its file name, whether the sweep has what it needs (else why not), and how
#: it is drawn from the view and the rebuilt study.
FigureRule = tuple[str, Callable[[SweepView], str | None], Callable[[SweepView, Any], Any]]


def _needs_ranked(count: int) -> Callable[[SweepView], str | None]:
    def check(view: SweepView) -> str | None:
        have = len(view.ranked())
        return None if have >= count else \
            f"needs {count} ranked trials, the sweep has {have}"
    return check


def _needs_spread(view: SweepView) -> str | None:
    """Importances attribute the spread of an objective to the params: two ranked trials at
    least, and some spread in each objective (fANOVA refuses a constant target)."""
    why = _needs_ranked(2)(view)
    if why is not None:
        return why
    for objective in view.objectives:
        if len({row.metrics[objective.searched] for row in view.ranked()}) < 2:
            return f"every ranked trial has the same val {objective.metric}: nothing to attribute"
    return None


def _needs_two_objectives(view: SweepView) -> str | None:
    if len(view.objectives) != 2:
        return "one objective: no front"
    return _needs_ranked(1)(view)


def _figure_rules(view: SweepView) -> list[FigureRule]:
    rules: list[FigureRule] = [
        ("certified_accuracy.png", _needs_ranked(1), lambda v, s: plot_certified_accuracy(v)),
        ("rungs.png", lambda v: None, lambda v, s: plot_rungs(v)),
        ("importance.png", _needs_spread, plot_importance),
        ("pareto_front.png", _needs_two_objectives, plot_pareto),
    ]
    for index, objective in enumerate(view.objectives):
        name = "parallel_coordinates.png" if len(view.objectives) == 1 else \
            f"parallel_coordinates_{objective.metric}.png"
        rules.append((name, _needs_ranked(2),
                      lambda v, s, i=index: plot_parallel_coordinates(v, s, i)))
    return rules


def sweep_figures(view: SweepView) -> tuple[dict[str, Any], dict[str, str]]:
    """The figures the view supports, by file name, and why each other one was skipped."""
    study = rebuild_study(view)
    figures, skipped = {}, {}
    for name, needs, draw in _figure_rules(view):
        why = needs(view)
        if why is not None:
            skipped[name] = why
            continue
        try:
            figures[name] = draw(view, study)
        except Exception as error:  # noqa: BLE001 - one picture must not cost the others
            skipped[name] = f"could not be drawn ({type(error).__name__}: {first_line(error)})"
    return figures, skipped


def write_sweep_figures(client: Any, parent_run_id: str, out: str | Path
                        ) -> tuple[list[Path], dict[str, str]]:
    """Draw the sweep's figures into ``out`` (each file written whole or not at all);
    returns the files and the reasons for those skipped."""
    figures, skipped = sweep_figures(load_sweep_view(client, parent_run_id))
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CadisError(f"cannot write figures to {out} ({error.strerror or error})") from None
    paths = []
    for name, figure in figures.items():
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
        _close(figure)
        atomic_write_bytes(out / name, buffer.getvalue())
        paths.append(out / name)
    return paths, skipped


def draw_sweep(tracking_uri: str | None, parent_run_id: str, out: str | Path
               ) -> tuple[list[Path], dict[str, str]]:
    """:func:`write_sweep_figures` of a sweep in the store ``tracking_uri`` (None: the
    default store), as ``cadis compare --sweep ID --figures DIR`` draws it."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    return write_sweep_figures(client, parent_run_id, out)


# --------------------------------------------------------------------------- matplotlib


def _figure(ncols: int, width: float, height: float) -> tuple[Any, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, list(figure.subplots(1, ncols, squeeze=False)[0])


def _colours(keys: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    return {key: palette(index % 10) for index, key in enumerate(keys)}


def _quietly(plot: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """An Optuna matplotlib plot (Optuna marks them experimental and warns) on the Agg
    backend: nothing is shown, the figure is closed once saved."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return plot(*args, **kwargs)


def _relabel(axes: Any, names: Mapping[str, str]) -> None:
    """The legend with Optuna's entry names replaced by ours."""
    handles, labels = axes.get_legend_handles_labels()
    axes.legend(handles, [names.get(label, label) for label in labels], fontsize="small",
                loc="best")


def _sized(figure: Any, width: float, height: float) -> Any:
    figure.set_size_inches(width, height)
    return figure


def _close(figure: Any) -> None:
    """Optuna's figures belong to pyplot, which keeps them until closed; ours do not."""
    import matplotlib.pyplot as plt

    if plt.fignum_exists(getattr(figure, "number", -1)):
        plt.close(figure)
