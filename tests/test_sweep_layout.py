"""The records a sweep keeps in its results folder, read back typed: sweep.json (where the
sweep stands) and trained.json (what the final stage certifies), written and read with the
keys sweeps already on disk have, and a one-line error for a file missing or broken."""

from __future__ import annotations

import dataclasses
import json

import pytest

from cadis.errors import CadisError
from cadis.sweeps.layout import (
    STATE_FILE,
    SweepState,
    TrainedTrial,
    sweep_origin,
    trained_file,
)

# A sweep.json as the driver wrote it before the typed reader (and --resume reads still).
ON_DISK = {"parent_run_id": "p1", "experiment_id": "3", "tracking_uri": "sqlite:///m.db",
           "sweep": {"name": "s", "base": {"lr": 0.001}}, "stage": "ranked",
           "stores": {"rank": {"folder": "/d/rank-1", "build_seconds": 2.0}},
           "warm_start": None}


def test_the_sweep_state_reads_and_writes_the_keys_on_disk(tmp_path):
    (tmp_path / STATE_FILE).write_text(json.dumps(ON_DISK, indent=2) + "\n")
    state = SweepState.read(tmp_path)
    assert state.draw_stores == ON_DISK["stores"] and state.stage == "ranked"
    assert state.store_folders() == {"rank": "/d/rank-1"}
    assert sweep_origin(tmp_path) == ("p1", "sqlite:///m.db")
    (tmp_path / STATE_FILE).unlink()
    state.write(tmp_path)
    assert (tmp_path / STATE_FILE).read_text() == json.dumps(ON_DISK, indent=2) + "\n"


def test_a_state_written_before_warm_starts_reads_as_a_cold_start(tmp_path):
    (tmp_path / STATE_FILE).write_text(json.dumps(
        {key: value for key, value in ON_DISK.items() if key != "warm_start"}))
    assert SweepState.read(tmp_path).warm_start is None


def test_the_chosen_trial_is_written_once_chosen_and_old_states_read_none(tmp_path):
    (tmp_path / STATE_FILE).write_text(json.dumps(ON_DISK))
    state = SweepState.read(tmp_path)
    assert state.chosen_trial is None
    state.write(tmp_path)
    assert "chosen_trial" not in json.loads((tmp_path / STATE_FILE).read_text())
    dataclasses.replace(state, stage="done", chosen_trial="a1b2").write(tmp_path)
    assert json.loads((tmp_path / STATE_FILE).read_text())["chosen_trial"] == "a1b2"
    assert SweepState.read(tmp_path).chosen_trial == "a1b2"


@pytest.mark.parametrize("text,message", [
    (None, "sweep.json does not exist: no sweep's state there"),
    ("{", "sweep.json is not a readable sweep's state (JSONDecodeError: "),
    ("[]", "sweep.json is not a sweep's state (it lacks parent_run_id, "),
    (json.dumps({"parent_run_id": "p1"}), "(it lacks experiment_id, tracking_uri, sweep, "
                                          "stage, stores)"),
])
def test_a_missing_or_broken_state_is_one_line(tmp_path, text, message):
    if text is not None:
        (tmp_path / STATE_FILE).write_text(text)
    with pytest.raises(CadisError, match=message.replace("(", r"\(").replace(")", r"\)")) \
            as refused:
        SweepState.read(tmp_path)
    assert "\n" not in str(refused.value)


def test_a_trained_trial_round_trips_and_a_broken_one_is_one_line(tmp_path):
    path = trained_file(tmp_path, "trial_0")
    TrainedTrial("/ckpt/epoch_002", {"lambda": 2.0}).write(path)
    assert json.loads(path.read_text()) == {"checkpoint": "/ckpt/epoch_002",
                                            "config": {"lambda": 2.0}}
    assert TrainedTrial.read(path) == TrainedTrial("/ckpt/epoch_002", {"lambda": 2.0})
    path.write_text(json.dumps({"checkpoint": "/ckpt"}))
    with pytest.raises(CadisError, match=r"trained.json is not a trained trial \(it lacks "
                                         r"config\)"):
        TrainedTrial.read(path)
    with pytest.raises(CadisError, match="does not exist: no trained trial there"):
        TrainedTrial.read(trained_file(tmp_path, "trial_1"))
