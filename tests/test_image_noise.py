"""Each image's own noise (cadis.smoothing.image_noise): named by seed, split, index and
stream, and draw k the same however the draws are asked for."""

from __future__ import annotations

import pytest
import torch

from cadis.certifier import LiveDraws
from cadis.errors import CadisError
from cadis.smoothing.image_noise import (
    ESTIMATION,
    NOISE_BLOCK,
    SELECTION,
    NoiseStream,
    image_noise,
)
from cadis.smoothing.records import NOISE_PER_IMAGE
from cadis.smoothing.smooth import Segment, Smooth, noisy_batches

CPU = torch.device("cpu")
# 27 numbers a draw: not a multiple of the 16 torch's CPU randn fills at a time.
SHAPE = (3, 3, 3)


def draws_of(noise, images: torch.Tensor, segments: list[Segment],
             batch_size: int) -> torch.Tensor:
    """The noise (sigma 1, images of zeros) of ``segments``, in forwards of ``batch_size``."""
    return torch.cat([noisy for noisy, _ in noisy_batches(images, segments, 1.0, noise,
                                                          batch_size)]) - images[0]


def test_validation_image_i_and_test_image_i_draw_different_noise():
    # A validation image is image i of the training split; test image i is another image.
    images = torch.zeros(1, *SHAPE)
    held_out = draws_of(image_noise(0, "train", [7], CPU), images, [Segment(0, 50)], 50)
    test = draws_of(image_noise(0, "test", [7], CPU), images, [Segment(0, 50)], 50)
    assert not torch.equal(held_out, test)
    # And the seed, the index and the stream each name other noise too.
    for other in (image_noise(1, "test", [7], CPU), image_noise(0, "test", [8], CPU)):
        assert not torch.equal(draws_of(other, images, [Segment(0, 50)], 50), test)
    estimation = draws_of(image_noise(0, "test", [7], CPU), images,
                          [Segment(0, 50, ESTIMATION)], 50)
    assert not torch.equal(estimation, test)


@pytest.mark.parametrize("batch_size", [1, 7, 13, 64, 1000])
def test_an_image_draws_the_same_noise_in_any_company_order_and_batch_size(batch_size):
    zeros = torch.zeros(3, *SHAPE)
    alone = draws_of(image_noise(0, "test", [7], CPU), zeros[:1],
                     [Segment(0, 23, SELECTION), Segment(0, 41, ESTIMATION)], 10)
    # Image 7 third of three, its streams asked in other pieces.
    together = draws_of(image_noise(0, "test", [3, 9, 7], CPU), zeros,
                        [Segment(0, 5), Segment(2, 11, SELECTION), Segment(1, 30, ESTIMATION),
                         Segment(2, 12, SELECTION), Segment(2, 41, ESTIMATION)], batch_size)
    assert torch.equal(torch.cat([together[5:16], together[46:99]]), alone)


def test_a_stream_hands_out_draw_k_whatever_the_asks():
    like = torch.zeros(SHAPE)

    def stream() -> NoiseStream:
        return NoiseStream(torch.Generator().manual_seed(3))

    whole = stream().take(4 * NOISE_BLOCK + 3, like)
    pieces = stream()
    asks = [1, NOISE_BLOCK - 1, 2 * NOISE_BLOCK + 1, 3, NOISE_BLOCK - 1]  # 4 blocks and 3
    assert torch.equal(torch.cat([pieces.take(ask, like) for ask in asks]), whole)


def test_the_scheme_named_in_records_and_keys_says_its_block():
    # A store or records of another block size drew other noise: its name must differ.
    assert f"blocks of {NOISE_BLOCK}" in NOISE_PER_IMAGE


def test_a_seeded_certification_names_its_split_and_an_unseeded_one_none():
    smooth = Smooth(torch.nn.Flatten(), 27, 0.5)
    for seed, split in ((0, None), (None, "test")):
        with pytest.raises(CadisError, match="names the split of its images"):
            LiveDraws(smooth, [], seed, split)
