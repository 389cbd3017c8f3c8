"""Each image's own noise in a seeded certification: an image's draws are the same whichever
images are certified with it, in which order or shard, at which batch size, in CERTIFY's order
or a sequential test's looks, live or from stored draws.

An image has two streams: its *selection* draws (CERTIFY's ``n0``, which choose the candidate
class) and its *estimation* draws (the ``n`` that bound the candidate's probability), each
from a generator of its own seeded by the run's seed, the image's split and index, and the
stream (:func:`image_seed`).

- **Per split**: validation image i (index i of the training split) and test image i are
  other images, so their noise must not be the same.
- **Two streams**: a sequential test reads its first look's estimation draws before the rest
  of its selection draws; from one stream those would be other draws than CERTIFY's (and a
  store's, which holds CERTIFY's) whenever ``n0`` is above the first selection draws.
- **Fixed blocks**: a stream draws :data:`NOISE_BLOCK` draws at a time and keeps the rest for
  the next ask, so draw k is the same however many are asked at once. One ``torch.randn`` of
  2k draws is not two of k: on the CPU it fills 16 numbers at a time (an image of 27 numbers
  gets other noise), on CUDA each call moves the generator's offset on by its own rounding.

Changing any of this changes every seeded draw: give
:data:`cadis.smoothing.records.NOISE_PER_IMAGE` (which names the scheme in records' settings
and stores' keys) a new value with it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Final

import torch
from torch import Tensor

# Seeds are 63-bit: what every torch generator takes.
IMAGE_SEED_MASK: Final = 2 ** 63 - 1
#: The streams of an image: a segment of draws names one (cadis.smoothing.smooth.Segment).
SELECTION: Final = 0
ESTIMATION: Final = 1
STREAM_NAMES: Final = ("selection", "estimation")
#: Draws a stream makes per call of the generator. Small, so that little is drawn and not
#: used (at most this many less one per stream and image), and a divisor of the usual asks
#: (the sequential test's first 10 selection draws, n0 = 10 or 100, looks of 100s).
NOISE_BLOCK: Final = 10


def image_seed(seed: int, split: str, index: int, stream: int) -> int:
    """The seed of ``stream`` of image ``index`` of ``split`` in a run seeded ``seed``: a
    digest, so that nearby images, splits, streams and runs get unrelated generators."""
    text = f"{int(seed)}/{split}/{int(index)}/{STREAM_NAMES[stream]}"
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "little") & IMAGE_SEED_MASK


class NoiseStream:
    """Standard normal draws from one generator, draw k the same however many are asked at a
    time: the generator always draws :data:`NOISE_BLOCK` at once, the rest wait for the next
    :meth:`take`."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator
        self._pending: Tensor | None = None

    def take(self, count: int, like: Tensor) -> Tensor:
        """The next ``count`` draws, each shaped like ``like`` (one image), on its device and
        in its dtype."""
        pieces = [] if self._pending is None else [self._pending]
        held = 0 if self._pending is None else len(self._pending)
        while held < count:
            pieces.append(torch.randn((NOISE_BLOCK, *like.shape), generator=self.generator,
                                      device=like.device, dtype=like.dtype))
            held += NOISE_BLOCK
        drawn = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        self._pending = drawn[count:] if held > count else None
        return drawn[:count]


class ImageNoise:
    """One image's noise in a seeded run: its :data:`SELECTION` and :data:`ESTIMATION`
    streams (:class:`NoiseStream`). Stateful, as a generator is: each draw is handed out
    once, so certify an image with a fresh one."""

    def __init__(self, seed: int, split: str, index: int, device: torch.device) -> None:
        self.device = torch.device(device)
        self.streams = tuple(
            NoiseStream(torch.Generator(device=self.device).manual_seed(
                image_seed(seed, split, index, stream)))
            for stream in (SELECTION, ESTIMATION))


def image_noise(seed: int, split: str, indices: Sequence[int],
                device: torch.device) -> list[ImageNoise]:
    """The noise of images ``indices`` (data-set indices) of ``split`` in a run seeded
    ``seed``, on ``device``: one :class:`ImageNoise` each."""
    return [ImageNoise(seed, split, index, device) for index in indices]
