"""The schedules of every training loop here, one function each, stepped by optimizer step:
the learning rate (linear warm-up, then cosine to 0) and the weight decay (cosine from its
start to its end value, the reference recipe's: docs/fine-tuning.md)."""

from __future__ import annotations

import math


def _cosine(progress: float) -> float:
    """1 at ``progress`` 0, falling along a half cosine to 0 at 1 (and after)."""
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor at 0-based ``step`` of ``total``: ``(step + 1) / warmup`` for
    the first ``warmup`` steps, then a cosine from 1 down to 0 at ``total`` (and after)."""
    if step < warmup:
        return (step + 1) / warmup
    return _cosine((step - warmup) / max(1, total - warmup))


def cosine_between(step: int, total: int, start: float, end: float | None) -> float:
    """The value at 0-based ``step`` of ``total`` of a cosine from ``start`` (step 0) to
    ``end`` (step ``total`` and after), without warm-up: the reference code's weight-decay
    schedule. ``end`` None: ``start`` at every step (a constant)."""
    if end is None:
        return start
    return end + (start - end) * _cosine(step / max(1, total))
