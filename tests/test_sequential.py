"""Sequential certification at predetermined radii, pinned on a base whose smoothed
classifier is known in closed form: a half-space classifier under Gaussian noise.

For f(x) = [w . x > b] with |w| = 1, w . (x + delta) ~ N(w . x, sigma^2), so the smoothed
classifier is f itself and its exact l2 radius at x is |w . x - b| (Cohen's bound is tight for
a half-space). A reported radius above that is a false certificate: its rate over many
seeded images must stay at or below alpha, over all looks together.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cadis.errors import CadisError
from cadis.smoothing.bounds import (
    ABSTAIN,
    CertificationParameters,
    lower_confidence_bound,
    max_certifiable_radius,
)
from cadis.smoothing.records import radius_grid
from cadis.smoothing.sequential import (
    SELECTION_FIRST,
    SequentialPlan,
    _staged_schedule,
    draws_to_reach,
    forward_sizes,
    look_schedule,
    reachable_radii,
    run_sequential,
    threshold,
)
from cadis.smoothing.smooth import Smooth

SIGMA = 0.5
RADII = (0.0, 0.25, 0.5, 0.75)


class HalfSpace(nn.Module):
    """Class 1 where the first coordinate exceeds 0, class 0 elsewhere: logits (0, x_0)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        first = images.flatten(1)[:, :1]
        return torch.cat([torch.zeros_like(first), first], dim=1)


def image_at(distance: float) -> torch.Tensor:
    """A 1 x 1 x 2 'image' at signed distance ``distance`` from the boundary."""
    return torch.tensor([[[distance, 0.3]]])


def false_certificate_rate(plan: SequentialPlan, distances: list[float], seed: int) -> float:
    smooth = Smooth(HalfSpace(), 2, SIGMA, generator=torch.Generator().manual_seed(seed))
    wrong = 0
    for distance in distances:
        prediction, radius, _ = smooth.certify_sequential(image_at(distance), 20, plan, 100)
        true_class = int(distance > 0)
        if prediction != ABSTAIN and (prediction != true_class or radius > abs(distance)):
            wrong += 1
    return wrong / len(distances)


# Images just inside each grid radius, where a false certificate is likeliest: p_A a hair
# below the threshold the radius needs.
HARD = [radius - 0.01 for radius in RADII[1:]]


def test_false_certificates_stay_within_alpha_over_all_looks():
    alpha, images = 0.2, 1200
    plan = SequentialPlan(RADII, SIGMA, alpha, n_max=1600)
    assert len(plan.looks) > 5 and math.isclose(sum(plan.alphas), alpha)
    rate = false_certificate_rate(plan, [HARD[i % len(HARD)] for i in range(images)], seed=0)
    sampling_error = 3 * math.sqrt(alpha * (1 - alpha) / images)
    assert rate <= alpha + sampling_error


def test_the_same_test_without_splitting_alpha_over_the_looks_fails():
    # The check above can fail: spend the whole alpha at every look and the rate exceeds it.
    alpha, images = 0.2, 1200
    plan = SequentialPlan(RADII, SIGMA, alpha, n_max=1600)
    plan.alphas = (alpha,) * len(plan.looks)
    rate = false_certificate_rate(plan, [HARD[i % len(HARD)] for i in range(images)], seed=0)
    assert rate > alpha + 3 * math.sqrt(alpha * (1 - alpha) / images)


def test_certified_accuracy_at_the_grid_agrees_with_fixed_n_certify():
    alpha, n = 0.001, 1000
    generator = torch.Generator().manual_seed(3)
    distances = (torch.rand(400, generator=generator) * 1.6 - 0.2).tolist()
    plan = SequentialPlan(RADII, SIGMA, alpha, n_max=n)
    sequential = Smooth(HalfSpace(), 2, SIGMA, generator=torch.Generator().manual_seed(1))
    fixed = Smooth(HalfSpace(), 2, SIGMA, generator=torch.Generator().manual_seed(2))
    parameters = CertificationParameters(100, n, alpha, 1000)
    seq_radii, fixed_radii, spent = [], [], []
    for distance in distances:
        prediction, radius, draws = sequential.certify_sequential(image_at(distance), 100, plan,
                                                                  100)
        seq_radii.append(radius if prediction == int(distance > 0) else -1.0)
        spent.append(draws)
        [(prediction, radius)] = fixed.certify_images(image_at(distance)[None], parameters)
        fixed_radii.append(radius if prediction == int(distance > 0) else -1.0)
    for grid_radius in RADII:
        seq = sum(r >= grid_radius for r in seq_radii) / len(distances)
        fix = sum(r >= grid_radius for r in fixed_radii) / len(distances)
        assert abs(seq - fix) <= 0.05, (grid_radius, seq, fix)
    # ... for fewer draws, even on images spread evenly over the grid (many near a
    # threshold, where only many draws decide): on average under fixed n's n0 + n.
    assert sum(spent) / len(spent) < 0.9 * (100 + n)


@pytest.mark.parametrize("distance,radii,most_draws", [
    # p_A ~ 1: the lead of the first selection draws settles the candidate and the main look,
    # where a unanimous image certifies the largest radius, decides every radius.
    (3.0, (0.0, 0.25), SELECTION_FIRST + 21),
    (-3.0, (0.0, 0.25), SELECTION_FIRST + 21),
    # p_A = 0.79 between 0.25's 0.69 and 0.5's 0.84: a few looks decide both, well
    # before n_max (about 15 / gap^2 * p(1 - p) draws for the nearer threshold).
    (0.4, (0.0, 0.25, 0.5), 100 + 1600),
])
def test_draws_spent_fall_where_the_theory_says(distance, radii, most_draws):
    plan = SequentialPlan(radii, SIGMA, 0.001, n_max=5000)
    smooth = Smooth(HalfSpace(), 2, SIGMA, generator=torch.Generator().manual_seed(0))
    prediction, radius, draws = smooth.certify_sequential(image_at(distance), 100, plan, 100)
    assert prediction == int(distance > 0) and draws <= most_draws
    assert radius == max(r for r in radii if r <= abs(distance))


def test_the_main_look_is_where_a_unanimous_image_certifies_the_largest_radius():
    plan = SequentialPlan(RADII, SIGMA, 0.001, n_max=5000)
    main = plan.alphas.index(max(plan.alphas[:-1]))
    n, top = plan.looks[main], threshold(RADII[-1], SIGMA)
    assert lower_confidence_bound(n, n, plan.alphas[main]) >= top
    assert lower_confidence_bound(n - 1, n - 1, plan.alphas[main]) < top


def two_class_counts(sequence):
    """A ``draw`` for :func:`run_sequential` whose draws are read from ``sequence`` of class
    ids, selection and estimation draws from separate positions of it."""
    selection, estimation = iter(sequence[:100]), iter(sequence[100:])

    def draw(n_selection, n_estimation):
        def counts(source, k):
            return torch.bincount(torch.tensor([next(source) for _ in range(k)], dtype=torch.long),
                                  minlength=2).numpy()
        return counts(selection, n_selection), counts(estimation, n_estimation)
    return draw


@pytest.mark.parametrize("first_selection,selection_draws", [
    ([1] * 8 + [0] * 2, SELECTION_FIRST),        # a lead of 6: settled
    ([1] * 7 + [0] * 3, 100),                    # a lead of 4: all n0 drawn
])
def test_selection_stops_early_only_on_a_clear_lead(first_selection, selection_draws):
    plan = SequentialPlan((0.0,), SIGMA, 0.001, n_max=200)
    sequence = first_selection + [1] * 90 + [1] * 200
    prediction, _, draws = run_sequential(two_class_counts(sequence), 100, plan)
    assert prediction == 1 and draws - plan.looks[0] == selection_draws


def test_an_image_on_the_boundary_runs_to_the_end_or_abstains():
    plan = SequentialPlan((0.0, 0.25), SIGMA, 0.001, n_max=800)
    smooth = Smooth(HalfSpace(), 2, SIGMA, generator=torch.Generator().manual_seed(0))
    prediction, radius, draws = smooth.certify_sequential(image_at(0.0), 100, plan, 100)
    assert radius == 0.0 and (prediction == ABSTAIN or draws == 100 + 800)


def test_the_schedule_spends_alpha_at_its_looks_and_ends_at_n_max():
    looks, alphas = look_schedule(1000, 0.001, threshold(1.0, 0.5))
    assert looks == (100, 200, 331, 431, 539, 674, 843, 1000)
    assert math.isclose(sum(alphas), 0.001) and alphas[2] == 0.0005
    # A main look that cannot come before n_max: early looks and n_max; none: one look.
    looks, alphas = look_schedule(300, 0.001, threshold(1.0, 0.5))
    assert looks == (100, 200, 300) and math.isclose(sum(alphas), 0.001)
    assert look_schedule(120, 0.001, threshold(1.0, 0.5)) == ((120,), (0.001,))


def test_the_draws_needed_for_a_radius_are_the_fewest_that_reach_it():
    for radius in (0.25, 0.5, 1.0, 1.2):
        needed = draws_to_reach(radius, SIGMA, 0.001)
        SequentialPlan((radius,), SIGMA, 0.001, needed)
        with pytest.raises(CadisError):
            SequentialPlan((radius,), SIGMA, 0.001, needed - 1)


def test_just_above_fixed_ns_need_the_plan_is_one_look_with_the_whole_alpha():
    # r = 1.5 at sigma 0.5 needs 5,114 unanimous draws at alpha, 5,152 at the last look of a
    # staged plan (0.95 alpha): between the two, only fixed n's single look reaches it.
    top, needed = threshold(1.5, SIGMA), draws_to_reach(1.5, SIGMA, 0.001)
    assert lower_confidence_bound(needed, needed, 0.001) >= top
    assert lower_confidence_bound(needed - 1, needed - 1, 0.001) < top
    staged = _staged_schedule(needed, 0.001, top)
    assert not any(lower_confidence_bound(n, n, a) >= top for n, a in zip(*staged))
    plan = SequentialPlan((0.0, 1.5), SIGMA, 0.001, needed)
    assert (plan.looks, plan.alphas) == ((needed,), (0.001,))
    # Where the staged looks do reach it, they are kept.
    assert len(SequentialPlan((0.0, 1.5), SIGMA, 0.001, 6000).looks) > 1


@pytest.mark.parametrize("n", [1000, 5120, 10_000, 100_000])
def test_the_sequential_grid_reaches_every_grid_radius_fixed_n_certifies(n):
    grid = radius_grid(SIGMA, n, 0.001, 28)
    reachable = reachable_radii(grid, SIGMA, 0.001, n)
    assert reachable == [r for r in grid if r <= max_certifiable_radius(SIGMA, n, 0.001)]
    assert reachable[-1] >= max_certifiable_radius(SIGMA, n, 0.001) - 0.25
    SequentialPlan(reachable, SIGMA, 0.001, n)


@pytest.mark.parametrize("radii,n_max,message", [
    ((), 1000, "needs radii to decide"),
    ((0.5, 0.25), 1000, "strictly increasing"),
    ((-0.25, 0.5), 1000, "finite numbers >= 0"),
    ((0.0, 1.25), 1000, "n = 1000 draws cannot certify radius 1.25 at sigma 0.5 sequentially "
                        "(alpha 0.001); it needs n >= 1109"),
])
def test_plans_that_cannot_work_are_refused_with_what_they_need(radii, n_max, message):
    with pytest.raises(CadisError) as error:
        SequentialPlan(radii, SIGMA, 0.001, n_max)
    assert message in str(error.value)


def test_a_radius_no_count_of_draws_can_certify_is_refused_by_name():
    with pytest.raises(CadisError, match="radius 20 at sigma 0.25 needs p_A = 1"):
        SequentialPlan((0.0, 20.0), 0.25, 0.001, 1000)


def test_the_forward_sizes_are_every_batch_a_sequential_run_makes():
    # What a compiled base is warmed on: record the batches a run really cuts its draws into.
    plan = SequentialPlan(RADII, SIGMA, 0.001, n_max=1000)
    seen = set()

    class Recording(HalfSpace):
        def forward(self, images):
            seen.add(len(images))
            return super().forward(images)

    smooth = Smooth(Recording(), 2, SIGMA, generator=torch.Generator().manual_seed(0))
    for distance in (0.0, 0.3, 0.6, 3.0):  # boundary cases run long, clear ones stop early
        smooth.certify_sequential(image_at(distance), 100, plan, 100)
    assert seen <= forward_sizes(plan, 100, 100) and len(seen) > 2
