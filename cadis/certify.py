"""Randomized smoothing (Cohen et al. 2019): PREDICT and CERTIFY for any base model.

The smoothed classifier is ``g(x) = argmax_c P[base(x + delta) = c]`` with
``delta ~ N(0, sigma^2 I)`` added to the [0, 1] image, exactly ``sigma``. Everything the
base does with ``x + delta`` (denoising, resizing, normalising) is part of the base, so the
certificate holds for any base: this module knows nothing of diffusion.

The statistics are pure functions of the class counts (:func:`lower_confidence_bound`,
:func:`certify_from_counts`, :func:`predict_from_counts`) so that they can be pinned
without a model; :class:`Smooth` only draws the noise and counts.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import numbers
from collections.abc import Iterable, Iterator
from typing import Final

import numpy as np
import torch
from scipy.stats import beta, binomtest, norm
from torch import Tensor, nn

from cadis.config import is_real, positive_int
from cadis.errors import CadisError

#: The class returned when the smoothed classifier declines to answer.
ABSTAIN: Final = -1

#: The lower confidence bound of p_A must reach this for a certificate (radius >= 0).
MAJORITY: Final = 0.5

#: The null hypothesis of PREDICT's test: the top two classes are equally likely.
EVEN_SPLIT: Final = 0.5

# A (image index, number of draws) pair: one block of draws counted separately.
Segment = tuple[int, int]


# --------------------------------------------------------------------------- validation


def _check_sigma(sigma: object) -> float:
    if is_real(sigma) and math.isfinite(float(sigma)) and float(sigma) > 0.0:
        return float(sigma)
    raise CadisError(f"sigma must be a finite number > 0, got {sigma!r}")


def _check_alpha(alpha: object) -> float:
    if is_real(alpha) and 0.0 < float(alpha) < 1.0:
        return float(alpha)
    raise CadisError(f"alpha must be a number strictly between 0 and 1, got {alpha!r}")


def validate_certification_parameters(n0: object, n: object, alpha: object,
                                      batch_size: object) -> None:
    """Raise :class:`CadisError` unless ``n0, n, batch_size >= 1`` and ``0 < alpha < 1``."""
    positive_int(n0, "n0")
    positive_int(n, "n")
    _check_alpha(alpha)
    positive_int(batch_size, "batch_size")


# --------------------------------------------------------------------------- statistics


def lower_confidence_bound(n_a: int, n: int, alpha: float) -> float:
    """The one-sided (1 - alpha) Clopper-Pearson lower bound on p_A from n_A successes in n.

    ``P[p_A >= bound] >= 1 - alpha`` over the draws, whatever p_A is. It is
    ``Beta.ppf(alpha, n_A, n - n_A + 1)``, the lower end of the two-sided interval at
    confidence 1 - 2*alpha, and 0 when ``n_A = 0``. Raises :class:`CadisError` unless
    ``0 <= n_a <= n``, ``n >= 1`` and ``0 < alpha < 1``.
    """
    n = positive_int(n, "n")
    alpha = _check_alpha(alpha)
    if not (isinstance(n_a, numbers.Integral) and not isinstance(n_a, bool) and 0 <= n_a <= n):
        raise CadisError(f"n_a must be an integer between 0 and n = {n}, got {n_a!r}")
    if n_a == 0:
        return 0.0
    return float(beta.ppf(alpha, int(n_a), n - int(n_a) + 1))


def certified_radius(p_lower: float, sigma: float) -> float:
    """``sigma * Phi^-1(p_lower)``: the l2 radius certified by a lower bound p_lower >= 1/2.

    Raises :class:`CadisError` for ``p_lower`` outside [1/2, 1), where there is no finite
    certificate.
    """
    sigma = _check_sigma(sigma)
    if not MAJORITY <= p_lower < 1.0:
        raise CadisError(f"p_lower must be in [0.5, 1) to certify a radius, got {p_lower!r}")
    return sigma * float(norm.ppf(p_lower))


def max_certifiable_radius(sigma: float, n: int, alpha: float) -> float:
    """The largest radius CERTIFY can return with ``n`` draws (all of them the top class).

    ``sigma * Phi^-1(alpha^(1/n))``: useful to choose the radius grid of a table.
    """
    return certified_radius(lower_confidence_bound(n, n, alpha), sigma)


def certify_from_counts(candidate: int, n_a: int, n: int, alpha: float,
                        sigma: float) -> tuple[int, float]:
    """CERTIFY's decision: ``(candidate, radius)``, or ``(ABSTAIN, 0.0)`` if p_A's bound < 1/2.

    ``n_a`` counts the candidate among ``n`` draws that are independent of the draws that
    chose it; only then does the bound hold with probability 1 - alpha.
    """
    p_lower = lower_confidence_bound(n_a, n, alpha)
    if p_lower < MAJORITY:
        return ABSTAIN, 0.0
    return candidate, certified_radius(p_lower, sigma)


def predict_from_counts(counts: np.ndarray, alpha: float) -> int:
    """PREDICT's decision: the top class if a two-sided binomial test on the top two counts
    rejects an even split at level alpha, else :data:`ABSTAIN` (so a tie always abstains).

    The returned class differs from the smoothed classifier's with probability <= alpha.
    """
    alpha = _check_alpha(alpha)
    counts = np.asarray(counts)
    if counts.ndim != 1 or counts.size < 2:
        raise CadisError(f"counts must be one count per class for >= 2 classes, "
                         f"got shape {counts.shape}")
    top, runner_up = np.argsort(-counts, kind="stable")[:2]
    top_count, runner_up_count = int(counts[top]), int(counts[runner_up])
    if top_count == 0:
        return ABSTAIN
    p_value = binomtest(top_count, top_count + runner_up_count, EVEN_SPLIT).pvalue
    return ABSTAIN if p_value > alpha else int(top)


# --------------------------------------------------------------------------- drawing


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


def _autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    # Reduced precision only on CUDA, where it pays; it changes the base, not the noise,
    # so the certificate (about whatever the base computes) is unaffected.
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


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


class Smooth:
    """The smoothed classifier ``g(x) = argmax_c P[base(x + delta) = c]``,
    ``delta ~ N(0, sigma^2 I)``.

    ``base`` maps a batch of noisy images (in [0, 1] units, not clipped) to logits of
    ``num_classes`` classes; it is evaluated in eval mode (its modes are restored after) under
    ``torch.inference_mode``, with autocast when the images are on CUDA. The noise is drawn on
    the images' device from ``generator`` (the default generator if None), so a run with a
    seeded generator is reproducible. Guarantees, each with probability >= 1 - alpha over the
    noise: :meth:`predict` does not return a class other than ``g(x)``; :meth:`certify`
    returning ``(c, R)`` with ``c != ABSTAIN`` means ``g(x + e) = c`` for every
    ``||e||_2 < R``.
    """

    def __init__(self, base: nn.Module, num_classes: int, sigma: float,
                 generator: torch.Generator | None = None) -> None:
        if not (isinstance(num_classes, numbers.Integral) and not isinstance(num_classes, bool)
                and num_classes >= 2):
            raise CadisError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        self.base = base
        self.num_classes = int(num_classes)
        self.sigma = _check_sigma(sigma)
        self.generator = generator

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
        alpha = _check_alpha(alpha)
        batch_size = positive_int(batch_size, "batch_size")
        images = self._check_images(self._one_image(x))
        counts = self._count(images, [(0, n)], batch_size)
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
        validate_certification_parameters(n0, n, alpha, batch_size)
        images = self._check_images(xs)
        # Per image: the selection draws, then the estimation draws, counted apart.
        segments = [segment for index in range(len(images))
                    for segment in ((index, int(n0)), (index, int(n)))]
        counts = self._count(images, segments, int(batch_size))
        results = []
        for selection, estimation in zip(counts[0::2], counts[1::2]):
            candidate = int(np.argmax(selection))
            results.append(certify_from_counts(candidate, int(estimation[candidate]), int(n),
                                               alpha, self.sigma))
        return results

    @staticmethod
    def _one_image(x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 3:
            raise CadisError(f"x must be one C x H x W image tensor, got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        return x.unsqueeze(0)

    def _check_images(self, xs: Tensor) -> Tensor:
        if not isinstance(xs, Tensor) or xs.dim() != 4 or not xs.is_floating_point():
            raise CadisError("images must be a floating-point K x C x H x W tensor in [0, 1], got "
                             f"{xs.dtype if isinstance(xs, Tensor) else type(xs).__name__} "
                             f"of shape {tuple(xs.shape) if isinstance(xs, Tensor) else '?'}")
        if self.generator is not None and self.generator.device.type != xs.device.type:
            raise CadisError(f"the generator is on {self.generator.device} but the images are "
                             f"on {xs.device}; the noise is drawn on the images' device")
        return xs

    def _noisy_draws(self, images: Tensor, segments: list[Segment],
                     batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(x + delta, segment id)`` pieces, segment by segment, in chunks of at most
        ``batch_size`` draws: the chunking fixes the order in which the generator is used."""
        for segment_id, (image_index, draws) in enumerate(segments):
            image = images[image_index]
            for start in range(0, draws, batch_size):
                size = min(batch_size, draws - start)
                noise = torch.randn((size, *image.shape), generator=self.generator,
                                    device=image.device, dtype=image.dtype)
                yield (image + self.sigma * noise,
                       torch.full((size,), segment_id, device=image.device, dtype=torch.long))

    def _count(self, images: Tensor, segments: list[Segment], batch_size: int) -> np.ndarray:
        """Counts of the base's predicted class, one row of ``num_classes`` per segment."""
        total = len(segments) * self.num_classes
        # Counted on the device: one transfer at the end instead of one per batch.
        counts = torch.zeros(total, dtype=torch.long, device=images.device)
        with torch.inference_mode(), _evaluation_mode(self.base):
            for noisy, segment_ids in _rebatch(self._noisy_draws(images, segments, batch_size),
                                               batch_size):
                with _autocast_for(images.device):
                    logits = self.base(noisy)
                if logits.shape != (len(noisy), self.num_classes):
                    raise CadisError(f"the base returned logits of shape {tuple(logits.shape)} "
                                     f"for {len(noisy)} images; expected ({len(noisy)}, "
                                     f"{self.num_classes})")
                predictions = logits.argmax(dim=1)
                counts += torch.bincount(segment_ids * self.num_classes + predictions,
                                         minlength=total)
        return counts.view(len(segments), self.num_classes).cpu().numpy()
