"""``cadis sweep``: a Ray Tune search over FT-CADIS trials, each a Ray Train run, in MLflow.

The driver validates everything that can fail on input before a trial starts or an MLflow run
opens, then runs Tune: each trial is :func:`cadis.sweeps.trial.run_trial` (fine-tune on Ray
Train workers, certify, report), searched by :mod:`cadis.sweeps.searcher` (Optuna TPE, or
Tune's grid and random search for grids; ASHA on the per-epoch proxy) and written to MLflow by
:mod:`cadis.sweeps.mlflow_writer`, from this process only. Its folder is
:mod:`cadis.sweeps.layout`'s. Ray is imported only once a sweep runs: ``--dry-run`` does not
pay for it.

The stages run in order, each recorded in ``sweep.json`` before its work (:func:`_run_stages`,
the stage machine; :class:`StageWork`, their work on Ray). Whether a results folder may hold
this sweep is :mod:`cadis.sweeps.resume`'s; what the cluster holds at once,
:mod:`cadis.sweeps.resources`'.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import shlex
import shutil
import signal
import sys
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from cadis.errors import CadisError, first_line
from cadis.files import check_creatable_folder
from cadis.finetuning.config import portable_config
from cadis.finetuning.ray_train import init_ray
from cadis.sweeps.layout import (
    SWEEP_FILE_COPY,
    TUNE_NAME,
    SweepState,
)
from cadis.sweeps.describe import describe
from cadis.sweeps.final_stage import run_final_stage
from cadis.sweeps.parse import load_sweep
from cadis.sweeps.preflight import check_searched_sigma
from cadis.sweeps.resources import concurrent_trials, store_cpus_now
from cadis.sweeps.resume import check_results_dir, sweep_fingerprint
from cadis.sweeps.search_space import trial_config
from cadis.sweeps.spec import TRIAL_DRIVER_CPUS, VARIANT_KEY, SweepConfig
from cadis.tracking.contract import ERROR_ARTIFACT
from cadis.tracking.server import check_tracking_uri, tracking_retry_s

if TYPE_CHECKING:
    from cadis.sweeps.mlflow_writer import SweepTracker
    from cadis.sweeps.warm_start import WarmStart

# Tune retries a failed trial this often; its Train run resumes from the last checkpoint.
TRIAL_MAX_FAILURES = 1


# ---------------------------------------------------------------------------- the driver


STOP_AFTER = ("rank",)
# The sweep's stages, as sweep.json records them: a resumed sweep continues from its stage.
STAGE_SEARCH, STAGE_RANKED, STAGE_FINAL, STAGE_DONE = "search", "ranked", "final", "done"
# Between ranked and final: the ranked trials raced on further validation blocks.
STAGE_RACING = "racing"


def run_sweep(path: str | Path, overrides: Sequence[str] = (), resume: bool = False,
              dry_run: bool = False, stop_after: str | None = None,
              warm_start: str | None = None) -> None:
    """Run (or with ``resume`` continue) the sweep in ``path``; ``dry_run`` only prints it;
    ``stop_after="rank"`` stops once every trial is ranked on validation (the test set is
    touched by a later ``--resume``); ``warm_start`` names an earlier sweep whose ranked
    trials the searcher starts from (:mod:`cadis.sweeps.warm_start`).

    Every check that can fail on input runs before a trial starts or an MLflow run opens:
    the file, the models and data of the base, the tracking server and the cluster's resources.
    A dry run runs them all but the cluster's, creating nothing.
    """
    if stop_after is not None and stop_after not in STOP_AFTER:
        raise CadisError(f"--stop-after must be one of {', '.join(STOP_AFTER)}, "
                         f"got {stop_after!r}")
    # Absolute now: connecting to a cluster from a Ray job moves this process elsewhere.
    path = Path(path).absolute()
    sweep = load_sweep(path, overrides)
    print(describe(sweep), flush=True)
    # Trials run in folders of their own (Tune's working directory per trial), perhaps on
    # other machines: the paths of models and data must not depend on this directory.
    sweep.base = portable_config(sweep.base)
    results = Path(sweep.results_dir).absolute()
    check_creatable_folder(results, "results_dir")
    draws = Path(sweep.draws_dir).absolute()
    check_creatable_folder(draws, "draws_dir")
    fingerprint = sweep_fingerprint(sweep)
    # After the fingerprint (a resumed sweep names its draws_dir as it was given): the stores
    # are built after this process has moved into the results folder.
    sweep.draws_dir = str(draws)
    state = check_results_dir(results, fingerprint, resume)
    # A dry run refuses what the real run would refuse before its first trial (it creates
    # nothing: neither the results folder nor a SQLite tracking URI's folder).
    _preflight_trials(sweep)
    check_searched_sigma(sweep)
    uri = sweep.tracking_uri()
    check_tracking_uri(uri, create=not dry_run)
    tracking_retry_s()  # a bad $CADIS_TRACKING_RETRY_S is refused now, not at the first outage
    warm = _load_warm_start(warm_start, sweep, resume)
    if dry_run:
        return

    import ray

    from cadis.sweeps.racing import run_race_stage

    started_ray = not ray.is_initialized()
    working_dir = os.getcwd()
    if started_ray:
        init_ray(include_dashboard=True, log_to_driver=True)
    try:
        nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
        work = StageWork(
            build_stores=functools.partial(_build_stores, sweep),
            search=functools.partial(_search, sweep, results,
                                     concurrent_trials(sweep, ray.cluster_resources(), nodes),
                                     warm),
            race=functools.partial(run_race_stage, sweep, results),
            final=functools.partial(run_final_stage, sweep, results))
        results.mkdir(parents=True, exist_ok=True)
        # Inside a Ray job, Ray may replace the job's working directory (its unpacked copy)
        # once the driver connects; every path is absolute by now, and this one stays.
        os.chdir(results)
        with _mlflow_errors(uri, results, _resume_command(path, overrides)):
            _run_stages(sweep, path, results, uri, fingerprint, state, stop_after, warm, work)
    finally:
        if started_ray:
            ray.shutdown()
        with contextlib.suppress(OSError):  # gone, if Ray replaced it
            os.chdir(working_dir)


@contextlib.contextmanager
def _mlflow_errors(uri: str, results: Path, resume_command: str) -> Iterator[None]:
    """An MLflow failure anywhere in the sweep ends it in one line, resumable: a tracking server
    that stayed unreachable past the writer's retry bound (its ``PatientClient``) says how to
    continue once it is back."""
    from mlflow.exceptions import MlflowException

    from cadis.tracking.client import tracking_given_up

    try:
        yield
    except Exception as error:
        unreachable = tracking_given_up(error)
        if unreachable is not None:
            raise CadisError(f"{unreachable}; the sweep stopped: once the store is back, "
                             f"{resume_command} continues it (results in {results})") from None
        if isinstance(error, MlflowException):
            raise CadisError(f"MLflow at {uri} failed ({first_line(error)}); the sweep in "
                             f"{results} is resumable with --resume") from None
        raise


def _resume_command(path: Path, overrides: Sequence[str]) -> str:
    """The command that continues this sweep: the same file, the same ``--set`` values."""
    return shlex.join(["cadis", "sweep", str(path), "--resume",
                       *[part for item in overrides for part in ("--set", item)]])


def _load_warm_start(source: str | None, sweep: SweepConfig, resume: bool
                     ) -> WarmStart | None:
    """The checked warm start of a new sweep (a dry run checks it too)."""
    if source is None:
        return None
    if resume:
        raise CadisError("--warm-start starts a new sweep; a resumed sweep keeps the start it "
                         "had (drop --warm-start)")
    from cadis.sweeps.warm_start import load_warm_start

    warm = load_warm_start(source, sweep)
    print(warm.describe(), flush=True)
    return warm


@dataclasses.dataclass(frozen=True)
class StageWork:
    """The work of each stage, apart from the order :func:`_run_stages` runs them in: on Ray
    in a sweep (:func:`_build_stores`, :func:`_search`,
    :func:`~cadis.sweeps.final_stage.run_final_stage`)."""

    # The stored draws by role, each with its "folder" (made once, before the first trial).
    build_stores: Callable[[], dict[str, dict[str, Any]]]
    # The trials, each certified on validation: (tracker, store folders by role, resumed).
    search: Callable[[SweepTracker, Mapping[str, str], bool], None]
    # The finalists and the incumbent on the test set: the chosen trial's id (the race's leader,
    # else the rank winner; None: no trial ranked).
    final: Callable[[SweepTracker], str | None]
    # The ranked trials raced on further validation blocks (the final stage's finalists).
    race: Callable[[SweepTracker], None]


def _run_stages(sweep: SweepConfig, path: Path, results: Path, uri: str,
                fingerprint: dict[str, Any], state: SweepState | None, stop_after: str | None,
                warm: WarmStart | None, work: StageWork) -> None:
    """The stage machine: search (the trials, each certified on validation), racing (those it
    cannot separate, on more of validation), then final (the finalists on test); the sweep's figures and summary once either ends. Each stage is saved in
    ``sweep.json`` before its work begins, so that a resumed sweep (``state``) skips the
    stages it finished."""
    from cadis.sweeps.choice import record_choice
    from cadis.sweeps.mlflow_writer import SweepTracker
    from cadis.sweeps.summary import sweep_summary
    from cadis.tracking.client import tracking_given_up

    tracker = SweepTracker(uri, sweep, results, state)
    if state is None:
        shutil.copyfile(path, results / SWEEP_FILE_COPY)
        tracker.open_sweep(results / SWEEP_FILE_COPY, warm)
        state = SweepState(parent_run_id=tracker.parent_run_id,
                           experiment_id=tracker.experiment_id, tracking_uri=uri,
                           sweep=fingerprint, stage=STAGE_SEARCH, draw_stores={},
                           warm_start=None if warm is None else warm.record())
        state.write(results)
        resumed = False
    else:
        resumed = True
        if state.stage == STAGE_DONE:
            print(tracker.comparison(), flush=True)
            return
        tracker.reopen_sweep()
    print(f"mlflow: {uri} experiment {sweep.mlflow.experiment!r}, sweep run "
          f"{tracker.parent_run_id}", flush=True)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if state.stage == STAGE_SEARCH:
            tracker.set_stage(STAGE_SEARCH)
            if sweep.shares_draws and not state.draw_stores:
                state = dataclasses.replace(state, draw_stores=work.build_stores())
                state.write(results)
                tracker.log_stores(state.draw_stores)
            work.search(tracker, state.store_folders(), resumed)
            state = dataclasses.replace(state, stage=STAGE_RANKED)
            state.write(results)
        if stop_after == "rank":
            tracker.set_stage(STAGE_RANKED)
            choice = record_choice(tracker, include_test=False)
            _figures(tracker)
            tracker.close_sweep(finished=False)
            print(tracker.comparison(), flush=True)
            print("\n".join(choice.words()), flush=True)
            print(f"rank stage done: certify the top {sweep.top_k} on the test set with "
                  f"cadis sweep ... --resume (results in {results})", flush=True)
            return
        if state.stage != STAGE_FINAL:
            state = dataclasses.replace(state, stage=STAGE_RACING)
            state.write(results)
            tracker.set_stage(STAGE_RACING)
            work.race(tracker)
        state = dataclasses.replace(state, stage=STAGE_FINAL)
        state.write(results)
        tracker.set_stage(STAGE_FINAL)
        best = work.final(tracker)
        # Before the sweep is done, so that a failure to log the verdicts resumes here.
        choice = record_choice(tracker, include_test=True)
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            tracker.close_sweep(finished=False)
        raise CadisError(f"sweep interrupted; continue it with: cadis sweep ... --resume "
                         f"(results in {results})") from None
    except BaseException as error:
        # A tracking server given up on would be waited for again, to no end: its runs stay RUNNING
        # until --resume reopens them.
        if tracking_given_up(error) is None:
            with contextlib.suppress(Exception):
                tracker.close_sweep(finished=False, failed=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    state = dataclasses.replace(state, stage=STAGE_DONE, chosen_trial=best)
    state.write(results)
    tracker.set_stage(STAGE_DONE)
    figures = _figures(tracker)
    tracker.close_sweep(finished=True, best_trial=best)
    print(tracker.comparison(), flush=True)
    print(sweep_summary(tracker, best, figures, choice), flush=True)


def _figures(tracker: SweepTracker) -> Path | None:
    """The sweep's figures, in the results folder and on its parent run; a figure that
    cannot be drawn is reported, never a reason to lose a finished sweep (``cadis compare
    --sweep ID --figures DIR`` draws them again)."""
    try:
        return tracker.log_figures()
    except Exception as error:  # noqa: BLE001 - the sweep's results are already safe
        print(f"figures: not drawn ({type(error).__name__}: {first_line(error)}); retry with "
              f"cadis compare --sweep {tracker.parent_run_id} --figures DIR", file=sys.stderr,
              flush=True)
        return None


def _build_stores(sweep: SweepConfig) -> dict[str, dict[str, Any]]:
    """The rank stage's and the proxy's denoised draws, made once (or found in
    ``sweep.draws_dir``) in a Ray task holding one worker's resources (its GPU where workers
    have one), before the first trial."""
    import ray

    from cadis.sweeps.stores import build_sweep_stores

    resources = sweep.resources
    cpus = store_cpus_now(ray.nodes(), ray.available_resources(), resources.cpus_per_worker)
    task = ray.remote(build_sweep_stores).options(num_cpus=cpus,
                                                  num_gpus=resources.gpus_per_worker)
    stores = ray.get(task.remote(sweep.base.to_dict(), sweep.rank, sweep.draws_dir,
                                 threads=max(1, int(cpus))))
    for role, info in stores.items():
        classifier = info["classifier_ms_per_draw"]
        print(f"draws: {role} store built in {info['build_seconds']:.0f} s, "
              f"{info['bytes'] / 2 ** 20:.0f} MiB; per draw the denoiser takes "
              f"{info['denoiser_ms_per_draw']:.2f} ms"
              + (f", the classifier {classifier:.2f} ms" if classifier is not None else ""),
              flush=True)
    return stores


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


def _search(sweep: SweepConfig, results: Path, concurrent: int, warm: WarmStart | None,
            tracker: SweepTracker, stores: Mapping[str, str], resume: bool) -> None:
    """Ray Tune over the trials: each trains and is certified on validation; raises
    :class:`CadisError` (resumable) if the search did not run every trial to its end."""
    from ray import tune

    from cadis.sweeps.trial_callback import MlflowTrialCallback
    from cadis.sweeps.searcher import build_scheduler, build_searcher, tune_search_space
    from cadis.sweeps.trial import run_trial

    # Per-epoch results carry the proxy, final ones the certified accuracies: neither carries
    # every metric the searcher and the scheduler name, which Tune otherwise refuses.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, sweep=sweep, results=str(results),
                             stores=dict(stores)),
        {"CPU": TRIAL_DRIVER_CPUS})
    callback = MlflowTrialCallback(tracker.uri, tracker.experiment_id, tracker.parent_run_id,
                                   sweep, str(results))
    # A sweep stopped before its search began (while building its stores) has nothing for
    # Tune to restore: its resume starts the search.
    if resume and tune.Tuner.can_restore(str(results / TUNE_NAME)):
        tuner = tune.Tuner.restore(str(results / TUNE_NAME), trainable=trainable,
                                   resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=tune_search_space(sweep),
            tune_config=tune.TuneConfig(search_alg=build_searcher(
                                            sweep, results, () if warm is None else
                                            list(zip(warm.points, warm.values))),
                                        scheduler=build_scheduler(sweep),
                                        num_samples=sweep.num_trials,
                                        max_concurrent_trials=concurrent),
            run_config=tune.RunConfig(name=TUNE_NAME, storage_path=str(results),
                                      callbacks=[callback],
                                      failure_config=tune.FailureConfig(
                                          max_failures=TRIAL_MAX_FAILURES)))
    grid = tuner.fit()
    if grid.num_terminated + grid.num_errors < sweep.total_trials:
        raise KeyboardInterrupt  # Tune stopped early (a signal it caught): resumable
    if grid.num_errors:
        # The others went on: the sweep carries on with the trials that ranked.
        print(f"{grid.num_errors} trial(s) failed; their errors are in {results / TUNE_NAME} "
              f"and on their MLflow runs ({ERROR_ARTIFACT}):", file=sys.stderr, flush=True)
        for name, reason in tracker.failures():
            print(f"  {name}: {reason}", file=sys.stderr, flush=True)


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM (``ray job stop``, a scheduler) ends the sweep as Ctrl-C does: resumable."""
    raise KeyboardInterrupt
