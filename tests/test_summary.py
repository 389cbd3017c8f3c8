"""The end-of-sweep summary's words over several training seeds (cadis.sweeps.summary): a
configuration is called ahead or behind only where every seed separates it the same way."""

from __future__ import annotations

import pytest

from cadis.smoothing.verdicts import Verdict
from cadis.sweeps.summary import seed_verdict, turned


def verdict(difference: float, separated: bool) -> Verdict:
    low, high = (difference - 0.01, difference + 0.01) if separated else (-0.01, 0.01)
    return Verdict("chosen", "other", "acr", 100, difference, low, high, 0.001, 0.002,
                   separated, (3, 1))


@pytest.mark.parametrize("seeds,words", [
    ([verdict(-0.05, True), verdict(-0.03, True)], "ahead on every seed"),
    ([verdict(0.05, True), verdict(0.03, True)], "behind on every seed"),
    ([verdict(-0.05, True), verdict(-0.01, False)],
     "separated on 1 of 2 seeds: the seeds do not separate them"),
    # Separated both ways: no direction holds over the seeds.
    ([verdict(-0.05, True), verdict(0.05, True)],
     "separated on 2 of 2 seeds: the seeds do not separate them"),
    ([verdict(0.0, False)], "separated on 0 of 1 seeds: the seeds do not separate them"),
], ids=["ahead", "behind", "one-seed", "both-ways", "none"])
def test_the_seeds_call_a_configuration_ahead_only_when_every_seed_does(seeds, words):
    assert seed_verdict(seeds) == words


def test_a_verdict_reads_as_the_chosen_minus_the_other():
    assert turned(verdict(-0.05, True)) == "+0.050 [+0.040, +0.060]"
    assert turned(verdict(0.0, False)) == "+0.000 [-0.010, +0.010]"


def test_a_configuration_alone_on_test_still_gets_its_spread_over_seeds():
    from cadis.sweeps.choice import Choice
    from cadis.sweeps.summary import seed_lines

    seeds = {"t1": {"seeds": {0: {}, 1: {}}, "mean": {"acr": 0.5, "num_images": 3.0},
                    "range": {"acr": [0.4, 0.6], "num_images": [3.0, 3.0]}}}
    assert seed_lines(Choice("t1", "t1", (), (), seeds), "acr") == [
        "  test over 2 training seeds (3 images), acr: chosen t1 0.500 [0.400-0.600]"]
    # One seed: the test figures above say it all.
    one = {"t1": {**seeds["t1"], "seeds": {0: {}}}}
    assert seed_lines(Choice("t1", "t1", (), (), one), "acr") == []
