"""Denoised smoothing assembled from named models, certified on a test subset.

The one place that turns "these models (and perhaps a fine-tuned checkpoint), this sigma,
this data" into a ``Smooth`` over ``classifier(denoiser(x + delta))`` and an output folder of
records: `cadis certify` calls it, and so do `cadis train` and every sweep trial when they
certify what they made. (The per-epoch proxy of training certifies its own model in memory.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from cadis.data import load_dataset, subset_indices
from cadis.finetuning.checkpoint import load_trained
from cadis.models.classifier import load_classifier
from cadis.models.denoiser import load_denoiser
from cadis.models.devices import pick_device
from cadis.models.sources import ModelSources
from cadis.smoothing.bounds import CertificationParameters
from cadis.smoothing.denoise import DenoisedClassifier, OneShotDenoiser
from cadis.smoothing.records import radius_grid
from cadis.smoothing.runner import certify_dataset
from cadis.smoothing.sequential import SequentialPlan
from cadis.smoothing.smooth import Smooth, default_batch_size


def build_denoised_classifier(sources: ModelSources, sigma: float,
                              checkpoint: str | None = None,
                              device: torch.device = torch.device("cpu"),
                              channels: int | None = None,
                              image_size: int | None = None) -> DenoisedClassifier:
    """``classifier ∘ one-shot denoiser`` at ``sigma``, in eval mode on ``device``.

    ``checkpoint`` is a fine-tuned classifier folder (`cadis train` output) applied on top of
    the off-the-shelf classifier. ``channels``/``image_size`` of the data are checked against
    both models, so a mismatch is a one-line error rather than a shape error mid-run.
    """
    classifier = load_classifier(sources.classifier)
    if checkpoint is not None:
        classifier, _ = load_trained(classifier, Path(checkpoint))
    unet, scheduler = load_denoiser(sources.denoiser)
    denoiser = OneShotDenoiser(unet, scheduler, sigma)
    if channels is not None and image_size is not None:
        denoiser.check_input(channels, image_size, image_size)
        classifier.check_input(channels)
    return DenoisedClassifier(denoiser, classifier).eval().to(device)


def certify_models(sources: ModelSources, sigma: float, out_dir: Path, *, n: int = 10_000,
                   n0: int = 100, alpha: float = 0.001, skip: int = 1,
                   max_images: int | None = None, batch_size: int | None = None,
                   checkpoint: str | None = None, radii: Sequence[float] | None = None,
                   seed: int = 0, device: str = "auto", sequential: bool = False,
                   progress: bool = True) -> dict[str, Any]:
    """Certify every ``skip``-th test image (at most ``max_images``) into ``out_dir``.

    ``batch_size`` (noise draws per forward) defaults to what is fast on the device. With
    ``sequential``, each image is certified at ``radii`` (required) by the sequential test of
    :mod:`cadis.smoothing.sequential`, ``n`` being the most estimation draws an image may spend.

    Returns the summary (also in ``out_dir/summary.json``). Resumes an interrupted run with
    the same settings; refuses, untouched, an ``out_dir`` made with other settings.
    """
    chosen_device = pick_device(device)
    parameters = CertificationParameters(n0, n, alpha,
                                         batch_size or default_batch_size(chosen_device))
    plan = SequentialPlan(radii or (), sigma, alpha, n) if sequential else None
    test_set = load_dataset(sources.dataset, "test", sources.data_root,
                            image_size=sources.image_size)
    info = test_set.info
    indices = subset_indices(len(test_set), skip, max_images)
    base = build_denoised_classifier(sources, sigma, checkpoint, chosen_device,
                                     channels=info.channels, image_size=info.image_size)
    generator = torch.Generator(device=chosen_device).manual_seed(seed)
    smooth = Smooth(base, info.num_classes, sigma, generator=generator)
    settings = {"classifier": sources.classifier, "denoiser": sources.denoiser,
                "checkpoint": checkpoint, "dataset": sources.dataset, "seed": seed,
                "denoiser_timestep": base.denoiser.timestep}
    return certify_dataset(smooth, test_set, indices, parameters, out_dir=out_dir,
                           settings=settings,
                           radii=radius_grid(sigma, n, alpha, info.image_size, radii),
                           progress=progress, plan=plan)
