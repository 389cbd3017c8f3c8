"""The certification store: every draw of a seeded CERTIFY run over a fixed list of images,
after the denoiser, so that certifying a classifier runs the classifier alone.

The denoiser is frozen, so a denoised draw depends only on the image, the noise and sigma,
never on the classifier behind it. A store holds, for a fixed list of images, the ``n0``
selection and ``n`` estimation draws of each image, drawn exactly as
:class:`~cadis.smoothing.smooth.Smooth` draws them, in the same forwards, in float32
(``denoised.npy``: K x (n0 + n) x C x H x W, :mod:`cadis.draws.folder`). Certifying a
classifier from the store runs it on the same batches, so its counts equal those of
``Smooth(classifier ∘ denoiser)`` with the same seed exactly.

Why sharing draws across the trials of a sweep is sound: each trial's certificate is a
statement about its own smoothed classifier that holds with probability >= 1 - alpha over
the draws; reusing the same draws for another classifier does not change that probability
for either. It correlates the trials' errors (common random numbers), which makes the
comparison between trials less noisy, not invalid.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cadis.draws.folder import STORE_ARRAY, STORE_DTYPE, build_once, read_store_meta
from cadis.errors import CadisError
from cadis.progress import progress_bar
from cadis.smoothing.bounds import CertificationParameters
from cadis.smoothing.image_noise import image_noise
from cadis.smoothing.precision import PRECISIONS, Precision
from cadis.smoothing.sequential import SequentialPlan, run_sequential
from cadis.smoothing.smooth import (
    certify_segments,
    count_predictions,
    decide_certify,
    evaluating,
    images_per_forward,
    noisy_batches,
)


def store_bytes(num_images: int, n0: int, n: int, image_shape: Sequence[int]) -> int:
    """The size of a store's array."""
    return (num_images * (n0 + n) * int(np.prod(image_shape))
            * np.dtype(STORE_DTYPE).itemsize)


@dataclass(frozen=True)
class StoreInfo:
    """What a store is and what it cost: read from ``store.json``."""

    key: dict[str, Any]
    labels: list[int]
    batch_size: int
    num_classes: int
    image_shape: tuple[int, ...]
    build_seconds: float
    bytes: int
    denoiser_ms_per_draw: float
    classifier_ms_per_draw: float | None


class DrawStore:
    """The denoised draws of one seeded CERTIFY run over a fixed list of images.

    Guarantee: :meth:`certify` returns exactly what ``Smooth(classifier ∘ denoiser, sigma,
    precision of the key).certify_many(images, parameters, image_noise(key's seed, split,
    indices))`` returns, for any classifier, without running the denoiser; and
    :meth:`certify_sequential` what ``certify_sequential`` of each image with its
    ``image_noise`` returns (each image's selection and estimation draws are streams of their
    own: the store's rows are the first ``n0`` and ``n`` of them).
    """

    def __init__(self, folder: Path, info: StoreInfo) -> None:
        self.folder = folder
        self.info = info
        self.key = info.key
        self.indices = list(info.key["indices"])
        self.parameters = CertificationParameters(info.key["n0"], info.key["n"], 0.5,
                                                  info.batch_size)
        self._positions = {index: position for position, index in enumerate(self.indices)}
        #: Every stored draw, images x (n0 + n) x image shape: read-only, memory-mapped.
        self.draws = np.load(folder / STORE_ARRAY, mmap_mode="r", allow_pickle=False)

    @classmethod
    def open(cls, folder: str | Path, key: Mapping[str, Any]) -> DrawStore:
        """The store in ``folder``, which must have been made with ``key``; otherwise
        :class:`CadisError` naming what differs (the folder is left untouched)."""
        folder = Path(folder)
        meta = read_store_meta(folder, key)
        info = StoreInfo(**{**meta, "image_shape": tuple(meta["image_shape"])})
        return cls(folder, info)

    def labels_of(self, indices: Sequence[int]) -> list[int]:
        return [self.info.labels[self._position(index)] for index in indices]

    def _position(self, index: int) -> int:
        if index not in self._positions:
            raise CadisError(f"image {index} has no draws in {self.folder}")
        return self._positions[index]

    def _groups(self) -> int:
        return images_per_forward(self.key["n0"], self.key["n"], self.info.batch_size)

    @property
    def precision(self) -> Precision:
        """The precision the draws were denoised in, which the classifier runs in too."""
        return PRECISIONS[self.key["precision"]]

    def certify(self, classifier: nn.Module, indices: Sequence[int], alpha: float,
                device: torch.device) -> list[tuple[int, int, float]]:
        """``[(label, prediction, radius)]`` of CERTIFY at ``alpha`` for the store's images
        ``indices`` (data-set indices), in that order. Whole build groups are counted, in the
        build's forwards, so the counts do not depend on which images are asked for."""
        parameters = CertificationParameters(self.key["n0"], self.key["n"], alpha,
                                             self.info.batch_size)
        size = self._groups()
        wanted = [self._position(index) for index in indices]
        answers: dict[int, tuple[int, float]] = {}
        for group_start in sorted({position - position % size for position in wanted}):
            group = range(group_start, min(group_start + size, len(self.indices)))
            counts = count_predictions(classifier, self._batches(group, parameters, device),
                                       2 * len(group), self.info.num_classes, device,
                                       self.precision)
            for position, answer in zip(group, decide_certify(counts, parameters,
                                                              self.key["sigma"])):
                answers[position] = answer
        return [(self.info.labels[position], *answers[position]) for position in wanted]

    def certify_sequential(self, classifier: nn.Module, indices: Sequence[int],
                           plan: SequentialPlan, device: torch.device
                           ) -> list[tuple[int, int, float, int]]:
        """``[(label, prediction, radius, draws)]`` of the sequential test of ``plan`` for the
        store's images ``indices``, in that order: at most the image's ``n0`` stored selection
        draws choose the candidate, its stored estimation draws are read in the plan's looks
        (at most the store's ``n``, which ``plan.n_max`` may not exceed). The stored draws are
        iid and independent of the classifier, so :class:`SequentialPlan`'s guarantee holds."""
        n0, n = self.key["n0"], self.key["n"]
        if plan.n_max > n:
            raise CadisError(f"the sequential plan may spend {plan.n_max} draws but the store "
                             f"in {self.folder} holds {n} per image")
        answers = []
        for index in indices:
            position = self._position(index)
            rows = self.draws[position]
            # Selection rows come first in a row, estimation rows after them: read in order.
            read = {"selection": 0, "estimation": n0}

            def take(kind: str, draws: int, rows: np.ndarray = rows) -> np.ndarray:
                start = read[kind]
                read[kind] += draws
                return self._count_rows(classifier, rows[start:start + draws], device)

            prediction, radius, spent = run_sequential(
                lambda selection, estimation: (take("selection", selection),
                                               take("estimation", estimation)), n0, plan)
            answers.append((self.info.labels[position], prediction, radius, spent))
        return answers

    def _count_rows(self, classifier: nn.Module, rows: np.ndarray,
                    device: torch.device) -> np.ndarray:
        """Class counts of ``classifier`` over stored rows, in forwards of the build's batch."""
        size = self.info.batch_size
        batches = ((torch.from_numpy(np.array(rows[start:start + size])).to(device),
                    torch.zeros(len(rows[start:start + size]), dtype=torch.long, device=device))
                   for start in range(0, len(rows), size))
        return count_predictions(classifier, batches, 1, self.info.num_classes, device,
                                 self.precision)[0]

    def _batches(self, group: range, parameters: CertificationParameters,
                 device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
        """The group's stored rows in the forwards they were denoised in, with the segment
        ids :func:`certify_segments` gives them."""
        per_image = parameters.n0 + parameters.n
        rows = np.asarray(self.draws[group.start:group.stop]).reshape(
            len(group) * per_image, *self.info.image_shape)
        segment_of_draw = torch.cat([
            torch.full((parameters.n0,), 0), torch.full((parameters.n,), 1)])
        segment_ids = torch.cat([segment_of_draw + 2 * image for image in range(len(group))])
        for start in range(0, len(rows), parameters.batch_size):
            stop = start + parameters.batch_size
            yield (torch.from_numpy(np.array(rows[start:stop])).to(device),
                   segment_ids[start:stop].to(device))


def build_store(folder: str | Path, key: Mapping[str, Any], denoiser: nn.Module,
                images: Tensor, labels: Sequence[int], num_classes: int, batch_size: int,
                classifier: nn.Module | None = None, progress: bool = True) -> DrawStore:
    """Denoise every draw of a seeded CERTIFY run over ``images`` (K x C x H x W, on the
    device to run on) into ``folder`` (:func:`~cadis.draws.folder.build_once`: locked, whole
    or not at all), or open it if it already holds this key's store.

    ``denoiser`` maps noisy [0, 1] images to denoised [0, 1] images (what the classifier
    takes). ``classifier``, when given, is timed on one forward of stored draws, so that the
    store says what it saves. Raises :class:`CadisError` before any work when the store would
    not fit on the disk (with the size it needs), or when ``folder`` holds another store.
    """
    folder = Path(folder)
    size = store_bytes(len(images), key["n0"], key["n"], images.shape[1:])
    build_once(folder, key, size, lambda staging: _denoise(
        staging, key, size, denoiser, images, labels, num_classes, batch_size, classifier,
        progress))
    return DrawStore.open(folder, key)


def _denoise(staging: Path, key: Mapping[str, Any], size: int, denoiser: nn.Module,
             images: Tensor, labels: Sequence[int], num_classes: int, batch_size: int,
             classifier: nn.Module | None, progress: bool) -> dict[str, Any]:
    """:func:`build_store`'s denoising (``size`` bytes) into ``staging``; what the store
    records of itself."""
    parameters = CertificationParameters(key["n0"], key["n"], 0.5, batch_size)
    device = images.device
    noise = image_noise(int(key["seed"]), key["split"], key["indices"], device)
    precision = PRECISIONS[key["precision"]]
    per_image = parameters.n0 + parameters.n
    group_size = images_per_forward(parameters.n0, parameters.n, batch_size)
    started = time.perf_counter()
    denoiser_seconds = 0.0
    array = np.lib.format.open_memmap(staging / STORE_ARRAY, mode="w+", dtype=STORE_DTYPE,
                                      shape=(len(images), per_image, *images.shape[1:]))
    flat = array.reshape(len(images) * per_image, *images.shape[1:])
    row = 0
    with progress_bar(len(images), "denoise draws", "img", enabled=progress) as bar, \
            evaluating(denoiser, device, precision):
        for start in range(0, len(images), group_size):
            group = images[start:start + group_size]
            segments = certify_segments(len(group), parameters)
            for noisy, _ in noisy_batches(group, segments, float(key["sigma"]),
                                          noise[start:start + group_size], batch_size):
                tick = time.perf_counter()
                denoised = denoiser(noisy).float()
                denoiser_seconds += time.perf_counter() - tick
                flat[row:row + len(denoised)] = denoised.cpu().numpy()
                row += len(denoised)
            bar.update(len(group))
    array.flush()
    del flat, array
    classifier_ms = None
    if classifier is not None:
        stored = np.load(staging / STORE_ARRAY, mmap_mode="r", allow_pickle=False)
        sample = torch.from_numpy(np.array(stored.reshape(-1, *images.shape[1:])[:batch_size])
                                  ).to(device)
        with evaluating(classifier, device, precision):
            tick = time.perf_counter()
            classifier(sample)
            classifier_ms = 1000 * (time.perf_counter() - tick) / len(sample)
    draws = len(images) * per_image
    return {"labels": [int(label) for label in labels], "batch_size": int(batch_size),
            "num_classes": int(num_classes), "image_shape": list(images.shape[1:]),
            "build_seconds": round(time.perf_counter() - started, 3), "bytes": size,
            "denoiser_ms_per_draw": 1000 * denoiser_seconds / draws,
            "classifier_ms_per_draw": classifier_ms}
