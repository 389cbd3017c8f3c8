"""Sequential certification at predetermined radii: stop drawing once every asked radius is
decided.

Fixed-n CERTIFY spends ``n0 + n`` draws on every image, though a sweep mostly asks a narrower
question: is this image certified at r = 0.5, or at the radii of its table? After the ``n0``
selection draws pick the candidate class, the sequential test draws in growing batches and
*looks* after each: at look k, with ``n_A`` of the ``n_k`` draws so far the candidate, it
bounds p_A at level ``alpha / K`` (Clopper-Pearson, both sides), where K is the number of
looks of a fixed schedule ``n_1 < n_2 < ... < n_K = n_max`` (doubling from the first look).

* radius r is **certified** once the lower bound reaches ``Phi(r / sigma)`` (r = 0: 1/2);
* radius r is **out of reach** once the upper bound falls below it;
* the image stops as soon as every radius is one or the other, or at ``n_max``; it reports
  its candidate and the largest certified grid radius, or ABSTAIN when not even r = 0 is.

Why this is sound (the guarantee of every public function here): reporting radius r when
the smoothed classifier does not have it means ``p_A < Phi(r / sigma) <= lower_k`` at the
look k that certified it, so the lower bound overshot p_A at some look. Each look's bound
overshoots with probability at most ``alpha / K`` whatever p_A is, so over the K looks of the
fixed schedule (a union bound; the looks need not be independent) the probability of
reporting any radius the smoothed classifier does not have is at most ``alpha`` per image —
for all radii at once, since the event does not depend on r. Stopping for "out of reach"
only ever reports less, so it costs no error, only the power of the upper bound's mistakes.
The candidate comes from ``n0`` draws independent of the estimation draws, as in CERTIFY.

The radius recorded is a grid radius, so the average certified radius of such records is an
average over the grid (labelled so in summaries), not CERTIFY's continuous ACR. Torch-free:
:meth:`cadis.smoothing.smooth.Smooth.certify_sequential` draws; everything decided is decided
here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
from scipy.stats import norm

from cadis.errors import CadisError
from cadis.smoothing.bounds import (
    ABSTAIN,
    MAJORITY,
    lower_confidence_bound,
    upper_confidence_bound,
)
from cadis.validation import check_probability, check_sigma, is_real, positive_int

#: Draws at the first look when none is given: one forward of the CPU batch.
FIRST_LOOK: Final = 100
#: Each look draws this many times the draws so far (a doubling schedule: few looks, so each
#: keeps most of alpha, and an image never spends more than twice what it needed).
LOOK_GROWTH: Final = 2
#: ``mode`` of records and summaries made by each way of certifying.
MODE_FIXED: Final = "fixed"
MODE_SEQUENTIAL: Final = "sequential"


def look_schedule(n_max: int, first_look: int) -> tuple[int, ...]:
    """Cumulative draws at each look: ``first_look``, doubling, then ``n_max`` (the last)."""
    looks = []
    draws = min(first_look, n_max)
    while draws < n_max:
        looks.append(draws)
        draws *= LOOK_GROWTH
    return (*looks, n_max)


def check_radii(radii: Sequence[float]) -> tuple[float, ...]:
    """The radii as floats, or :class:`CadisError` unless non-empty, finite, >= 0 and
    strictly increasing."""
    values = list(radii)
    if not values:
        raise CadisError("sequential certification needs radii to decide, e.g. --radii 0,0.5")
    if not all(is_real(r) and math.isfinite(float(r)) and float(r) >= 0 for r in values):
        raise CadisError(f"radii must be finite numbers >= 0, got {values}")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise CadisError(f"radii must be strictly increasing, got {values}")
    return tuple(float(r) for r in values)


@dataclass(frozen=True)
class Decision:
    """What a look decided: ``certified`` radii (a prefix of the grid: the first ``certified``
    radii), whether every radius is decided (``done``: certified or out of reach)."""

    certified: int
    done: bool


class SequentialPlan:
    """A sequential test of the radii ``radii`` at noise ``sigma`` with failure probability
    ``alpha`` per image, at most ``n_max`` estimation draws, looks from ``first_look``.

    Guarantee: over its looks, the probability that :meth:`decide` certifies a radius the
    smoothed classifier does not have is at most ``alpha`` (module docstring). Construction
    raises :class:`CadisError` for invalid radii, sigma or alpha, and when ``n_max`` draws
    cannot certify the largest radius, naming the ``n_max`` that can.
    """

    def __init__(self, radii: Sequence[float], sigma: float, alpha: float, n_max: int,
                 first_look: int = FIRST_LOOK) -> None:
        self.radii = check_radii(radii)
        self.sigma = check_sigma(sigma)
        self.alpha = check_probability(alpha, "alpha")
        self.n_max = positive_int(n_max, "n")
        self.first_look = positive_int(first_look, "first_look")
        self.looks = look_schedule(self.n_max, self.first_look)
        self.alpha_per_look = self.alpha / len(self.looks)
        # p_A must reach Phi(r / sigma) for r; 1/2 for r = 0, as CERTIFY's majority.
        self.thresholds = tuple(max(MAJORITY, float(norm.cdf(r / self.sigma)))
                                for r in self.radii)
        if lower_confidence_bound(self.n_max, self.n_max, self.alpha_per_look) \
                < self.thresholds[-1]:
            needed = draws_to_reach(self.radii[-1], self.sigma, self.alpha, self.first_look)
            raise CadisError(f"n = {self.n_max} draws cannot certify radius {self.radii[-1]:g} "
                             f"at sigma {self.sigma:g} sequentially (alpha {self.alpha:g} over "
                             f"{len(self.looks)} looks); it needs n >= {needed}")

    def decide(self, n_a: int, n: int) -> Decision:
        """The decision after a look with ``n_a`` of ``n`` estimation draws the candidate;
        ``done`` at the last look whatever the bounds say."""
        lower = lower_confidence_bound(n_a, n, self.alpha_per_look)
        upper = upper_confidence_bound(n_a, n, self.alpha_per_look)
        certified = sum(lower >= threshold for threshold in self.thresholds)
        out_of_reach = sum(upper < threshold for threshold in self.thresholds)
        return Decision(certified, certified + out_of_reach >= len(self.radii)
                        or n >= self.n_max)

    def radius_of(self, certified: int) -> float:
        """The radius recorded for ``certified`` certified radii (0.0 for none: an
        abstention)."""
        return self.radii[certified - 1] if certified else 0.0

    def describe(self) -> dict[str, object]:
        """The plan as settings: mode, radii, looks and the alpha of each look."""
        return {"mode": MODE_SEQUENTIAL, "radii": list(self.radii), "looks": list(self.looks),
                "alpha_per_look": self.alpha_per_look}


def draws_to_reach(radius: float, sigma: float, alpha: float, first_look: int = FIRST_LOOK
                   ) -> int:
    """The smallest ``n_max`` whose sequential plan can certify ``radius``: every draw the
    candidate, the lower bound at ``alpha`` over that plan's K looks, ``(alpha / K)^(1/n)``,
    reaches ``Phi(radius / sigma)``. Within the n of one K the bound grows with n, so each K
    is tried in turn on its range (K = 1: n <= first_look; K >= 2: first_look * 2^(K-2) < n
    <= first_look * 2^(K-1))."""
    threshold = max(MAJORITY, float(norm.cdf(radius / check_sigma(sigma))))
    alpha = check_probability(alpha, "alpha")
    looks = 1
    while True:
        low = 1 if looks == 1 else first_look * LOOK_GROWTH ** (looks - 2) + 1
        high = first_look * LOOK_GROWTH ** (looks - 1)
        n = max(low, math.ceil(math.log(alpha / looks) / math.log(threshold)))
        # Float rounding at the edge: the bound itself decides.
        while n <= high and lower_confidence_bound(n, n, alpha / looks) < threshold:
            n += 1
        if n <= high:
            return n
        looks += 1


def reachable_radii(radii: Sequence[float], sigma: float, alpha: float, n_max: int
                    ) -> list[float]:
    """The radii of ``radii`` a sequential plan of at most ``n_max`` draws can certify."""
    return [r for r in radii if draws_to_reach(r, sigma, alpha) <= n_max]


def run_sequential(selection: np.ndarray, estimate: Callable[[int], np.ndarray],
                   plan: SequentialPlan) -> tuple[int, float, int]:
    """The sequential test of one image: the candidate is the top class of the ``selection``
    counts; ``estimate(k)`` returns the class counts of the next ``k`` estimation draws (fresh
    or stored, independent of the selection draws); looks follow ``plan``. Returns ``(class or
    ABSTAIN, largest certified grid radius, estimation draws spent)``, with the guarantee of
    :class:`SequentialPlan`."""
    candidate = int(np.argmax(selection))
    n_a = drawn = 0
    for look in plan.looks:
        n_a += int(estimate(look - drawn)[candidate])
        drawn = look
        decision = plan.decide(n_a, drawn)
        if decision.done:
            break
    prediction = candidate if decision.certified else ABSTAIN
    return prediction, plan.radius_of(decision.certified), drawn
