"""What stored draws depend on, for every role, and the folder a store of them lives in.

A store is named by a digest of its key, so that draws made with other settings build beside
it, and a store is opened only with the key it was made with. The batch size is not in any
key: it only orders the forwards (a certification store records it).

The roles: ``rank`` (a sweep's rank stage) and ``proxy`` (the per-epoch proxy) certify images
held out of the training split, ``test`` certifies test images (``cadis certify
--draws-dir``), ``train`` holds the training images' draws.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch

from cadis.draws.folder import STORE_DTYPE
from cadis.smoothing.precision import FP32, resolve_precision
from cadis.smoothing.records import NOISE_PER_IMAGE

RANK_ROLE: Final = "rank"
PROXY_ROLE: Final = "proxy"
TEST_ROLE: Final = "test"
TRAIN_ROLE: Final = "train"
TRAIN_SPLIT: Final = "train"
TEST_SPLIT: Final = "test"
#: The split the held-out images (rank stage, proxy) are taken from.
HELD_OUT_SPLIT: Final = TRAIN_SPLIT
# Digits of the key's digest in a store's folder name.
DIGEST_CHARS: Final = 12


def certification_key(*, dataset: str, split: str, indices: Sequence[int], denoiser: str,
                      sigma: float, n0: int, n: int, seed: int,
                      precision: str = FP32.name) -> dict[str, Any]:
    """Everything the draws of a seeded CERTIFY run depend on: data set, split, which images,
    denoiser, sigma, draws, seed and noise scheme (each image's own noise,
    :func:`~cadis.smoothing.image_noise.image_noise`, named by split and index), and the
    precision the denoiser ran in."""
    return {"dataset": dataset, "split": split, "indices": [int(i) for i in indices],
            "denoiser": str(denoiser), "sigma": float(sigma), "n0": int(n0), "n": int(n),
            "seed": int(seed), "noise": NOISE_PER_IMAGE, "precision": precision,
            "dtype": np.dtype(STORE_DTYPE).name}


def held_out_key(*, dataset: str, indices: Sequence[int], denoiser: str, sigma: float,
                 n0: int, n: int, seed: int, device: torch.device) -> dict[str, Any]:
    """:func:`certification_key` of the rank stage's and the proxy's draws: images held out
    of the training split, denoised in the ``auto`` precision of ``device`` (what both
    certify in)."""
    return certification_key(dataset=dataset, split=HELD_OUT_SPLIT, indices=indices,
                             denoiser=denoiser, sigma=sigma, n0=n0, n=n, seed=seed,
                             precision=resolve_precision("auto", device).name)


def training_key(*, dataset: str, indices: Sequence[int], denoiser: str, sigma: float,
                 draws: int, seed: int, precision: str) -> dict[str, Any]:
    """Everything the training draws depend on: data set, which training images (in order),
    denoiser, sigma, draws per image, seed and the precision the denoiser ran in (a name of
    :data:`~cadis.smoothing.precision.PRECISIONS`)."""
    return {"dataset": dataset, "split": TRAIN_SPLIT, "indices": [int(i) for i in indices],
            "denoiser": str(denoiser), "sigma": float(sigma), "draws": int(draws),
            "seed": int(seed), "precision": precision, "dtype": np.dtype(STORE_DTYPE).name}


def store_folder(root: str | Path, role: str, key: Mapping[str, Any]) -> Path:
    """``root/ROLE-DIGEST``: the folder a store of ``key`` lives in."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return Path(root) / f"{role}-{digest[:DIGEST_CHARS]}"
