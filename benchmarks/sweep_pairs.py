"""Paired tests between the trials of a finished sweep, on its rank stage's records.

Every trial a sweep ranks is certified on the same validation images with the same stored
draws, so two trials' records pair image by image. For each ``--pair A:B`` and radius this
prints McNemar's exact test (cadis.smoothing.paired); with ``--split KEY=VALUE`` it also
splits the ranked trials by a numeric training setting (below VALUE against at or above it)
and, per image, compares the share of each group certifying it: a sign test over the images
where the groups differ. These are tests on the images the sweep ranked on, made after it:
they describe the search, not a held-out claim.

    .venv/bin/python benchmarks/sweep_pairs.py runs/sweeps/pareto --radii 0.25,1.0 \\
        --pair c509ac33:493e2d1c --pair c509ac33:513713ce --split epsilon=0.15
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scipy.stats import binomtest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cadis.smoothing.paired import certified_at, paired_test  # noqa: E402
from cadis.smoothing.records import RECORDS_FILENAME, read_records  # noqa: E402
from cadis.sweeps.layout import TrainedTrial, trained_file  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a finished sweep's results folder")
    parser.add_argument("--radii", required=True,
                        type=lambda text: [float(r) for r in text.split(",")])
    parser.add_argument("--pair", action="append", default=[], metavar="A:B",
                        help="two trial ids (repeatable)")
    parser.add_argument("--split", metavar="KEY=VALUE",
                        help="groups of ranked trials: KEY below VALUE, and at or above it")
    args = parser.parse_args()
    # In image order: the group comparison pairs records by position.
    records = {path.parent.parent.name: sorted(read_records(path), key=lambda r: r.idx)
               for path in sorted(args.results.glob(f"trials/*/rank/{RECORDS_FILENAME}"))}
    for pair in args.pair:
        a, b = pair.split(":")
        for radius in args.radii:
            result = paired_test(records[a], records[b], radius)
            print(f"{a} vs {b} at r={radius:g}: {result.accuracy_a:.2f} vs "
                  f"{result.accuracy_b:.2f} of {result.images}, only {a} {result.only_a}, "
                  f"only {b} {result.only_b}, McNemar p = {result.p_value:.3g}")
    if args.split:
        key, value = args.split.split("=")
        setting = {trial: TrainedTrial.read(trained_file(args.results, trial)).config[key]
                   for trial in records}
        low = [trial for trial in records if setting[trial] < float(value)]
        high = [trial for trial in records if setting[trial] >= float(value)]
        for radius in args.radii:
            favour_high = favour_low = 0
            for image in range(len(records[low[0]])):
                share_high = sum(certified_at(records[t][image], radius) for t in high) / len(high)
                share_low = sum(certified_at(records[t][image], radius) for t in low) / len(low)
                favour_high += share_high > share_low
                favour_low += share_low > share_high
            p = binomtest(favour_high, favour_high + favour_low).pvalue \
                if favour_high + favour_low else 1.0
            print(f"{key} >= {value} ({len(high)} trials) vs below ({len(low)}) at "
                  f"r={radius:g}: images favouring each {favour_high} vs {favour_low}, "
                  f"sign test p = {p:.3g} (over {len(records[low[0]])} images)")


if __name__ == "__main__":
    main()
