"""``cadis compare``: the trials of a sweep side by side, read back from MLflow.

A table with one row per trial run (its outcome, searched params, certified accuracy per
radius, ACR, clean accuracy, ..., and where the sweep's choice left them, its validation
difference from the chosen trial with the interval and Holm's p) and, on request, a plot:
with ``--by PARAM`` an ablation (certified accuracy over the param's values, one line per
radius, repeats averaged), else certified accuracy over radius, one curve per trial. What a
trial run holds is defined in :mod:`cadis.tracking.contract`, and the runs are read by
:mod:`cadis.tracking.sweep_reader`; MLflow is imported only when a tracking URI is read (it
takes seconds), and torch never.
"""

from __future__ import annotations

import io
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from cadis.errors import CadisError
from cadis.files import atomic_write_bytes
from cadis.smoothing.bounds import max_certifiable_radius
from cadis.smoothing.paired import format_interval, format_p, format_signed
from cadis.smoothing.records import CSV_DIGITS, MARKDOWN_DIGITS, TableFormat, render_table
from cadis.tracking import contract as tracking
from cadis.tracking.sweep_reader import (
    RunNotFound,
    TrialRow,
    load_trials,
    read_sweep,
    reading_client,
    short_param,
    sweep_runs,
)

MARKDOWN_MISSING: Final = "-"
#: How a column of validation figures starts: ``val r=0.5``.
VALIDATION_LABEL: Final = tracking.VALIDATION_PREFIX.rstrip("_")

#: The rank stage's (validation) figures shown before the test set's, when any trial has them.
VALIDATION_EXTRAS: Final = (tracking.validation_metric(tracking.ACR),)
#: Final metrics shown after the certified accuracy columns, when any trial has them.
EXTRA_METRICS: Final = (tracking.ACR, tracking.CLEAN_ACCURACY, tracking.HALLUCINATION_RATE,
                        tracking.TRAINABLE_FRACTION)
#: The verdict fields a CSV shows per objective (markdown joins them in two cells).
VERDICT_COLUMNS: Final = ("difference", "low", "high", "p_holm")
#: Parameter values longer than this turn the plot's x labels sideways.
LONG_LABEL: Final = 8
#: A radius this far above a reach still counts as reached (a grid radius computed as, say,
#: 3 * 0.25 against a reach computed from the bound).
REACH_SLACK: Final = 1e-9
#: The parent run's params that say how the rank stage certified (its figures are ``val_``).
RANK_N_PARAM: Final = "certify.rank.n"
RANK_ALPHA_PARAM: Final = "certify.rank.alpha"


# --------------------------------------------------------------------------- ordering


def searched_params(rows: Sequence[TrialRow]) -> list[str]:
    """The searched param names of all rows, in the order first seen."""
    return list(dict.fromkeys(name for row in rows for name in row.searched))


def check_by(rows: Sequence[TrialRow], by: str) -> None:
    """Raise :class:`CadisError` unless ``by`` is a param of some trial run."""
    if any(by in row.params for row in rows):
        return
    searched = searched_params(rows)
    raise CadisError(f"--by {by}: no trial run has a param {by!r}; searched params: "
                     f"{', '.join(searched) or 'none'}")


def value_key(value: str | None, first_seen: Mapping[str, int] | None = None
              ) -> tuple[int, float, str | int]:
    """Sort key of a param value: numbers ascending, then other text (``argmax``, variants
    such as ``finetune=lora,lora_rank=4``) in the order of ``first_seen`` (by name without
    it), then a missing value."""
    if value is None:
        return (2, 0.0, "")
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if math.isnan(number):
        return (1, 0.0, value if first_seen is None else first_seen.get(value, len(first_seen)))
    return (0, number, value)


def _started(rows: Sequence[TrialRow]) -> list[TrialRow]:
    return sorted(rows, key=lambda row: (row.start_time, row.name))


def _first_seen(rows: Sequence[TrialRow], by: str) -> dict[str, int]:
    """Each value of ``by`` by the first trial that ran it: a grid's own order (LoRA ranks,
    then full fine-tuning), which names do not sort into."""
    order: dict[str, int] = {}
    for row in _started(rows):
        order.setdefault(row.params.get(by), len(order))
    return order


def sort_rows(rows: Sequence[TrialRow], by: str | None = None) -> list[TrialRow]:
    """Rows in the order they started, or by their value of ``by`` (:func:`value_key`: text
    values in the order the sweep first ran them), ties in the order they started."""
    started = _started(rows)
    if by is None:
        return started
    first_seen = _first_seen(rows, by)
    return sorted(started, key=lambda row: value_key(row.params.get(by), first_seen))


def radii_of(rows: Sequence[TrialRow]) -> list[float]:
    """Every radius that some row has certified accuracy at, ascending."""
    return sorted({radius for row in rows for radius in row.accuracy})


def reachable(radii: Sequence[float], reach: float) -> list[float]:
    """The radii of ``radii`` up to ``reach``: beyond the largest radius a certification's n
    can certify, every trial's accuracy is 0 because of n, not of the model."""
    return [radius for radius in radii if radius <= reach + REACH_SLACK]


def validation_reach(rows: Sequence[TrialRow], sweeps: Sequence[Mapping[str, str]]) -> float:
    """The largest radius the rank stage of any of ``sweeps`` (their parent runs' params)
    can certify at any row's sigma; infinite when a sweep or row does not say."""
    try:
        stages = {(int(params[RANK_N_PARAM]), float(params[RANK_ALPHA_PARAM]))
                  for params in sweeps}
        sigmas = {float(row.params["sigma"]) for row in rows}
    except (KeyError, ValueError):
        return math.inf
    return max((max_certifiable_radius(sigma, n, alpha) for n, alpha in stages
                for sigma in sigmas), default=math.inf)


def compared_trials(client: Any, experiment: str | None = None,
                    sweep_run_id: str | None = None) -> tuple[list[TrialRow], float]:
    """The trial runs of an experiment (by name) or of one sweep (its parent run's id), as
    :func:`~cadis.tracking.sweep_reader.load_trials` reads them, and the reach of their
    validation figures (:func:`validation_reach` over the sweeps they belong to)."""
    if sweep_run_id is not None and experiment is None:
        sweep = read_sweep(client, sweep_run_id)
        return list(sweep.trials), validation_reach(sweep.trials, [sweep.params])
    # Refuses both or neither.
    rows = load_trials(client, experiment=experiment, sweep_run_id=sweep_run_id)
    parents = [run.data.params for run in sweep_runs(client, experiment)]
    return rows, validation_reach(rows, parents)


def radius_label(radius: float) -> str:
    """``r=0.25``: a certified-accuracy column's header and a plot's legend entry."""
    return f"r={float(radius)}"


def leader_objectives(rows: Sequence[TrialRow]) -> list[str]:
    """The objectives on which some row has a validation verdict against the sweep's chosen
    trial (``val_vs_leader.<objective>.difference``), in the order first seen."""
    start = tracking.validation_metric(f"{tracking.VS_LEADER}.")
    end = ".difference"
    return list(dict.fromkeys(name[len(start):-len(end)] for row in rows for name in row.metrics
                              if name.startswith(start) and name.endswith(end)))


def _objective_label(objective: str) -> str:
    radius = tracking.radius_of_metric(objective)
    return objective if radius is None else radius_label(radius)


# --------------------------------------------------------------------------- table


def format_trial_table(rows: Sequence[TrialRow], by: str | None = None,
                      fmt: TableFormat = "markdown", val_reach: float = math.inf) -> str:
    """The table: one row per trial (ordered as :func:`sort_rows`), columns trial, outcome,
    the searched params (and ``by``), the validation figures (``val r=<radius>`` per radius
    up to ``val_reach``, ``val_acr``) where trials have them, per objective the validation
    verdict against the chosen trial where any trial has one (markdown: ``val r=0.5 −
    chosen`` as the difference and its interval, then its Holm p; CSV:
    :data:`VERDICT_COLUMNS` under their MLflow names), the test figures (``r=<radius>`` per
    radius up to the largest :attr:`~cadis.tracking.sweep_reader.TrialRow.reach` of the
    rows), then those of :data:`EXTRA_METRICS` that any trial has. No column is beyond what
    its certification's n can certify."""
    if not rows:
        raise CadisError("no trial runs to compare")
    if by is not None:
        check_by(rows, by)
    params = searched_params(rows)
    if by is not None and by not in params:
        params.insert(0, by)
    radii = reachable(radii_of(rows), max(row.reach for row in rows))
    val_radii = reachable(sorted({radius for row in rows for radius in row.val_accuracy}),
                          val_reach)
    val_extras = [name for name in VALIDATION_EXTRAS if any(name in row.metrics for row in rows)]
    extras = [name for name in EXTRA_METRICS if any(name in row.metrics for row in rows)]
    verdicts = leader_objectives(rows)
    header = ["trial", "outcome", *params,
              *(f"{VALIDATION_LABEL} {radius_label(r)}" for r in val_radii), *val_extras,
              *(name for objective in verdicts for name in _verdict_header(objective, fmt)),
              *map(radius_label, radii), *extras]
    digits = MARKDOWN_DIGITS if fmt == "markdown" else CSV_DIGITS
    missing = MARKDOWN_MISSING if fmt == "markdown" else ""

    def number(value: float | None) -> str:
        return missing if value is None else f"{value:.{digits}f}"

    table = [[row.name, row.outcome,
              *(_param_cell(row.params.get(name), missing, fmt) for name in params),
              *(number(row.val_accuracy.get(radius)) for radius in val_radii),
              *(number(row.metrics.get(name)) for name in val_extras),
              *(cell for objective in verdicts
                for cell in _verdict_cells(row, objective, fmt, number, missing)),
              *(number(row.accuracy.get(radius)) for radius in radii),
              *(number(row.metrics.get(name)) for name in extras)]
             for row in sort_rows(rows, by)]
    return render_table(header, table, fmt, text_columns=2 + len(params))


def _verdict_header(objective: str, fmt: TableFormat) -> list[str]:
    """The columns of a trial's validation verdict against the chosen trial on
    ``objective``."""
    if fmt == "csv":
        return [tracking.verdict_metric(tracking.VS_LEADER, objective, field, validation=True)
                for field in VERDICT_COLUMNS]
    label = f"{VALIDATION_LABEL} {_objective_label(objective)}"
    return [f"{label} − chosen", f"{label} Holm p"]


def _verdict_cells(row: TrialRow, objective: str, fmt: TableFormat,
                   number: Callable[[float | None], str], missing: str) -> list[str]:
    """A row's cells under :func:`_verdict_header` (missing where it has no verdict: the
    chosen trial itself, a trial not ranked)."""
    values = {field: row.metrics.get(tracking.verdict_metric(tracking.VS_LEADER, objective,
                                                             field, validation=True))
              for field in VERDICT_COLUMNS}
    if fmt == "csv":
        return [number(values[field]) for field in VERDICT_COLUMNS]
    if any(value is None for value in values.values()):
        return [missing, missing]
    return [f"{format_signed(values['difference'])} "
            f"{format_interval((values['low'], values['high']))}", format_p(values["p_holm"])]


def _param_cell(value: str | None, missing: str, fmt: TableFormat) -> str:
    """A param as logged, except that a sampled float reads short in markdown
    (:func:`~cadis.tracking.sweep_reader.short_param`); a CSV keeps the logged text."""
    if value is None:
        return missing
    return short_param(value) if fmt == "markdown" else value


# --------------------------------------------------------------------------- plots


def plottable(rows: Sequence[TrialRow], by: str | None = None
              ) -> tuple[list[TrialRow], list[TrialRow]]:
    """The rows a plot shows (certified, and with a value of ``by`` when given) and those
    it leaves out."""
    kept = [row for row in rows if row.certified and (by is None or by in row.params)]
    kept_ids = {id(row) for row in kept}
    left_out = [row for row in rows if id(row) not in kept_ids]
    return kept, left_out


def ablation_series(rows: Sequence[TrialRow], by: str
                    ) -> tuple[list[str], dict[float, list[float]]]:
    """What :func:`plot_ablation` draws: the values of ``by`` among the plotted rows (see
    :func:`plottable`) in :func:`value_key` order, and per radius the certified accuracy at
    each value, averaged over the trials that share it (NaN where none has that radius)."""
    kept, _ = plottable(rows, by)
    first_seen = _first_seen(kept, by)
    values = sorted({row.params[by] for row in kept}, key=lambda v: value_key(v, first_seen))
    series = {radius: [_mean([row.accuracy.get(radius) for row in kept
                              if row.params[by] == value]) for value in values]
              for radius in radii_of(kept)}
    return values, series


def _why_left_out(row: TrialRow, by: str | None) -> str:
    if not row.certified:
        return f"{row.outcome}, no certified accuracy"
    return f"no param {by}"


def plot_ablation(rows: Sequence[TrialRow], by: str, path: str | os.PathLike) -> Path:
    """Save certified accuracy over the values of param ``by`` as a PNG: the values as
    categories, one line with markers per radius (:func:`ablation_series`)."""
    check_by(rows, by)
    values, series = ablation_series(rows, by)
    if not values:
        raise CadisError(f"no certified trial with a value of {by} to plot")
    figure, axes = _figure(width=max(7.0, 1.2 * len(values) + 3.0))
    positions = list(range(len(values)))
    for radius, accuracy in series.items():
        # A radius no trial certified anything at (beyond what n can reach) draws only a
        # line at zero over the others: the table still shows it.
        if not any(value > 0 for value in accuracy):
            continue
        axes.plot(positions, accuracy, marker="o", label=radius_label(radius), clip_on=False)
    sideways = any(len(value) > LONG_LABEL for value in values)
    axes.set_xticks(positions)
    axes.set_xticklabels(values, rotation=25 if sideways else 0,
                         ha="right" if sideways else "center")
    axes.set_xlabel(by)
    axes.set_title(f"certified accuracy vs {by}")
    return _save(figure, axes, path)


def within_reach(accuracy: Mapping[float, float], reach: float) -> list[tuple[float, float]]:
    """The (radius, certified accuracy) pairs at radii up to ``reach``, the largest radius
    the certification's n can certify: beyond it the accuracy is 0 because of n, not of the
    model."""
    return [(radius, accuracy[radius]) for radius in reachable(list(accuracy), reach)]


def reachable_points(row: TrialRow) -> list[tuple[float, float]]:
    """A trial's test certified accuracy up to its :attr:`TrialRow.reach`."""
    return within_reach(row.accuracy, row.reach)


def plot_curves(rows: Sequence[TrialRow], path: str | os.PathLike) -> Path:
    """Save certified accuracy over radius as a PNG, one line per certified trial labelled
    with its name and searched values, each up to the radius its n can certify (the nearest
    such limit marked)."""
    kept, _ = plottable(rows)
    if not kept:
        raise CadisError("no certified trial to plot")
    figure, axes = _figure(width=6.0)
    for row in _started(kept):
        points = reachable_points(row)
        axes.plot([r for r, _ in points], [a for _, a in points], marker="o", label=row.label,
                  clip_on=False)
    nearest = min(kept, key=lambda row: row.reach)
    if math.isfinite(nearest.reach):
        axes.axvline(nearest.reach, color="0.4", linestyle=":", linewidth=1,
                     label=f"n={nearest.params['certify.n']} certifies r ≤ {nearest.reach:.2f}")
    axes.set_xlabel("radius (l2)")
    axes.set_xlim(left=0.0)
    axes.set_title("certified accuracy vs radius")
    return _save(figure, axes, path)


def _mean(values: Sequence[float | None]) -> float:
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else math.nan


def _figure(width: float) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, 4.5))
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _save(figure: Any, axes: Any, path: str | os.PathLike) -> Path:
    axes.set_ylabel("certified accuracy")
    axes.set_ylim(0.0, 1.0)
    axes.grid(alpha=0.3)
    # Beside the axes, not over lines that may run anywhere between 0 and 1.
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    buffer = io.BytesIO()
    # "tight" grows the canvas to hold the legend and long labels (tight_layout cannot when
    # the legend's trial labels are long, and warns).
    figure.savefig(buffer, format="png", bbox_inches="tight")
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buffer.getvalue())
    except OSError as error:
        raise CadisError(f"cannot write the plot to {path} ({error.strerror or error})"
                         ) from None
    return path


# --------------------------------------------------------------------------- command


def run_compare(args: Any) -> None:
    """The ``compare`` command: print the table to stdout, write the plot if asked."""
    client = reading_client(args.tracking_uri)
    try:
        rows, val_reach = compared_trials(client, experiment=args.experiment,
                                          sweep_run_id=args.sweep)
    except RunNotFound as error:
        raise CadisError(f"{error}; pass a sweep's parent run id (the MLflow UI shows it) or "
                         f"use --experiment") from None
    if args.by is not None:
        check_by(rows, args.by)
    sys.stdout.write(format_trial_table(rows, by=args.by, fmt=args.format,
                                        val_reach=val_reach))
    if args.plot:
        _, left_out = plottable(rows, args.by)
        if left_out:
            names = ", ".join(f"{row.name} ({_why_left_out(row, args.by)})"
                              for row in _started(left_out))
            print(f"compare: left out of the plot: {names}", file=sys.stderr)
        if args.by is None:
            path = plot_curves(rows, args.plot)
        else:
            path = plot_ablation(rows, args.by, args.plot)
        print(f"plot: {path}", file=sys.stderr)
