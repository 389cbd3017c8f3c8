"""One trial of a sweep and its two certifications.

:func:`run_trial` is the Tune function: it fine-tunes on Ray Train workers which, once the
last epoch is reported, certify the model they hold on the validation hold-out (the rank
stage; :func:`trial_worker`), each worker a shard of the images (:mod:`cadis.sweeps.shards`),
and report those figures, which the searcher optimises. No process starts for the rank stage
and no model or data is loaded again: the trial costs its training and its certification.
:func:`certify_final` certifies a finalist (a shard of it) on the test set once the search
has ended (the driver calls it). The rank stage reads stored draws when the sweep made them
(:mod:`cadis.sweeps.stores`).
"""

from __future__ import annotations

import functools
import shutil
import time
from pathlib import Path
from typing import Any

from cadis.certifier import CertificationSettings, LiveDraws, StoredDraws, certify_into
from cadis.certify_models import build_denoised_classifier, certify_trained, shard_of
from cadis.data import load_dataset, stratified_holdout
from cadis.draws.certification_store import DrawStore
from cadis.draws.keys import HELD_OUT_SPLIT
from cadis.errors import CadisError, RepeatedFailure, first_line
from cadis.files import atomic_write_text
from cadis.finetuning.checkpoint import load_trained
from cadis.finetuning.config import TrainConfig, from_mapping
from cadis.finetuning.loop import TrainedModels, train_loop
from cadis.finetuning.ray_train import RaySession, build_trainer, fit_trainer
from cadis.finetuning.store_keys import held_out_store_key
from cadis.models.classifier import load_classifier
from cadis.models.devices import pick_device
from cadis.models.identity import MODEL_HASHES, model_hashes
from cadis.smoothing.bounds import CertificationParameters
from cadis.smoothing.records import RECORDS_FILENAME, SETTINGS_FILENAME, radius_grid, read_settings
from cadis.smoothing.denoise import DenoisedClassifier
from cadis.smoothing.sequential import SequentialPlan, reachable_radii
from cadis.smoothing.smooth import Smooth, default_batch_size
from cadis.sweeps.layout import (
    TRAIN_DIR,
    TrainedTrial,
    trained_file,
    trial_failure_file,
    trial_rank_dir,
)
from cadis.sweeps.search_space import trial_config
from cadis.sweeps.spec import RankSettings, SweepConfig
from cadis.sweeps.shards import join_shards, shard_dirs
from cadis.tracking.contract import (
    ACR,
    CLEAN_ACCURACY,
    MEAN_DRAWS,
    NUM_IMAGES,
    RANK_SECONDS,
    REPORTED,
    certified_accuracy_metric,
    validation_metric,
)


def run_trial(params: dict[str, Any], sweep: SweepConfig, results: str,
              stores: dict[str, str | None]) -> None:
    """The Tune function of one trial: train on Ray Train workers, which then certify on the
    validation hold-out and report (:func:`trial_worker`). ``stores`` names the sweep's stored
    draws (``proxy``, ``rank``, ``train``; None: the trial denoises its own)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    failure = trial_failure_file(results, trial_id)
    if failure.is_file():
        # Tune retries a failed trial (and --resume an errored one); this failure would only
        # repeat, so the retry ends at once with its reason, training nothing.
        raise RepeatedFailure(failure.read_text().strip())
    config = trial_config(sweep, params)
    config.proxy_store = stores.get("proxy")
    config.train_store = stores.get("train")
    resources = sweep.resources
    # The run is named by the trial: a trial restarted (a retry, --resume) resumes its run.
    worker = functools.partial(trial_worker, rank=sweep.rank, store=stores.get("rank"),
                               out=str(trial_rank_dir(results, trial_id)),
                               trained_to=str(trained_file(results, trial_id)))
    trainer = build_trainer(config, trial_id, Path(results) / TRAIN_DIR,
                            cpus_per_worker=resources.cpus_per_worker,
                            gpus_per_worker=resources.gpus_per_worker,
                            callbacks=[TuneReportCallback()], worker=worker)
    try:
        fit_trainer(trainer)
    except CadisError as error:
        failure.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(failure, f"{type(error).__name__}: {first_line(error)}\n")
        raise


def trial_worker(config_dict: dict[str, Any], *, rank: RankSettings, store: str | None,
                 out: str, trained_to: str) -> None:
    """``train_loop_per_worker`` of a sweep trial: the loop, then the rank stage on the model
    the worker holds (the last checkpoint's weights), each of the run's workers certifying
    its shard of the images, and one result with the last epoch's metrics and the rank
    stage's figures (what the searcher optimises and ASHA reads). Before that result, rank 0
    writes what the final stage needs of the trial (``trained_to``): Tune may stop the trial
    at that result, its last. A run resumed after its last epoch trains nothing and resumes
    the certification."""
    config = from_mapping(config_dict)
    session = RaySession()
    trained = train_loop(config, session)
    # Rank 0 reported the checkpoint (or resumed from it); the records name it in every part.
    checkpoint = str(session.gather(session.latest_checkpoint())[0])
    if session.rank == 0:
        discard_other_certification(Path(out), checkpoint)
    session.gather(None)  # no part starts before records of another model are gone
    parts = session.world_size
    started = time.perf_counter()
    summary = certify_rank(config_dict, rank, checkpoint, store,
                           str(shard_dirs(out, parts)[session.rank]),
                           None if parts == 1 else (session.rank, parts), trained)
    summaries = session.gather(summary)
    seconds = time.perf_counter() - started
    if session.rank != 0:
        session.report({}, None)
        return
    TrainedTrial(checkpoint, config_dict).write(Path(trained_to))
    figures = {validation_metric(name): value
               for name, value in figures_of(join_shards(out, summaries)).items()}
    session.report({**trained.history[-1], **figures, RANK_SECONDS: seconds,
                    REPORTED: time.time()}, None)


def validation_indices(config: TrainConfig, train_set: Any, count: int) -> list[int]:
    """The first ``count`` images of the trial's validation hold-out (training split indices)."""
    return stratified_holdout(train_set.labels, config.val_images, config.val_seed)[1][:count]


def certify_rank(config_dict: dict[str, Any], rank: RankSettings, checkpoint: str,
                 store: str | None, out: str, shard: tuple[int, int] | None = None,
                 trained: TrainedModels | None = None) -> dict[str, Any]:
    """The rank stage's certification: block 0 of the validation hold-out, its first
    ``rank.images`` images (:func:`certify_block`)."""
    return certify_block(config_dict, rank, checkpoint, store, (0, rank.images), out, shard,
                         trained)


def certify_block(config_dict: dict[str, Any], rank: RankSettings, checkpoint: str,
                  store: str | None, bounds: tuple[int, int], out: str,
                  shard: tuple[int, int] | None = None,
                  trained: TrainedModels | None = None) -> dict[str, Any]:
    """Certify a trained checkpoint on the validation images at positions ``bounds`` (start,
    stop) of the hold-out (their ``shard``: the k-th of K parts,
    :func:`~cadis.certify_models.shard_of`) into ``out`` (resumed if a previous attempt
    stopped midway), from the stored draws in ``store`` when given (keyed by the block's
    images; the classifier alone runs; the same counts as denoising them here), sequentially
    when ``rank.sequential`` (the grid radii n can reach, and the objective's). The rank stage
    is the block ``(0, rank.images)``, the racing stage's blocks those after it: every
    validation image is certified with the same n, n0, alpha, plan and radii. ``trained``:
    the checkpoint's models already in memory (a trial's own worker), else loaded from it.
    Returns the summary."""
    config = from_mapping(config_dict)
    sources = config.model_sources()
    device = pick_device(config.device)
    parameters = CertificationParameters(rank.n0, rank.n, rank.alpha,
                                         rank.batch_size or default_batch_size(device))
    train_set = load_dataset(sources.dataset, "train", sources.data_root,
                             image_size=sources.image_size)
    start, stop = bounds
    block = validation_indices(config, train_set, stop)[start:stop]
    info = train_set.info
    discard_other_certification(Path(out), checkpoint)
    settings = {"classifier": sources.classifier, "denoiser": sources.denoiser,
                "checkpoint": checkpoint, "dataset": sources.dataset,
                "split": "validation", "seed": config.seed, "stored_draws": store,
                MODEL_HASHES: model_hashes(sources)}
    radii = radius_grid(config.sigma, rank.n, rank.alpha, info.image_size)
    plan = None
    if rank.sequential:
        decided = reachable_radii(radii, config.sigma, rank.alpha, rank.n)
        plan = SequentialPlan(sorted(set(decided) | set(rank.radii)), config.sigma, rank.alpha,
                              rank.n)
    if store is not None:
        classifier = trained.classifier if trained is not None else \
            load_trained(load_classifier(sources.classifier), Path(checkpoint))[0]
        draws: LiveDraws | StoredDraws = StoredDraws(
            DrawStore.open(store, held_out_store_key(config, sources, block, rank.n0, rank.n,
                                                     device)),
            classifier.eval().to(device), device)
    else:
        base = DenoisedClassifier(trained.denoiser, trained.classifier).eval().to(device) \
            if trained is not None else build_denoised_classifier(
                sources, config.sigma, checkpoint, device, channels=info.channels,
                image_size=info.image_size)
        draws = LiveDraws(Smooth(base, info.num_classes, config.sigma), train_set, config.seed,
                          HELD_OUT_SPLIT)
    return certify_into(draws, shard_of(block, shard),
                        CertificationSettings(config.sigma, parameters, tuple(radii), plan),
                        out, settings, progress=False)


def certify_final(config_dict: dict[str, Any], checkpoint: str, out: str,
                  shard: tuple[int, int] | None = None) -> dict[str, Any]:
    """Certify a finalist's checkpoint on the test set (its ``shard`` of the images) with the
    sweep's final settings into ``out`` (resumed if a previous attempt stopped midway);
    returns the summary."""
    discard_other_certification(Path(out), checkpoint)
    return certify_trained(from_mapping(config_dict), Path(out), checkpoint, shard,
                           progress=False)


def figures_of(summary: dict[str, Any]) -> dict[str, float]:
    """A certification's figures as metrics: certified accuracy per radius, ``acr``,
    ``clean_accuracy``, the mean draws an image and the number of images."""
    accuracy = {certified_accuracy_metric(float(radius)): value
                for radius, value in summary["certified_accuracy"].items()}
    return {**accuracy, ACR: summary["acr"],
            CLEAN_ACCURACY: accuracy[certified_accuracy_metric(0.0)],
            MEAN_DRAWS: summary["mean_draws"], NUM_IMAGES: summary["num_images"]}


def discard_other_certification(out: Path, checkpoint: str) -> None:
    """A trial retrained after an interruption has a new checkpoint: records certified from
    the old one are not this model's, and the record folder would (rightly) refuse it."""
    if (out / SETTINGS_FILENAME).is_file() and \
            read_settings(out / RECORDS_FILENAME).get("checkpoint") != checkpoint:
        shutil.rmtree(out)
