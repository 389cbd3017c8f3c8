"""The checks of benchmarks/gpu_check.sh, one per process: the CUDA paths no GPU has run yet.

    .venv/bin/python benchmarks/gpu_check.py CHECK --work DIR [--models DIR] [--device cuda]

A check that passes prints one line, ``gpu_check <check>: ok <figures>``; one that fails
raises (or leaves `cadis`'s own one-line error last), and the shell script turns that last
line, a crash or a timeout into ``gpu_check <check>: FAILED ...``. Each check that uses the GPU
in this process writes its ``torch.cuda.max_memory_allocated`` to ``DIR/peak-<check>.json``,
passed or not; ``peak_memory`` gathers them with the device-wide peak that the script samples
from nvidia-smi over the whole run (the sweep's Ray workers are other processes).

- ``train_amp``: one FT-CADIS epoch of `cadis train` on the default sweep's base, bf16
  autocast (``amp``), fresh draws denoised in every step; certified after in fp32, briefly.
- ``certify_throughput``: the engine (``Smooth.certify_many``, as `cadis certify` runs it) at
  the device's default batch (1,000 draws a forward on CUDA) in fp32 and in bf16 autocast,
  taking turns on groups of the same test images with the same noise, and the agreement of the
  bf16 base with fp32 on the check draws `cadis certify` compares (it refuses below 99.9%).
- ``compile``: `cadis certify --compile` (fp32, fixed n), its compile time and agreement.
- ``sweep``: `cadis sweep sweeps/default.yaml`, 2 trials of one short epoch with one GPU per
  worker, its own results folder and MLflow store under DIR, through the final stage.
- ``peak_memory``: the peaks above.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

REPO: Final = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SWEEP_FILE: Final = REPO / "sweeps" / "default.yaml"
SIGMA: Final = 0.5
SEED: Final = 0
MIB: Final = 2 ** 20
PEAK_PREFIX: Final = "peak-"
# What the script's nvidia-smi sampler writes under DIR: "used, total" MiB, one line a sample.
SAMPLES_FILE: Final = "nvidia-smi.csv"

# train_amp: one epoch of this many optimizer steps (64 images each), fresh draws so that the
# denoiser runs under autocast too; the certification after it is small and fp32, so that the
# line is about training (certify_throughput measures bf16 certification).
TRAIN_STEPS: Final = 20
TRAIN_SETTINGS: Final = ("epochs=1", f"max_steps_per_epoch={TRAIN_STEPS}", "warmup_steps=5",
                         "train_draws=0", "amp=true", "certify.precision=fp32",
                         "certify.n=100", "certify.n0=10", "certify.max_images=20")

# certify_throughput: images of the test set (evenly spread), n and n0 of each, the groups of
# images the two precisions take turns on.
THROUGHPUT_IMAGES: Final = 50
THROUGHPUT_N: Final = 1000
THROUGHPUT_N0: Final = 100
ALPHA: Final = 0.001
TURN_IMAGES: Final = 5

# compile: `cadis certify --compile` at n = THROUGHPUT_N on every COMPILE_SKIP-th test image,
# at most COMPILE_IMAGES (Fashion-MNIST's 10,000 give 20).
COMPILE_SKIP: Final = 500
COMPILE_IMAGES: Final = 20

# sweep: the default sweep cut to 2 trials of one 5-step epoch, its stores and its stages
# small; no ASHA, which would stop one of the two after its epoch, so that both are ranked
# and race.
SWEEP_TRIALS: Final = 2
SWEEP_SETTINGS: Final = (f"num_trials={SWEEP_TRIALS}", "max_concurrent_trials=1", "epochs=1",
                         "max_steps_per_epoch=5", "scheduler=null", "max_train_images=2000",
                         "val_images=200", "proxy_images=50", "certify.rank.images=50",
                         "certify.race.block=50", "certify.race.max_images=150",
                         "certify.final.max_images=50")
SWEEP_EXPERIMENT: Final = "gpu-check"


def say(check: str, figures: str) -> None:
    """The check's one line, when it passed."""
    print(f"gpu_check {check}: ok {figures}", flush=True)


def set_flags(items: tuple[str, ...] | list[str]) -> list[str]:
    """``--set`` flags for ``key=value`` items."""
    return [flag for item in items for flag in ("--set", item)]


def run_cadis(argv: list[str]) -> None:
    """`cadis ARGV` in this process (so its GPU memory is this process's); a non-zero exit
    leaves `cadis`'s own error as the log's last line."""
    from cadis.cli import main

    code = main(argv)
    if code != 0:
        raise SystemExit(code)


def write_peak(work: Path, check: str, device: str) -> None:
    """This process's peak GPU memory, in ``work/peak-<check>.json`` (nothing off CUDA)."""
    import torch

    if device == "cuda" and torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / MIB
        (work / f"{PEAK_PREFIX}{check}.json").write_text(json.dumps({"mib": peak}) + "\n")


def train_amp(args: argparse.Namespace) -> str:
    out = args.work / "train"
    run_cadis(["train", str(SWEEP_FILE), "--out", str(out), "--quiet",
               *set_flags([f"models={args.models}", f"device={args.device}",
                           *TRAIN_SETTINGS])])
    [epoch] = json.loads((out / "history.json").read_text())
    return (f"1 epoch of {TRAIN_STEPS} steps, amp bf16: {epoch['images_per_second']:.0f} "
            f"images/s, {epoch['epoch_seconds']:.1f} s, loss {epoch['loss']:.3f}, masked "
            f"{epoch['hallucination_rate']:.2f}, proxy_acr {epoch['proxy_acr']:.3f}")


def certify_throughput(args: argparse.Namespace) -> str:
    import torch

    from cadis.certify_models import build_denoised_classifier
    from cadis.data import load_dataset, subset_indices
    from cadis.draws.keys import TEST_SPLIT
    from cadis.models.sources import ModelSources
    from cadis.smoothing.bounds import CertificationParameters
    from cadis.smoothing.image_noise import image_noise
    from cadis.smoothing.precision import (
        AGREEMENT_DRAWS,
        AGREEMENT_IMAGES,
        FP32,
        MIN_AGREEMENT,
        PRECISIONS,
        agreement,
    )
    from cadis.smoothing.smooth import Smooth, check_draws, default_batch_size

    device = torch.device(args.device)
    sources = ModelSources.resolve(str(args.models))
    test_set = load_dataset(sources.dataset, "test", sources.data_root)
    indices = subset_indices(len(test_set), len(test_set) // THROUGHPUT_IMAGES,
                             THROUGHPUT_IMAGES)
    images = torch.stack([test_set[index][0] for index in indices]).to(device)
    info = test_set.info
    base = build_denoised_classifier(sources, SIGMA, device=device, channels=info.channels,
                                     image_size=info.image_size)
    batch = default_batch_size(device)
    parameters = CertificationParameters(THROUGHPUT_N0, THROUGHPUT_N, ALPHA, batch)
    precisions = {"fp32": FP32, "bf16": PRECISIONS["bf16"]}
    check = indices[:AGREEMENT_IMAGES]
    draws = check_draws(images[:AGREEMENT_IMAGES], SIGMA,
                        image_noise(SEED, TEST_SPLIT, check, device),
                        AGREEMENT_DRAWS // AGREEMENT_IMAGES, batch)
    share = agreement(base, base, draws, precisions["bf16"], device)
    smooths = {name: Smooth(base, info.num_classes, SIGMA, precision=precision)
               for name, precision in precisions.items()}
    results: dict[str, list[tuple[int, float]]] = {name: [] for name in precisions}
    seconds = dict.fromkeys(precisions, 0.0)
    for smooth in smooths.values():  # the first forwards pay for kernel choice and allocation
        smooth.certify_many(images[:1], parameters,
                            image_noise(SEED, TEST_SPLIT, indices[:1], device))
    # Turns on the same groups with the same noise, so that a GPU that clocks up or down
    # during the run moves both alike and their certificates differ by arithmetic alone.
    for start in range(0, len(indices), TURN_IMAGES):
        group = slice(start, start + TURN_IMAGES)
        for name, smooth in smooths.items():
            started = time.perf_counter()
            results[name] += smooth.certify_many(
                images[group], parameters,
                image_noise(SEED, TEST_SPLIT, indices[group], device))
            seconds[name] += time.perf_counter() - started
    draws_each = THROUGHPUT_N0 + THROUGHPUT_N
    rates = {name: len(indices) / seconds[name] for name in precisions}
    same = sum(a[0] == b[0] for a, b in zip(results["fp32"], results["bf16"]))
    refused = "" if share >= MIN_AGREEMENT else (
        f" (below {MIN_AGREEMENT}: cadis certify refuses bf16 on these models)")
    return (", ".join(f"{name} {rate:.1f} images/s ({rate * draws_each:,.0f} draws/s)"
                      for name, rate in rates.items())
            + f", bf16/fp32 {rates['bf16'] / rates['fp32']:.2f}x; {len(indices)} images, "
            f"n={THROUGHPUT_N}, n0={THROUGHPUT_N0}, {batch} draws a forward; bf16 agrees "
            f"with fp32 on {share:.4f} of {sum(len(b) for b in draws)} check draws{refused}; "
            f"same certified class on {same} of {len(indices)} images")


def compile_check(args: argparse.Namespace) -> str:
    from cadis.smoothing.records import RECORDS_FILENAME, read_records

    out = args.work / "compile"
    run_cadis(["certify", "--models", str(args.models), "--sigma", str(SIGMA),
               "--n", str(THROUGHPUT_N), "--n0", str(THROUGHPUT_N0), "--alpha", str(ALPHA),
               "--skip", str(COMPILE_SKIP), "--max-images", str(COMPILE_IMAGES),
               "--precision", "fp32", "--compile", "--device", args.device,
               "--out", str(out), "--quiet"])
    summary = json.loads((out / "summary.json").read_text())
    first, *rest = read_records(out / RECORDS_FILENAME)
    # Apart: the first image's forwards may have a shape the compile before the run did not
    # meet (its n0 + n draws end in a partial batch), and compile again.
    rate = len(rest) / sum(record.seconds for record in rest)
    return (f"torch.compile {summary['compile_seconds']:.0f} s, compiled fp32 agrees with "
            f"eager on {summary['agreement_with_fp32']:.4f} of {summary['agreement_draws']} "
            f"check draws; the first image {first.seconds:.1f} s, the {len(rest)} others "
            f"{rate:.2f} images/s (n={THROUGHPUT_N}); ACR {summary['acr']:.3f}")


def sweep(args: argparse.Namespace) -> str:
    from cadis.sweeps.driver import STAGE_DONE
    from cadis.sweeps.layout import SweepState, trained_file, trial_rank_dir

    results = args.work / "sweep-results"
    gpus = 1 if args.device == "cuda" else 0
    started = time.perf_counter()
    run_cadis(["sweep", str(SWEEP_FILE), *set_flags([
        *SWEEP_SETTINGS, f"models={args.models}", f"device={args.device}",
        f"resources.gpus_per_worker={gpus}", f"results_dir={results}",
        f"mlflow.tracking_uri=sqlite:///{args.work / 'mlflow.db'}",
        f"mlflow.experiment={SWEEP_EXPERIMENT}"])])
    wall = time.perf_counter() - started
    state = SweepState.read(results)
    trials = sorted(path.name for path in (results / "trials").iterdir())
    trained = [trial for trial in trials if trained_file(results, trial).is_file()]
    ranked = [trial for trial in trials
              if (trial_rank_dir(results, trial) / "summary.json").is_file()]
    if state.stage != STAGE_DONE or len(ranked) != SWEEP_TRIALS:
        raise SystemExit(f"the sweep ended at stage {state.stage} with {len(ranked)} of "
                         f"{SWEEP_TRIALS} trials ranked ({results})")
    stores = ", ".join(f"{role} {info['denoiser_ms_per_draw']:.3f}"
                       for role, info in state.draw_stores.items())
    return (f"{len(trained)} trials trained, {len(ranked)} ranked, stage {state.stage}, "
            f"chosen {state.chosen_trial}, {wall:.0f} s with {gpus} GPU a worker; the stores' "
            f"denoiser ms a draw: {stores}")


def peak_memory(args: argparse.Namespace) -> str:
    peaks = {path.stem.removeprefix(PEAK_PREFIX): json.loads(path.read_text())["mib"]
             for path in sorted(args.work.glob(f"{PEAK_PREFIX}*.json"))}
    if not peaks:
        raise SystemExit("no check recorded its peak GPU memory")
    samples = args.work / SAMPLES_FILE
    rows = [[float(value) for value in line.split(",")]
            for line in samples.read_text().splitlines() if line.strip()] \
        if samples.is_file() else []
    device_wide = (f"; nvidia-smi, all processes: {max(used for used, _ in rows):.0f} of "
                   f"{rows[0][1]:.0f} MiB" if rows else "; no nvidia-smi samples")
    return ("torch.cuda.max_memory_allocated: "
            + ", ".join(f"{check} {mib:.0f} MiB" for check, mib in peaks.items())
            + device_wide)


CHECKS: Final[dict[str, Callable[[argparse.Namespace], str]]] = {
    "train_amp": train_amp, "certify_throughput": certify_throughput,
    "compile": compile_check, "sweep": sweep, "peak_memory": peak_memory}
# The checks that run on the GPU in this process, whose peak memory is theirs.
IN_PROCESS_GPU: Final = ("train_amp", "certify_throughput", "compile")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("check", choices=tuple(CHECKS))
    parser.add_argument("--work", type=Path, required=True, help="the run's scratch folder")
    parser.add_argument("--models", type=Path, default=REPO / "models" / "fashion-mnist")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cpu only to try the checks' code where there is no GPU")
    args = parser.parse_args()
    args.models = args.models.absolute()
    args.work = args.work.absolute()
    try:
        figures = CHECKS[args.check](args)
    finally:
        if args.check in IN_PROCESS_GPU:
            write_peak(args.work, args.check, args.device)
    say(args.check, figures)


if __name__ == "__main__":
    main()
