"""Shared fixtures: tiny models made locally, the way hub models are laid out."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator

import pytest
import torch

from cadis.models.classifier import load_classifier, save_classifier
from cadis.models.denoiser import save_denoiser

TINY_VIT_ARGS = {"img_size": 8, "patch_size": 4, "in_chans": 1, "embed_dim": 16, "depth": 1,
                 "num_heads": 2, "mlp_ratio": 2.0}


def make_tiny_unet(channels: int = 1, size: int = 8):
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels,
                       block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)


def make_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                         prediction_type="epsilon")


def set_flags(*items: str) -> list[str]:
    """``--set`` flags for ``key=value`` items, a later item replacing an earlier one of the
    same key (cadis refuses a key given twice): test defaults, then a test's own values."""
    chosen = {item.partition("=")[0]: item for item in items}
    return [flag for item in chosen.values() for flag in ("--set", item)]


@contextlib.contextmanager
def own_group(command: list[str], cwd, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """``command`` in a session of its own, its standard error piped (read it with
    ``communicate``); SIGKILLed with its whole group (the Ray it started) if it is still
    running when the block ends."""
    process = subprocess.Popen(command, cwd=cwd, env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory):
    torch.manual_seed(0)
    classifier = load_classifier("vit_tiny_patch16_224", num_classes=10, **TINY_VIT_ARGS)
    directory = tmp_path_factory.mktemp("classifier")
    save_classifier(classifier, directory, TINY_VIT_ARGS, mean=(0.5,), std=(0.5,))
    return directory


@pytest.fixture(scope="session")
def tiny_denoiser_dir(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("denoiser")
    save_denoiser(make_tiny_unet(), make_scheduler(), directory)
    return directory


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory, tiny_classifier_dir, tiny_denoiser_dir):
    """A models folder as `cadis pretrain` lays it out, for digits (1 x 8 x 8), untrained."""
    import json
    import shutil

    folder = tmp_path_factory.mktemp("models")
    shutil.copytree(tiny_classifier_dir, folder / "classifier")
    shutil.copytree(tiny_denoiser_dir, folder / "denoiser")
    (folder / "manifest.json").write_text(json.dumps({"dataset": "digits", "config": {}}))
    return folder
