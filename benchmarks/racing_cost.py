"""What a sweep's racing stage cost against certifying every ranked trial on the whole race
hold-out, and whether the two choose the same trial.

For a finished sweep whose race ran (``race/race.json``), side by side in one run:

- the race: the validation images it certified beyond the rank stage (summed over the
  contenders, each on the blocks it raced) and their certification seconds, read from the
  race blocks' records (from stored draws: the classifier's forward passes alone), with the
  seconds its blocks' stores took to denoise; its leader;
- every ranked trial on every block: the race's work plus, measured here, each contender
  that left early certified on the blocks it did not race, from the same stores (a block the
  race never reached gets its store built, once, as the race would have), into a scratch
  folder (the sweep's own folders are not touched); the leader over all of it, by the
  race's rule (:data:`cadis.sweeps.racing.TIE_BREAK`; contenders in the order of the race's
  first look, which is the rank stage's by the first objective).

The blocks, the rank settings and the stores are the sweep's (its ``sweep.yaml`` copy in
the results folder, with the ``--set`` overrides it was started with). No test times this.

    .venv/bin/python benchmarks/racing_cost.py runs/sweeps/tiny --scratch /tmp/racing-cost
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cadis.smoothing.records import (  # noqa: E402
    RECORDS_FILENAME,
    Record,
    read_records,
    render_table,
)
from cadis.sweeps.layout import (  # noqa: E402
    SWEEP_FILE_COPY,
    TrainedTrial,
    race_file,
    trained_file,
    trial_race_block_dir,
    trial_rank_dir,
)
from cadis.sweeps.parse import load_sweep  # noqa: E402
from cadis.sweeps.racing import TIE_BREAK, look  # noqa: E402
from cadis.sweeps.spec import SweepConfig  # noqa: E402


def block_store(sweep: SweepConfig, bounds: tuple[int, int]) -> dict | None:
    """The block's store of draws (found, or built as the race builds it); None where the
    sweep's trials denoise their own."""
    from cadis.sweeps.stores import build_block_store

    if not sweep.shares_draws:
        return None
    return build_block_store(sweep.base.to_dict(), sweep.rank, sweep.draws_dir, bounds)


def main() -> None:
    from cadis.sweeps.trial import certify_block

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a finished sweep's results folder")
    parser.add_argument("--scratch", type=Path, required=True,
                        help="where the blocks the race did not certify are certified")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override the sweep was started with (repeatable)")
    args = parser.parse_args()
    sweep = load_sweep(args.results / SWEEP_FILE_COPY, args.set)
    race = json.loads(race_file(args.results).read_text())
    bounds = [tuple(block) for block in race["blocks"]]
    first = race["looks"][0]
    contenders = [*first["survivors"], *first["left"]]
    raced: dict[str, list[list[Record]]] = {
        trial: [read_records(trial_rank_dir(args.results, trial) / RECORDS_FILENAME)]
        for trial in contenders}
    for trial in contenders:
        while (path := trial_race_block_dir(args.results, trial, len(raced[trial]))
               / RECORDS_FILENAME).is_file():
            raced[trial].append(read_records(path))
    stores = {block: block_store(sweep, bounds[block]) for block in range(1, len(bounds))}
    reached = {len(blocks) for blocks in raced.values()}
    race_stores = sum(store["build_seconds"] for block, store in stores.items()
                      if store is not None and block < max(reached))
    more_stores = sum(store["build_seconds"] for block, store in stores.items()
                      if store is not None and block >= max(reached))
    race_records = [record for blocks in raced.values() for block in blocks[1:]
                    for record in block]

    extra: list[Record] = []
    started = time.perf_counter()
    whole = {trial: list(blocks) for trial, blocks in raced.items()}
    for trial in contenders:
        model = TrainedTrial.read(trained_file(args.results, trial))
        for block in range(len(whole[trial]), len(bounds)):
            out = args.scratch / trial / f"block-{block}"
            store = stores[block]
            certify_block(model.config, sweep.rank, model.checkpoint,
                          None if store is None else store["folder"], bounds[block], str(out))
            whole[trial].append(read_records(out / RECORDS_FILENAME))
            extra += whole[trial][-1]
    wall = time.perf_counter() - started
    full = look(len(bounds) - 1, {trial: [record for block in blocks for record in block]
                                  for trial, blocks in whole.items()},
                sweep.objective, sweep.race.family_alpha)

    what = "classifier forward s" if sweep.shares_draws else "denoise + classify s"
    header = ["", "leader", "images certified", what, "store s"]
    rows = [["race", race["finalists"][0], str(len(race_records)),
             f"{sum(r.seconds for r in race_records):.2f}", f"{race_stores:.2f}"],
            ["every trial, whole hold-out", full.leader, str(len(race_records) + len(extra)),
             f"{sum(r.seconds for r in race_records + extra):.2f}",
             f"{race_stores + more_stores:.2f}"]]
    print(f"{len(contenders)} ranked trial(s), validation blocks "
          f"{', '.join(f'{start}-{stop}' for start, stop in bounds)} (block 0 the rank "
          f"stage's, not counted); the race stopped: {race['stopped']}")
    print(render_table(header, rows, "markdown", text_columns=2))
    print(f"measured here: {len(extra)} image(s) the race did not certify, in {wall:.1f} s "
          f"wall")
    print(f"same choice: {'yes' if full.leader == race['finalists'][0] else 'no'} "
          f"(leaders by {TIE_BREAK})")


if __name__ == "__main__":
    main()
