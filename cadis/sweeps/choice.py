"""The sweep's choice with its evidence: how far the data carry the trial the ranking chose.

Which trial is chosen is the race's leader where the racing stage ran
(:func:`cadis.sweeps.layout.race_finalists`, ordered by :data:`cadis.sweeps.racing.TIE_BREAK`),
else :mod:`cadis.sweeps.ranking`'s (best by the validation figure, ties to the earlier
trial). What this module adds is what may be *said* of it (DESIGN.md §6.3): every ranked
trial was certified on the same validation images from the same stored draws, so for each
objective the chosen trial (the leader) is compared, paired, with every other ranked trial
and with the incumbent (the sweep file's own base) by
:func:`~cadis.smoothing.verdicts.paired_verdicts`: the difference, a paired bootstrap 95%
interval and McNemar's exact p (a sign-flip test for ACR), Holm-adjusted across that
decision. On validation a trial's records are the rank stage's block and every race block it
was certified on, joined; each pair is compared on the blocks both have (a contender that left
the race early on its own, fewer, images: the verdict's ``images`` says how many). After the
final stage the same is done on test, over the trials certified there (the finalists and the
incumbent). A trial is never called best where its interval against
another includes 0: :func:`~cadis.smoothing.verdicts.describe_verdicts` names those as
inseparable and states the tie-break that chose among them.

A decision that cannot be made (records missing, images that differ, an objective that no
record measures) becomes a note, never an error: a finished sweep is not lost to its verdicts.
The verdicts go to MLflow (:meth:`cadis.sweeps.mlflow_writer.SweepTracker.log_choice`, the
names :mod:`cadis.tracking.contract`'s) and into the summary (:mod:`cadis.sweeps.summary`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from cadis.errors import CadisError, first_line
from cadis.smoothing.paired import CONFIDENCE, format_interval, format_p, format_signed
from cadis.smoothing.multiplicity import holm
from cadis.smoothing.records import RECORDS_FILENAME, Record, read_records, render_table
from cadis.smoothing.verdicts import FAMILY_ALPHA, Verdict, describe_verdicts, paired_verdicts
from cadis.sweeps import racing
from cadis.sweeps.final_stage import seed_figures
from cadis.sweeps.layout import (
    race_finalists,
    trial_certify_dir,
    trial_race_block_dir,
    trial_rank_dir,
)
from cadis.sweeps.objective import Objective
from cadis.tracking import contract as tracking

if TYPE_CHECKING:
    from cadis.sweeps.mlflow_writer import SweepTracker

VALIDATION: Final = "validation"
TEST: Final = "test"
#: Where each set's records are, per trial.
RECORDS_DIRS: Final = {VALIDATION: trial_rank_dir, TEST: trial_certify_dir}
#: The ranking's own rule (cadis.sweeps.ranking), stated where the data did not choose.
TIE_BREAK: Final = "the higher validation figure, then the earlier trial"
#: How the verdicts name the incumbent, so that a sentence reads "ahead of the incumbent".
INCUMBENT_LABEL: Final = "the incumbent"


@dataclass(frozen=True)
class Decision:
    """One objective's verdicts on one set: the leader against every other contender, each
    named by its label (``labels``: trial id -> label)."""

    split: str
    objective: str
    leader: str
    labels: Mapping[str, str]
    verdicts: tuple[Verdict, ...]
    #: How the leader was chosen among trials the data did not separate.
    tie_break: str = TIE_BREAK
    #: The training seed of a further seed's test decision (certify.final.seeds), each
    #: configuration's same-numbered seed on the same draws; None: the search's own training.
    train_seed: int | None = None

    def trial_of(self, label: str) -> str:
        """The trial id a verdict's label names."""
        return next(trial for trial, named in self.labels.items() if named == label)

    @property
    def images(self) -> int:
        """The most images a verdict was made on (the leader's, but for a race's leftovers)."""
        return max(verdict.images for verdict in self.verdicts)

    def sentence(self) -> str:
        """``chosen X: ahead of the incumbent by ...; inseparable from Y (...)...``."""
        return f"chosen {self.labels[self.leader]}: " \
               f"{describe_verdicts(self.verdicts, self.tie_break)}"

    def heading(self) -> str:
        fewest = min(verdict.images for verdict in self.verdicts)
        # Trials that left the race early are compared on the images they were certified on.
        images = (f"{self.images}" if fewest == self.images
                  else f"{fewest} to {self.images}")
        seed = "" if self.train_seed is None else f", training seed {self.train_seed}"
        return f"on {self.split}{seed} ({images} images), {self.objective}"


@dataclass(frozen=True)
class Choice:
    """The chosen trial (None: nothing ranked), the incumbent's trial (None: none ranked), the
    decisions made and, for those that could not be, why."""

    chosen: str | None
    incumbent: str | None
    decisions: tuple[Decision, ...]
    notes: tuple[str, ...]
    #: The test figures per training seed of the configurations certified on test
    #: (:func:`~cadis.sweeps.final_stage.seed_figures`); empty before the final stage.
    seeds: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def words(self) -> list[str]:
        """The summary's lines: each decision's heading and sentence (the search's own
        training; further seeds are :mod:`cadis.sweeps.summary`'s per-seed lines), then the
        notes."""
        return [*(f"  {decision.heading()}: {decision.sentence()}"
                  for decision in self.decisions if decision.train_seed is None),
                *(f"  verdicts: {note}" for note in self.notes)]

    def markdown(self) -> str:
        """``choice.md``: how the verdicts were made, each decision's sentence and table."""
        tie_break = self.decisions[0].tie_break if self.decisions else TIE_BREAK
        parts = [f"# The choice\n\nEach verdict is a trial against the chosen one on the same "
                 f"images (on validation, the rank stage's and the race blocks both were "
                 f"certified on): the difference (the trial minus the chosen), a paired "
                 f"bootstrap {CONFIDENCE:.0%} interval, the raw two-sided p (McNemar's exact "
                 f"test for certified accuracy, a sign-flip permutation test for ACR) and Holm's "
                 f"adjusted p across the decision. Separated: Holm p < {FAMILY_ALPHA:g} and "
                 f"the interval excludes 0; among inseparable trials the choice is by "
                 f"{tie_break}, not a finding.\n"]
        for decision in self.decisions:
            rows = [[verdict.other, format_signed(verdict.difference),
                     format_interval((verdict.low, verdict.high)), format_p(verdict.p),
                     format_p(verdict.p_adjusted), f"{verdict.discordant[0]} / "
                     f"{verdict.discordant[1]}", "yes" if verdict.separated else "no"]
                    for verdict in decision.verdicts]
            header = ["trial", "difference", f"{CONFIDENCE:.0%} interval", "p", "p (Holm)",
                      "discordant (chosen / trial)", "separated"]
            parts.append(f"## {decision.heading()}\n\n{decision.sentence()}\n\n"
                         + render_table(header, rows, "markdown", text_columns=1))
        if self.notes:
            parts.append("## Not decided\n\n" + "".join(f"- {note}\n" for note in self.notes))
        return "\n".join(parts)


def verdict_target(objective: Objective) -> float | None:
    """The radius at which the objective's verdicts compare (None: ACR); :class:`CadisError`
    for an objective the records cannot pair: a per-epoch metric, or a minimised one (a
    verdict's words say ahead for more)."""
    radius = tracking.radius_of_metric(objective.metric)
    if objective.mode != "max" or (radius is None and objective.metric != tracking.ACR):
        raise CadisError(f"{objective.metric} ({objective.mode}) is not a certified figure "
                         f"to maximise: the records give it no verdicts")
    return radius


def verdict_fields(verdict: Verdict, turned: bool = False) -> dict[str, float]:
    """A verdict as the values of :data:`~cadis.tracking.contract.VERDICT_FIELDS`; ``turned``:
    the leader minus the other (the interval turned round), as the parent run logs the chosen
    trial against the incumbent."""
    sign = -1.0 if turned else 1.0
    low, high = sorted((sign * verdict.low, sign * verdict.high))
    values = {"difference": sign * verdict.difference, "low": low, "high": high,
              "p": verdict.p, "p_holm": verdict.p_adjusted,
              "separated": float(verdict.separated), "images": float(verdict.images)}
    return {field: values[field] for field in tracking.VERDICT_FIELDS}


def record_blocks(results: Path, split: str, trial: str) -> list[list[Record]]:
    """A trial's records on ``split`` by block: on test the final stage's one; on validation
    the rank stage's (block 0), then each race block it was certified on, in order.
    :class:`CadisError` where the first is missing."""
    blocks = [read_records(RECORDS_DIRS[split](results, trial) / RECORDS_FILENAME)]
    while split == VALIDATION:
        path = trial_race_block_dir(results, trial, len(blocks)) / RECORDS_FILENAME
        if not path.is_file():
            break
        blocks.append(read_records(path))
    return blocks


def leader_verdicts(leader: str, blocks: Mapping[str, Sequence[Sequence[Record]]],
                    metric: str, radius: float | None) -> list[Verdict]:
    """The leader against every other entry of ``blocks`` (name -> its records by block),
    each pair on the blocks both have (joined), Holm-adjusted across them all."""
    def joined(name: str, count: int) -> list[Record]:
        return [record for block in blocks[name][:count] for record in block]

    pairs = [paired_verdicts(leader, {leader: joined(leader, shared),
                                      other: joined(other, shared)}, metric, radius=radius)[0]
             for other in blocks if other != leader
             for shared in [min(len(blocks[leader]), len(blocks[other]))]]
    adjusted = holm([verdict.p for verdict in pairs]) if pairs else []
    return [replace(verdict, p_adjusted=float(p),
                    separated=bool(p < FAMILY_ALPHA and (verdict.low > 0 or verdict.high < 0)))
            for verdict, p in zip(pairs, adjusted)]


def decide(results: Path, split: str, leader: str, labels: Mapping[str, str],
           objectives: Sequence[Objective], tie_break: str = TIE_BREAK
           ) -> tuple[list[Decision], list[str]]:
    """The leader's decisions on ``split``, one per objective, against every trial of
    ``labels`` (trial id -> label, the leader among them) that has records there
    (:func:`record_blocks`, :func:`leader_verdicts`); with notes for what could not be
    decided. ``tie_break`` is how the leader was chosen."""
    blocks, notes = {}, []
    for trial, label in labels.items():
        try:
            blocks[label] = record_blocks(results, split, trial)
        except CadisError as error:
            notes.append(f"{label} left out on {split} ({first_line(error)})")
    if labels[leader] not in blocks or len(blocks) < 2:
        return [], notes
    decisions = []
    for objective in objectives:
        try:
            verdicts = leader_verdicts(labels[leader], blocks, objective.metric,
                                       verdict_target(objective))
        except CadisError as error:
            notes.append(f"no {split} verdicts on {objective.metric} ({first_line(error)})")
            continue
        decisions.append(Decision(split, objective.metric, leader,
                                  {trial: label for trial, label in labels.items()
                                   if label in blocks}, tuple(verdicts), tie_break))
    return decisions, notes


def seed_decisions(figures: Mapping[str, Mapping[str, Any]], leader: str,
                   labels: Mapping[str, str], objectives: Sequence[Objective],
                   tie_break: str = TIE_BREAK) -> tuple[list[Decision], list[str]]:
    """The leader's test decisions of each further training seed (the k-th seed of every
    configuration of ``labels`` against the leader's k-th, on the final stage's shared test
    draws, Holm across each seed's decision), named by the leader's seed; with notes for
    configurations that lack a seed the leader has. ``figures``:
    :func:`~cadis.sweeps.final_stage.seed_figures` of ``labels``' trials."""
    # Each configuration's (training seed, records folder), its own training first.
    seeds = {labels[trial]: [(int(seed), entry["folder"])
                             for seed, entry in per_trial["seeds"].items()]
             for trial, per_trial in figures.items()}
    leader_label = labels[leader]
    decisions: list[Decision] = []
    notes: list[str] = []
    for position, (train_seed, _) in enumerate(seeds.get(leader_label, [])[1:], start=1):
        blocks = {label: [read_records(Path(found[position][1]) / RECORDS_FILENAME)]
                  for label, found in seeds.items() if position < len(found)}
        notes += [f"{label} has no training seed {position + 1} on test"
                  for label in labels.values() if label not in blocks]
        if len(blocks) < 2:
            continue
        for objective in objectives:
            try:
                verdicts = leader_verdicts(leader_label, blocks, objective.metric,
                                           verdict_target(objective))
            except CadisError as error:
                notes.append(f"no test verdicts on {objective.metric} with training seed "
                             f"{train_seed} ({first_line(error)})")
                continue
            decisions.append(Decision(TEST, objective.metric, leader,
                                      {trial: label for trial, label in labels.items()
                                       if label in blocks}, tuple(verdicts), tie_break,
                                      train_seed))
    return decisions, notes


def record_choice(tracker: SweepTracker, include_test: bool) -> Choice:
    """The sweep's choice as its ranked trials now stand: the validation decisions and, with
    ``include_test``, the test decisions over the trials certified on test; logged on the
    trials' runs and the parent (:meth:`SweepTracker.log_choice`) and returned."""
    ranked = tracker.ranked()
    if not ranked:
        return Choice(None, None, (), ())
    trials = [run.data.tags[tracking.TRIAL_ID_TAG] for run in ranked]
    incumbent = next((trial for trial, run in zip(trials, ranked)
                      if run.data.tags.get(tracking.INCUMBENT_TAG) == "true"), None)
    labels = {trial: INCUMBENT_LABEL if trial == incumbent else (run.info.run_name or trial)
              for trial, run in zip(trials, ranked)}
    objectives = tracker.sweep.objective
    raced = race_finalists(tracker.results)
    chosen, tie_break = ((raced[0], racing.TIE_BREAK) if raced
                         else (trials[0], TIE_BREAK))
    decisions, notes = decide(tracker.results, VALIDATION, chosen, labels, objectives,
                              tie_break)
    seeds: dict[str, dict[str, Any]] = {}
    if include_test:
        tested = {trial: labels[trial] for trial, run in zip(trials, ranked)
                  if tracking.ACR in run.data.metrics}
        if chosen in tested:
            more, more_notes = decide(tracker.results, TEST, chosen, tested, objectives,
                                      tie_break)
            decisions += more
            notes += more_notes
            try:
                seeds = seed_figures(tracker.results, tested)
                seeded, seed_notes = seed_decisions(seeds, chosen, tested, objectives,
                                                    tie_break)
            except CadisError as error:
                seeds = {}
                notes.append(f"no test figures per training seed ({first_line(error)})")
            else:
                tracker.log_seed_figures(seeds)
                decisions += seeded
                notes += seed_notes
        else:
            notes.append(f"{labels[chosen]} has no test figures: no test verdicts")
    if incumbent is None and tracker.sweep.incumbent:
        notes.append("the incumbent was not ranked (its trial did not finish): nothing says "
                     "whether the search beat the sweep file's base")
    choice = Choice(chosen, incumbent, tuple(decisions), tuple(notes), seeds)
    tracker.log_choice(choice)
    return choice
