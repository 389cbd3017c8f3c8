"""The statistics of randomized smoothing (Cohen et al. 2019), as pure functions of counts.

Torch-free (numpy and scipy only), so that records, their tables and ``cadis compare`` can use
them without importing torch. :class:`cadis.smoothing.smooth.Smooth` draws the noise and
counts; everything it decides is decided here, and pinned here without a model.

A ``sigma`` given to these functions is trusted to be finite and > 0: it was checked where it
entered (a command line, a config, a :class:`~cadis.smoothing.smooth.Smooth` or
:class:`~cadis.smoothing.sequential.SequentialPlan`) by :func:`cadis.validation.check_sigma`.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Final

import numpy as np
from scipy.stats import beta, binomtest, norm

from cadis.errors import CadisError
from cadis.validation import check_probability, positive_int

#: The class returned when the smoothed classifier declines to answer.
ABSTAIN: Final = -1

#: The lower confidence bound of p_A must reach this for a certificate (radius >= 0).
MAJORITY: Final = 0.5

#: The null hypothesis of PREDICT's test: the top two classes are equally likely.
EVEN_SPLIT: Final = 0.5


@dataclass(frozen=True)
class CertificationParameters:
    """How CERTIFY is run: ``n0`` selection draws, ``n`` estimation draws, failure probability
    ``alpha``, ``batch_size`` draws per forward. Guaranteed on construction (else
    :class:`CadisError` naming the key): ``n0, n, batch_size`` are ints >= 1 and
    ``0 < alpha < 1``. Built once at the edge; whatever receives one need not check again."""

    n0: int
    n: int
    alpha: float
    batch_size: int

    def __post_init__(self) -> None:
        # frozen: the normalised values (numpy ints -> int) are written past the freeze once.
        for key in ("n0", "n", "batch_size"):
            object.__setattr__(self, key, positive_int(getattr(self, key), key))
        object.__setattr__(self, "alpha", check_probability(self.alpha, "alpha"))


def lower_confidence_bound(n_a: int, n: int, alpha: float) -> float:
    """The one-sided (1 - alpha) Clopper-Pearson lower bound on p_A from n_A successes in n.

    ``P[p_A >= bound] >= 1 - alpha`` over the draws, whatever p_A is. It is
    ``Beta.ppf(alpha, n_A, n - n_A + 1)``, the lower end of the two-sided interval at
    confidence 1 - 2*alpha, and 0 when ``n_A = 0``. Raises :class:`CadisError` unless
    ``0 <= n_a <= n``, ``n >= 1`` and ``0 < alpha < 1``.
    """
    n_a, n, alpha = _check_counts(n_a, n, alpha)
    if n_a == 0:
        return 0.0
    return float(beta.ppf(alpha, n_a, n - n_a + 1))


def upper_confidence_bound(n_a: int, n: int, alpha: float) -> float:
    """The one-sided (1 - alpha) Clopper-Pearson upper bound on p_A from n_A successes in n:
    ``P[p_A <= bound] >= 1 - alpha``; 1 when ``n_A = n``. The same checks as
    :func:`lower_confidence_bound`."""
    n_a, n, alpha = _check_counts(n_a, n, alpha)
    if n_a == n:
        return 1.0
    return float(beta.ppf(1.0 - alpha, n_a + 1, n - n_a))


def _check_counts(n_a: object, n: object, alpha: object) -> tuple[int, int, float]:
    n = positive_int(n, "n")
    alpha = check_probability(alpha, "alpha")
    if not (isinstance(n_a, numbers.Integral) and not isinstance(n_a, bool) and 0 <= n_a <= n):
        raise CadisError(f"n_a must be an integer between 0 and n = {n}, got {n_a!r}")
    return int(n_a), n, alpha


def certified_radius(p_lower: float, sigma: float) -> float:
    """``sigma * Phi^-1(p_lower)``: the l2 radius certified by a lower bound p_lower >= 1/2.

    Raises :class:`CadisError` for ``p_lower`` outside [1/2, 1), where there is no finite
    certificate.
    """
    if not MAJORITY <= p_lower < 1.0:
        raise CadisError(f"p_lower must be in [0.5, 1) to certify a radius, got {p_lower!r}")
    return sigma * float(norm.ppf(p_lower))


def max_certifiable_radius(sigma: float, n: int, alpha: float) -> float:
    """The largest radius CERTIFY can return with ``n`` draws (all of them the top class).

    ``sigma * Phi^-1(alpha^(1/n))``: useful to choose the radius grid of a table.
    """
    return certified_radius(lower_confidence_bound(n, n, alpha), sigma)


def certify_from_counts(candidate: int, n_a: int, n: int, alpha: float,
                        sigma: float) -> tuple[int, float]:
    """CERTIFY's decision: ``(candidate, radius)``, or ``(ABSTAIN, 0.0)`` if p_A's bound < 1/2.

    ``n_a`` counts the candidate among ``n`` draws that are independent of the draws that
    chose it; only then does the bound hold with probability 1 - alpha.
    """
    p_lower = lower_confidence_bound(n_a, n, alpha)
    if p_lower < MAJORITY:
        return ABSTAIN, 0.0
    return candidate, certified_radius(p_lower, sigma)


def predict_from_counts(counts: np.ndarray, alpha: float) -> int:
    """PREDICT's decision: the top class if a two-sided binomial test on the top two counts
    rejects an even split at level alpha, else :data:`ABSTAIN` (so a tie always abstains).

    The returned class differs from the smoothed classifier's with probability <= alpha.
    """
    alpha = check_probability(alpha, "alpha")
    counts = np.asarray(counts)
    if counts.ndim != 1 or counts.size < 2:
        raise CadisError(f"counts must be one count per class for >= 2 classes, "
                         f"got shape {counts.shape}")
    top, runner_up = np.argsort(-counts, kind="stable")[:2]
    top_count, runner_up_count = int(counts[top]), int(counts[runner_up])
    if top_count == 0:
        return ABSTAIN
    p_value = binomtest(top_count, top_count + runner_up_count, EVEN_SPLIT).pvalue
    return ABSTAIN if p_value > alpha else int(top)
