"""The final stage of a sweep: the finalists and the incumbent on the test set, on one store
of test draws, each with ``certify.final.seeds`` training seeds.

The configurations of the stage are the finalists, the race's where the racing stage ran
(:func:`~cadis.sweeps.layout.race_finalists`, its leader first), else the top_k trials by the
rank stage, and the incumbent (the trial tagged
:data:`~cadis.tracking.contract.INCUMBENT_TAG`, the sweep file's own base) where it ranked.
Every one is certified from ONE store of test draws (:mod:`cadis.draws`, role ``test``, keyed
as ``cadis certify --draws-dir`` keys it) under
``certify.final.draws_dir``, else the sweep's ``draws_dir``: every test comparison between
them is then paired, on the same images and the same draws. The store is built once, in one
task, before any of them is certified. Without it (``store_draws: false``, or
``certify.final.compile: true``, which a store refuses: only the classifier runs from one)
each configuration denoises its own draws, and the stage says that its comparisons are not
paired draw for draw.

With ``certify.final.seeds`` S > 1 each configuration is trained S - 1 more times, with the
training seeds that follow its own (``train_seed``: only training's randomness changes, never
the certification's noise or the stored draws' keys, so every seed certifies on the same
draws), as Ray Train runs (:func:`~cadis.finetuning.ray_train.build_trainer`), as many at
once as trials run at once, and each is certified from the same store. Every piece resumes:
a retraining from its last checkpoint (its run is named by trial and seed), a certification
from its records; what is done (``trained.json``, a certification's ``summary.json``, in
the seed's folder :func:`~cadis.sweeps.layout.trial_seed_folder`) is not redone.

:func:`seed_figures` reads the stage's outcome back as plain data: per configuration its test
figures per training seed, their mean and their range.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from cadis.smoothing.records import SUMMARY_FILENAME
from cadis.sweeps.layout import (
    CERTIFY_DIR,
    SEEDS_DIR,
    TRAIN_DIR,
    TRAINED_FILE,
    TrainedTrial,
    race_finalists,
    seed_run_name,
    trained_file,
    trial_certify_dir,
    trial_folder,
    trial_seed_folder,
)
from cadis.sweeps.resources import concurrent_trials, store_cpus_now
from cadis.sweeps.spec import TRIAL_DRIVER_CPUS, SweepConfig
from cadis.tracking.contract import INCUMBENT_TAG, TRIAL_ID_TAG

if TYPE_CHECKING:
    from cadis.sweeps.mlflow_writer import SweepTracker

# The store's role in the sweep's stores (its MLflow metrics: draws.test.build_seconds, ...).
TEST_STORE: Final = "test"


def run_final_stage(sweep: SweepConfig, results: Path, tracker: SweepTracker) -> str | None:
    """Certify the finalists and the incumbent on the test set from one store of test draws,
    each with ``sweep.final_seeds`` training seeds (the search's own first), certifying and
    training only what is not done yet; returns the chosen trial's id (the race's leader,
    else the rank winner; None: no trial ranked)."""
    from cadis.sweeps.trial import figures_of

    raced = race_finalists(results)
    finalists, incumbent = stage_configurations(tracker.ranked(), sweep.top_k, raced)
    configurations = finalists + ([incumbent] if incumbent and incumbent not in finalists
                                  else [])
    pending = [trial_id for trial_id in configurations if not tracker.has_final(trial_id)]
    chosen_by = ("the race's finalists" if raced is not None else
                 f"the top {len(finalists)} by validation {sweep.objective[0].metric}")
    print(f"final stage: {chosen_by}: {', '.join(finalists) or 'none'}"
          + (f"; the incumbent {incumbent}" if incumbent else "")
          + f"; certifying {len(pending)} on the test set"
          + (f", each with {sweep.final_seeds} training seeds" if sweep.final_seeds > 1 else ""),
          flush=True)
    draws_dir = final_draws_dir(sweep)
    if configurations:
        _prepare_test_draws(sweep, draws_dir, tracker)
    trained = {trial_id: with_test_store(TrainedTrial.read(trained_file(results, trial_id)),
                                       draws_dir)
               for trial_id in configurations}

    def logged(trial_id: str, summary: dict[str, Any], out: Path) -> None:
        tracker.log_final(trial_id, figures_of(summary), out, finalist=trial_id in finalists)

    certify_with_seeds(sweep, results, trained, pending, logged)
    return finalists[0] if finalists else None


def certify_with_seeds(sweep: SweepConfig, results: Path, trained: Mapping[str, TrainedTrial],
                       pending: Sequence[str],
                       on_certified: Callable[[str, dict[str, Any], Path], None]) -> None:
    """Certify on the test set the search's own training of each of ``pending`` (calling
    ``on_certified(trial, summary, records folder)`` as each ends) and, for every trial of
    ``trained``, its ``sweep.final_seeds - 1`` further training seeds: each retrained as a
    Ray Train run, then certified as ``trained`` says (its config's ``certify``, with the
    stage's store), all at once as the cluster allows; what is done is not redone."""
    import ray

    from cadis.sweeps.shards import join_shards, submit_shards
    from cadis.sweeps.trial import certify_final, discard_other_certification

    resources = sweep.resources
    certify = ray.remote(certify_final).options(num_cpus=resources.cpus_per_worker,
                                                num_gpus=resources.gpus_per_worker)
    # A certification's part futures by (trial, training seed; None: the search's own).
    certifications: dict[tuple[str, int | None], list[Any]] = {}

    def start_certification(trial_id: str, seed: int | None, model: TrainedTrial) -> None:
        out = _certify_dir(results, trial_id, seed)
        discard_other_certification(out, model.checkpoint)
        certifications[trial_id, seed] = submit_shards(
            certify, (model.config, model.checkpoint), out, resources.workers_per_trial)

    for trial_id in pending:
        start_certification(trial_id, None, trained[trial_id])
    retrain = ray.remote(retrain_seed).options(num_cpus=TRIAL_DRIVER_CPUS)
    waiting = []  # (trial, seed, config) still to train, in order
    for trial_id in trained:
        for seed, config in further_seeds(trained[trial_id].config, sweep.final_seeds):
            folder = trial_seed_folder(results, trial_id, seed)
            if (folder / CERTIFY_DIR / SUMMARY_FILENAME).is_file():
                continue
            if (folder / TRAINED_FILE).is_file():
                start_certification(trial_id, seed, TrainedTrial.read(folder / TRAINED_FILE))
            else:
                waiting.append((trial_id, seed, config))
    # Retraining runs hold their Tune-function share while their workers start: no more at
    # once than trials ran at once, or their shares could leave no room for a worker.
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    at_once = concurrent_trials(sweep, ray.cluster_resources(), nodes)
    trainings: dict[Any, tuple[str, int, dict[str, Any]]] = {}
    while waiting or trainings or certifications:
        while waiting and len(trainings) < at_once:
            trial_id, seed, config = waiting.pop(0)
            print(f"final stage: retraining {trial_id} with training seed {seed}", flush=True)
            trainings[retrain.remote(config, seed_run_name(trial_id, seed),
                                     str(results / TRAIN_DIR), resources.cpus_per_worker,
                                     resources.gpus_per_worker)] = (trial_id, seed, config)
        futures = [*trainings, *(part for parts in certifications.values() for part in parts)]
        [ready], _ = ray.wait(futures, num_returns=1)
        if ready in trainings:
            trial_id, seed, config = trainings.pop(ready)
            model = TrainedTrial(ray.get(ready), config)
            model.write(trial_seed_folder(results, trial_id, seed) / TRAINED_FILE)
            start_certification(trial_id, seed, model)
            continue
        (trial_id, seed), parts = next(item for item in certifications.items()
                                       if ready in item[1])
        if len(ray.wait(parts, num_returns=len(parts), timeout=0)[0]) < len(parts):
            continue
        del certifications[trial_id, seed]
        out = _certify_dir(results, trial_id, seed)
        summary = join_shards(out, ray.get(parts))
        if seed is None:
            on_certified(trial_id, summary, out)
            print(f"final stage: {trial_id} certified on the test set", flush=True)
        else:
            print(f"final stage: {trial_id} with training seed {seed} certified on the test "
                  f"set", flush=True)


def stage_configurations(ranked: Iterable[Any], top_k: int,
                         raced: Sequence[str] | None = None) -> tuple[list[str], str | None]:
    """The finalists (``raced``, the race's, where it ran; else the trial ids of the first
    ``top_k`` ranked runs) and the incumbent's trial id among the ranked runs (None: it did
    not rank, or the sweep has none)."""
    ranked = list(ranked)
    finalists = (list(raced) if raced is not None
                 else [run.data.tags[TRIAL_ID_TAG] for run in ranked[:top_k]])
    incumbent = next((run.data.tags[TRIAL_ID_TAG] for run in ranked
                      if run.data.tags.get(INCUMBENT_TAG) == "true"), None)
    return finalists, incumbent


def final_draws_dir(sweep: SweepConfig) -> str | None:
    """Where the stage's one store of test draws lives: ``certify.final.draws_dir``, else the
    sweep's ``draws_dir``; None where the configurations denoise their own
    (``store_draws: false``, or ``compile: true``, which a store refuses)."""
    if sweep.certify.draws_dir:
        return sweep.certify.draws_dir
    if sweep.certify.compile or not sweep.store_draws:
        return None
    return sweep.draws_dir


def further_seeds(config: Mapping[str, Any], seeds: int) -> list[tuple[int, dict[str, Any]]]:
    """The ``seeds - 1`` training seeds after ``config``'s own, each with its config: the
    same but for ``train_seed`` (the certification's ``seed`` and the stored draws' keys
    stay, so every seed certifies on the same draws)."""
    own = training_seed_of(config)
    return [(own + step, {**config, "train_seed": own + step}) for step in range(1, seeds)]


def training_seed_of(config: Mapping[str, Any]) -> int:
    """The training seed of a config as plain data (``train_seed``, else ``seed``; as
    :attr:`~cadis.finetuning.config.TrainConfig.training_seed` reads it)."""
    return int(config["seed"] if config.get("train_seed") is None else config["train_seed"])


def retrain_seed(config_dict: dict[str, Any], run_name: str, storage: str,
                 cpus_per_worker: float, gpus_per_worker: float) -> str:
    """Train ``config_dict`` as the Ray Train run ``run_name`` under ``storage`` (resumed
    from its last checkpoint when it ran before); returns its last checkpoint's folder. Runs
    in a Ray task of the final stage, as a trial's Tune function runs its Train run."""
    from cadis.finetuning.config import from_mapping
    from cadis.finetuning.ray_train import build_trainer, fit_trainer

    result = fit_trainer(build_trainer(from_mapping(config_dict), run_name, Path(storage),
                                       cpus_per_worker=cpus_per_worker,
                                       gpus_per_worker=gpus_per_worker))
    if result.checkpoint is None:
        raise RuntimeError(f"{run_name}: training left no checkpoint")
    return str(result.checkpoint.path)


def build_test_draws(config_dict: dict[str, Any], draws_dir: str,
                     threads: int = 1) -> dict[str, Any]:
    """The store of test draws of ``config_dict``'s final certification under ``draws_dir``,
    built or found with ``threads`` torch threads (a Ray task holding as many CPUs): its
    folder and what it cost, as the sweep's other stores record theirs."""
    import torch

    from cadis.certify_models import build_test_store
    from cadis.finetuning.config import from_mapping

    torch.set_num_threads(threads)

    store = build_test_store(from_mapping(config_dict), draws_dir)
    info = store.info
    return {"folder": str(store.folder), "build_seconds": info.build_seconds,
            "bytes": info.bytes, "denoiser_ms_per_draw": info.denoiser_ms_per_draw,
            "classifier_ms_per_draw": info.classifier_ms_per_draw}


def _prepare_test_draws(sweep: SweepConfig, draws_dir: str | None,
                        tracker: SweepTracker) -> None:
    """Build the store of test draws (when the stage has one) before any certification, and
    say where it is; or say why the stage has none."""
    import ray

    if draws_dir is None:
        why = ("certify.final.compile is true (a store runs the classifier alone)"
               if sweep.certify.compile else "store_draws is false")
        print(f"final stage: {why}, so each configuration denoises its own test draws: its "
              f"test comparisons are paired on images, not draw for draw", flush=True)
        return
    resources = sweep.resources
    # The search has ended: the cluster is idle, and every configuration waits for this store.
    cpus = store_cpus_now(ray.nodes(), ray.available_resources(), resources.cpus_per_worker)
    build = ray.remote(build_test_draws).options(num_cpus=cpus,
                                                 num_gpus=resources.gpus_per_worker)
    info = ray.get(build.remote(sweep.base.to_dict(), draws_dir, threads=max(1, int(cpus))))
    tracker.log_stores({TEST_STORE: info})
    print(f"final stage: test draws in {info['folder']} ({info['bytes'] / 2 ** 20:.0f} MiB), "
          f"shared by every configuration and seed", flush=True)


def with_test_store(model: TrainedTrial, draws_dir: str | None) -> TrainedTrial:
    """``model`` certified from the store under ``draws_dir`` (None: as its config says)."""
    if draws_dir is None:
        return model
    config = {**model.config, "certify": {**model.config["certify"], "draws_dir": draws_dir}}
    return dataclasses.replace(model, config=config)


def _certify_dir(results: Path, trial_id: str, seed: int | None) -> Path:
    """Where a configuration's test records go: the trial's own folder for the search's
    training, the seed's folder for a retraining."""
    if seed is None:
        return trial_certify_dir(results, trial_id)
    return trial_seed_folder(results, trial_id, seed) / CERTIFY_DIR


def seed_figures(results: str | Path, trial_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The final stage's test figures of each of ``trial_ids`` per training seed, as plain
    data (what the end-of-sweep summary reports; every seed of a trial is certified on the
    same images and, with a store, the same draws, so its records pair with the other
    trials' of any seed)::

        {trial_id: {"seeds": {train_seed: {"folder": records folder,
                                           "figures": {metric: value}}},
                    "mean": {metric: mean over seeds},
                    "range": {metric: [lowest, highest]}}}

    Metrics are those of :func:`~cadis.sweeps.trial.figures_of` (``certified_accuracy_r*``,
    ``acr``, ...). Only finished certifications count; a trial without one is left out."""
    from cadis.sweeps.trial import figures_of

    figures: dict[str, dict[str, Any]] = {}
    for trial_id in trial_ids:
        folders = {}
        own = trial_certify_dir(results, trial_id)
        if (own / SUMMARY_FILENAME).is_file():
            config = TrainedTrial.read(trained_file(results, trial_id)).config
            folders[training_seed_of(config)] = own
        seeds = trial_folder(results, trial_id) / SEEDS_DIR
        for folder in sorted(seeds.iterdir()) if seeds.is_dir() else ():
            if (folder / CERTIFY_DIR / SUMMARY_FILENAME).is_file():
                folders[int(folder.name)] = folder / CERTIFY_DIR
        if not folders:
            continue
        per_seed = {seed: {"folder": str(folder), "figures": figures_of(json.loads(
            (folder / SUMMARY_FILENAME).read_text()))} for seed, folder in sorted(folders.items())}
        metrics = set.intersection(*(set(entry["figures"]) for entry in per_seed.values()))
        values = {metric: [entry["figures"][metric] for entry in per_seed.values()]
                  for metric in sorted(metrics)}
        figures[trial_id] = {
            "seeds": per_seed,
            "mean": {metric: statistics.fmean(seen) for metric, seen in values.items()},
            "range": {metric: [min(seen), max(seen)] for metric, seen in values.items()}}
    return figures
