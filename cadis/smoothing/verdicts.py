"""Verdicts of one decision: is the leader ahead of each other contender beyond the noise of the
images they were all measured on, and by how much?

A decision (a sweep's choice of a trial by one metric) compares the leader with every other
contender on the same images, so each comparison is paired (:mod:`cadis.smoothing.paired`):

- certified accuracy at a radius: each image is certified by one, both or neither; McNemar's
  exact test on the discordant images gives the raw two-sided p-value;
- ACR (``radius=None``): each image's certified radius (0 unless correct); the paired
  sign-flip permutation test of the mean difference (:func:`~cadis.smoothing.paired.sign_flip_p`,
  the mean being what ACR compares) gives it.

Either way a paired bootstrap over the images gives the 95% interval of the difference, and
the raw p-values of the decision's comparisons are adjusted together by Holm's step-down
(:func:`~cadis.smoothing.multiplicity.holm`), which bounds the chance of any false "ahead" or
"behind" in the decision by ``family_alpha`` whatever the dependence between the comparisons.
A comparison is *separated* when both its Holm-adjusted p is below ``family_alpha`` and its
interval excludes 0; else the two are *inseparable* on these images, and a choice between them
is a tie-break, not a finding (:func:`describe_verdicts` says so).

Torch-free and deterministic for a seed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from cadis.errors import CadisError
from cadis.smoothing.multiplicity import holm
from cadis.smoothing.paired import (
    BOOTSTRAP_RESAMPLES,
    aligned,
    certified_matrix,
    certified_radii,
    format_interval,
    format_p,
    format_signed,
    mcnemar_p,
    paired_bootstrap,
    sign_flip_p,
)
from cadis.smoothing.records import Record

#: The family-wise error rate a decision's verdicts are held to unless told otherwise.
FAMILY_ALPHA: Final = 0.05


@dataclass(frozen=True)
class Verdict:
    """The leader against one other contender on ``metric`` over the same ``images``.

    ``difference`` is the other's value minus the leader's (negative: the leader is ahead);
    ``low`` and ``high`` bound it (paired bootstrap, 95%). ``p`` is the raw two-sided p-value
    (McNemar's exact test at a radius, the sign-flip permutation test for ACR) and
    ``p_adjusted`` the same after Holm's correction across the decision's comparisons.
    ``separated`` is ``p_adjusted < family_alpha`` and ``low > 0 or high < 0``.
    ``discordant`` counts the images where the two differ: (the leader's value is larger,
    the other's is larger); at a radius, the images only the leader certifies and those only
    the other certifies.
    """

    leader: str
    other: str
    metric: str
    images: int
    difference: float
    low: float
    high: float
    p: float
    p_adjusted: float
    separated: bool
    discordant: tuple[int, int]


def _aligned_values(leader: str, records: Mapping[str, Sequence[Record]],
                    radius: float | None) -> tuple[list[str], np.ndarray]:
    """The other contenders' names and an ``[image, contender]`` array of each one's value
    per image, the leader's in column 0, all in the leader's image order; every contender is
    checked against the leader before anything is computed."""
    if leader not in records:
        raise CadisError(f"the leader {leader!r} is not among the contenders "
                         f"({', '.join(map(repr, records))})")
    others = [name for name in records if name != leader]
    columns = [aligned(records[leader], records[other], (leader, other)) for other in others]
    ordered = [columns[0][0] if columns else list(records[leader]),
               *(other_records for _, other_records in columns)]

    def values(contender: Sequence[Record]) -> np.ndarray:
        return (certified_radii(contender) if radius is None
                else certified_matrix(contender, [radius])[:, 0].astype(float))

    return others, np.column_stack([values(contender) for contender in ordered])


def paired_verdicts(leader: str, records: Mapping[str, Sequence[Record]], metric: str, *,
                    radius: float | None, family_alpha: float = FAMILY_ALPHA, seed: int = 0,
                    resamples: int = BOOTSTRAP_RESAMPLES) -> list[Verdict]:
    """The leader against every other entry of ``records`` (contender name -> its records), in
    the order of ``records``: certified accuracy at ``radius``, or ACR when ``radius`` is None
    (``metric`` is the name the verdicts carry), Holm-adjusted across them (module docstring).

    Every contender must hold the leader's images (the same indices and labels, each once),
    else :class:`CadisError` naming the two and how they differ. One bootstrap of the images
    (and, for ACR, one set of sign flips) serves every comparison. Deterministic: the same
    records, ``seed`` and ``resamples`` give the same verdicts. No other contender: ``[]``.
    """
    if not 0.0 < family_alpha < 1.0:
        raise CadisError(f"family_alpha must lie in (0, 1); got {family_alpha}")
    others, values = _aligned_values(leader, records, radius)
    if not others:
        return []
    leader_values, other_values = values[:, :1], values[:, 1:]
    differences = other_values - leader_values
    low, high = paired_bootstrap(other_values, np.broadcast_to(leader_values, other_values.shape),
                                 resamples, seed)
    leader_larger = (differences < 0).sum(axis=0)
    other_larger = (differences > 0).sum(axis=0)
    raw = (sign_flip_p(differences, resamples, seed) if radius is None
           else [mcnemar_p(int(a), int(b)) for a, b in zip(leader_larger, other_larger)])
    adjusted = holm(raw)
    return [Verdict(leader, other, metric, len(values), float(differences[:, column].mean()),
                    float(low[column]), float(high[column]), float(raw[column]),
                    float(adjusted[column]),
                    bool(adjusted[column] < family_alpha
                         and (low[column] > 0 or high[column] < 0)),
                    (int(leader_larger[column]), int(other_larger[column])))
            for column, other in enumerate(others)]


def _lead(verdict: Verdict) -> str:
    # The leader's lead: the negated difference and interval.
    lead = format_signed(-verdict.difference)
    interval = format_interval((-verdict.high, -verdict.low))
    return f"{verdict.other} by {lead} {interval}, p = {format_p(verdict.p_adjusted)} (Holm)"


def _inseparable(verdict: Verdict) -> str:
    return (f"{verdict.other} ({format_signed(verdict.difference)} "
            f"{format_interval((verdict.low, verdict.high))}, "
            f"p = {format_p(verdict.p_adjusted)})")


def _listed(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def describe_verdicts(verdicts: Sequence[Verdict], tie_break: str) -> str:
    """One decision's verdicts in the words that follow "chosen <leader>: ", e.g.
    "ahead of X by +0.040 [+0.010, +0.070], p = 0.010 (Holm); inseparable from Y (-0.010
    [-0.030, +0.010], p = 0.620) and Z (...); chosen among them by <tie_break>".

    "ahead of" and "behind" name each separated contender in a clause of its own, with the
    leader's lead (the leader's value minus theirs); "inseparable from" names the others, each with its
    difference from the leader (theirs minus the leader's) and interval, and is followed by the
    tie-break, because the data did not choose among them. The leader is never called best:
    where nothing separates it, the sentence says so. The verdicts must be one decision's (one
    leader, one metric), else :class:`CadisError`.
    """
    if not verdicts:
        return "compared with no other contender"
    decisions = {(verdict.leader, verdict.metric) for verdict in verdicts}
    if len(decisions) > 1:
        raise CadisError(f"verdicts of several decisions cannot be told as one: "
                         f"{sorted(decisions)}")
    # A separated interval lies on one side of 0: below, the leader is ahead.
    clauses = [f"ahead of {_lead(v)}" for v in verdicts if v.separated and v.high < 0]
    clauses += [f"behind {_lead(v)}" for v in verdicts if v.separated and v.low > 0]
    inseparable = [_inseparable(v) for v in verdicts if not v.separated]
    if inseparable:
        clauses += [f"inseparable from {_listed(inseparable)}",
                    f"chosen among them by {tie_break}"]
    return "; ".join(clauses)
