"""Warm start: an earlier sweep's ranked trials, typed as the new sweep's distributions, enter
Optuna's study before its first proposal; an incompatible sweep is refused naming what
differs; the new sweep's run records where it started."""

from __future__ import annotations

import json

import pytest

from cadis.errors import CadisError
from cadis.sweeps.parse import sweep_from_mapping
from cadis.sweeps.spec import Distribution
from cadis.sweeps.warm_start import load_warm_start, typed_value
from tests.test_figures import TRIALS, make_store, sweep_mapping

OBJECTIVE = [("certified_accuracy_r0.5", "max")]


@pytest.mark.parametrize("distribution,text,value", [
    (Distribution("uniform", (0.5, 4.0)), "1.25", 1.25),
    (Distribution("uniform", (0.5, 4.0)), "4.5", None),
    (Distribution("loguniform", (0.0625, 0.5)), "0.0625", 0.0625),
    (Distribution("loguniform", (0.0625, 0.5)), "nan", None),
    (Distribution("int", (1, 3)), "3", 3),
    (Distribution("int", (1, 3)), "2.5", None),
    (Distribution("choice", (0.5, 0.7, "argmax")), "0.7", 0.7),
    (Distribution("choice", (0.5, 0.7, "argmax")), "argmax", "argmax"),
    (Distribution("choice", (2, 4, 8)), "16", None),
    (Distribution("uniform", (0.5, 4.0)), "argmax", None),
])
def test_a_logged_value_is_typed_as_the_new_distribution_draws_it(distribution, text, value):
    assert typed_value(distribution, text) == value


@pytest.fixture
def earlier(tiny_models_dir, tmp_path):
    client, parent = make_store(tiny_models_dir, tmp_path, OBJECTIVE)
    return parent


def new_sweep(models, tmp_path, **search):
    mapping = sweep_mapping(models, tmp_path, OBJECTIVE)
    mapping["search"].update(search)
    mapping["results_dir"] = str(tmp_path / "new")
    return sweep_from_mapping(mapping)


def test_the_ranked_trials_of_a_compatible_sweep_are_its_start(earlier, tiny_models_dir,
                                                               tmp_path):
    warm = load_warm_start(earlier, new_sweep(tiny_models_dir, tmp_path))
    expected = sorted((float(params["lambda"]), params["confidence_threshold"], figures[1])
                      for params, figures, _, _ in TRIALS.values() if figures)
    assert sorted((point["lambda"], point["confidence_threshold"], values[0])
                  for point, values in zip(warm.points, warm.values)) == [
        (value, 0.5 if tau == "0.5" else tau, accuracy) for value, tau, accuracy in expected]
    # A results folder names the same sweep through its sweep.json.
    folder = tmp_path / "earlier"
    folder.mkdir()
    (folder / "sweep.json").write_text(json.dumps(
        {"parent_run_id": earlier, "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}))
    assert load_warm_start(str(folder), new_sweep(tiny_models_dir, tmp_path)).points == \
        warm.points


@pytest.mark.parametrize("search,message", [
    ({"lambda": {"uniform": [0.5, 3.0]}},
     "values outside this sweep's search space (lambda: 3.5 not in uniform [0.5, 3.0])"),
    ({"epsilon": {"uniform": [0.1, 0.3]}},
     "the searched keys differ (only in the earlier sweep: none; only in this one: epsilon)"),
    ({"lambda": {"grid": [1.0, 2.0]}}, "this sweep has a grid"),
])
def test_an_incompatible_sweep_is_refused_naming_what_differs(earlier, tiny_models_dir,
                                                              tmp_path, search, message):
    with pytest.raises(CadisError) as refused:
        load_warm_start(earlier, new_sweep(tiny_models_dir, tmp_path, **search))
    assert message in str(refused.value)


def test_an_unknown_source_is_refused(tiny_models_dir, tmp_path):
    sweep = new_sweep(tiny_models_dir, tmp_path)
    with pytest.raises(CadisError, match="no run nosuchrun in sqlite"):
        load_warm_start("nosuchrun", sweep)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CadisError, match="the folder holds no sweep.json"):
        load_warm_start(str(tmp_path / "empty"), sweep)


def test_the_searcher_starts_from_them_and_the_run_records_the_origin(earlier, tiny_models_dir,
                                                                      tmp_path):
    import optuna
    from mlflow.tracking import MlflowClient

    from cadis.sweeps.mlflow_writer import SweepTracker
    from cadis.sweeps.searcher import build_searcher, tune_search_space

    sweep = new_sweep(tiny_models_dir, tmp_path)
    warm = load_warm_start(earlier, sweep)
    (tmp_path / "new").mkdir()
    searcher = build_searcher(sweep, tmp_path / "new", list(zip(warm.points, warm.values)))
    searcher.set_search_properties(None, None, tune_search_space(sweep))
    study = searcher._ot_study
    finished = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert sorted((t.params["lambda"], t.value) for t in finished) == sorted(
        (point["lambda"], values[0]) for point, values in zip(warm.points, warm.values))
    assert searcher.suggest("first-new-trial")["lambda"] is not None
    tracker = SweepTracker(sweep.tracking_uri(), sweep, tmp_path / "new", None)
    (tmp_path / "sweep.yaml").write_text("name: pictured\n")
    tracker.open_sweep(tmp_path / "sweep.yaml", warm)
    run = MlflowClient(sweep.tracking_uri()).get_run(tracker.parent_run_id)
    assert run.data.tags["cadis.warm_start_from"] == earlier
    assert run.data.params["warm_start.trials"] == "3"
    assert run.data.params["warm_start.source"] == earlier
