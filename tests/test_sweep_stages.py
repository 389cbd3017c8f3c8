"""The driver's stage machine in seconds: no Ray, a fake work for each stage, the sweep's own
MLflow writer on a SQLite store. The stages run in order, each saved in sweep.json before its
work begins; an interrupted sweep is resumable and its resume skips the stages it finished;
``--stop-after rank`` stops after the search and its resume runs the racing and final stages."""

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

    def race(self, tracker: Any) -> None:
        self._begin("race")

    def final(self, tracker: Any) -> str | None:
        self._begin("final")
        tracker.log_final(TRIAL, FINAL, self.results / "no-certify-files", finalist=True)
        return TRIAL

    def work(self) -> StageWork:
        return StageWork(build_stores=self.build_stores, search=self.search, race=self.race,
                         final=self.final)


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
                          ("race", "racing", STORES), ("final", "final", STORES)]
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
                           "stores", "warm_start", "chosen_trial"]
    # The chosen trial is the sweep's own record of it (benchmarks/science.sh reads it).
    assert saved["chosen_trial"] == state.chosen_trial == TRIAL


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
    assert [call[0] for call in resumed.calls] == ["search", "race", "final"]
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
    assert final.calls == [("race", "racing", STORES), ("final", "final", STORES)]
    # A finished sweep resumed again runs nothing: it prints its comparison.
    capsys.readouterr()
    again = FakeStages(results)
    run(sweep, tmp_path, again, resume=True)
    assert again.calls == [] and TRIAL in capsys.readouterr().out


def test_a_sweep_interrupted_in_its_racing_stage_resumes_there(sweep, tmp_path):
    results = Path(sweep.results_dir)
    with pytest.raises(CadisError, match="sweep interrupted"):
        run(sweep, tmp_path, FakeStages(results, interrupt="race"))
    assert SweepState.read(results).stage == "racing"
    assert parent_run(sweep).data.tags[tracking.STAGE_TAG] == "racing"
    resumed = FakeStages(results)
    run(sweep, tmp_path, resumed, resume=True)
    assert resumed.calls == [("race", "racing", STORES), ("final", "final", STORES)]
    assert SweepState.read(results).stage == "done"


# --------------------------------------------------------------------------- the choice

# Judged trials: how many of the 200 validation and test images each certifies (at radius
# 0.75, so its ACR is 0.75 x that / 200). The leader and "close" differ on 2 images, the
# incumbent is 50 behind on validation and level on test.
JUDGED = {"leader": (150, 150), "close": (148, None), "incumbent": (100, 150)}
JUDGED_IMAGES = 200


def judged_records(certified: int) -> list[Any]:
    from cadis.smoothing.records import Record

    return [Record.from_prediction(idx, idx % 10, idx % 10 if idx < certified else -1,
                                   0.75 if idx < certified else 0.0, 0.01)
            for idx in range(JUDGED_IMAGES)]


class JudgedStages(FakeStages):
    """Three trials ranked on validation from rank records on disk (the incumbent among them,
    tagged as such); the final stage certifies the leader and the incumbent on test."""

    def search(self, tracker: Any, folders: dict[str, str], resumed: bool) -> None:
        from mlflow.tracking import MlflowClient

        from cadis.smoothing.records import RECORDS_FILENAME, write_records
        from cadis.sweeps.layout import trial_rank_dir

        self.searched.append((dict(folders), resumed))
        self._begin("search")
        client = MlflowClient(tracker.uri)
        for trial, (certified, _) in JUDGED.items():
            tags = {tracking.PARENT_RUN_TAG: tracker.parent_run_id,
                    tracking.ROLE_TAG: tracking.ROLE_TRIAL, tracking.TRIAL_ID_TAG: trial}
            if trial == "incumbent":
                tags[tracking.INCUMBENT_TAG] = "true"
            run = client.create_run(tracker.experiment_id, run_name=trial, tags=tags)
            client.log_metric(run.info.run_id, tracking.validation_metric("acr"),
                              0.75 * certified / JUDGED_IMAGES)
            client.set_terminated(run.info.run_id, "FINISHED")
            out = trial_rank_dir(self.results, trial)
            out.mkdir(parents=True)
            write_records(out / RECORDS_FILENAME, judged_records(certified))

    def final(self, tracker: Any) -> str | None:
        from cadis.smoothing.records import RECORDS_FILENAME, write_records
        from cadis.sweeps.layout import trial_certify_dir

        self._begin("final")
        for trial, (_, certified) in JUDGED.items():
            if certified is None:
                continue
            out = trial_certify_dir(self.results, trial)
            out.mkdir(parents=True, exist_ok=True)
            write_records(out / RECORDS_FILENAME, judged_records(certified))
            tracker.log_final(trial, {"acr": 0.75 * certified / JUDGED_IMAGES,
                                      "num_images": float(JUDGED_IMAGES)}, out,
                              finalist=trial == "leader")
        return "leader"


def trial_run(sweep: SweepConfig, trial: str) -> Any:
    from mlflow.tracking import MlflowClient

    from cadis.tracking.sweep_reader import find_trial_run

    state = SweepState.read(sweep.results_dir)
    return find_trial_run(MlflowClient(sweep.tracking_uri()), state.experiment_id,
                          state.parent_run_id, trial)


def trial_metrics(sweep: SweepConfig, trial: str) -> dict[str, float]:
    return trial_run(sweep, trial).data.metrics


def verdict(metrics: dict[str, float], comparison: str, validation: bool) -> dict[str, float]:
    return {field: metrics[tracking.verdict_metric(comparison, "acr", field, validation)]
            for field in tracking.VERDICT_FIELDS}


def test_the_choice_is_judged_on_validation_and_test_in_mlflow_and_in_words(sweep, tmp_path,
                                                                           capsys):
    from mlflow.tracking import MlflowClient

    run(sweep, tmp_path, JudgedStages(Path(sweep.results_dir)))
    out = capsys.readouterr().out
    # The ranking's choice stands; what is said of it is the verdicts'.
    assert parent_run(sweep).data.tags[tracking.BEST_TRIAL_TAG] == "leader"
    # Both were certified on test; only the finalist is tagged one.
    assert trial_run(sweep, "leader").data.tags[tracking.FINALIST_TAG] == "true"
    assert tracking.FINALIST_TAG not in trial_run(sweep, "incumbent").data.tags
    close = verdict(trial_metrics(sweep, "close"), tracking.VS_LEADER, validation=True)
    assert close["difference"] == pytest.approx(-0.75 * 2 / JUDGED_IMAGES)
    assert close["low"] <= 0 <= close["high"] and close["separated"] == 0.0
    assert close["images"] == JUDGED_IMAGES and close["p"] <= close["p_holm"]
    incumbent = trial_metrics(sweep, "incumbent")
    assert verdict(incumbent, tracking.VS_LEADER, validation=True)["separated"] == 1.0
    on_test = verdict(incumbent, tracking.VS_LEADER, validation=False)
    assert on_test["difference"] == 0.0 and on_test["separated"] == 0.0
    # The close trial was not certified on test: it has no test verdict.
    assert tracking.verdict_metric(tracking.VS_LEADER, "acr", "difference", False) \
        not in trial_metrics(sweep, "close")
    parent = parent_run(sweep).data.metrics
    ahead = verdict(parent, tracking.CHOSEN_VS_INCUMBENT, validation=True)
    assert ahead["difference"] == pytest.approx(0.75 * 50 / JUDGED_IMAGES)
    assert 0 < ahead["low"] <= ahead["high"]
    assert verdict(parent, tracking.CHOSEN_VS_INCUMBENT, validation=False)["difference"] == 0.0
    state = SweepState.read(sweep.results_dir)
    text = MlflowClient(sweep.tracking_uri()).download_artifacts(
        state.parent_run_id, tracking.CHOICE_ARTIFACT, str(tmp_path))
    choice = Path(text).read_text()
    assert f"## on validation ({JUDGED_IMAGES} images), acr" in choice
    assert f"## on test ({JUDGED_IMAGES} images), acr" in choice
    # The summary: ahead of the incumbent on validation, never "best" where it is not.
    assert (f"  on validation ({JUDGED_IMAGES} images), acr: chosen leader: ahead of the "
            f"incumbent by +0.188 [") in out
    assert "inseparable from close (-0.007 [" in out
    assert (f"  on test ({JUDGED_IMAGES} images), acr: chosen leader: inseparable from the "
            f"incumbent (+0.000 [") in out
    assert "chosen among them by the higher validation figure, then the earlier trial" in out


def test_stop_after_rank_says_the_validation_verdicts(sweep, tmp_path, capsys):
    run(sweep, tmp_path, JudgedStages(Path(sweep.results_dir)), stop_after="rank")
    out = capsys.readouterr().out
    assert "on validation (200 images), acr: chosen leader: ahead of the incumbent" in out
    assert "on test" not in out
    assert tracking.verdict_metric(tracking.CHOSEN_VS_INCUMBENT, "acr", "difference", True) \
        in parent_run(sweep).data.metrics


class SeededStages(JudgedStages):
    """JudgedStages whose final stage also certified the leader and the incumbent with a
    second training seed (certify.final.seeds 2): seed 1's records beside each one's own."""

    # (own, seed 1) images certified at r = 0 by each configuration on test.
    SEEDS = {"leader": (150, 150), "incumbent": (150, 100)}

    def final(self, tracker: Any) -> str | None:
        from cadis.smoothing.records import RECORDS_FILENAME, write_records
        from cadis.sweeps.layout import (
            CERTIFY_DIR,
            TrainedTrial,
            trained_file,
            trial_certify_dir,
            trial_seed_folder,
        )

        chosen = super().final(tracker)
        for trial, counts in self.SEEDS.items():
            TrainedTrial("ckpt", {"seed": 0, "train_seed": None}).write(
                trained_file(self.results, trial))
            for folder, certified in zip((trial_certify_dir(self.results, trial),
                                          trial_seed_folder(self.results, trial, 1) / CERTIFY_DIR),
                                         counts):
                folder.mkdir(parents=True, exist_ok=True)
                write_records(folder / RECORDS_FILENAME, judged_records(certified))
                (folder / "summary.json").write_text(json.dumps(
                    {"certified_accuracy": {"0.0": certified / JUDGED_IMAGES},
                     "acr": 0.75 * certified / JUDGED_IMAGES, "mean_draws": 100.0,
                     "num_images": JUDGED_IMAGES}))
        return chosen


def test_each_training_seed_is_judged_on_test_in_mlflow_and_in_words(sweep, tmp_path, capsys):
    run(sweep, tmp_path, SeededStages(Path(sweep.results_dir)))
    out = capsys.readouterr().out
    incumbent = trial_metrics(sweep, "incumbent")
    # Each configuration's figures per training seed, their mean and range.
    assert incumbent[tracking.seed_metric(0, "acr")] == pytest.approx(0.75 * 150 / 200)
    assert incumbent[tracking.seed_metric(1, "acr")] == pytest.approx(0.75 * 100 / 200)
    assert incumbent[tracking.SEEDS_MEAN_PREFIX + "acr"] == pytest.approx(0.75 * 125 / 200)
    assert incumbent[tracking.SEEDS_LOW_PREFIX + "acr"] == pytest.approx(0.75 * 100 / 200)
    assert incumbent[tracking.SEEDS_HIGH_PREFIX + "acr"] == pytest.approx(0.75 * 150 / 200)
    # Seed 1's verdicts: on the incumbent's run and, turned round, on the parent.
    seed1 = {field: incumbent[tracking.seed_metric(1, name)] for field, name in
             ((field, tracking.verdict_metric(tracking.VS_LEADER, "acr", field, False))
              for field in tracking.VERDICT_FIELDS)}
    assert seed1["difference"] == pytest.approx(-0.75 * 50 / 200) and seed1["separated"] == 1.0
    parent = parent_run(sweep).data.metrics
    assert parent[tracking.seed_metric(1, tracking.verdict_metric(
        tracking.CHOSEN_VS_INCUMBENT, "acr", "difference", False))] == pytest.approx(
        0.75 * 50 / 200)
    # Separated on one seed and not the other: the words call nothing better.
    assert ("  test over 2 training seeds (200 images), acr: chosen leader 0.562 "
            "[0.562-0.562] vs the incumbent 0.469 [0.375-0.562]") in out
    assert "  per seed, chosen leader minus the incumbent: seed 0 +0.000 [" in out
    assert "; seed 1 +0.188 [" in out
    assert "separated on 1 of 2 seeds: the seeds do not separate them" in out
    assert "ahead on every seed" not in out
    # The close trial was not certified on test: no seed of it is judged.
    assert "per seed, chosen leader minus close" not in out
