"""The Tune callback that writes each trial's MLflow run, driven the way Tune drives it (fake
trials and results, no Ray cluster) against a SQLite tracking URI: the runs, params, metrics,
tags and files it writes (the incumbent's name and tags too), and a resumed sweep finding
its runs again."""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass, field
from typing import Any

import pytest

from cadis.sweeps.layout import EPOCH, TrainedTrial, trained_file, trial_rank_dir
from cadis.sweeps.parse import sweep_from_mapping
from cadis.sweeps.trial_callback import MlflowTrialCallback
from cadis.tracking import contract as tracking
from cadis.tracking.sweep_reader import find_trial_run, metric_history
from tests.test_figures import sweep_mapping

OBJECTIVE = [("certified_accuracy_r0.5", "max")]
# What the rank stage reports after the last epoch: the epoch's metrics again, then the
# validation figures.
RANK_FIGURES = {"val_acr": 0.5, "val_certified_accuracy_r0.5": 0.6, "val_num_images": 20.0}
FAILURE_TEXT = ("Failure # 1 (occurred at 2024-01-01_00-00-00)\nTraceback (most recent call "
                "last):\n  File \"x.py\", line 1, in f\nValueError: an earlier attempt\n\n"
                "Failure # 2 (occurred at 2024-01-01_00-01-00)\nTraceback (most recent call "
                "last):\n  File \"x.py\", line 1, in f\n"
                "cadis.finetuning.losses.NonFiniteLoss: epoch 1: the loss is nan\n")


@dataclass
class FakeTrial:
    """What the callback reads of a Tune trial."""

    trial_id: str
    config: dict[str, Any]
    last_result: dict[str, Any] = field(default_factory=dict)
    error_file: str | None = None

    def __str__(self) -> str:
        return f"run_trial_{self.trial_id}"


def epoch_result(epoch: int, proxy: float) -> dict[str, Any]:
    """A per-epoch result as the trial reports it, with Tune's bookkeeping added."""
    return {EPOCH: epoch, "proxy_acr": proxy, "loss": 1.0 / epoch, "hallucination_rate": math.nan,
            "training_iteration": epoch, "timestamp": 1_700_000_000 + epoch, "done": False,
            "should_checkpoint": True}


@pytest.fixture
def sweep_run(tiny_models_dir, tmp_path):
    """The sweep, its parent run (written by the sweep's own writer) and a callback."""
    from cadis.sweeps.mlflow_writer import SweepTracker

    sweep = sweep_from_mapping(sweep_mapping(tiny_models_dir, tmp_path, OBJECTIVE))
    results = tmp_path / "results"
    tracker = SweepTracker(sweep.tracking_uri(), sweep, results, None)
    (tmp_path / "sweep.yaml").write_text("name: pictured\n")
    tracker.open_sweep(tmp_path / "sweep.yaml")
    callback = MlflowTrialCallback(sweep.tracking_uri(), tracker.experiment_id,
                                   tracker.parent_run_id, sweep, str(results))
    return sweep, tracker, callback


def run_of(tracker, trial_id):
    return find_trial_run(tracker.client, tracker.experiment_id, tracker.parent_run_id, trial_id)


def test_a_trial_that_trains_and_is_ranked(sweep_run, monkeypatch):
    sweep, tracker, callback = sweep_run
    trial = FakeTrial("00000", {"lambda": 1.5, "confidence_threshold": "argmax"})
    callback.on_trial_start(0, [], trial)
    for epoch, proxy in ((1, 0.2), (2, 0.3)):
        callback.on_trial_result(epoch, [], trial, epoch_result(epoch, proxy))
    rank = {**epoch_result(3, 0.4), **RANK_FIGURES}
    callback.on_trial_result(3, [], trial, rank)
    # Epoch 3's own result was lost (the tracking server was away): it is in the checkpoint.
    trained = trained_file(callback.results, trial.trial_id)
    TrainedTrial("/checkpoints/epoch_3", {}).write(trained)
    history = [{EPOCH: 1, "proxy_acr": 0.2}, {EPOCH: 2, "proxy_acr": 0.3},
               {EPOCH: 3, "proxy_acr": 0.4, "loss": math.inf}]
    monkeypatch.setattr("cadis.finetuning.checkpoint.read_metadata",
                        lambda folder: {"history": history} if str(folder).endswith("epoch_3")
                        else pytest.fail(f"read {folder}"))
    rank_dir = trial_rank_dir(callback.results, trial.trial_id)
    rank_dir.mkdir(parents=True)
    for name in ("records.tsv", "summary.json"):
        (rank_dir / name).write_text(name)
    trial.last_result = rank
    callback.on_trial_complete(3, [], trial)

    run = tracker.client.get_run(run_of(tracker, "00000").info.run_id)
    assert run.info.run_name == "run_trial_00000" and run.info.status == "FINISHED"
    assert run.data.tags[tracking.PARENT_RUN_TAG] == tracker.parent_run_id
    assert run.data.tags[tracking.ROLE_TAG] == tracking.ROLE_TRIAL
    assert run.data.tags[tracking.TRIAL_ID_TAG] == "00000"
    assert run.data.tags[tracking.SEARCHED_TAG] == "confidence_threshold,lambda"
    assert run.data.tags[tracking.OUTCOME_TAG] == tracking.OUTCOME_COMPLETED
    # The searched values under their own names, and the whole training config flattened.
    params = run.data.params
    assert params["lambda"] == "1.5" and params["confidence_threshold"] == "argmax"
    assert params["sigma"] == "0.5" and params["epochs"] == "3" and "certify.n" in params
    # Per-epoch metrics by epoch, Tune's bookkeeping and non-finite values left out; the
    # rank stage adds only its validation figures.
    assert metric_history(tracker.client, run.info.run_id, "proxy_acr") == [
        (1, 0.2), (2, 0.3), (3, 0.4)]
    assert [step for step, _ in metric_history(tracker.client, run.info.run_id, "loss")] == [1, 2]
    assert {key: value for key, value in run.data.metrics.items()
            if key.startswith("val_")} == RANK_FIGURES
    assert not {"training_iteration", "timestamp", "done", "hallucination_rate"} & set(
        run.data.metrics)
    assert run.data.metrics[EPOCH] == 3
    files = {item.path for item in tracker.client.list_artifacts(run.info.run_id,
                                                                 tracking.RANK_ARTIFACTS_DIR)}
    assert files == {"rank/records.tsv", "rank/summary.json"}


def test_a_trial_stopped_early_and_one_that_failed(sweep_run, tmp_path):
    sweep, tracker, callback = sweep_run
    stopped = FakeTrial("00001", {"lambda": 3.0, "confidence_threshold": 0.5})
    callback.on_trial_start(0, [], stopped)
    callback.on_trial_result(1, [], stopped, epoch_result(1, 0.1))
    stopped.last_result = epoch_result(1, 0.1)
    callback.on_trial_complete(1, [], stopped)
    run = tracker.client.get_run(run_of(tracker, "00001").info.run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags[tracking.OUTCOME_TAG] == tracking.OUTCOME_STOPPED
    assert not tracker.client.list_artifacts(run.info.run_id)

    error_file = tmp_path / "error.txt"
    error_file.write_text(FAILURE_TEXT)
    failed = FakeTrial("00002", {"lambda": 2.0, "confidence_threshold": 0.5},
                       error_file=str(error_file))
    callback.on_trial_start(0, [], failed)
    callback.on_trial_error(1, [], failed)
    run = tracker.client.get_run(run_of(tracker, "00002").info.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags[tracking.OUTCOME_TAG] == tracking.OUTCOME_FAILED
    # The last attempt's innermost exception, without its module path.
    assert run.data.tags[tracking.FAILURE_TAG] == "NonFiniteLoss: epoch 1: the loss is nan"
    assert tracker.client.download_artifacts(run.info.run_id, tracking.ERROR_ARTIFACT,
                                             str(tmp_path)) and \
        (tmp_path / tracking.ERROR_ARTIFACT).read_text() == FAILURE_TEXT
    assert tracker.failures() == [("run_trial_00002", "NonFiniteLoss: epoch 1: the loss is nan")]

    # Tune pickles the callback into its experiment state: without its client.
    assert pickle.loads(pickle.dumps(callback))._client is None
    # A callback that has not seen the trial (a new driver's) finds its run again by its
    # trial id (no second run), RUNNING, the old reason gone.
    resumed = MlflowTrialCallback(callback.uri, callback.experiment_id, callback.parent_run_id,
                                  sweep, callback.results)
    failed.error_file = None
    resumed.on_trial_start(0, [], failed)
    runs = [run for run in tracker.client.search_runs([tracker.experiment_id])
            if run.data.tags.get(tracking.TRIAL_ID_TAG) == "00002"]
    assert len(runs) == 1 and runs[0].info.status == "RUNNING"
    assert tracking.FAILURE_TAG not in runs[0].data.tags
    resumed.on_trial_error(2, [], failed)
    assert tracker.client.get_run(runs[0].info.run_id).data.tags[tracking.FAILURE_TAG] == \
        "Tune kept no error text for this trial"


def test_the_incumbents_run_is_named_and_tagged_and_the_sweep_names_it(sweep_run):
    from cadis.sweeps.spec import INCUMBENT_PARAM

    sweep, tracker, callback = sweep_run
    incumbent = FakeTrial("00003", {"lambda": 2.0, "confidence_threshold": "argmax",
                                    INCUMBENT_PARAM: True})
    other = FakeTrial("00004", {"lambda": 3.0, "confidence_threshold": 0.5})
    for trial in (incumbent, other):
        callback.on_trial_start(0, [], trial)
    run = tracker.client.get_run(run_of(tracker, "00003").info.run_id)
    assert run.info.run_name == "incumbent-00003"
    assert run.data.tags[tracking.INCUMBENT_TAG] == "true"
    # The marker is no param: the searched values and the config are the base's.
    assert INCUMBENT_PARAM not in run.data.params and run.data.params["lambda"] == "2.0"
    assert run.data.tags[tracking.SEARCHED_TAG] == "confidence_threshold,lambda"
    parent = tracker.client.get_run(tracker.parent_run_id)
    assert parent.data.tags[tracking.INCUMBENT_TRIAL_TAG] == "00003"
    ordinary = tracker.client.get_run(run_of(tracker, "00004").info.run_id)
    assert ordinary.info.run_name == "run_trial_00004"
    assert tracking.INCUMBENT_TAG not in ordinary.data.tags
