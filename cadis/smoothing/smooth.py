"""The smoothed classifier (Cohen et al. 2019): PREDICT and CERTIFY for any base model.

The smoothed classifier is ``g(x) = argmax_c P[base(x + delta) = c]`` with
``delta ~ N(0, sigma^2 I)`` added to the [0, 1] image, exactly ``sigma``. Everything the
base does with ``x + delta`` (denoising, resizing, normalising) is part of the base, so the
certificate holds for any base: this module knows nothing of diffusion.

The statistics are pure functions of the class counts (:mod:`cadis.smoothing.bounds`) so
that they can be pinned without a model; :class:`Smooth` only draws the noise and counts.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Final, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from cadis.errors import CadisError
from cadis.smoothing.bounds import (
    CertificationParameters,
    certify_from_counts,
    predict_from_counts,
)
from cadis.smoothing.image_noise import ESTIMATION, SELECTION, ImageNoise
from cadis.smoothing.precision import Precision, autocast, resolve_precision
from cadis.smoothing.sequential import SequentialPlan, run_sequential
from cadis.validation import check_probability, check_sigma, integer_at_least, positive_int

# Noise draws per forward when none is given. On a 2-core CPU smaller batches stay in cache:
# 706 draws/s at 100 against 422 at 1000 with the default models (benchmarks/, docs/).
CPU_BATCH_SIZE: Final = 100
CUDA_BATCH_SIZE: Final = 1000
# A classifier tells at least two classes apart (a smoothed vote of one class means nothing).
MIN_CLASSES: Final = 2



class Segment(NamedTuple):
    """One block of draws counted apart: ``draws`` draws of the image at position ``image`` of
    the batch, from its ``stream`` (:mod:`cadis.smoothing.image_noise`; one generator shared
    by all images has no streams: the next ``draws`` of it)."""

    image: int
    draws: int
    stream: int = SELECTION


def default_batch_size(device: torch.device) -> int:
    """Noise draws per forward that are fast on ``device``: :data:`CUDA_BATCH_SIZE` on CUDA,
    else :data:`CPU_BATCH_SIZE`."""
    return CUDA_BATCH_SIZE if device.type == "cuda" else CPU_BATCH_SIZE


@contextlib.contextmanager
def _evaluation_mode(module: nn.Module) -> Iterator[None]:
    """Evaluate ``module`` in eval mode and give every submodule its own mode back after.

    Draws must be independent: in train mode, batch norm would make each draw's prediction
    depend on the others in its batch and void the certificate.
    """
    modes = [(submodule, submodule.training) for submodule in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for submodule, training in modes:
            submodule.training = training


@contextlib.contextmanager
def evaluating(module: nn.Module, device: torch.device,
               precision: Precision | None = None) -> Iterator[None]:
    """How every base evaluates draws: ``torch.inference_mode``, eval mode (each submodule's
    own mode given back after) and autocast to ``precision`` (None: ``auto`` for ``device``,
    reduced precision on CUDA only; it changes the base, not the noise, so the certificate,
    about whatever the base computes, holds)."""
    precision = precision or resolve_precision("auto", device)
    with torch.inference_mode(), _evaluation_mode(module), autocast(precision, device):
        yield


def _concatenate(tensors: list[Tensor]) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _rebatch(pieces: Iterable[tuple[Tensor, Tensor]],
             batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Regroup ``(draws, segment ids)`` pieces of at most ``batch_size`` rows into batches of
    exactly ``batch_size`` rows (the last one may be smaller), keeping the order."""
    pending_draws: list[Tensor] = []
    pending_ids: list[Tensor] = []
    pending = 0
    for draws, ids in pieces:
        pending_draws.append(draws)
        pending_ids.append(ids)
        pending += len(draws)
        if pending >= batch_size:
            all_draws, all_ids = _concatenate(pending_draws), _concatenate(pending_ids)
            yield all_draws[:batch_size], all_ids[:batch_size]
            pending -= batch_size
            pending_draws = [all_draws[batch_size:]] if pending else []
            pending_ids = [all_ids[batch_size:]] if pending else []
    if pending:
        yield _concatenate(pending_draws), _concatenate(pending_ids)


def certify_segments(num_images: int, parameters: CertificationParameters) -> list[Segment]:
    """CERTIFY's draws of ``num_images`` images, in the order they are drawn: per image the
    ``n0`` selection draws, then the ``n`` estimation draws, counted apart."""
    return [segment for index in range(num_images)
            for segment in (Segment(index, parameters.n0, SELECTION),
                            Segment(index, parameters.n, ESTIMATION))]


#: Where each image's noise comes from: one generator for all (None: torch's default), or
#: each image's own (:func:`~cadis.smoothing.image_noise.image_noise`, one per image of the
#: batch: a seeded run's draws).
NoiseSource = torch.Generator | Sequence[ImageNoise] | None


def noisy_batches(images: Tensor, segments: Sequence[Segment], sigma: float,
                  noise: NoiseSource,
                  batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """``(x + delta, segment ids)`` in forwards of exactly ``batch_size`` draws (the last may
    be smaller), segment by segment. With each image's own noise, a segment's draws are the
    next of its stream, whatever the batch size: the same for :class:`Smooth`, its sequential
    test and stored draws (:mod:`cadis.draws.certification_store`). From one shared generator
    they are drawn in chunks of at most ``batch_size``."""
    per_image = noise is not None and not isinstance(noise, torch.Generator)
    if per_image and len(noise) != len(images):
        raise CadisError(f"the noise of {len(noise)} images for {len(images)} images")

    def pieces() -> Iterator[tuple[Tensor, Tensor]]:
        for segment_id, (image_index, draws, stream) in enumerate(segments):
            image = images[image_index]
            for start in range(0, draws, batch_size):
                size = min(batch_size, draws - start)
                if per_image:
                    delta = noise[image_index].streams[stream].take(size, image)
                else:
                    delta = torch.randn((size, *image.shape), generator=noise,
                                        device=image.device, dtype=image.dtype)
                yield (image + sigma * delta,
                       torch.full((size,), segment_id, device=image.device, dtype=torch.long))

    return _rebatch(pieces(), batch_size)


def check_draws(images: Tensor, sigma: float, noise: NoiseSource, per_image: int,
                batch_size: int) -> list[Tensor]:
    """``per_image`` noisy draws of each of ``images`` (their selection draws, with each
    image's own noise), in forwards of ``batch_size``: what a
    fast base is compared on (:func:`~cadis.smoothing.precision.check_agreement`). Made under
    ``torch.inference_mode`` as certification's draws are, so a compiled base that sees them
    first is not compiled again for those."""
    segments = [Segment(index, per_image) for index in range(len(images))]
    with torch.inference_mode():
        return [noisy for noisy, _ in noisy_batches(images, segments, sigma, noise,
                                                    batch_size)]


def count_predictions(base: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
                      num_segments: int, num_classes: int, device: torch.device,
                      precision: Precision | None = None) -> np.ndarray:
    """Counts of ``base``'s predicted class over ``(inputs, segment ids)`` batches, one row of
    ``num_classes`` per segment. ``base`` runs as :func:`evaluating` runs it."""
    total = num_segments * num_classes
    # Counted on the device: one transfer at the end instead of one per batch.
    counts = torch.zeros(total, dtype=torch.long, device=device)
    with evaluating(base, device, precision):
        for inputs, segment_ids in batches:
            logits = base(inputs)
            if logits.shape != (len(inputs), num_classes):
                raise CadisError(f"the base returned logits of shape {tuple(logits.shape)} "
                                 f"for {len(inputs)} images; expected ({len(inputs)}, "
                                 f"{num_classes})")
            predictions = logits.argmax(dim=1)
            counts += torch.bincount(segment_ids * num_classes + predictions, minlength=total)
    return counts.view(num_segments, num_classes).cpu().numpy()


def decide_certify(counts: np.ndarray, parameters: CertificationParameters,
                   sigma: float) -> list[tuple[int, float]]:
    """CERTIFY's answers from :func:`count_predictions` over :func:`certify_segments`: the
    candidate from each image's selection counts, its bound from the estimation counts."""
    results = []
    for selection, estimation in zip(counts[0::2], counts[1::2]):
        candidate = int(np.argmax(selection))
        results.append(certify_from_counts(candidate, int(estimation[candidate]), parameters.n,
                                           parameters.alpha, sigma))
    return results


def images_per_forward(n0: int, n: int, batch_size: int) -> int:
    """How many images' draws (``n0 + n`` each) fill one forward of ``batch_size`` draws: the
    number certified together; 1 (image by image) when one image needs a forward or more."""
    return max(1, batch_size // (n0 + n))


class Smooth:
    """The smoothed classifier ``g(x) = argmax_c P[base(x + delta) = c]``,
    ``delta ~ N(0, sigma^2 I)``.

    ``base`` maps a batch of noisy images (in [0, 1] units, not clipped) to logits of
    ``num_classes`` classes; it is evaluated in eval mode (its modes are restored after) under
    ``torch.inference_mode``, autocast to ``precision`` (None: ``auto``, reduced precision on
    CUDA only). The noise is drawn in fp32 on the images' device from ``generator`` (the
    default generator if None) or, where a method is given it, from each image's own
    (:mod:`cadis.smoothing.image_noise`), so a seeded run is reproducible. Guarantees, each with probability >= 1 - alpha over the
    noise: :meth:`predict` does not return a class other than ``g(x)``; :meth:`certify`
    returning ``(c, R)`` with ``c != ABSTAIN`` means ``g(x + e) = c`` for every
    ``||e||_2 < R``.
    """

    def __init__(self, base: nn.Module, num_classes: int, sigma: float,
                 generator: torch.Generator | None = None,
                 precision: Precision | None = None) -> None:
        self.base = base
        # A public entry point, so it checks what it is given, as cadis.validation's rules:
        # the same words as where cadis's own callers took these values in.
        self.num_classes = integer_at_least(num_classes, "num_classes", MIN_CLASSES)
        self.sigma = check_sigma(sigma)
        self.generator = generator
        self.precision = precision

    @property
    def device(self) -> torch.device:
        """Where the base's parameters live (CPU for a base without any): put images there."""
        tensor = next(itertools.chain(self.base.parameters(), self.base.buffers()), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    def predict(self, x: Tensor, n: int, alpha: float, batch_size: int) -> int:
        """PREDICT: the smoothed class of one C x H x W image from ``n`` draws, or ABSTAIN.

        With probability >= 1 - alpha the answer is ``g(x)`` or ABSTAIN; a tie abstains.
        """
        n = positive_int(n, "n")
        alpha = check_probability(alpha, "alpha")
        batch_size = positive_int(batch_size, "batch_size")
        images = self._check_images(self._one_image(x))
        batches = noisy_batches(images, [Segment(0, n)], self.sigma, self.generator,
                                batch_size)
        counts = count_predictions(self.base, batches, 1, self.num_classes, images.device,
                                   self.precision)
        return predict_from_counts(counts[0], alpha)

    def certify(self, x: Tensor, n0: int, n: int, alpha: float,
                batch_size: int) -> tuple[int, float]:
        """CERTIFY one C x H x W image: ``(class, l2 radius)`` or ``(ABSTAIN, 0.0)``.

        ``n0`` draws choose the candidate class, ``n`` fresh draws bound its probability p_A
        below (Clopper-Pearson, 1 - alpha); the radius is ``sigma * Phi^-1(bound)``.
        """
        return self.certify_batch(self._one_image(x), n0, n, alpha, batch_size)[0]

    def certify_batch(self, xs: Tensor, n0: int, n: int, alpha: float,
                      batch_size: int) -> list[tuple[int, float]]:
        """CERTIFY each image of a K x C x H x W batch, packing their draws into shared
        forwards of ``batch_size`` draws (worth it when ``n0 + n`` is small).

        The noise is drawn in the same order and chunks as K calls of :meth:`certify`, so the
        results are identical to those calls' for a base that treats each draw on its own.
        """
        return self.certify_images(xs, CertificationParameters(n0, n, alpha, batch_size))

    def certify_images(self, xs: Tensor, parameters: CertificationParameters,
                       noise: Sequence[ImageNoise] | None = None
                       ) -> list[tuple[int, float]]:
        """:meth:`certify_batch` with parameters validated once by their constructor (a
        certification run makes them once, not once per batch of images); ``noise``, each
        image's own, replaces the shared generator."""
        images = self._check_images(xs, noise)
        segments = certify_segments(len(images), parameters)
        batches = noisy_batches(images, segments, self.sigma,
                                self.generator if noise is None else noise,
                                parameters.batch_size)
        counts = count_predictions(self.base, batches, len(segments), self.num_classes,
                                   images.device, self.precision)
        return decide_certify(counts, parameters, self.sigma)

    def certify_many(self, xs: Tensor, parameters: CertificationParameters,
                     noise: Sequence[ImageNoise] | None = None
                     ) -> list[tuple[int, float]]:
        """CERTIFY K images in groups of :func:`images_per_forward` (each group one
        :meth:`certify_images`), as :mod:`cadis.certifier` does: with each image's own
        ``noise``, the same draws as a run over those images or a store built from them."""
        size = images_per_forward(parameters.n0, parameters.n, parameters.batch_size)
        return [result for start in range(0, len(xs), size)
                for result in self.certify_images(
                    xs[start:start + size], parameters,
                    None if noise is None else noise[start:start + size])]

    def certify_sequential(self, x: Tensor, n0: int, plan: SequentialPlan, batch_size: int,
                           noise: ImageNoise | None = None
                           ) -> tuple[int, float, int]:
        """Sequential CERTIFY of one C x H x W image at the radii of ``plan``: ``(class,
        largest certified radius of the grid, draws spent)``, or ``(ABSTAIN, 0.0, draws)``.

        At most ``n0`` draws choose the candidate; estimation draws follow in the looks of
        ``plan`` and stop once every radius is decided (:class:`SequentialPlan`; draws spent
        count both). With probability >= 1 - alpha over the noise, a returned ``(c, r)`` with
        ``c != ABSTAIN`` means ``g(x + e) = c`` for every ``||e||_2 < r``, over all looks
        together. ``noise``, this image's own, replaces the shared generator: the selection
        and estimation draws are then CERTIFY's and a store's, whatever the looks.
        """
        n0 = positive_int(n0, "n0")
        batch_size = positive_int(batch_size, "batch_size")
        images = self._check_images(self._one_image(x), None if noise is None else [noise])
        source = self.generator if noise is None else [noise]

        def draw(selection: int, estimation: int) -> tuple[np.ndarray, np.ndarray]:
            # Both kinds share forwards; each is counted apart.
            segments = [Segment(0, selection, SELECTION), Segment(0, estimation, ESTIMATION)]
            batches = noisy_batches(images, segments, self.sigma, source, batch_size)
            counts = count_predictions(self.base, batches, 2, self.num_classes,
                                       images.device, self.precision)
            return counts[0], counts[1]

        return run_sequential(draw, n0, plan)

    @staticmethod
    def _one_image(x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 3:
            raise CadisError(f"x must be one C x H x W image tensor, got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        return x.unsqueeze(0)

    def _check_images(self, xs: Tensor,
                      noise: Sequence[ImageNoise] | None = None) -> Tensor:
        if not isinstance(xs, Tensor) or xs.dim() != 4 or not xs.is_floating_point():
            raise CadisError("images must be a floating-point K x C x H x W tensor in [0, 1], got "
                             f"{xs.dtype if isinstance(xs, Tensor) else type(xs).__name__} "
                             f"of shape {tuple(xs.shape) if isinstance(xs, Tensor) else '?'}")
        for source in noise if noise is not None else [self.generator]:
            if source is not None and source.device.type != xs.device.type:
                raise CadisError(f"the generator is on {source.device} but the images are "
                                 f"on {xs.device}; the noise is drawn on the images' device")
        return xs
