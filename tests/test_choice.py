"""The sweep's choice with its evidence, from records on disk: the leader's verdicts against
every other trial on the same images, a contender inside the noise named inseparable (never
beaten), the incumbent by name, a trial without records or with other images a note instead
of an error, and the words, table and MLflow values each verdict becomes."""

from __future__ import annotations

from pathlib import Path

import pytest

from cadis.errors import CadisError
from cadis.smoothing.records import RECORDS_FILENAME, Record, write_records
from cadis.sweeps.choice import (
    INCUMBENT_LABEL,
    TEST,
    TIE_BREAK,
    VALIDATION,
    Choice,
    decide,
    record_blocks,
    verdict_fields,
    verdict_target,
)
from cadis.sweeps.layout import trial_certify_dir, trial_race_block_dir, trial_rank_dir
from cadis.sweeps.objective import Objective
from cadis.tracking import contract as tracking

IMAGES = 200
RADIUS = 0.5
# How many of the images each trial certifies at RADIUS (the first ones): the leader and its
# close contender differ on 2 images, the incumbent is 50 behind.
CERTIFIED = {"leader": 150, "close": 148, "incumbent": 100}
ACCURACY = Objective(tracking.certified_accuracy_metric(RADIUS), "max")
LABELS = {"leader": "trial_leader", "close": "trial_close", "incumbent": INCUMBENT_LABEL}


def records(certified: int, images: int = IMAGES) -> list[Record]:
    """``images`` records, the first ``certified`` correct at radius 0.75, the rest wrong."""
    return [Record.from_prediction(idx, idx % 10, idx % 10 if idx < certified else -1,
                                   0.75 if idx < certified else 0.0, 0.01)
            for idx in range(images)]


def write_trials(results: Path, split: str = VALIDATION,
                 certified: dict[str, int] = CERTIFIED) -> None:
    folder = trial_rank_dir if split == VALIDATION else trial_certify_dir
    for trial, count in certified.items():
        out = folder(results, trial)
        out.mkdir(parents=True)
        write_records(out / RECORDS_FILENAME, records(count))


def test_the_leader_is_ahead_of_the_incumbent_and_inseparable_from_a_close_contender(tmp_path):
    write_trials(tmp_path)
    decisions, notes = decide(tmp_path, VALIDATION, "leader", LABELS, [ACCURACY])
    assert notes == []
    (decision,) = decisions
    assert (decision.split, decision.objective, decision.images) == (VALIDATION,
                                                                     ACCURACY.metric, IMAGES)
    close, incumbent = decision.verdicts
    assert (close.other, incumbent.other) == ("trial_close", INCUMBENT_LABEL)
    assert close.difference == pytest.approx(-2 / IMAGES) and not close.separated
    assert close.low <= 0 <= close.high
    assert incumbent.difference == pytest.approx(-50 / IMAGES) and incumbent.separated
    assert incumbent.high < 0 and incumbent.discordant == (50, 0)
    assert decision.trial_of(INCUMBENT_LABEL) == "incumbent"
    sentence = decision.sentence()
    assert sentence.startswith("chosen trial_leader: ahead of the incumbent by +0.250 [")
    assert "inseparable from trial_close (-0.010" in sentence
    assert sentence.endswith(f"chosen among them by {TIE_BREAK}")
    assert "best" not in sentence


def test_acr_is_decided_too_and_each_objective_is_its_own_decision(tmp_path):
    write_trials(tmp_path)
    decisions, _ = decide(tmp_path, VALIDATION, "leader", LABELS,
                          [ACCURACY, Objective(tracking.ACR, "max")])
    assert [decision.objective for decision in decisions] == [ACCURACY.metric, tracking.ACR]
    acr = decisions[1].verdicts[1]
    assert acr.difference == pytest.approx(-50 * 0.75 / IMAGES) and acr.separated


def test_test_records_are_read_from_the_final_stage_folders(tmp_path):
    write_trials(tmp_path, TEST, {"leader": 150, "incumbent": 160})
    (decision,), notes = decide(tmp_path, TEST, "leader",
                                {"leader": "trial_leader", "incumbent": INCUMBENT_LABEL},
                                [ACCURACY])
    assert notes == [] and decision.split == TEST
    assert decision.verdicts[0].difference == pytest.approx(10 / IMAGES)


def test_a_trial_without_records_is_a_note_and_the_rest_are_decided(tmp_path):
    write_trials(tmp_path, certified={"leader": 150, "incumbent": 100})
    decisions, notes = decide(tmp_path, VALIDATION, "leader", LABELS, [ACCURACY])
    assert [verdict.other for verdict in decisions[0].verdicts] == [INCUMBENT_LABEL]
    assert len(notes) == 1 and notes[0].startswith("trial_close left out on validation")


def test_records_of_other_images_give_a_note_not_an_error(tmp_path):
    write_trials(tmp_path, certified={"leader": 150})
    out = trial_rank_dir(tmp_path, "close")
    out.mkdir(parents=True)
    write_records(out / RECORDS_FILENAME, records(148, images=IMAGES - 1))
    decisions, notes = decide(tmp_path, VALIDATION, "leader",
                              {"leader": "trial_leader", "close": "trial_close"}, [ACCURACY])
    assert decisions == []
    assert notes[0].startswith(f"no validation verdicts on {ACCURACY.metric} (trial_leader and "
                               f"trial_close certify different images")


def test_a_lone_leader_or_one_without_records_decides_nothing(tmp_path):
    write_trials(tmp_path, certified={"close": 148})
    assert decide(tmp_path, VALIDATION, "close", {"close": "c"}, [ACCURACY]) == ([], [])
    decisions, notes = decide(tmp_path, VALIDATION, "leader",
                              {"leader": "trial_leader", "close": "c"}, [ACCURACY])
    assert decisions == [] and notes[0].startswith("trial_leader left out")


@pytest.mark.parametrize("objective", [Objective("hallucination_rate", "min"),
                                       Objective(tracking.certified_accuracy_metric(0.5), "min"),
                                       Objective("proxy_acr", "max")])
def test_only_certified_figures_to_maximise_have_verdicts(objective):
    with pytest.raises(CadisError, match="not a certified figure to maximise"):
        verdict_target(objective)
    assert verdict_target(ACCURACY) == RADIUS
    assert verdict_target(Objective(tracking.ACR, "max")) is None


def test_verdict_fields_turned_round_are_the_leader_minus_the_other(tmp_path):
    write_trials(tmp_path)
    (decision,), _ = decide(tmp_path, VALIDATION, "leader", LABELS, [ACCURACY])
    incumbent = decision.verdicts[1]
    fields = verdict_fields(incumbent)
    assert list(fields) == list(tracking.VERDICT_FIELDS)
    assert (fields["separated"], fields["images"]) == (1.0, IMAGES)
    turned = verdict_fields(incumbent, turned=True)
    assert turned["difference"] == -fields["difference"] > 0
    assert (turned["low"], turned["high"]) == (-fields["high"], -fields["low"])
    assert turned["p_holm"] == fields["p_holm"]


def test_words_and_markdown_hold_every_decision_and_note(tmp_path):
    write_trials(tmp_path)
    decisions, _ = decide(tmp_path, VALIDATION, "leader", LABELS, [ACCURACY])
    choice = Choice("leader", "incumbent", tuple(decisions), ("a note",))
    words = choice.words()
    assert words[0].startswith(f"  on validation ({IMAGES} images), {ACCURACY.metric}: "
                               f"chosen trial_leader: ahead of the incumbent")
    assert words[1] == "  verdicts: a note"
    markdown = choice.markdown()
    assert f"## on validation ({IMAGES} images), {ACCURACY.metric}" in markdown
    assert "| the incumbent |" in markdown and "| 50 / 0 |" in markdown
    assert "## Not decided\n\n- a note" in markdown


def shifted(records_of_block: list[Record], offset: int) -> list[Record]:
    """Records of the next block: the same outcomes on images ``offset`` further on."""
    return [Record.from_prediction(record.idx + offset, (record.idx + offset) % 10,
                                   (record.idx + offset) % 10 if record.correct else -1,
                                   record.radius, 0.01) for record in records_of_block]


def write_race_block(results: Path, trial: str, block: int, certified: int) -> None:
    out = trial_race_block_dir(results, trial, block)
    out.mkdir(parents=True)
    write_records(out / RECORDS_FILENAME, shifted(records(certified), block * IMAGES))


def test_validation_joins_the_race_blocks_and_a_trial_that_left_is_compared_on_its_own(tmp_path):
    # The leader and the close contender raced two further blocks; the incumbent left after
    # the rank stage's block (look 0) and has only it.
    write_trials(tmp_path)
    for block in (1, 2):
        write_race_block(tmp_path, "leader", block, 150)
        write_race_block(tmp_path, "close", block, 140)
    assert [len(block) for block in record_blocks(tmp_path, VALIDATION, "leader")] == [IMAGES] * 3
    decisions, notes = decide(tmp_path, VALIDATION, "leader", LABELS, [ACCURACY], "the race's")
    assert notes == []
    (decision,) = decisions
    close, incumbent = decision.verdicts
    assert (close.images, incumbent.images) == (3 * IMAGES, IMAGES)
    assert close.difference == pytest.approx(-(2 + 10 + 10) / (3 * IMAGES))
    assert close.discordant == (22, 0) and close.separated
    assert incumbent.difference == pytest.approx(-50 / IMAGES) and incumbent.separated
    # Holm across the decision: the smaller raw p is multiplied by the two comparisons.
    assert min(close.p_adjusted, incumbent.p_adjusted) == pytest.approx(
        2 * min(close.p, incumbent.p))
    assert decision.heading() == f"on validation ({IMAGES} to {3 * IMAGES} images), " \
                                 f"{ACCURACY.metric}"
    assert decision.sentence().startswith("chosen trial_leader: ahead of")
