"""Certifying a set of images, written once: from stored draws or live, with a fixed ``n`` or
sequentially, into a folder of records that resumes (:func:`certify_into`) or in memory
(:func:`certified_records`).

Every certification goes through here: `cadis certify`, `cadis train`'s certification and a
sweep's final stage (:mod:`cadis.certify_models`), the rank stage
(:func:`cadis.sweeps.trial.certify_rank`) and the per-epoch proxy
(:func:`cadis.finetuning.loop.proxy_metrics`). They differ only in where the draws come
from (:class:`LiveDraws`, :class:`StoredDraws`) and in their :class:`CertificationSettings`.
Both sources give an image the same record for the same seed: a store holds exactly the draws
the live path would denoise (:mod:`cadis.draws.certification_store`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import torch
from torch import nn

from cadis.draws.certification_store import DrawStore
from cadis.errors import CadisError
from cadis.progress import progress_bar
from cadis.smoothing.bounds import CertificationParameters
from cadis.smoothing.image_noise import image_noise
from cadis.smoothing.record_folder import claim_record_folder, complete_settings, summarise_records
from cadis.smoothing.records import (
    NOISE_PER_IMAGE,
    RECORDS_FILENAME,
    Record,
    RecordWriter,
    read_records,
)
from cadis.smoothing.sequential import SequentialPlan
from cadis.smoothing.smooth import Smooth, images_per_forward


@dataclass(frozen=True)
class CertificationSettings:
    """How a set of images is certified: at noise ``sigma``, with ``parameters`` (``n0``
    selection and at most ``n`` estimation draws an image at ``alpha``, ``batch_size``
    draws a forward, validated when they were made); the summary reports certified accuracy
    at ``radii``. With ``plan``, each image is certified sequentially at the plan's radii,
    the plan's ``n_max``, ``alpha`` and ``sigma`` being these (checked when made)."""

    sigma: float
    parameters: CertificationParameters
    radii: tuple[float, ...]
    plan: SequentialPlan | None = None

    def __post_init__(self) -> None:
        plan, parameters = self.plan, self.parameters
        if plan is not None and (plan.n_max != parameters.n or plan.alpha != parameters.alpha
                                 or plan.sigma != self.sigma):
            raise CadisError("the sequential plan's n, alpha and sigma must be the "
                             "certification's")

    @property
    def images_per_group(self) -> int:
        """Images certified together: one at a time sequentially (each stops on its own),
        else as many as share a forward (:func:`images_per_forward`)."""
        if self.plan is not None:
            return 1
        return images_per_forward(self.parameters.n0, self.parameters.n,
                                  self.parameters.batch_size)


class ImageDataset(Protocol):
    """``dataset[i]`` is ``(image, label)``: a C x H x W tensor in [0, 1] and a class index."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]: ...


class Draws(Protocol):
    """Where an image's draws come from: ``certify(group, settings)`` is ``[(label,
    prediction, radius), ...]`` for the data-set indices ``group``, in order, sequential
    certification adding the draws spent; ``settings`` are what its records' settings gain."""

    settings: Mapping[str, Any]

    def certify(self, group: list[int],
                settings: CertificationSettings) -> list[tuple]: ...


class LiveDraws:
    """Draws denoised here: ``smooth`` (its base denoises, then classifies) over
    ``dataset[i]``. With ``seed``, each image's noise is its own
    (:func:`~cadis.smoothing.image_noise.image_noise`, named by ``split``, the data set's
    split, and the data-set index), not ``smooth``'s: an image's record is then the same
    whether it is certified alone, resumed, in another shard or from stored draws, and the
    records' settings gain ``noise``."""

    def __init__(self, smooth: Smooth, dataset: ImageDataset, seed: int | None = None,
                 split: str | None = None) -> None:
        if (seed is None) != (split is None):
            raise CadisError("a seeded certification names the split of its images, and only "
                             "a seeded one: an image's noise depends on both")
        self.smooth = smooth
        self.dataset = dataset
        self.seed = seed
        self.split = split
        self.settings = {} if seed is None else {"noise": NOISE_PER_IMAGE}

    def certify(self, group: list[int], settings: CertificationSettings) -> list[tuple]:
        device = self.smooth.device
        examples = [self.dataset[index] for index in group]
        images = torch.stack([image for image, _ in examples]).to(device)
        noise = (None if self.seed is None
                 else image_noise(self.seed, self.split, group, device))
        if settings.plan is not None:
            return [(int(label), *self.smooth.certify_sequential(
                        image, settings.parameters.n0, settings.plan,
                        settings.parameters.batch_size,
                        None if noise is None else noise[position]))
                    for position, (image, (_, label)) in enumerate(zip(images, examples))]
        results = self.smooth.certify_images(images, settings.parameters, noise)
        return [(int(label), prediction, radius)
                for (_, label), (prediction, radius) in zip(examples, results)]


class StoredDraws:
    """Draws read from ``store``: ``classifier`` alone runs, on ``device``, in the store's
    forwards, and the counts are those of denoising the same seeded draws live
    (:class:`DrawStore`), whatever the settings' batch size; a sequential plan may read at
    most the store's ``n``."""

    settings: Mapping[str, Any] = MappingProxyType({})

    def __init__(self, store: DrawStore, classifier: nn.Module, device: torch.device) -> None:
        self.store = store
        self.classifier = classifier
        self.device = device

    def certify(self, group: list[int], settings: CertificationSettings) -> list[tuple]:
        if settings.plan is not None:
            return self.store.certify_sequential(self.classifier, group, settings.plan,
                                                 self.device)
        return self.store.certify(self.classifier, group, settings.parameters.alpha,
                                  self.device)


def certified_records(draws: Draws, indices: Sequence[int],
                      settings: CertificationSettings) -> Iterator[Record]:
    """The record of each image of ``indices``, in order, certified in groups of
    :attr:`CertificationSettings.images_per_group`; each record's ``seconds`` is its share of
    its group's time."""
    size = settings.images_per_group
    for start in range(0, len(indices), size):
        group = list(indices[start:start + size])
        started = time.perf_counter()
        results = draws.certify(group, settings)
        seconds = (time.perf_counter() - started) / len(group)
        for index, (label, prediction, radius, *spent) in zip(group, results):
            yield Record.from_prediction(index, label, prediction, radius, seconds, *spent)


def certify_into(draws: Draws, indices: Iterable[int], settings: CertificationSettings,
                 out_dir: str | os.PathLike, run_settings: Mapping[str, Any],
                 progress: bool = True,
                 notes: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Certify the images ``indices`` into ``out_dir`` and summarise them.

    Writes ``settings.json`` (``run_settings`` completed with the draws' settings, sigma, n,
    n0, alpha and a sequential plan's description), appends one record per image to
    ``records.tsv`` (skipping images already recorded there, so an interrupted run resumes),
    then writes ``summary.json`` and ``certified_accuracy.png`` for the records of
    ``indices`` (a records file may hold more) and returns the summary, whose extra fields
    are the settings. ``notes`` join the summary but not the settings (what was measured of
    the run, not what made it).

    Raises :class:`CadisError`, leaving ``out_dir`` untouched, if it holds records made with
    other settings.
    """
    wanted = list(dict.fromkeys(int(index) for index in indices))
    if not wanted:
        raise CadisError("no images to certify: indices is empty")
    out_dir = Path(out_dir)
    mode = {} if settings.plan is None else settings.plan.describe()
    parameters = settings.parameters
    made_with = complete_settings({**run_settings, **draws.settings, **mode},
                                  sigma=settings.sigma, n=parameters.n, n0=parameters.n0,
                                  alpha=parameters.alpha)
    out_dir.mkdir(parents=True, exist_ok=True)
    claim_record_folder(out_dir, made_with)

    records_path = out_dir / RECORDS_FILENAME
    wanted_set = set(wanted)
    recorded = {record.idx: record for record in read_records(records_path)
                if record.idx in wanted_set} if records_path.exists() else {}
    todo = [index for index in wanted if index not in recorded]
    correct = sum(record.correct for record in recorded.values())
    with RecordWriter(records_path, sequential=settings.plan is not None) as writer, \
            progress_bar(len(wanted), "certify", "img", enabled=progress,
                         initial=len(recorded)) as bar:
        for record in certified_records(draws, todo, settings):
            writer.write(record)
            recorded[record.idx] = record
            correct += record.correct
            bar.set_postfix(cert_acc_r0=f"{correct / len(recorded):.3f}")
            bar.update(1)
    return summarise_records(out_dir, [recorded[index] for index in wanted], made_with,
                             settings.radii, notes)
