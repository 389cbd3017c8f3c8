"""``cadis sweep``: a Ray Tune search over FT-CADIS trials, each a Ray Train run, in MLflow.

One trial is a Tune function that fits a :class:`ray.train.torch.TorchTrainer` (Train V2: a
``TuneReportCallback`` forwards every epoch's metrics to Tune, where ASHA may stop the trial),
then certifies the trained classifier in a Ray task holding one worker's resources (a GPU
where the workers had one) and reports the final certified accuracies, which the searcher
(Optuna TPE, or Tune's grid and random search for grids) optimises.

MLflow is written from the sweep's driver only, by a Tune callback: a parent run for the
sweep, a child run per trial created when the trial starts (params), fed each reported result
(metrics by epoch, then the final ones) and closed when the trial ends (FINISHED, KILLED for
trials ASHA stopped, FAILED), plus the certification's files as artifacts. Trials never open
the store, so a SQLite file takes no concurrent writers.

Layout of ``results_dir``::

    sweep.json        the parent run, the store and the resolved sweep (what --resume checks)
    sweep.yaml        the sweep file as given
    optuna.db         Optuna's study (optuna-dashboard sqlite:///.../optuna.db)
    tune/             Tune's experiment (Tuner.restore reads it)
    train/<trial>/    each trial's Ray Train run and checkpoints
    trials/<trial>/certify/   records.tsv, summary.json, certified_accuracy.png
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
from typing import Any, Mapping, Sequence

from ray.tune import Callback
from ray.tune.search.optuna import OptunaSearch

from cadis.certification import SETTINGS_FILENAME
from cadis.errors import CadisError
from cadis.records import atomic_write_text
from cadis.sweep_config import (
    SEARCHER_OPTUNA,
    TRIAL_DRIVER_CPUS,
    VARIANT_KEY,
    SweepConfig,
    describe,
    load_sweep,
    required_per_trial,
    trial_config,
    tune_search_space,
)
from cadis.train import portable_config
from cadis.tracking import (
    ACR,
    BEST_PREFIX,
    BEST_TRIAL_TAG,
    CERTIFIED_ACCURACY_PREFIX,
    CLEAN_ACCURACY,
    OUTCOME_COMPLETED,
    OUTCOME_FAILED,
    OUTCOME_STOPPED,
    OUTCOME_TAG,
    PARENT_RUN_TAG,
    ROLE_SWEEP,
    ROLE_TAG,
    ROLE_TRIAL,
    SEARCHED_TAG,
    SWEEP_TAG,
    TRIAL_ID_TAG,
    artifact_location,
    certified_accuracy_metric,
    check_tracking_uri,
    flatten_params,
    trial_runs,
)

STATE_FILE = "sweep.json"
SWEEP_FILE_COPY = "sweep.yaml"
OPTUNA_DB = "optuna.db"
TUNE_NAME = "tune"
TRAIN_DIR = "train"
TRIALS_DIR = "trials"
CERTIFY_DIR = "certify"
# Tune retries a failed trial this often; its Train run resumes from the last checkpoint.
TRIAL_MAX_FAILURES = 1
# Results that are Tune's bookkeeping, not the trial's metrics.
TUNE_KEYS = {"training_iteration", "time_total_s", "time_this_iter_s", "timestamp",
             "time_since_restore", "iterations_since_restore", "timesteps_total",
             "episodes_total", "timesteps_since_restore", "pid", "done", "checkpoint_path",
             "should_checkpoint"}
MAX_PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch
MAX_METRICS_PER_BATCH = 1000
WORKER_GROUP_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
WORKER_GROUP_START_TIMEOUT_S = 600
# The per-epoch time axis of ASHA: an epoch survives resume, Tune's iteration count does not.
EPOCH = "epoch"


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
    """The base's models, data and LoRA targets load (cadis.train.preflight), once for each
    variant of the base a grid names: the input errors of a trial surface here, not an hour
    into the sweep."""
    from cadis.train import preflight

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
            tune_config=tune.TuneConfig(search_alg=_searcher(sweep, results),
                                        scheduler=_scheduler(sweep),
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


def _searcher(sweep: SweepConfig, results: Path) -> Any:
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


def _scheduler(sweep: SweepConfig) -> Any:
    """ASHA on the per-epoch metric, or FIFO (every trial runs all its epochs)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    asha = sweep.scheduler
    if asha is None:
        return FIFOScheduler()
    # ASHA stops a trial the moment it reports max_t; one more lets the last epoch's trial
    # go on to its certification, reported under the same epoch.
    return ASHAScheduler(time_attr=EPOCH, metric=asha.metric, mode=asha.mode,
                         grace_period=asha.grace_period, reduction_factor=asha.reduction_factor,
                         max_t=asha.max_t + 1)


# ----------------------------------------------------------------------------- one trial


def run_trial(params: dict[str, Any], sweep: SweepConfig, results: str) -> None:
    """The Tune function of one trial: train on Ray Train workers, certify, report."""
    import ray
    from ray import tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from cadis.train import RAY_MAX_FAILURES, ray_train_worker

    trial_id = tune.get_context().get_trial_id()
    config = trial_config(sweep, params)
    # Train gives a worker group 60 s to start, then retries; on a loaded machine starting a
    # worker (importing torch) took longer, and each retry left its placement group reserved
    # until no worker fitted (seen with Ray 2.60). Train passes this on to its controller.
    os.environ.setdefault(WORKER_GROUP_START_TIMEOUT_ENV, str(WORKER_GROUP_START_TIMEOUT_S))
    resources = sweep.resources
    use_gpu = resources.gpus_per_worker > 0
    worker = {"CPU": resources.cpus_per_worker}
    if use_gpu:
        worker["GPU"] = resources.gpus_per_worker
    if use_gpu and config.device == "auto":
        config.device = "cuda"
    # The run is named by the trial: a trial restarted (a retry, --resume) resumes its run.
    trainer = TorchTrainer(
        ray_train_worker, train_loop_config=config.to_dict(),
        scaling_config=ScalingConfig(num_workers=resources.workers_per_trial, use_gpu=use_gpu,
                                     resources_per_worker=worker),
        run_config=RunConfig(name=trial_id, storage_path=str(Path(results) / TRAIN_DIR),
                             callbacks=[TuneReportCallback()],
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             failure_config=FailureConfig(max_failures=RAY_MAX_FAILURES)))
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"trial {trial_id}: training left no checkpoint")
    # Outside the trial's placement group (which holds only this function's share): the
    # Train workers have given their resources back by now, as the Train run does its own.
    certify = ray.remote(certify_trial).options(
        num_cpus=resources.cpus_per_worker, num_gpus=resources.gpus_per_worker,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
    out = Path(results) / TRIALS_DIR / trial_id / CERTIFY_DIR
    tune.report(ray.get(certify.remote(config.to_dict(), result.checkpoint, str(out))))


def certify_trial(config_dict: dict[str, Any], checkpoint: Any, out: str) -> dict[str, float]:
    """Certify a trained checkpoint with the sweep's certify: settings into ``out`` (resumed
    if a previous attempt stopped midway); returns the last epoch's metrics and the final
    ones: certified accuracy per radius, ``acr`` and ``clean_accuracy``."""
    from cadis.evaluate import ModelSources, certify_models
    from cadis.finetune import FINETUNE_CONFIG
    from cadis.train_config import from_mapping

    config = from_mapping(config_dict)
    certify = config.certify
    sources = ModelSources.resolve(config.models, config.classifier, config.denoiser,
                                   config.dataset, config.data_root, config.image_size)
    with checkpoint.as_directory() as directory:
        _discard_other_certification(Path(out), directory)
        metadata = json.loads((Path(directory) / FINETUNE_CONFIG).read_text())["metadata"]
        summary = certify_models(
            sources, config.sigma, Path(out), n=certify.n, n0=certify.n0, alpha=certify.alpha,
            skip=certify.skip, max_images=certify.max_images, batch_size=certify.batch_size,
            checkpoint=directory, seed=config.seed, device=config.device, progress=False)
    accuracy = {certified_accuracy_metric(float(radius)): value
                for radius, value in summary["certified_accuracy"].items()}
    return {**metadata["metrics"], **accuracy, ACR: summary["acr"],
            CLEAN_ACCURACY: accuracy[certified_accuracy_metric(0.0)]}


def _discard_other_certification(out: Path, checkpoint: str) -> None:
    """A trial retrained after an interruption has a new checkpoint: records certified from
    the old one are not this model's, and certify_models would (rightly) refuse the folder."""
    settings = out / SETTINGS_FILENAME
    if settings.is_file() and json.loads(settings.read_text()).get("checkpoint") != checkpoint:
        shutil.rmtree(out)


# ------------------------------------------------------------------------------- MLflow


class SweepTracker:
    """The sweep's parent run: opened (or reopened on resume) and closed by the driver."""

    def __init__(self, uri: str, sweep: SweepConfig, results: Path,
                 state: Mapping[str, Any] | None) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.sweep = sweep
        self.results = results
        self.client = MlflowClient(uri)
        self.parent_run_id = state["parent_run_id"] if state else ""
        self.experiment_id = state["experiment_id"] if state else ""

    def open_sweep(self, sweep_file: Path) -> None:
        experiment = self.client.get_experiment_by_name(self.sweep.mlflow.experiment)
        self.experiment_id = experiment.experiment_id if experiment else \
            self.client.create_experiment(self.sweep.mlflow.experiment,
                                          artifact_location=artifact_location(self.uri))
        run = self.client.create_run(self.experiment_id, run_name=self.sweep.name,
                                     tags={ROLE_TAG: ROLE_SWEEP, SWEEP_TAG: self.sweep.name,
                                           SEARCHED_TAG: ",".join(sorted(self.sweep.search))})
        self.parent_run_id = run.info.run_id
        sweep = self.sweep
        params = {"searcher": sweep.searcher, "num_trials": sweep.num_trials,
                  "total_trials": sweep.total_trials,
                  "max_concurrent_trials": sweep.max_concurrent_trials,
                  "objective": ", ".join(f"{o.metric} {o.mode}" for o in sweep.objective),
                  "scheduler": "none" if sweep.scheduler is None else
                  json.dumps(dataclasses.asdict(sweep.scheduler)),
                  "resources": json.dumps(dataclasses.asdict(sweep.resources)),
                  **{f"search.{key}": distribution.describe()
                     for key, distribution in sweep.search.items()},
                  **flatten_params(sweep.base.to_dict(), "base.")}
        _log_params(self.client, self.parent_run_id, params)
        self.client.log_artifact(self.parent_run_id, str(sweep_file))
        self.client.log_text(self.parent_run_id, describe(sweep) + "\n", "sweep_resolved.txt")

    def reopen_sweep(self) -> None:
        self.client.update_run(self.parent_run_id, status="RUNNING")

    def close_sweep(self, finished: bool, failed: bool = False) -> None:
        """Ends every trial run still RUNNING (killed with the driver) and the sweep's run;
        a finished sweep's run gets the best trial's final metrics."""
        for run in trial_runs(self.client, self.experiment_id, self.parent_run_id):
            if run.info.status == "RUNNING":
                self.client.set_terminated(run.info.run_id, "KILLED")
        if finished:
            self._log_best()
        status = "FINISHED" if finished else ("FAILED" if failed else "KILLED")
        self.client.set_terminated(self.parent_run_id, status)

    def _log_best(self) -> None:
        objective = self.sweep.objective[0]
        scored = [run for run in trial_runs(self.client, self.experiment_id, self.parent_run_id)
                  if objective.metric in run.data.metrics]
        if not scored:
            return
        sign = 1 if objective.mode == "max" else -1
        best = max(scored, key=lambda run: sign * run.data.metrics[objective.metric])
        final = {key: value for key, value in best.data.metrics.items() if _is_final_metric(key)}
        for key, value in final.items():
            self.client.log_metric(self.parent_run_id, BEST_PREFIX + key, value)
        self.client.set_tag(self.parent_run_id, BEST_TRIAL_TAG, best.data.tags[TRIAL_ID_TAG])

    def comparison(self) -> str:
        from cadis.compare import format_comparison, load_trials

        rows = load_trials(self.client, sweep_run_id=self.parent_run_id)
        return format_comparison(rows)


class MlflowTrialCallback(Callback):
    """Tune callback in the driver: a child run per trial, its params, metrics and files.

    Holds only plain values and opens its MLflow client on first use: Tune pickles callbacks
    into its experiment state, and a resumed sweep unpickles this one.
    """

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, sweep: SweepConfig,
                 results: str) -> None:
        self.uri = uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.sweep = sweep
        self.results = results
        self._client = None
        self._run_ids: dict[str, str] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self.uri)
        return self._client

    def run_id(self, trial: Any) -> str:
        """The trial's child run: found by its trial id (a resumed sweep reuses it, so no
        trial appears twice) or created with the trial's params."""
        trial_id = trial.trial_id
        if trial_id in self._run_ids:
            return self._run_ids[trial_id]
        found = [run for run in trial_runs(self.client, self.experiment_id, self.parent_run_id)
                 if run.data.tags.get(TRIAL_ID_TAG) == trial_id]
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            run = self.client.create_run(
                self.experiment_id, run_name=str(trial),
                tags={PARENT_RUN_TAG: self.parent_run_id, ROLE_TAG: ROLE_TRIAL,
                      TRIAL_ID_TAG: trial_id, SEARCHED_TAG: ",".join(sorted(self.sweep.search))})
            run_id = run.info.run_id
            # The whole training config (searched values applied), and each searched value
            # under its own name: a variant's mapping too, as one param.
            config = trial_config(self.sweep, trial.config).to_dict()
            _log_params(self.client, run_id, {
                **flatten_params(config),
                **{key: _param_text(value) for key, value in trial.config.items()}})
        self._run_ids[trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.run_id(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        from mlflow.entities import Metric

        run_id = self.run_id(trial)
        step = int(result.get(EPOCH, 0))
        timestamp = int(result.get("timestamp", 0) * 1000)
        # The final result repeats the last epoch's metrics (ASHA reads them): log only what
        # the certification added.
        final = ACR in result
        metrics = [Metric(key, float(value), timestamp, step) for key, value in result.items()
                   if key not in TUNE_KEYS and isinstance(value, (int, float))
                   and not isinstance(value, bool) and math.isfinite(value)
                   and (not final or _is_final_metric(key))]
        for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=metrics[start:start + MAX_METRICS_PER_BATCH])

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self.run_id(trial)
        certified = ACR in (trial.last_result or {})
        certify_dir = Path(self.results) / TRIALS_DIR / trial.trial_id / CERTIFY_DIR
        if certified and certify_dir.is_dir():
            for name in ("records.tsv", "summary.json", "certified_accuracy.png"):
                if (certify_dir / name).is_file():
                    self.client.log_artifact(run_id, str(certify_dir / name))
        self.client.set_tag(run_id, OUTCOME_TAG,
                            OUTCOME_COMPLETED if certified else OUTCOME_STOPPED)
        self.client.set_terminated(run_id, "FINISHED" if certified else "KILLED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self.run_id(trial)
        self.client.set_tag(run_id, OUTCOME_TAG, OUTCOME_FAILED)
        self.client.set_terminated(run_id, "FAILED")


def _log_params(client: Any, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(key, str(value)) for key, value in params.items()]
    for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[start:start + MAX_PARAMS_PER_BATCH])


def _is_final_metric(name: str) -> bool:
    return name.startswith(CERTIFIED_ACCURACY_PREFIX) or name in (ACR, CLEAN_ACCURACY)


def _param_text(value: Any) -> str:
    if isinstance(value, Mapping):
        return ",".join(f"{key}={item}" for key, item in value.items())
    return str(value)
