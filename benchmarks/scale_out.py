"""Scale-out on a Ray cluster, measured side by side in one run: Ray Train with 2 workers
against 1, certification in 2 shards (Ray tasks) against 1, and what Ray Train adds to the
same training run done bare in this process.

Needs a running cluster of two nodes of one CPU each (one thread a worker), for example the
cluster script's head and one worker node:

    CADIS_HEAD_CPUS=1 CADIS_WORKER_CPUS=1 cluster/cadis-cluster start --workers 1 --no-mlflow
    RAY_ADDRESS=127.0.0.2:6380 .venv/bin/python benchmarks/scale_out.py --out runs/bench/scale
    cluster/cadis-cluster stop

Training: `cadis train` on the default sweep's base with fresh draws (the denoiser in every
step), the same steps and seed; images per second from each run's history (which leaves out
Ray's start-up) and the whole command's wall time. Certification: the final stage's
`certify_final` on the same test images, as 1 and as 2 Ray tasks of one CPU, wall time, and
whether the joined records equal the single task's (but for seconds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cadis.smoothing.records import RECORDS_FILENAME, read_records  # noqa: E402

TRAIN = ["epochs=1", "train_draws=0", "max_train_images=null", "cpus_per_worker=1",
         "certify.n=100", "certify.n0=10", "certify.max_images=1"]


def train(label: str, workers: int, on_ray: bool, args: argparse.Namespace) -> dict:
    out = Path(args.out).absolute() / label
    command = [sys.executable, "-m", "cadis", "train", str(REPO / "sweeps" / "default.yaml"),
               "--out", str(out), "--quiet", "--workers", str(workers)]
    for item in [f"models={Path(args.models).absolute()}",
                 f"max_steps_per_epoch={args.steps}", *TRAIN]:
        command += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if not on_ray:
        env.pop("RAY_ADDRESS", None)
    started = time.monotonic()
    subprocess.run(command, check=True, env=env)
    history = json.loads((out / "history.json").read_text())
    return {"wall": time.monotonic() - started,
            "images_per_second": history[-1]["images_per_second"],
            "epoch_seconds": history[-1]["epoch_seconds"]}


def certify(shards: int, args: argparse.Namespace) -> tuple[float, list]:
    import ray

    from cadis.finetuning.config import from_mapping
    from cadis.sweeps.shards import certify_in_shards
    from cadis.sweeps.trial import certify_final

    config = from_mapping({"models": str(Path(args.models).absolute()), "sigma": 0.5,
                           "certify": {"n": args.n, "n0": 100, "alpha": 0.001,
                                       "skip": 10_000 // args.images,
                                       "max_images": args.images}}).to_dict()
    task = ray.remote(certify_final).options(num_cpus=1)
    out = Path(args.out).absolute() / f"certify-{shards}"
    started = time.monotonic()
    certify_in_shards(task, (config, None), out, shards)
    seconds = time.monotonic() - started
    records = [dataclasses.replace(record, seconds=0.0)
               for record in read_records(out / RECORDS_FILENAME)]
    return seconds, records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="models/fashion-mnist")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps of training")
    parser.add_argument("--images", type=int, default=20, help="test images certified")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--out", default="runs/bench/scale_out")
    args = parser.parse_args()
    if not os.environ.get("RAY_ADDRESS"):
        parser.error("set RAY_ADDRESS to a running cluster (see the docstring)")
    import ray

    runs = {"bare, this process": train("bare", 1, False, args),
            "Ray Train, 1 worker": train("ray-1", 1, True, args),
            "Ray Train, 2 workers": train("ray-2", 2, True, args)}
    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}})
    one, one_records = certify(1, args)
    two, two_records = certify(2, args)
    nodes = [node for node in ray.nodes() if node["Alive"]]
    print(f"{len(nodes)} nodes, CPUs {[node['Resources'].get('CPU', 0) for node in nodes]}; "
          f"training {args.steps} steps of the default base, fresh draws, one thread a worker")
    print("| training | images/s | epoch s | command wall s |")
    print("|---|---:|---:|---:|")
    for label, run in runs.items():
        print(f"| {label} | {run['images_per_second']:.1f} | {run['epoch_seconds']:.1f} | "
              f"{run['wall']:.1f} |")
    bare, single, double = runs.values()
    print(f"2 workers / 1: {double['images_per_second'] / single['images_per_second']:.2f}x "
          "images/s; Ray Train 1 worker against bare: epoch "
          f"{single['epoch_seconds'] / bare['epoch_seconds'] - 1:+.1%}, command wall "
          f"{single['wall'] / bare['wall'] - 1:+.1%}")
    print(f"certification of {args.images} test images, n={args.n}, n0=100, alpha=0.001: "
          f"1 task {one:.1f} s, 2 shards {two:.1f} s, {one / two:.2f}x; joined records "
          f"{'equal' if one_records == two_records else 'DIFFER from'} the single task's")


if __name__ == "__main__":
    main()
