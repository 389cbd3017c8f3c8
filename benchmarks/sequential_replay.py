"""The sequential plan replayed on binomial counts: draws spent and certified accuracy against
fixed-n CERTIFY, without a network, for designing the plan and seeing it at other n.

Each record of a fixed-n certification (radius r at n, alpha) gives its image's n_A, and so
p_A ~ n_A / n (abstentions: 0.45). Every image is then certified many times over by both
tests on simulated draws: fixed n (n0 = 100 selection draws, n estimation draws at alpha) and
`cadis.smoothing.sequential.run_sequential` with the shipped plan, the candidate being the
image's class with probability p_A (two classes: the hardest case for the selection). Prints
the draws an image each spends and the certified accuracy of both at each grid radius.

    .venv/bin/python benchmarks/sequential_replay.py docs/results/baseline-sigma0.5 \\
        --n 1000 --replays 6
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.stats import norm

from cadis.smoothing.bounds import lower_confidence_bound
from cadis.smoothing.records import RECORDS_FILENAME, read_records
from cadis.smoothing.sequential import SequentialPlan, run_sequential, threshold

GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
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
    plan = SequentialPlan(GRID, sigma, args.alpha, args.n)
    thresholds = [threshold(r, sigma) for r in GRID]
    rng = np.random.default_rng(1)

    def counts(p: float, draws: int) -> np.ndarray:
        hits = rng.binomial(draws, p)
        return np.array([hits, draws - hits])

    fixed, sequential, spent = [], [], []
    for p, right in zip(np.tile(shares, args.replays), np.tile(correct, args.replays)):
        lower = lower_confidence_bound(int(rng.binomial(args.n, p)), args.n, args.alpha)
        chosen = rng.binomial(SELECTION, p) > SELECTION / 2
        fixed.append(right * chosen * sum(lower >= t for t in thresholds))
        prediction, radius, draws = run_sequential(
            lambda s, e, p=p: (counts(p, s), counts(p, e)), SELECTION, plan)
        sequential.append(right * (prediction == 0) * sum(radius >= r for r in GRID))
        spent.append(draws)
    print(f"{len(shares)} images x {args.replays} replays, sigma={sigma}, n={args.n}, "
          f"n0={SELECTION}, alpha={args.alpha}; looks {list(plan.looks)}")
    print(f"draws an image: fixed {SELECTION + args.n}, sequential {np.mean(spent):.0f} "
          f"({(SELECTION + args.n) / np.mean(spent):.2f}x fewer)")
    print("| r | fixed n | sequential | difference (points) |\n|---:|---:|---:|---:|")
    for level, radius in enumerate(GRID):
        a = np.mean(np.array(fixed) > level)
        b = np.mean(np.array(sequential) > level)
        print(f"| {radius:g} | {a:.3f} | {b:.3f} | {100 * (b - a):+.1f} |")


if __name__ == "__main__":
    main()
