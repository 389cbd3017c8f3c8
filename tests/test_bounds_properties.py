"""The certificate's statistics under property tests (hypothesis): over counts, alpha and
sigma the Clopper-Pearson bound and the radius keep the properties the certificate rests on,
and a seeded certification is reproducible bit for bit, across runs and batch sizes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import beta
from torch import nn

from cadis.smoothing.bounds import (
    ABSTAIN,
    MAJORITY,
    CertificationParameters,
    certified_radius,
    certify_from_counts,
    lower_confidence_bound,
)
from cadis.smoothing.image_noise import image_noise
from cadis.smoothing.smooth import Segment, Smooth, noisy_batches

# Modest budgets: the whole file runs in seconds on two cores.
STATISTICS = settings(max_examples=150, deadline=None)
CERTIFICATION = settings(max_examples=8, deadline=None)

ALPHAS = st.floats(min_value=1e-6, max_value=0.25)
SIGMAS = st.floats(min_value=0.01, max_value=4.0)


@st.composite
def counts(draw) -> tuple[int, int]:
    """(n_A, n) with 0 <= n_A <= n."""
    n = draw(st.integers(min_value=1, max_value=200_000))
    return draw(st.integers(min_value=0, max_value=n)), n


@given(counts(), ALPHAS)
@STATISTICS
def test_the_bound_is_the_beta_quantile_and_never_above_the_share(count, alpha):
    n_a, n = count
    bound = lower_confidence_bound(n_a, n, alpha)
    expected = 0.0 if n_a == 0 else float(beta.ppf(alpha, n_a, n - n_a + 1))
    assert bound == expected
    assert 0.0 <= bound <= n_a / n


@given(counts(), ALPHAS)
@STATISTICS
def test_the_bound_grows_with_n_a(count, alpha):
    n_a, n = count
    if n_a < n:
        assert lower_confidence_bound(n_a, n, alpha) < lower_confidence_bound(n_a + 1, n, alpha)


@given(counts(), ALPHAS, ALPHAS)
@STATISTICS
def test_a_smaller_alpha_gives_a_smaller_bound(count, alpha, other):
    n_a, n = count
    low, high = sorted((alpha, other))
    assert lower_confidence_bound(n_a, n, low) <= lower_confidence_bound(n_a, n, high)


@given(st.floats(min_value=MAJORITY, max_value=1.0, exclude_max=True),
       st.floats(min_value=MAJORITY, max_value=1.0, exclude_max=True), SIGMAS)
@STATISTICS
def test_the_radius_grows_with_the_bound_and_is_zero_at_the_majority(p, q, sigma):
    low, high = sorted((p, q))
    assert 0.0 <= certified_radius(low, sigma) <= certified_radius(high, sigma)
    assert certified_radius(MAJORITY, sigma) == 0.0


@given(counts(), ALPHAS, SIGMAS, st.integers(min_value=0, max_value=9))
@STATISTICS
def test_certify_abstains_below_the_majority_and_its_radius_grows_with_n_a(count, alpha,
                                                                            sigma, candidate):
    n_a, n = count
    predicted, radius = certify_from_counts(candidate, n_a, n, alpha, sigma)
    if lower_confidence_bound(n_a, n, alpha) < MAJORITY:
        assert (predicted, radius) == (ABSTAIN, 0.0)
    else:
        assert predicted == candidate and radius >= 0.0
    if n_a < n:
        _, more = certify_from_counts(candidate, n_a + 1, n, alpha, sigma)
        assert more >= radius


# ------------------------------------------------------------------ seeded certification


def linear_base(channels: int, size: int) -> nn.Module:
    """A small torch linear classifier over C x size x size images, 10 classes, fixed weights."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * size * size, 10))


def certify(shape: tuple[int, int, int], sigma: float, seed: int,
            batch_size: int) -> list[tuple[int, float]]:
    channels, size, _ = shape
    images = torch.rand((4, *shape), generator=torch.Generator().manual_seed(1))
    smooth = Smooth(linear_base(channels, size), num_classes=10, sigma=sigma)
    parameters = CertificationParameters(n0=10, n=150, alpha=0.01, batch_size=batch_size)
    indices = [3, 5, 8, 13]
    return smooth.certify_many(images, parameters,
                               image_noise(seed, "test", indices, torch.device("cpu")))


@given(st.floats(min_value=0.05, max_value=1.0), st.integers(min_value=0, max_value=2**31),
       st.integers(min_value=1, max_value=160), st.integers(min_value=1, max_value=160))
@CERTIFICATION
def test_a_seeded_certification_is_the_same_across_runs_and_batch_sizes(sigma, seed, batch,
                                                                        other_batch):
    # The radii differ from seed to seed: the noise decides them, and it is the same here.
    first = certify((1, 8, 8), sigma, seed, batch)
    assert certify((1, 8, 8), sigma, seed, batch) == first
    assert certify((1, 8, 8), sigma, seed, other_batch) == first


def draws(shape: tuple[int, int, int], batch_size: int) -> torch.Tensor:
    """The 150 noisy draws one image gets, in forwards of ``batch_size``, joined."""
    image = torch.zeros((1, *shape))
    noise = image_noise(0, "test", [0], torch.device("cpu"))
    return torch.cat([noisy for noisy, _ in noisy_batches(image, [Segment(0, 150)], 0.5, noise,
                                                          batch_size)])


# torch's CPU randn fills 16 numbers at a time, so an image of 27 numbers would get other
# noise at another batch size; each image's noise is drawn in fixed blocks instead.
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 3, 3)])
def test_an_images_noise_is_the_same_at_any_batch_size_whatever_its_numbers(shape):
    assert torch.equal(draws(shape, 7), draws(shape, 64))
