"""What a person reads when a sweep ends: the trial it chose with its test figures, how far the
evidence carries that choice (its paired verdicts against the incumbent and every other
contender, on validation and on test: :mod:`cadis.sweeps.choice`; with several training
seeds each configuration's test figure over its seeds and the verdicts seed by seed), where
its checkpoint and
records are, where the trials' time went (the median orchestration and phases), how many
trials ASHA stopped within the proxy's noise of the cut they met, the trials
that failed and why, the figures, and how to open MLflow's UI on the
sweep. Read from the sweep's parent run and its results folder.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cadis.smoothing.paired import format_interval, format_p, format_signed
from cadis.smoothing.records import RECORDS_FILENAME
from cadis.smoothing.separation import MOST_IMAGES, POWER, images_to_separate
from cadis.smoothing.verdicts import FAMILY_ALPHA, Verdict
from cadis.sweeps.asha_cuts import stopped_line, sweep_cuts
from cadis.sweeps.choice import TEST, VALIDATION, Choice, verdict_fields
from cadis.sweeps.layout import TrainedTrial, trained_file, trial_certify_dir
from cadis.sweeps.mlflow_writer import SweepTracker
from cadis.sweeps.spec import AshaSettings
from cadis.sweeps.trial_phases import median_line
from cadis.tracking.contract import ACR, ERROR_ARTIFACT, NUM_IMAGES, radius_of_metric
from cadis.tracking.server import SQLITE_SCHEME
from cadis.tracking.sweep_reader import trial_row, trial_runs


def sweep_summary(tracker: SweepTracker, best_trial: str | None, figures: Path | None,
                  choice: Choice | None = None) -> str:
    """The lines of the sweep's end: ``best_trial`` (None: nothing was ranked) and its test
    figures, the ``choice``'s verdicts in words (:meth:`Choice.words`), the trials' median
    phases, ASHA's stops against the proxy's noise (:func:`asha_line`), the failed trials,
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
        row = trial_row(run)
        # Radii beyond what the test certification's n can certify are zero by construction.
        accuracy = ", ".join(f"r={radius:g} {value:.3f}"
                             for radius, value in row.accuracy.items() if radius <= row.reach)
        lines += [f"chosen: {run.info.run_name} (trial {best_trial}), first by validation "
                  f"{objective.metric} = {metrics.get(objective.searched, math.nan):.3f}",
                  f"  test ({int(metrics.get(NUM_IMAGES, 0))} images, n={certify.n}, "
                  f"n0={certify.n0}, alpha={certify.alpha:g}): {accuracy}; "
                  f"acr {metrics.get(ACR, math.nan):.3f}"]
        if choice is not None:
            lines += choice.words()
            separation = separation_line(choice, objective.metric)
            if separation is not None:
                lines.append(separation)
            for objective in sweep.objective:
                lines += seed_lines(choice, objective.metric)
        trained = trained_file(tracker.results, best_trial)
        if trained.is_file():
            lines.append(f"  checkpoint: {TrainedTrial.read(trained).checkpoint}")
        lines.append(f"  records: "
                     f"{trial_certify_dir(tracker.results, best_trial) / RECORDS_FILENAME}")
    runs = trial_runs(tracker.client, tracker.experiment_id, tracker.parent_run_id)
    timing = median_line(run.data.metrics for run in runs)
    if timing is not None:
        lines.append(timing)
    if sweep.scheduler is not None:
        lines.append(asha_line(tracker.client, runs, sweep.scheduler))
    failures = tracker.failures()
    if failures:
        lines.append(f"{len(failures)} trial(s) failed ({ERROR_ARTIFACT} on their MLflow runs):")
        lines += [f"  {name}: {reason}" for name, reason in failures]
    if figures is not None:
        lines.append(f"figures: {figures} (and on the sweep's MLflow run, folder figures)")
    lines.append(f"MLflow: "
                 f"{mlflow_ui_hint(tracker.uri, tracker.experiment_id, tracker.parent_run_id)}")
    return "\n".join(lines)


def asha_line(client: Any, runs: Sequence[Any], scheduler: AshaSettings) -> str:
    """How many trials ASHA stopped and, per rung, how many of them lay within the proxy's
    noise of the cut they met (:mod:`cadis.sweeps.asha_cuts`), from the trial ``runs``'
    per-epoch metric histories and outcomes."""
    cuts, stopped = sweep_cuts(client, [trial_row(run) for run in runs],
                               dataclasses.asdict(scheduler))
    return stopped_line(cuts, stopped, scheduler.metric)


def separation_line(choice: Choice, metric: str) -> str | None:
    """Where the chosen trial and the incumbent are inseparable on validation at the radius
    of ``metric``: how many validation images each certified alone, and how large a hold-out
    would show the chosen trial ahead at those rates
    (:func:`~cadis.smoothing.separation.images_to_separate`, at Holm's first level over the
    decision's comparisons), said to be a projection. None where there is nothing to project
    (the incumbent chosen or not ranked, separated, or ``metric`` not a radius's)."""
    if choice.incumbent in (None, choice.chosen) or radius_of_metric(metric) is None:
        return None
    decision = next((decision for decision in choice.decisions
                     if decision.split == VALIDATION and decision.objective == metric
                     and decision.train_seed is None), None)
    if decision is None:
        return None
    label = decision.labels[choice.incumbent]
    verdict = next((v for v in decision.verdicts if v.other == label), None)
    if verdict is None or verdict.separated:
        return None
    only_chosen, only_incumbent = verdict.discordant
    alpha = FAMILY_ALPHA / len(decision.verdicts)
    needed = images_to_separate(only_chosen, only_incumbent, verdict.images, alpha)
    measured = (f"  to separate from the incumbent: on {verdict.images} validation images the "
                f"chosen trial alone certified {only_chosen} at {metric}, the incumbent alone "
                f"{only_incumbent}; ")
    if only_chosen <= only_incumbent:
        return measured + "at those rates no hold-out would show the chosen trial ahead"
    test = f"{POWER:.0%} power, McNemar at {alpha:.3g}, Holm's first level"
    if needed is None:
        return measured + f"at those rates more than {MOST_IMAGES:,} would ({test})"
    return (measured + f"at those rates about {needed:,} validation images would show it "
            f"ahead ({test}; a projection that assumes the rates hold)")


def seed_lines(choice: Choice, metric: str) -> list[str]:
    """Where configurations were certified with several training seeds: each one's test
    ``metric`` as the mean and range over its seeds, then the chosen trial against each other
    configuration seed by seed (the same-numbered seeds, on the same test draws; Holm across
    each seed's decision). A configuration is called ahead or behind only where every seed
    separates it the same way; otherwise the words say the seeds do not decide it."""
    chosen = choice.seeds.get(choice.chosen or "")
    if chosen is None or len(chosen["seeds"]) < 2 or metric not in chosen["mean"]:
        return []
    decisions = [decision for decision in choice.decisions
                 if decision.split == TEST and decision.objective == metric]
    # Alone on test (no other configuration), the chosen trial has no decision to name it.
    labels = decisions[0].labels if decisions else {choice.chosen: choice.chosen}

    def spread(trial: str) -> str:
        figures = choice.seeds[trial]
        low, high = figures["range"][metric]
        return (f"{labels.get(trial, trial)} {figures['mean'][metric]:.3f} "
                f"[{low:.3f}-{high:.3f}]")

    others = [trial for trial in labels if trial != choice.chosen and trial in choice.seeds]
    lines = [f"  test over {len(chosen['seeds'])} training seeds "
             f"({int(chosen['mean'][NUM_IMAGES])} images), {metric}: chosen "
             f"{spread(choice.chosen)}"
             + "".join(f" vs {spread(trial)}" for trial in others)]
    own = next(iter(chosen["seeds"]))
    for trial in others:
        label = labels[trial]
        verdicts = [(decision.train_seed, verdict) for decision in decisions
                    for verdict in decision.verdicts if verdict.other == label]
        seeds = "; ".join(f"seed {own if seed is None else seed} {turned(verdict)} "
                          f"p={format_p(verdict.p_adjusted)} (Holm)"
                          for seed, verdict in verdicts)
        lines.append(f"  per seed, chosen {labels[choice.chosen]} minus {label}: {seeds}: "
                     f"{seed_verdict(verdict for _, verdict in verdicts)}")
    return lines


def turned(verdict: Verdict) -> str:
    """The chosen minus the other, with its interval: ``+0.020 [+0.010, +0.030]``."""
    # + 0.0: a tie reads +0.000, not the -0.000 that negating 0.0 gives.
    fields = verdict_fields(verdict, turned=True)
    return (f"{format_signed(fields['difference'] + 0.0)} "
            f"{format_interval((fields['low'] + 0.0, fields['high'] + 0.0))}")


def seed_verdict(verdicts: Iterable[Verdict]) -> str:
    """What the seeds say together: ahead (or behind) only where every seed separates the two
    the same way (a verdict's difference is the other minus the chosen)."""
    verdicts = list(verdicts)
    separated = [verdict for verdict in verdicts if verdict.separated]
    if len(separated) == len(verdicts) and all(v.difference < 0 for v in verdicts):
        return "ahead on every seed"
    if len(separated) == len(verdicts) and all(v.difference > 0 for v in verdicts):
        return "behind on every seed"
    return (f"separated on {len(separated)} of {len(verdicts)} seeds: the seeds do not "
            f"separate them")


#: The query that opens MLflow's UI on its model-training view (runs, not traces).
MLFLOW_UI_WORKFLOW = "workflowType=machine_learning"


def mlflow_ui_hint(uri: str, experiment_id: str, run_id: str) -> str:
    """How to see a run in MLflow's UI: the command that serves a local SQLite file on
    loopback and the page, or the tracking server's page. The page asks for MLflow's model
    training view: MLflow 3.17's UI opens every experiment on its GenAI view (traces) unless
    the address names the workflow, whatever the experiment's tags say."""
    page = f"#/experiments/{experiment_id}/runs/{run_id}?{MLFLOW_UI_WORKFLOW}"
    if uri.startswith(SQLITE_SCHEME):
        mlflow = Path(sys.executable).with_name("mlflow")
        command = mlflow if mlflow.is_file() else "mlflow"
        return (f"{command} ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000, then "
                f"open http://127.0.0.1:5000/{page}")
    return f"open {uri.rstrip('/')}/{page}"
