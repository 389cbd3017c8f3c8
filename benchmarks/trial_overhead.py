"""Where a sweep's trial slots go, before and after a change, side by side in one run.

The same sweep file with the same overrides runs twice, one after the other on one machine:
once from a git worktree of ``--before`` (a commit), once from this checkout, each with its own
results folder and MLflow store under ``--scratch`` and both reading one draws folder (the
stores are denoised once, before the first arm's search, and never inside a trial slot). Per
trial, read back from MLflow and the results folder:

- the slot: the trial run's start to its end (the driver's trial callback opens the run when
  Tune starts the trial and ends it when Tune ends it);
- compute: its epochs' optimizer steps (``epoch_seconds``), its proxy after each epoch
  (``proxy_seconds``, where the code logs it) and its rank-stage certification (the seconds
  column of its rank records);
- what is left: the slot less its compute, the trial's orchestration. Code that does not log
  the proxy's time counts it here; the after arm prints it apart.

Prints the medians of each arm, their ratio, the sweep's whole wall time, and the phases the
after arm logged on its runs (``phase.*``). The sweep defaults to the default sweep cut to six
trials, no race and one finalist, so both arms fit in about fifteen minutes on two cores.

    .venv/bin/python benchmarks/trial_overhead.py --before 5873bd5 --scratch /tmp/overhead
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cadis.smoothing.records import RECORDS_FILENAME, read_records  # noqa: E402
from cadis.sweeps.layout import trial_rank_dir  # noqa: E402
from cadis.tracking.contract import (  # noqa: E402
    EPOCH_SECONDS,
    ORCHESTRATION,
    PHASE_PREFIX,
    PHASES,
    PROXY_SECONDS,
    ROLE_TAG,
    ROLE_TRIAL,
    TRIAL_ID_TAG,
)

DEFAULT_SETS = ("num_trials=6", "certify.race.enabled=false", "certify.final.top_k=1")
COLUMNS = ("slot", "epochs", "proxy", "rank", "left")


def run_arm(name: str, code: Path, sweep: str, sets: list[str], scratch: Path,
            models: Path) -> float:
    """Run the sweep from ``code`` into ``scratch/name``; its wall seconds."""
    out = scratch / name
    overrides = [f"results_dir={out / 'results'}", f"draws_dir={scratch / 'draws'}",
                 f"mlflow.tracking_uri=sqlite:///{out / 'mlflow.db'}",
                 f"mlflow.experiment=overhead-{name}", f"models={models}", *sets]
    command = [sys.executable, "-m", "cadis", "sweep", str(code / sweep)]
    for override in overrides:
        command += ["--set", override]
    env = {**os.environ, "PYTHONPATH": str(code)}
    started = time.perf_counter()
    with open(out.with_suffix(".log"), "w") as log:
        subprocess.run(command, cwd=code, env=env, stdout=log, stderr=subprocess.STDOUT,
                       check=True)
    seconds = time.perf_counter() - started
    out.with_suffix(".seconds").write_text(f"{seconds:.1f}\n")
    return seconds


def per_epoch_sum(client, run_id: str, key: str) -> float:
    """The sum of a per-epoch metric over its epochs, each epoch's last value."""
    last = {entry.step: entry.value for entry in client.get_metric_history(run_id, key)}
    return sum(last.values())


def trial_times(name: str, scratch: Path) -> list[dict[str, float]]:
    """Slot, compute and what is left of each trial of arm ``name``, with its logged phases."""
    from mlflow import MlflowClient

    out = scratch / name
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(f"overhead-{name}")
    rows = []
    for run in client.search_runs([experiment.experiment_id],
                                  f"tags.`{ROLE_TAG}` = '{ROLE_TRIAL}'"):
        if run.info.end_time is None:
            continue
        rank_records = trial_rank_dir(out / "results", run.data.tags[TRIAL_ID_TAG]) / \
            RECORDS_FILENAME
        row = {"slot": (run.info.end_time - run.info.start_time) / 1000,
               "epochs": per_epoch_sum(client, run.info.run_id, EPOCH_SECONDS),
               "proxy": per_epoch_sum(client, run.info.run_id, PROXY_SECONDS),
               "rank": sum(record.seconds for record in read_records(rank_records))
               if rank_records.is_file() else 0.0}
        row["left"] = row["slot"] - row["epochs"] - row["proxy"] - row["rank"]
        row.update({key: value for key, value in run.data.metrics.items()
                    if key.startswith(PHASE_PREFIX) or key == ORCHESTRATION})
        rows.append(row)
    return rows


def median(rows: list[dict[str, float]], key: str) -> float:
    values = [row[key] for row in rows if key in row]
    return statistics.median(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the commit to compare with")
    parser.add_argument("--sweep", default="sweeps/default.yaml")
    parser.add_argument("--set", action="append", default=None, dest="sets",
                        help=f"sweep overrides for both arms (default: {' '.join(DEFAULT_SETS)})")
    parser.add_argument("--models", default=str(ROOT / "models" / "fashion-mnist"))
    parser.add_argument("--scratch", required=True)
    parser.add_argument("--report-only", action="store_true",
                        help="read the two arms already in --scratch again, run nothing")
    args = parser.parse_args()
    scratch = Path(args.scratch).resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    sets = list(DEFAULT_SETS if args.sets is None else args.sets)
    worktree = scratch / "before-code"
    if args.report_only:
        walls = {name: float((scratch / f"{name}.seconds").read_text())
                 for name in ("before", "after")}
    else:
        if not worktree.exists():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach",
                            str(worktree), args.before], check=True, capture_output=True)
        models = Path(args.models).resolve()
        walls = {"before": run_arm("before", worktree, args.sweep, sets, scratch, models),
                 "after": run_arm("after", ROOT, args.sweep, sets, scratch, models)}
    print(f"sweep {args.sweep} with {' '.join(sets)}; before = {args.before}, after = this "
          f"checkout; medians over each arm's trials, seconds")
    print(f"{'arm':<8}{'trials':>7}" + "".join(f"{c:>9}" for c in COLUMNS) + f"{'sweep':>9}")
    arms = {name: trial_times(name, scratch) for name in walls}
    for name, rows in arms.items():
        print(f"{name:<8}{len(rows):>7}" + "".join(f"{median(rows, c):>9.1f}" for c in COLUMNS)
              + f"{walls[name]:>9.0f}")
    print(f"left beyond compute, before / after: "
          f"{median(arms['before'], 'left') / median(arms['after'], 'left'):.2f}x; "
          f"sweep wall: {walls['before'] / walls['after']:.2f}x")
    after = arms["after"]
    print("after, its logged phases (median): " + ", ".join(
        f"{phase} {median(after, PHASE_PREFIX + phase):.1f}" for phase in PHASES)
        + f"; orchestration {median(after, ORCHESTRATION):.1f}")


if __name__ == "__main__":
    main()
