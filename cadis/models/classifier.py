"""The off-the-shelf classifier: a timm model behind an input adapter.

It loads through one code path whatever its source: a timm architecture name (optionally
``pretrained``), a Hugging Face hub id (``hf-hub:org/name``) or a local directory in the hub's
layout, which is exactly what ``cadis pretrain`` writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from cadis.errors import CadisError, first_line

CLASSIFIER_WEIGHTS = "model.safetensors"
TIMM_CONFIG = "config.json"
# Normalisation used when a model's config does not state one (our own models train with it).
DEFAULT_MEAN_STD = (0.5, 0.5)


class Classifier(nn.Module):
    """Maps images in [0, 1] (any size, 1 or 3 channels) to logits of a timm model.

    The input adapter repeats a grey channel when the model wants three, resizes to the model's
    input size and applies the model's own normalisation, so the smoothing layer and the
    denoiser can always work in [0, 1] image space.
    """

    def __init__(self, model: nn.Module, input_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.model = model
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        self.in_chans = _input_channels(model, cfg)
        self.input_size = input_size or _input_size(model, cfg)
        mean = _per_channel(cfg.get("mean", DEFAULT_MEAN_STD[0]), self.in_chans)
        std = _per_channel(cfg.get("std", DEFAULT_MEAN_STD[1]), self.in_chans)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)

    def check_input(self, channels: int) -> None:
        """Raise :class:`CadisError` when images with ``channels`` cannot be fed to the model."""
        if channels != self.in_chans and not (channels == 1 and self.in_chans == 3):
            raise CadisError(f"the classifier takes {self.in_chans}-channel images, the data has "
                             f"{channels}; allowed: {self.in_chans} (or 1 when it takes 3)")

    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> the model's input: channels, size and normalisation."""
        if images.shape[1] == 1 and self.in_chans == 3:
            images = images.expand(-1, 3, -1, -1)
        if tuple(images.shape[-2:]) != self.input_size:
            images = F.interpolate(images, size=self.input_size, mode="bilinear",
                                   align_corners=False, antialias=True)
        return (images - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.adapt(images))


def _input_channels(model: nn.Module, cfg: dict[str, Any]) -> int:
    # The first convolution is the truth; the config keeps the architecture's RGB default
    # when a model is made with another in_chans.
    try:
        return int(model.get_submodule(cfg["first_conv"]).in_channels)
    except (KeyError, AttributeError):
        return int(cfg.get("input_size", (3,))[0])


def _input_size(model: nn.Module, cfg: dict[str, Any]) -> tuple[int, int]:
    patch_embed = getattr(model, "patch_embed", None)
    if getattr(patch_embed, "img_size", None) is not None:
        return tuple(int(v) for v in patch_embed.img_size)  # fixed-size models (ViTs)
    _, height, width = cfg.get("input_size", (3, 224, 224))
    return int(height), int(width)


def _per_channel(value: Any, channels: int) -> list[float]:
    values = [float(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    if len(values) == channels:
        return values
    # timm keeps an RGB mean/std when a model is made with in_chans=1: use their average.
    return [sum(values) / len(values)] * channels


def classifier_source(name: str) -> str:
    """Resolve a user's classifier name to what ``timm.create_model`` takes.

    An existing directory becomes ``local-dir:PATH``; ``hf-hub:`` ids and timm architecture
    names pass through. Anything else raises :class:`CadisError`.
    """
    import timm

    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / TIMM_CONFIG).is_file():
            raise CadisError(f"classifier directory {path} has no {TIMM_CONFIG} (expected a timm "
                             "checkpoint as written by `cadis pretrain` or timm's save_for_hf)")
        return f"local-dir:{path.resolve()}"
    if name.startswith(("hf-hub:", "local-dir:")):
        return name
    if "/" in name or name.startswith(("." , "~")):
        raise CadisError(f"classifier path {name} does not exist")
    if not timm.is_model(name.split(".")[0]):
        raise CadisError(f"unknown classifier {name!r}: allowed are timm architecture names "
                         "(timm.list_models()), hf-hub:ORG/NAME ids and local checkpoint folders")
    return name


def load_classifier(name: str, num_classes: int | None = None, pretrained: bool = False,
                    drop_path: float = 0.0, **model_args: Any) -> Classifier:
    """Create or load a timm classifier behind the input adapter.

    ``name`` is a timm architecture (``pretrained`` fetches its weights from the hub), an
    ``hf-hub:`` id or a local checkpoint folder (weights always loaded). ``num_classes`` resets
    the head when it differs from the checkpoint's; ``model_args`` go to the architecture
    (``img_size``, ``patch_size``, ``in_chans``, ``depth`` ...). ``drop_path`` > 0: stochastic
    depth at that rate (timm's ``drop_path_rate``, active in train mode only); a model that
    does not take it, or takes it and builds no drop-path layer of a rate > 0 (a one-block
    ViT: timm's rates rise from 0 at the first block), is a :class:`CadisError` naming
    ``drop_path``, not a setting silently ignored.
    """
    import timm

    source = classifier_source(name)
    from_checkpoint = source.startswith(("hf-hub:", "local-dir:"))
    kwargs = dict(model_args)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if drop_path:
        kwargs["drop_path_rate"] = drop_path
    try:
        model = timm.create_model(source, pretrained=pretrained or from_checkpoint, **kwargs)
    except TypeError as error:
        if drop_path and "drop_path_rate" in str(error):
            raise CadisError(f"drop_path {drop_path}: classifier {name!r} takes no drop-path "
                             "rate; set drop_path: 0") from None
        raise CadisError(f"classifier {name!r} cannot be built with {kwargs}: "
                         f"{first_line(error)}") from None
    except (AssertionError, ValueError) as error:
        raise CadisError(f"classifier {name!r} cannot be built with {kwargs}: "
                         f"{first_line(error)}") from None
    except (OSError, RuntimeError) as error:
        raise CadisError(f"classifier {name!r} could not be loaded: {first_line(error)}") from None
    _check_patch_grid(name, model)
    if drop_path:
        _check_drop_path(name, model, drop_path)
    return Classifier(model)


def _check_drop_path(name: str, model: nn.Module, drop_path: float) -> None:
    from timm.layers import DropPath

    if not any(isinstance(module, DropPath) and module.drop_prob > 0
               for module in model.modules()):
        raise CadisError(f"drop_path {drop_path}: classifier {name!r} has no drop-path layer "
                         "it applies to (a one-block ViT drops nothing: its rates start at 0); "
                         "set drop_path: 0")


def _check_patch_grid(name: str, model: nn.Module) -> None:
    # timm's patch embedding silently drops the pixels of a partial last patch.
    patch_embed = getattr(model, "patch_embed", None)
    image_size = getattr(patch_embed, "img_size", None)
    patch_size = getattr(patch_embed, "patch_size", None)
    if image_size is None or patch_size is None:
        return
    if any(size % patch for size, patch in zip(image_size, patch_size)):
        raise CadisError(f"classifier {name!r} cannot take {image_size[0]}x{image_size[1]} "
                         f"images with patch size {patch_size[0]}: allowed are image sizes "
                         f"that are multiples of the patch size")


def save_classifier(classifier: Classifier, directory: Path, model_args: dict[str, Any],
                    mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    """Write a classifier in the hub's layout (config.json + model.safetensors) so that
    :func:`load_classifier` reads it back exactly as it reads hub models."""
    from timm.models import save_for_hf

    model = classifier.model
    data_config = {"input_size": (classifier.in_chans, *classifier.input_size),
                   "mean": tuple(mean), "std": tuple(std), "crop_pct": 1.0,
                   "interpolation": "bilinear"}
    save_for_hf(model, str(directory), model_args=model_args, safe_serialization=True,
                data_config=data_config)


def count_parameters(module: nn.Module) -> int:
    """The number of parameter elements of ``module``."""
    return sum(p.numel() for p in module.parameters())
