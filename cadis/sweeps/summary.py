"""What a person reads when a sweep ends: the trial it chose with its test figures, how far the
evidence carries that choice (its paired verdicts against the incumbent and every other
contender, on validation and on test: :mod:`cadis.sweeps.choice`), where its checkpoint and
records are, the trials that failed and why, the figures, and how to open MLflow's UI on the
sweep. Read from the sweep's parent run and its results folder.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from cadis.smoothing.records import RECORDS_FILENAME
from cadis.sweeps.layout import TrainedTrial, trained_file, trial_certify_dir
from cadis.sweeps.mlflow_writer import SweepTracker
from cadis.tracking.contract import ACR, ERROR_ARTIFACT, NUM_IMAGES
from cadis.tracking.server import SQLITE_SCHEME
from cadis.tracking.sweep_reader import trial_row

if TYPE_CHECKING:
    from cadis.sweeps.choice import Choice


def sweep_summary(tracker: SweepTracker, best_trial: str | None, figures: Path | None,
                  choice: Choice | None = None) -> str:
    """The lines of the sweep's end: ``best_trial`` (None: nothing was ranked) and its test
    figures, the ``choice``'s verdicts in words (:meth:`Choice.words`), the failed trials,
    ``figures`` (where the sweep's figures are, None: none) and the MLflow page."""
    sweep = tracker.sweep
    lines = [f"sweep {sweep.name} done."]
    if best_trial is None:
        lines.append("no trial was ranked on validation: nothing was chosen")
    else:
        run = tracker.client.get_run(tracker.run_of(best_trial))
        metrics = run.data.metrics
        objective = sweep.objective[0]
        certify = sweep.certify
        accuracy = ", ".join(f"r={radius:g} {value:.3f}"
                             for radius, value in trial_row(run).accuracy.items())
        lines += [f"chosen: {run.info.run_name} (trial {best_trial}), first by validation "
                  f"{objective.metric} = {metrics.get(objective.searched, math.nan):.3f}",
                  f"  test ({int(metrics.get(NUM_IMAGES, 0))} images, n={certify.n}, "
                  f"n0={certify.n0}, alpha={certify.alpha:g}): {accuracy}; "
                  f"acr {metrics.get(ACR, math.nan):.3f}"]
        if choice is not None:
            lines += choice.words()
        trained = trained_file(tracker.results, best_trial)
        if trained.is_file():
            lines.append(f"  checkpoint: {TrainedTrial.read(trained).checkpoint}")
        lines.append(f"  records: "
                     f"{trial_certify_dir(tracker.results, best_trial) / RECORDS_FILENAME}")
    failures = tracker.failures()
    if failures:
        lines.append(f"{len(failures)} trial(s) failed ({ERROR_ARTIFACT} on their MLflow runs):")
        lines += [f"  {name}: {reason}" for name, reason in failures]
    if figures is not None:
        lines.append(f"figures: {figures} (and on the sweep's MLflow run, folder figures)")
    lines.append(f"MLflow: "
                 f"{mlflow_ui_hint(tracker.uri, tracker.experiment_id, tracker.parent_run_id)}")
    return "\n".join(lines)


def mlflow_ui_hint(uri: str, experiment_id: str, run_id: str) -> str:
    """How to see a run in MLflow's UI: the command that serves a local SQLite file on
    loopback and the page, or the tracking server's page."""
    page = f"#/experiments/{experiment_id}/runs/{run_id}"
    if uri.startswith(SQLITE_SCHEME):
        mlflow = Path(sys.executable).with_name("mlflow")
        command = mlflow if mlflow.is_file() else "mlflow"
        return (f"{command} ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000, then "
                f"open http://127.0.0.1:5000/{page}")
    return f"open {uri.rstrip('/')}/{page}"
