"""Faults inside a sweep: a trial that fails is named with its reason, in MLflow and in the
driver's last lines, while the other trials go on; a driver killed while building its stores
resumes, and one killed in the rank, the racing or the final stage resumes without certifying
an image twice (end to end: a real local Ray, Tune + Train, and an MLflow store); how the
reason is read from Tune's error text."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cadis.cli import main
from cadis.smoothing.records import RECORDS_FILENAME
from cadis.sweeps.layout import (
    TUNE_NAME,
    race_file,
    race_finalists,
    trial_failure_file,
    trial_race_block_dir,
)
from cadis.sweeps.trial_callback import MAX_REASON_CHARS, NO_ERROR_TEXT, failure_reason
from tests.test_sweep import by_role, kill_driver_when, mlflow_runs, tiny_sweep, write

# Tune's error text of a trial whose Train worker raised, as Ray 2.60 writes it (two attempts,
# terminal colours, the worker's traceback inside the wrapper's message); shortened.
RAY_ERROR_TEXT = """\
Failure # 1 (occurred at 2026-12-02_08-12-21)
\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=1, ip=10.0.0.1, repr=run_trial)
  File "/venv/ray/tune/trainable/function_trainable.py", line 249, in _trainable_func
    output = fn()
  File "/repo/cadis/sweeps/trial.py", line 69, in run_trial
    result = trainer.fit()
ray.train.WorkerGroupError: Training failed due to worker errors:
[Rank 0 Error Snippet]:
\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=1, ip=10.0.0.1, repr=run_trial)
  File "/repo/cadis/finetuning/loop.py", line 79, in check_finite_loss
    raise NonFiniteLoss(f"epoch {epoch}, step {step}: the loss is {logged['loss']} ("
cadis.finetuning.loop.NonFiniteLoss: epoch 1, step 2: the loss is inf (first attempt)
Failure # 2 (occurred at 2026-12-02_08-12-58)
\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=2, ip=10.0.0.1, repr=run_trial)
  File "/repo/cadis/sweeps/trial.py", line 69, in run_trial
    result = trainer.fit()
ray.train.WorkerGroupError: Training failed due to worker errors:
[Rank 0 Error Snippet]:
  File "/repo/cadis/finetuning/loop.py", line 79, in check_finite_loss
    raise NonFiniteLoss(f"epoch {epoch}, step {step}: the loss is {logged['loss']} ("
cadis.finetuning.loop.NonFiniteLoss: epoch 1, step 2: the loss is nan (SCE = nan)
"""


@pytest.mark.parametrize("text, reason", [
    (RAY_ERROR_TEXT, "NonFiniteLoss: epoch 1, step 2: the loss is nan (SCE = nan)"),
    ("Failure # 1 (occurred at t)\nray::ImplicitFunc.train()\n  File \"x.py\", line 3, in f\n"
     "    raise RuntimeError('no checkpoint')\nRuntimeError: trial 1: no checkpoint\n",
     "RuntimeError: trial 1: no checkpoint"),
    ("Failure # 1 (occurred at t)\nTraceback (most recent call last):\n  File \"x.py\", "
     "line 3, in f\nKeyboardInterrupt\n", "KeyboardInterrupt"),
    ("Failure # 1 (occurred at t)\nthe worker died unexpectedly\nand said nothing\n",
     "the worker died unexpectedly"),
    ("", NO_ERROR_TEXT),
    # A retry refused because the first attempt's failure would repeat: its reason.
    (RAY_ERROR_TEXT + "Failure # 3 (occurred at t)\n  File \"/repo/cadis/sweeps/trial.py\", "
     "line 65, in run_trial\ncadis.errors.RepeatedFailure: NonFiniteLoss: epoch 1, step 2: "
     "the loss is nan (SCE = nan)\n",
     "NonFiniteLoss: epoch 1, step 2: the loss is nan (SCE = nan)"),
])
def test_a_failures_reason_is_the_last_attempts_innermost_exception_in_one_line(text, reason):
    assert failure_reason(text) == reason


def test_a_long_reason_is_cut():
    reason = failure_reason("ValueError: " + "x" * 5000)
    assert len(reason) == MAX_REASON_CHARS and reason.startswith("ValueError: xx")
    assert reason.endswith("...")


@pytest.mark.slow
def test_a_trial_whose_loss_goes_non_finite_fails_with_its_reason_and_the_others_go_on(
        tiny_models_dir, tmp_path, capsys):
    # lr 1e30 makes the first step's weights enormous, so the second step's loss is nan
    # (tests/test_loop.py shows it with these models); lr 1e-3 trains as usual. A NonFiniteLoss
    # would only repeat: Train does not restart the workers, and Tune's retry of the trial
    # ends at once with the same reason, training nothing.
    # Each trial denoises its own draws (no task building shared ones first: a shorter test).
    sweep = tiny_sweep(tiny_models_dir, tmp_path, scheduler=None, num_trials=1,
                       store_draws=False, search={"lr": {"grid": [1.0e-3, 1.0e30]}})
    sweep["base"]["epochs"] = 1
    path = write(tmp_path, sweep)
    assert main(["sweep", str(path)]) == 0
    out, err = capsys.readouterr()
    client, runs = mlflow_runs(tmp_path)
    [parent], trials = by_role(runs, "sweep"), by_role(runs, "trial")
    assert parent.info.status == "FINISHED" and parent.data.tags["cadis.stage"] == "done"
    assert not [run for run in runs if run.info.status == "RUNNING"]
    [failed] = [run for run in trials if run.data.params["lr"] == "1e+30"]
    [good] = [run for run in trials if run.data.params["lr"] == "0.001"]
    # The failed trial's run says why, in one line, and keeps the whole error text.
    assert failed.info.status == "FAILED" and failed.data.tags["cadis.outcome"] == "failed"
    reason = failed.data.tags["cadis.failure"]
    assert reason.startswith("NonFiniteLoss: epoch 1, step 2: the loss is nan (")
    assert "\n" not in reason
    assert "error.txt" in {item.path for item in client.list_artifacts(failed.info.run_id)}
    # It is set after Tune's last attempt: the text holds both, without terminal colours; the
    # second is the refused retry, which read the first's reason from the trial's folder.
    text = Path(client.download_artifacts(failed.info.run_id, "error.txt",
                                          str(tmp_path))).read_text()
    first, second = text.split("Failure # 2")
    assert "NonFiniteLoss: epoch 1, step 2" in first and "\x1b[" not in text
    assert f"RepeatedFailure: {reason}" in second and "trainer.fit()" not in second
    trial_id = failed.data.tags["cadis.trial_id"]
    assert trial_failure_file(tmp_path / "results", trial_id).read_text() == f"{reason}\n"
    # Tune's own table of the trials says the same: that trial errored, with this reason.
    from ray import tune

    from cadis.sweeps.trial import run_trial

    import ray

    # Restoring a Tuner starts a Ray of its own when none runs: one that must not outlive
    # this test (a later test's ray.init would find it, without the dashboard it needs).
    try:
        grid = tune.Tuner.restore(str(tmp_path / "results" / TUNE_NAME),
                                  trainable=run_trial).get_results()
    finally:
        ray.shutdown()
    [error] = [result.error for result in grid if result.error is not None]
    assert reason in str(error)
    # The other trial went on: it completed, ranked, and was certified on the test set.
    assert good.info.status == "FINISHED" and good.data.tags["cadis.outcome"] == "completed"
    assert "val_acr" in good.data.metrics and "acr" in good.data.metrics
    assert good.data.tags["cadis.finalist"] == "true"
    assert parent.data.tags["cadis.best_trial_id"] == good.data.tags["cadis.trial_id"]
    assert "val_acr" not in failed.data.metrics and "acr" not in failed.data.metrics
    # The driver names the failed trial and its reason.
    assert "1 trial(s) failed; their errors are in" in err
    assert f"  {failed.info.run_name}: {reason}\n" in err
    assert f"| {failed.info.run_name} | failed |" in out  # the closing table
    assert f"(trial {good.data.tags['cadis.trial_id']}), first by validation" in out
    # So does the closing summary, after the chosen trial.
    assert f"1 trial(s) failed (error.txt on their MLflow runs):\n  {failed.info.run_name}: " \
           f"{reason}\n" in out


@pytest.mark.slow
@pytest.mark.soak
def test_a_driver_killed_building_its_stores_or_in_the_final_stage_resumes_without_redoing(
        tiny_models_dir, tmp_path):
    # The rank stage (in this process), then the final stage in a driver of its own,
    # SIGKILLed (with the Ray it started) once a finalist has certified test images. A final
    # certification long enough to be caught midway (about 12 s here): 40 images at n = 2,000.
    sweep = tiny_sweep(tiny_models_dir, tmp_path, scheduler=None)
    sweep["certify"]["final"].update(n=2000, n0=20, max_images=40)
    path = write(tmp_path, sweep)
    results = tmp_path / "results"
    # First a driver killed as it begins to build its stores (sweep.json is written just
    # before): there is no Tune experiment yet, and --resume starts the search.
    command = [sys.executable, "-m", "cadis", "sweep", str(path)]
    kill_driver_when(command, tmp_path, lambda: (results / "sweep.json").exists(), poll_s=0.05)
    assert not (results / TUNE_NAME).exists()
    assert main(["sweep", str(path), "--resume", "--stop-after", "rank"]) == 0
    kill_driver_when([*command, "--resume"], tmp_path,
                     lambda: any(len(_lines(records)) >= 3 for records in
                                 results.glob(f"trials/*/certify/{RECORDS_FILENAME}")),
                     poll_s=0.2)
    # Whole lines written before the kill (the last may be cut short: the runner cuts it).
    before = {records.parent.parent.name: _lines(records)[:-1]
              for records in results.glob(f"trials/*/certify/{RECORDS_FILENAME}")}
    assert any(len(lines) >= 2 for lines in before.values())
    assert main(["sweep", str(path), "--resume"]) == 0
    _, runs = mlflow_runs(tmp_path)
    [parent], trials = by_role(runs, "sweep"), by_role(runs, "trial")
    assert parent.info.status == "FINISHED" and parent.data.tags["cadis.stage"] == "done"
    assert len({run.data.tags["cadis.trial_id"] for run in trials}) == len(trials) == 2
    assert all(run.info.status == "FINISHED" and "acr" in run.data.metrics for run in trials)
    for trial_id, lines in before.items():
        after = _lines(results / "trials" / trial_id / "certify" / RECORDS_FILENAME)
        # Every image certified before the kill kept its record, seconds and all: none was
        # certified again; the rest were added after them.
        assert after[:len(lines)] == lines and len(after) == 1 + 40


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True) if path.is_file() else []


@pytest.mark.slow
@pytest.mark.soak
def test_a_driver_killed_in_the_rank_stage_resumes_without_redoing_certified_images(
        tiny_models_dir, tmp_path):
    # One trial; its rank stage denoises its own draws (no store) for 40 validation images at
    # n = 2,000: long enough to be caught midway. Killed there, the resumed sweep keeps every
    # validation record written before the kill.
    sweep = tiny_sweep(tiny_models_dir, tmp_path, scheduler=None, num_trials=1,
                       store_draws=False)
    sweep["base"]["val_images"] = 40
    sweep["certify"]["rank"].update(n=2000, n0=20, images=40)
    sweep["certify"]["final"]["top_k"] = 1
    path = write(tmp_path, sweep)
    results = tmp_path / "results"
    kill_driver_when([sys.executable, "-m", "cadis", "sweep", str(path)], tmp_path,
                     lambda: any(len(_lines(records)) >= 3 for records in
                                 results.glob(f"trials/*/rank/{RECORDS_FILENAME}")),
                     poll_s=0.2)
    [records] = results.glob(f"trials/*/rank/{RECORDS_FILENAME}")
    before = _lines(records)[:-1]
    assert len(before) >= 2
    assert main(["sweep", str(path), "--resume"]) == 0
    _, runs = mlflow_runs(tmp_path)
    [parent], [trial] = by_role(runs, "sweep"), by_role(runs, "trial")
    assert parent.info.status == "FINISHED" and trial.info.status == "FINISHED"
    assert trial.data.metrics["val_num_images"] == 40 and "acr" in trial.data.metrics
    after = _lines(records)
    assert after[:len(before)] == before and len(after) == 1 + 40


@pytest.mark.slow
@pytest.mark.soak
def test_a_driver_killed_while_the_race_certifies_a_block_resumes_without_redoing_it(
        tiny_models_dir, tmp_path):
    # Two trials ranked on 6 validation images (nothing separates the tiny models there), then
    # raced on one further block of 40, denoised live at n = 2,000: long enough to be caught
    # midway. Killed there, the resumed sweep keeps every block record written before the kill,
    # certifies the rest once and takes its finalists from the race.
    sweep = tiny_sweep(tiny_models_dir, tmp_path, scheduler=None, store_draws=False)
    sweep["base"]["val_images"] = 46
    sweep["certify"]["rank"].update(n=2000, n0=20, images=6)
    sweep["certify"]["race"] = {"block": 40, "max_images": 46}
    path = write(tmp_path, sweep)
    results = tmp_path / "results"
    block = f"trials/*/race/block-1/{RECORDS_FILENAME}"
    kill_driver_when([sys.executable, "-m", "cadis", "sweep", str(path)], tmp_path,
                     lambda: any(len(_lines(records)) >= 3 for records in results.glob(block)),
                     poll_s=0.2)
    assert not race_file(results).exists()
    before = {records.parent.parent.parent.name: _lines(records)[:-1]
              for records in results.glob(block)}
    assert any(len(lines) >= 2 for lines in before.values())
    assert main(["sweep", str(path), "--resume"]) == 0
    _, runs = mlflow_runs(tmp_path)
    [parent], trials = by_role(runs, "sweep"), by_role(runs, "trial")
    assert parent.info.status == "FINISHED" and parent.data.tags["cadis.stage"] == "done"
    finalists = race_finalists(results)
    assert finalists and parent.data.tags["cadis.best_trial_id"] == finalists[0]
    raced = {records.parent.parent.parent.name for records in results.glob(block)}
    assert set(before) <= raced
    assert parent.data.metrics["race.images_certified"] == 40 * len(raced)
    for trial_id, lines in before.items():
        after = _lines(trial_race_block_dir(results, trial_id, 1) / RECORDS_FILENAME)
        # Every image certified before the kill kept its record, seconds and all; none was
        # certified again; the rest were added after them.
        assert after[:len(lines)] == lines and len(after) == 1 + 40
        assert len({line.split("\t")[0] for line in after}) == len(after)
    assert all(run.data.metrics["race_images"] == 46 for run in trials
               if run.data.tags["cadis.trial_id"] in raced)
