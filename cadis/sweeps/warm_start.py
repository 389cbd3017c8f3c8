"""``cadis sweep FILE --warm-start FROM``: start the searcher from what an earlier sweep found.

FROM is an earlier sweep's results folder (its ``sweep.json`` names its parent run and
tracking URI) or its parent run's id in this sweep's tracking URI. The earlier sweep is compatible when it
searched the same keys and every value its ranked trials ran lies inside this sweep's
distribution of that key (a range's bounds, a choice's options); it must have measured this
sweep's objectives on validation. Its ranked trials then enter Optuna's study as finished
trials before the first new one is proposed: TPE models them as if this sweep had run them,
and they are not run again; the new sweep's incumbent (its own base) is still its first
trial. Anything else is refused before any work, naming the keys or values that differ. The earlier sweep is read by :mod:`cadis.tracking.sweep_reader`.

What is reused is a *search* prior, never a result: the new sweep's trials are ranked on its
own validation figures and only its own finalists are certified on test. MLflow is imported
when a warm start is loaded; Ray never (a dry run checks a warm start too).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cadis.errors import CadisError
from cadis.sweeps.layout import STATE_FILE, sweep_origin
from cadis.sweeps.spec import SEARCHER_OPTUNA, Distribution, SweepConfig
from cadis.tracking.sweep_reader import RunNotFound, read_sweep


@dataclass(frozen=True)
class WarmStart:
    """The finished trials of an earlier sweep, as this sweep's searcher takes them:
    ``points`` (searched values, typed as this sweep's distributions) and ``values`` (the
    objectives on validation, in this sweep's order)."""

    source: str
    parent_run_id: str
    tracking_uri: str
    points: tuple[dict[str, Any], ...]
    values: tuple[tuple[float, ...], ...]

    def describe(self) -> str:
        return (f"warm start: {len(self.points)} ranked trials of sweep run "
                f"{self.parent_run_id} ({self.source})")

    def record(self) -> dict[str, Any]:
        """What the sweep's state and parent run keep of where the search started."""
        return {"source": self.source, "parent_run_id": self.parent_run_id,
                "tracking_uri": self.tracking_uri, "trials": len(self.points)}


def load_warm_start(source: str, sweep: SweepConfig) -> WarmStart:
    """The warm start ``source`` names, checked against ``sweep``; :class:`CadisError` (one
    line) when it cannot be found or is not compatible."""
    from mlflow.tracking import MlflowClient

    if sweep.searcher != SEARCHER_OPTUNA:
        raise CadisError("--warm-start feeds Optuna's study, but this sweep has a grid (Tune's "
                         "grid search runs it)")
    parent_run_id, uri = _locate(source, sweep.tracking_uri())
    try:
        earlier = read_sweep(MlflowClient(uri), parent_run_id)
    except RunNotFound as error:
        raise CadisError(f"--warm-start {source}: no run {parent_run_id} in {uri} "
                         f"({error.reason}); name a sweep's results folder or its parent "
                         f"run id") from None
    except CadisError as error:
        raise CadisError(f"--warm-start {source}: {error}") from None
    searched = set(earlier.searched)
    if searched != set(sweep.search):
        raise CadisError(f"--warm-start {source}: the searched keys differ (only in the earlier "
                         f"sweep: {_names(searched - set(sweep.search))}; only in this one: "
                         f"{_names(set(sweep.search) - searched)}); warm start needs the same keys")
    metrics = [objective.searched for objective in sweep.objective]
    ranked = [row for row in earlier.trials if all(metric in row.metrics for metric in metrics)]
    if not ranked:
        raise CadisError(f"--warm-start {source}: no trial of the earlier sweep has "
                         f"{' and '.join(metrics)} (its objective may differ from this one's)")
    outside: dict[str, list[str]] = {}
    points = []
    for row in ranked:
        point = {}
        for key, distribution in sweep.search.items():
            text = row.params.get(key)
            value = None if text is None else typed_value(distribution, text)
            if value is None:
                outside.setdefault(key, []).append(str(text))
            point[key] = value
        points.append(point)
    if outside:
        detail = "; ".join(f"{key}: {', '.join(sorted(set(texts)))} not in "
                           f"{sweep.search[key].describe()}" for key, texts in outside.items())
        raise CadisError(f"--warm-start {source}: values outside this sweep's search space "
                         f"({detail}); widen the bounds or warm-start from a compatible sweep")
    values = tuple(tuple(float(row.metrics[metric]) for metric in metrics) for row in ranked)
    return WarmStart(source, parent_run_id, uri, tuple(points), values)


def _locate(source: str, uri: str) -> tuple[str, str]:
    """The parent run id and tracking URI of ``source``: a results folder's ``sweep.json``, else a
    run id in ``uri``."""
    folder = Path(source)
    if folder.is_dir():
        state_file = folder / STATE_FILE
        if not state_file.is_file():
            raise CadisError(f"--warm-start {source}: the folder holds no {STATE_FILE}; name a "
                             f"sweep's results folder or its parent run id")
        return sweep_origin(folder)
    return source, uri


def typed_value(distribution: Distribution, text: str) -> Any:
    """The value logged as ``text``, typed as ``distribution`` draws it; None when it is not
    one ``distribution`` can draw."""
    if distribution.kind in ("choice", "grid"):
        return next((option for option in distribution.values if str(option) == text), None)
    try:
        number: float | int = float(text)
    except ValueError:
        return None
    if distribution.kind == "int" and number.is_integer():
        number = int(number)
    return number if distribution.contains(number) else None


def _names(keys: set[str]) -> str:
    return ", ".join(sorted(keys)) or "none"

