"""A science row's further training seeds, from its committed records: the final stage's
retraining of the trial a sweep chose, without running the sweep again.

`benchmarks/science.sh SIGMA` makes a row whole: both sweeps, then their final stages, which
train the chosen trial (the race's leader) with ``certify.final.seeds`` training seeds and
certify each on the one store of test draws. When a final stage did not finish, its committed
records still hold what the seeds need: the sweep file (``ARM/sweep.yaml``), the race's choice
(``ARM/race/race.json``) and the chosen trial's config (``ARM/trials/ID/trained.json``). This
runs the final stage's own pieces on them (:func:`cadis.sweeps.final_stage.certify_with_seeds`:
the same Ray Train retraining and the same certification), so a seed made here is the seed the
stage would have made:

    .venv/bin/python benchmarks/science_seeds.py SIGMA ARM
        [--records docs/results/science-sigmaSIGMA] [--out runs/science/sigmaSIGMA]

It first builds (or finds) under ``OUT/draws`` the stores the training reads (the proxy's and
the training draws') and the store of test draws, and refuses to go on when one of them is
keyed otherwise than the committed config's (other models, data or settings: the seeds would
not pair with the committed records). Each seed lands in ``OUT/ARM/trials/ID/seeds/SEED``
(``trained.json`` and ``certify/``), as the stage writes it; copy those folders beside the
committed ones. Run it with ``RAY_ADDRESS`` naming a cluster, or it starts a Ray of its own;
it resumes what an interrupted run left.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))

from cadis.errors import CadisError  # noqa: E402
from cadis.finetuning.ray_train import init_ray  # noqa: E402
from cadis.smoothing.records import SUMMARY_FILENAME  # noqa: E402
from cadis.sweeps.final_stage import (  # noqa: E402
    build_test_draws,
    certify_with_seeds,
    final_draws_dir,
    with_test_store,
)
from cadis.sweeps.layout import (  # noqa: E402
    TrainedTrial,
    race_finalists,
    trained_file,
    trial_certify_dir,
)
from cadis.sweeps.parse import load_sweep  # noqa: E402
from cadis.sweeps.stores import build_training_stores  # noqa: E402

# The config keys that name a store the training reads, by the store's role.
STORE_KEYS = {"proxy": "proxy_store", "train": "train_store"}


def chosen_trial(records: Path) -> str:
    """The trial the arm's sweep chose: the race's leader (the final stage's first finalist)."""
    finalists = race_finalists(records)
    if not finalists:
        raise CadisError(f"{records} holds no race with a finalist (race/race.json)")
    return finalists[0]


def check_same_store(committed: str, built: str, what: str) -> None:
    """:class:`CadisError` unless the store this checkout ``built`` is the one the committed
    records name (a store folder's name is its key's digest): other models, data or settings
    make draws whose seeds would not pair with the committed records."""
    if Path(built).name != Path(committed).name:
        raise CadisError(f"the committed records read {Path(committed).name} but this checkout "
                         f"keys its {what} as {Path(built).name}: other models, data or "
                         "settings, whose seeds would not pair")


def relocated_stores(config: dict, built: dict[str, dict]) -> dict:
    """``config`` reading the stores just ``built``, each checked to be the one the config
    names (:func:`check_same_store`)."""
    moved = dict(config)
    for role, key in STORE_KEYS.items():
        if config.get(key):
            check_same_store(config[key], built[role]["folder"], f"{role} draws")
            moved[key] = built[role]["folder"]
    return moved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sigma", type=float)
    parser.add_argument("arm", help="ft_cadis or denoised_ce")
    parser.add_argument("--records", type=Path,
                        help="the row's committed records (docs/results/science-sigmaSIGMA)")
    parser.add_argument("--out", type=Path, help="where to work (runs/science/sigmaSIGMA)")
    args = parser.parse_args()
    records = (args.records or _ROOT / f"docs/results/science-sigma{args.sigma}") / args.arm
    out = (args.out or Path(f"runs/science/sigma{args.sigma}")).absolute()
    results = out / args.arm
    # The sweep as benchmarks/science.sh ran it (its objectives too: they are checked against
    # what the proxy's n can certify at this sigma).
    sweep = load_sweep(records / "sweep.yaml", [
        f"sigma={args.sigma}", f"results_dir={results}", f"draws_dir={out / 'draws'}",
        f"objective.metric=[certified_accuracy_r{args.sigma}, certified_accuracy_r0.0]"])
    trial = chosen_trial(records)
    model = TrainedTrial.read(trained_file(records, trial))
    print(f"science seeds: {args.arm} at sigma {args.sigma}: {trial}, training seeds after "
          f"its own up to {sweep.final_seeds} in all, in {results}", flush=True)

    import ray

    init_ray()
    cpus = int(ray.available_resources().get("CPU", 1))
    build = ray.remote(build_training_stores).options(num_cpus=cpus)
    built = ray.get(build.remote(model.config, sweep.draws_dir, threads=cpus))
    model = dataclasses.replace(model, config=relocated_stores(model.config, built))
    draws_dir = final_draws_dir(sweep)
    test = ray.get(ray.remote(build_test_draws).options(num_cpus=cpus).remote(
        model.config, draws_dir, threads=cpus))
    committed = json.loads((trial_certify_dir(records, trial) / SUMMARY_FILENAME).read_text())
    check_same_store(committed["stored_draws"], test["folder"], "test draws")
    print(f"science seeds: test draws in {test['folder']}", flush=True)
    # The search's own training was certified when the row was made: only the seeds remain.
    certify_with_seeds(sweep, results, {trial: with_test_store(model, draws_dir)}, [],
                       lambda *_: None)


if __name__ == "__main__":
    try:
        main()
    except CadisError as error:
        sys.exit(f"science seeds: {error}")
