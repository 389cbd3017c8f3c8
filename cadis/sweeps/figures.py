"""Pictures of a sweep: what a person looks at to learn which settings matter. What each
shows is computed by :mod:`cadis.sweeps.figure_data` from the sweep read back from MLflow;
this module draws it (matplotlib, and Optuna's matplotlib plots):

* ``certified_accuracy.png``: certified accuracy over radius of the top trials on validation
  (the rank stage) beside the finalists on test (the final stage), each panel saying which
  images, n, n0 and alpha made it; radii beyond what its n can certify are not drawn, and
  the limit is marked (a cliff to 0 there is an artefact of n, not of the model); at the
  objective's radius, the chosen trial's level (dashed) and each contender's paired 95%
  interval against it (a bar that reaches the dashed line: inseparable from the chosen);
* ``parallel_coordinates.png``: the searched values of every ranked trial against the
  (first) objective, by Optuna's own plot (one file per objective for a Pareto front);
* ``importance.png``: parameter importances by Optuna's fANOVA evaluator and plot;
* ``pareto_front.png``: for two objectives, Optuna's front with the trials certified on
  test marked and the chosen one named;
* ``rungs.png``: ASHA's rungs, the scheduler's metric per epoch of every trial, stopped
  trials in grey ending where ASHA stopped them; at each rung the cut each stopped trial met
  (rebuilt, a short bar), and a stopped trial that lay within the proxy's noise of its cut
  ends in a hollow circle, the count in the title (the cut itself ignores the noise).

A figure the data cannot support (importances of fewer than two ranked trials) is skipped
with its reason.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from cadis.errors import CadisError, first_line
from cadis.files import atomic_write_bytes
from cadis.sweeps.figure_data import (
    TOP_CURVES,
    IntervalBar,
    SweepView,
    asha_rungs,
    curve_points,
    interval_bars,
    load_sweep_view,
    needs_ranked,
    needs_spread,
    needs_two_objectives,
    rebuild_study,
    rung_marks,
    trial_label,
)
from cadis.tracking import contract as tracking
from cadis.tracking.sweep_reader import reading_client

#: The parent run's artifact folder of the figures, and the results folder's.
FIGURES_DIR: Final = "figures"
STOPPED_COLOUR: Final = "0.6"
#: The cuts ASHA's stopped trials met, and the end of a stop within the proxy's noise.
CUT_COLOUR: Final = "crimson"
CUT_TICK_SIZE: Final = 18
WITHIN_NOISE_SIZE: Final = 9
TRIAL_COLOURMAP: Final = "viridis"
DPI: Final = 110
#: An interval bar's line width: thin where the contender is inseparable from the chosen.
INTERVAL_WIDTHS: Final = {False: 1.0, True: 2.2}


def plot_stage_curves(view: SweepView) -> Any:
    """Validation curves of the top :data:`TOP_CURVES` ranked trials beside the test curves
    of the finalists; the reach of each stage's n marked; in each panel, where the sweep
    logged verdicts, the contenders' paired intervals against the chosen trial
    (:func:`~cadis.sweeps.figure_data.interval_bars`)."""
    figure, (validation, test) = _figure(ncols=2, width=11.0, height=5.0)
    panels = ((validation, view.rank, view.ranked()[:TOP_CURVES]),
              (test, view.final, view.finalists()))
    colours = _colours([row.run_id for row in view.ranked()[:TOP_CURVES]])
    for axes, stage, rows in panels:
        for row in rows:
            points = curve_points(view, row, stage)
            axes.plot([r for r, _ in points], [a for _, a in points], marker="o",
                      color=colours.get(row.run_id), label=trial_label(view, row))
        _draw_intervals(axes, *interval_bars(view, stage, rows), colours)
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


def _draw_intervals(axes: Any, level: float | None, bars: Sequence[IntervalBar],
                    colours: Mapping[str, Any]) -> None:
    """The chosen trial's level (dashed) and each contender's interval bar, thicker where
    the verdict separates it from the chosen trial."""
    if level is None:
        return
    axes.axhline(level, color="0.3", linestyle="--", linewidth=0.8,
                 label="chosen trial, paired 95% intervals vs it")
    for bar in bars:
        axes.errorbar([bar.x], [bar.value], yerr=[[max(0.0, bar.value - bar.low)],
                                                  [max(0.0, bar.high - bar.value)]],
                      fmt="none", capsize=3, color=colours.get(bar.run_id, "0.3"),
                      linewidth=INTERVAL_WIDTHS[bar.separated])


def plot_rungs(view: SweepView) -> Any:
    """The scheduler's metric per epoch of every trial: ranked ones in colour, the others
    grey with an x where they stopped (a hollow circle where a stopped trial lay within the
    proxy's noise of the cut it met); the rungs at which ASHA compares trials as shaded lines,
    the cuts stopped trials met as short bars on them."""
    metric = view.scheduler["metric"] if view.scheduler else tracking.PROXY_ACR
    figure, (axes,) = _figure(ncols=1, width=8.0, height=5.0)
    ranked = {row.run_id for row in view.ranked()}
    marks = rung_marks(view)
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
            if row.run_id in marks.within:
                axes.plot(epochs[-1:], values[-1:], marker="o", markersize=WITHIN_NOISE_SIZE,
                          markerfacecolor="none", color=CUT_COLOUR, linestyle="none")
            else:
                axes.plot(epochs[-1:], values[-1:], marker="x", color=STOPPED_COLOUR,
                          linestyle="none")
    for rung in asha_rungs(view.scheduler):
        axes.axvline(rung, color="0.85", linewidth=6, zorder=0)
    axes.plot([], [], color=STOPPED_COLOUR, linestyle="--", marker="x",
              label="stopped early or failed")
    if marks.cuts:
        axes.plot([epoch for epoch, _ in marks.cuts], [cut for _, cut in marks.cuts],
                  marker="_", markersize=CUT_TICK_SIZE, markeredgewidth=2, color=CUT_COLOUR,
                  linestyle="none", label="cut a stopped trial met (rebuilt)")
        axes.plot([], [], marker="o", markersize=WITHIN_NOISE_SIZE, markerfacecolor="none",
                  color=CUT_COLOUR, linestyle="none",
                  label=f"stopped within noise of its cut: {len(marks.within)} of "
                        f"{marks.judged}")
    ticks = sorted(reached)
    axes.set_xticks(ticks)
    axes.set_xticklabels([f"{epoch}\n({reached[epoch]} trials)" for epoch in ticks])
    axes.set_xlabel("epoch (trials that reached it)")
    axes.set_ylabel(metric)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    where = "" if not view.scheduler else (
        f"; ASHA rungs (shaded) at grace_period {view.scheduler['grace_period']}, "
        f"reduction_factor {view.scheduler['reduction_factor']:g}\n{marks.caption}")
    axes.set_title(f"{view.title}\n{metric} per epoch{where}", fontsize="medium")
    return figure


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


def _figure_rules(view: SweepView) -> list[FigureRule]:
    rules: list[FigureRule] = [
        ("certified_accuracy.png", needs_ranked(1), lambda v, s: plot_stage_curves(v)),
        ("rungs.png", lambda v: None, lambda v, s: plot_rungs(v)),
        ("importance.png", needs_spread, plot_importance),
        ("pareto_front.png", needs_two_objectives, plot_pareto),
    ]
    for index, objective in enumerate(view.objectives):
        name = "parallel_coordinates.png" if len(view.objectives) == 1 else \
            f"parallel_coordinates_{objective.metric}.png"
        rules.append((name, needs_ranked(2),
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
    """:func:`write_sweep_figures` of a sweep in the tracking URI ``tracking_uri`` (None:
    the default), as ``cadis compare --sweep ID --figures DIR`` draws it."""
    return write_sweep_figures(reading_client(tracking_uri), parent_run_id, out)


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
