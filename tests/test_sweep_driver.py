"""The sweep driver's Optuna adapter and stored draws, without a cluster: what Optuna is told
of per-epoch and pruned trials, the incumbent (Optuna's first trial, marked through a
restore, spared by ASHA), and what two sweeps sharing a draws_dir build. (How many
trials run at once is tests/test_sweep_resources.py's; resuming, tests/test_sweep_resume.py's;
the stage machine, tests/test_sweep_stages.py's.)"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cadis.errors import CadisError
from cadis.sweeps.parse import sweep_from_mapping

# One worker of 0.5 CPU per trial, plus the trial function's 0.25: 0.75 CPU a trial.
SWEEP = {"name": "t", "search": {"lambda": {"uniform": [0.5, 8]}}, "num_trials": 8,
         "max_concurrent_trials": 4, "objective": {"metric": "acr", "mode": "max"},
         "resources": {"workers_per_trial": 1, "cpus_per_worker": 0.5}}


def sweep(**resources):
    return sweep_from_mapping({**SWEEP, "resources": {**SWEEP["resources"], **resources}})


def test_optuna_is_told_only_final_metrics_and_stopped_trials_as_pruned():
    from optuna.trial import TrialState
    from ray import tune

    from cadis.sweeps.searcher import FinalMetricOptunaSearch

    searcher = FinalMetricOptunaSearch(space={"lambda": tune.uniform(0.5, 2.0)}, metric="acr",
                                       mode="max", seed=0)
    for trial_id in ("stopped", "certified", "failed"):
        assert 0.5 <= searcher.suggest(trial_id)["lambda"] <= 2.0
        # A per-epoch result has the proxy, not the objective: Ray's own searcher would
        # look the objective up in it.
        searcher.on_trial_result(trial_id, {"epoch": 1, "proxy_acr": 0.3,
                                            "training_iteration": 1})
    searcher.on_trial_complete("stopped", {"epoch": 1, "proxy_acr": 0.3})
    searcher.on_trial_complete("certified", {"epoch": 2, "proxy_acr": 0.4, "acr": 0.55})
    searcher.on_trial_complete("failed", None, error=True)
    states = [trial.state for trial in searcher._ot_study.trials]
    assert states == [TrialState.PRUNED, TrialState.COMPLETE, TrialState.FAIL]
    assert searcher._ot_study.trials[1].value == 0.55


def test_two_objectives_missing_one_is_pruned():
    from optuna.trial import TrialState
    from ray import tune

    from cadis.sweeps.searcher import FinalMetricOptunaSearch

    metrics = ["certified_accuracy_r0.25", "certified_accuracy_r1.0"]
    searcher = FinalMetricOptunaSearch(space={"lambda": tune.uniform(0.5, 2.0)},
                                       metric=metrics, mode=["max", "max"], seed=0)
    searcher.suggest("half")
    searcher.suggest("whole")
    searcher.on_trial_complete("half", {metrics[0]: 0.7})
    searcher.on_trial_complete("whole", {metrics[0]: 0.7, metrics[1]: 0.4})
    assert [trial.state for trial in searcher._ot_study.trials] == [TrialState.PRUNED,
                                                                    TrialState.COMPLETE]
    assert searcher._ot_study.trials[1].values == [0.7, 0.4]


def test_trials_report_their_proxy_to_optuna_as_intermediate_values():
    from optuna.trial import TrialState
    from ray import tune

    from cadis.sweeps.searcher import FinalMetricOptunaSearch

    searcher = FinalMetricOptunaSearch(space={"lambda": tune.uniform(0.5, 2.0)},
                                       metric="val_acr", mode="max", seed=0,
                                       intermediate="proxy_acr")
    searcher.suggest("stopped")
    searcher.suggest("ranked")
    for epoch, value in ((1, 0.2), (2, 0.3)):
        searcher.on_trial_result("stopped", {"epoch": epoch, "proxy_acr": value})
        searcher.on_trial_result("ranked", {"epoch": epoch, "proxy_acr": value + 0.1})
    # The rank stage's result repeats the last epoch's proxy: not a new intermediate value.
    searcher.on_trial_result("ranked", {"epoch": 2, "proxy_acr": 0.4, "val_acr": 0.5})
    searcher.on_trial_complete("stopped", {"epoch": 2, "proxy_acr": 0.3})
    searcher.on_trial_complete("ranked", {"epoch": 2, "proxy_acr": 0.4, "val_acr": 0.5})
    stopped, ranked = searcher._ot_study.trials
    assert stopped.state == TrialState.PRUNED and stopped.intermediate_values == {1: 0.2, 2: 0.3}
    assert ranked.state == TrialState.COMPLETE and ranked.value == 0.5
    assert ranked.intermediate_values == pytest.approx({1: 0.3, 2: 0.4})


@pytest.mark.parametrize("changes,expected", [
    ({}, "proxy_acr"),
    ({"scheduler": None}, "proxy_acr"),
    ({"scheduler": {"metric": "loss"}}, None),  # minimised, the objective maximised
    ({"objective": {"metric": ["acr", "certified_accuracy_r0.25"], "mode": ["max", "max"]}},
     None),
])
def test_which_metric_optuna_is_told_per_epoch(changes, expected):
    from cadis.sweeps.searcher import intermediate_metric

    assert intermediate_metric(sweep_from_mapping({**SWEEP, **changes})) == expected


def test_the_searcher_optimises_the_validation_figures():
    from cadis.sweeps.objective import Objective

    assert Objective("certified_accuracy_r0.5", "max").searched == \
        "val_certified_accuracy_r0.5"
    assert Objective("acr", "max").searched == "val_acr"
    assert Objective("proxy_acr", "max").searched == "proxy_acr"


def test_commands_turn_mlflow_telemetry_off(monkeypatch, tmp_path):
    import os

    from cadis.cli import main

    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    main(["analyze", str(tmp_path / "missing.tsv")])
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"


def test_sweeps_of_two_methods_sharing_a_draws_dir_denoise_their_draws_once(tiny_models_dir,
                                                                            tmp_path):
    from cadis.draws.keys import RANK_ROLE
    from cadis.sweeps.stores import build_sweep_stores, build_training_stores

    shared = tmp_path / "draws"
    built = {}
    for method in ("ft_cadis", "denoised_ce"):
        method_sweep = sweep_from_mapping({
            **SWEEP, "search": {"num_noises": {"int": [1, 2]}},
            "base": {"models": str(tiny_models_dir), "method": method, "val_images": 20,
                     "proxy_images": 2, "proxy_n": 4, "proxy_n0": 2},
            "certify": {"rank": {"n": 6, "n0": 2, "images": 3}},
            "results_dir": str(tmp_path / method), "draws_dir": str(shared)})
        built[method] = build_sweep_stores(method_sweep.base.to_dict(), method_sweep.rank,
                                           method_sweep.draws_dir, progress=False)
    assert {Path(info["folder"]).parent for info in built["ft_cadis"].values()} == {shared}
    # The second sweep opened the first's stores (their recorded build times and all).
    assert built["denoised_ce"] == built["ft_cadis"]
    # What a trial's training reads (a final stage's retraining elsewhere builds these alone)
    # is the sweep's, found under the same keys.
    assert build_training_stores(method_sweep.base.to_dict(), method_sweep.draws_dir,
                                 progress=False) == {
        role: info for role, info in built["denoised_ce"].items() if role != RANK_ROLE}
    assert sweep().draws_dir == f"{sweep().results_dir}/draws"


@pytest.mark.parametrize("draws_dir", ["", 3])
def test_draws_dir_must_be_a_folder_path(draws_dir):
    with pytest.raises(CadisError, match="draws_dir must be a folder path, or null for "
                                         "results_dir/draws; got"):
        sweep_from_mapping({**SWEEP, "draws_dir": draws_dir})


# ----------------------------------------------------------------------------- the incumbent

INCUMBENT_SWEEP = {**SWEEP, "search": {"lambda": {"uniform": [0.5, 8]},
                                       "lora_rank": {"choice": [2, 4, 8]},
                                       "num_noises": {"int": [1, 3]}}}


def ready_searcher(sweep, results, finished=()):
    """The searcher as Tune sets it up: built, then given the search space."""
    from cadis.sweeps.searcher import build_searcher, tune_search_space

    results.mkdir(exist_ok=True)
    searcher = build_searcher(sweep, results, finished)
    searcher.set_search_properties(None, None, tune_search_space(sweep))
    return searcher


def test_the_first_suggestion_is_the_incumbent_and_a_restored_searcher_knows_it(tmp_path):
    from cadis.sweeps.searcher import build_searcher
    from cadis.sweeps.spec import INCUMBENT_PARAM

    incumbent = sweep_from_mapping(INCUMBENT_SWEEP)
    searcher = ready_searcher(incumbent, tmp_path / "results")
    first = searcher.suggest("first")
    assert first == {"lambda": 2.0, "lora_rank": 4, "num_noises": 2, INCUMBENT_PARAM: True}
    assert INCUMBENT_PARAM not in searcher.suggest("second")
    assert searcher.incumbent_trial_id == "first"
    # Tune saves the searcher with the experiment and restores it into one built anew.
    searcher.save(str(tmp_path / "searcher.pkl"))
    restored = build_searcher(incumbent, tmp_path / "results")
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.incumbent_trial_id == "first"
    assert INCUMBENT_PARAM not in restored.suggest("third")


def test_a_sweep_without_an_incumbent_marks_no_trial(tmp_path):
    from cadis.sweeps.spec import INCUMBENT_PARAM

    searcher = ready_searcher(sweep_from_mapping({**INCUMBENT_SWEEP, "incumbent": False}),
                              tmp_path / "results")
    assert not any(INCUMBENT_PARAM in searcher.suggest(str(index)) for index in range(4))
    assert searcher.incumbent_trial_id is None


def test_a_warm_started_sweep_still_evaluates_its_incumbent_first(tmp_path):
    import optuna

    from cadis.sweeps.spec import INCUMBENT_PARAM

    incumbent = sweep_from_mapping(INCUMBENT_SWEEP)
    finished = [({"lambda": 6.0, "lora_rank": 8, "num_noises": 3}, [0.7]),
                ({"lambda": 1.0, "lora_rank": 2, "num_noises": 1}, [0.6])]
    searcher = ready_searcher(incumbent, tmp_path / "results", finished)
    assert len(searcher._ot_study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 2
    assert searcher.suggest("first") == {**incumbent.incumbent_point, INCUMBENT_PARAM: True}


@dataclasses.dataclass
class SchedulerTrial:
    """What ASHA reads of a Tune trial."""

    trial_id: str
    config: dict


def test_asha_never_stops_the_incumbent_but_ranks_the_others_against_it():
    from ray.tune.schedulers import TrialScheduler

    from cadis.sweeps.searcher import build_scheduler
    from cadis.sweeps.spec import INCUMBENT_PARAM

    scheduler = build_scheduler(sweep_from_mapping(INCUMBENT_SWEEP))
    scheduler.set_search_properties("proxy_acr", "max")
    leader = SchedulerTrial("leader", {"lambda": 1.0})
    incumbent = SchedulerTrial("incumbent", {"lambda": 2.0, INCUMBENT_PARAM: True})
    middle = SchedulerTrial("middle", {"lambda": 4.0})
    weak = SchedulerTrial("weak", {"lambda": 7.0})
    for trial in (leader, incumbent, middle, weak):
        scheduler.on_trial_add(None, trial)

    def report(trial, proxy):
        return scheduler.on_trial_result(None, trial, {"epoch": 1, "proxy_acr": proxy})

    assert report(leader, 0.9) == TrialScheduler.CONTINUE
    # Below the rung's cut (the leader's 0.9): an ordinary trial stops, the incumbent goes on.
    assert report(incumbent, 0.1) == TrialScheduler.CONTINUE
    # Its result is in the rung: the cut is now the median of 0.9 and 0.1, which 0.6 passes.
    assert report(middle, 0.6) == TrialScheduler.CONTINUE
    assert report(weak, 0.05) == TrialScheduler.STOP
    assert scheduler._num_stopped == 1
