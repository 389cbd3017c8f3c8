"""Certification by the reference loop, by the engine at fixed n, and by the engine in
sequential mode at the radius grid (fp32 or bf16, eager or compiled), measured side by side in
one run.

The same test images, models, sigma, n0, n (the sequential mode's most draws) and alpha for
all: (a) the Cohen-style reference loop of benchmarks/certify_throughput.py (one image at a
time, fixed batches, fp32, eager); (b) the engine (`Smooth.certify_images`, as `cadis
certify` runs it); (c) the engine's sequential test at the grid radii n can reach, every grid
radius fixed n can certify (`Smooth.certify_sequential`); (d) that in bf16 autocast; (e) that
compiled, fp32; (f) compiled and bf16 (compiles are done and timed before, as `cadis certify
--compile` does it once a run). The modes take turns image by image, so a machine that gets
busier or quieter during the run slows or speeds them alike. Prints images per second and
draws per image of each, the ratios against (a) (against (b) when (a) is not run), how often
(d)-(f)'s base agrees with fp32 eager on the check draws `cadis certify` compares (2,000
draws of the first 20 images; it refuses a base below 99.9%), certified accuracy at each
radius of the table's grid (up to the first grid radius beyond what fixed n can certify) with
McNemar's exact paired test of each sequential mode against (b) on the same images, and the
ACRs: continuous for (a) and (b), over the grid for all (a sequential mode records grid
radii, so its ACR is a grid ACR; a fixed-n radius counts as the largest grid radius at or
below it).

    .venv/bin/python benchmarks/certify_modes.py --models models/fashion-mnist \\
        --images 200 --n 1000 --threads 2 --modes a,b,c,e
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/certify_modes.py --n 10000 --images 50 \\
        --threads 1 --modes b,c
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from certify_throughput import reference_certify  # noqa: E402

from cadis.certify_models import build_denoised_classifier  # noqa: E402
from cadis.data import load_dataset, subset_indices  # noqa: E402
from cadis.models.sources import ModelSources  # noqa: E402
from cadis.smoothing.bounds import CertificationParameters  # noqa: E402
from cadis.smoothing.image_noise import image_noise  # noqa: E402
from cadis.smoothing.paired import paired_test  # noqa: E402
from cadis.smoothing.precision import (  # noqa: E402
    AGREEMENT_DRAWS,
    FP32,
    PRECISIONS,
    agreement,
    autocast,
    compile_base,
)
from cadis.smoothing.records import (  # noqa: E402
    Record,
    average_certified_radius,
    radius_grid,
    write_records,
)
from cadis.smoothing.sequential import (  # noqa: E402
    SequentialPlan,
    forward_sizes,
    reachable_radii,
)
from cadis.smoothing.smooth import Smooth, check_draws  # noqa: E402

SEQUENTIAL = ("(c) engine, sequential", "(d) sequential, bf16", "(e) sequential, compiled",
              "(f) sequential, bf16, compiled")
REFERENCE, FIXED = "(a) reference loop, fixed n", "(b) engine, fixed n"


def interleaved(certifiers, images, labels) -> dict[str, tuple[list[Record], float]]:
    """Each certifier's records and seconds, the certifiers taking turns on every image."""
    records = {label: [] for label in certifiers}
    seconds = dict.fromkeys(certifiers, 0.0)
    for index, (image, label) in enumerate(zip(images, labels)):
        for mode, certify in certifiers.items():
            started = time.perf_counter()
            prediction, radius, *draws = certify(image)
            seconds[mode] += time.perf_counter() - started
            records[mode].append(Record.from_prediction(index, int(label), prediction, radius,
                                                        0.0, *draws))
    return {mode: (records[mode], seconds[mode]) for mode in certifiers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="models/fashion-mnist")
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--batch", type=int, default=100, help="draws per forward, all three")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--records", type=Path,
                        help="a folder to write each mode's records to (a.tsv, b.tsv, ...)")
    parser.add_argument("--modes", default="a,b,c,d,e,f",
                        help="which of a-f to run (b always runs: the paired tests are against "
                             "it; the ratios are against a where it runs, else b)")
    args = parser.parse_args()
    wanted = {mode.strip() for mode in args.modes.split(",")} | {"b"}
    torch.set_num_threads(args.threads)

    sources = ModelSources.resolve(args.models)
    test_set = load_dataset(sources.dataset, "test", sources.data_root)
    indices = subset_indices(len(test_set), len(test_set) // args.images, args.images)
    images = [test_set[i][0] for i in indices]
    labels = [test_set[i][1] for i in indices]
    base = build_denoised_classifier(sources, args.sigma)
    classes = test_set.info.num_classes
    table = radius_grid(args.sigma, args.n, args.alpha, test_set.info.image_size)
    grid = reachable_radii(table, args.sigma, args.alpha, args.n)
    plan = SequentialPlan(grid, args.sigma, args.alpha, args.n)
    parameters = CertificationParameters(args.n0, args.n, args.alpha, args.batch)

    bf16 = PRECISIONS["bf16"]
    compiled = compile_base(base)
    check = torch.stack(images[:20])
    draws = check_draws(check, args.sigma, image_noise(0, "test", range(len(check)),
                                                       torch.device("cpu")),
                        AGREEMENT_DRAWS // len(check), args.batch)
    compile_seconds = [0.0, 0.0]
    for slot, precision in enumerate((FP32, bf16)):
        if not wanted & ({"e"} if precision is FP32 else {"f"}):
            continue
        started = time.perf_counter()
        with torch.inference_mode(), autocast(precision, torch.device("cpu")):
            # Every forward size the sequential plan meets, as `cadis certify --compile` does.
            for size in sorted(forward_sizes(plan, args.n0, args.batch)):
                compiled(draws[0][:size])
        compile_seconds[slot] = time.perf_counter() - started
    fast_modes = {mode: fast for mode, fast in {
        SEQUENTIAL[1]: (base, bf16), SEQUENTIAL[2]: (compiled, FP32),
        SEQUENTIAL[3]: (compiled, bf16)}.items() if mode[1] in wanted}
    agreements = {mode: agreement(base, fast, draws, precision, torch.device("cpu"))
                  for mode, (fast, precision) in fast_modes.items()}

    def smooth(fast: torch.nn.Module = base, precision=FP32) -> Smooth:
        return Smooth(fast, classes, args.sigma, generator=torch.Generator().manual_seed(0),
                      precision=precision)

    torch.manual_seed(0)
    engine = smooth()
    sequential = {mode: smooth(*fast_modes.get(mode, (base, FP32)))
                  for mode in SEQUENTIAL if mode[1] in wanted}
    reference = {REFERENCE: lambda x: reference_certify(
        base, x, classes, args.sigma, args.n0, args.n, args.alpha, args.batch)
    } if "a" in wanted else {}
    if reference:
        reference_certify(base, images[0], classes, args.sigma, args.n0, 50, args.alpha,
                          args.batch)
    runs = interleaved({
        **reference,
        FIXED: lambda x: engine.certify_images(x[None], parameters)[0],
        **{mode: lambda x, mode=mode: sequential[mode].certify_sequential(
               x, args.n0, plan, args.batch) for mode in sequential},
    }, images, labels)
    print(f"{args.images} test images (every {len(test_set) // args.images}th), "
          f"sigma={args.sigma}, n={args.n} (sequential: at most), n0={args.n0}, "
          f"alpha={args.alpha}, {args.batch} draws a forward, {args.threads} thread(s); "
          f"table radii {table}, sequential plan's radii {grid}; its looks "
          f"{list(plan.looks)} at alphas {[float(f'{a:.3g}') for a in plan.alphas]}")
    print(f"torch.compile: {compile_seconds[0]:.0f} s (fp32) and {compile_seconds[1]:.0f} s "
          f"(bf16) before the runs, not in their rates; agreement with "
          f"fp32 eager on {sum(len(batch) for batch in draws)} check draws: "
          + ", ".join(f"{mode[:3]} {share:.4f}" for mode, share in agreements.items()))
    if args.records:
        args.records.mkdir(parents=True, exist_ok=True)
        for label, (records, _) in runs.items():
            write_records(args.records / f"{label[1]}.tsv", records)
    against = REFERENCE if reference else FIXED
    print(f"| mode | images/s | draws an image | ratio to {against[:3]} |")
    print("|---|---:|---:|---:|")
    reference_rate = args.images / runs[against][1]
    for label, (records, seconds) in runs.items():
        draws = (sum(r.draws for r in records) / len(records) if records[0].draws is not None
                 else args.n0 + args.n)
        rate = args.images / seconds
        print(f"| {label} | {rate:.3f} | {draws:.0f} | {rate / reference_rate:.2f}x |")
    print("| radius | " + " | ".join(label[:3] for label in runs) + " | "
          + " | ".join(f"{mode[:3]} vs (b): (b) only, {mode[:3]} only, p" for mode in sequential)
          + " |")
    print("|---:|" + "---:|" * (len(runs) + len(sequential)))
    fixed = runs[FIXED][0]
    for radius in table:
        cells = [f"{sum(r.correct and r.radius >= radius for r in records) / len(records):.3f}"
                 for records, _ in runs.values()]
        for mode in sequential:
            result = paired_test(runs[mode][0], fixed, radius)
            cells.append(f"{result.only_b}, {result.only_a}, {result.p_value:.3f}")
        print(f"| {radius:g} | " + " | ".join(cells) + " |")
    print("| ACR (continuous) | " + " | ".join(
        "-" if records[0].draws is not None else f"{average_certified_radius(records):.3f}"
        for records, _ in runs.values()) + " |")
    print("| grid ACR | " + " | ".join(f"{grid_acr(records, table):.3f}"
                                      for records, _ in runs.values()) + " |")


def grid_acr(records: list[Record], grid: list[float]) -> float:
    """The ACR over ``grid``: the mean of the largest grid radius at or below each correct
    record's radius (0 for the others), what a sequential mode's ACR is."""
    return sum(max(r for r in grid if r <= record.radius) for record in records
               if record.correct) / len(records)


if __name__ == "__main__":
    main()
