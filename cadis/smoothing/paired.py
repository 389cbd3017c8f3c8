"""Paired comparison of two certifications of the same images: at a radius, is A's certified
accuracy different from B's beyond noise?

Each image is certified at ``r`` by A or not, and by B or not; only the discordant images
(one certifies, the other does not) say anything about the difference. Under the null
hypothesis that A and B certify at the same rate, each discordant image is A's with
probability 1/2, so the count of A-only images among the discordant ones is Binomial(d, 1/2):
McNemar's exact test, two-sided. Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from scipy.stats import binomtest

from cadis.errors import CadisError
from cadis.smoothing.records import Record


@dataclass(frozen=True)
class PairedResult:
    """At one radius: images, each side's certified accuracy, the discordant counts and the
    exact two-sided p-value of "A and B certify at the same rate"."""

    radius: float
    images: int
    accuracy_a: float
    accuracy_b: float
    only_a: int
    only_b: int
    p_value: float


def certified_at(record: Record, radius: float) -> bool:
    """Whether a record is correct and certified at ``radius`` (how certified accuracy counts)."""
    return record.correct and record.radius >= radius


def paired_test(a: Sequence[Record], b: Sequence[Record], radius: float) -> PairedResult:
    """McNemar's exact test of A against B at ``radius`` over the same images; records of
    different image sets are refused (:class:`CadisError`)."""
    by_image_b = {record.idx: record for record in b}
    if sorted(record.idx for record in a) != sorted(by_image_b) or len(by_image_b) != len(b):
        raise CadisError("paired records must cover the same images, each once")
    only_a = only_b = both_a = both_b = 0
    for record in a:
        in_a = certified_at(record, radius)
        in_b = certified_at(by_image_b[record.idx], radius)
        only_a += in_a and not in_b
        only_b += in_b and not in_a
        both_a += in_a
        both_b += in_b
    discordant = only_a + only_b
    p_value = 1.0 if discordant == 0 else binomtest(only_a, discordant, 0.5).pvalue
    return PairedResult(radius, len(a), both_a / len(a), both_b / len(a), only_a, only_b,
                        float(p_value))
