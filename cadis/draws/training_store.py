"""The training store: ``train_draws`` (K) denoised draws ``D(x + delta)`` per training image,
computed once and shared by every trial and worker that trains on the same images.

Without a store, every micro-step draws ``num_noises`` (M) fresh noises per image and pays the
frozen denoiser for them. With one, the denoiser has run once per (data set, images,
denoiser, sigma, K, seed) and each micro-step samples M of the image's K stored draws, without
replacement and afresh at every visit. What changes for training: an image visited more than
K / M times sees some draws again (with fresh noise it never would), so the draws are an
approximation of the live recipe whose cost is measured, not assumed (docs/performance.md).

The draws are the denoiser's [-1, 1] output stored in float32, computed as the loop computes
them (:meth:`~cadis.smoothing.denoise.OneShotDenoiser.denoise` in the key's precision, the one
training and certification run the denoiser in), so a stored draw is a draw the live loop
could have made. The folder is laid out as every store's (:mod:`cadis.draws.folder`), with
``denoised.npy`` of N x K x C x H x W; a folder of other settings is refused.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from cadis.draws.folder import STORE_ARRAY, STORE_DTYPE, build_once, read_store_meta
from cadis.errors import CadisError
from cadis.progress import progress_bar
from cadis.smoothing.denoise import OneShotDenoiser
from cadis.smoothing.precision import PRECISIONS, autocast

# Images denoised per forward while building (times K draws each).
BUILD_IMAGES_PER_FORWARD: Final = 32


def train_store_bytes(num_images: int, draws: int, image_shape: Sequence[int]) -> int:
    """The size of a training store's array."""
    return num_images * draws * int(np.prod(image_shape)) * np.dtype(STORE_DTYPE).itemsize


class TrainDrawStore(Dataset):
    """The K stored denoised draws of each training image, by position in the key's indices.

    Item ``p`` is ``(draws, label)``: the K x C x H x W draws of image ``indices[p]`` (in the
    denoiser's [-1, 1] space) and its label, so a DataLoader over the store batches them as it
    would batch the images.
    """

    def __init__(self, folder: str | Path, key: Mapping[str, Any]) -> None:
        self.folder = Path(folder)
        meta = read_store_meta(self.folder, key)
        self.labels: list[int] = meta["labels"]
        self.build_seconds: float = meta["build_seconds"]
        self.bytes: int = meta["bytes"]
        self.denoiser_ms_per_draw: float = meta["denoiser_ms_per_draw"]
        self._draws = np.load(self.folder / STORE_ARRAY, mmap_mode="r", allow_pickle=False)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, position: int) -> tuple[Tensor, int]:
        return torch.from_numpy(np.array(self._draws[position])), self.labels[position]


def sample_draws(stored: Tensor, num_noises: int) -> Tensor:
    """M of the K stored draws of each image, without replacement, from torch's global
    generator (seeded per worker as the live noise is): ``[B, K, C, H, W]`` ->
    ``[B * M, C, H, W]``, image-major (draw j of image i is row ``i * M + j``) as the live
    draws are laid out."""
    images, stored_draws = stored.shape[:2]
    if num_noises > stored_draws:
        raise CadisError(f"num_noises ({num_noises}) exceeds the {stored_draws} stored draws "
                         "per image (train_draws)")
    chosen = torch.rand(images, stored_draws).argsort(dim=1)[:, :num_noises]
    picked = stored[torch.arange(images).unsqueeze(1), chosen.to(stored.device)]
    return picked.reshape(images * num_noises, *stored.shape[2:])


def build_train_store(folder: str | Path, key: Mapping[str, Any], denoiser: OneShotDenoiser,
                      dataset: Dataset, progress: bool = True) -> TrainDrawStore:
    """Denoise ``key["draws"]`` seeded draws of each of the key's training images (items of
    ``dataset``, un-augmented) into ``folder`` (:func:`~cadis.draws.folder.build_once`:
    locked, whole or not at all) on the denoiser's device in the key's precision, or open the
    store already there. Raises :class:`CadisError` before any work when it would not fit on
    the disk (with the size it needs), or when ``folder`` holds a store of other settings."""
    folder = Path(folder)
    first, _ = dataset[key["indices"][0]]
    size = train_store_bytes(len(key["indices"]), int(key["draws"]), first.shape)
    build_once(folder, key, size, lambda staging: _denoise(
        staging, key, size, tuple(first.shape), denoiser, dataset, progress))
    return TrainDrawStore(folder, key)


def _denoise(staging: Path, key: Mapping[str, Any], size: int, shape: tuple[int, ...],
             denoiser: OneShotDenoiser, dataset: Dataset, progress: bool) -> dict[str, Any]:
    """:func:`build_train_store`'s denoising (``size`` bytes) into ``staging``; what the
    store records of itself."""
    indices, draws = key["indices"], int(key["draws"])
    device = next(denoiser.parameters()).device
    generator = torch.Generator(device=device).manual_seed(int(key["seed"]))
    sigma = float(key["sigma"])
    precision = PRECISIONS[key["precision"]]
    labels: list[int] = []
    started = time.perf_counter()
    denoiser_seconds = 0.0
    array = np.lib.format.open_memmap(staging / STORE_ARRAY, mode="w+", dtype=STORE_DTYPE,
                                      shape=(len(indices), draws, *shape))
    with progress_bar(len(indices), "denoise training draws", "img",
                      enabled=progress) as bar:
        for start in range(0, len(indices), BUILD_IMAGES_PER_FORWARD):
            items = [dataset[i] for i in indices[start:start + BUILD_IMAGES_PER_FORWARD]]
            labels += [int(label) for _, label in items]
            images = torch.stack([image for image, _ in items]).to(device)
            noisy = images.repeat_interleave(draws, 0)
            noisy = noisy + sigma * torch.randn(noisy.shape, generator=generator,
                                                device=device)
            tick = time.perf_counter()
            with autocast(precision, device):
                denoised = denoiser.denoise(noisy).float()
            denoiser_seconds += time.perf_counter() - tick
            array[start:start + len(items)] = denoised.view(
                len(items), draws, *shape).cpu().numpy()
            bar.update(len(items))
    array.flush()
    del array
    return {"labels": labels, "build_seconds": round(time.perf_counter() - started, 3),
            "bytes": size,
            "denoiser_ms_per_draw": 1000 * denoiser_seconds / (len(indices) * draws)}
