"""What a sweep optimises: one metric and its better direction.

Torch-free and Ray-free on purpose: the ranking of trials and ``cadis compare`` use it, and
neither should pay for the fine-tuning configuration it sits beside in a sweep file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cadis.tracking.contract import is_final_metric, validation_metric


@dataclass(frozen=True)
class Objective:
    """A final (or per-epoch) metric the searcher optimises, by its canonical name. A final
    metric is optimised as the rank stage measures it, on validation (:attr:`searched`)."""

    metric: str
    mode: Literal["max", "min"]

    @property
    def searched(self) -> str:
        """The name of the figure the searcher is told: ``val_certified_accuracy_r0.5`` for
        ``certified_accuracy_r0.5``; a per-epoch metric as it is."""
        return validation_metric(self.metric) if is_final_metric(self.metric) else self.metric
