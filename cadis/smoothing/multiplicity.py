"""Adjusted p-values for a family of comparisons: whoever makes several tests at once and acts
on any of them reads these instead of the raw p-values.

- Holm's step-down (:func:`holm`) controls the family-wise error rate (the chance of one or
  more false claims in the family) at any level, whatever the dependence between the tests;
  it rejects everything Bonferroni rejects, and sometimes more.
- Benjamini-Hochberg's step-up (:func:`benjamini_hochberg`) controls the false discovery rate
  (the expected share of false claims among those made) when the tests are independent or
  positively dependent: a weaker promise, so it rejects more.

A family's hypothesis is rejected at level ``a`` exactly when its adjusted p-value is below
``a``. Both adjustments are monotone in the raw p-values (a smaller raw p never gets a larger
adjusted one), never smaller than the raw p-value, and capped at 1. Pure numpy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

import numpy as np

from cadis.errors import CadisError
from cadis.validation import choice


def _checked(p_values: Sequence[float]) -> np.ndarray:
    values = np.asarray(p_values, dtype=float)
    if values.ndim != 1:
        raise CadisError("adjusting p-values needs a flat list of them")
    if np.isnan(values).any() or (values < 0).any() or (values > 1).any():
        raise CadisError(f"p-values lie in [0, 1]; got {values.tolist()}")
    return values


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values, in the order given: the i-th smallest raw p times
    the m - i + 1 hypotheses not yet rejected, made non-decreasing in that order, capped at 1."""
    values = _checked(p_values)
    order = np.argsort(values, kind="stable")
    remaining = len(values) - np.arange(len(values))
    adjusted = np.empty_like(values)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(remaining * values[order]))
    return adjusted


def benjamini_hochberg(p_values: Sequence[float]) -> np.ndarray:
    """Benjamini-Hochberg's step-up adjusted p-values, in the order given: the i-th smallest
    raw p times m / i, made non-decreasing in that order from the largest down, capped at 1."""
    values = _checked(p_values)
    order = np.argsort(values, kind="stable")
    rank = np.arange(1, len(values) + 1)
    scaled = len(values) / rank * values[order]
    adjusted = np.empty_like(values)
    adjusted[order] = np.minimum(1.0, np.minimum.accumulate(scaled[::-1])[::-1])
    return adjusted


#: Each correction under the name users write (``cadis analyze --correct``).
CORRECTIONS: Final[dict[str, Callable[[Sequence[float]], np.ndarray]]] = {
    "holm": holm, "bh": benjamini_hochberg}
#: How a table names each correction.
CORRECTION_NAMES: Final = {"holm": "Holm", "bh": "Benjamini-Hochberg"}
#: What each correction controls, for a table's header.
CORRECTION_CONTROLS: Final = {"holm": "family-wise error rate",
                              "bh": "false discovery rate"}


def adjust(p_values: Sequence[float], correction: str) -> np.ndarray:
    """``p_values`` adjusted by the correction named ``correction`` (a key of
    :data:`CORRECTIONS`), or :class:`CadisError` naming the allowed ones."""
    return CORRECTIONS[choice(correction, "correction", tuple(CORRECTIONS))](p_values)


def adjust_grouped(groups: Sequence[Sequence[float]], correction: str) -> list[list[float]]:
    """Every p-value of ``groups`` adjusted together, as one family, by ``correction``
    (:func:`adjust`), returned in the groups' shape."""
    flat = iter(adjust([p for group in groups for p in group], correction).tolist())
    return [[next(flat) for _ in group] for group in groups]
