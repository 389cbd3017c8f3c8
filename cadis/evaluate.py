"""Assemble denoised smoothing from named models and certify a test subset.

The one place that turns "these models, this sigma, this data" into a ``Smooth`` over
``classifier(denoiser(x + delta))`` and an output folder of records: `cadis certify` calls it,
and so does training when it certifies what it made.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from cadis.certification import certify_dataset
from cadis.certify import (
    Smooth,
    max_certifiable_radius,
    validate_certification_parameters,
)
from cadis.data import load_dataset, subset_indices
from cadis.denoise import DenoisedClassifier, OneShotDenoiser
from cadis.errors import CadisError
from cadis.models import load_classifier, load_denoiser
from cadis.pretrain import CLASSIFIER_DIR, DENOISER_DIR, MANIFEST
from cadis.records import RADIUS_STEPS, default_radii

DEVICES = ("auto", "cpu", "cuda")
# Noise draws per forward when none is given. On a 2-core CPU smaller batches stay in cache:
# 706 draws/s at 100 against 422 at 1000 with the default models (benchmarks/, README).
CPU_BATCH_SIZE = 100
CUDA_BATCH_SIZE = 1000
# Images larger than this are certified on the ImageNet-scale radius grid (0, 0.5, 1, ...).
CIFAR_SCALE_MAX_SIZE = 64


@dataclass(frozen=True)
class ModelSources:
    """Where the off-the-shelf pair comes from and what data it was made for."""

    classifier: str
    denoiser: str
    dataset: str
    data_root: str | None = None
    image_size: int | None = None

    @classmethod
    def resolve(cls, models: str | None = None, classifier: str | None = None,
                denoiser: str | None = None, dataset: str | None = None,
                data_root: str | None = None, image_size: int | None = None) -> ModelSources:
        """A models folder (as `cadis pretrain` writes it) gives defaults; explicit names win."""
        defaults: dict[str, Any] = {}
        if models is not None:
            folder = Path(models).expanduser()
            if not (folder / MANIFEST).is_file():
                raise CadisError(f"models directory {folder} not found or has no {MANIFEST} "
                                 "(make one with `cadis pretrain`)")
            manifest = json.loads((folder / MANIFEST).read_text())
            defaults = {"classifier": str(folder / CLASSIFIER_DIR),
                        "denoiser": str(folder / DENOISER_DIR),
                        "dataset": manifest.get("dataset"),
                        "data_root": manifest.get("config", {}).get("data_root")}
        chosen = {"classifier": classifier or defaults.get("classifier"),
                  "denoiser": denoiser or defaults.get("denoiser"),
                  "dataset": dataset or defaults.get("dataset")}
        missing = [key for key, value in chosen.items() if not value]
        if missing:
            raise CadisError(f"no {', '.join(missing)} given: pass --models DIR or "
                             f"--{' --'.join(missing)}")
        return cls(**chosen, data_root=data_root or defaults.get("data_root"),
                   image_size=image_size)


def pick_device(name: str = "auto") -> torch.device:
    if name not in DEVICES:
        raise CadisError(f"unknown device {name!r}; allowed: {', '.join(DEVICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise CadisError("device cuda requested but no CUDA device is available")
    return torch.device(name)


def default_batch_size(device: torch.device) -> int:
    return CUDA_BATCH_SIZE if device.type == "cuda" else CPU_BATCH_SIZE


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
        from cadis.finetune import load_trained

        classifier, _ = load_trained(classifier, Path(checkpoint))
    unet, scheduler = load_denoiser(sources.denoiser)
    denoiser = OneShotDenoiser(unet, scheduler, sigma)
    if channels is not None and image_size is not None:
        denoiser.check_input(channels, image_size, image_size)
        classifier.check_input(channels)
    return DenoisedClassifier(denoiser, classifier).eval().to(device)


def radius_grid(sigma: float, n: int, alpha: float, image_size: int,
                radii: Sequence[float] | None = None) -> list[float]:
    """The table's radii: given ones, else the scale's grid up to what ``n`` can certify."""
    if radii:
        if any(r < 0 for r in radii):
            raise CadisError(f"radii must be >= 0, got {list(radii)}")
        return sorted(set(float(r) for r in radii))
    scale = "cifar" if image_size <= CIFAR_SCALE_MAX_SIZE else "imagenet"
    step = RADIUS_STEPS[scale]
    reachable = math.ceil(max_certifiable_radius(sigma, n, alpha) / step) * step
    return default_radii(scale, max_radius=max(reachable, step))


def certify_models(sources: ModelSources, sigma: float, out_dir: Path, *, n: int = 10_000,
                   n0: int = 100, alpha: float = 0.001, skip: int = 1,
                   max_images: int | None = None, batch_size: int | None = None,
                   checkpoint: str | None = None, radii: Sequence[float] | None = None,
                   seed: int = 0, device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Certify every ``skip``-th test image (at most ``max_images``) into ``out_dir``.

    ``batch_size`` (noise draws per forward) defaults to what is fast on the device.

    Returns the summary (also in ``out_dir/summary.json``). Resumes an interrupted run with
    the same settings; refuses, untouched, an ``out_dir`` made with other settings.
    """
    chosen_device = pick_device(device)
    batch_size = batch_size or default_batch_size(chosen_device)
    validate_certification_parameters(n0, n, alpha, batch_size)
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
    return certify_dataset(smooth, test_set, indices, n0=n0, n=n, alpha=alpha,
                           batch_size=batch_size, out_dir=out_dir, settings=settings,
                           radii=radius_grid(sigma, n, alpha, info.image_size, radii),
                           progress=progress)
