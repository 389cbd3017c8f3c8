"""The sweep's figures, drawn from a store of known runs: the plotted points are the runs'
values, the radii beyond a stage's reach are not drawn, the Optuna study behind the Optuna
plots holds the runs' params and objectives, and each file is written."""

from __future__ import annotations

import pytest

from cadis.cli import main
from cadis.smoothing.bounds import max_certifiable_radius
from cadis.smoothing.sequential import draws_to_reach
from cadis.sweeps.figure_data import (
    StageCertification,
    curve_points,
    load_sweep_view,
    rebuild_study,
    trial_label,
)
from cadis.sweeps.figures import sweep_figures, write_sweep_figures
from cadis.sweeps.parse import sweep_from_mapping
from cadis.tracking import contract as tracking

SIGMA = 0.5
# Trials: (searched values, validation accuracy at r = 0, 0.5, 1.0, 1.25, test accuracy or
# None, proxy per epoch). 1.25 is beyond what the rank stage's n = 400 reaches at sigma 0.5.
TRIALS = {
    "run_trial_00000": ({"lambda": "1.234567", "confidence_threshold": "argmax"},
                        (0.8, 0.6, 0.3, 0.0), (0.78, 0.55, 0.31, 0.0), [0.2, 0.3, 0.4]),
    "run_trial_00001": ({"lambda": "3.5", "confidence_threshold": "0.5"},
                        (0.7, 0.5, 0.4, 0.0), None, [0.25, 0.28, 0.35]),
    "run_trial_00002": ({"lambda": "0.75", "confidence_threshold": "0.5"},
                        (0.9, 0.4, 0.2, 0.0), (0.85, 0.42, 0.19, 0.0), [0.3, 0.31, 0.33]),
    "run_trial_00003": ({"lambda": "2.0", "confidence_threshold": "argmax"},
                        None, None, [0.1]),
}
RADII = (0.0, 0.5, 1.0, 1.25)


def sweep_mapping(models, tmp_path, objectives):
    return {
        "name": "pictured",
        "base": {"models": str(models), "sigma": SIGMA, "epochs": 3},
        "search": {"lambda": {"uniform": [0.5, 4.0]},
                   "confidence_threshold": {"choice": [0.5, "argmax"]}},
        "num_trials": 4,
        "objective": {"metric": [name for name, _ in objectives],
                      "mode": [mode for _, mode in objectives]},
        "scheduler": {"metric": "proxy_acr", "mode": "max", "grace_period": 1,
                      "reduction_factor": 2, "max_t": 3},
        "certify": {"rank": {"n": 400, "n0": 10, "images": 20},
                    "final": {"n": 2000, "n0": 10, "max_images": 30, "top_k": 2}},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                   "experiment": "pictured"},
        "results_dir": str(tmp_path / "results"),
    }


def make_store(models, tmp_path, objectives):
    """A parent run written by the sweep's own writer, and trial runs as its callback
    writes them (the contract's tags, params and metrics)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from cadis.sweeps.mlflow_writer import SweepTracker

    sweep = sweep_from_mapping(sweep_mapping(models, tmp_path, objectives))
    tracker = SweepTracker(sweep.tracking_uri(), sweep, tmp_path, None)
    (tmp_path / "sweep.yaml").write_text("name: pictured\n")
    tracker.open_sweep(tmp_path / "sweep.yaml")
    client = MlflowClient(sweep.tracking_uri())
    for number, (name, (params, validation, test, proxy)) in enumerate(TRIALS.items()):
        run = client.create_run(tracker.experiment_id, run_name=name, start_time=1000 + number,
                                tags={tracking.PARENT_RUN_TAG: tracker.parent_run_id,
                                      tracking.ROLE_TAG: tracking.ROLE_TRIAL,
                                      tracking.TRIAL_ID_TAG: name,
                                      tracking.SEARCHED_TAG: "confidence_threshold,lambda"})
        run_id = run.info.run_id
        for key, value in {**params, "sigma": str(SIGMA)}.items():
            client.log_param(run_id, key, value)
        metrics = [Metric("proxy_acr", value, 0, epoch + 1) for epoch, value in enumerate(proxy)]
        for prefix, figures in (("val_", validation), ("", test)):
            if figures is not None:
                metrics += [Metric(f"{prefix}{tracking.certified_accuracy_metric(r)}", a, 0, 0)
                            for r, a in zip(RADII, figures)]
                metrics.append(Metric(f"{prefix}acr", sum(figures) / 4, 0, 0))
                metrics.append(Metric(f"{prefix}num_images", 20 if prefix else 30, 0, 0))
        client.log_batch(run_id, metrics=metrics)
    return client, tracker.parent_run_id


@pytest.fixture
def one_objective(tiny_models_dir, tmp_path):
    return make_store(tiny_models_dir, tmp_path, [("certified_accuracy_r0.5", "max")])


@pytest.fixture
def two_objectives(tiny_models_dir, tmp_path):
    return make_store(tiny_models_dir, tmp_path, [("certified_accuracy_r0.0", "max"),
                                                  ("certified_accuracy_r0.5", "max")])


def test_the_view_ranks_on_validation_and_knows_each_stage(one_objective):
    client, parent = one_objective
    view = load_sweep_view(client, parent)
    assert view.name == "pictured" and view.sigma == SIGMA
    assert [row.name for row in view.ranked()] == ["run_trial_00000", "run_trial_00001",
                                                   "run_trial_00002"]
    assert [row.name for row in view.finalists()] == ["run_trial_00000", "run_trial_00002"]
    assert (view.rank.n, view.rank.n0, view.rank.images) == (400, 10, 20)
    assert (view.final.n, view.final.images) == (2000, 30)
    assert view.rank.reach(SIGMA) == pytest.approx(max_certifiable_radius(SIGMA, 400, 0.001))
    assert view.histories[view.trials[0].run_id] == [(1, 0.2), (2, 0.3), (3, 0.4)]


def test_curves_are_the_runs_values_up_to_the_reach_of_n(one_objective):
    client, parent = one_objective
    view = load_sweep_view(client, parent)
    figures, _ = sweep_figures(view)
    validation, test = figures["certified_accuracy.png"].axes
    # n = 400 reaches 1.06 at sigma 0.5, n = 2000 1.45: 1.25 is drawn on test only.
    assert view.rank.reach(SIGMA) < 1.25 < view.final.reach(SIGMA)
    lines = {line.get_label(): line.get_xydata().tolist() for line in validation.get_lines()
             if not line.get_label().startswith("_")}
    for row in view.ranked():
        assert lines[trial_label(view, row)] == [[r, a] for r, a in zip(
            RADII[:3], TRIALS[row.name][1][:3])]
        assert curve_points(view, row, view.rank) == list(zip(RADII[:3], TRIALS[row.name][1]))
    test_lines = {line.get_label(): line.get_xydata().tolist() for line in test.get_lines()
                  if not line.get_label().startswith("_")}
    assert set(test_lines) == {trial_label(view, row) for row in view.finalists()}
    assert test_lines[trial_label(view, view.finalists()[0])] == [
        [r, a] for r, a in zip(RADII, TRIALS["run_trial_00000"][2])]
    # Labels are short: the trial's id and 3 significant digits.
    assert trial_label(view, view.ranked()[0]) == "00000: τ=argmax, λ=1.23"
    assert "n=400, n0=10, α=0.001" in validation.get_title()
    assert "20 images" in validation.get_title() and "30 images" in test.get_title()


def log_verdicts(client, parent, verdicts, validation):
    """Verdicts against the chosen trial at r = 0.5, as the sweep's choice logs them: by run
    name, (difference, low, high, separated)."""
    from cadis.tracking.sweep_reader import load_trials

    runs = {row.name: row.run_id for row in load_trials(client, sweep_run_id=parent)}
    for name, values in verdicts.items():
        for field, value in zip(("difference", "low", "high", "separated"), values):
            client.log_metric(runs[name], tracking.verdict_metric(
                tracking.VS_LEADER, "certified_accuracy_r0.5", field, validation), value)


def test_contenders_intervals_against_the_chosen_trial_are_drawn(one_objective):
    from cadis.sweeps.figure_data import interval_bars

    client, parent = one_objective
    log_verdicts(client, parent, {"run_trial_00001": (-0.1, -0.2, 0.0, 0.0),
                                  "run_trial_00002": (-0.2, -0.3, -0.1, 1.0)}, validation=True)
    log_verdicts(client, parent, {"run_trial_00002": (-0.13, -0.25, -0.01, 1.0)},
                 validation=False)
    view = load_sweep_view(client, parent)
    level, bars = interval_bars(view, view.rank, view.ranked())
    assert level == pytest.approx(0.6)
    assert [(bar.value, bar.low, bar.high, bar.separated) for bar in bars] == [
        (0.5, pytest.approx(0.4), pytest.approx(0.6), False),
        (0.4, pytest.approx(0.3), pytest.approx(0.5), True)]
    # Side by side about the objective's radius.
    assert bars[0].x < 0.5 < bars[1].x and bars[0].x + bars[1].x == pytest.approx(1.0)
    level, (bar,) = interval_bars(view, view.final, view.finalists())
    assert level == pytest.approx(0.55) and (bar.low, bar.high) == (pytest.approx(0.3),
                                                                   pytest.approx(0.54))
    figures, _ = sweep_figures(view)
    validation, test = figures["certified_accuracy.png"].axes
    for axes, chosen, count in ((validation, 0.6, 2), (test, 0.55, 1)):
        dashed = [line for line in axes.get_lines()
                  if line.get_label() == "chosen trial, paired 95% intervals vs it"]
        assert len(dashed) == 1 and dashed[0].get_ydata()[0] == pytest.approx(chosen)
        segments = [segment for collection in axes.collections
                    for segment in collection.get_segments()]
        assert len(segments) == count
    assert sorted(segment[:, 1].tolist() for collection in validation.collections
                  for segment in collection.get_segments()) == [
        pytest.approx([0.3, 0.5]), pytest.approx([0.4, 0.6])]


def test_no_intervals_where_the_sweep_logged_no_verdicts(one_objective):
    from cadis.sweeps.figure_data import interval_bars

    client, parent = one_objective
    view = load_sweep_view(client, parent)
    assert interval_bars(view, view.rank, view.ranked()) == (None, [])


def test_rungs_draw_every_trials_proxy_and_mark_the_stopped(one_objective):
    client, parent = one_objective
    view = load_sweep_view(client, parent)
    figures, _ = sweep_figures(view)
    [axes] = figures["rungs.png"].axes
    drawn = [line.get_xydata().tolist() for line in axes.get_lines() if len(line.get_xdata())]
    for name, (_, _, _, proxy) in TRIALS.items():
        assert [[epoch + 1, value] for epoch, value in enumerate(proxy)] in drawn
    labels = [tick.get_text() for tick in axes.get_xticklabels()]
    assert labels == ["1\n(4 trials)", "2\n(3 trials)", "3\n(3 trials)"]


def log_proxy_noise(client, parent, se):
    """The proxy's SE at every epoch of every trial, and the last trial (its proxy 0.1 at
    epoch 1 only) tagged as ASHA stopped it, as the sweep's callback writes them."""
    from mlflow.entities import Metric

    from cadis.tracking.sweep_reader import load_trials

    runs = {row.name: row.run_id for row in load_trials(client, sweep_run_id=parent)}
    for name, (_, _, _, proxy) in TRIALS.items():
        client.log_batch(runs[name], metrics=[Metric(tracking.PROXY_ACR_SE, se, 0, epoch + 1)
                                              for epoch in range(len(proxy))])
    client.set_tag(runs["run_trial_00003"], tracking.OUTCOME_TAG, tracking.OUTCOME_STOPPED)
    return runs


@pytest.mark.parametrize("se, within", [(0.1, True), (0.01, False)], ids=["within", "beyond"])
def test_rungs_mark_the_cut_a_stopped_trial_met_and_whether_it_was_within_noise(
        one_objective, se, within):
    from cadis.sweeps.figure_data import asha_rungs, rung_marks

    client, parent = one_objective
    runs = log_proxy_noise(client, parent, se)
    view = load_sweep_view(client, parent)
    # Logged in the same instant, the trials reach rung 1 in start order: 00003's 0.1 meets
    # the median of 0.2, 0.25 and 0.3, 0.25; its gap 0.15 is within 2 * hypot(0.1, 0.1) =
    # 0.28, beyond 2 * hypot(0.01, 0.01) = 0.028.
    [cut] = view.cuts
    assert (cut.trial, cut.epoch, cut.cut, cut.cut_se) == (
        runs["run_trial_00003"], 1, pytest.approx(0.25), pytest.approx(se))
    assert view.stopped == 1 and asha_rungs(view.scheduler) == [1, 2]
    marks = rung_marks(view)
    assert marks.cuts == ((1, pytest.approx(0.25)),) and marks.judged == 1
    assert marks.within == ({runs["run_trial_00003"]} if within else set())
    figures, _ = sweep_figures(view)
    [axes] = figures["rungs.png"].axes
    [ticks] = [line for line in axes.get_lines() if line.get_marker() == "_"]
    assert ticks.get_xydata().tolist() == [[1, pytest.approx(0.25)]]
    hollow = [line.get_xydata().tolist() for line in axes.get_lines()
              if line.get_marker() == "o" and line.get_markerfacecolor() == "none"
              and len(line.get_xdata())]
    crosses = [line.get_xydata().tolist() for line in axes.get_lines()
               if line.get_marker() == "x" and len(line.get_xdata())]
    assert (hollow, crosses) == (([[[1, 0.1]]], []) if within else ([], [[[1, 0.1]]]))
    assert (f"ASHA stopped 1; {int(within)} of 1 within the proxy's noise of their cut "
            f"(2 unpaired SEs)") in axes.get_title()


def test_the_study_behind_optunas_plots_holds_the_runs(one_objective):
    import optuna

    client, parent = one_objective
    view = load_sweep_view(client, parent)
    study = rebuild_study(view)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert sorted((t.params["lambda"], t.params["confidence_threshold"], t.values[0])
                  for t in complete) == sorted(
        (float(params["lambda"]), params["confidence_threshold"], validation[1])
        for params, validation, _, _ in TRIALS.values() if validation)
    [pruned] = study.get_trials(states=(optuna.trial.TrialState.PRUNED,))
    assert pruned.intermediate_values == {1: 0.1}


def test_a_pareto_front_marks_the_trials_certified_on_test(two_objectives):
    client, parent = two_objectives
    view = load_sweep_view(client, parent)
    figures, skipped = sweep_figures(view)
    assert "pareto_front.png" in figures and not skipped
    [axes] = figures["pareto_front.png"].axes
    marked = [collection for collection in axes.collections
              if collection.get_label() == "certified on test"]
    assert sorted(map(tuple, marked[0].get_offsets().tolist())) == sorted(
        (TRIALS[name][1][0], TRIALS[name][1][1]) for name in ("run_trial_00000",
                                                               "run_trial_00002"))
    assert {"parallel_coordinates_certified_accuracy_r0.0.png",
            "parallel_coordinates_certified_accuracy_r0.5.png"} <= set(figures)


def test_compare_writes_the_figures_and_says_what_it_skipped(one_objective, tmp_path, capsys):
    client, parent = one_objective
    out = tmp_path / "figures"
    assert main(["compare", "--sweep", parent, "--tracking-uri",
                 f"sqlite:///{tmp_path / 'mlflow.db'}", "--figures", str(out)]) == 0
    written = sorted(path.name for path in out.iterdir())
    assert written == ["certified_accuracy.png", "importance.png", "parallel_coordinates.png",
                       "rungs.png"]
    assert all(path.read_bytes()[:4] == b"\x89PNG" for path in out.iterdir())
    assert "pareto_front.png: one objective" in capsys.readouterr().err
    paths, _ = write_sweep_figures(client, parent, tmp_path / "again")
    assert sorted(path.name for path in paths) == written


def test_a_sweep_run_without_a_rank_stage_is_refused_in_one_line(one_objective):
    from cadis.errors import CadisError

    client, parent = one_objective
    experiment = client.get_run(parent).info.experiment_id
    old = client.create_run(experiment, tags={tracking.ROLE_TAG: tracking.ROLE_SWEEP})
    client.create_run(experiment, tags={tracking.ROLE_TAG: tracking.ROLE_TRIAL,
                                        tracking.PARENT_RUN_TAG: old.info.run_id})
    with pytest.raises(CadisError, match="has no param objective"):
        load_sweep_view(client, old.info.run_id)


def test_importances_of_a_constant_objective_are_skipped_and_the_rest_drawn(one_objective):
    import dataclasses

    client, parent = one_objective
    view = load_sweep_view(client, parent)
    flat = [dataclasses.replace(row, metrics={**row.metrics, "val_certified_accuracy_r0.5": 0.5})
            for row in view.trials]
    figures, skipped = sweep_figures(dataclasses.replace(view, trials=tuple(flat)))
    assert skipped["importance.png"] == ("every ranked trial has the same val "
                                         "certified_accuracy_r0.5: nothing to attribute")
    assert {"certified_accuracy.png", "rungs.png", "parallel_coordinates.png"} <= set(figures)


@pytest.mark.parametrize("n,sigma", [(100, 0.25), (500, 0.5), (1000, 0.25), (10_000, 1.0)])
def test_a_sequential_stage_reaches_what_fixed_n_does(n, sigma):
    # The sequential plan's last look is fixed-n CERTIFY: the same reach, within its n draws.
    fixed = StageCertification("rank", n, 100, 0.001, None, sequential=False)
    sequential = StageCertification("rank", n, 100, 0.001, None, sequential=True)
    reach = sequential.reach(sigma)
    assert reach == fixed.reach(sigma) == max_certifiable_radius(sigma, n, 0.001)
    assert draws_to_reach(reach, sigma, 0.001) <= n
