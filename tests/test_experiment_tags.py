"""The sweep's experiment as MLflow's UI reads it (SQLite store): tagged for model training,
with the first objective, as the trial runs carry it, as its primary metric; an experiment
made before (untagged, or tagged by another sweep) is tagged when a sweep opens or resumes
in it."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from cadis.sweeps.mlflow_writer import SweepTracker, experiment_tags
from cadis.sweeps.parse import sweep_from_mapping
from cadis.tracking import contract as tracking
from tests.test_figures import sweep_mapping

ACCURACY_MAX = [("certified_accuracy_r0.5", "max")]


def open_tracker(models, tmp_path, objectives) -> SweepTracker:
    sweep = sweep_from_mapping(sweep_mapping(models, tmp_path, objectives))
    tracker = SweepTracker(sweep.tracking_uri(), sweep, tmp_path / "results", None)
    (tmp_path / "sweep.yaml").write_text("name: pictured\n")
    tracker.open_sweep(tmp_path / "sweep.yaml")
    return tracker


def tags_of(tmp_path) -> dict[str, str]:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return dict(client.get_experiment_by_name("pictured").tags)


def test_a_new_experiment_opens_on_its_runs_with_the_objective(tiny_models_dir, tmp_path):
    open_tracker(tiny_models_dir, tmp_path, ACCURACY_MAX)
    tags = tags_of(tmp_path)
    assert tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert tags[tracking.PRIMARY_METRIC_TAG] == "val_certified_accuracy_r0.5"
    assert tags[tracking.PRIMARY_METRIC_GREATER_TAG] == "True"


def test_an_existing_experiment_is_tagged_again_without_failing(tiny_models_dir, tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_experiment("pictured")  # made before experiments were tagged
    first = open_tracker(tiny_models_dir, tmp_path, ACCURACY_MAX)
    assert tags_of(tmp_path)[tracking.PRIMARY_METRIC_TAG] == "val_certified_accuracy_r0.5"
    # A second sweep in the same experiment, already tagged, names its own objective.
    second = open_tracker(tiny_models_dir, tmp_path, [("acr", "min"), ("certified_accuracy_r0.0", "max")])
    assert second.experiment_id == first.experiment_id
    tags = tags_of(tmp_path)
    assert tags[tracking.PRIMARY_METRIC_TAG] == "val_acr"
    assert tags[tracking.PRIMARY_METRIC_GREATER_TAG] == "False"
    # Resuming the first sweep names its objective again.
    first.reopen_sweep()
    assert tags_of(tmp_path)[tracking.PRIMARY_METRIC_TAG] == "val_certified_accuracy_r0.5"


def test_a_per_epoch_objective_is_named_as_logged(tiny_models_dir, tmp_path):
    sweep = sweep_from_mapping(sweep_mapping(tiny_models_dir, tmp_path, [("proxy_acr", "max")]))
    assert experiment_tags(sweep.objective)[tracking.PRIMARY_METRIC_TAG] == "proxy_acr"
