"""One trial of a sweep: a Tune function that fine-tunes on Ray Train workers, certifies the
result in a Ray task holding one worker's resources, and reports to Tune.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from cadis.certify_models import certify_models
from cadis.finetuning.checkpoint import read_metadata
from cadis.finetuning.config import from_mapping
from cadis.finetuning.ray_train import build_trainer
from cadis.models.sources import ModelSources
from cadis.smoothing.runner import SETTINGS_FILENAME
from cadis.sweeps.layout import TRAIN_DIR, trial_certify_dir
from cadis.sweeps.schema import SweepConfig, trial_config
from cadis.tracking.contract import ACR, CLEAN_ACCURACY, certified_accuracy_metric


def run_trial(params: dict[str, Any], sweep: SweepConfig, results: str) -> None:
    """The Tune function of one trial: train on Ray Train workers, certify, report."""
    import ray
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    trial_id = tune.get_context().get_trial_id()
    config = trial_config(sweep, params)
    resources = sweep.resources
    # The run is named by the trial: a trial restarted (a retry, --resume) resumes its run.
    trainer = build_trainer(config, trial_id, Path(results) / TRAIN_DIR,
                            cpus_per_worker=resources.cpus_per_worker,
                            gpus_per_worker=resources.gpus_per_worker,
                            callbacks=[TuneReportCallback()])
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"trial {trial_id}: training left no checkpoint")
    # Outside the trial's placement group (which holds only this function's share): the
    # Train workers have given their resources back by now, as the Train run does its own.
    certify = ray.remote(certify_trial).options(
        num_cpus=resources.cpus_per_worker, num_gpus=resources.gpus_per_worker,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
    out = trial_certify_dir(results, trial_id)
    tune.report(ray.get(certify.remote(config.to_dict(), result.checkpoint, str(out))))


def certify_trial(config_dict: dict[str, Any], checkpoint: Any, out: str) -> dict[str, float]:
    """Certify a trained checkpoint with the sweep's certify: settings into ``out`` (resumed
    if a previous attempt stopped midway); returns the last epoch's metrics and the final
    ones: certified accuracy per radius, ``acr`` and ``clean_accuracy``."""
    config = from_mapping(config_dict)
    certify = config.certify
    sources = ModelSources.resolve(config.models, config.classifier, config.denoiser,
                                   config.dataset, config.data_root, config.image_size)
    with checkpoint.as_directory() as directory:
        _discard_other_certification(Path(out), directory)
        metadata = read_metadata(Path(directory))
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
