"""ASHA's cuts rebuilt from the trials' per-epoch proxy (cadis.sweeps.asha_cuts): the cut a
stopped trial met is Ray's quantile of the values recorded at the rung before it, in the order
trials reached it, and a stop is within the proxy's noise when the value lay less than 2 SEs
of the difference below it. Hand-made numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cadis.sweeps.asha_cuts import (
    NOISE_SES,
    ProxyPoint,
    RungTally,
    TrialProxy,
    quantile_with_se,
    ray_milestones,
    rebuild_cuts,
    stopped_line,
    sweep_milestones,
    tally,
)


def trial(name, order, values, ses=None, stopped=False, logged=None):
    """A trial's points at epochs 1, 2, ...; ``logged``: when each was logged (ms)."""
    ses = ses or [None] * len(values)
    logged = logged or [1000 * order] * len(values)
    return TrialProxy(name, tuple(ProxyPoint(epoch + 1, value, se, stamp) for epoch, (
        value, se, stamp) in enumerate(zip(values, ses, logged))), stopped, order)


def test_the_milestones_are_rays():
    # Tune's max_t is the sweep's + 1: with max_t 4 the rung at 4 exists and is reached.
    assert ray_milestones(1, 2, 5) == [1, 2, 4]
    assert sweep_milestones({"grace_period": 1, "reduction_factor": 2, "max_t": 4}) == [1, 2, 4]
    assert sweep_milestones({"grace_period": 1, "reduction_factor": 2, "max_t": 3}) == [1, 2]
    assert sweep_milestones({"grace_period": 1, "reduction_factor": 3, "max_t": 9}) == [1, 3, 9]
    assert sweep_milestones({"grace_period": 2, "reduction_factor": 1.5, "max_t": 4}) == [
        2, 3.0]


@pytest.mark.parametrize("values", [[0.5], [0.5, 0.6], [0.3, 0.1, 0.2], [0.4, 0.4, 0.1, 0.9]])
@pytest.mark.parametrize("rf", [2, 3, 4])
def test_the_cut_is_numpys_percentile_as_ray_takes_it(values, rf):
    cut, _ = quantile_with_se([(value, 0.01) for value in values], 1 - 1 / rf)
    assert cut == pytest.approx(np.nanpercentile(values, (1 - 1 / rf) * 100))


def test_the_se_at_the_cut_is_interpolated_as_the_cut_is():
    # Median of 0.2 (SE 0.01) and 0.4 (SE 0.03): halfway, 0.3 with SE 0.02.
    cut, se = quantile_with_se([(0.4, 0.03), (0.2, 0.01)], 0.5)
    assert (cut, se) == (pytest.approx(0.3), pytest.approx(0.02))
    assert quantile_with_se([(0.4, None), (0.2, 0.01)], 0.5)[1] is None


def test_a_stop_within_noise_and_one_beyond():
    # Rung 1, rf 2: A 0.50 and B 0.60 arrive first (no cut for A, B above 0.50). C 0.52
    # meets the median of {0.50, 0.60} = 0.55 (SE 0.02): gap 0.03 < 2 * hypot(0.01, 0.02) =
    # 0.0447, within noise. D 0.40 meets the median of {0.50, 0.60, 0.52} = C's 0.52 (SE
    # 0.01): gap 0.12 > 2 * hypot(0.01, 0.01) = 0.028, beyond.
    trials = [trial("A", 0, [0.50, 0.7], [0.02, 0.02]),
              trial("B", 1, [0.60, 0.8], [0.02, 0.02]),
              trial("C", 2, [0.52], [0.01], stopped=True),
              trial("D", 3, [0.40], [0.01], stopped=True)]
    c, d = rebuild_cuts(trials, [1, 2], 2, "max")
    assert (c.trial, c.epoch, c.cut, c.cut_se) == ("C", 1, pytest.approx(0.55),
                                                  pytest.approx(0.02))
    assert c.gap == pytest.approx(0.03) and c.within_noise is True and c.reproduced
    assert (d.trial, d.cut, d.cut_se) == ("D", pytest.approx(0.52), pytest.approx(0.01))
    assert d.gap == pytest.approx(0.12) and d.within_noise is False
    # The band is NOISE_SES SEs of the difference, the two SEs combined as independent.
    assert NOISE_SES * math.hypot(0.01, 0.02) > 0.03 > NOISE_SES * math.hypot(0.01, 0.0)
    assert tally([c, d]) == [RungTally(epoch=1, stopped=2, within=1, unknown=0)]


def test_trials_reach_a_rung_in_the_order_they_were_logged_not_started():
    # C started last but reached the rung first: it met no cut. A, last, meets the median
    # of C's and B's values.
    trials = [trial("A", 0, [0.30], [0.01], stopped=True, logged=[3000]),
              trial("B", 1, [0.60], [0.01], logged=[2000]),
              trial("C", 2, [0.50], [0.01], logged=[1000])]
    [cut] = rebuild_cuts(trials, [1], 2, "max")
    assert cut.trial == "A" and cut.cut == pytest.approx(0.55)


def test_the_incumbents_values_enter_the_rungs_and_a_later_rung_cuts_on_its_own():
    # The incumbent (never stopped) and B pass rung 1; at rung 2 only the incumbent's 0.8 is
    # there before B arrives with 0.7: B meets 0.8 (rf 2 of one value is that value).
    trials = [trial("incumbent", 0, [0.5, 0.8, 0.9], [0.05] * 3),
              trial("B", 1, [0.6, 0.7], [0.05, 0.05], stopped=True)]
    [cut] = rebuild_cuts(trials, [1, 2], 2, "max")
    assert (cut.epoch, cut.rung, cut.cut) == (2, 2, pytest.approx(0.8))
    assert cut.within_noise is True  # 0.1 < 2 * hypot(0.05, 0.05) = 0.141


def test_a_min_metric_is_cut_from_below():
    # Lower is better: B's loss 0.9 meets A's 0.5 from the wrong side.
    trials = [trial("A", 0, [0.5]), trial("B", 1, [0.9], stopped=True)]
    [cut] = rebuild_cuts(trials, [1], 2, "min")
    assert cut.cut == pytest.approx(0.5) and cut.gap == pytest.approx(0.4)
    assert cut.reproduced and cut.within_noise is None  # no SE logged


def test_the_line_counts_per_rung_and_names_what_it_cannot_judge():
    trials = [trial("A", 0, [0.50, 0.7], [0.02, 0.02]),
              trial("B", 1, [0.60, 0.8], [0.02, 0.02]),
              trial("C", 2, [0.52], [0.01], stopped=True),
              trial("D", 3, [0.40], [0.01], stopped=True),
              trial("E", 4, [0.9, 0.60], [0.02, None], stopped=True)]
    cuts = rebuild_cuts(trials, [1, 2], 2, "max")
    assert [(rung.epoch, rung.stopped, rung.within, rung.unknown) for rung in tally(cuts)] == [
        (1, 2, 1, 0), (2, 1, 0, 1)]
    assert stopped_line(cuts, 4, "proxy_acr") == (
        "ASHA stopped 4 trials; within the proxy's noise of the cut they met (2 unpaired SEs): "
        "at epoch 1, 1 of 2; at epoch 2, 1 (no SE logged for proxy_acr); "
        "1 not at a rung's cut")
    assert stopped_line([], 0, "proxy_acr") == "ASHA stopped no trial"


def test_a_first_arrival_meets_no_cut():
    # Alone at the rung, nothing is recorded before it: Ray cannot have cut it there.
    assert rebuild_cuts([trial("A", 0, [0.1], stopped=True)], [1], 2, "max") == []


def test_the_rebuilt_cuts_are_those_rays_bracket_makes():
    """Random trials replayed through Ray's own _Bracket (one bracket, Tune's max_t the
    sweep's + 1): the trials it stops are those rebuilt with a cut that stops them, each at the
    cut Ray computed."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler
    from ray.tune.schedulers.async_hyperband import _Bracket

    random = np.random.default_rng(7)
    scheduler = {"grace_period": 1, "reduction_factor": 2, "max_t": 4}
    bracket = _Bracket(1, scheduler["max_t"] + 1, scheduler["reduction_factor"], 0)
    trials, stops, alive = [], {}, list(range(12))
    curves = {index: random.uniform(0.3, 0.6, 4).round(3).tolist() for index in alive}
    reached = {index: 0 for index in alive}
    clock = 0
    while alive:  # trials report in a random interleaving, as concurrent trials do
        index = alive[int(random.integers(len(alive)))]
        epoch = reached[index] + 1
        reached[index] = epoch
        clock += 1
        value = curves[index][epoch - 1]
        name = f"t{index}"
        before = {milestone: (bracket.cutoff(recorded), name in recorded)
                  for milestone, recorded in bracket._rungs}
        if bracket.on_result(SimpleNamespace(trial_id=name), epoch, value) == \
                TrialScheduler.STOP:
            # The cut of the rung this result entered.
            stops[name] = next(before[milestone][0] for milestone, recorded in bracket._rungs
                               if name in recorded and not before[milestone][1])
            alive.remove(index)
        elif epoch == 4:
            alive.remove(index)
        curves[index][epoch - 1] = (value, clock)
    for index, curve in curves.items():
        points = tuple(ProxyPoint(epoch + 1, value, 0.01, stamp)
                       for epoch, (value, stamp) in enumerate(curve[:reached[index]]))
        trials.append(TrialProxy(f"t{index}", points, f"t{index}" in stops, index))
    cuts = rebuild_cuts(trials, sweep_milestones(scheduler), 2, "max")
    assert len(stops) >= 3 and {cut.trial: cut.cut for cut in cuts} == pytest.approx(stops)
    assert all(cut.reproduced for cut in cuts)
