"""Total compute of a sweep before and after the staged sweep, measured side by side.

Runs the default sweep twice, one after the other, each on a Ray it starts itself: once with
the code of an earlier checkout (every trial denoises its own draws and is certified on the
test subset), once with this checkout (draws denoised once per sweep, every trial certified on
validation from them, the top_k on test). Both use the same models, trials and base.
Compute is the CPU time of every process of the sweep (driver, Ray's daemons, workers, tasks),
sampled from /proc every half second; wall time and the selected trial's test certified
accuracy per radius (the parent run's best.*) are printed beside it, with the ratio.

    git worktree add /tmp/cadis-before 58e7e33
    .venv/bin/python benchmarks/sweep_compute.py --before /tmp/cadis-before \\
        --models models/fashion-mnist --trials 4 --out runs/bench/sweep_compute

Run it alone on the machine: another process on the same cores slows both sweeps.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
SAMPLE_SECONDS = 0.5


def session_cpu_seconds(session: int, seen: dict[int, float]) -> None:
    """Record the CPU seconds of every live process of ``session`` (the last value seen per
    process: time after the last sample of a process that exits is not counted)."""
    for process in psutil.process_iter(["pid"]):
        try:
            if os.getsid(process.pid) != session:
                continue
            times = process.cpu_times()
            seen[process.pid] = times.user + times.system
        except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
            continue


def run_sweep(label: str, code: Path, args: argparse.Namespace) -> dict:
    out = Path(args.out).absolute() / label
    out.mkdir(parents=True, exist_ok=True)
    store = out / "mlflow.db"
    command = [sys.executable, "-m", "cadis", "sweep", str(code / "sweeps" / "default.yaml"),
               "--set", f"models={Path(args.models).absolute()}",
               "--set", f"num_trials={args.trials}",
               "--set", f"results_dir={out / 'results'}",
               "--set", f"mlflow.tracking_uri=sqlite:///{store}",
               "--set", f"mlflow.experiment=bench-{label}"]
    env = {**os.environ, "PYTHONPATH": str(code), "PYTHONUNBUFFERED": "1"}
    seen: dict[int, float] = {}
    started = time.monotonic()
    with open(out / "sweep.log", "w") as log:
        process = subprocess.Popen(command, cwd=out, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while process.poll() is None:
                session_cpu_seconds(process.pid, seen)
                time.sleep(SAMPLE_SECONDS)
        except KeyboardInterrupt:
            os.killpg(process.pid, signal.SIGTERM)
            raise
    wall = time.monotonic() - started
    if process.returncode != 0:
        raise SystemExit(f"{label} sweep failed ({process.returncode}); see {out / 'sweep.log'}")
    return {"label": label, "code": str(code), "wall_seconds": wall,
            "cpu_seconds": sum(seen.values()), "processes": len(seen),
            "best": best_figures(store, f"bench-{label}")}


def best_figures(store: Path, experiment: str) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store}")
    found = client.get_experiment_by_name(experiment)
    [parent] = client.search_runs([found.experiment_id], "tags.`cadis.role` = 'sweep'")
    return {key[len("best."):]: value for key, value in sorted(parent.data.metrics.items())
            if key.startswith("best.")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True,
                        help="a checkout of the code to compare against")
    parser.add_argument("--models", default="models/fashion-mnist")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--out", default="runs/bench/sweep_compute")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    runs = [run_sweep("before", Path(args.before).absolute(), args),
            run_sweep("after", REPO, args)]
    before, after = runs
    print(f"default sweep, {args.trials} trials, models {args.models}, {os.cpu_count()} cores")
    print("| | wall (s) | CPU-seconds | processes |")
    print("|---|---:|---:|---:|")
    for run in runs:
        print(f"| {run['label']} | {run['wall_seconds']:.0f} | {run['cpu_seconds']:.0f} | "
              f"{run['processes']} |")
    print(f"compute ratio after/before: {after['cpu_seconds'] / before['cpu_seconds']:.3f}; "
          f"wall ratio: {after['wall_seconds'] / before['wall_seconds']:.3f}")
    radii = sorted({key for run in runs for key in run["best"]
                    if key.startswith("certified_accuracy_r")},
                   key=lambda key: float(key.rsplit("r", 1)[1]))
    print("| selected trial, test set | " + " | ".join(radii) + " |")
    print("|---|" + "---:|" * len(radii))
    for run in runs:
        print(f"| {run['label']} | " + " | ".join(
            f"{run['best'].get(key, float('nan')):.3f}" for key in radii) + " |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "summary.json").write_text(json.dumps(runs, indent=2) + "\n")


if __name__ == "__main__":
    main()
