"""Certification by the reference loop, by the engine at fixed n, and by the engine in
sequential mode at the radius grid (fp32 or bf16, eager or compiled), measured side by side in
one run.

The same test images, models, sigma, n0, n (the sequential mode's most draws) and alpha for
all: (a) the Cohen-style reference loop of benchmarks/certify_throughput.py (one image at a
time, fixed batches, fp32, eager); (b) the engine (`Smooth.certify_images`, as `cadis
certify` runs it); (c) the engine's sequential test at the grid radii n can reach
(`Smooth.certify_sequential`); (d) that in bf16 autocast; (e) that compiled, fp32; (f)
compiled and bf16 (compiles are done and timed before, as `cadis certify --compile` does it
once a run). The modes take turns image by image, so a machine that gets busier or quieter
during the run slows or speeds them alike. Prints images per second and draws per image of
each, the ratios against (a), how often (d)-(f)'s base agrees with fp32 eager on the check
draws `cadis certify` compares (2,000 draws of the first 20 images; it refuses a base below
99.9%), and certified accuracy at each grid radius with McNemar's exact paired test of each
sequential mode against (b) on the same images.

    .venv/bin/python benchmarks/certify_modes.py --models models/fashion-mnist \\
        --images 200 --n 1000 --threads 2 --modes a,b,c,e
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
from cadis.smoothing.records import Record, radius_grid  # noqa: E402
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
    parser.add_argument("--modes", default="a,b,c,d,e,f",
                        help="which of a-f to run (a and b always run: the ratios and the "
                             "paired tests are against them)")
    args = parser.parse_args()
    wanted = {mode.strip() for mode in args.modes.split(",")} | {"a", "b"}
    torch.set_num_threads(args.threads)

    sources = ModelSources.resolve(args.models)
    test_set = load_dataset(sources.dataset, "test", sources.data_root)
    indices = subset_indices(len(test_set), len(test_set) // args.images, args.images)
    images = [test_set[i][0] for i in indices]
    labels = [test_set[i][1] for i in indices]
    base = build_denoised_classifier(sources, args.sigma)
    classes = test_set.info.num_classes
    grid = reachable_radii(radius_grid(args.sigma, args.n, args.alpha, test_set.info.image_size),
                           args.sigma, args.alpha, args.n)
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
    reference_certify(base, images[0], classes, args.sigma, args.n0, 50, args.alpha, args.batch)
    runs = interleaved({
        REFERENCE: lambda x: reference_certify(base, x, classes, args.sigma, args.n0, args.n,
                                               args.alpha, args.batch),
        FIXED: lambda x: engine.certify_images(x[None], parameters)[0],
        **{mode: lambda x, mode=mode: sequential[mode].certify_sequential(
               x, args.n0, plan, args.batch) for mode in sequential},
    }, images, labels)
    print(f"{args.images} test images (every {len(test_set) // args.images}th), "
          f"sigma={args.sigma}, n={args.n} (sequential: at most), n0={args.n0}, "
          f"alpha={args.alpha}, {args.batch} draws a forward, {args.threads} thread(s); "
          f"radii {grid}; sequential looks {list(plan.looks)} at alphas "
          f"{[float(f'{a:.3g}') for a in plan.alphas]}")
    print(f"torch.compile: {compile_seconds[0]:.0f} s (fp32) and {compile_seconds[1]:.0f} s "
          f"(bf16) before the runs, not in their rates; agreement with "
          f"fp32 eager on {sum(len(batch) for batch in draws)} check draws: "
          + ", ".join(f"{mode[:3]} {share:.4f}" for mode, share in agreements.items()))
    print("| mode | images/s | draws an image | ratio to (a) |")
    print("|---|---:|---:|---:|")
    reference_rate = args.images / runs[REFERENCE][1]
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
    for radius in grid:
        cells = [f"{sum(r.correct and r.radius >= radius for r in records) / len(records):.3f}"
                 for records, _ in runs.values()]
        for mode in sequential:
            result = paired_test(runs[mode][0], fixed, radius)
            cells.append(f"{result.only_b}, {result.only_a}, {result.p_value:.3f}")
        print(f"| {radius:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
