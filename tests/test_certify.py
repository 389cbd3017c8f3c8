"""The statistics of PREDICT and CERTIFY, pinned against independent computations and an
analytic base whose smoothed classifier and exact robust radius are known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import binom, norm
from torch import nn

from cadis.errors import CadisError
from cadis.smoothing.bounds import (ABSTAIN, certified_radius, certify_from_counts,
                                    lower_confidence_bound, max_certifiable_radius,
                                    predict_from_counts)
from cadis.smoothing.sequential import draws_to_reach
from cadis.smoothing.smooth import Smooth

IMAGE_SHAPE = (1, 2, 2)


class LinearBinary(nn.Module):
    """``sign(w.x + b)`` as two logits. With unit ``w``, the distance of x to the boundary is
    ``d = |w.x + b|``, and under N(0, sigma^2 I) noise its class has probability
    ``Phi(d / sigma)``: the smoothed classifier is the same classifier and d is the exact
    certified radius."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        weight = torch.randn(IMAGE_SHAPE, generator=generator, dtype=torch.float64)
        self.weight = weight / weight.norm()
        # The boundary passes through the middle of the [0, 1] cube.
        self.bias = float(-0.5 * self.weight.sum())
        self.draws = 0

    def score(self, images: torch.Tensor) -> torch.Tensor:
        return (images.double() * self.weight).flatten(1).sum(dim=1) + self.bias

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.draws += len(images)
        score = self.score(images)
        return torch.stack([-score, score], dim=1)

    def truth(self, image: torch.Tensor) -> tuple[int, float]:
        """The class of ``image`` and its exact l2 distance to the boundary."""
        score = float(self.score(image.unsqueeze(0)))
        return int(score > 0), abs(score)


class Constant(nn.Module):
    def __init__(self, label: int, num_classes: int) -> None:
        super().__init__()
        self.label, self.num_classes = label, num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(images), self.num_classes)
        logits[:, self.label] = 1.0
        return logits


class HalfAndHalf(nn.Module):
    """Class 0 for the first half of every batch, class 1 for the rest: an exact tie."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(images), 2)
        half = len(images) // 2
        logits[:half, 0] = 1.0
        logits[half:, 1] = 1.0
        return logits


class Recording(nn.Module):
    """Keeps every batch it is given (and its own mode at the time) and answers class 0."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[torch.Tensor] = []
        self.modes: list[bool] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.batches.append(images.clone())
        self.modes.append(self.training)
        return torch.zeros(len(images), 2)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def clopper_pearson_by_bisection(n_a: int, n: int, alpha: float) -> float:
    """The smallest p with P[Bin(n, p) >= n_a] >= alpha, found from the binomial CDF."""
    low, high = 0.0, 1.0
    for _ in range(200):
        middle = (low + high) / 2
        if 1.0 - binom.cdf(n_a - 1, n, middle) < alpha:
            low = middle
        else:
            high = middle
    return (low + high) / 2


# --------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("n", [1, 10, 100, 100_000])
@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_bound_when_every_draw_is_the_top_class(n, alpha):
    assert lower_confidence_bound(n, n, alpha) == pytest.approx(alpha ** (1 / n), rel=1e-10)


@pytest.mark.parametrize("n_a, n", [(1, 10), (5, 10), (9, 10), (50, 100), (73, 100),
                                    (990, 1000), (9_000, 10_000)])
@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_bound_matches_bisection_on_binomial_cdf(n_a, n, alpha):
    expected = clopper_pearson_by_bisection(n_a, n, alpha)
    assert lower_confidence_bound(n_a, n, alpha) == pytest.approx(expected, rel=1e-7)


def test_bound_is_zero_without_successes():
    assert lower_confidence_bound(0, 100, 0.001) == 0.0


@pytest.mark.parametrize("n_a, n, alpha, sigma", [(90, 100, 0.001, 0.25), (999, 1000, 0.01, 0.5),
                                                  (100_000, 100_000, 0.001, 1.0)])
def test_radius_is_sigma_times_inverse_normal_of_the_bound(n_a, n, alpha, sigma):
    p_lower = lower_confidence_bound(n_a, n, alpha)
    assert certify_from_counts(3, n_a, n, alpha, sigma) == (3, pytest.approx(
        sigma * norm.ppf(p_lower), rel=1e-12))
    assert certified_radius(p_lower, sigma) == pytest.approx(sigma * norm.ppf(p_lower))


@pytest.mark.parametrize("n_a, n", [(0, 100), (50, 100), (55, 100), (530, 1000)])
def test_abstains_when_the_bound_is_below_one_half(n_a, n):
    # 55/100 and 530/1000 are majorities whose 99.9% lower bounds are still below 1/2.
    assert lower_confidence_bound(n_a, n, 0.001) < 0.5
    assert certify_from_counts(1, n_a, n, 0.001, 0.25) == (ABSTAIN, 0.0)


def test_max_certifiable_radius_is_the_all_draws_radius():
    assert max_certifiable_radius(0.25, 100_000, 0.001) == pytest.approx(
        0.25 * norm.ppf(0.001 ** (1 / 100_000)))


@pytest.mark.parametrize("counts, alpha, expected", [
    ([0, 20, 0], 0.001, 1),         # binomtest p = 2 * 0.5^20 < 0.001
    ([6, 14, 0], 0.001, ABSTAIN),   # not significant
    ([10, 10, 0], 0.5, ABSTAIN),    # a tie never is
    ([0, 500, 500], 0.5, ABSTAIN),
    ([3, 60, 1], 0.01, 1),
])
def test_predict_decision(counts, alpha, expected):
    assert predict_from_counts(np.array(counts), alpha) == expected


# --------------------------------------------------------------------------- Smooth


@pytest.mark.parametrize("n", [2, 10, 1000])
@pytest.mark.parametrize("alpha", [0.001, 0.5])
def test_predict_abstains_on_a_tie(n, alpha):
    smooth = Smooth(HalfAndHalf(), num_classes=2, sigma=0.25, generator=seeded(0))
    assert smooth.predict(torch.rand(IMAGE_SHAPE), n=n, alpha=alpha, batch_size=n) == ABSTAIN


@pytest.mark.parametrize("label", [0, 3])
def test_predict_and_certify_a_constant_base(label):
    sigma, n, alpha = 0.5, 1000, 0.001
    smooth = Smooth(Constant(label, 4), num_classes=4, sigma=sigma, generator=seeded(0))
    image = torch.rand(IMAGE_SHAPE)
    assert smooth.predict(image, n=20, alpha=alpha, batch_size=7) == label
    prediction, radius = smooth.certify(image, n0=10, n=n, alpha=alpha, batch_size=300)
    assert prediction == label
    assert radius == pytest.approx(sigma * norm.ppf(alpha ** (1 / n)))


def test_noise_is_exactly_sigma_and_not_clipped():
    sigma = 0.5
    base = Recording()
    image = torch.rand(3, 4, 4, generator=seeded(1))
    Smooth(base, 2, sigma, generator=seeded(0)).predict(image, n=4000, alpha=0.001,
                                                        batch_size=1000)
    noise = torch.cat(base.batches) - image
    assert noise.shape == (4000, 3, 4, 4)
    assert float(noise.std()) == pytest.approx(sigma, rel=0.01)
    assert abs(float(noise.mean())) < 0.01
    noisy = torch.cat(base.batches)
    assert bool((noisy < 0).any()) and bool((noisy > 1).any())


@pytest.mark.parametrize("sigma", [0.25, 0.5])
def test_certified_radius_is_sound_on_a_linear_classifier(sigma):
    base = LinearBinary(seed=0)
    points = torch.rand((50, *IMAGE_SHAPE), generator=seeded(1))
    smooth = Smooth(base, 2, sigma, generator=seeded(2))
    results = smooth.certify_batch(points, n0=100, n=2000, alpha=0.001, batch_size=10_000)
    wrong = 0
    for point, (prediction, radius) in zip(points, results):
        true_class, distance = base.truth(point)
        # Any answer but ABSTAIN claims g = prediction on the whole ball of that radius.
        if prediction != ABSTAIN and (prediction != true_class or radius > distance):
            wrong += 1
    assert wrong <= 1
    assert sum(prediction != ABSTAIN for prediction, _ in results) >= 25


def test_certified_radius_is_close_to_the_true_distance_for_large_n():
    sigma = 0.25
    base = LinearBinary(seed=0)
    points = torch.rand((50, *IMAGE_SHAPE), generator=seeded(3))
    smooth = Smooth(base, 2, sigma, generator=seeded(4))
    results = smooth.certify_batch(points, n0=100, n=20_000, alpha=0.001, batch_size=50_000)
    checked = 0
    for point, (prediction, radius) in zip(points, results):
        true_class, distance = base.truth(point)
        # Near p_A = 1 the bound, not the estimate, limits the radius; skip those points.
        if 0.6 <= norm.cdf(distance / sigma) <= 0.9:
            checked += 1
            assert prediction == true_class
            assert radius == pytest.approx(distance, abs=0.1 * sigma)
    assert checked >= 10


@pytest.mark.parametrize("n0, n, batch_size, images", [(7, 23, 10, 1), (7, 23, 10, 3),
                                                        (5, 5, 64, 4), (100, 1000, 256, 2)])
def test_forwards_hold_at_most_batch_size_draws(n0, n, batch_size, images):
    base = Recording()
    Smooth(base, 2, 0.25, generator=seeded(0)).certify_batch(
        torch.rand(images, *IMAGE_SHAPE), n0, n, 0.001, batch_size)
    sizes = [len(batch) for batch in base.batches]
    assert sum(sizes) == images * (n0 + n)
    assert max(sizes) <= batch_size
    assert len(sizes) == math.ceil(images * (n0 + n) / batch_size)


def test_seeded_runs_reproduce_exactly():
    image = torch.rand(IMAGE_SHAPE, generator=seeded(5))
    runs = []
    for seed in (7, 7, 8):
        base = Recording()
        Smooth(base, 2, 0.25, generator=seeded(seed)).certify(image, 10, 50, 0.001, 16)
        runs.append(torch.cat(base.batches))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])

    base = LinearBinary()
    first, second = (Smooth(base, 2, 0.5, generator=seeded(7)).certify(image, 10, 500, 0.001, 64)
                     for _ in range(2))
    assert first == second


@pytest.mark.parametrize("n0, n, batch_size", [(5, 30, 7), (10, 50, 1000), (100, 100, 64),
                                               (3, 40, 1)])
def test_certify_batch_equals_certify_image_by_image(n0, n, batch_size):
    base = LinearBinary(seed=1)
    images = torch.rand((6, *IMAGE_SHAPE), generator=seeded(6))
    one_by_one = Smooth(base, 2, 0.5, generator=seeded(9))
    expected = [one_by_one.certify(image, n0, n, 0.01, batch_size) for image in images]
    together = Smooth(base, 2, 0.5, generator=seeded(9)).certify_batch(images, n0, n, 0.01,
                                                                        batch_size)
    assert together == expected
    # Not a vacuous comparison: the images get different answers.
    assert len(set(expected)) > 1


def test_base_is_evaluated_in_eval_mode_and_its_mode_restored():
    base = Recording().train()
    Smooth(base, 2, 0.25).predict(torch.rand(IMAGE_SHAPE), 10, 0.001, 4)
    assert base.modes and not any(base.modes)
    assert base.training


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("sigma", [0, -0.25, math.nan, math.inf, "0.25"])
def test_invalid_sigma(sigma):
    with pytest.raises(CadisError, match="^sigma must"):
        Smooth(Constant(0, 2), 2, sigma)


def test_invalid_num_classes():
    with pytest.raises(CadisError, match="^num_classes must"):
        Smooth(Constant(0, 2), 1, 0.25)


@pytest.mark.parametrize("call, name", [
    (lambda smooth, x: smooth.certify(x, 0, 10, 0.001, 10), "n0"),
    (lambda smooth, x: smooth.certify(x, 10, 0, 0.001, 10), "n"),
    (lambda smooth, x: smooth.certify(x, 10, 10, 0.0, 10), "alpha"),
    (lambda smooth, x: smooth.certify(x, 10, 10, 1.0, 10), "alpha"),
    (lambda smooth, x: smooth.certify(x, 10, 10, 0.001, 0), "batch_size"),
    (lambda smooth, x: smooth.certify(x, 10.5, 10, 0.001, 10), "n0"),
    (lambda smooth, x: smooth.predict(x, 0, 0.001, 10), "n"),
    (lambda smooth, x: smooth.predict(x, 10, 1.5, 10), "alpha"),
    (lambda smooth, x: smooth.predict(x, 10, 0.001, -1), "batch_size"),
    (lambda smooth, x: smooth.certify_batch(x[None], 10, 10, -0.1, 10), "alpha"),
    (lambda smooth, x: smooth.certify_batch(x[None], 10, 10, 0.01, 0), "batch_size"),
])
def test_invalid_arguments(call, name):
    smooth = Smooth(Constant(0, 2), 2, 0.25)
    with pytest.raises(CadisError, match=f"^{name} must"):
        call(smooth, torch.rand(IMAGE_SHAPE))


@pytest.mark.parametrize("n_a, n, alpha, name", [(11, 10, 0.01, "n_a"), (-1, 10, 0.01, "n_a"),
                                                 (5, 0, 0.01, "n"), (5, 10, 0.0, "alpha")])
def test_invalid_bound_arguments(n_a, n, alpha, name):
    with pytest.raises(CadisError, match=f"^{name} must"):
        lower_confidence_bound(n_a, n, alpha)


def test_wrong_image_shape_and_logits_shape():
    with pytest.raises(CadisError, match="C x H x W"):
        Smooth(Constant(0, 2), 2, 0.25).certify(torch.rand(2, 2), 1, 1, 0.01, 1)
    with pytest.raises(CadisError, match="logits of shape"):
        Smooth(Constant(0, 3), 2, 0.25).certify(torch.rand(IMAGE_SHAPE), 1, 1, 0.01, 1)


@pytest.mark.parametrize("radius,sigma,alpha", [(0.5, 0.5, 0.001), (1.0, 0.5, 0.001),
                                                (0.25, 0.25, 0.01), (1.0, 0.25, 0.001)])
def test_draws_to_reach_are_the_fewest_with_which_fixed_n_reaches_the_radius(radius, sigma,
                                                                             alpha):
    n = draws_to_reach(radius, sigma, alpha)
    assert max_certifiable_radius(sigma, n, alpha) >= radius
    assert n == 1 or max_certifiable_radius(sigma, n - 1, alpha) < radius


def test_draws_to_reach_the_objective_of_the_paper_scale_sweeps():
    # ln(0.001) / ln(Phi(2)) = 300.2: r = 1.0 at sigma = 0.5 needs 301 draws.
    assert draws_to_reach(1.0, 0.5, 0.001) == 301
