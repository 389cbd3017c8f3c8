"""Which of a training config's values each role's stored draws depend on: the one place that
maps a :class:`~cadis.finetuning.config.TrainConfig` to a key of :mod:`cadis.draws.keys`, so
that whoever builds a store (a sweep, `cadis train`) and whoever opens it (the loop, the
proxy, the rank stage) name the same draws."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from cadis.draws.keys import held_out_key, training_key
from cadis.finetuning.config import TrainConfig
from cadis.models.sources import ModelSources


def training_store_key(config: TrainConfig, sources: ModelSources, indices: Sequence[int],
                       device: torch.device) -> dict[str, Any]:
    """The training draws' key (``train_store``): ``config.train_draws`` per training image,
    denoised in the precision training on ``device`` denoises in."""
    return training_key(dataset=sources.dataset, indices=indices, denoiser=sources.denoiser,
                        sigma=config.sigma, draws=config.train_draws, seed=config.seed,
                        precision=config.denoiser_precision(device).name)


def held_out_store_key(config: TrainConfig, sources: ModelSources, indices: Sequence[int],
                       n0: int, n: int, device: torch.device) -> dict[str, Any]:
    """The key of ``n0 + n`` draws of each of the held-out images ``indices``: the rank
    stage's (its ``n0``, ``n``) or the proxy's (:func:`proxy_store_key`)."""
    return held_out_key(dataset=sources.dataset, indices=indices, denoiser=sources.denoiser,
                        sigma=config.sigma, n0=n0, n=n, seed=config.seed, device=device)


def proxy_store_key(config: TrainConfig, sources: ModelSources, indices: Sequence[int],
                    device: torch.device) -> dict[str, Any]:
    """The proxy's key (``proxy_store``): ``proxy_n0 + proxy_n`` draws of each proxy image."""
    return held_out_store_key(config, sources, indices, config.proxy_n0, config.proxy_n,
                              device)
