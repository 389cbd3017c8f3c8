"""The end-of-sweep summary's words over several training seeds (cadis.sweeps.summary): a
configuration is called ahead or behind only where every seed separates it the same way."""

from __future__ import annotations

import pytest

from cadis.smoothing.verdicts import Verdict
from cadis.sweeps.summary import seed_verdict, turned


def verdict(difference: float, separated: bool) -> Verdict:
    low, high = (difference - 0.01, difference + 0.01) if separated else (-0.01, 0.01)
    return Verdict("chosen", "other", "acr", 100, difference, low, high, 0.001, 0.002,
                   separated, (3, 1))


@pytest.mark.parametrize("seeds,words", [
    ([verdict(-0.05, True), verdict(-0.03, True)], "ahead on every seed"),
    ([verdict(0.05, True), verdict(0.03, True)], "behind on every seed"),
    ([verdict(-0.05, True), verdict(-0.01, False)],
     "separated on 1 of 2 seeds: the seeds do not separate them"),
    # Separated both ways: no direction holds over the seeds.
    ([verdict(-0.05, True), verdict(0.05, True)],
     "separated on 2 of 2 seeds: the seeds do not separate them"),
    ([verdict(0.0, False)], "separated on 0 of 1 seeds: the seeds do not separate them"),
], ids=["ahead", "behind", "one-seed", "both-ways", "none"])
def test_the_seeds_call_a_configuration_ahead_only_when_every_seed_does(seeds, words):
    assert seed_verdict(seeds) == words


def test_a_verdict_reads_as_the_chosen_minus_the_other():
    assert turned(verdict(-0.05, True)) == "+0.050 [+0.040, +0.060]"
    assert turned(verdict(0.0, False)) == "+0.000 [-0.010, +0.010]"


def test_a_configuration_alone_on_test_still_gets_its_spread_over_seeds():
    from cadis.sweeps.choice import Choice
    from cadis.sweeps.summary import seed_lines

    seeds = {"t1": {"seeds": {0: {}, 1: {}}, "mean": {"acr": 0.5, "num_images": 3.0},
                    "range": {"acr": [0.4, 0.6], "num_images": [3.0, 3.0]}}}
    assert seed_lines(Choice("t1", "t1", (), (), seeds), "acr") == [
        "  test over 2 training seeds (3 images), acr: chosen t1 0.500 [0.400-0.600]"]
    # One seed: the test figures above say it all.
    one = {"t1": {**seeds["t1"], "seeds": {0: {}}}}
    assert seed_lines(Choice("t1", "t1", (), (), one), "acr") == []


def test_the_summary_says_how_many_of_ashas_stops_lay_within_the_proxys_noise(
        tiny_models_dir, tmp_path):
    from mlflow.entities import Metric

    from cadis.sweeps.mlflow_writer import SweepTracker
    from cadis.sweeps.parse import sweep_from_mapping
    from cadis.sweeps.summary import sweep_summary
    from cadis.tracking import contract as tracking
    from tests.test_figures import sweep_mapping

    sweep = sweep_from_mapping(sweep_mapping(tiny_models_dir, tmp_path, [("acr", "max")]))
    tracker = SweepTracker(sweep.tracking_uri(), sweep, tmp_path, None)
    (tmp_path / "sweep.yaml").write_text("name: pictured\n")
    tracker.open_sweep(tmp_path / "sweep.yaml")
    # Rung 1 (rf 2): C's 0.52 meets the median of A's and B's, 0.55 (SE 0.02): within
    # 2 * hypot(0.01, 0.02). D's 0.40 meets C's 0.52 (the median of three): beyond. Rung 2:
    # E's 0.55 meets the median of A's and B's, 0.65: 0.10 beyond 2 * hypot(0.02, 0.02).
    trials = {"A": ([0.50, 0.60, 0.70], [0.02] * 3, tracking.OUTCOME_COMPLETED),
              "B": ([0.60, 0.70, 0.80], [0.02] * 3, tracking.OUTCOME_COMPLETED),
              "C": ([0.52], [0.01], tracking.OUTCOME_STOPPED),
              "D": ([0.40], [0.01], tracking.OUTCOME_STOPPED),
              "E": ([0.70, 0.55], [0.02, 0.02], tracking.OUTCOME_STOPPED)}
    for order, (name, (proxy, errors, outcome)) in enumerate(trials.items()):
        run = tracker.client.create_run(
            tracker.experiment_id, run_name=name, start_time=1000 + order,
            tags={tracking.PARENT_RUN_TAG: tracker.parent_run_id,
                  tracking.ROLE_TAG: tracking.ROLE_TRIAL, tracking.TRIAL_ID_TAG: name,
                  tracking.OUTCOME_TAG: outcome})
        # Every trial's epoch e is logged before any trial's epoch e + 1.
        tracker.client.log_batch(run.info.run_id, metrics=[
            Metric(metric, logged, 1000 * (10 * epoch + order), epoch)
            for epoch, (value, error) in enumerate(zip(proxy, errors), start=1)
            for metric, logged in ((tracking.PROXY_ACR, value), (tracking.PROXY_ACR_SE, error))])
    lines = sweep_summary(tracker, None, None).splitlines()
    assert ("ASHA stopped 3 trials; within the proxy's noise of the cut they met "
            "(2 unpaired SEs): at epoch 1, 1 of 2; at epoch 2, 0 of 1") in lines


def test_the_mlflow_hint_opens_the_model_training_view():
    from cadis.sweeps.summary import mlflow_ui_hint

    # MLflow 3.17's UI opens an experiment on its GenAI view unless the page names the workflow.
    for uri in ("sqlite:///runs/sweeps/mlflow.db", "http://127.0.0.1:5000"):
        assert mlflow_ui_hint(uri, "3", "abc").endswith(
            "#/experiments/3/runs/abc?workflowType=machine_learning")


def test_the_chosen_trials_test_line_stops_at_what_n_can_certify(tiny_models_dir, tmp_path):
    from cadis.sweeps.mlflow_writer import SweepTracker
    from cadis.sweeps.parse import sweep_from_mapping
    from cadis.sweeps.summary import sweep_summary
    from cadis.tracking import contract as tracking
    from tests.test_figures import sweep_mapping

    sweep = sweep_from_mapping(sweep_mapping(tiny_models_dir, tmp_path, [("acr", "max")]))
    tracker = SweepTracker(sweep.tracking_uri(), sweep, tmp_path, None)
    (tmp_path / "sweep.yaml").write_text("name: pictured\n")
    tracker.open_sweep(tmp_path / "sweep.yaml")
    run = tracker.client.create_run(
        tracker.experiment_id, run_name="T",
        tags={tracking.PARENT_RUN_TAG: tracker.parent_run_id,
              tracking.ROLE_TAG: tracking.ROLE_TRIAL, tracking.TRIAL_ID_TAG: "T"})
    for key, value in {"sigma": "0.5", "certify.n": "500", "certify.alpha": "0.001"}.items():
        tracker.client.log_param(run.info.run_id, key, value)
    # n = 500 at alpha 0.001 certifies at most ~1.21 at sigma 0.5: r = 1.25 is zero by
    # construction and left out.
    for name, value in {"certified_accuracy_r0.0": 0.8, "certified_accuracy_r1.0": 0.5,
                        "certified_accuracy_r1.25": 0.0, tracking.ACR: 0.7}.items():
        tracker.client.log_metric(run.info.run_id, name, value)
    text = sweep_summary(tracker, "T", None)
    assert "r=0 0.800, r=1 0.500; acr 0.700" in text and "r=1.25" not in text


def decision_against_incumbent(discordant: tuple[int, int], separated: bool = False):
    from cadis.sweeps.choice import VALIDATION, Choice, Decision

    difference = (discordant[1] - discordant[0]) / 500
    incumbent = Verdict("chosen", "the incumbent", "certified_accuracy_r0.5", 500, difference,
                        difference - 0.01, difference + 0.01, 0.4, 0.4, separated, discordant)
    other = Verdict("chosen", "other", "certified_accuracy_r0.5", 500, 0.0, -0.01, 0.01, 1.0,
                    1.0, False, (2, 2))
    decision = Decision(VALIDATION, "certified_accuracy_r0.5", "t1",
                        {"t1": "chosen", "t0": "the incumbent", "t2": "other"},
                        (incumbent, other))
    return Choice("t1", "t0", (decision,), ())


def test_an_inseparable_incumbent_gets_the_hold_out_that_would_separate_it():
    from cadis.smoothing.separation import images_to_separate
    from cadis.sweeps.summary import separation_line

    line = separation_line(decision_against_incumbent((9, 5)), "certified_accuracy_r0.5")
    # Two comparisons in the decision: Holm's first level is 0.05 / 2.
    assert f"about {images_to_separate(9, 5, 500, 0.025):,} validation images" in line
    assert "chosen trial alone certified 9" in line and "incumbent alone 5" in line
    assert "projection" in line


def test_no_projection_where_the_data_decided_or_nothing_leads():
    from cadis.sweeps.summary import separation_line

    metric = "certified_accuracy_r0.5"
    assert separation_line(decision_against_incumbent((9, 5), separated=True), metric) is None
    assert separation_line(decision_against_incumbent((9, 5)), "acr") is None
    assert "no hold-out would show" in separation_line(decision_against_incumbent((4, 6)),
                                                       metric)
