"""cadis sweep end to end: a real local Ray (Tune + Train), Optuna, ASHA and an MLflow store."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cadis.cli import main

REPO = Path(__file__).resolve().parents[1]


def tiny_sweep(models: Path, tmp_path: Path, **changes) -> dict:
    """Two trials of two 2-step epochs on digits with the tiny untrained models of conftest."""
    sweep = {
        "name": "tiny",
        "base": {"models": str(models), "epochs": 2, "max_steps_per_epoch": 2, "batch_size": 4,
                 "effective_batch_size": 8, "val_images": 20, "proxy_images": 4,
                 "proxy_n": 10, "proxy_n0": 4, "warmup_steps": 1},
        "search": {"lambda": {"uniform": [0.5, 2.0]},
                   "confidence_threshold": {"choice": [0.5, "argmax"]}},
        "num_trials": 2,
        "max_concurrent_trials": 2,
        "objective": {"metric": "acr", "mode": "max"},
        "scheduler": {"metric": "proxy_acr", "mode": "max", "grace_period": 1,
                      "reduction_factor": 2, "max_t": 2},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 0.5},
        "certify": {"rank": {"n": 20, "n0": 5, "images": 6},
                    "final": {"n": 20, "n0": 5, "skip": 1, "max_images": 3}},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "tiny"},
        "results_dir": str(tmp_path / "results"),
    }
    sweep.update(changes)
    return sweep


def write(tmp_path: Path, sweep: dict) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def mlflow_runs(tmp_path: Path) -> tuple[object, list]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    return client, runs


def by_role(runs, role):
    return [run for run in runs if run.data.tags.get("cadis.role") == role]


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("changes,message", [
    ({"mlflow": {"tracking_uri": "http://127.0.0.1:9"}}, "is unreachable"),
    ({"resources": {"workers_per_trial": 64, "cpus_per_worker": 1}},
     "one trial needs 64.25 CPU (the cluster has"),
    ({"resources": {"workers_per_trial": 2, "cpus_per_worker": 0.5, "gpus_per_worker": 1}},
     "one worker needs 0.5 CPU and 1 GPU on one node; the largest node has"),
    ({"search": {}}, "search"),
    ({"objective": {"metric": ["acr", "certified_accuracy_r0.0"], "mode": "max"}}, "mode"),
])
def test_bad_sweeps_fail_before_any_trial_or_run(tiny_models_dir, tmp_path, capsys, changes,
                                                 message):
    path = write(tmp_path, tiny_sweep(tiny_models_dir, tmp_path, **changes))
    assert main(["sweep", str(path)]) == 2
    # The resources are known once Ray is up, which logs first: the error is the last line.
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("cadis: error: ")
    assert not (tmp_path / "results").exists() and not (tmp_path / "mlflow.db").exists()


def test_dry_run_prints_the_plan_and_trains_nothing(tiny_models_dir, tmp_path, capsys):
    path = write(tmp_path, tiny_sweep(tiny_models_dir, tmp_path))
    assert main(["sweep", str(path), "--dry-run", "--set", "num_trials=3"]) == 0
    out = capsys.readouterr().out
    assert "sweep tiny: 3 trials; Optuna TPE" in out and "lambda: uniform [0.5, 2.0]" in out
    assert not (tmp_path / "results").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_dry_run_in_the_default_folders_creates_nothing(tiny_models_dir, tmp_path,
                                                          monkeypatch, capsys):
    # Without results_dir or a tracking URI a sweep writes under the working directory's
    # runs/sweeps/ (its results folder and the SQLite store): a dry run makes neither.
    from cadis.tracking.server import TRACKING_URI_ENV

    sweep = tiny_sweep(tiny_models_dir, tmp_path, mlflow={"experiment": "tiny"})
    del sweep["results_dir"]
    path = write(tmp_path, sweep)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv(TRACKING_URI_ENV, raising=False)
    assert main(["sweep", str(path), "--dry-run"]) == 0
    assert f"sqlite:///{cwd / 'runs' / 'sweeps' / 'mlflow.db'}" in capsys.readouterr().out
    assert list(cwd.iterdir()) == []


SHIPPED_SWEEPS = sorted(path.stem for path in (REPO / "sweeps").glob("*.yaml"))


def test_the_shipped_sweep_files_are_found():
    assert {"default", "cifar10", "imagenet"} <= set(SHIPPED_SWEEPS)


# What a dry run of a shipped file may refuse on this machine: its models or data are not
# here, or a sweep of it already ran here (`make demo`), which only --resume continues.
MACHINE_REFUSALS = ("models directory", "not found", "does not exist", "already holds a sweep")


@pytest.mark.parametrize("name", SHIPPED_SWEEPS)
def test_shipped_sweep_files_dry_run(name, capsys):
    # A dry run loads the models and data a trial would: where they are not on this machine
    # (the GPU-scale files, or models not yet pretrained), it refuses in one line naming them.
    code = main(["sweep", str(REPO / "sweeps" / f"{name}.yaml"), "--dry-run"])
    out, err = capsys.readouterr()
    assert f"sweep {name}:" in out
    if code != 0:
        assert code == 2 and err.startswith("cadis: error: ") and err.count("\n") == 1
        assert any(fragment in err for fragment in MACHINE_REFUSALS), err


# ------------------------------------------------------------------------------ a sweep


@pytest.mark.slow
def test_two_trial_sweep_chooses_on_validation_and_certifies_the_winner_on_test(
        tiny_models_dir, tmp_path, capsys):
    sweep = tiny_sweep(tiny_models_dir, tmp_path)
    sweep["certify"]["final"].update(top_k=1, draws_dir=str(tmp_path / "test-draws"))
    path = write(tmp_path, sweep)
    assert main(["sweep", str(path)]) == 0
    assert "| trial" in capsys.readouterr().out
    client, runs = mlflow_runs(tmp_path)
    [parent], trials = by_role(runs, "sweep"), by_role(runs, "trial")
    assert parent.info.status == "FINISHED" and len(trials) == 2
    assert parent.data.tags["cadis.stage"] == "done"
    assert all(run.info.status in ("FINISHED", "KILLED") for run in runs)
    completed = [run for run in trials if run.data.tags["cadis.outcome"] == "completed"]
    assert completed, "ASHA keeps the best trial of a rung"
    for run in trials:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert {"lambda", "confidence_threshold", "certify.n", "sigma"} <= set(run.data.params)
        history = client.get_metric_history(run.info.run_id, "proxy_acr")
        assert [m.step for m in history][:1] == [1]
    # Every trial that trained to the end has validation figures (the rank stage)...
    for run in completed:
        metrics = run.data.metrics
        assert {"val_certified_accuracy_r0.0", "val_acr", "val_clean_accuracy",
                "hallucination_rate", "trainable_fraction"} <= set(metrics)
        assert metrics["val_clean_accuracy"] == metrics["val_certified_accuracy_r0.0"]
        assert run.info.status == "FINISHED"
        rank_files = {item.path for item in client.list_artifacts(run.info.run_id, "rank")}
        assert {"rank/records.tsv", "rank/summary.json"} <= rank_files
        assert len(client.get_metric_history(run.info.run_id, "proxy_acr")) == 2
    for run in trials:
        if run.data.tags["cadis.outcome"] == "stopped_early":
            assert run.info.status == "KILLED" and "val_acr" not in run.data.metrics
    # The incumbent (the base as a trial of its own, searched values and all) trained all
    # its epochs whatever ASHA did, was ranked, and its run and the sweep's say so.
    [incumbent] = [run for run in trials if run.data.tags.get("cadis.incumbent") == "true"]
    assert incumbent.info.run_name == f"incumbent-{incumbent.data.tags['cadis.trial_id']}"
    assert parent.data.tags["cadis.incumbent_trial_id"] == incumbent.data.tags["cadis.trial_id"]
    assert (incumbent.data.params["lambda"], incumbent.data.params["confidence_threshold"]) == \
        ("2.0", "argmax")
    assert incumbent.data.tags["cadis.outcome"] == "completed"
    assert len(client.get_metric_history(incumbent.info.run_id, "proxy_acr")) == 2
    # ...and only the validation winner (top_k = 1) and the incumbent have test figures.
    winner = max(completed, key=lambda run: (run.data.metrics["val_acr"],
                                             -run.info.start_time))
    finalists = [run for run in trials if "acr" in run.data.metrics]
    assert {run.info.run_id for run in finalists} == {winner.info.run_id,
                                                      incumbent.info.run_id}
    assert winner.data.tags["cadis.finalist"] == "true"
    assert winner.data.metrics["clean_accuracy"] == winner.data.metrics["certified_accuracy_r0.0"]
    artifacts = {item.path for item in client.list_artifacts(winner.info.run_id)}
    assert {"records.tsv", "summary.json", "certified_accuracy.png"} <= artifacts
    test_summary = json.loads(Path(client.download_artifacts(
        winner.info.run_id, "summary.json", str(tmp_path))).read_text())
    assert test_summary["num_images"] == 3 and test_summary["n"] == 20
    # The finalist was certified from the test draws denoised into certify.final.draws_dir.
    assert Path(test_summary["stored_draws"]).parent == tmp_path / "test-draws"
    assert parent.data.tags["cadis.best_trial_id"] == winner.data.tags["cadis.trial_id"]
    assert parent.data.metrics["best.acr"] == winner.data.metrics["acr"]
    assert parent.data.metrics["best.val_acr"] == winner.data.metrics["val_acr"]
    results = tmp_path / "results"
    assert (results / "optuna.db").is_file() and (results / "sweep.yaml").is_file()
    # The draws were denoised once, before the trials, and their cost is on the parent.
    # (Beside each store, hidden, the lock its builders take turns by.)
    assert {path.name.split("-")[0] for path in (results / "draws").iterdir()
            if not path.name.startswith(".")} == {"rank", "proxy"}
    assert parent.data.metrics["draws.rank.denoiser_ms_per_draw"] > 0
    # A second run into the same results would mix two sweeps, and resuming with other
    # settings would make another sweep: refused, nothing touched.
    assert main(["sweep", str(path)]) == 2
    assert "already holds a sweep" in capsys.readouterr().err
    assert main(["sweep", str(path), "--resume", "--set", "num_trials=3"]) == 2
    assert "the sweep differs from the one in" in capsys.readouterr().err
    assert len(by_role(mlflow_runs(tmp_path)[1], "trial")) == 2


@pytest.mark.slow
def test_two_train_workers_certify_the_rank_stage_in_shards_and_time_the_trial(
        tiny_models_dir, tmp_path):
    # One trial on two Train workers: after the last epoch each certifies its half of the rank
    # stage's images in its own process, rank 0 joins the halves; the trial's slot is split
    # into phases on its run.
    sweep = tiny_sweep(tiny_models_dir, tmp_path, num_trials=1, max_concurrent_trials=1,
                       scheduler=None,
                       resources={"workers_per_trial": 2, "cpus_per_worker": 0.5})
    sweep["base"].update(epochs=1, max_steps_per_epoch=1, val_images=12)
    sweep["certify"]["race"] = {"enabled": False}
    assert main(["sweep", str(write(tmp_path, sweep)), "--stop-after", "rank"]) == 0
    from cadis.smoothing.records import RECORDS_FILENAME, read_records
    from cadis.sweeps.layout import TrainedTrial, trained_file, trial_rank_dir
    from cadis.sweeps.shards import shard_dirs

    _, runs = mlflow_runs(tmp_path)
    [trial] = by_role(runs, "trial")
    trial_id = trial.data.tags["cadis.trial_id"]
    results = tmp_path / "results"
    rank = trial_rank_dir(results, trial_id)
    halves = [[record.idx for record in read_records(folder / RECORDS_FILENAME)]
              for folder in shard_dirs(rank, 2)]
    joined = [record.idx for record in read_records(rank / RECORDS_FILENAME)]
    assert [len(half) for half in halves] == [3, 3] and joined == halves[0] + halves[1]
    assert trial.data.metrics["val_num_images"] == 6
    # The trained-trial file the final stage reads names the checkpoint the records name.
    assert TrainedTrial.read(trained_file(results, trial_id)).checkpoint == \
        json.loads((rank / "summary.json").read_text())["checkpoint"]
    metrics = trial.data.metrics
    phases = [f"phase.{name}" for name in ("start", "setup", "epochs", "proxy", "rank", "end")]
    assert all(metrics[name] >= 0 for name in phases) and metrics["phase.rank"] > 0
    slot = (trial.info.end_time - trial.info.start_time) / 1000
    compute = metrics["phase.epochs"] + metrics["phase.proxy"] + metrics["phase.rank"]
    assert metrics["orchestration_seconds"] == pytest.approx(slot - compute, abs=1.0)


@pytest.mark.slow
def test_final_seeds_retrain_and_certify_each_configuration_on_the_same_test_draws(
        tiny_models_dir, tmp_path, capsys):
    # The cheapest sweep with a final stage: one trial (the incumbent) of one 1-step epoch, no
    # ASHA, no race, two training seeds.
    sweep = tiny_sweep(tiny_models_dir, tmp_path, num_trials=1, max_concurrent_trials=1,
                       scheduler=None)
    sweep["base"].update(epochs=1, max_steps_per_epoch=1, val_images=12)
    sweep["certify"]["rank"].update(images=3)
    sweep["certify"]["race"] = {"enabled": False}
    sweep["certify"]["final"].update(top_k=1, draws_dir=str(tmp_path / "test-draws"), seeds=2)
    assert main(["sweep", str(write(tmp_path, sweep))]) == 0
    out = capsys.readouterr().out
    from cadis.smoothing.records import RECORDS_FILENAME, SETTINGS_FILENAME, read_records
    from cadis.sweeps.final_stage import seed_figures
    from cadis.sweeps.layout import SweepState

    _, runs = mlflow_runs(tmp_path)
    [trial] = by_role(runs, "trial")
    chosen = trial.data.tags["cadis.trial_id"]
    results = tmp_path / "results"
    # sweep.json names the chosen trial (benchmarks/science.sh reads it).
    assert SweepState.read(results).chosen_trial == chosen
    # certify.final.seeds 2: the configuration was also trained with the next training seed,
    # into a checkpoint of its own, and certified on the same images from the same test
    # draws as its first seed: paired.
    figures = seed_figures(results, [chosen])[chosen]
    assert list(figures["seeds"]) == [0, 1]
    folders = [Path(entry["folder"]) for entry in figures["seeds"].values()]
    made_with = [json.loads((folder / SETTINGS_FILENAME).read_text()) for folder in folders]
    assert made_with[0]["stored_draws"] == made_with[1]["stored_draws"]
    assert Path(made_with[0]["stored_draws"]).parent == tmp_path / "test-draws"
    assert made_with[0]["checkpoint"] != made_with[1]["checkpoint"]
    images = [[record.idx for record in read_records(folder / RECORDS_FILENAME)]
              for folder in folders]
    assert images[0] == images[1] and len(images[0]) == 3
    low, high = figures["range"]["acr"]
    assert low <= figures["mean"]["acr"] <= high
    # Its run holds each seed's figures and their spread; the summary says them.
    metrics = trial.data.metrics
    assert metrics["seed1.acr"] == figures["seeds"][1]["figures"]["acr"]
    assert (metrics["seeds_low.acr"], metrics["seeds_high.acr"]) == (low, high)
    assert f"test over 2 training seeds (3 images), acr: chosen {chosen} " in out


@pytest.mark.slow
def test_stop_after_rank_then_resume_certifies_the_finalists_on_test(tiny_models_dir,
                                                                     tmp_path, capsys):
    # This sweep also trains from stored draws, ranks and certifies the finalists
    # sequentially and has two objectives.
    sweep = tiny_sweep(tiny_models_dir, tmp_path, scheduler=None,
                       objective={"metric": ["acr", "certified_accuracy_r0.0"],
                                  "mode": ["max", "max"]})
    sweep["base"].update(train_draws=2, max_train_images=40)
    sweep["certify"]["rank"]["sequential"] = True
    sweep["certify"]["final"]["sequential"] = True
    path = write(tmp_path, sweep)
    assert main(["sweep", str(path), "--stop-after", "rank"]) == 0
    assert "rank stage done" in capsys.readouterr().out
    _, runs = mlflow_runs(tmp_path)
    [parent], trials = by_role(runs, "sweep"), by_role(runs, "trial")
    assert parent.info.status == "KILLED" and parent.data.tags["cadis.stage"] == "ranked"
    assert all("val_acr" in run.data.metrics and "acr" not in run.data.metrics
               for run in trials)
    assert all(5 < run.data.metrics["val_mean_draws"] <= 5 + 20 for run in trials)
    for rank in (tmp_path / "results" / "trials").glob("*/rank"):
        assert json.loads((rank / "summary.json").read_text())["mode"] == "sequential"
    results = tmp_path / "results"
    assert len(list((results / "draws").glob("train-*"))) == 1
    assert parent.data.metrics["draws.train.bytes"] == 40 * 2 * 64 * 4
    # The test set has not been touched.
    assert not list((tmp_path / "results" / "trials").glob("*/certify"))
    assert main(["sweep", str(path), "--resume"]) == 0
    out = capsys.readouterr().out
    client, runs = mlflow_runs(tmp_path)
    [parent], trials = by_role(runs, "sweep"), by_role(runs, "trial")
    assert parent.info.status == "FINISHED" and parent.data.tags["cadis.stage"] == "done"
    assert len(trials) == 2 and all("acr" in run.data.metrics for run in trials)
    for final in (results / "trials").glob("*/certify"):
        assert json.loads((final / "summary.json").read_text())["mode"] == "sequential"
    # The sweep ends with its figures, a Pareto front among them, on the parent run and in
    # the results folder, and a summary naming the chosen trial and where its files are.
    figures = {item.path for item in client.list_artifacts(parent.info.run_id, "figures")}
    assert {"figures/pareto_front.png", "figures/certified_accuracy.png",
            "figures/rungs.png"} <= figures
    assert (results / "figures" / "pareto_front.png").is_file()
    best = parent.data.tags["cadis.best_trial_id"]
    assert f"(trial {best}), first by validation acr" in out
    assert f"records: {results / 'trials' / best / 'certify' / 'records.tsv'}" in out
    assert "ui --backend-store-uri sqlite:///" in out and "--host 127.0.0.1" in out
    # A finished sweep resumed again prints its table and certifies nothing more.
    assert main(["sweep", str(path), "--resume"]) == 0
    assert "| trial" in capsys.readouterr().out
    # It can seed another sweep with the same searched keys; one with other keys is refused.
    again = write(tmp_path, tiny_sweep(tiny_models_dir, tmp_path, scheduler=None,
                                       results_dir=str(tmp_path / "again")))
    assert main(["sweep", str(again), "--dry-run", "--warm-start", str(results)]) == 0
    assert (f"warm start: 2 ranked trials of sweep run {parent.info.run_id}"
            in capsys.readouterr().out)
    other = tiny_sweep(tiny_models_dir, tmp_path, scheduler=None,
                       results_dir=str(tmp_path / "other"))
    other["search"] = {"lambda": {"uniform": [0.5, 2.0]}, "epsilon": {"uniform": [0.1, 0.3]}}
    assert main(["sweep", str(write(tmp_path, other)), "--dry-run", "--warm-start",
                 parent.info.run_id]) == 2
    assert ("the searched keys differ (only in the earlier sweep: confidence_threshold; only "
            "in this one: epsilon)") in capsys.readouterr().err


def test_resume_needs_a_sweep_to_resume(tiny_models_dir, tmp_path, capsys):
    path = write(tmp_path, tiny_sweep(tiny_models_dir, tmp_path))
    assert main(["sweep", str(path), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.soak
def test_resume_after_the_driver_is_killed_runs_no_trial_twice(tiny_models_dir, tmp_path):
    sweep = tiny_sweep(tiny_models_dir, tmp_path, num_trials=3, max_concurrent_trials=1,
                       scheduler=None)
    path = write(tmp_path, sweep)
    command = [sys.executable, "-m", "cadis", "sweep", str(path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Kill the driver (and the Ray it started) once the first trial has finished.
    kill_driver_when(command, tmp_path, lambda: (tmp_path / "mlflow.db").exists()
                     and _finished_trials(tmp_path) >= 1, poll_s=2.0)
    assert _finished_trials(tmp_path) < 3
    resumed = subprocess.run([*command, "--resume"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _, runs = mlflow_runs(tmp_path)
    trials = by_role(runs, "trial")
    trial_ids = [run.data.tags["cadis.trial_id"] for run in trials]
    assert len(trial_ids) == 3 == len(set(trial_ids))
    # The resumed sweep kept its incumbent: one trial, and only one, is tagged so.
    assert sum(run.data.tags.get("cadis.incumbent") == "true" for run in trials) == 1
    assert all(run.info.status == "FINISHED" for run in runs)
    assert all(run.data.tags["cadis.outcome"] == "completed" for run in trials)
    state = json.loads((tmp_path / "results" / "sweep.json").read_text())
    assert [run.info.run_id for run in by_role(runs, "sweep")] == [state["parent_run_id"]]


def kill_driver_when(command: list[str], cwd: Path, ready, poll_s: float,
                     timeout_s: float = 300.0) -> None:
    """Start a sweep driver in a session of its own and SIGKILL it, with the Ray it started,
    once ``ready()``; fails if the driver ends first, with the end of what it printed."""
    # A file, not a pipe: nobody reads the driver's output while it runs, and Ray's logs
    # would fill a pipe and block it.
    log_path = cwd / "killed-driver.log"
    with open(log_path, "w") as log:
        driver = subprocess.Popen(command, cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                  start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and driver.poll() is None and not ready():
            time.sleep(poll_s)
        assert driver.poll() is None, (
            f"the sweep ended (status {driver.returncode}) before it could be interrupted:\n"
            + log_path.read_text()[-3000:])
    finally:
        # The group may be gone already (a driver that ended, and Ray with it).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()


def _finished_trials(tmp_path: Path) -> int:
    try:
        _, runs = mlflow_runs(tmp_path)
    except Exception:  # the store is being created by the driver
        return 0
    return sum(run.info.status == "FINISHED" for run in by_role(runs, "trial"))
