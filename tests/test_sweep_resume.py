"""Whether a results folder may hold a sweep, without a cluster: a resumed sweep differs
from the saved one only in what it would run differently (:mod:`cadis.sweeps.resume`)."""

from __future__ import annotations

import pytest

from cadis.sweeps.resume import resume_differences, setting_defaults

DEFAULTS = {"base": {"lr": 1e-3, "certify": {"draws_dir": None}}, "certify": {"draws_dir": None}}
SAVED = {"name": "s", "base": {"lr": 1e-3, "certify": {"n": 100}}, "certify": {"n": 100}}


@pytest.mark.parametrize("now,changed", [
    (SAVED, []),
    # A setting added to cadis since the sweep began, at its default: the sweep ran as that.
    ({**SAVED, "base": {**SAVED["base"], "certify": {"n": 100, "draws_dir": None}},
      "certify": {"n": 100, "draws_dir": None}}, []),
    # ... at another value, or one whose default is unknown: another sweep.
    ({**SAVED, "certify": {"n": 100, "draws_dir": "/d"}}, ["certify.draws_dir"]),
    ({**SAVED, "draws_dir": "/d"}, ["draws_dir"]),
    ({**SAVED, "base": {"lr": 2e-3, "certify": {"n": 100}}}, ["base.lr"]),
    ({"name": "s", "base": SAVED["base"]}, ["certify"]),
], ids=["same", "new-key-at-default", "new-key-set", "new-key-no-default", "changed-leaf",
        "removed-key"])
def test_a_resumed_sweep_differs_only_in_what_it_would_run_differently(now, changed):
    assert resume_differences(SAVED, now, DEFAULTS) == changed


def test_the_known_defaults_are_those_of_the_settings_classes():
    from cadis.finetuning.config import TrainConfig

    defaults = setting_defaults()
    assert defaults["base"]["lr"] == TrainConfig().lr
    assert defaults["certify"]["draws_dir"] is None and defaults["rank"]["sequential"] is False


def _saved_sweep(results, sweep):
    from cadis.sweeps.layout import SweepState

    SweepState("run", "0", "sqlite:///m.db", sweep, "search", {}).write(results)


def test_a_sweep_begun_before_seeds_and_the_incumbent_resumes_as_it_ran(tmp_path):
    from cadis.errors import CadisError
    from cadis.sweeps.resume import check_results_dir

    # Saved before certify.final.seeds and incumbent existed: one seed, no incumbent.
    _saved_sweep(tmp_path, {"name": "s"})
    state = check_results_dir(tmp_path, {"name": "s", "final_seeds": 1, "incumbent": False},
                              resume=True)
    assert state.sweep == {"name": "s", "final_seeds": 1, "incumbent": False}
    with pytest.raises(CadisError, match="in final_seeds"):
        check_results_dir(tmp_path, {"name": "s", "final_seeds": 3, "incumbent": False},
                          resume=True)
    # The new default (true with Optuna) would run another sweep: the refusal says the way.
    with pytest.raises(CadisError) as refused:
        check_results_dir(tmp_path, {"name": "s", "final_seeds": 1, "incumbent": True},
                          resume=True)
    message = str(refused.value)
    assert "(in incumbent)" in message
    assert message.endswith("; --set incumbent=false resumes a sweep begun without an "
                            "incumbent")
    # A sweep that saved its incumbent setting is simply another sweep with another one.
    _saved_sweep(tmp_path, {"name": "s", "final_seeds": 1, "incumbent": True})
    with pytest.raises(CadisError) as refused:
        check_results_dir(tmp_path, {"name": "s", "final_seeds": 1, "incumbent": False},
                          resume=True)
    assert "--set incumbent=false" not in str(refused.value)


def test_a_sweep_begun_before_the_searcher_settings_resumes_under_any_of_them(tmp_path):
    from cadis.sweeps.resume import check_results_dir

    # Tune restores the saved sampler whatever the searcher settings now read as.
    _saved_sweep(tmp_path, {"name": "s"})
    now = {"name": "s", "tpe": {"n_startup_trials": 3, "seed": 0}}
    assert check_results_dir(tmp_path, now, resume=True).sweep == now
    # A sweep that saved them still refuses another value.
    _saved_sweep(tmp_path, now)
    assert resume_differences(now, {"name": "s", "tpe": {"n_startup_trials": 4, "seed": 0}},
                              setting_defaults()) == ["tpe.n_startup_trials"]
