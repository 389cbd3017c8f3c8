"""The racing stage (F-race, docs/design.md §6.3), between rank and final: the ranked trials
the rank stage's images cannot separate are certified on further blocks of the validation
hold-out until the evidence separates them, the images run out or the budget is spent.

The race, as :func:`race` runs it over the ranked trials (the contenders, in the rank
stage's order):

- look 0 is the rank stage's own records (its first ``certify.rank.images`` validation images,
  already certified); look k adds the k-th further block of ``certify.race.block`` images,
  certified for every contender still in the race, up to ``certify.race.max_images``;
- at each look every survivor is measured on the same images (all blocks so far) and the
  leader (the best by the first objective) is compared with each other survivor
  (:func:`cadis.smoothing.verdicts.paired_verdicts`, Holm within the look's family at
  ``family_alpha``); a contender leaves when it is significantly behind the leader of every
  objective (one objective: behind the leader);
- the race stops when one contender is left, the images are used up, or before a block once
  ``budget_seconds`` of certification are spent;
- the finalists are the survivors of the last look, at most ``top_k``: the leader and those
  still inseparable from it, ordered by :data:`TIE_BREAK` (not a finding: nothing separated
  them);
- each contender is decided by the images of the look it left at, or of the last look.

That much is pure (:func:`look`, :func:`race`: records in, decisions out; tested without Ray).
:func:`run_race_stage` is its glue in a sweep: each further block is a store of draws keyed
as the rank stage's (:func:`cadis.sweeps.stores.build_block_store`, built lazily, once, by
the locked builder) and each survivor's block a Ray task per worker
(:func:`cadis.sweeps.trial.certify_block`, the rank stage's own certification of a block;
:mod:`cadis.sweeps.shards`) into its own record folder
(:func:`cadis.sweeps.layout.trial_race_block_dir`). A killed race resumes by running again:
the looks are a function of the records, the finished blocks' folders hold them, and a
block cut short resumes from its records.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from cadis.files import atomic_write_text
from cadis.smoothing.paired import certified_matrix, certified_radii
from cadis.smoothing.records import RECORDS_FILENAME, Record, read_records
from cadis.smoothing.verdicts import Verdict, paired_verdicts
from cadis.sweeps.objective import Objective
from cadis.sweeps.spec import RaceSettings, SweepConfig
from cadis.tracking.contract import (
    ACR,
    RACE_IMAGES,
    RACE_IMAGES_CERTIFIED,
    RACE_SECONDS,
    TRIAL_ID_TAG,
    radius_of_metric,
)

if TYPE_CHECKING:
    from cadis.sweeps.mlflow_writer import SweepTracker

STOP_ONE_LEFT: Final = "one contender is left"
STOP_USED_UP: Final = "the validation images are used up"
STOP_BUDGET: Final = "the budget is spent"
#: How the finalists (all inseparable from the leader) are ordered.
TIE_BREAK: Final = ("the higher value of the first objective on the images raced, equal "
                    "values in the rank stage's order")


def objective_radius(metric: str) -> float | None:
    """The radius whose certified accuracy ``metric`` is, None for ACR; :class:`ValueError`
    for a metric the records do not hold (a per-epoch one), which no race can decide."""
    if metric == ACR:
        return None
    radius = radius_of_metric(metric)
    if radius is None:
        raise ValueError(f"{metric} is not measured by the certification's records")
    return radius


def objective_value(records: Sequence[Record], radius: float | None) -> float:
    """The mean over ``records`` of what the objective at ``radius`` counts (None: ACR)."""
    values = (certified_radii(records) if radius is None
              else certified_matrix(records, [radius])[:, 0])
    return float(np.mean(values))


def _sign(objective: Objective) -> float:
    return 1.0 if objective.mode == "max" else -1.0


@dataclasses.dataclass(frozen=True)
class Look:
    """One look of the race: after ``block`` (0: the rank stage's images), every contender
    in it measured on the same ``images``; its ``leader``, the verdicts of each objective's
    leader against the others (by objective metric), who ``left`` and the ``survivors``
    (best first by :data:`TIE_BREAK`)."""

    block: int
    images: int
    leader: str
    verdicts: dict[str, tuple[Verdict, ...]]
    left: tuple[str, ...]
    survivors: tuple[str, ...]


def look(block: int, records: Mapping[str, Sequence[Record]], objectives: Sequence[Objective],
         family_alpha: float, seed: int = 0) -> Look:
    """The look after ``block`` over ``records`` (contender -> its records of every block so
    far, the same images each, in the rank stage's order): a contender leaves when it is
    separated from, and behind, the leader of every objective."""
    contenders = list(records)
    verdicts: dict[str, tuple[Verdict, ...]] = {}
    behind: set[str] = set(contenders)
    order: list[str] = contenders
    for position, objective in enumerate(objectives):
        radius = objective_radius(objective.metric)
        sign = _sign(objective)
        # Stable: equal values keep the rank stage's order.
        ranked = sorted(contenders,
                        key=lambda name: -sign * objective_value(records[name], radius))
        if position == 0:
            order = ranked
        leader = ranked[0]
        found = paired_verdicts(leader, {name: records[name] for name in ranked},
                                objective.metric, radius=radius, family_alpha=family_alpha,
                                seed=seed)
        verdicts[objective.metric] = tuple(found)
        behind &= {verdict.other for verdict in found
                   if verdict.separated and sign * verdict.difference < 0}
    survivors = tuple(name for name in order if name not in behind)
    images = len(records[contenders[0]]) if contenders else 0
    return Look(block, images, order[0] if order else "", verdicts,
                tuple(name for name in order if name in behind), survivors)


@dataclasses.dataclass(frozen=True)
class RaceResult:
    """The race's looks, why it stopped, its ``finalists`` (leader first, at most top_k) and
    the validation ``images`` that decided each contender."""

    looks: tuple[Look, ...]
    stopped: str
    finalists: tuple[str, ...]
    images: dict[str, int]

    def record(self) -> dict[str, Any]:
        """As ``race/race.json`` keeps it."""
        return {"finalists": list(self.finalists), "stopped": self.stopped,
                "tie_break": TIE_BREAK, "images": dict(self.images),
                "looks": [dataclasses.asdict(each) for each in self.looks]}


#: Certifies a block (0: the rank stage's) for the contenders named: their records of it.
CertifyBlock = Callable[[int, Sequence[str]], Mapping[str, Sequence[Record]]]


def race(contenders: Sequence[str], blocks: int, certify: CertifyBlock,
         objectives: Sequence[Objective], settings: RaceSettings, top_k: int,
         spent: Callable[[], float], seed: int = 0) -> RaceResult:
    """Race ``contenders`` (the rank stage's order) over ``blocks`` blocks of images, block 0
    being the rank stage's, as the module says; ``spent`` is the seconds of certification
    the race has cost so far (checked against ``settings.budget_seconds`` before each
    further block)."""
    so_far: dict[str, list[Record]] = {name: [] for name in contenders}
    survivors = list(contenders)
    looks: list[Look] = []
    images: dict[str, int] = {}
    stopped = STOP_USED_UP
    for block in range(blocks if contenders else 0):
        if block and settings.budget_seconds is not None and \
                spent() >= settings.budget_seconds:
            stopped = STOP_BUDGET
            break
        for name, records in certify(block, survivors).items():
            so_far[name] += records
        current = look(block, {name: so_far[name] for name in survivors}, objectives,
                       settings.family_alpha, seed)
        looks.append(current)
        images.update({name: current.images for name in current.left})
        survivors = list(current.survivors)
        if len(survivors) == 1:
            stopped = STOP_ONE_LEFT
            break
    images.update({name: looks[-1].images for name in survivors} if looks else {})
    return RaceResult(tuple(looks), stopped, tuple(survivors[:top_k]), images)


def block_bounds(rank_images: int, block: int, max_images: int) -> list[tuple[int, int]]:
    """The positions in the validation hold-out of each block: the rank stage's first
    ``rank_images``, then ``block`` at a time up to ``max_images`` (the last may be
    shorter)."""
    starts = range(rank_images, max_images, block)
    return [(0, rank_images), *((start, min(start + block, max_images)) for start in starts)]


def why_not_raced(sweep: SweepConfig) -> str | None:
    """Why this sweep has no race (None: it has one)."""
    if not sweep.race.enabled:
        return "certify.race.enabled is false"
    for objective in sweep.objective:
        try:
            objective_radius(objective.metric)
        except ValueError as error:
            return str(error)
    return None


# ------------------------------------------------------------------------- on Ray, in a sweep


def _records(folder: Path) -> list[Record]:
    path = folder / RECORDS_FILENAME
    return read_records(path) if path.is_file() else []


def run_race_stage(sweep: SweepConfig, results: Path, tracker: SweepTracker) -> None:
    """Race the sweep's ranked trials (module docstring) on Ray, outside Tune; writes
    ``race/race.json`` (which the final stage takes its finalists from), ``race_images`` on
    each ranked trial's run and the race's cost on the sweep's. A sweep without a race
    (:func:`why_not_raced`) writes none of it."""
    import ray

    from cadis.sweeps.layout import (
        TrainedTrial,
        race_file,
        trained_file,
        trial_race_block_dir,
        trial_rank_dir,
    )
    from cadis.sweeps.shards import join_shards, submit_shards
    from cadis.sweeps.stores import build_block_store
    from cadis.sweeps.trial import certify_block

    contenders = [run.data.tags[TRIAL_ID_TAG] for run in tracker.ranked()]
    why = why_not_raced(sweep)
    if why is not None:
        print(f"racing stage: off ({why}); the final stage takes the top {sweep.top_k} by "
              f"rank", flush=True)
        return
    settings, resources = sweep.race, sweep.resources
    bounds = block_bounds(sweep.rank.images, settings.block, settings.max_images)
    trained = {name: TrainedTrial.read(trained_file(results, name)) for name in contenders}
    options = {"num_cpus": resources.cpus_per_worker, "num_gpus": resources.gpus_per_worker}
    store_task = ray.remote(build_block_store).options(**options)
    certify_task = ray.remote(certify_block).options(**options)
    stores: dict[int, dict[str, Any]] = {}
    print(f"racing stage: {len(contenders)} ranked trial(s) on validation blocks "
          f"{', '.join(f'{start}-{stop}' for start, stop in bounds)} by "
          f"{sweep.objective[0].metric}", flush=True)

    def certify(block: int, survivors: Sequence[str]) -> dict[str, list[Record]]:
        if block == 0:
            return {name: _records(trial_rank_dir(results, name)) for name in survivors}
        store = None
        if sweep.shares_draws:
            stores[block] = ray.get(store_task.remote(sweep.base.to_dict(), sweep.rank,
                                                      sweep.draws_dir, bounds[block]))
            store = stores[block]["folder"]
        futures = {name: submit_shards(certify_task, (trained[name].config, sweep.rank,
                                                      trained[name].checkpoint, store,
                                                      bounds[block]),
                                       trial_race_block_dir(results, name, block),
                                       resources.workers_per_trial)
                   for name in survivors}
        for name, parts in futures.items():
            join_shards(trial_race_block_dir(results, name, block), ray.get(parts))
        return {name: _records(trial_race_block_dir(results, name, block))
                for name in survivors}

    def block_records() -> list[Record]:
        return [record for name in contenders for block in range(1, len(bounds))
                for record in _records(trial_race_block_dir(results, name, block))]

    def spent() -> float:
        return (sum(info["build_seconds"] for info in stores.values())
                + sum(record.seconds for record in block_records()))

    result = race(contenders, len(bounds), certify, sweep.objective, settings, sweep.top_k,
                  spent)
    for each in result.looks:
        left = f"; {', '.join(each.left)} left (behind)" if each.left else ""
        print(f"racing stage: look {each.block} on {each.images} images: leader "
              f"{each.leader}, {len(each.survivors)} in the race{left}", flush=True)
    print(f"racing stage: stopped, {result.stopped}; finalists "
          f"{', '.join(result.finalists) or 'none'} (ordered by {TIE_BREAK})", flush=True)
    cost = {RACE_IMAGES_CERTIFIED: float(len(block_records())), RACE_SECONDS: spent()}
    path = race_file(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({**result.record(), "blocks": bounds,
                                        "settings": dataclasses.asdict(settings), **cost},
                                       indent=2) + "\n")
    for name, images in result.images.items():
        tracker.client.log_metric(tracker.run_of(name), RACE_IMAGES, float(images))
    for key, value in cost.items():
        tracker.client.log_metric(tracker.parent_run_id, key, value)
    tracker.client.log_artifact(tracker.parent_run_id, str(path))
