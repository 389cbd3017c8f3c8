"""The MLflow contract of sweeps: metric names, params, and the store checks at the edge."""

from __future__ import annotations

import pytest

from cadis.errors import CadisError
from cadis.tracking.contract import certified_accuracy_metric, flatten_params, radius_of_metric
from cadis.tracking.server import artifact_location, check_tracking_uri, default_tracking_uri


@pytest.mark.parametrize("radius,name", [(0, "certified_accuracy_r0.0"),
                                         (0.25, "certified_accuracy_r0.25"),
                                         (1.5, "certified_accuracy_r1.5")])
def test_metric_names_round_trip(radius, name):
    assert certified_accuracy_metric(radius) == name and radius_of_metric(name) == radius


@pytest.mark.parametrize("name", ["acr", "certified_accuracy_rx", "proxy_acr"])
def test_other_metrics_have_no_radius(name):
    assert radius_of_metric(name) is None


def test_flatten_params_names_nested_keys_with_dots():
    params = flatten_params({"lambda": 2.0, "confidence_threshold": "argmax",
                             "certify": {"n": 1000, "max_images": None},
                             "lora_target_modules": ["qkv"]})
    assert params == {"lambda": "2.0", "confidence_threshold": "argmax", "certify.n": "1000",
                      "certify.max_images": "null", "lora_target_modules": '["qkv"]'}


def test_default_store_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_tracking_uri() == f"sqlite:///{tmp_path}/runs/sweeps/mlflow.db"
    assert artifact_location(default_tracking_uri()) == \
        (tmp_path / "runs" / "sweeps" / "mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert default_tracking_uri() == "http://127.0.0.1:5000"
    assert artifact_location("http://127.0.0.1:5000") is None


@pytest.mark.parametrize("uri,message", [
    ("http://127.0.0.1:9", "MLflow tracking server http://127.0.0.1:9 is unreachable"),
    ("sqlite:////proc/no/such/mlflow.db", "cannot create /proc/no/such"),
    ("mlflow.db", "is not a URI"),
])
def test_unusable_stores_are_one_line_errors(uri, message):
    with pytest.raises(CadisError) as error:
        check_tracking_uri(uri)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_sqlite_store_folder_is_made(tmp_path):
    check_tracking_uri(f"sqlite:///{tmp_path}/a/b/mlflow.db")
    assert (tmp_path / "a" / "b").is_dir() and not (tmp_path / "a" / "b" / "mlflow.db").exists()


def test_two_clients_opening_a_new_sqlite_store_at_once_both_succeed(tmp_path):
    # Two sweeps started together on one new store (benchmarks/science.sh) raced in MLflow's
    # schema migration and one failed; the client now creates the tables under a file lock.
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    opener = ("import sys; from cadis.tracking.client import PatientClient; "
              "PatientClient(sys.argv[1]).search_experiments()")
    processes = [subprocess.Popen([sys.executable, "-c", opener, uri], stderr=subprocess.PIPE,
                                  text=True) for _ in range(3)]
    errors = [process.communicate(timeout=120)[1] for process in processes]
    assert [process.returncode for process in processes] == [0, 0, 0], errors
