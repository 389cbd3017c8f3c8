"""The sweep's tracking store going away: against a real ``mlflow server`` on 127.0.0.1 (a
SQLite backend in a temporary folder, stopped by SIGKILL to its process group), the driver's
MLflow client waits out an outage and loses no write; a store that stays down ends the sweep
in one line, and ``--resume`` finishes it once the store is back (a soak test, ``make soak``:
three minutes the suite cannot hold)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cadis.cli import main
from cadis.tracking.client import (
    MLFLOW_RETRIES_ENV,
    PatientClient,
    TrackingServerUnreachable,
)
from tests.conftest import own_group
from tests.test_cluster import _free_ports
from tests.test_sweep import by_role, mlflow_runs, tiny_sweep, write

MLFLOW = Path(sys.prefix) / "bin" / "mlflow"
# /health answers after about 12 s, and up to 100 s on a loaded machine (docs/design.md §8).
SERVER_START_TIMEOUT_S = 240.0


class MlflowServer:
    """``mlflow server`` on a free loopback port, its store ``folder/mlflow.db`` (which
    tests/test_sweep.py's ``mlflow_runs`` reads), in a process group of its own: stopped by
    SIGKILL to the group, started again on the same port and store."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        [self.port] = _free_ports(1)
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
        self.process = subprocess.Popen(
            [str(MLFLOW), "server", "--backend-store-uri",
             f"sqlite:///{self.folder / 'mlflow.db'}", "--artifacts-destination",
             str(self.folder / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
             # One worker starts in about half the time of the default four on 2 cores.
             "--workers", "1"],
            env=env, start_new_session=True, stdout=subprocess.DEVNULL,
            stderr=open(self.folder / "server.log", "ab"))
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.folder / "server.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        raise AssertionError(f"mlflow server did not answer /health in {SERVER_START_TIMEOUT_S} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None


@pytest.fixture(autouse=True)
def mlflow_tries_once(monkeypatch):
    """What the driver's client sets, undone after each test (other tests' clients keep
    MLflow's own retries)."""
    monkeypatch.setenv(MLFLOW_RETRIES_ENV, "0")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module (a start costs 15-40 s here); each test leaves it running."""
    running = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    running.start()
    try:
        yield running
    finally:
        running.stop()


def _store_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("mlflow: the tracking store")]


@pytest.mark.slow
def test_a_store_that_stays_down_past_the_bound_raises_and_a_write_waits_out_a_restart(
        server, capsys):
    from mlflow.entities import Metric

    client = PatientClient(server.uri, retry_s=SERVER_START_TIMEOUT_S)
    run_id = client.create_run(client.create_experiment("outage")).info.run_id
    client.log_metric(run_id, "m", 1.0, step=1)
    # An answer of the store (no such run) is raised at once, not waited out.
    started = time.monotonic()
    with pytest.raises(Exception, match="not found|does not exist"):
        client.get_run("0" * 32)
    assert time.monotonic() - started < 5 and not _store_lines(capsys.readouterr().err)

    server.stop()
    # Down past the bound: the call raises, and every later call of that client at once.
    short = PatientClient(server.uri, retry_s=3)
    started = time.monotonic()
    with pytest.raises(TrackingServerUnreachable,
                       match=f"the MLflow tracking store {server.uri} is unreachable "
                             r"\(Connection (refused|reset by peer); retried for [3-9] s"):
        short.get_run(run_id)
    assert 3 <= time.monotonic() - started < 10
    started = time.monotonic()
    with pytest.raises(TrackingServerUnreachable):
        short.log_metric(run_id, "m", 3.0, step=3)
    assert time.monotonic() - started < 0.5
    capsys.readouterr()

    # Down for a restart (15-40 s here): the write waits, and lands once it is back.
    written: dict[str, object] = {}

    def log_step_two() -> None:
        try:
            client.log_batch(run_id, metrics=[Metric("m", 2.0, int(time.time() * 1000), 2)])
            written["at"] = time.monotonic()
        except Exception as error:  # noqa: BLE001 - the test reports it
            written["error"] = error

    writer = threading.Thread(target=log_step_two)
    writer.start()
    time.sleep(3)
    assert writer.is_alive() and not written, "the write did not wait for the store"
    restarted = time.monotonic()
    server.start()
    writer.join(timeout=60)
    assert not writer.is_alive() and "error" not in written, written
    assert written["at"] >= restarted
    history = client.get_metric_history(run_id, "m")
    assert sorted((metric.step, metric.value) for metric in history) == [(1, 1.0), (2, 2.0)]
    away, back = _store_lines(capsys.readouterr().err)
    assert away.startswith(f"mlflow: the tracking store {server.uri} is unreachable (")
    assert back.startswith(f"mlflow: the tracking store {server.uri} is back after ")


def test_a_bad_retry_bound_is_refused_before_any_work(tiny_models_dir, tmp_path, capsys,
                                                      monkeypatch):
    monkeypatch.setenv("CADIS_TRACKING_RETRY_S", "soon")
    path = write(tmp_path, tiny_sweep(tiny_models_dir, tmp_path))
    assert main(["sweep", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err == "cadis: error: CADIS_TRACKING_RETRY_S must be a finite number >= 0, got 'soon'\n"
    assert not (tmp_path / "results").exists()


def _trial_metric_logged(folder: Path, key: str) -> bool:
    try:
        _, runs = mlflow_runs(folder)
    except Exception:  # noqa: BLE001 - the driver has not created the experiment yet
        return False
    return any(key in run.data.metrics for run in by_role(runs, "trial"))


# The sweep, its give-up and its resume: about 3 minutes on 2 cores.
SOAK_TIMEOUT_S = 900


@pytest.mark.slow
@pytest.mark.soak
@pytest.mark.timeout(SOAK_TIMEOUT_S)
def test_a_store_that_stays_down_ends_the_sweep_in_one_line_and_resume_finishes_it(
        tiny_models_dir, tmp_path, server):
    sweep = tiny_sweep(tiny_models_dir, tmp_path, num_trials=1, scheduler=None,
                       store_draws=False, mlflow={"tracking_uri": server.uri,
                                                  "experiment": "tiny"})
    path = write(tmp_path, sweep)
    command = [sys.executable, "-m", "cadis", "sweep", str(path)]
    # A local Ray of its own (not one a `ray start` left on this machine), a short bound.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": "local",
           "CADIS_TRACKING_RETRY_S": "5"}
    with own_group(command, tmp_path, env) as driver:
        deadline = time.monotonic() + 300
        while (time.monotonic() < deadline and driver.poll() is None
               and not _trial_metric_logged(server.folder, "proxy_acr")):
            time.sleep(1)
        assert driver.poll() is None, "the sweep ended before the store was stopped"
        # The first epoch is in MLflow; the next write finds no store.
        server.stop()
        _, err = driver.communicate(timeout=300)
    assert driver.returncode == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"cadis: error: the MLflow tracking store {server.uri} is "
                           f"unreachable ("), err[-3000:]
    assert f"once the store is back, cadis sweep {path} --resume continues it" in last
    assert f"mlflow: the tracking store {server.uri} is unreachable (" in err

    server.start()
    # The driver did not wait for the store again to close the runs: --resume reopens them.
    _, runs = mlflow_runs(server.folder)  # the server's store, experiment "tiny"
    assert {run.info.status for run in runs} == {"RUNNING"}
    resumed = subprocess.run([*command, "--resume"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    client, runs = mlflow_runs(server.folder)
    [parent], [trial] = by_role(runs, "sweep"), by_role(runs, "trial")
    assert parent.info.status == "FINISHED" and parent.data.tags["cadis.stage"] == "done"
    assert trial.info.status == "FINISHED" and trial.data.tags["cadis.outcome"] == "completed"
    assert {"val_acr", "acr"} <= set(trial.data.metrics)
    # Every epoch is in the run: the one written before the store went away, and the one
    # whose write found no store, from the checkpoint's history.
    for key in ("proxy_acr", "loss", "epoch"):
        steps = [metric.step for metric in client.get_metric_history(trial.info.run_id, key)]
        assert sorted(steps) == [1, 2], key
