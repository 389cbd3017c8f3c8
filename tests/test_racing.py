"""The race's pure logic (cadis.sweeps.racing) on made-up records, without Ray: who leaves at
each look, when the race stops (one left, the images used up, the budget spent), the
finalists and their tie-break, the images that decided each trial, and that only the
contenders still in the race are certified on a further block."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest

from cadis.smoothing.records import Record
from cadis.sweeps.objective import Objective
from cadis.sweeps.parse import sweep_from_mapping
from cadis.sweeps.racing import (
    STOP_BUDGET,
    STOP_ONE_LEFT,
    STOP_USED_UP,
    TIE_BREAK,
    block_bounds,
    look,
    race,
    why_not_raced,
)
from cadis.sweeps.spec import RaceSettings

BLOCK = 100
OBJECTIVE = [Objective("certified_accuracy_r0.5", "max")]
# Whether a trial certifies image i (at radius 1.0, so at the objective's 0.5).
Certifies = Callable[[int], bool]
ALL: Certifies = lambda image: True  # noqa: E731
# Misses one image in twenty: 5 discordant images a block against ALL (McNemar p = 0.0625 on
# one block, about 0.002 on two).
MOST: Certifies = lambda image: image % 20 != 0  # noqa: E731
HALF: Certifies = lambda image: image % 2 == 0  # noqa: E731
# Nine in ten, missing other images than NINE_B's: inseparable from it on any number of blocks.
NINE_A: Certifies = lambda image: image % 10 != 0  # noqa: E731
NINE_B: Certifies = lambda image: image % 10 != 1  # noqa: E731


def block_records(certifies: Certifies, block: int) -> list[Record]:
    images = range(block * BLOCK, (block + 1) * BLOCK)
    return [Record.from_prediction(image, 0, 0 if certifies(image) else 1,
                                   1.0 if certifies(image) else 0.0, 0.5)
            for image in images]


class Blocks:
    """Certifies each block from ``trials`` (name -> what it certifies), remembering who was
    certified on which block."""

    def __init__(self, trials: dict[str, Certifies]) -> None:
        self.trials = trials
        self.asked: list[tuple[int, tuple[str, ...]]] = []

    def __call__(self, block: int, survivors: Sequence[str]) -> dict[str, list[Record]]:
        self.asked.append((block, tuple(survivors)))
        return {name: block_records(self.trials[name], block) for name in survivors}


def run(trials: dict[str, Certifies], blocks: int = 5, top_k: int = 2,
        budget: float | None = None, spent: float = 0.0):
    certify = Blocks(trials)
    result = race(list(trials), blocks, certify, OBJECTIVE,
                  RaceSettings(block=BLOCK, budget_seconds=budget), top_k, lambda: spent)
    return result, certify.asked


def test_blocks_start_with_the_rank_stages_images_and_end_at_max_images():
    assert block_bounds(100, 100, 500) == [(0, 100), (100, 200), (200, 300), (300, 400),
                                           (400, 500)]
    assert block_bounds(100, 150, 320) == [(0, 100), (100, 250), (250, 320)]
    assert block_bounds(100, 100, 100) == [(0, 100)]


def test_a_contender_far_behind_leaves_at_the_first_look_and_the_race_stops():
    result, asked = run({"a": HALF, "b": ALL})
    assert result.stopped == STOP_ONE_LEFT
    assert result.finalists == ("b",)
    assert result.looks[0].leader == "b" and result.looks[0].left == ("a",)
    assert result.images == {"a": 100, "b": 100}
    # The rank stage's block only: no further image was certified.
    assert asked == [(0, ("a", "b"))]


def test_a_contender_separated_only_by_more_images_leaves_at_a_later_look():
    result, asked = run({"close": MOST, "leader": ALL, "tied": NINE_A, "other": NINE_B},
                        top_k=3)
    first = result.looks[0]
    assert first.leader == "leader" and first.left == ("tied", "other")
    assert first.survivors == ("leader", "close")
    verdict = first.verdicts[OBJECTIVE[0].metric][0]
    assert (verdict.other, verdict.separated, verdict.discordant) == ("close", False, (5, 0))
    assert result.looks[1].left == ("close",)
    assert result.stopped == STOP_ONE_LEFT and result.finalists == ("leader",)
    assert result.images == {"tied": 100, "other": 100, "close": 200, "leader": 200}
    assert asked == [(0, ("close", "leader", "tied", "other")), (1, ("leader", "close"))]


def test_inseparable_contenders_race_until_the_images_are_used_up():
    result, asked = run({"a": NINE_A, "b": NINE_B, "c": NINE_A}, blocks=3, top_k=2)
    assert result.stopped == STOP_USED_UP
    assert [each.images for each in result.looks] == [100, 200, 300]
    assert all(not each.left for each in result.looks)
    # Equal values: the rank stage's order decides, and top_k bounds the finalists.
    assert result.finalists == ("a", "b")
    assert result.images == {"a": 300, "b": 300, "c": 300}
    assert [block for block, _ in asked] == [0, 1, 2]


def test_the_budget_stops_the_race_before_a_further_block():
    result, asked = run({"a": NINE_A, "b": NINE_B}, budget=10.0, spent=10.0)
    assert result.stopped == STOP_BUDGET
    assert asked == [(0, ("a", "b"))]
    assert result.finalists == ("a", "b") and result.images == {"a": 100, "b": 100}


def test_a_race_run_again_on_the_same_records_decides_the_same():
    trials = {"close": MOST, "leader": ALL, "tied": NINE_A}
    assert run(trials)[0] == run(trials)[0]


def test_a_contender_leaves_only_when_behind_on_every_objective():
    acr = Objective("acr", "max")
    # "b" is far behind at radius 0.5 but has the larger radii: it stays on the front.
    records = {"a": block_records(ALL, 0),
               "b": [Record.from_prediction(record.idx, 0, 0, 3.0, 0.5) if record.correct
                     else record for record in block_records(HALF, 0)]}
    assert look(0, records, OBJECTIVE, 0.05).left == ("b",)
    assert look(0, records, [OBJECTIVE[0], acr], 0.05).left == ()


def sweep_with(**settings):
    return sweep_from_mapping({"name": "race", "search": {"lambda": {"uniform": [0.5, 8]}},
                               "num_trials": 2, **settings})


def test_why_a_sweep_has_no_race():
    assert why_not_raced(sweep_with(objective={"metric": "acr", "mode": "max"})) is None
    off = sweep_with(objective={"metric": "acr", "mode": "max"},
                     certify={"race": {"enabled": False}})
    assert why_not_raced(off) == "certify.race.enabled is false"
    per_epoch = sweep_with(objective={"metric": "loss", "mode": "min"})
    assert "not measured by the certification's records" in why_not_raced(per_epoch)


@pytest.mark.parametrize("race, message", [
    ({"block": 0}, "certify.race.block must be an integer >= 1"),
    ({"max_images": 50}, r"certify.race.max_images \(50\) must lie between "
                         r"certify.rank.images \(100\)"),
    ({"max_images": 600}, r"the validation hold-out \(base.val_images = 500\)"),
    ({"family_alpha": 1.5}, r"certify.race.family_alpha must lie in \(0, 1\)"),
    ({"budget_seconds": 0}, "certify.race.budget_seconds must be a number > 0"),
    ({"enabled": "yes"}, "certify.race.enabled must be true or false"),
    ({"blocks": 3}, "unknown key 'certify.race.blocks'; allowed: block, max_images"),
])
def test_race_settings_are_checked_at_the_edge(race, message):
    from cadis.errors import CadisError

    with pytest.raises(CadisError, match=message):
        sweep_with(objective={"metric": "acr", "mode": "max"}, certify={"race": race})


def test_race_defaults_fit_the_hold_out():
    assert sweep_with(objective={"metric": "acr", "mode": "max"}).race == RaceSettings()
    small = sweep_with(objective={"metric": "acr", "mode": "max"},
                       base={"val_images": 200})
    assert small.race.max_images == 200


def test_describe_shows_the_race_settings_or_why_there_is_none():
    from cadis.sweeps.describe import describe

    raced = describe(sweep_with(objective={"metric": "acr", "mode": "max"},
                                certify={"race": {"block": 50, "budget_seconds": 600}}))
    assert "racing stage: the ranked trials on blocks of 50 further validation images up to " \
           "the first 500" in raced
    assert "family_alpha 0.05); a budget of 600 s of certification; finalists ordered by " \
           f"{TIE_BREAK}" in raced
    assert "final stage: the race's finalists (at most 2) on the test set" in raced
    off = describe(sweep_with(objective={"metric": "acr", "mode": "max"},
                              certify={"race": {"enabled": False}}))
    assert "racing stage: off (certify.race.enabled is false)" in off
    assert "final stage: the top 2 by rank on the test set" in off



def test_the_sweeps_run_logs_the_race_settings_as_params(tmp_path):
    from mlflow.tracking import MlflowClient

    from cadis.sweeps.mlflow_writer import SweepTracker

    sweep = sweep_with(objective={"metric": "acr", "mode": "max"},
                       certify={"race": {"block": 50}},
                       mlflow={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                               "experiment": "raced"})
    tracker = SweepTracker(sweep.tracking_uri(), sweep, tmp_path, None)
    (tmp_path / "sweep.yaml").write_text("name: race\n")
    tracker.open_sweep(tmp_path / "sweep.yaml")
    params = MlflowClient(sweep.tracking_uri()).get_run(tracker.parent_run_id).data.params
    assert {key: value for key, value in params.items() if key.startswith("certify.race.")} \
        == {"certify.race.block": "50", "certify.race.max_images": "500",
            "certify.race.family_alpha": "0.05", "certify.race.budget_seconds": "None",
            "certify.race.enabled": "True"}
