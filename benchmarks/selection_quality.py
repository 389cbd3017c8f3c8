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
the summary's own line (cadis.sweeps.summary.separation_line) over the sweep's validation
decision made again from its records, which sweeps that ended before the line existed lack. A
projection from measured rates, not a measurement: it assumes the rates hold on more images.

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

from cadis.sweeps.choice import INCUMBENT_LABEL, VALIDATION, Choice, decide  # noqa: E402
from cadis.sweeps.driver import STAGE_DONE  # noqa: E402
from cadis.sweeps.layout import STATE_FILE  # noqa: E402
from cadis.sweeps.objective import Objective  # noqa: E402
from cadis.sweeps.summary import separation_line  # noqa: E402
from cadis.tracking.contract import (  # noqa: E402
    CHOSEN_VS_INCUMBENT,
    EPOCH_SECONDS,
    INCUMBENT_TAG,
    ROLE_TAG,
    ROLE_TRIAL,
    TRIAL_ID_TAG,
    validation_metric,
    verdict_metric,
)

#: The searched keys whose values name a configuration's family (the discrete choices); the
#: continuous ones (lambda, epsilon) vary within a family.
FAMILY_KEYS = ("lora_rank", "confidence_threshold", "num_noises")


def run_replicate(seed: int, sweep: str, sets: list[str], scratch: Path) -> None:
    """Run (or resume, or leave) replicate ``seed``'s sweep into ``scratch/seed-<seed>``."""
    out = scratch / f"seed-{seed}"
    state = out / "results" / STATE_FILE
    if state.is_file() and json.loads(state.read_text()).get("stage") == STAGE_DONE:
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
    # Every ranked trial, named as the sweep named it in its verdicts.
    labels = {run.data.tags[TRIAL_ID_TAG]: INCUMBENT_LABEL
              if run.data.tags.get(INCUMBENT_TAG) == "true" else run.data.tags[TRIAL_ID_TAG]
              for run in trials if validation_metric(objective) in run.data.metrics}
    return {"separation": separation(out / "results", state["chosen_trial"], labels,
                                     state["sweep"]["objective"][0]),
            "seed": seed, "chosen": state["chosen_trial"],
            "incumbent_chosen": chosen.data.tags.get(INCUMBENT_TAG) == "true",
            "params": {key: chosen.data.params.get(key) for key in searched},
            "family": tuple(chosen.data.params.get(key) for key in FAMILY_KEYS),
            "objective": objective,
            "validation": verdict(parent, objective, True),
            "test": verdict(parent, objective, False),
            "trials": len(trials), "epochs": epochs,
            "wall_seconds": float((out / "wall_seconds").read_text())}


def separation(results: Path, chosen: str, labels: dict[str, str],
               objective: dict[str, str]) -> str | None:
    """The summary's own line on the hold-out that would separate the chosen trial from the
    incumbent (:func:`cadis.sweeps.summary.separation_line`), over the validation decision
    the sweep made (:func:`cadis.sweeps.choice.decide` again, on its records); None where it
    has none."""
    incumbent = next((trial for trial, label in labels.items() if label == INCUMBENT_LABEL),
                     None)
    decisions, _ = decide(results, VALIDATION, chosen, labels, [Objective(**objective)])
    return separation_line(Choice(chosen, incumbent, tuple(decisions), ()),
                           objective["metric"])


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
        if report["separation"] is not None:
            print(report["separation"])
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
