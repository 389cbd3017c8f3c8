"""An arm trained with several seeds against a reference, as one: its certified accuracy
averaged over the seeds, and whether that mean differs from the reference's beyond noise.

Every seed of every arm certifies the same images as the reference (checked as
:func:`~cadis.smoothing.paired.check_pairable` checks a pair). For image ``i`` at radius ``r``
each certification says certified or not (``c_s,i``; for ACR the certified radius); the image's
difference is the mean over the arm's seeds minus the mean over the reference's,
``d_i = mean_s c_s,i - mean_t b_t,i``, and the mean of ``d_i`` over the images is the arm's
accuracy averaged over its seeds minus the reference's. The images are the unit, as in a
paired test of two certifications:

- the p-value is the paired sign-flip permutation test of "the mean of ``d`` is 0"
  (:func:`~cadis.smoothing.paired.sign_flip_p`; with one seed a side it tests what McNemar's
  test tests, by permutation);
- the interval is the paired bootstrap's over the images
  (:func:`~cadis.smoothing.paired.paired_bootstrap`), one resampling for every radius;
- the p-values of every arm at every radius are one family, adjusted together
  (:func:`~cadis.smoothing.multiplicity.adjust`).

What the test says: whether these trained models, averaged, certify these images differently
from the reference beyond the noise of the images and the draws. It does not say how a fourth
seed would fare (three seeds say little about the spread of training); each arm's lowest and
highest seed are given beside its mean so the reader sees that spread.

Torch-free, as :mod:`cadis.smoothing.paired`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from cadis.errors import CadisError
from cadis.smoothing.multiplicity import CORRECTION_CONTROLS, CORRECTION_NAMES, adjust_grouped
from cadis.smoothing.paired import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    CONFIDENCE,
    Certification,
    aligned,
    certified_matrix,
    certified_radii,
    check_pairable,
    describe_settings,
    format_interval,
    format_p,
    format_signed,
    paired_bootstrap,
    sign_flip_floor,
    sign_flip_p,
)
from cadis.smoothing.records import MARKDOWN_DIGITS, TableFormat, radius_key, render_table

#: How a label names an arm's seed: ``ft_cadis@2`` is seed 2 of the arm ``ft_cadis``.
SEED_SEPARATOR: Final = "@"


@dataclass(frozen=True)
class SeedMeanComparison:
    """An arm's certifications (one per training seed) against the reference's, per radius
    and in ACR (the last entry of every tuple): the arm's mean over its seeds, its lowest and
    highest seed, the reference's mean, the interval of the difference; a p-value per radius
    (none for ACR); the ``resamples`` and ``seed`` of the bootstrap and the sign flips."""

    label: str
    seeds: int
    radii: tuple[float, ...]
    accuracy: tuple[float, ...]
    seed_range: tuple[tuple[float, float], ...]
    reference_accuracy: tuple[float, ...]
    intervals: tuple[tuple[float, float], ...]
    p_values: tuple[float, ...]
    resamples: int
    seed: int


def group_by_arm(labels: Sequence[str]) -> dict[str, list[int]]:
    """The positions of ``labels`` by arm, in order of first appearance: ``ARM@SEED`` is a seed
    of ``ARM``; a label without :data:`SEED_SEPARATOR` is an arm of one certification.
    :class:`CadisError` for an empty arm or seed name."""
    arms: dict[str, list[int]] = {}
    for position, label in enumerate(labels):
        arm, separator, seed = label.partition(SEED_SEPARATOR)
        if not arm or (separator and not seed):
            raise CadisError(f"label {label!r}: a seed's label is ARM{SEED_SEPARATOR}SEED, "
                             f"e.g. ft_cadis{SEED_SEPARATOR}1")
        arms.setdefault(arm, []).append(position)
    return arms


def _seed_values(reference: Certification, certifications: Sequence[Certification],
                 radii: Sequence[float]) -> np.ndarray:
    """``[seed, image, radius and ACR]`` of ``certifications`` in the reference's image order."""
    values = []
    for certification in certifications:
        check_pairable(reference, certification)
        _, records = aligned(reference.records, certification.records)
        values.append(np.column_stack([certified_matrix(records, radii),
                                       certified_radii(records)]))
    return np.stack(values).astype(float)


def compare_seed_means(reference: Sequence[Certification],
                       arms: Mapping[str, Sequence[Certification]], radii: Sequence[float],
                       resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> list[SeedMeanComparison]:
    """Each arm's seeds against the ``reference``'s (one certification or several seeds), per
    radius and in ACR, as the module docstring says; every certification is checked pairable
    with the reference's first before anything is computed. Reproducible: the same records,
    ``resamples`` and ``seed`` give the same intervals and p-values."""
    if not reference or not arms or not all(arms.values()):
        raise CadisError("a comparison of seed means needs a reference and one or more arms, "
                         "each with one certification or more")
    first = reference[0]
    reference_values = _seed_values(first, reference, radii)
    arm_values = {label: _seed_values(first, certifications, radii)
                  for label, certifications in arms.items()}
    reference_mean = reference_values.mean(axis=0)
    comparisons = []
    for label, values in arm_values.items():
        arm_mean = values.mean(axis=0)
        low, high = paired_bootstrap(arm_mean, reference_mean, resamples, seed)
        p_values = sign_flip_p((arm_mean - reference_mean)[:, :-1], resamples, seed)
        per_seed = values.mean(axis=1)
        comparisons.append(SeedMeanComparison(
            label, len(values), tuple(float(r) for r in radii),
            tuple(float(v) for v in per_seed.mean(axis=0)),
            tuple((float(lo), float(hi)) for lo, hi in zip(per_seed.min(axis=0),
                                                           per_seed.max(axis=0))),
            tuple(float(v) for v in reference_mean.mean(axis=0)),
            tuple((float(lo), float(hi)) for lo, hi in zip(low, high)),
            tuple(float(p) for p in p_values), resamples, seed))
    return comparisons


def adjusted_p_values(comparisons: Sequence[SeedMeanComparison], correction: str
                      ) -> list[list[float]]:
    """Every arm's p-values at every radius adjusted as one family by ``correction`` (a key
    of :data:`~cadis.smoothing.multiplicity.CORRECTIONS`), shaped as the comparisons'."""
    return adjust_grouped([comparison.p_values for comparison in comparisons], correction)


def _bounded(comparison: SeedMeanComparison, row: int, p: float) -> str:
    """``p`` (the raw or the corrected p of ``row``) as a cell, read as "at most" where the
    raw p is the test's floor: no sign flip reached the observed difference, so the true p
    is smaller than ``resamples`` flips can show, and Holm's multiple of it a bound too."""
    at_floor = comparison.p_values[row] <= sign_flip_floor(comparison.resamples)
    return ("≤" if at_floor else "") + format_p(p)


def format_seed_means(reference_label: str, reference: Sequence[Certification],
                      comparisons: Sequence[SeedMeanComparison], correction: str,
                      fmt: TableFormat = "markdown") -> str:
    """One table: per radius (and ACR) the reference's mean and, per arm, its mean over its
    seeds with the lowest and highest seed, its difference from the reference with the
    interval, the raw p and the ``correction``'s p over the family of every arm and radius
    (both marked ``≤`` where the raw p is the test's floor, a bound); in markdown under a line
    naming the images, settings, seeds, test and family."""
    adjusted = adjusted_p_values(comparisons, correction)
    name = CORRECTION_NAMES[correction]
    digits = MARKDOWN_DIGITS
    header = ["radius", f"{reference_label} ({len(reference)})"]
    for comparison in comparisons:
        header += [f"{comparison.label} ({comparison.seeds})", "lowest–highest seed",
                   f"{comparison.label} − {reference_label}", f"{CONFIDENCE:.0%} interval", "p",
                   f"{name} p"]
    rows = []
    radii = comparisons[0].radii
    for row, key in enumerate([radius_key(r) for r in radii] + ["ACR"]):
        cells = [key, f"{comparisons[0].reference_accuracy[row]:.{digits}f}"]
        for comparison, corrected in zip(comparisons, adjusted):
            low, high = comparison.seed_range[row]
            difference = comparison.accuracy[row] - comparison.reference_accuracy[row]
            p_cells = ([_bounded(comparison, row, p)
                        for p in (comparison.p_values[row], corrected[row])]
                       if row < len(radii) else ["", ""])
            cells += [f"{comparison.accuracy[row]:.{digits}f}",
                      f"{low:.{digits}f}–{high:.{digits}f}", format_signed(difference),
                      format_interval(comparison.intervals[row]), *p_cells]
        rows.append(cells)
    table = render_table(header, rows, fmt)
    if fmt == "csv":
        return table
    family = sum(len(comparison.p_values) for comparison in comparisons)
    return (f"Means over training seeds (the count in brackets), against {reference_label}: "
            f"{describe_settings(reference[0])}. Paired sign-flip permutation p of the "
            f"per-image difference of seed means, paired bootstrap {CONFIDENCE:.0%} interval "
            f"({comparisons[0].resamples:,} resamples of the images, seed {comparisons[0].seed}; "
            f"≤: no resample reached the difference, p below what they show); "
            f"{name} p adjusted over one family of {family} tests "
            f"({CORRECTION_CONTROLS[correction]}): every arm at every radius.\n\n" + table)
