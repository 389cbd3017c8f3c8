"""``cadis sweep``: a Ray Tune search over FT-CADIS trials, each a Ray Train run, in MLflow.

The driver validates everything that can fail on input before a trial starts or an MLflow run
opens, then runs Tune: each trial is :func:`cadis.sweeps.trial.run_trial` (fine-tune on Ray
Train workers, certify, report), searched by :mod:`cadis.sweeps.searcher` (Optuna TPE, or
Tune's grid and random search for grids; ASHA on the per-epoch proxy) and written to MLflow by
:mod:`cadis.sweeps.mlflow_writer`, from this process only. Its folder is
:mod:`cadis.sweeps.layout`'s. Ray is imported only once a sweep runs: ``--dry-run`` does not
pay for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from cadis.errors import CadisError
from cadis.files import atomic_write_text
from cadis.finetuning.config import portable_config
from cadis.sweeps.layout import STATE_FILE, SWEEP_FILE_COPY, TUNE_NAME
from cadis.sweeps.schema import (
    TRIAL_DRIVER_CPUS,
    VARIANT_KEY,
    SweepConfig,
    describe,
    load_sweep,
    required_per_trial,
    trial_config,
)
from cadis.tracking.contract import check_tracking_uri

if TYPE_CHECKING:
    from cadis.sweeps.mlflow_writer import SweepTracker

# Tune retries a failed trial this often; its Train run resumes from the last checkpoint.
TRIAL_MAX_FAILURES = 1


# ---------------------------------------------------------------------------- the driver


def run_sweep(path: str | Path, overrides: Sequence[str] = (), resume: bool = False,
              dry_run: bool = False) -> None:
    """Run (or with ``resume`` continue) the sweep in ``path``; ``dry_run`` only prints it.

    Every check that can fail on input runs before a trial starts or an MLflow run opens:
    the file, the models and data of the base, the tracking store and the cluster's resources.
    """
    # Absolute now: connecting to a cluster from a Ray job moves this process elsewhere.
    path = Path(path).absolute()
    sweep = load_sweep(path, overrides)
    print(describe(sweep), flush=True)
    if dry_run:
        return
    # Trials run in folders of their own (Tune's working directory per trial), perhaps on
    # other machines: the paths of models and data must not depend on this directory.
    sweep.base = portable_config(sweep.base)
    results = Path(sweep.results_dir).absolute()
    fingerprint = _fingerprint(sweep)
    state = _check_results_dir(results, fingerprint, resume)
    _preflight_trials(sweep)
    uri = sweep.tracking_uri()
    check_tracking_uri(uri)

    import ray

    started_ray = not ray.is_initialized()
    working_dir = os.getcwd()
    if started_ray:
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=True,
                 log_to_driver=True)
    try:
        nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
        concurrent = _concurrent_trials(sweep, ray.cluster_resources(), nodes)
        results.mkdir(parents=True, exist_ok=True)
        # Inside a Ray job, Ray may replace the job's working directory (its unpacked copy)
        # once the driver connects; every path is absolute by now, and this one stays.
        os.chdir(results)
        from cadis.sweeps.mlflow_writer import SweepTracker

        tracker = SweepTracker(uri, sweep, results, state)
        if state is None:
            shutil.copyfile(path, results / SWEEP_FILE_COPY)
            tracker.open_sweep(results / SWEEP_FILE_COPY)
            atomic_write_text(results / STATE_FILE, json.dumps(
                {"parent_run_id": tracker.parent_run_id, "experiment_id": tracker.experiment_id,
                 "tracking_uri": uri, "sweep": fingerprint}, indent=2) + "\n")
        else:
            tracker.reopen_sweep()
        print(f"mlflow: {uri} experiment {sweep.mlflow.experiment!r}, sweep run "
              f"{tracker.parent_run_id}", flush=True)
        _fit(sweep, results, tracker, concurrent, resume=state is not None)
    finally:
        if started_ray:
            ray.shutdown()
        with contextlib.suppress(OSError):  # gone, if Ray replaced it
            os.chdir(working_dir)


def _fingerprint(sweep: SweepConfig) -> dict[str, Any]:
    """The resolved sweep as plain data: a resumed sweep must be the same sweep."""
    data = dataclasses.asdict(sweep)
    data["base"] = sweep.base.to_dict()
    return json.loads(json.dumps(data, default=str))


def _check_results_dir(results: Path, fingerprint: dict[str, Any], resume: bool
                       ) -> dict[str, Any] | None:
    """The saved state of the sweep being resumed (None for a new sweep), after checking that
    ``results`` holds no other sweep (a new one) or this very sweep (a resumed one)."""
    state_path = results / STATE_FILE
    if not resume:
        if state_path.exists() or (results / TUNE_NAME).exists():
            raise CadisError(f"{results} already holds a sweep: pass --resume to continue it, "
                             f"or set results_dir (or remove the folder) to start anew")
        return None
    if not state_path.exists():
        raise CadisError(f"nothing to resume: {state_path} does not exist")
    state = json.loads(state_path.read_text())
    if state["sweep"] != fingerprint:
        changed = sorted(key for key in fingerprint
                         if fingerprint[key] != state["sweep"].get(key))
        raise CadisError(f"the sweep differs from the one in {results} (in {', '.join(changed)}): "
                         f"resume it with the same file and --set values")
    return state


def _preflight_trials(sweep: SweepConfig) -> None:
    """The base's models, data and LoRA targets load (:func:`cadis.finetuning.fit.preflight`),
    once for each variant of the base a grid names: the input errors of a trial surface here,
    not an hour into the sweep."""
    from cadis.finetuning.fit import preflight

    variants = sweep.search.get(VARIANT_KEY)
    for values in variants.values if variants else [None]:
        config = sweep.base if values is None else trial_config(sweep, {VARIANT_KEY: values})
        if config.method != "none":
            preflight(config)


def _concurrent_trials(sweep: SweepConfig, cluster: Mapping[str, float],
                       nodes: Sequence[Mapping[str, float]]) -> int:
    """``max_concurrent_trials``, lowered to what the cluster holds at once (trials that wait
    for each other's Train workers starve); an error when not even one trial fits, or when
    no single node holds one worker (its resources cannot be split over nodes)."""
    resources = sweep.resources
    if not any(node.get("CPU", 0.0) >= resources.cpus_per_worker - 1e-9
               and node.get("GPU", 0.0) >= resources.gpus_per_worker - 1e-9 for node in nodes):
        largest = max(nodes, key=lambda node: (node.get("GPU", 0.0), node.get("CPU", 0.0)),
                      default={})
        raise CadisError(f"one worker needs {resources.cpus_per_worker:g} CPU and "
                         f"{resources.gpus_per_worker:g} GPU on one node; the largest node has "
                         f"{largest.get('CPU', 0.0):g} CPU and {largest.get('GPU', 0.0):g} GPU")
    need = required_per_trial(sweep)
    have = {key: float(cluster.get(key, 0.0)) for key in need}
    short = [f"{need[key]:g} {key} (the cluster has {have[key]:g})"
             for key in need if need[key] > have[key] + 1e-9]
    if short:
        raise CadisError(f"one trial needs {' and '.join(short)}: lower resources.* or add "
                         f"nodes")
    fits = min(math.floor(have[key] / need[key] + 1e-9) for key in need if need[key] > 0)
    if fits < sweep.max_concurrent_trials:
        print(f"max_concurrent_trials {sweep.max_concurrent_trials} lowered to {fits}: the "
              f"cluster holds {fits} trial(s) of {need['CPU']:g} CPU, {need['GPU']:g} GPU",
              file=sys.stderr, flush=True)
    return min(fits, sweep.max_concurrent_trials)


def _fit(sweep: SweepConfig, results: Path, tracker: SweepTracker, concurrent: int,
         resume: bool) -> None:
    from ray import tune

    from cadis.sweeps.mlflow_writer import MlflowTrialCallback
    from cadis.sweeps.searcher import build_scheduler, build_searcher, tune_search_space
    from cadis.sweeps.trial import run_trial

    # Per-epoch results carry the proxy, final ones the certified accuracies: neither carries
    # every metric the searcher and the scheduler name, which Tune otherwise refuses.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, sweep=sweep, results=str(results)),
        {"CPU": TRIAL_DRIVER_CPUS})
    callback = MlflowTrialCallback(tracker.uri, tracker.experiment_id, tracker.parent_run_id,
                                   sweep, str(results))
    if resume:
        tuner = tune.Tuner.restore(str(results / TUNE_NAME), trainable=trainable,
                                   resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=tune_search_space(sweep),
            tune_config=tune.TuneConfig(search_alg=build_searcher(sweep, results),
                                        scheduler=build_scheduler(sweep),
                                        num_samples=sweep.num_trials,
                                        max_concurrent_trials=concurrent),
            run_config=tune.RunConfig(name=TUNE_NAME, storage_path=str(results),
                                      callbacks=[callback],
                                      failure_config=tune.FailureConfig(
                                          max_failures=TRIAL_MAX_FAILURES)))
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        grid = tuner.fit()
    except KeyboardInterrupt:
        tracker.close_sweep(finished=False)
        raise CadisError(f"sweep interrupted; continue it with: cadis sweep ... --resume "
                         f"(results in {results})") from None
    except BaseException:
        tracker.close_sweep(finished=False, failed=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    finished = grid.num_terminated + grid.num_errors >= sweep.total_trials
    tracker.close_sweep(finished=finished)
    print(tracker.comparison(), flush=True)
    if not finished:
        raise CadisError(f"sweep interrupted after {grid.num_terminated} of "
                         f"{sweep.total_trials} trials; continue it with --resume")
    if grid.num_errors:
        print(f"{grid.num_errors} trial(s) failed; their errors are in {results / TUNE_NAME}",
              file=sys.stderr)


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM (``ray job stop``, a scheduler) ends the sweep as Ctrl-C does: resumable."""
    raise KeyboardInterrupt
