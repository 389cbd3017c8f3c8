"""Fine-tuning as a command runs it: checked before work starts, then trained in this process
or, for several workers or a named cluster, on Ray Train (:mod:`cadis.finetuning.ray_train`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch

from cadis.data import load_dataset, stratified_holdout
from cadis.files import atomic_directory
from cadis.finetuning.checkpoint import read_metadata
from cadis.finetuning.config import TrainConfig
from cadis.finetuning.loop import build_training_draws, train_loop
from cadis.finetuning.lora import apply_finetuning
from cadis.finetuning.optimizer import parameter_groups
from cadis.models.classifier import load_classifier
from cadis.models.denoiser import load_denoiser
from cadis.models.devices import pick_device
from cadis.models.sources import ModelSources
from cadis.smoothing.denoise import OneShotDenoiser
from cadis.tracking.contract import PROXY_ACR

CHECKPOINTS_DIR = "checkpoints"
# Where `cadis train` keeps its training draws (train_draws > 0), inside its output folder.
TRAIN_DRAWS_DIR = "draws"
CHECKPOINT_PATTERN = "epoch_[0-9][0-9][0-9]"
# The metrics a local run prints after each epoch.
SHOWN_METRICS = ("epoch", "loss", "hallucination_rate", "val_denoised_accuracy", PROXY_ACR)


def preflight(config: TrainConfig) -> ModelSources:
    """Everything that can be wrong with the input, checked before any work starts: the
    models load (with drop_path where asked), LoRA finds its targets, layer_decay finds
    layers, sigma fits the denoiser's schedule, data and models
    agree in channels and size."""
    sources = config.model_sources()
    info = load_dataset(sources.dataset, "test", sources.data_root,
                        image_size=sources.image_size).info
    classifier = load_classifier(sources.classifier, drop_path=config.drop_path)
    classifier.check_input(info.channels)
    if config.method != "none":
        apply_finetuning(classifier, config.finetune_config())
        parameter_groups(classifier.model, config.layer_decay, config.weight_decay_skip_1d)
    unet, scheduler = load_denoiser(sources.denoiser)
    OneShotDenoiser(unet, scheduler, config.sigma).check_input(info.channels, info.image_size,
                                                               info.image_size)
    # The hold-out must leave every class a validation image and the training split images.
    stratified_holdout(load_dataset(sources.dataset, "train", sources.data_root,
                                    image_size=sources.image_size).labels,
                       config.val_images, config.val_seed)
    return sources


class LocalSession:
    """Runs the loop in this process; checkpoints go to ``out_dir/checkpoints/epoch_NNN``."""

    rank = 0
    world_size = 1

    def __init__(self, out_dir: Path, device: torch.device, resume: bool) -> None:
        self.checkpoints = out_dir / CHECKPOINTS_DIR
        self.device = device
        self.resume = resume

    def prepare_model(self, model):
        return model

    def prepare_loader(self, loader):
        return loader

    def report(self, metrics, checkpoint_dir):
        with atomic_directory(self.checkpoints / f"epoch_{int(metrics['epoch']):03d}") as staging:
            shutil.copytree(checkpoint_dir, staging, dirs_exist_ok=True)
        shown = {k: round(v, 4) for k, v in metrics.items() if k in SHOWN_METRICS}
        print(f"epoch {int(metrics['epoch'])}: {json.dumps(shown)}", flush=True)

    def latest_checkpoint(self) -> Path | None:
        found = sorted(self.checkpoints.glob(CHECKPOINT_PATTERN))
        return found[-1] if self.resume and found else None


def uses_ray(config: TrainConfig) -> bool:
    """Ray Train for several workers or when a cluster is named; this process otherwise."""
    return config.workers > 1 or bool(os.environ.get("RAY_ADDRESS"))


def fit(config: TrainConfig, out_dir: Path, resume: bool = False,
        progress: bool = True) -> tuple[Path, list[dict[str, float]]]:
    """Train per ``config``; returns the last checkpoint and the per-epoch metrics. With
    ``train_draws`` and no ``train_store``, the training draws are denoised first, into
    ``out_dir/draws`` (found there again by a resumed run)."""
    if config.train_draws and not config.train_store:
        store = build_training_draws(config, out_dir / TRAIN_DRAWS_DIR, pick_device(config.device),
                                     progress)
        config = dataclasses.replace(config, train_store=str(store.folder.resolve()))
    if uses_ray(config):
        from cadis.finetuning.ray_train import fit_with_ray

        checkpoint = fit_with_ray(config, out_dir, resume)
    else:
        session = LocalSession(out_dir, pick_device(config.device), resume)
        train_loop(config, session, progress)
        checkpoint = sorted(session.checkpoints.glob(CHECKPOINT_PATTERN))[-1]
    return checkpoint, read_metadata(checkpoint)["history"]
