"""The order of ranked trials: best first for one objective, a Pareto front first for two."""

from __future__ import annotations

import pytest

from cadis.sweeps.ranking import rank_trials
from cadis.sweeps.objective import Objective

MAX = Objective("certified_accuracy_r0.5", "max")


def rank(values, objectives):
    metrics = [{o.searched: value for o, value in zip(objectives, row)} for row in values]
    return rank_trials(list(range(len(values))), objectives, lambda i: metrics[i], lambda i: i)


def test_one_objective_is_best_first_ties_to_the_first_started():
    assert rank([[0.2], [0.5], [0.5], [0.1]], [MAX]) == [1, 2, 0, 3]
    assert rank([[0.2], [0.5], [0.1]], [Objective("loss", "min")]) == [2, 0, 1]


@pytest.mark.parametrize("values,order", [
    # The front {0, 2, 3} first, best at the first objective first; then dominated 1.
    ([[0.9, 0.1], [0.5, 0.1], [0.6, 0.6], [0.2, 0.8]], [0, 2, 3, 1]),
    # A trial best at the first objective but dominated comes after the whole front.
    ([[0.7, 0.2], [0.8, 0.5], [0.1, 0.9], [0.75, 0.1]], [1, 2, 3, 0]),
])
def test_two_objectives_take_the_front_first(values, order):
    assert rank(values, [MAX, Objective("certified_accuracy_r1.0", "max")]) == order


def test_trials_without_every_objective_are_left_out():
    metrics = [{"val_certified_accuracy_r0.5": 0.4}, {}, {"val_certified_accuracy_r0.5": 0.6}]
    assert rank_trials([0, 1, 2], [MAX], lambda i: metrics[i], lambda i: i) == [2, 0]
