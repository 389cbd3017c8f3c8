"""Means over training seeds against a reference (cadis/smoothing/seed_means.py) and
`cadis analyze --over-seeds`: hand-made records whose means, ranges and family are known."""

from __future__ import annotations

import pytest

from cadis.errors import CadisError
from cadis.smoothing.multiplicity import holm
from cadis.smoothing.paired import Certification, compare
from cadis.smoothing.records import NOISE_PER_IMAGE, RECORDS_FILENAME
from cadis.smoothing.seed_means import (
    adjusted_p_values,
    compare_seed_means,
    format_seed_means,
    group_by_arm,
)
from tests.test_paired import HAND_A, HAND_B, _analyze, folder, records_of

RADII = [0.0, 0.5]
# A third seed: certifies images 0-3 at 0.6, abstains on the rest.
HAND_C = [0.6] * 4 + [None] * 9


def certification(tmp_path, name: str, radii: list[float | None], **settings) -> Certification:
    path = folder(tmp_path, name, records_of(radii), noise=NOISE_PER_IMAGE, **settings)
    return Certification.read(name, path / RECORDS_FILENAME)


def test_one_seed_a_side_is_the_paired_comparison(tmp_path):
    a, b = certification(tmp_path, "a", HAND_A), certification(tmp_path, "b", HAND_B)
    [means] = compare_seed_means([b], {"a": [a]}, RADII)
    paired = compare(a.records, b.records, RADII)
    assert means.seeds == 1
    assert (means.resamples, means.seed) == (paired.resamples, paired.seed)
    assert means.accuracy[:-1] == pytest.approx([t.accuracy_a for t in paired.tests])
    assert means.reference_accuracy[:-1] == pytest.approx([t.accuracy_b for t in paired.tests])
    assert sum(means.intervals[:-1], ()) == pytest.approx(sum(paired.intervals, ()))
    assert means.intervals[-1] == pytest.approx(paired.acr_interval)
    # The sign-flip test of 0/±1 differences is McNemar's test by permutation: at r = 0.5
    # (8 against 2 discordant) its p is McNemar's 0.109 up to the resampling's error.
    assert means.p_values[1] == pytest.approx(paired.tests[1].p_value, abs=0.02)


def test_the_mean_over_seeds_its_range_and_the_family(tmp_path):
    reference = certification(tmp_path, "ref", HAND_B)
    seeds = [certification(tmp_path, name, radii)
             for name, radii in (("a1", HAND_A), ("a2", HAND_B), ("a3", HAND_C))]
    twin = [certification(tmp_path, "b1", HAND_B)]
    means, same = compare_seed_means([reference], {"a": seeds, "b": twin}, RADII)
    # At r = 0.5 the seeds certify 10, 4 and 4 of 13 images; the reference 4.
    assert means.accuracy[1] == pytest.approx((10 + 4 + 4) / 3 / 13)
    assert means.seed_range[1] == pytest.approx((4 / 13, 10 / 13))
    assert means.reference_accuracy[1] == pytest.approx(4 / 13)
    low, high = means.intervals[1]
    assert low <= means.accuracy[1] - means.reference_accuracy[1] <= high
    # A twin of the reference differs on no image: p = 1, a zero-width interval.
    assert same.p_values == (1.0, 1.0) and same.intervals[1] == (0.0, 0.0)
    # Holm over every arm and radius: one family of four.
    flat = [*means.p_values, *same.p_values]
    assert sum(adjusted_p_values([means, same], "holm"), []) == pytest.approx(holm(flat))


def test_a_p_at_the_floor_of_the_resamples_reads_as_a_bound(tmp_path):
    # 40 images that only the arm certifies: no flip of 10,000 reaches it, so p is the floor
    # 1 / 10,001, a bound, and so is Holm's multiple of it; a twin's p = 1 is not a bound.
    reference = certification(tmp_path, "ref", [None] * 40)
    arm = [certification(tmp_path, "a1", [0.6] * 40)]
    twin = [certification(tmp_path, "b1", [None] * 40)]
    comparisons = compare_seed_means([reference], {"a": arm, "b": twin}, RADII)
    assert comparisons[0].p_values == pytest.approx((1 / 10_001, 1 / 10_001))
    table = format_seed_means("ref", [reference], comparisons, "holm")
    row = next(line for line in table.splitlines() if line.startswith("| 0.5 |"))
    assert "| ≤1.0e-04 | ≤4.0e-04 |" in row and row.endswith("| 1.000 | 1.000 |")
    assert "≤: no resample reached the difference" in table


def test_a_seed_on_other_settings_is_refused(tmp_path):
    reference = certification(tmp_path, "ref", HAND_B)
    other = certification(tmp_path, "a1", HAND_A, sigma=0.25)
    with pytest.raises(CadisError, match="sigma 0.5 in "):
        compare_seed_means([reference], {"a": [other]}, RADII)


def test_labels_group_by_arm():
    assert group_by_arm(["off", "ft@1", "ce@1", "ft@2"]) == {"off": [0], "ft": [1, 3],
                                                             "ce": [2]}
    with pytest.raises(CadisError, match="ARM@SEED"):
        group_by_arm(["ft@"])


def test_analyze_over_seeds_prints_every_seed_then_the_means_with_holm(tmp_path, capsys):
    folders = [folder(tmp_path, name, records_of(radii), noise=NOISE_PER_IMAGE)
               for name, radii in (("ref", HAND_B), ("a1", HAND_A), ("a2", HAND_C))]
    code, out, _ = _analyze(capsys, *folders, "--labels", "off", "ft@1", "ft@2",
                            "--over-seeds", "--radii", "0,0.5")
    assert code == 0
    assert "| radius | off | ft@1 | ft@2 |" in out
    assert "| radius | off (1) | ft (2) | lowest–highest seed | ft − off |" in out
    assert "Holm p adjusted over one family of 2 tests" in out
    # r = 0.5: the seeds certify 10 and 4 of 13 (mean 0.538), the reference 4 (0.308).
    assert "| 0.5 | 0.308 | 0.538 | 0.308–0.769 | +0.231 |" in out


@pytest.mark.parametrize("labels,extra,fragment", [
    (["off", "ft@1"], ["--baseline", "ce"], "--baseline 'ce' is none of the arms: off, ft"),
    (["ft@1", "ft@2"], [], "--over-seeds compares arms: the labels name one (ft)"),
    (["off", "ft@"], [], "a seed's label is ARM@SEED"),
])
def test_analyze_over_seeds_refuses_in_one_line(tmp_path, capsys, labels, extra, fragment):
    folders = [folder(tmp_path, name, records_of(HAND_A)) for name in ("x", "y")]
    code, out, err = _analyze(capsys, *folders, "--labels", *labels, "--over-seeds", *extra)
    assert code == 2 and out == "" and fragment in err and err.count("\n") == 1
