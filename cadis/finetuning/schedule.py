"""The learning-rate schedule of every training loop here: linear warm-up, then cosine to 0."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor at 0-based ``step`` of ``total``: ``(step + 1) / warmup`` for
    the first ``warmup`` steps, then a cosine from 1 down to 0 at ``total`` (and after)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
