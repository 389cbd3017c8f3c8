"""Where a trial's slot went: the phases from its results and its slot's start and end."""

from __future__ import annotations

import math

import pytest

from cadis.sweeps.trial_phases import TrialClock, median_line
from cadis.tracking.contract import (
    EPOCH_SECONDS,
    FIRST_STEP,
    LOOP_STARTED,
    ORCHESTRATION,
    PROXY_SECONDS,
    RANK_SECONDS,
    REPORTED,
)


def epoch_result(epoch: int, seconds: float, proxy: float, reported: float) -> dict:
    return {"epoch": epoch, EPOCH_SECONDS: seconds, PROXY_SECONDS: proxy,
            LOOP_STARTED: 104.0, FIRST_STEP: 107.0, REPORTED: reported}


def test_phases_split_the_slot_into_compute_and_orchestration():
    clock = TrialClock(slot_started=100.0)
    clock.add(epoch_result(1, 10.0, 1.0, 119.0))
    clock.add(epoch_result(2, 10.0, 1.0, 131.0))
    clock.add({"epoch": 2, RANK_SECONDS: 5.0, REPORTED: 137.0})
    phases = clock.phases(slot_ended=139.0)
    assert phases["phase.start"] == 4.0 and phases["phase.setup"] == 3.0
    assert phases["phase.epochs"] == 20.0 and phases["phase.proxy"] == 2.0
    assert phases["phase.rank"] == 5.0 and phases["phase.end"] == 2.0
    # 39 s of slot, 27 of compute
    assert phases[ORCHESTRATION] == pytest.approx(12.0)


def test_an_epoch_a_restarted_run_repeats_counts_once():
    clock = TrialClock(slot_started=0.0)
    clock.add(epoch_result(1, 10.0, 1.0, 20.0))
    clock.add(epoch_result(1, 12.0, 1.5, 40.0))  # the run restarted from before epoch 1 ended
    phases = clock.phases(slot_ended=41.0)
    assert phases["phase.epochs"] == 12.0 and phases["phase.proxy"] == 1.5
    assert phases[ORCHESTRATION] == pytest.approx(41.0 - 13.5)


def test_a_trial_that_reported_nothing_is_all_orchestration():
    phases = TrialClock(slot_started=10.0).phases(slot_ended=16.0)
    assert phases[ORCHESTRATION] == 6.0
    assert "phase.start" not in phases and "phase.end" not in phases


def test_median_line_reads_the_runs_that_carry_phases():
    runs = [{ORCHESTRATION: 4.0, "phase.start": 2.0}, {ORCHESTRATION: 8.0, "phase.start": 4.0},
            {ORCHESTRATION: math.nan}, {}]
    line = median_line(runs)
    assert line is not None and "median of 2" in line
    assert "orchestration 6.0 s" in line and "start 3.0 s" in line and "rank -" in line
    assert median_line([{}]) is None
