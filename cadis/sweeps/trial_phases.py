"""Where a trial's slot went: its phases from the results it reported and the slot's own start
and end (:mod:`cadis.tracking.contract` names them; the trial callback logs them on the
trial's run, the summary gives their medians over the sweep).

The slot is what Tune held for the trial, from its start to its end as the driver saw them.
Its compute is the epochs' optimizer steps, the proxy after each epoch and the rank stage's
certification, as the worker timed them; the rest, ``orchestration``, is what the trial cost
beyond its compute: processes starting, models and data loading, checkpoints, reports and the
run winding down. Epochs a restarted Train run repeated count once (the last time).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cadis.sweeps.layout import EPOCH
from cadis.tracking.contract import (
    EPOCH_SECONDS,
    FIRST_STEP,
    LOOP_STARTED,
    ORCHESTRATION,
    PHASE_PREFIX,
    PHASES,
    PROXY_SECONDS,
    RANK_SECONDS,
    REPORTED,
)

@dataclass
class TrialClock:
    """A trial's times as its results arrive; :meth:`phases` once its slot has ended."""

    slot_started: float
    loop_started: float | None = None
    first_step: float | None = None
    last_reported: float | None = None
    epochs: dict[int, float] = field(default_factory=dict)
    proxy: dict[int, float] = field(default_factory=dict)
    rank: float = 0.0

    def add(self, result: Mapping[str, object]) -> None:
        """Take what one result says of the trial's time (missing fields: nothing)."""
        if isinstance(result.get(LOOP_STARTED), (int, float)) and self.loop_started is None:
            self.loop_started = float(result[LOOP_STARTED])
        if isinstance(result.get(FIRST_STEP), (int, float)) and self.first_step is None:
            self.first_step = float(result[FIRST_STEP])
        if isinstance(result.get(REPORTED), (int, float)):
            self.last_reported = float(result[REPORTED])
        if isinstance(result.get(RANK_SECONDS), (int, float)):
            self.rank = float(result[RANK_SECONDS])
        elif EPOCH in result:
            epoch = int(result[EPOCH])
            for name, into in ((EPOCH_SECONDS, self.epochs), (PROXY_SECONDS, self.proxy)):
                if isinstance(result.get(name), (int, float)):
                    into[epoch] = float(result[name])

    def phases(self, slot_ended: float) -> dict[str, float]:
        """The phases in seconds (``phase.start`` ... ``phase.end``; those the results did not
        time are left out) and :data:`ORCHESTRATION`: the slot less its compute."""
        epochs, proxy = sum(self.epochs.values()), sum(self.proxy.values())
        measured = {"epochs": epochs, "proxy": proxy, "rank": self.rank}
        if self.loop_started is not None:
            measured["start"] = self.loop_started - self.slot_started
            if self.first_step is not None:
                measured["setup"] = self.first_step - self.loop_started
        if self.last_reported is not None:
            measured["end"] = slot_ended - self.last_reported
        slot = slot_ended - self.slot_started
        return {**{f"{PHASE_PREFIX}{name}": seconds for name, seconds in measured.items()},
                ORCHESTRATION: slot - epochs - proxy - self.rank}


def median_line(runs_metrics: Iterable[Mapping[str, float]]) -> str | None:
    """One line for a person: the median orchestration a trial and the median of each phase,
    over the trials whose runs carry them (None: none does)."""
    timed = [metrics for metrics in runs_metrics if math.isfinite(metrics.get(ORCHESTRATION,
                                                                              math.nan))]
    if not timed:
        return None

    def median(name: str) -> str:
        values = [metrics[name] for metrics in timed if name in metrics]
        return f"{statistics.median(values):.1f} s" if values else "-"

    phases = ", ".join(f"{name} {median(PHASE_PREFIX + name)}"
                       for name in PHASES)
    return (f"trial time (median of {len(timed)}): orchestration {median(ORCHESTRATION)} "
            f"beyond its compute; phases: {phases}")
