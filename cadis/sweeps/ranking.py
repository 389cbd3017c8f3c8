"""The order of a sweep's ranked trials: which go to the final stage, and which one is chosen.

One objective: best first by its validation figure. Two objectives (a Pareto front): by
non-dominated sorting, the trials no other trial beats on both objectives first (the front),
then the front of the rest, and so on; within a front best first by the first objective. So
the finalists of a two-objective sweep are taken from its front before any dominated trial,
and the chosen trial is the front's best at the first objective. Ties go to the trial that
started first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from cadis.sweeps.objective import Objective

Item = TypeVar("Item")


def rank_trials(items: Sequence[Item], objectives: Sequence[Objective],
                metrics: Callable[[Item], Mapping[str, float]],
                started: Callable[[Item], int]) -> list[Item]:
    """The ``items`` whose ``metrics`` hold every objective as measured on validation
    (:attr:`Objective.searched`), best first as the module says; the others are left out."""
    signs = [1.0 if objective.mode == "max" else -1.0 for objective in objectives]
    scored = [(item, [sign * metrics(item)[objective.searched]
                      for sign, objective in zip(signs, objectives)])
              for item in items
              if all(objective.searched in metrics(item) for objective in objectives)]
    ordered: list[Item] = []
    remaining = scored
    while remaining:
        front = [(item, score) for item, score in remaining
                 if not any(_dominates(other, score) for _, other in remaining)]
        front.sort(key=lambda pair: (-pair[1][0], started(pair[0])))
        ordered += [item for item, _ in front]
        kept = {id(item) for item, _ in front}
        remaining = [(item, score) for item, score in remaining if id(item) not in kept]
    return ordered


def _dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` at least as good as ``b`` everywhere and better somewhere (larger is better)."""
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))
