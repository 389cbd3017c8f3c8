"""The sequential plan replayed on binomial counts: draws spent and certified accuracy against
fixed-n CERTIFY, without a network, for designing the plan and seeing it at other n.

Each record of a fixed-n certification (radius r at n, alpha) gives its image's n_A, and so
p_A ~ n_A / n (abstentions: 0.45). Every image is then certified many times over by both
tests on simulated draws: fixed n (n0 = 100 selection draws, n estimation draws at alpha) and
`cadis.smoothing.sequential.run_sequential` with the shipped plan, the candidate being the
image's class with probability p_A (two classes: the hardest case for the selection). The
grid is the one `cadis certify --sequential` decides: every 0.25 step up to the largest
radius fixed n certifies at this n and alpha. Prints the draws an image each spends, the
certified accuracy of both at each grid radius, fixed n's continuous ACR and both grid ACRs.
A record whose n_A was all n draws replays as p_A = 1: a record made at a smaller n than the
replay's says nothing finer of its image.

    .venv/bin/python benchmarks/sequential_replay.py docs/results/baseline-sigma0.5 \\
        --n 1000 --replays 6
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.stats import norm

from cadis.smoothing.bounds import (
    MAJORITY,
    certified_radius,
    lower_confidence_bound,
    max_certifiable_radius,
)
from cadis.smoothing.records import RECORDS_FILENAME, default_radii, read_records
from cadis.smoothing.sequential import (
    SELECTION_FIRST,
    SequentialPlan,
    draws_to_reach,
    reachable_radii,
    run_sequential,
    threshold,
)

SELECTION = 100
ABSTAINED_P = 0.45


def probabilities(folder: Path) -> tuple[np.ndarray, np.ndarray, float]:
    """p_A and correctness of each record, from the n_A its radius implies, and the sigma
    they were certified at (the replay's: a radius means a p_A only at its noise)."""
    settings = json.loads((folder / "summary.json").read_text())
    n, alpha, sigma = settings["n"], settings["alpha"], settings["sigma"]
    bounds = np.array([lower_confidence_bound(k, n, alpha) for k in range(n + 1)])
    shares, correct = [], []
    for record in read_records(folder / RECORDS_FILENAME):
        if record.predict < 0:
            shares.append(ABSTAINED_P)
        else:
            shares.append(np.argmin(abs(bounds - norm.cdf(record.radius / sigma))) / n)
        correct.append(record.correct)
    return np.array(shares), np.array(correct), sigma


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", type=Path, help="a fixed-n certification folder")
    parser.add_argument("--n", type=int, default=1000, help="n of both tests (sequential: at most)")
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--replays", type=int, default=6)
    args = parser.parse_args()
    shares, correct, sigma = probabilities(args.records)
    grid = reachable_radii(default_radii("cifar", max_certifiable_radius(sigma, args.n,
                                                                         args.alpha)),
                           sigma, args.alpha, args.n)
    plan = SequentialPlan(grid, sigma, args.alpha, args.n)
    thresholds = [threshold(r, sigma) for r in grid]
    rng = np.random.default_rng(1)

    def counts(p: float, draws: int) -> np.ndarray:
        hits = rng.binomial(draws, p)
        return np.array([hits, draws - hits])

    fixed, sequential, spent, continuous = [], [], [], []
    for p, right in zip(np.tile(shares, args.replays), np.tile(correct, args.replays)):
        lower = lower_confidence_bound(int(rng.binomial(args.n, p)), args.n, args.alpha)
        chosen = rng.binomial(SELECTION, p) > SELECTION / 2
        fixed.append(right * chosen * sum(lower >= t for t in thresholds))
        continuous.append(right * chosen * certified_radius(lower, sigma)
                          if lower >= MAJORITY else 0.0)
        prediction, radius, draws = run_sequential(
            lambda s, e, p=p: (counts(p, s), counts(p, e)), SELECTION, plan)
        sequential.append(right * (prediction == 0) * sum(radius >= r for r in grid))
        spent.append(draws)
    print(f"{len(shares)} images x {args.replays} replays, sigma={sigma}, n={args.n}, "
          f"n0={SELECTION}, alpha={args.alpha}; looks {list(plan.looks)}")
    print(f"draws an image: fixed {SELECTION + args.n}, sequential {np.mean(spent):.0f} "
          f"({(SELECTION + args.n) / np.mean(spent):.2f}x fewer)")
    # No test at level alpha certifies p_A >= t from fewer draws than unanimous ones need
    # (at p_A = t, that many unanimous draws happen with probability above alpha).
    fewest = np.mean([SELECTION_FIRST + (draws_to_reach(grid[k - 1], sigma, args.alpha)
                                         if k else 0) for k in fixed])
    print(f"fewest draws that could certify what fixed n certified on each image "
          f"({SELECTION_FIRST} selection draws and the unanimous draws its grid radius needs): "
          f"{fewest:.0f} ({(SELECTION + args.n) / fewest:.2f}x fewer at most)")
    print("| r | fixed n | sequential | difference (points) |\n|---:|---:|---:|---:|")
    for level, radius in enumerate(grid):
        a = np.mean(np.array(fixed) > level)
        b = np.mean(np.array(sequential) > level)
        print(f"| {radius:g} | {a:.3f} | {b:.3f} | {100 * (b - a):+.1f} |")
    # A count of certified grid radii k stands for radius grid[k - 1]; 0 for none.
    grid_acr = [np.mean([grid[k - 1] if k else 0.0 for k in counts])
                for counts in (fixed, sequential)]
    print(f"| grid ACR | {grid_acr[0]:.3f} | {grid_acr[1]:.3f} | "
          f"{grid_acr[1] - grid_acr[0]:+.3f} |")
    print(f"| ACR (continuous) | {np.mean(continuous):.3f} | n/a: grid radii | |")


if __name__ == "__main__":
    main()
