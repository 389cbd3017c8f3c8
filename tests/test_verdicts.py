"""A decision's statistics: Holm's and Benjamini-Hochberg's adjusted p-values
(cadis/smoothing/multiplicity.py) against hand-computed cases and, where it is installed on a
side path, statsmodels; the sign-flip permutation test; the leader's paired verdicts and the
sentence that tells them (cadis/smoothing/verdicts.py)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

from cadis.errors import CadisError
from cadis.smoothing.multiplicity import adjust, benjamini_hochberg, holm
from cadis.smoothing.paired import mcnemar_p, sign_flip_p
from cadis.smoothing.records import Record
from cadis.smoothing.verdicts import Verdict, describe_verdicts, paired_verdicts

#: Where statsmodels may be installed as an oracle, never into the venv:
#: ``pip install --target /tmp/oracle statsmodels``.
ORACLE_PATH = Path("/tmp/oracle")
RESAMPLES = 2_000


# ------------------------------------------------------------------------ adjusted p-values


@pytest.mark.parametrize(("raw", "expected_holm", "expected_bh"), [
    # m = 4 in the order given: sorted 0.01, 0.03, 0.04, 0.2 -> Holm 4*0.01, 3*0.03, max(2*0.04,
    # 0.09), 0.2; BH 0.04, min(4/2*0.03, 4/3*0.04)=0.0533, 0.0533, 0.2.
    ([0.01, 0.04, 0.03, 0.2], [0.04, 0.09, 0.09, 0.2], [0.04, 0.16 / 3, 0.16 / 3, 0.2]),
    # Capped at 1 and ties kept equal.
    ([0.5, 0.5, 0.9], [1.0, 1.0, 1.0], [0.75, 0.75, 0.9]),
    ([0.0, 1.0], [0.0, 1.0], [0.0, 1.0]),
    ([0.03], [0.03], [0.03]),
    ([], [], []),
])
def test_adjusted_p_values_by_hand(raw, expected_holm, expected_bh):
    np.testing.assert_allclose(holm(raw), expected_holm, atol=1e-12)
    np.testing.assert_allclose(benjamini_hochberg(raw), expected_bh, atol=1e-12)
    np.testing.assert_allclose(adjust(raw, "holm"), expected_holm, atol=1e-12)


def _random_families() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    families = [rng.uniform(size=size) for size in (1, 2, 5, 17, 60)]
    families.append(rng.uniform(size=30) ** 4)  # many small ones
    families.append(np.round(rng.uniform(size=20), 1))  # ties
    return families


@pytest.mark.parametrize("raw", _random_families())
def test_adjusted_p_values_are_monotone_capped_and_never_below_the_raw(raw):
    for adjusted in (holm(raw), benjamini_hochberg(raw)):
        assert not np.isnan(adjusted).any()
        assert (adjusted >= raw - 1e-15).all() and (adjusted <= 1.0).all()
        order = np.argsort(raw, kind="stable")
        assert (np.diff(adjusted[order]) >= -1e-15).all()
    # Holm controls more than BH promises: it never rejects more.
    assert (holm(raw) >= benjamini_hochberg(raw) - 1e-15).all()


def test_adjusted_p_values_match_statsmodels(monkeypatch):
    if not ORACLE_PATH.is_dir():
        pytest.skip(f"no oracle at {ORACLE_PATH} (pip install --target {ORACLE_PATH} "
                    "statsmodels)")
    monkeypatch.setattr(sys, "path", [*sys.path, str(ORACLE_PATH)])
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    for raw in _random_families():
        np.testing.assert_allclose(holm(raw), multitest.multipletests(raw, method="holm")[1],
                                   atol=1e-12)
        np.testing.assert_allclose(benjamini_hochberg(raw),
                                   multitest.multipletests(raw, method="fdr_bh")[1],
                                   atol=1e-12)


@pytest.mark.parametrize(("raw", "correction", "fragment"), [
    ([0.1, float("nan")], "holm", "lie in [0, 1]"),
    ([1.5], "bh", "lie in [0, 1]"),
    ([-0.1], "holm", "lie in [0, 1]"),
    ([0.1], "bonferroni", "correction must be one of holm, bh, got 'bonferroni'"),
])
def test_bad_p_values_or_corrections_are_refused_in_one_line(raw, correction, fragment):
    with pytest.raises(CadisError) as error:
        adjust(raw, correction)
    assert fragment in str(error.value) and "\n" not in str(error.value)


# --------------------------------------------------------------------------- sign-flip test


def test_sign_flip_p_is_seeded_valid_and_sees_a_shift():
    rng = np.random.default_rng(3)
    shifted = rng.normal(0.3, 1.0, size=(200, 1))
    centred = rng.normal(0.0, 1.0, size=(200, 1))
    both = np.hstack([shifted, centred, np.zeros((200, 1))])
    p = sign_flip_p(both, RESAMPLES, seed=1)
    np.testing.assert_array_equal(p, sign_flip_p(both, RESAMPLES, seed=1))
    assert p[0] < 0.01 < p[1]
    assert p[2] == 1.0  # nothing differs
    assert (p >= 1 / (RESAMPLES + 1)).all()


def test_sign_flip_p_of_few_images_is_close_to_the_exact_enumeration():
    # Three images differing by 1, 2 and 3: of the 8 sign patterns, |sum| >= 6 for 2 (all +,
    # all -), so the exact p is 1/4.
    p = sign_flip_p(np.array([[1.0], [2.0], [3.0]]), 20_000, seed=0)
    assert abs(p[0] - 0.25) < 0.01


# ----------------------------------------------------------------------------- the verdicts


def contender(certified: list[bool], radius: float = 1.0, start: int = 0) -> list[Record]:
    """One record per image (indices start, start + 1, ...): certified at ``radius`` where
    True, a wrong prediction where False."""
    return [Record(start + i, i % 10, i % 10 if ok else (i + 1) % 10, radius if ok else 0.0,
                   ok, 0.1) for i, ok in enumerate(certified)]


#: The leader of the radius cases certifies the first LEADER_CERTIFIED images.
LEADER_CERTIFIED = 130


def leading(images: int) -> list[bool]:
    return [i < LEADER_CERTIFIED for i in range(images)]


def trailing(images: int, only_leader: int, only_other: int) -> list[bool]:
    """Against :func:`leading`: the first ``only_leader`` images certified by the leader alone,
    the next ``only_other`` after the leader's by the other alone."""
    return [only_leader <= i < LEADER_CERTIFIED + only_other for i in range(images)]


def test_radius_verdicts_have_mcnemar_p_holm_and_the_bootstrap_interval():
    records = {"near": contender(trailing(200, 3, 2)), "lead": contender(leading(200)),
               "far": contender(trailing(200, 30, 2))}
    verdicts = paired_verdicts("lead", records, "certified_accuracy_r0.5", radius=0.5,
                               resamples=RESAMPLES)
    assert [v.other for v in verdicts] == ["near", "far"]
    near_v, far_v = verdicts
    assert near_v.discordant == (3, 2) and far_v.discordant == (30, 2)
    assert near_v.images == far_v.images == 200
    assert near_v.difference == pytest.approx(-1 / 200)
    assert far_v.difference == pytest.approx(-28 / 200)
    raw = [mcnemar_p(3, 2), mcnemar_p(30, 2)]
    assert [near_v.p, far_v.p] == pytest.approx(raw)
    assert [near_v.p_adjusted, far_v.p_adjusted] == pytest.approx(list(holm(raw)))
    assert far_v.high < 0 < near_v.high and near_v.low < 0
    assert far_v.separated and not near_v.separated
    assert all(v.leader == "lead" and v.metric == "certified_accuracy_r0.5" for v in verdicts)
    # Deterministic for a seed; another seed moves the interval, not the test.
    again = paired_verdicts("lead", records, "certified_accuracy_r0.5", radius=0.5,
                            resamples=RESAMPLES)
    assert again == verdicts
    reseeded = paired_verdicts("lead", records, "certified_accuracy_r0.5", radius=0.5,
                               resamples=RESAMPLES, seed=9)
    assert [v.p for v in reseeded] == [v.p for v in verdicts]


def test_holm_can_leave_a_raw_p_below_alpha_inseparable():
    # Raw McNemar p 0.0075, 0.035 and 0.057; Holm: 3 x 0.0075 = 0.023 (separated), then
    # 2 x 0.035 = 0.070 and max(0.057, 0.070): b's raw p is below 0.05, its adjusted one not.
    verdicts = paired_verdicts("lead", {"lead": contender(leading(300)),
                                        "a": contender(trailing(300, 15, 3)),
                                        "b": contender(trailing(300, 12, 3)),
                                        "c": contender(trailing(300, 11, 3))},
                               "certified_accuracy_r0.5", radius=0.5, resamples=RESAMPLES)
    b_verdict = verdicts[1]
    assert b_verdict.p < 0.05 <= b_verdict.p_adjusted and not b_verdict.separated
    assert verdicts[0].separated


def test_acr_verdicts_use_the_per_image_radii():
    rng = np.random.default_rng(0)
    images = 150
    lead = [Record(i, 0, 0, float(r), True, 0.1) for i, r in enumerate(rng.uniform(0.5, 1.5,
                                                                              images))]
    behind = [dataclasses.replace(record, radius=record.radius - 0.2) for record in lead]
    same = [dataclasses.replace(record, radius=record.radius + (0.01 if i % 2 else -0.01))
            for i, record in enumerate(lead)]
    verdicts = paired_verdicts("lead", {"lead": lead, "behind": behind, "same": same}, "acr",
                               radius=None, resamples=RESAMPLES)
    behind_v, same_v = verdicts
    assert behind_v.difference == pytest.approx(-0.2)
    assert behind_v.low == pytest.approx(-0.2) and behind_v.high == pytest.approx(-0.2)
    assert behind_v.discordant == (images, 0) and behind_v.separated
    assert behind_v.p == pytest.approx(1 / (RESAMPLES + 1))
    assert same_v.discordant == (images // 2, images - images // 2)
    assert not same_v.separated and same_v.p > 0.5


def test_records_in_another_order_are_paired_by_image():
    shuffled = list(reversed(contender(trailing(150, 6, 1))))
    verdicts = paired_verdicts("lead", {"lead": contender(leading(150)), "x": shuffled},
                               "certified_accuracy_r1", radius=1.0, resamples=RESAMPLES)
    assert verdicts[0].discordant == (6, 1)


@pytest.mark.parametrize(("records", "fragment"), [
    ({"lead": contender([True] * 5), "x": contender([True] * 5, start=1)},
     "lead and x certify different images: lead has 5 images, x 5; 4 in common"),
    ({"lead": contender([True] * 5), "x": contender([True] * 4)},
     "lead has 5 images, x 4"),
    ({"other": contender([True] * 5)}, "the leader 'lead' is not among the contenders"),
])
def test_other_images_or_a_missing_leader_are_refused_naming_them(records, fragment):
    with pytest.raises(CadisError) as error:
        paired_verdicts("lead", records, "acr", radius=None, resamples=RESAMPLES)
    assert fragment in str(error.value)


def test_a_lone_leader_has_no_verdicts():
    assert paired_verdicts("lead", {"lead": contender([True])}, "acr", radius=None) == []


# ----------------------------------------------------------------------------- the sentence


def verdict(other: str, difference: float, low: float, high: float, p: float,
            separated: bool) -> Verdict:
    return Verdict("lead", other, "certified_accuracy_r0.5", 100, difference, low, high, p / 2,
                   p, separated, (0, 0))


def test_the_sentence_separates_ahead_from_inseparable_and_states_the_tie_break():
    text = describe_verdicts([verdict("incumbent", -0.04, -0.07, -0.01, 0.01, True),
                              verdict("Y", -0.01, -0.03, 0.01, 0.6, False),
                              verdict("Z", 0.0, -0.02, 0.02, 1.0, False)],
                             "fewer trainable parameters")
    assert text == ("ahead of incumbent by +0.040 [+0.010, +0.070], p = 0.010 (Holm); "
                    "inseparable from Y (-0.010 [-0.030, +0.010], p = 0.600) and "
                    "Z (+0.000 [-0.020, +0.020], p = 1.000); "
                    "chosen among them by fewer trainable parameters")


def test_the_sentence_never_calls_an_inseparable_leader_best():
    # A raw p below alpha with an interval through 0 is not separated.
    text = describe_verdicts([verdict("Y", -0.02, -0.04, 0.0, 0.04, False)], "trial order")
    assert text.startswith("inseparable from Y") and "ahead" not in text
    assert "best" not in text and text.endswith("chosen among them by trial order")


def test_a_separated_contender_ahead_of_the_leader_is_said_so():
    text = describe_verdicts([verdict("Y", 0.05, 0.02, 0.08, 0.001, True),
                              verdict("Z", -0.05, -0.08, -0.02, 0.001, True)], "unused")
    assert text == ("ahead of Z by +0.050 [+0.020, +0.080], p = 0.001 (Holm); "
                    "behind Y by -0.050 [-0.080, -0.020], p = 0.001 (Holm)")
    assert "chosen among them" not in text


def test_the_sentence_of_no_verdicts_or_of_several_decisions():
    assert describe_verdicts([], "x") == "compared with no other contender"
    mixed = [verdict("Y", 0.0, -0.1, 0.1, 1.0, False),
             dataclasses.replace(verdict("Z", 0.0, -0.1, 0.1, 1.0, False), metric="acr")]
    with pytest.raises(CadisError, match="several decisions"):
        describe_verdicts(mixed, "x")
