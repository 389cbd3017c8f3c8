"""A Ray Train worker killed mid-run: ``cadis train --workers 2`` (the TorchTrainer every
sweep trial builds too, :func:`cadis.finetuning.ray_train.build_trainer`) restarts its
worker group from the last checkpoint, and the run goes on with its epoch and step count.
A worker that raises a CadisError ends the run at once, its group not restarted. A real local
Ray; the workers are found by their process titles (and SIGKILLed)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from ray.exceptions import ActorDiedError
from ray.train import ControllerError, WorkerGroupError
from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

from cadis.finetuning.loop import NonFiniteLoss
from cadis.finetuning.train_failures import deterministic_cause
from tests.conftest import own_group, set_flags
from tests.test_train import TINY

REPO = Path(__file__).resolve().parents[1]
# Ray sets a worker's process title to its actor class (and the method it runs).
TRAIN_WORKER_TITLE = b"ray::RayTrainWorker"
# The variable that marks the processes of this test's Ray (its workers inherit it).
TAG_ENV = "CADIS_TEST_RAY_TAG"


def train_workers(tag: str) -> set[int]:
    """The pids of live Ray Train workers of the Ray whose processes carry ``tag``."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if title.startswith(TRAIN_WORKER_TITLE) and f"{TAG_ENV}={tag}".encode() in environ:
            found.add(int(entry.name))
    return found


# Train's record of the checkpoints it has registered, in the run's storage folder (Ray
# 2.60). A checkpoint folder lands before its report is registered: a worker killed between
# the two restarts from the checkpoint before it (seen: from scratch, the unregistered folder
# left behind), so the kill waits for the record.
CHECKPOINT_RECORD = "checkpoint_manager_snapshot.json"


def registered_checkpoint(storage: Path) -> dict | None:
    """The metadata of the latest checkpoint Train has registered under ``storage``."""
    try:
        record = json.loads((storage / CHECKPOINT_RECORD).read_text())
        name = record["latest_checkpoint_result"]["checkpoint_dir_name"]
        return json.loads((storage / name / "finetune.json").read_text())["metadata"]
    except (OSError, ValueError, KeyError, TypeError):  # not yet written, or being replaced
        return None


@pytest.mark.slow
def test_a_train_worker_killed_after_the_first_checkpoint_resumes_there_with_its_step_count(
        tiny_models_dir, tmp_path):
    out = tmp_path / "out"
    tag = str(tmp_path)
    epochs, steps = 3, 4
    command = [sys.executable, "-m", "cadis", "train", str(REPO / "sweeps" / "default.yaml"),
               "--out", str(out), "--quiet", "--workers", "2",
               *set_flags(f"models={tiny_models_dir}", *TINY, f"epochs={epochs}",
                          f"max_steps_per_epoch={steps}", "cpus_per_worker=0.5")]
    # A local Ray of its own (not one a `ray start` left on this machine), its processes tagged.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": "local", TAG_ENV: tag}
    with own_group(command, tmp_path, env) as run:
        deadline = time.monotonic() + 300
        seen = None
        while time.monotonic() < deadline and run.poll() is None and seen is None:
            seen = registered_checkpoint(out / "ray" / "train")
            time.sleep(0.1)
        assert seen is not None, "no checkpoint before the run ended"
        workers = train_workers(tag)
        assert len(workers) == 2 and seen["epoch"] < epochs
        os.kill(min(workers), signal.SIGKILL)
        # Train replaces the worker group: new workers start.
        while time.monotonic() < deadline and run.poll() is None and not (
                train_workers(tag) - workers):
            time.sleep(0.2)
        assert train_workers(tag) - workers, "no worker was started again"
        _, err = run.communicate(timeout=300)
    assert run.returncode == 0, err[-3000:]
    history = json.loads((out / "history.json").read_text())
    # Every epoch once, the step count carried on, and the epochs before the kill restored
    # from the checkpoint rather than trained again (their wall time is the same number).
    assert [metrics["epoch"] for metrics in history] == list(range(1, epochs + 1))
    assert [metrics["global_step"] for metrics in history] == [
        steps * epoch for epoch in range(1, epochs + 1)]
    assert history[:seen["epoch"]] == seen["history"]


def _worker_error(error: Exception) -> Exception:
    """A worker's error as Train's controller holds it (Ray 2.60): wrapped with its traceback."""
    return UserExceptionWithTraceback(error, traceback_str=f"Traceback ...\n{error!r}")


@pytest.mark.parametrize("wrap, deterministic", [
    # A worker's NonFiniteLoss as the callback sees it, as Train raises it once the callback
    # has stopped the run, and as a WorkerGroupError carries it: the same CadisError.
    (_worker_error, True),
    (ControllerError, True),
    (lambda error: WorkerGroupError("worker errors", {1: _worker_error(error)}), True),
    # A full disk or a lost worker may pass: Ray retries them.
    (lambda error: _worker_error(OSError(28, "No space left on device")), False),
    (lambda error: ActorDiedError(), False),
], ids=["worker", "controller", "worker-group", "disk-full", "actor-died"])
def test_the_cadis_error_a_failed_run_carries_is_found_through_rays_wrappers(wrap,
                                                                              deterministic):
    error = NonFiniteLoss("epoch 1, step 2: the loss is nan")
    found = deterministic_cause(wrap(error))
    assert (found is error) if deterministic else found is None


@pytest.mark.slow
def test_a_worker_that_raises_a_cadis_error_ends_the_run_in_one_line_without_a_restart(
        tiny_models_dir, tmp_path):
    # lr 1e30: the second step's loss is nan on both workers (tests/test_loop.py), a
    # NonFiniteLoss, which a restart would only repeat. Train would restart the worker group
    # (RAY_MAX_FAILURES times) for any other error; every worker process started is counted.
    tag = str(tmp_path)
    command = [sys.executable, "-m", "cadis", "train", str(REPO / "sweeps" / "default.yaml"),
               "--out", str(tmp_path / "out"), "--quiet", "--workers", "2",
               *set_flags(f"models={tiny_models_dir}", *TINY, "epochs=1", "lr=1e30",
                          "max_steps_per_epoch=4", "cpus_per_worker=0.5")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": "local", TAG_ENV: tag}
    started: set[int] = set()
    with own_group(command, tmp_path, env) as run:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and run.poll() is None:
            started |= train_workers(tag)
            time.sleep(0.05)
        _, err = run.communicate(timeout=60)
    assert run.returncode == 2, err[-3000:]
    # Ray's forwarded logs of the workers may follow it; the command's own line is one line.
    [line] = [line for line in err.splitlines() if line.startswith("cadis: error:")]
    assert line.startswith("cadis: error: epoch 1, step 2: the loss is nan ("), err[-3000:]
    assert "RETRY" not in err and "Traceback" not in line
    assert len(started) == 2, f"{len(started)} Train workers started: the group was restarted"
    assert not (tmp_path / "out" / "history.json").exists()


@pytest.mark.slow
@pytest.mark.soak
@pytest.mark.timeout(900)
def test_a_train_worker_killed_inside_a_sweep_trial_resumes_in_the_same_trial_and_run(
        tiny_models_dir, tmp_path):
    from tests.test_sweep import by_role, mlflow_runs, tiny_sweep, write

    epochs, steps = 3, 4
    sweep = tiny_sweep(tiny_models_dir, tmp_path, scheduler=None, num_trials=1,
                       store_draws=False)
    sweep["base"].update(epochs=epochs, max_steps_per_epoch=steps)
    sweep["certify"]["final"]["top_k"] = 1
    path = write(tmp_path, sweep)
    tag = str(tmp_path)
    command = [sys.executable, "-m", "cadis", "sweep", str(path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": "local", TAG_ENV: tag}
    train = tmp_path / "results" / "train"
    with own_group(command, tmp_path, env) as run:
        deadline = time.monotonic() + 600
        seen = None
        while time.monotonic() < deadline and run.poll() is None and seen is None:
            seen = next(filter(None, map(registered_checkpoint, train.glob("*"))), None)
            time.sleep(0.1)
        assert seen is not None, "no checkpoint before the sweep ended"
        workers = train_workers(tag)
        assert len(workers) == 1 and seen["epoch"] < epochs
        os.kill(min(workers), signal.SIGKILL)
        _, err = run.communicate(timeout=600)
    assert run.returncode == 0, err[-3000:]
    client, runs = mlflow_runs(tmp_path)
    [parent], [trial] = by_role(runs, "sweep"), by_role(runs, "trial")
    assert parent.info.status == "FINISHED" and parent.data.tags["cadis.stage"] == "done"
    # One trial, one run, one Tune attempt: Train replaced its worker inside the trial.
    assert trial.info.status == "FINISHED" and trial.data.tags["cadis.outcome"] == "completed"
    assert "error.txt" not in {item.path for item in client.list_artifacts(trial.info.run_id)}
    assert {"val_acr", "acr"} <= set(trial.data.metrics)
    # Every epoch once in the run, its step count carried on past the kill.
    epochs_logged = client.get_metric_history(trial.info.run_id, "epoch")
    assert sorted(metric.step for metric in epochs_logged) == list(range(1, epochs + 1))
    global_steps = client.get_metric_history(trial.info.run_id, "global_step")
    assert sorted((metric.step, metric.value) for metric in global_steps) == [
        (epoch, steps * epoch) for epoch in range(1, epochs + 1)]
