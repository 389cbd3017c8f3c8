"""The final stage's pieces without a cluster: the training seed changes training alone, every
finalist and seed certifies from one store of test draws, and the per-seed figures read back
(:mod:`cadis.sweeps.final_stage`)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cadis.errors import CadisError
from cadis.finetuning.config import from_mapping
from cadis.smoothing.records import RECORDS_FILENAME, SETTINGS_FILENAME, read_records
from cadis.sweeps.final_stage import (
    further_seeds,
    seed_figures,
    stage_configurations,
    final_draws_dir,
    training_seed_of,
)
from cadis.sweeps.layout import TrainedTrial, trained_file, trial_certify_dir, trial_seed_folder
from cadis.tracking.contract import INCUMBENT_TAG, TRIAL_ID_TAG


def tiny_config(models: Path, **changes):
    return from_mapping({"models": str(models), "epochs": 1, "max_steps_per_epoch": 2,
                         "batch_size": 4, "effective_batch_size": 4, "val_images": 20,
                         "proxy_images": 4, "proxy_n": 10, "proxy_n0": 4, "warmup_steps": 0,
                         "lr": 0.05, "certify": {"n": 20, "n0": 5, "skip": 1,
                                                 "max_images": 4},
                         **changes})


def trained_weights(models: Path, checkpoint: Path) -> dict[str, torch.Tensor]:
    from cadis.finetuning.checkpoint import load_trained
    from cadis.models.classifier import load_classifier

    classifier, _ = load_trained(load_classifier(str(models / "classifier")), checkpoint)
    return {name: value.detach().clone() for name, value in classifier.state_dict().items()}


def test_a_training_seed_changes_the_checkpoint_and_never_the_test_draws(tiny_models_dir,
                                                                         tmp_path):
    from cadis.certify_models import build_test_store
    from cadis.finetuning.fit import fit
    from cadis.sweeps.trial import certify_final

    checkpoints, weights = {}, {}
    for name, train_seed in (("own", None), ("again", 0), ("other", 1)):
        config = tiny_config(tiny_models_dir, train_seed=train_seed)
        checkpoints[name], _ = fit(config, tmp_path / name, progress=False)
        weights[name] = trained_weights(tiny_models_dir, checkpoints[name])
    # Training seed 0 is the seed's own: the same checkpoint; seed 1 trains another.
    assert all(torch.equal(weights["own"][key], weights["again"][key]) for key in weights["own"])
    assert any(not torch.equal(weights["own"][key], weights["other"][key])
               for key in weights["own"])
    # One store of test draws, built once; both seeds certify from it...
    draws = tmp_path / "test-draws"
    store = build_test_store(tiny_config(tiny_models_dir), draws, progress=False)
    for name, train_seed in (("own", None), ("other", 1)):
        config = tiny_config(tiny_models_dir, train_seed=train_seed,
                             certify={"n": 20, "n0": 5, "skip": 1, "max_images": 4,
                                      "draws_dir": str(draws)})
        certify_final(config.to_dict(), str(checkpoints[name]), str(tmp_path / f"{name}-test"))
    assert [path.name for path in draws.iterdir() if not path.name.startswith(".")] == \
        [store.folder.name]
    for name in ("own", "other"):
        made_with = json.loads((tmp_path / f"{name}-test" / SETTINGS_FILENAME).read_text())
        assert made_with["stored_draws"] == str(store.folder) and made_with["seed"] == 0
    # ...and those are the draws the seed-1 model meets live: the training seed is not in
    # the certification's noise.
    config = tiny_config(tiny_models_dir, train_seed=1)
    certify_final(config.to_dict(), str(checkpoints["other"]), str(tmp_path / "other-live"))

    def fields(folder):
        return [(r.idx, r.label, r.predict, r.radius, r.correct)
                for r in read_records(tmp_path / folder / RECORDS_FILENAME)]

    assert fields("other-test") == fields("other-live") and len(fields("other-live")) == 4
    assert [row[0] for row in fields("own-test")] == [row[0] for row in fields("other-test")]


@pytest.mark.parametrize("value,message", [(1.5, "train_seed must be an integer"),
                                           ("one", "train_seed must be an integer")])
def test_a_bad_training_seed_is_refused(tiny_models_dir, value, message):
    with pytest.raises(CadisError, match=message):
        tiny_config(tiny_models_dir, train_seed=value)


def test_the_training_seed_is_the_seed_unless_given(tiny_models_dir):
    assert tiny_config(tiny_models_dir, seed=3).training_seed == 3
    assert tiny_config(tiny_models_dir, seed=3, train_seed=7).training_seed == 7


def test_further_seeds_follow_the_own_one_and_change_only_the_training_seed():
    config = {"seed": 5, "train_seed": None, "lr": 0.1}
    assert training_seed_of(config) == 5
    assert further_seeds(config, 1) == []
    assert further_seeds(config, 3) == [(6, {"seed": 5, "train_seed": 6, "lr": 0.1}),
                                        (7, {"seed": 5, "train_seed": 7, "lr": 0.1})]
    assert [seed for seed, _ in further_seeds({"seed": 0, "train_seed": 10}, 2)] == [11]


def run(trial_id: str, incumbent: bool = False):
    tags = {TRIAL_ID_TAG: trial_id, **({INCUMBENT_TAG: "true"} if incumbent else {})}
    return SimpleNamespace(data=SimpleNamespace(tags=tags))


def test_the_stage_certifies_the_finalists_and_the_incumbent():
    ranked = [run("a"), run("b", incumbent=True), run("c")]
    assert stage_configurations(ranked, 1) == (["a"], "b")
    assert stage_configurations(ranked, 2) == (["a", "b"], "b")
    assert stage_configurations(ranked[::2], 2) == (["a", "c"], None)
    assert stage_configurations([], 2) == ([], None)


def test_the_race_names_the_finalists_where_it_ran():
    ranked = [run("a"), run("b", incumbent=True), run("c")]
    # The race's leader first, whatever the rank order; the incumbent certified in any case.
    assert stage_configurations(ranked, 1, ["c", "a"]) == (["c", "a"], "b")
    assert stage_configurations(ranked, 2, ["c"]) == (["c"], "b")
    assert stage_configurations(ranked, 2, None) == (["a", "b"], "b")


def tiny_sweep_config(models: Path, tmp_path: Path, final: dict | None = None, **changes):
    from cadis.sweeps.parse import sweep_from_mapping

    return sweep_from_mapping({
        "name": "tiny", "base": {"models": str(models), "val_images": 20, "proxy_images": 4},
        "search": {"lambda": {"uniform": [0.5, 2.0]}}, "num_trials": 2,
        "objective": {"metric": "acr", "mode": "max"},
        "certify": {"rank": {"n": 20, "n0": 5, "images": 6},
                    "final": {"n": 20, "n0": 5, **(final or {})}},
        "results_dir": str(tmp_path / "results"), **changes})


def test_the_test_draws_are_stored_unless_compiled_or_stores_are_off(tiny_models_dir, tmp_path):
    sweep = tiny_sweep_config(tiny_models_dir, tmp_path)
    assert sweep.final_seeds == 1
    assert final_draws_dir(sweep) == sweep.draws_dir == str(tmp_path / "results" / "draws")
    named = tiny_sweep_config(tiny_models_dir, tmp_path, {"draws_dir": str(tmp_path / "t")})
    assert final_draws_dir(named) == str(tmp_path / "t")
    assert final_draws_dir(tiny_sweep_config(tiny_models_dir, tmp_path,
                                            {"compile": True})) is None
    assert final_draws_dir(tiny_sweep_config(tiny_models_dir, tmp_path,
                                            store_draws=False)) is None


def test_the_final_stage_seeds_are_a_positive_integer(tiny_models_dir, tmp_path):
    sweep = tiny_sweep_config(tiny_models_dir, tmp_path, {"seeds": 3})
    assert sweep.final_seeds == 3 and not hasattr(sweep.certify, "seeds")
    with pytest.raises(CadisError, match=r"^certify\.final\.seeds must be an integer >= 1 "
                                         r"\(training seeds of each finalist"):
        tiny_sweep_config(tiny_models_dir, tmp_path, {"seeds": 0})
    for bad in (1.5, "two"):
        with pytest.raises(CadisError, match=r"^certify\.final\.seeds must be an integer"):
            tiny_sweep_config(tiny_models_dir, tmp_path, {"seeds": bad})


def write_certification(folder: Path, accuracy: float, acr: float) -> None:
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({
        "certified_accuracy": {"0.0": accuracy + 0.1, "0.5": accuracy}, "acr": acr,
        "mean_draws": 25.0, "num_images": 4}))


def test_seed_figures_are_each_seed_and_their_mean_and_range(tmp_path):
    TrainedTrial("ckpt", {"seed": 0, "train_seed": None}).write(trained_file(tmp_path, "a"))
    write_certification(trial_certify_dir(tmp_path, "a"), 0.5, 0.4)
    for seed, accuracy in ((1, 0.7), (2, 0.6)):
        write_certification(trial_seed_folder(tmp_path, "a", seed) / "certify", accuracy, 0.5)
    # A seed still training (no certification yet) and a trial not certified are left out.
    TrainedTrial("ckpt", {"seed": 0, "train_seed": 3}).write(
        trial_seed_folder(tmp_path, "a", 3) / "trained.json")
    TrainedTrial("ckpt", {"seed": 0, "train_seed": None}).write(trained_file(tmp_path, "b"))
    figures = seed_figures(tmp_path, ["a", "b"])
    assert list(figures) == ["a"]
    assert list(figures["a"]["seeds"]) == [0, 1, 2]
    assert figures["a"]["seeds"][1]["folder"] == str(trial_seed_folder(tmp_path, "a", 1)
                                                     / "certify")
    assert figures["a"]["seeds"][2]["figures"]["certified_accuracy_r0.5"] == 0.6
    assert figures["a"]["mean"]["certified_accuracy_r0.5"] == pytest.approx(0.6)
    assert figures["a"]["range"]["certified_accuracy_r0.5"] == [0.5, 0.7]
    assert figures["a"]["range"]["acr"] == [0.4, 0.5]
    assert json.loads(json.dumps(figures))  # plain data
