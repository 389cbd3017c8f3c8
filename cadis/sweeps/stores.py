"""The denoised draws a sweep makes once, before its first trial: the rank stage's (n0 + n per
validation image of the rank stage), the proxy's (proxy_n0 + proxy_n per proxy image) and,
with ``train_draws`` set, the training draws (``train_draws`` per training image).

Each is a store (:mod:`cadis.draws`) under the sweep's ``draws_dir`` (default
``results_dir/draws``), keyed by what its draws depend on; a rerun, a resumed sweep or another
sweep with that ``draws_dir`` finds it there. :func:`build_sweep_stores`
runs in a Ray task with one worker's resources (its GPU where workers have one), as does
:func:`build_block_store`, the racing stage's store of a further block of validation images,
keyed as the rank stage's and built only when the race reaches that block.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cadis.data import load_dataset, stack_images
from cadis.draws.certification_store import build_store, store_bytes
from cadis.draws.keys import PROXY_ROLE, RANK_ROLE, TRAIN_ROLE, store_folder
from cadis.finetuning.config import TrainConfig, from_mapping
from cadis.finetuning.loop import build_training_draws
from cadis.finetuning.store_keys import held_out_store_key, proxy_store_key
from cadis.models.classifier import load_classifier
from cadis.models.denoiser import load_denoiser
from cadis.models.devices import pick_device
from cadis.smoothing.denoise import OneShotDenoiser
from cadis.smoothing.smooth import default_batch_size
from cadis.sweeps.spec import RankSettings
from cadis.sweeps.trial import validation_indices


def build_sweep_stores(config_dict: dict[str, Any], rank: RankSettings, draws_dir: str,
                       threads: int = 1, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Build (or find) under ``draws_dir`` the rank stage's store for the sweep's base config
    and what its training reads (:func:`build_training_stores`), with ``threads`` torch
    threads; returns per role its folder and what it cost (build seconds, bytes, per-draw
    milliseconds of the denoiser and, for certification stores, of the classifier)."""
    config, train_set, device, denoiser, classifier = _builder(config_dict, threads)
    indices = validation_indices(config, train_set, rank.images)
    key = held_out_store_key(config, config.model_sources(), indices, rank.n0, rank.n, device)
    return {RANK_ROLE: _build_held_out(RANK_ROLE, key, indices, rank.batch_size, train_set,
                                       denoiser, classifier, Path(draws_dir), device, progress),
            **_training_stores(config, train_set, device, denoiser, classifier,
                               Path(draws_dir), progress)}


def build_training_stores(config_dict: dict[str, Any], draws_dir: str, threads: int = 1,
                          progress: bool = True) -> dict[str, dict[str, Any]]:
    """Build (or find) under ``draws_dir`` the stores a trial's training reads: the proxy's
    and, with ``train_draws`` set, the training draws'; per role as
    :func:`build_sweep_stores` returns them."""
    config, train_set, device, denoiser, classifier = _builder(config_dict, threads)
    return _training_stores(config, train_set, device, denoiser, classifier, Path(draws_dir),
                            progress)


def _training_stores(config: TrainConfig, train_set: Any, device: torch.device,
                     denoiser: OneShotDenoiser, classifier: torch.nn.Module, draws_dir: Path,
                     progress: bool) -> dict[str, dict[str, Any]]:
    """:func:`build_training_stores` with its models loaded."""
    indices = validation_indices(config, train_set, config.proxy_images)
    key = proxy_store_key(config, config.model_sources(), indices, device)
    built = {PROXY_ROLE: _build_held_out(PROXY_ROLE, key, indices, config.certify.batch_size,
                                         train_set, denoiser, classifier, draws_dir, device,
                                         progress)}
    if config.train_draws:
        if progress:
            print(f"draws: training, {config.train_draws} per training image", flush=True)
        train = build_training_draws(config, draws_dir, device, progress)
        built[TRAIN_ROLE] = {"folder": str(train.folder), "build_seconds": train.build_seconds,
                             "bytes": train.bytes,
                             "denoiser_ms_per_draw": train.denoiser_ms_per_draw,
                             "classifier_ms_per_draw": None}
    return built


def build_block_store(config_dict: dict[str, Any], rank: RankSettings, draws_dir: str,
                      bounds: tuple[int, int], threads: int = 1,
                      progress: bool = False) -> dict[str, Any]:
    """Build (or find) under ``draws_dir`` the store of the validation images at positions
    ``bounds`` of the hold-out, with the rank stage's n0 and n, keyed as the rank stage's
    store (:func:`~cadis.finetuning.store_keys.held_out_store_key` over those images): the
    racing stage's draws of one block. Returns its folder and what it cost, as
    :func:`build_sweep_stores` does per role."""
    config, train_set, device, denoiser, classifier = _builder(config_dict, threads)
    start, stop = bounds
    indices = validation_indices(config, train_set, stop)[start:stop]
    key = held_out_store_key(config, config.model_sources(), indices, rank.n0, rank.n, device)
    return _build_held_out(RANK_ROLE, key, indices, rank.batch_size, train_set, denoiser,
                           classifier, Path(draws_dir), device, progress)


def _builder(config_dict: dict[str, Any], threads: int
             ) -> tuple[TrainConfig, Any, torch.device, OneShotDenoiser, torch.nn.Module]:
    """What building a held-out store takes, with ``threads`` torch threads: the config, the
    training split, the device, the one-shot denoiser and the off-the-shelf classifier."""
    torch.set_num_threads(threads)
    config = from_mapping(config_dict)
    sources = config.model_sources()
    device = pick_device(config.device)
    train_set = load_dataset(sources.dataset, "train", sources.data_root,
                             image_size=sources.image_size)
    unet, scheduler = load_denoiser(sources.denoiser)
    denoiser = OneShotDenoiser(unet, scheduler, config.sigma).to(device)
    return config, train_set, device, denoiser, load_classifier(sources.classifier).to(device)


def _build_held_out(role: str, key: dict[str, Any], indices: Sequence[int],
                    batch_size: int | None, train_set: Any, denoiser: torch.nn.Module,
                    classifier: torch.nn.Module, draws_dir: Path, device: torch.device,
                    progress: bool) -> dict[str, Any]:
    """The store of ``key`` over the held-out ``indices`` (built by the one locked builder
    unless it is there): its folder and what it cost."""
    images, labels = stack_images(train_set, indices)
    folder = store_folder(draws_dir, role, key)
    if progress:
        size = store_bytes(len(images), key["n0"], key["n"], images.shape[1:])
        print(f"draws: {role} stage, {len(images)} images x {key['n0'] + key['n']} draws "
              f"({size / 2 ** 20:.0f} MiB) in {folder}", flush=True)
    store = build_store(folder, key, denoiser, images.to(device), labels.tolist(),
                        train_set.info.num_classes, batch_size or default_batch_size(device),
                        classifier=classifier, progress=progress)
    return {"folder": str(folder), "build_seconds": store.info.build_seconds,
            "bytes": store.info.bytes, "denoiser_ms_per_draw": store.info.denoiser_ms_per_draw,
            "classifier_ms_per_draw": store.info.classifier_ms_per_draw}
