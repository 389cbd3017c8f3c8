"""The hold-out that would separate two classifiers at a radius (cadis.smoothing.separation):
McNemar's exact power against a simulation, and the projection's grid."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from cadis.smoothing.separation import (
    FIRST_IMAGES,
    GRID_STEP,
    POWER,
    images_to_separate,
    mcnemar_power,
)


def simulated_power(images: int, only_first: float, only_second: float, alpha: float,
                    repeats: int = 2000) -> float:
    rng = np.random.default_rng(0)
    rejections = 0
    for _ in range(repeats):
        u = rng.random(images)
        first = int((u < only_first).sum())
        second = int(((u >= only_first) & (u < only_first + only_second)).sum())
        rejections += first > second and binomtest(first, first + second, 0.5).pvalue <= alpha
    return rejections / repeats


@pytest.mark.parametrize("images,only_first,only_second,alpha", [
    (1000, 0.04, 0.02, 0.05), (300, 0.05, 0.01, 0.025), (500, 0.018, 0.010, 0.05)])
def test_power_is_what_a_simulation_of_the_test_finds(images, only_first, only_second, alpha):
    # 2,000 repeats: a standard error of at most 0.011.
    assert mcnemar_power(images, only_first, only_second, alpha) == pytest.approx(
        simulated_power(images, only_first, only_second, alpha), abs=0.035)


def test_more_images_more_power_and_none_for_no_difference():
    assert mcnemar_power(4000, 0.02, 0.01, 0.05) > mcnemar_power(1000, 0.02, 0.01, 0.05)
    # No difference: the test rejects in the first's favour at most alpha / 2 of the time.
    assert mcnemar_power(2000, 0.02, 0.02, 0.05) <= 0.025


def test_the_projection_is_the_first_grid_size_with_the_power():
    needed = images_to_separate(9, 5, 500, 0.025)
    assert needed is not None and needed > 500
    assert mcnemar_power(needed, 9 / 500, 5 / 500, 0.025) >= POWER
    assert mcnemar_power(int(needed / GRID_STEP), 9 / 500, 5 / 500, 0.025) < POWER


@pytest.mark.parametrize("only_first,only_second", [(5, 5), (3, 9)], ids=["tie", "behind"])
def test_no_hold_out_shows_a_side_ahead_that_is_not_ahead(only_first, only_second):
    assert images_to_separate(only_first, only_second, 500, 0.05) is None


def test_a_large_lead_needs_no_more_than_the_first_grid_size():
    assert images_to_separate(30, 0, 100, 0.05) == FIRST_IMAGES
