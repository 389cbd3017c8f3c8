"""One trial of a sweep and its two certifications.

:func:`run_trial` is the Tune function: it fine-tunes on Ray Train workers, then certifies the
result on the validation hold-out (the rank stage) in one Ray task per worker, each holding a
worker's resources and certifying a shard of the images (:mod:`cadis.sweeps.shards`), and
reports those figures, which the searcher optimises. :func:`certify_final` certifies a
finalist (a shard of it) on the test set once the search has ended (the driver calls it).
The rank stage reads stored draws when the sweep made them (:mod:`cadis.sweeps.stores`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from cadis.certifier import CertificationSettings, LiveDraws, StoredDraws, certify_into
from cadis.certify_models import build_denoised_classifier, certify_trained, shard_of
from cadis.data import load_dataset, stratified_holdout
from cadis.draws.certification_store import DrawStore
from cadis.draws.keys import HELD_OUT_SPLIT
from cadis.errors import CadisError, RepeatedFailure, first_line
from cadis.files import atomic_write_text
from cadis.finetuning.checkpoint import load_trained, read_metadata
from cadis.finetuning.config import TrainConfig, from_mapping
from cadis.finetuning.ray_train import build_trainer, fit_trainer
from cadis.finetuning.store_keys import held_out_store_key
from cadis.models.classifier import load_classifier
from cadis.models.devices import pick_device
from cadis.smoothing.bounds import CertificationParameters
from cadis.smoothing.records import RECORDS_FILENAME, SETTINGS_FILENAME, radius_grid, read_settings
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
from cadis.sweeps.shards import certify_in_shards
from cadis.tracking.contract import (
    ACR,
    CLEAN_ACCURACY,
    MEAN_DRAWS,
    NUM_IMAGES,
    certified_accuracy_metric,
    validation_metric,
)


def run_trial(params: dict[str, Any], sweep: SweepConfig, results: str,
              stores: dict[str, str | None]) -> None:
    """The Tune function of one trial: train on Ray Train workers, certify on the validation
    hold-out, report. ``stores`` names the sweep's stored draws (``proxy``, ``rank``,
    ``train``; None: the trial denoises its own)."""
    import ray
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

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
    trainer = build_trainer(config, trial_id, Path(results) / TRAIN_DIR,
                            cpus_per_worker=resources.cpus_per_worker,
                            gpus_per_worker=resources.gpus_per_worker,
                            callbacks=[TuneReportCallback()])
    try:
        result = fit_trainer(trainer)
    except CadisError as error:
        failure.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(failure, f"{type(error).__name__}: {first_line(error)}\n")
        raise
    if result.checkpoint is None:
        raise RuntimeError(f"trial {trial_id}: training left no checkpoint")
    checkpoint = str(result.checkpoint.path)
    # What the final stage needs of this trial, should it be a finalist.
    TrainedTrial(checkpoint, config.to_dict()).write(trained_file(results, trial_id))
    # Outside the trial's placement group (which holds only this function's share): the
    # Train workers have given their resources back by now, as the Train run does its own,
    # and each certifies a shard of the images in their place.
    certify = ray.remote(certify_rank).options(
        num_cpus=resources.cpus_per_worker, num_gpus=resources.gpus_per_worker,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
    out = trial_rank_dir(results, trial_id)
    discard_other_certification(out, checkpoint)
    summary = certify_in_shards(certify, (config.to_dict(), sweep.rank, checkpoint,
                                          stores.get("rank")),
                                out, resources.workers_per_trial)
    figures = {validation_metric(name): value for name, value in figures_of(summary).items()}
    tune.report({**read_metadata(Path(checkpoint))["metrics"], **figures})


def validation_indices(config: TrainConfig, train_set: Any, count: int) -> list[int]:
    """The first ``count`` images of the trial's validation hold-out (training split indices)."""
    return stratified_holdout(train_set.labels, config.val_images, config.val_seed)[1][:count]


def certify_rank(config_dict: dict[str, Any], rank: RankSettings, checkpoint: str,
                 store: str | None, out: str,
                 shard: tuple[int, int] | None = None) -> dict[str, Any]:
    """The rank stage's certification: block 0 of the validation hold-out, its first
    ``rank.images`` images (:func:`certify_block`)."""
    return certify_block(config_dict, rank, checkpoint, store, (0, rank.images), out, shard)


def certify_block(config_dict: dict[str, Any], rank: RankSettings, checkpoint: str,
                  store: str | None, bounds: tuple[int, int], out: str,
                  shard: tuple[int, int] | None = None) -> dict[str, Any]:
    """Certify a trained checkpoint on the validation images at positions ``bounds`` (start,
    stop) of the hold-out (their ``shard``: the k-th of K parts,
    :func:`~cadis.certify_models.shard_of`) into ``out`` (resumed if a previous attempt
    stopped midway), from the stored draws in ``store`` when given (keyed by the block's
    images; the classifier alone runs; the same counts as denoising them here), sequentially
    when ``rank.sequential`` (the grid radii n can reach, and the objective's). The rank stage
    is the block ``(0, rank.images)``, the racing stage's blocks those after it: every
    validation image is certified with the same n, n0, alpha, plan and radii. Returns the
    summary."""
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
                "split": "validation", "seed": config.seed, "stored_draws": store}
    radii = radius_grid(config.sigma, rank.n, rank.alpha, info.image_size)
    plan = None
    if rank.sequential:
        decided = reachable_radii(radii, config.sigma, rank.alpha, rank.n)
        plan = SequentialPlan(sorted(set(decided) | set(rank.radii)), config.sigma, rank.alpha,
                              rank.n)
    if store is not None:
        classifier, _ = load_trained(load_classifier(sources.classifier), Path(checkpoint))
        draws: LiveDraws | StoredDraws = StoredDraws(
            DrawStore.open(store, held_out_store_key(config, sources, block, rank.n0, rank.n,
                                                     device)),
            classifier.eval().to(device), device)
    else:
        base = build_denoised_classifier(sources, config.sigma, checkpoint, device,
                                         channels=info.channels, image_size=info.image_size)
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
