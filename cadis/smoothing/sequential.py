"""Sequential certification at predetermined radii: stop drawing once every asked radius is
decided.

Fixed-n CERTIFY spends ``n0 + n`` draws on every image, though a sweep mostly asks a narrower
question: is this image certified at r = 0.5, or at the radii of its table? The sequential
test answers it with three savings, each sound on its own:

* **Selection stops early.** The candidate class comes from selection draws, as in CERTIFY,
  but when one class leads every other by :data:`SELECTION_LEAD` of the first
  :data:`SELECTION_FIRST` of them that class is the candidate; only otherwise are the rest of
  the ``n0`` drawn (the top class of all ``n0``).
  Any rule that looks only at selection draws is sound: the estimation draws are independent
  of them whatever the rule does.
* **Looks at a fixed schedule, alpha spent where it decides.** Estimation draws come in
  looks at cumulative draws ``n_1 < ... < n_K = n_max``; look k bounds p_A (Clopper-Pearson)
  at its own level ``alpha_k``, the levels summing to ``alpha``. The *main* look, with
  ``MAIN_LOOK_ALPHA * alpha``, sits where an image whose every draw is the candidate first
  certifies the largest radius at that level: such images (most of a good model's) stop
  there. The last look (``LAST_LOOK_ALPHA * alpha``) decides the images only all n_max draws
  decide with little power lost against fixed n; a few early looks (doubling from
  :data:`MIN_LOOK_STEP`) and later ones (growing by :data:`LOOK_GROWTH`) share the rest, so an
  easy image at a large n_max need not wait for the main look.
* **Giving up early.** Radius r is *out of reach* once even the upper bound of p_A at level
  :data:`FUTILITY_LEVEL` lies below the share of n_max draws the last look would need to
  certify r: continuing would rarely certify it. Giving up only ever reports less.

Radius r is **certified** at a look with level ``alpha_k > 0`` once the lower bound at
``alpha_k`` reaches ``Phi(r / sigma)`` (r = 0: 1/2), and stays certified; an image stops
once every radius is certified or out of reach, or at n_max, and reports its candidate with the largest certified grid radius, or
ABSTAIN when not even r = 0 is certified.

Why this is sound (the guarantee of every public function here): reporting radius r when the
smoothed classifier does not have it means ``p_A < Phi(r / sigma) <= lower_k`` at the look k
that certified it, so the lower bound overshot p_A at some look. Look k's bound overshoots
with probability at most ``alpha_k`` whatever p_A is, so over the looks of the fixed schedule
(a union bound; the looks need not be independent) the probability of reporting any radius
the smoothed classifier does not have is at most ``sum alpha_k = alpha`` per image —
for all radii at once, since the event does not depend on r. The schedule depends only on
the radii, sigma, alpha and n_max, never on the draws; the candidate depends only on the
selection draws. Neither selection nor giving up can add a false certificate.

A plan whose first look would not come before n_max is a single look at n_max with the whole
alpha: fixed-n CERTIFY with early selection. So is a plan whose looks, spending part of alpha
early, would leave its last look short of the largest radius that n_max draws certify with
the whole alpha (n_max within about 1% above what fixed n needs for it). So the largest radius
a plan can certify is exactly the one fixed n can (:func:`draws_to_reach`), and the default grid
of a sequential run reaches what fixed n reaches at the same n and alpha.

The radius recorded is a grid radius, so the average certified radius of such records is an
average over the grid (a *grid ACR*: ``acr_grid`` in summaries), not CERTIFY's continuous ACR;
a continuous ACR needs fixed n. Torch-free:
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

#: Selection draws drawn first: when one class leads every other by :data:`SELECTION_LEAD`
#: of them it is the candidate, else all n0 are drawn.
SELECTION_FIRST: Final = 10
#: The lead that settles the candidate early: against a class with p_A = 0.6, one at 0.4 takes
#: such a lead in 1.2% of tries (8 of 10 draws), about as often as it would win the majority
#: of n0 = 100 draws (1.7%).
SELECTION_LEAD: Final = 6
#: Share of alpha the main look spends: the look at which an image whose every draw is the
#: candidate certifies the largest radius (it decides most images of a good model at once).
MAIN_LOOK_ALPHA: Final = 0.5
#: Share of alpha the last look spends, for images only all n_max draws decide.
LAST_LOOK_ALPHA: Final = 0.45
#: The fewest draws between two looks: one forward of the CPU batch (smaller looks would
#: run smaller, slower forwards); also where the early looks start.
MIN_LOOK_STEP: Final = 100
#: The early looks before the main look double from MIN_LOOK_STEP.
EARLY_GROWTH: Final = 2
#: The looks after the main one draw this many times the draws so far (at least
#: MIN_LOOK_STEP more).
LOOK_GROWTH: Final = 1.25
#: Level of the upper bound that gives a radius up: the chance, per look, of giving up on an
#: image whose p_A would reach what the last look needs. Costs power, never soundness.
FUTILITY_LEVEL: Final = 0.05
#: ``mode`` of records and summaries made by each way of certifying.
MODE_FIXED: Final = "fixed"
MODE_SEQUENTIAL: Final = "sequential"


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


def check_budget(n0: int, n_max: int) -> None:
    """:class:`CadisError` when ``n_max``, the most estimation draws an image may spend, is
    below ``n0``, the most selection draws: the selection would outspend the test."""
    if n_max < n0:
        raise CadisError(f"n ({n_max}), the most estimation draws the sequential test may "
                         f"spend on an image, is below n0 ({n0}); raise n or lower n0")


def threshold(radius: float, sigma: float) -> float:
    """The p_A a certificate of ``radius`` at noise ``sigma`` needs: ``Phi(radius / sigma)``,
    and CERTIFY's majority (1/2) for radius 0. :class:`CadisError` when that is 1 in floating
    point: no number of draws certifies such a radius."""
    p = max(MAJORITY, float(norm.cdf(radius / sigma)))
    if p >= 1.0:
        raise CadisError(f"radius {radius:g} at sigma {sigma:g} needs p_A = 1: no number of "
                         f"draws certifies it")
    return p


def unanimous_draws(p: float, alpha: float) -> int:
    """The fewest draws, every one the candidate, whose lower bound at ``alpha`` reaches
    ``p`` (below 1): about ``log(alpha) / log(p)``, settled by the bound itself."""
    n = max(1, math.ceil(math.log(alpha) / math.log(p)))
    # Float rounding at the edge: the bound decides.
    while lower_confidence_bound(n, n, alpha) < p:
        n += 1
    while n > 1 and lower_confidence_bound(n - 1, n - 1, alpha) >= p:
        n -= 1
    return n


def draws_to_reach(radius: float, sigma: float, alpha: float) -> int:
    """The smallest ``n_max`` whose sequential plan can certify ``radius``: exactly the draws
    fixed-n CERTIFY needs, every one the candidate (from there on some look of
    :func:`look_schedule` certifies it). ``sigma`` is trusted, as in
    :mod:`cadis.smoothing.bounds`."""
    return unanimous_draws(threshold(radius, sigma), check_probability(alpha, "alpha"))


def reachable_radii(radii: Sequence[float], sigma: float, alpha: float, n_max: int
                    ) -> list[float]:
    """The radii of ``radii`` a sequential plan of at most ``n_max`` draws can certify: those
    fixed-n CERTIFY with ``n_max`` draws can."""
    return [r for r in radii if draws_to_reach(r, sigma, alpha) <= n_max]


def _growing(start: int, growth: float, limit: int) -> list[int]:
    """Draws from ``start`` growing by ``growth`` (by :data:`MIN_LOOK_STEP` at least) while
    a half step short of ``limit``."""
    looks, draws = [], start
    while draws * math.sqrt(growth) < limit:
        looks.append(draws)
        draws = max(math.ceil(draws * growth), draws + MIN_LOOK_STEP)
    return looks


def look_schedule(n_max: int, alpha: float, top: float) -> tuple[tuple[int, ...],
                                                                  tuple[float, ...]]:
    """The looks (cumulative estimation draws) and each look's level, summing to ``alpha``,
    for a plan whose largest radius needs ``p_A >= top``. The main look comes at the draws
    where a unanimous image's bound at ``MAIN_LOOK_ALPHA * alpha`` reaches ``top``, early
    looks double from :data:`MIN_LOOK_STEP` before it, later looks grow by :data:`LOOK_GROWTH`
    after it, and the last is ``n_max`` (``LAST_LOOK_ALPHA * alpha``); the early and later
    looks share what is left. When the main look would not come before ``n_max`` the last
    look takes its share too, and with no early look either the single look ``n_max`` has
    the whole alpha: fixed-n CERTIFY. So has a plan whose looks would certify ``top`` at no
    look while ``n_max`` unanimous draws do at the whole alpha: a plan reaches every radius
    fixed n reaches."""
    looks, alphas = _staged_schedule(n_max, alpha, top)
    if not _certifies(looks, alphas, top) and _certifies((n_max,), (alpha,), top):
        return (n_max,), (alpha,)
    return looks, alphas


def _staged_schedule(n_max: int, alpha: float, top: float) -> tuple[tuple[int, ...],
                                                                     tuple[float, ...]]:
    """:func:`look_schedule` before its fallback to a single look: the early, main, later and
    last looks, whether or not any of them certifies ``top``."""
    main = unanimous_draws(top, MAIN_LOOK_ALPHA * alpha)
    early = _growing(MIN_LOOK_STEP, EARLY_GROWTH, min(main, n_max))
    rest = (1 - MAIN_LOOK_ALPHA - LAST_LOOK_ALPHA) * alpha
    if main * math.sqrt(LOOK_GROWTH) < n_max:
        later = _growing(max(math.ceil(main * LOOK_GROWTH), main + MIN_LOOK_STEP),
                         LOOK_GROWTH, n_max)
        others = len(early) + len(later)
        share = rest / others if others else 0.0
        last = LAST_LOOK_ALPHA * alpha + (0.0 if others else rest)
        return ((*early, main, *later, n_max),
                (*[share] * len(early), MAIN_LOOK_ALPHA * alpha, *[share] * len(later), last))
    if not early:
        return (n_max,), (alpha,)
    return (*early, n_max), (*[rest / len(early)] * len(early), alpha - rest)


def _certifies(looks: Sequence[int], alphas: Sequence[float], p: float) -> bool:
    """Whether some look of the schedule certifies ``p_A >= p`` when every draw is the
    candidate."""
    return any(lower_confidence_bound(n, n, a) >= p for n, a in zip(looks, alphas))


@dataclass(frozen=True)
class Decision:
    """What a look decided: ``certified`` radii (a prefix of the grid: the first ``certified``
    radii), whether every radius is decided (``done``: certified or out of reach)."""

    certified: int
    done: bool


class SequentialPlan:
    """A sequential test of the radii ``radii`` at noise ``sigma`` with failure probability
    ``alpha`` per image, at most ``n_max`` estimation draws, looks of :func:`look_schedule`.

    Guarantee: over its looks, the probability that :meth:`decide` certifies a radius the
    smoothed classifier does not have is at most ``alpha`` (module docstring). Construction
    raises :class:`CadisError` for invalid radii, sigma or alpha, and when ``n_max`` draws
    cannot certify the largest radius, naming the ``n_max`` that can.
    """

    def __init__(self, radii: Sequence[float], sigma: float, alpha: float,
                 n_max: int) -> None:
        self.radii = check_radii(radii)
        self.sigma = check_sigma(sigma)
        self.alpha = check_probability(alpha, "alpha")
        self.n_max = positive_int(n_max, "n")
        self.thresholds = tuple(threshold(r, self.sigma) for r in self.radii)
        self._set_schedule(*look_schedule(self.n_max, self.alpha, self.thresholds[-1]))
        if not _certifies(self.looks, self.alphas, self.thresholds[-1]):
            needed = draws_to_reach(self.radii[-1], self.sigma, self.alpha)
            raise CadisError(f"n = {self.n_max} draws cannot certify radius {self.radii[-1]:g} "
                             f"at sigma {self.sigma:g} sequentially (alpha {self.alpha:g}); it "
                             f"needs n >= {needed}")

    @classmethod
    def single_look(cls, radii: Sequence[float], sigma: float, alpha: float,
                    n: int) -> SequentialPlan:
        """The plan of one look at ``n`` draws with the whole ``alpha``: fixed-n CERTIFY's
        statistics decided at the grid (with the early selection), to set beside a plan."""
        plan = cls(radii, sigma, alpha, n)
        plan._set_schedule((plan.n_max,), (plan.alpha,))
        return plan

    def _set_schedule(self, looks: tuple[int, ...], alphas: tuple[float, ...]) -> None:
        """The looks, their levels, and what giving up compares the upper bound with: the
        share of n_max draws the last look needs to certify each radius (above 1: it cannot)."""
        self.looks, self.alphas = looks, alphas
        self.needed_share = tuple(self._last_look_needs(t) / self.n_max
                                  for t in self.thresholds)

    def _last_look_needs(self, p: float) -> int:
        """The fewest candidate draws of n_max whose bound at the last look's level reaches
        ``p`` (n_max + 1 when none do)."""
        last = self.alphas[-1]
        if lower_confidence_bound(self.n_max, self.n_max, last) < p:
            return self.n_max + 1
        low, high = 0, self.n_max  # the bound at ``high`` reaches p, at ``low`` not
        while high - low > 1:
            middle = (low + high) // 2
            if lower_confidence_bound(middle, self.n_max, last) >= p:
                high = middle
            else:
                low = middle
        return high

    def decide(self, n_a: int, n: int, look: int, certified: int = 0) -> Decision:
        """The decision after look ``look`` (0-based) with ``n_a`` of ``n`` estimation draws
        the candidate, ``certified`` radii certified at earlier looks (they stay certified);
        ``done`` at the last look whatever the bounds say."""
        if self.alphas[look] > 0:
            lower = lower_confidence_bound(n_a, n, self.alphas[look])
            certified = max(certified, sum(lower >= t for t in self.thresholds))
        if look == len(self.looks) - 1:
            return Decision(certified, True)
        upper = upper_confidence_bound(n_a, n, FUTILITY_LEVEL)
        given_up = sum(upper < share for share in self.needed_share[certified:])
        return Decision(certified, certified + given_up >= len(self.radii))

    def radius_of(self, certified: int) -> float:
        """The radius recorded for ``certified`` certified radii (0.0 for none: an
        abstention)."""
        return self.radii[certified - 1] if certified else 0.0

    def describe(self) -> dict[str, object]:
        """The plan as settings: mode, radii, looks, the alpha of each look, the selection's
        first draws and the level of giving up."""
        return {"mode": MODE_SEQUENTIAL, "radii": list(self.radii), "looks": list(self.looks),
                "alphas": list(self.alphas), "selection_first": SELECTION_FIRST,
                "futility_level": FUTILITY_LEVEL}


def forward_sizes(plan: SequentialPlan, n0: int, batch_size: int) -> set[int]:
    """Every number of draws a forward of ``plan``'s test can hold, ``batch_size`` at most:
    each call of :func:`run_sequential`'s ``draw`` is cut into full forwards and one partial
    one. What a compiled base is warmed on, so that none compiles mid-run."""
    first = min(SELECTION_FIRST, n0)
    calls = [first + plan.looks[0], n0 - first,
             *(later - earlier for earlier, later in zip(plan.looks, plan.looks[1:]))]
    return {min(batch_size, draws) for draws in calls if draws} | {
        draws % batch_size for draws in calls if draws % batch_size}


#: Draws the next ``(selection, estimation)`` draws of one image and returns the class counts
#: of each: the two never share a draw.
DrawCounts = Callable[[int, int], tuple[np.ndarray, np.ndarray]]


def run_sequential(draw: DrawCounts, n0: int, plan: SequentialPlan) -> tuple[int, float, int]:
    """The sequential test of one image with at most ``n0`` selection draws: ``draw`` gives
    counts of fresh (or stored) draws, the estimation draws independent of the selection
    draws. The first call draws the first selection draws and the first look together (one
    forward where they fit). Returns ``(class or ABSTAIN, largest certified grid radius, draws
    spent, selection included)``, with the guarantee of :class:`SequentialPlan`."""
    n0 = positive_int(n0, "n0")
    first = min(SELECTION_FIRST, n0)
    selection, estimation = draw(first, plan.looks[0])
    selected = first
    top, runner_up = np.sort(selection)[::-1][:2] if len(selection) > 1 else (first, 0)
    if top - runner_up < min(SELECTION_LEAD, first) and first < n0:
        more, _ = draw(n0 - first, 0)
        selection, selected = selection + more, n0
    candidate = int(np.argmax(selection))
    n_a = int(estimation[candidate])
    drawn = plan.looks[0]
    decision = plan.decide(n_a, drawn, 0)
    for look in range(1, len(plan.looks)):
        if decision.done:
            break
        _, counts = draw(0, plan.looks[look] - drawn)
        n_a += int(counts[candidate])
        drawn = plan.looks[look]
        decision = plan.decide(n_a, drawn, look, decision.certified)
    prediction = candidate if decision.certified else ABSTAIN
    return prediction, plan.radius_of(decision.certified), selected + drawn
