"""How often a sweep's choice holds: the same sweep run again with other sampler seeds.

Runs the sweep file (default: ``sweeps/default.yaml`` as shipped) once per ``--seeds`` value
with ``searcher.seed`` set to it, one after the other, each with its own results folder and
MLflow store under ``--scratch`` and all reading one draws folder (the same models, the same
rank, proxy, race and test stores: only the searcher's proposals differ). A replicate whose
sweep finished is read again, one begun and stopped is resumed. Per replicate, read back from
its sweep.json and its MLflow parent run (the verdicts the sweep itself wrote):

- the chosen trial and its searched values (its *family*: the values of the choice keys);
- the chosen trial against the incumbent (the sweep file's base), on validation (the images
  the sweep chose on) and on test (the shared test draws): the difference, its paired 95%
  interval and Holm's p, as the summary states them;
- whether the validation verdict (ahead beyond noise / inseparable / behind) agreed in
  direction with the test difference;
- the compute it spent: wall seconds, trials, epochs trained.

Across replicates: how often the same family was chosen, and how many chose a trial ahead of
the incumbent on validation beyond noise without being behind it on test (issue 27's target:
2 of 3).

Where the chosen trial and the incumbent are inseparable, what hold-out would separate them:
from the rates at which each certified, at the objective's radius, validation images the other
did not (measured on the images the sweep compared them on), the number of paired validation
images at which McNemar's exact test at Holm's first level (family alpha over the decision's
comparisons) finds the chosen trial ahead with 80% power. A projection from measured rates,
not a measurement: it assumes the rates hold on more images.

    .venv/bin/python benchmarks/selection_quality.py --scratch /tmp/selection --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cadis.smoothing.paired import certified_at  # noqa: E402
from cadis.smoothing.separation import POWER, images_to_separate  # noqa: E402
from cadis.smoothing.verdicts import FAMILY_ALPHA  # noqa: E402
from cadis.sweeps.choice import VALIDATION, record_blocks  # noqa: E402
from cadis.sweeps.layout import STATE_FILE  # noqa: E402
from cadis.tracking.contract import (  # noqa: E402
    CHOSEN_VS_INCUMBENT,
    EPOCH_SECONDS,
    INCUMBENT_TAG,
    ROLE_TAG,
    ROLE_TRIAL,
    TRIAL_ID_TAG,
    radius_of_metric,
    validation_metric,
    verdict_metric,
)

#: The searched keys whose values name a configuration's family (the discrete choices); the
#: continuous ones (lambda, epsilon) vary within a family.
FAMILY_KEYS = ("lora_rank", "confidence_threshold", "num_noises")
DONE_STAGE = "done"
def run_replicate(seed: int, sweep: str, sets: list[str], scratch: Path) -> None:
    """Run (or resume, or leave) replicate ``seed``'s sweep into ``scratch/seed-<seed>``."""
    out = scratch / f"seed-{seed}"
    state = out / "results" / STATE_FILE
    if state.is_file() and json.loads(state.read_text()).get("stage") == DONE_STAGE:
        return
    overrides = [f"searcher.seed={seed}", f"results_dir={out / 'results'}",
                 f"draws_dir={scratch / 'draws'}",
                 f"mlflow.tracking_uri=sqlite:///{out / 'mlflow.db'}",
                 f"mlflow.experiment=selection-seed-{seed}", *sets]
    command = [sys.executable, "-m", "cadis", "sweep", str(ROOT / sweep)]
    command += ["--resume"] if state.is_file() else []
    for override in overrides:
        command += ["--set", override]
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(out / "sweep.log", "a") as log:
        subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       stdout=log, stderr=subprocess.STDOUT, check=True)
    seconds = float((out / "wall_seconds").read_text()) if (out / "wall_seconds").is_file() \
        else 0.0
    (out / "wall_seconds").write_text(f"{seconds + time.perf_counter() - started:.1f}\n")


def verdict(metrics: dict[str, float], objective: str, validation: bool) -> dict | None:
    """The chosen trial against the incumbent as the parent run logged it (chosen minus
    incumbent), or None where the sweep logged none (the incumbent chosen, or not ranked)."""
    def field(name: str) -> float | None:
        return metrics.get(verdict_metric(CHOSEN_VS_INCUMBENT, objective, name, validation))
    if field("difference") is None:
        return None
    return {name: field(name) for name in ("difference", "low", "high", "p", "p_holm",
                                           "separated", "images")}


def reading(entry: dict | None) -> str:
    """ahead / behind (beyond noise) or inseparable, of the chosen trial."""
    if entry is None:
        return "none"
    if entry["separated"]:
        return "ahead" if entry["difference"] > 0 else "behind"
    return "inseparable"


def replicate_report(seed: int, scratch: Path) -> dict:
    """What replicate ``seed`` chose and what its verdicts said, from its own records."""
    from mlflow import MlflowClient

    out = scratch / f"seed-{seed}"
    state = json.loads((out / "results" / STATE_FILE).read_text())
    objective = state["sweep"]["objective"][0]["metric"]
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    parent = client.get_run(state["parent_run_id"]).data.metrics
    trials = client.search_runs([state["experiment_id"]],
                                f"tags.`{ROLE_TAG}` = '{ROLE_TRIAL}'")
    chosen = next(run for run in trials
                  if run.data.tags.get(TRIAL_ID_TAG) == state["chosen_trial"])
    epochs = sum(len(client.get_metric_history(run.info.run_id, EPOCH_SECONDS))
                 for run in trials)
    searched = sorted(state["sweep"]["search"])
    incumbent = next((run.data.tags[TRIAL_ID_TAG] for run in trials
                      if run.data.tags.get(INCUMBENT_TAG) == "true"), None)
    ranked = [run for run in trials if validation_metric(objective) in run.data.metrics]
    return {"projection": projection(out / "results", state["chosen_trial"], incumbent,
                                     objective, len(ranked) - 1),
            "seed": seed, "chosen": state["chosen_trial"],
            "incumbent_chosen": chosen.data.tags.get(INCUMBENT_TAG) == "true",
            "params": {key: chosen.data.params.get(key) for key in searched},
            "family": tuple(chosen.data.params.get(key) for key in FAMILY_KEYS),
            "objective": objective,
            "validation": verdict(parent, objective, True),
            "test": verdict(parent, objective, False),
            "trials": len(trials), "epochs": epochs,
            "wall_seconds": float((out / "wall_seconds").read_text())}


def projection(results: Path, chosen: str, incumbent: str | None, objective: str,
               comparisons: int) -> dict | None:
    """The chosen trial against the incumbent on the validation images both were certified
    on: how many each certified alone at the objective's radius, and the hold-out that would
    separate them at those rates (:func:`images_to_separate` at FAMILY_ALPHA / comparisons,
    Holm's first level)."""
    radius = radius_of_metric(objective)
    if incumbent is None or incumbent == chosen or radius is None:
        return None
    def certified(trial: str) -> dict[int, bool]:
        return {record.idx: certified_at(record, radius)
                for block in record_blocks(results, VALIDATION, trial) for record in block}
    mine, theirs = certified(chosen), certified(incumbent)
    shared = sorted(set(mine) & set(theirs))
    only_chosen = sum(mine[i] and not theirs[i] for i in shared)
    only_incumbent = sum(theirs[i] and not mine[i] for i in shared)
    alpha = FAMILY_ALPHA / max(comparisons, 1)
    needed = images_to_separate(only_chosen, only_incumbent, len(shared), alpha)
    return {"images": len(shared), "only_chosen": only_chosen,
            "only_incumbent": only_incumbent, "alpha": alpha, "images_needed": needed}


def interval(entry: dict | None) -> str:
    if entry is None:
        return "-"
    return (f"{entry['difference']:+.3f} [{entry['low']:+.3f}, {entry['high']:+.3f}] "
            f"p_holm {entry['p_holm']:.3f} ({int(entry['images'])} img)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default="sweeps/default.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", action="append", default=[], dest="sets",
                        help="further sweep overrides for every replicate")
    parser.add_argument("--scratch", required=True)
    parser.add_argument("--report-only", action="store_true",
                        help="read the replicates already in --scratch, run nothing")
    args = parser.parse_args()
    scratch = Path(args.scratch).resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    if len(args.seeds) != len(set(args.seeds)):
        sys.exit("selection_quality: --seeds repeats a seed")
    if not args.report_only:
        for seed in args.seeds:
            print(f"replicate searcher.seed={seed}: running", flush=True)
            run_replicate(seed, args.sweep, args.sets, scratch)
    reports = [replicate_report(seed, scratch) for seed in args.seeds]
    (scratch / "replicates.json").write_text(json.dumps(reports, indent=1) + "\n")
    objective = reports[0]["objective"]
    print(f"sweep {args.sweep} {' '.join(args.sets)}; objective {objective}; chosen minus "
          f"incumbent, paired 95% interval, Holm's p across each decision")
    for report in reports:
        validation, test = report["validation"], report["test"]
        said, seen = reading(validation), reading(test)
        same_sign = (None if validation is None or test is None else
                     (validation["difference"] > 0) == (test["difference"] > 0))
        agrees = ("-" if same_sign is None else
                  f"the verdict: {said}; its direction {'holds' if same_sign else 'turns'} "
                  f"on test" if said != "inseparable" else
                  f"no direction claimed; the point estimates "
                  f"{'agree' if same_sign else 'disagree'} in sign")
        print(f"seed {report['seed']}: chose {report['chosen']}"
              f"{' (the incumbent)' if report['incumbent_chosen'] else ''} "
              f"{json.dumps(report['params'])}")
        print(f"  validation: {said}, {interval(validation)}")
        print(f"  test:       {seen}, {interval(test)}; {agrees}")
        shown = report["projection"]
        if shown is not None:
            needed = shown["images_needed"]
            print(f"  on {shown['images']} validation images: certified by the chosen trial "
                  f"only {shown['only_chosen']}, by the incumbent only "
                  f"{shown['only_incumbent']}; at these rates "
                  + (f"about {needed} validation images would show it ahead with "
                     f"{POWER:.0%} power (McNemar at {shown['alpha']:.3g})" if needed else
                     "no hold-out would show it ahead"))
        print(f"  compute: {report['wall_seconds'] / 60:.1f} min wall, {report['trials']} "
              f"trials, {report['epochs']} epochs trained")
    families = collections.Counter(report["family"] for report in reports)
    family, count = families.most_common(1)[0]
    print(f"same family ({', '.join(f'{k}={v}' for k, v in zip(FAMILY_KEYS, family))}) chosen "
          f"in {count} of {len(reports)} replicates")
    ahead = [report for report in reports if reading(report["validation"]) == "ahead"]
    held = [report for report in ahead if reading(report["test"]) != "behind"]
    print(f"ahead of the incumbent on validation beyond noise (Holm): {len(ahead)} of "
          f"{len(reports)} replicates; of those, not behind it on test beyond noise: "
          f"{len(held)} ({sum(r['test'] is not None and r['test']['difference'] >= 0 for r in held)}"
          f" not lower at all)")


if __name__ == "__main__":
    main()
