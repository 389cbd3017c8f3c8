"""Whether ASHA's cuts saw differences beyond the proxy's noise: each rung's cut rebuilt as
Ray 2.60's ASHA made it, and, per rung, how many of the trials it stopped lay within the
proxy's noise of the cut they met. The cut itself is not made noise-aware; this only says
how often it decided inside the noise.

Ray's ASHA (``ray/tune/schedulers/async_hyperband.py``, one bracket, as
:func:`cadis.sweeps.searcher.build_scheduler` makes it) keeps, per rung, the value every trial
had when it reached the rung, in the order trials reached it. A trial reaching a rung meets
the cut ``_Bracket.cutoff``: the (1 - 1/reduction_factor) quantile (linear interpolation)
of the values recorded there before it, and is stopped when its own value is below it (in
the better-is-higher sign: a ``min`` metric is negated). Its value is recorded whether it
stops or not. The incumbent's values enter the rungs like any trial's; it is never stopped.

Rebuilt from the trials' MLflow runs: every per-epoch metric is logged with step = epoch and
the result's timestamp, which Tune stamps in whole seconds, so trials that reached a rung in
the same second are taken in the order they started. No torch here, nor MLflow (a client is
passed in).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from cadis.tracking.contract import OUTCOME_STOPPED, PROXY_NOISE
from cadis.tracking.sweep_reader import TrialRow

#: How many standard errors of a difference a stopped trial's value may lie below its cut
#: and still count as within the proxy's noise: 2 (about z = 1.96), a ~95% two-sided band for
#: the difference of two estimates, not corrected for the many cuts a sweep makes.
NOISE_SES: Final = 2.0
#: Tune's ``max_t`` is the sweep's ``max_t`` plus this (:func:`build_scheduler` adds it: one
#: more, so that the last epoch's trial goes on to its certification). It sets how many rungs Ray
#: makes; a rung at the sweep's ``max_t`` itself, if any, is a real cut.
TUNE_MAX_T_EXTRA: Final = 1


@dataclass(frozen=True)
class ProxyPoint:
    """A trial's per-epoch metric: its value, its standard error (None: not logged) and when
    it was logged (ms since the epoch)."""

    epoch: int
    value: float
    se: float | None
    logged_ms: int


@dataclass(frozen=True)
class TrialProxy:
    """One trial's per-epoch metric, epoch by epoch, and whether ASHA stopped it (then at
    its last epoch). ``order`` breaks ties between points logged in the same instant."""

    trial: str
    points: tuple[ProxyPoint, ...]
    stopped: bool
    order: int


@dataclass(frozen=True)
class Cut:
    """The cut a stopped trial met at a rung: its ``value`` and ``se`` at ``epoch``, the
    ``cut`` and the SE at the cut (interpolated between the two recorded values the quantile
    falls between, as the cut is). Values in the metric's own units."""

    trial: str
    rung: float
    epoch: int
    value: float
    se: float | None
    cut: float
    cut_se: float | None
    sign: float
    """1 where higher is better, -1 where lower is."""

    @property
    def gap(self) -> float:
        """How far the trial's value lay on the wrong side of the cut (> 0 where the cut
        stopped it)."""
        return self.sign * (self.cut - self.value)

    @property
    def reproduced(self) -> bool:
        """Whether this cut stops the trial, as ASHA did (False: the rebuilt order of arrival
        differs from Ray's)."""
        return self.gap > 0

    @property
    def within_noise(self) -> bool | None:
        """Whether the gap is below :data:`NOISE_SES` SEs of the difference (the two SEs
        combined as independent: conservative on shared draws); None when an SE is unknown."""
        if self.se is None or self.cut_se is None:
            return None
        return self.gap < NOISE_SES * math.hypot(self.se, self.cut_se)


@dataclass(frozen=True)
class RungTally:
    """The trials ASHA stopped at one rung: how many, how many within the proxy's noise of
    their cut, how many whose noise is unknown."""

    epoch: int
    stopped: int
    within: int
    unknown: int


def ray_milestones(grace_period: float, reduction_factor: float, tune_max_t: float
                   ) -> list[float]:
    """The rungs' milestones as Ray's ``_Bracket`` makes them (bracket 0), ascending:
    grace_period * reduction_factor**k for k below int(log(max_t / grace) / log(rf) + 1)."""
    count = int(math.log(tune_max_t / grace_period) / math.log(reduction_factor) + 1)
    return [grace_period * reduction_factor ** k for k in range(count)]


def sweep_milestones(scheduler: Mapping[str, Any]) -> list[float]:
    """The milestones a sweep's trials can reach: Ray's for the sweep's ASHA settings
    (``grace_period``, ``reduction_factor``, ``max_t`` as the sweep file has them), up to the
    sweep's ``max_t``."""
    milestones = ray_milestones(scheduler["grace_period"], scheduler["reduction_factor"],
                                scheduler["max_t"] + TUNE_MAX_T_EXTRA)
    return [milestone for milestone in milestones if milestone <= scheduler["max_t"]]


def quantile_with_se(recorded: Sequence[tuple[float, float | None]], q: float
                     ) -> tuple[float, float | None]:
    """The ``q`` quantile of the recorded values as numpy's default (linear) percentile
    gives it, and the SE at it, interpolated alike between the SEs of the two values it lies
    between (None where either is unknown). ``recorded``: (value, se) pairs, not empty."""
    ordered = sorted(recorded, key=lambda pair: (pair[0], -math.inf if pair[1] is None
                                                 else pair[1]))
    position = (len(ordered) - 1) * q
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    fraction = position - below
    (low, low_se), (high, high_se) = ordered[below], ordered[above]
    value = low + fraction * (high - low)
    se = None if low_se is None or high_se is None else low_se + fraction * (high_se - low_se)
    return value, se


def rebuild_cuts(trials: Iterable[TrialProxy], milestones: Sequence[float],
                 reduction_factor: float, mode: str) -> list[Cut]:
    """The cut each stopped trial met at the rung where ASHA stopped it, replaying every
    trial's points through Ray's rungs in the order they were logged. A stopped trial whose
    last point recorded at no rung (stopped for another reason) has none."""
    sign = 1.0 if mode == "max" else -1.0
    q = 1 - 1 / reduction_factor
    trials = list(trials)
    last = {trial.trial: trial.points[-1].epoch for trial in trials
            if trial.stopped and trial.points}
    arrivals = sorted(((point.logged_ms, trial.order, point.epoch, trial.trial, point)
                       for trial in trials for point in trial.points),
                      key=lambda item: item[:3])
    rungs: dict[float, dict[str, tuple[float, float | None]]] = {
        milestone: {} for milestone in milestones}
    cuts = []
    for _, _, epoch, name, point in arrivals:
        # Ray's _Bracket.on_result: the highest rung at or below the epoch that has no value
        # of this trial yet takes this one.
        for milestone in sorted(milestones, reverse=True):
            recorded = rungs[milestone]
            if epoch < milestone or name in recorded:
                continue
            if recorded and last.get(name) == epoch:
                cut, cut_se = quantile_with_se(list(recorded.values()), q)
                cuts.append(Cut(name, milestone, epoch, point.value, point.se, sign * cut,
                                cut_se, sign))
            recorded[name] = (sign * point.value, point.se)
            break
    return cuts


def tally(cuts: Iterable[Cut]) -> list[RungTally]:
    """Per rung (by epoch, ascending), the stopped trials and how many lay within noise."""
    by_epoch: dict[int, list[Cut]] = {}
    for cut in cuts:
        by_epoch.setdefault(cut.epoch, []).append(cut)
    return [RungTally(epoch, len(met), sum(cut.within_noise is True for cut in met),
                      sum(cut.within_noise is None for cut in met))
            for epoch, met in sorted(by_epoch.items())]


def stopped_line(cuts: Sequence[Cut], stopped: int, metric: str) -> str:
    """One line for a person: ``ASHA stopped 9 trials; within the proxy's noise of the cut
    they met (2 unpaired SEs): at epoch 1, 6 of 7; at epoch 2, 1 of 2``. ``stopped``: every
    trial ASHA stopped (those without a rebuilt cut are named apart)."""
    if stopped == 0:
        return "ASHA stopped no trial"
    head = f"ASHA stopped {stopped} trial{'s' if stopped != 1 else ''}"
    parts = []
    for rung in tally(cuts):
        known = rung.stopped - rung.unknown
        part = f"at epoch {rung.epoch}, {rung.within} of {known}" if known else \
            f"at epoch {rung.epoch}, {rung.stopped} (no SE logged for {metric})"
        if known and rung.unknown:
            part += f" ({rung.unknown} with no SE logged)"
        parts.append(part)
    notes = []
    unreproduced = sum(not cut.reproduced for cut in cuts)
    if unreproduced:
        notes.append(f"{unreproduced} above the rebuilt cut (arrivals in the same second)")
    if len(cuts) < stopped:
        notes.append(f"{stopped - len(cuts)} not at a rung's cut")
    line = head
    if parts:
        line += (f"; within the proxy's noise of the cut they met "
                 f"({NOISE_SES:g} unpaired SEs): " + "; ".join(parts))
    return line + "".join(f"; {note}" for note in notes)


# --------------------------------------------------------------------------- from MLflow


def load_trial_proxies(client: Any, rows: Sequence[TrialRow], metric: str
                       ) -> list[TrialProxy]:
    """Each trial run's per-epoch ``metric`` with its SE (:data:`PROXY_NOISE`; None where the
    metric has none or the run did not log it) and whether ASHA stopped it (its outcome),
    the runs' start order breaking ties. A step logged twice (a resumed trial) counts as
    first logged: Ray keeps a rung's first value of a trial."""
    noise = PROXY_NOISE.get(metric)
    ordered = sorted(rows, key=lambda row: (row.start_time, row.name))
    proxies = []
    for order, row in enumerate(ordered):
        errors = {} if noise is None else {
            item.step: item.value for item in _first_per_step(
                client.get_metric_history(row.run_id, noise))}
        points = tuple(ProxyPoint(item.step, item.value, errors.get(item.step),
                                  item.timestamp) for item in _first_per_step(
            client.get_metric_history(row.run_id, metric)))
        proxies.append(TrialProxy(row.run_id, points, row.outcome == OUTCOME_STOPPED, order))
    return proxies


def _first_per_step(history: Iterable[Any]) -> list[Any]:
    first: dict[int, Any] = {}
    for item in sorted(history, key=lambda item: (item.step, item.timestamp)):
        first.setdefault(item.step, item)
    return list(first.values())


def sweep_cuts(client: Any, rows: Sequence[TrialRow], scheduler: Mapping[str, Any]
               ) -> tuple[list[Cut], int]:
    """The cuts ASHA's stopped trials met among ``rows`` (a sweep's trial runs) under the
    sweep's ASHA settings (``metric``, ``mode``, ``grace_period``, ``reduction_factor``,
    ``max_t``), and how many trials it stopped."""
    proxies = load_trial_proxies(client, rows, scheduler["metric"])
    cuts = rebuild_cuts(proxies, sweep_milestones(scheduler), scheduler["reduction_factor"],
                        scheduler["mode"])
    return cuts, sum(proxy.stopped for proxy in proxies)
