"""The driver's stage machine in seconds: no Ray, a fake work for each stage, the sweep's own
MLflow writer on a SQLite store. The stages run in order, each saved in sweep.json before its
work begins; an interrupted sweep is resumable and its resume skips the stages it finished;
``--stop-after rank`` stops after the search and its resume runs only the final stage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cadis.errors import CadisError
from cadis.sweeps.driver import StageWork, _run_stages
from cadis.sweeps.layout import STATE_FILE, SweepState
from cadis.sweeps.parse import sweep_from_mapping
from cadis.sweeps.resume import check_results_dir, sweep_fingerprint
from cadis.sweeps.spec import SweepConfig
from cadis.tracking import contract as tracking

TRIAL = "trial_0"
# What the store build returns, by role: the machine saves it and hands the folders on.
STORES = {"rank": {"folder": "/draws/rank-1", "build_seconds": 2.0, "bytes": 1024.0},
          "proxy": {"folder": "/draws/proxy-1", "build_seconds": 1.0, "bytes": 512.0}}
FOLDERS = {"rank": "/draws/rank-1", "proxy": "/draws/proxy-1"}
# The test figures the fake final stage logs on its finalist.
FINAL = {"acr": 0.5, tracking.certified_accuracy_metric(0.0): 0.75, "num_images": 4.0}


class FakeStages:
    """Each stage's work, recording what it was called with and what sweep.json held then;
    ``interrupt`` names the stage that is interrupted (as Ctrl-C would) once it has begun."""

    def __init__(self, results: Path, interrupt: str | None = None) -> None:
        self.results = results
        self.interrupt = interrupt
        # (work, the stage sweep.json held, the stored draws it held)
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.searched: list[tuple[dict[str, str], bool]] = []

    def _begin(self, work: str) -> None:
        state = SweepState.read(self.results)
        self.calls.append((work, state.stage, state.draw_stores))
        if work == self.interrupt:
            raise KeyboardInterrupt

    def build_stores(self) -> dict[str, dict[str, Any]]:
        self._begin("build_stores")
        return STORES

    def search(self, tracker: Any, folders: dict[str, str], resumed: bool) -> None:
        """One trial, ranked on validation, as the trial callback would write it."""
        from mlflow.tracking import MlflowClient

        self.searched.append((dict(folders), resumed))
        self._begin("search")
        client = MlflowClient(tracker.uri)
        run = client.create_run(tracker.experiment_id, run_name=TRIAL,
                                tags={tracking.PARENT_RUN_TAG: tracker.parent_run_id,
                                      tracking.ROLE_TAG: tracking.ROLE_TRIAL,
                                      tracking.TRIAL_ID_TAG: TRIAL})
        client.log_metric(run.info.run_id, tracking.validation_metric("acr"), 0.4)
        client.set_terminated(run.info.run_id, "FINISHED")

    def final(self, tracker: Any) -> str | None:
        self._begin("final")
        tracker.log_final(TRIAL, FINAL, self.results / "no-certify-files")
        return TRIAL

    def work(self) -> StageWork:
        return StageWork(build_stores=self.build_stores, search=self.search, final=self.final)


@pytest.fixture
def sweep(tmp_path) -> SweepConfig:
    return sweep_from_mapping({
        "name": "staged", "search": {"lambda": {"uniform": [0.5, 8]}}, "num_trials": 1,
        "objective": {"metric": "acr", "mode": "max"},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                   "experiment": "staged"},
        "results_dir": str(tmp_path / "results")})


def run(sweep: SweepConfig, tmp_path: Path, fake: FakeStages, resume: bool = False,
        stop_after: str | None = None) -> None:
    """The driver's path from its checked results folder to the stage machine, without Ray."""
    results = Path(sweep.results_dir)
    results.mkdir(exist_ok=True)
    path = tmp_path / "sweep.yaml"
    path.write_text("name: staged\n")
    fingerprint = sweep_fingerprint(sweep)
    state = check_results_dir(results, fingerprint, resume)
    _run_stages(sweep, path, results, sweep.tracking_uri(), fingerprint, state, stop_after,
                None, fake.work())


def parent_run(sweep: SweepConfig) -> Any:
    from mlflow.tracking import MlflowClient

    state = SweepState.read(sweep.results_dir)
    return MlflowClient(sweep.tracking_uri()).get_run(state.parent_run_id)


def test_the_stages_run_in_order_each_saved_before_its_work(sweep, tmp_path):
    assert sweep.shares_draws
    fake = FakeStages(Path(sweep.results_dir))
    run(sweep, tmp_path, fake)
    assert fake.calls == [("build_stores", "search", {}), ("search", "search", STORES),
                          ("final", "final", STORES)]
    assert fake.searched == [(FOLDERS, False)]
    state = SweepState.read(sweep.results_dir)
    assert (state.stage, state.draw_stores, state.sweep) == ("done", STORES,
                                                             sweep_fingerprint(sweep))
    parent = parent_run(sweep)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[tracking.STAGE_TAG] == "done"
    assert parent.data.tags[tracking.BEST_TRIAL_TAG] == TRIAL
    assert parent.data.metrics["draws.rank.build_seconds"] == 2.0
    # The file keeps the names --resume of a sweep already on disk reads.
    saved = json.loads((Path(sweep.results_dir) / STATE_FILE).read_text())
    assert list(saved) == ["parent_run_id", "experiment_id", "tracking_uri", "sweep", "stage",
                           "stores", "warm_start"]


def test_a_sweep_interrupted_in_its_final_stage_resumes_there(sweep, tmp_path):
    results = Path(sweep.results_dir)
    with pytest.raises(CadisError, match="sweep interrupted; continue it with: cadis sweep "
                                         r"\.\.\. --resume"):
        run(sweep, tmp_path, FakeStages(results, interrupt="final"))
    assert SweepState.read(results).stage == "final"
    assert parent_run(sweep).info.status == "KILLED"
    resumed = FakeStages(results)
    run(sweep, tmp_path, resumed, resume=True)
    assert resumed.calls == [("final", "final", STORES)]
    assert SweepState.read(results).stage == "done"
    assert parent_run(sweep).info.status == "FINISHED"


def test_a_search_interrupted_after_its_stores_resumes_without_building_them(sweep, tmp_path):
    results = Path(sweep.results_dir)
    with pytest.raises(CadisError, match="sweep interrupted"):
        run(sweep, tmp_path, FakeStages(results, interrupt="search"))
    resumed = FakeStages(results)
    run(sweep, tmp_path, resumed, resume=True)
    assert [call[0] for call in resumed.calls] == ["search", "final"]
    assert resumed.searched == [(FOLDERS, True)]


def test_stop_after_rank_leaves_the_final_stage_to_a_resume(sweep, tmp_path, capsys):
    results = Path(sweep.results_dir)
    ranked = FakeStages(results)
    run(sweep, tmp_path, ranked, stop_after="rank")
    assert [call[0] for call in ranked.calls] == ["build_stores", "search"]
    assert SweepState.read(results).stage == "ranked"
    assert parent_run(sweep).data.tags[tracking.STAGE_TAG] == "ranked"
    assert "rank stage done: certify the top" in capsys.readouterr().out
    final = FakeStages(results)
    run(sweep, tmp_path, final, resume=True)
    assert final.calls == [("final", "final", STORES)]
    # A finished sweep resumed again runs nothing: it prints its comparison.
    capsys.readouterr()
    again = FakeStages(results)
    run(sweep, tmp_path, again, resume=True)
    assert again.calls == [] and TRIAL in capsys.readouterr().out
