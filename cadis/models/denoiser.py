"""The off-the-shelf denoiser: a diffusers DDPM (``UNet2DModel`` + its scheduler).

It loads by hub id (``org/name``) or from a local pipeline folder, which is what
``cadis pretrain`` writes; diffusers is imported only when a denoiser is loaded or saved.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from cadis.errors import CadisError, first_line

DENOISER_INDEX = "model_index.json"


def load_denoiser(name: str):
    """Load a diffusers DDPM (``UNet2DModel`` + its scheduler) by hub id or local directory.

    Returns ``(unet, scheduler)``. The UNet is put in eval mode with gradients off: the
    denoiser is never differentiated.
    """
    from diffusers import DDPMPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # a bar for loading two components is noise
    path = Path(name).expanduser()
    looks_local = path.exists() or name.startswith(("/", ".", "~"))
    if looks_local and not (path / DENOISER_INDEX).is_file():
        raise CadisError(f"denoiser directory {path} not found or has no {DENOISER_INDEX} "
                         "(expected a diffusers DDPM pipeline folder)")
    try:
        pipeline = DDPMPipeline.from_pretrained(str(path) if looks_local else name)
    except (OSError, ValueError, EnvironmentError) as error:
        raise CadisError(f"denoiser {name!r} could not be loaded: {first_line(error)}") from None
    unet = pipeline.unet.eval().requires_grad_(False)
    return unet, pipeline.scheduler


def save_denoiser(unet: nn.Module, scheduler, directory: Path) -> None:
    """Write a DDPM in diffusers' pipeline layout (safetensors), as the hub stores them."""
    from diffusers import DDPMPipeline

    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(directory),
                                                                 safe_serialization=True)
