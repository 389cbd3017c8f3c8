"""Training from stored draws against training on fresh draws, measured side by side.

Runs `cadis train` on the default sweep's base twice, one after the other, alone on the
machine: once denoising fresh draws in every micro-step (``train_draws=0``), once sampling them
from ``train_draws`` stored draws per image denoised once before training. The same training
images (``max_train_images``), seed and hyperparameters; both certified on the same test images
with the same seed. Prints per-epoch training throughput (images per second, from each run's
history), the store's build time, and per radius both certified accuracies with McNemar's
exact paired test of their difference.

    .venv/bin/python benchmarks/train_draws.py --models models/fashion-mnist \\
        --draws 4 --max-train-images 12000 --out runs/bench/train_draws
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cadis.smoothing.paired import paired_test  # noqa: E402
from cadis.smoothing.records import RECORDS_FILENAME, read_records  # noqa: E402

# The sweep's final stage: every 100th test image (100 images), n = 500, n0 = 100.
CERTIFY = ["certify.n=500", "certify.n0=100", "certify.alpha=0.001", "certify.skip=100",
           "certify.max_images=100"]


def train(label: str, extra: list[str], args: argparse.Namespace) -> dict:
    out = Path(args.out).absolute() / label
    command = [sys.executable, "-m", "cadis", "train", str(REPO / "sweeps" / "default.yaml"),
               "--out", str(out), "--quiet"]
    for item in [f"models={Path(args.models).absolute()}",
                 f"max_train_images={args.max_train_images}", *CERTIFY, *args.set, *extra]:
        command += ["--set", item]
    started = time.monotonic()
    subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    history = json.loads((out / "history.json").read_text())
    certify_dir = out / f"certify_epoch_{int(history[-1]['epoch']):03d}"
    return {"label": label, "wall_seconds": time.monotonic() - started,
            "images_per_second": [epoch["images_per_second"] for epoch in history],
            "train_seconds": sum(epoch["epoch_seconds"] for epoch in history),
            "records": read_records(certify_dir / RECORDS_FILENAME),
            "summary": json.loads((certify_dir / "summary.json").read_text())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="models/fashion-mnist")
    parser.add_argument("--draws", type=int, default=4, help="train_draws of the stored run")
    parser.add_argument("--max-train-images", type=int, default=12000)
    parser.add_argument("--set", action="append", default=[], help="more base overrides")
    parser.add_argument("--out", default="runs/bench/train_draws")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    live = train("live", ["train_draws=0"], args)
    stored = train("stored", [f"train_draws={args.draws}"], args)
    store_meta = json.loads(next((Path(args.out) / "stored" / "draws").glob("train-*/store.json"))
                            .read_text())
    print(f"cadis train sweeps/default.yaml, max_train_images={args.max_train_images}, "
          f"{os.cpu_count()} cores; stored: train_draws={args.draws}, built in "
          f"{store_meta['build_seconds']:.0f} s ({store_meta['bytes'] / 2 ** 20:.0f} MiB, "
          f"denoiser {store_meta['denoiser_ms_per_draw']:.2f} ms a draw)")
    print("| | images/s per epoch (median) | training s | run wall s |")
    print("|---|---:|---:|---:|")
    for run in (live, stored):
        print(f"| {run['label']} | {statistics.median(run['images_per_second']):.1f} | "
              f"{run['train_seconds']:.0f} | {run['wall_seconds']:.0f} |")
    ratio = (statistics.median(stored["images_per_second"])
             / statistics.median(live["images_per_second"]))
    print(f"training throughput stored/live: {ratio:.2f}x")
    summary = live["summary"]
    print(f"test certified accuracy, {summary['num_images']} test images, n={summary['n']}, "
          f"n0={summary['n0']}, alpha={summary['alpha']}; McNemar's exact two-sided p")
    print("| r | live | stored | live only | stored only | p |")
    print("|---:|---:|---:|---:|---:|---:|")
    results = []
    for radius in [float(r) for r in summary["certified_accuracy"]]:
        result = paired_test(stored["records"], live["records"], radius)
        results.append(result.__dict__)
        print(f"| {radius:g} | {result.accuracy_b:.3f} | {result.accuracy_a:.3f} | "
              f"{result.only_b} | {result.only_a} | {result.p_value:.3f} |")
    (Path(args.out) / "summary.json").write_text(json.dumps(
        {"throughput_ratio": ratio, "paired": results,
         "runs": [{k: v for k, v in run.items() if k != "records"} for run in (live, stored)]},
        indent=2) + "\n")


if __name__ == "__main__":
    main()
