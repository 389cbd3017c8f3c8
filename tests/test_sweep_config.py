"""The sweep file schema: good files load, bad ones fail at the edge with one line naming the
key, and the search space becomes the Tune domains it says. No Ray cluster is started."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cadis.errors import CadisError
from cadis.sweeps.objective import Objective
from cadis.sweeps.describe import describe
from cadis.sweeps.parse import load_sweep, sweep_from_mapping
from cadis.sweeps.search_space import trial_config
from cadis.sweeps.spec import (
    INCUMBENT_PARAM,
    SEARCHER_BASIC,
    SEARCHER_OPTUNA,
    AshaSettings,
    Distribution,
    TpeSettings,
    required_per_trial,
)

REPO = Path(__file__).resolve().parent.parent
SWEEP_FILES = sorted((REPO / "sweeps").glob("*.yaml"))
# The smallest valid sweep: the base's defaults, one searched key, one objective.
MINIMAL = {"name": "t", "search": {"lambda": {"uniform": [0.5, 8]}}, "num_trials": 2,
           "objective": {"metric": "certified_accuracy_r0.25", "mode": "max"}}


def write_sweep(tmp_path: Path, data: dict, filename: str = "sweep.yaml") -> Path:
    path = tmp_path / filename
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def with_changes(**changes) -> dict:
    """MINIMAL with top-level keys replaced (a value of None removes the key)."""
    data = copy.deepcopy(MINIMAL)
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return data


def search(**keys) -> dict:
    return with_changes(search=keys)


def has_search_section(path: Path) -> bool:
    return bool((yaml.safe_load(path.read_text()) or {}).get("search"))


# ----------------------------------------------------------------------------- bad files

BAD_CASES = [
    pytest.param({**MINIMAL, "schedular": {"grace_period": 2}}, "unknown key 'schedular'",
                 id="unknown-top-level-key"),
    pytest.param(with_changes(name="my sweep"), "name must be", id="name-with-space"),
    pytest.param(search(lambdaa={"uniform": [0, 1]}), "search.lambdaa: unknown key",
                 id="unknown-searched-key"),
    pytest.param(search(workers={"choice": [1, 2]}), "search.workers: not searchable",
                 id="resource-key-searched"),
    pytest.param(search(**{"lambda": {"normal": [0, 1]}}),
                 "search.lambda: unknown distribution 'normal'", id="bad-distribution-name"),
    pytest.param(search(**{"lambda": {"uniform": [0, 1], "choice": [1, 2]}}),
                 "search.lambda: one distribution per key", id="two-distributions"),
    pytest.param(search(**{"lambda": 2.0}), "search.lambda: write one of",
                 id="value-instead-of-distribution"),
    pytest.param(search(**{"lambda": {"uniform": [2, 1]}}),
                 "search.lambda: uniform needs low < high", id="low-above-high"),
    pytest.param(search(**{"lambda": {"uniform": [1, 1]}}),
                 "search.lambda: uniform needs low < high", id="low-equals-high"),
    pytest.param(search(**{"lambda": {"uniform": [1]}}),
                 "search.lambda: uniform takes [low, high]", id="one-bound"),
    pytest.param(search(epsilon={"loguniform": [0, 0.5]}),
                 "search.epsilon: loguniform needs low > 0", id="loguniform-from-zero"),
    pytest.param(search(num_noises={"int": [1.5, 4]}),
                 "search.num_noises: int takes integer bounds", id="int-fractional-bounds"),
    pytest.param(search(lora_rank={"uniform": [2, 8]}),
                 "search.lora_rank: lora_rank takes integers", id="uniform-on-integer-key"),
    pytest.param(search(lora_rank={"choice": []}),
                 "search.lora_rank: choice takes a non-empty list", id="empty-choice"),
    pytest.param(with_changes(search={}), "search is empty", id="empty-search"),
    pytest.param(with_changes(search=None), "search is empty", id="no-search"),
    pytest.param(search(**{"lambda": {"uniform": [-1, 2]}}),
                 "search.lambda: lambda must be a finite number >= 0", id="negative-lambda"),
    pytest.param(search(confidence_threshold={"grid": [0.0, 0.5, 1.5, "argmax"]}),
                 "search.confidence_threshold: confidence_threshold must be a number in [0, 1]",
                 id="threshold-above-one"),
    pytest.param(search(finetune={"choice": ["lora", "partial"]}),
                 "search.finetune: finetune must be one of", id="unknown-choice-value"),
    # 17..63 pass the bounds' checks one by one but not effective_batch_size % batch_size.
    pytest.param(search(batch_size={"int": [16, 64]}),
                 "search.batch_size: effective_batch_size (64) must be a multiple",
                 id="int-range-checked-value-by-value"),
    pytest.param(search(lora_target_modules={"choice": [["qkv"], ["qkv", "proj"]]}),
                 "search.lora_target_modules: choice takes numbers, strings",
                 id="optuna-choice-of-lists"),
    pytest.param(search(variant={"grid": [{"finetune": "full"}, {"lora_rnak": 2}]}),
                 "search.variant[1].lora_rnak: unknown key", id="variant-unknown-base-key"),
    pytest.param(search(variant={"grid": [{"finetune": "full"}, {"lora_rank": 0}]}),
                 "search.variant[1]: lora_rank must be an integer >= 1", id="variant-bad-value"),
    pytest.param(search(variant={"grid": ["full"]}),
                 "search.variant[0]: a variant is a non-empty mapping", id="variant-not-mapping"),
    pytest.param(search(variant={"choice": [{"finetune": "full"}]}),
                 "search.variant: only grid is allowed", id="variant-choice"),
    pytest.param(search(variant={"grid": [{"lora_rank": 2}]}, lora_rank={"choice": [2, 4]}),
                 "search.variant[0].lora_rank: lora_rank is also searched", id="variant-overlap"),
    pytest.param(with_changes(objective={"metric": ["certified_accuracy_r0.25",
                                                    "certified_accuracy_r1.0"], "mode": "max"}),
                 "objective: two objectives need two modes", id="two-objectives-one-mode"),
    pytest.param(with_changes(objective={"metric": ["acr", "acr"], "mode": ["max", "max"]}),
                 "objective.metric: the two objectives are the same", id="same-objective-twice"),
    pytest.param(with_changes(objective={"metric": "accuracy", "mode": "max"}),
                 "objective.metric: unknown metric 'accuracy'", id="unknown-metric"),
    pytest.param(with_changes(objective={"metric": "acr", "mode": "maximise"}),
                 "objective.mode must be max or min", id="bad-mode"),
    pytest.param(with_changes(objective=None), "objective is required", id="no-objective"),
    pytest.param(with_changes(objective={"metric": "certified_accuracy_r2.0", "mode": "max"},
                              certify={"final": {"n": 100}}),
                 "objective.metric: certified_accuracy_r2.0 is beyond what certify.rank.n=500",
                 id="radius-out-of-reach"),
    pytest.param(with_changes(objective={"metric": "certified_accuracy_r1.0", "mode": "max"},
                              certify={"rank": {"n": 2000}, "final": {"n": 2000}}),
                 "certified_accuracy_r1.0 is beyond what proxy_n=100 can certify at sigma 0.5 "
                 "(at most 0.750): proxy_n needs at least 301", id="proxy-cannot-reach"),
    pytest.param(with_changes(objective={"metric": "certified_accuracy_r1.0", "mode": "max"},
                              certify={"rank": {"n": 100}}),
                 "certify.rank.n needs at least 301", id="rank-cannot-reach"),
    pytest.param(with_changes(certify={"final": {"top_k": 0}}),
                 "certify.final.top_k must be an integer >= 1", id="top-k-zero"),
    pytest.param(with_changes(certify={"final": {"top_k": 3}}),
                 "certify.final.top_k (3) is above the 2 trials of the sweep", id="top-k-above"),
    pytest.param(with_changes(certify={"final": {"precision": "fp8"}}),
                 "certify.final.precision must be one of auto, fp32, bf16, fp16, got 'fp8'",
                 id="unknown-precision"),
    pytest.param(with_changes(base={"device": "cpu"}, certify={"final": {"precision": "fp16"}}),
                 "certify.final.precision: precision fp16 does not run on cpu",
                 id="precision-not-on-the-device"),
    pytest.param(with_changes(certify={"rank": {"images": 600}}),
                 "certify.rank.images (600) is larger than the validation hold-out "
                 "(base.val_images = 500)", id="rank-larger-than-holdout"),
    pytest.param(with_changes(certify={"n": 100}),
                 "unknown key 'certify.n'; allowed: rank, race, final; the certification has "
                 "stages: write certify.rank.n (the validation hold-out) or certify.final.n",
                 id="flat-certify-key"),
    pytest.param(with_changes(certify={"rank": {"skip": 2}}),
                 "unknown key 'certify.rank.skip'; allowed: n, n0, alpha, images, batch_size, "
                 "sequential", id="final-key-in-rank"),
    pytest.param(with_changes(certify={"rank": {"sequential": "often"}}),
                 "certify.rank.sequential must be true or false", id="rank-sequential-not-a-flag"),
    pytest.param(with_changes(objective={"metric": "certified_accuracy_r1.0", "mode": "max"},
                              certify={"rank": {"n": 300, "sequential": True}},
                              base={"proxy_n": 1000}),
                 "certified_accuracy_r1.0 is beyond what certify.rank.n=300 can certify "
                 "sequentially at sigma 0.5 (at most 0.999): certify.rank.n needs at least 301",
                 id="sequential-rank-cannot-reach"),
    pytest.param(with_changes(objective={"metric": "certified_accuracy_r1.0", "mode": "max"},
                              certify={"rank": {"n": 1000},
                                       "final": {"n": 300, "sequential": True}},
                              base={"proxy_n": 1000}),
                 "certified_accuracy_r1.0 is beyond what certify.final.n=300 can certify "
                 "sequentially at sigma 0.5 (at most 0.999): certify.final.n needs at least 301",
                 id="sequential-final-cannot-reach"),
    pytest.param(with_changes(certify={"final": {"n": 50, "n0": 100, "sequential": True}}),
                 "certify.final.n (50), the most estimation draws the sequential test may "
                 "spend on an image, is below n0 (100)", id="sequential-final-n-below-n0"),
    pytest.param(with_changes(certify={"final": {"sequential": "often"}}),
                 "certify.final.sequential must be true or false",
                 id="final-sequential-not-a-flag"),
    pytest.param(with_changes(certify={"rank": {"n": 50, "n0": 100, "sequential": True}}),
                 "certify.rank.n (50), the most estimation draws the sequential test may spend "
                 "on an image, is below n0 (100)", id="sequential-rank-n-below-n0"),
    pytest.param(with_changes(certify={"rank": {"alpha": 0}}),
                 "certify.rank.alpha must be a number strictly between 0 and 1",
                 id="bad-rank-alpha"),
    pytest.param(with_changes(store_draws="yes"), "store_draws must be true or false",
                 id="store-draws-not-a-flag"),
    pytest.param(with_changes(num_trials=0), "num_trials must be an integer >= 1",
                 id="zero-trials"),
    pytest.param(with_changes(num_trials=None), "num_trials is required", id="no-num-trials"),
    pytest.param(with_changes(max_concurrent_trials=0),
                 "max_concurrent_trials must be an integer >= 1", id="zero-concurrent"),
    pytest.param(with_changes(scheduler={"metric": "acr"}),
                 "scheduler.metric: acr is known only after the final certification",
                 id="asha-on-final-metric"),
    pytest.param(with_changes(scheduler={"reduction_factor": 1}),
                 "scheduler.reduction_factor must be > 1", id="asha-reduction-one"),
    pytest.param(with_changes(scheduler={"max_t": 1}), "scheduler.max_t (1) is below the 2 epochs",
                 id="asha-max-t-below-epochs"),
    pytest.param(with_changes(scheduler={"grace": 1}), "unknown key 'scheduler.grace'",
                 id="asha-unknown-key"),
    pytest.param(with_changes(resources={"workers_per_trial": 2}, base={"workers": 1}),
                 "resources.workers_per_trial (2) and base.workers (1) disagree",
                 id="workers-disagree"),
    pytest.param(with_changes(resources={"gpus_per_worker": 1}, base={"device": "cpu"}),
                 "resources.gpus_per_worker is 1.0 but base.device is cpu", id="gpu-on-cpu"),
    pytest.param(with_changes(resources={"cpus_per_worker": -1}),
                 "resources.cpus_per_worker must be a number >= 0", id="negative-cpus"),
    pytest.param(with_changes(base={"lr": -1}), "base: lr must be", id="bad-base-value"),
    pytest.param(with_changes(base={"method": "denoised_ce"}),
                 "search.lambda: searches nothing: every trial runs method denoised_ce, which "
                 "ignores lambda (it has no adversarial loss)", id="lambda-under-denoised-ce"),
    pytest.param(with_changes(base={"method": "denoised_ce"},
                              search={"epsilon": {"choice": [0.1, 0.25]}}),
                 "search.epsilon: searches nothing", id="epsilon-under-denoised-ce"),
    pytest.param(with_changes(search={"method": {"grid": ["denoised_ce"]},
                                      "attack_steps": {"choice": [1, 2]}}),
                 "search.attack_steps: searches nothing", id="searched-method-ignores-it"),
    pytest.param(with_changes(certify={"final": {"alpha": 2}}),
                 "certify.final.alpha must be a number strictly between 0 and 1",
                 id="bad-certify-value"),
    pytest.param(with_changes(mlflow={"tracking_uri": ""}), "mlflow.tracking_uri must be",
                 id="empty-tracking-uri"),
    pytest.param(with_changes(incumbent="yes"), "incumbent must be true or false",
                 id="incumbent-not-a-flag"),
    pytest.param(search(lora_rank={"choice": [2, 8]}),
                 "incumbent: the base's lora_rank (4) is outside search.lora_rank (choice [2, "
                 "8]), so the base cannot run as a trial; widen search.lora_rank, change "
                 "base.lora_rank, or set incumbent: false", id="incumbent-outside-a-choice"),
    pytest.param(search(**{"lambda": {"uniform": [3, 8]}}),
                 "incumbent: the base's lambda (2.0) is outside search.lambda (uniform [3.0, "
                 "8.0])", id="incumbent-outside-a-range"),
    pytest.param(search(num_noises={"int": [3, 4]}), "the base's num_noises (2) is outside",
                 id="incumbent-outside-an-int-range"),
    pytest.param(with_changes(incumbent=True, search={"lambda": {"grid": [1.0, 2.0]}}),
                 "incumbent: true needs Optuna's search, but this sweep has a grid",
                 id="incumbent-on-a-grid"),
    *(pytest.param(with_changes(searcher=section), expected, id=name)
      for section, expected, name in (
        ({"n_startup_trial": 4}, "unknown key 'searcher.n_startup_trial'; allowed: "
         "n_startup_trials, multivariate, constant_liar, seed", "searcher-unknown-key"),
        ([4], "searcher must be a mapping of n_startup_trials, multivariate, constant_liar, "
         "seed", "searcher-not-a-mapping"),
        ({"n_startup_trials": 0}, "searcher.n_startup_trials must be an integer >= 1",
         "searcher-no-startup"),
        ({"n_startup_trials": 2.5}, "searcher.n_startup_trials must be an integer >= 1",
         "searcher-fractional-startup"),
        ({"multivariate": "yes"}, "searcher.multivariate must be true or false",
         "searcher-multivariate-not-a-flag"),
        ({"constant_liar": 1}, "searcher.constant_liar must be true or false",
         "searcher-constant-liar-not-a-flag"),
        ({"seed": -1}, "searcher.seed must be an integer in [0, 4294967295], got -1",
         "searcher-negative-seed"),
        ({"seed": 2**32}, "searcher.seed must be an integer in [0, 4294967295]",
         "searcher-seed-too-large"),
        ({"seed": True}, "searcher.seed must be an integer in", "searcher-seed-a-flag"))),
    pytest.param(with_changes(base={"seed": -1}), "searcher.seed (the base's seed, its "
                 "default) must be an integer in [0, 4294967295], got -1",
                 id="searcher-seed-from-a-negative-base-seed"),
    pytest.param(with_changes(searcher={"seed": 1}, search={"lambda": {"grid": [1.0, 2.0]}}),
                 "searcher: TPE's settings, but this sweep has a grid", id="searcher-on-a-grid"),
    pytest.param(with_changes(searcher={}, search={"lambda": {"grid": [1.0, 2.0]}}),
                 "searcher: TPE's settings, but this sweep has a grid",
                 id="empty-searcher-on-a-grid"),
]


@pytest.mark.parametrize("data, expected", BAD_CASES)
def test_bad_sweep_is_one_line_naming_the_key(tmp_path, data, expected):
    with pytest.raises(CadisError) as caught:
        load_sweep(write_sweep(tmp_path, data))
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message


# ---------------------------------------------------------------------------- good files


@pytest.mark.parametrize("changes", [
    pytest.param({"search": {"method": {"grid": ["ft_cadis", "denoised_ce"]},
                             "lambda": {"uniform": [0.5, 8]}}}, id="some-trials-use-it"),
    pytest.param({"base": {"method": "denoised_ce"},
                  "search": {"variant": {"grid": [{"method": "ft_cadis"}, {"lr": 1e-4}]},
                             "confidence_threshold": {"choice": [0.5, "argmax"]}}},
                 id="a-variant-uses-it"),
])
def test_a_key_searched_where_some_trial_uses_it_is_accepted(changes):
    assert sweep_from_mapping(with_changes(**changes)).search


def test_minimal_sweep_resolves_defaults(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, MINIMAL))
    assert sweep.search == {"lambda": Distribution("uniform", (0.5, 8.0))}
    assert sweep.objective == [Objective("certified_accuracy_r0.25", "max")]
    # ASHA is on by default and stops on the proxy ACR, reported every epoch.
    assert sweep.scheduler == AshaSettings("proxy_acr", "max", grace_period=1,
                                           reduction_factor=2.0, max_t=sweep.base.epochs)
    assert (sweep.num_trials, sweep.max_concurrent_trials) == (2, 1)
    assert sweep.searcher == SEARCHER_OPTUNA and sweep.total_trials == 2
    assert sweep.results_dir == "runs/sweeps/t"
    assert sweep.mlflow.tracking_uri is None and sweep.mlflow.experiment == "t"
    assert sweep.tracking_uri() == f"sqlite:///{Path('runs/sweeps/mlflow.db').resolve()}"
    assert sweep.base.certify is sweep.certify
    assert required_per_trial(sweep) == {"CPU": 1.25, "GPU": 0.0}


def test_the_base_is_the_incumbent_of_an_optuna_sweep(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, search(
        **{"lambda": {"uniform": [0.5, 8]}, "lora_rank": {"choice": [2, 4, 8]},
           "num_noises": {"int": [1, 3]}})))
    # On by default, one of num_trials; its point is the base's value of each searched key.
    assert sweep.incumbent and sweep.total_trials == 2
    assert sweep.incumbent_point == {"lambda": 2.0, "lora_rank": 4, "num_noises": 2}
    assert ("incumbent: the base (lambda=2.0, lora_rank=4, num_noises=2) is trial 1 of 2, "
            "never stopped by ASHA, certified on the test set in the final stage"
            ) in describe(sweep).splitlines()


@pytest.mark.parametrize("changes, reason", [
    pytest.param({"incumbent": False, "search": {"lambda": {"uniform": [3, 8]}}},
                 "incumbent: false", id="opted-out-even-outside-its-space"),
    pytest.param({"search": {"lambda": {"grid": [1.0, 3.0]}}}, "a grid's arms are explicit",
                 id="grid"),
    pytest.param({"incumbent": False, "search": {"lambda": {"grid": [1.0, 3.0]}}},
                 "a grid's arms are explicit", id="grid-opted-out"),
])
def test_a_sweep_without_an_incumbent(tmp_path, changes, reason):
    sweep = load_sweep(write_sweep(tmp_path, with_changes(**changes)))
    assert not sweep.incumbent and sweep.incumbent_point is None
    assert f"incumbent: none ({reason})" in describe(sweep).splitlines()


@pytest.mark.parametrize("num_trials, at_once, startup, first_modelled", [
    pytest.param(16, 1, 4, 5, id="default-one-at-a-time"),
    pytest.param(16, 2, 3, 5, id="default-two-at-a-time"),
    pytest.param(2, 1, 2, 3, id="tiny-never-models"),
    pytest.param(40, 2, 9, 11, id="forty-trials"),
    pytest.param(100, 1, 10, 11, id="capped-at-optunas-default"),
    pytest.param(100, 12, 2, 14, id="many-at-once-floor"),
])
def test_tpe_defaults_scale_with_the_trials(num_trials, at_once, startup, first_modelled):
    sweep = sweep_from_mapping(with_changes(num_trials=num_trials,
                                            max_concurrent_trials=at_once))
    assert sweep.tpe == TpeSettings(n_startup_trials=startup, multivariate=True,
                                    constant_liar=True, seed=sweep.base.seed)
    assert sweep.tpe.first_modelled_trial(at_once) == first_modelled


def test_the_default_sweeps_tpe_models_from_its_fifth_trial():
    sweep = load_sweep(REPO / "sweeps" / "default.yaml")
    assert ("searcher: TPE, random until 3 finished trials (the incumbent among them): "
            "trials 1-4: the incumbent and 3 random, then trials 5-16 from the model "
            "(2 at a time); multivariate, constant liar, seed 0") in describe(sweep).splitlines()


@pytest.mark.parametrize("changes, line", [
    pytest.param({"searcher": {"n_startup_trials": 5, "seed": 3}, "incumbent": False},
                 "searcher: TPE, random until 5 finished trials: trials 1-5: 5 random, then "
                 "trials 6-8 from the model; multivariate, constant liar (idle: one trial at a "
                 "time), seed 3", id="no-incumbent-one-at-a-time"),
    pytest.param({"searcher": {"n_startup_trials": 8, "multivariate": False,
                               "constant_liar": False}, "max_concurrent_trials": 2},
                 "searcher: TPE, random until 8 finished trials (the incumbent among them): "
                 "the incumbent and 7 random of 8 trials: it never models (2 at a time); one "
                 "density per key, no constant liar, seed 0", id="never-models"),
])
def test_the_dry_run_says_what_tpe_does(changes, line):
    sweep = sweep_from_mapping(with_changes(num_trials=8, **changes))
    assert line in describe(sweep).splitlines()


def test_a_grid_sweep_has_no_tpe():
    sweep = sweep_from_mapping(search(**{"lambda": {"grid": [1.0, 2.0]}}))
    assert sweep.tpe is None and "searcher:" not in describe(sweep)


def test_set_turns_the_incumbent_off(tmp_path):
    path = write_sweep(tmp_path, search(**{"lambda": {"uniform": [3, 8]}}))
    assert not load_sweep(path, ["incumbent=false"]).incumbent


def test_the_incumbents_marker_is_no_base_key():
    sweep = sweep_from_mapping(MINIMAL)
    assert trial_config(sweep, {"lambda": 1.5, INCUMBENT_PARAM: True}) == \
        trial_config(sweep, {"lambda": 1.5})


def test_name_defaults_to_the_file_stem(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, with_changes(name=None), "my_sweep.yaml"))
    assert sweep.name == "my_sweep" and sweep.results_dir == "runs/sweeps/my_sweep"


def test_metric_names_are_canonical_radii(tmp_path):
    data = with_changes(objective={"metric": ["certified_accuracy_r1", "acr"],
                                   "mode": ["max", "max"]}, base={"proxy_n": 1000})
    sweep = load_sweep(write_sweep(tmp_path, data))
    assert [o.metric for o in sweep.objective] == ["certified_accuracy_r1.0", "acr"]


def test_searched_epochs_raise_asha_max_t(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, search(epochs={"choice": [2, 5]})))
    assert sweep.scheduler.max_t == 5


def test_scheduler_null_turns_asha_off(tmp_path):
    assert load_sweep(write_sweep(tmp_path, {**MINIMAL, "scheduler": None})).scheduler is None


def test_resources_set_the_base(tmp_path):
    data = with_changes(resources={"workers_per_trial": 2, "cpus_per_worker": 0.5,
                                   "gpus_per_worker": 0.25})
    sweep = load_sweep(write_sweep(tmp_path, data))
    assert (sweep.base.workers, sweep.base.cpus_per_worker) == (2, 0.5)
    assert required_per_trial(sweep) == {"CPU": 1.25, "GPU": 0.5}


def test_certify_section_overrides_base_certify(tmp_path):
    data = with_changes(base={"certify": {"n": 500, "skip": 7}}, certify={"final": {"n": 2000}})
    certify = load_sweep(write_sweep(tmp_path, data)).certify
    assert (certify.n, certify.skip) == (2000, 7)


def test_yaml_exponents_without_a_dot_are_numbers(tmp_path):
    # YAML 1.1 reads 1e-5 as a string; the sweep reads it as the number it means.
    sweep = load_sweep(write_sweep(tmp_path, search(lr={"loguniform": ["1e-5", "1e-3"]})))
    assert sweep.search["lr"].values == (1e-5, 1e-3)


OVERRIDES = [
    pytest.param(["base.lr=1e-3"], lambda s: s.base.lr == 1e-3, id="base-dotted"),
    pytest.param(["lr=5e-4"], lambda s: s.base.lr == 5e-4, id="bare-base-key"),
    pytest.param(["base.certify.n=300"], lambda s: s.certify.n == 300, id="base-certify"),
    pytest.param(["certify.final.n=3000"], lambda s: s.certify.n == s.base.certify.n == 3000,
                 id="certify-section"),
    pytest.param(["certify.rank.images=50", "certify.final.top_k=1"],
                 lambda s: s.rank.images == 50 and s.top_k == 1, id="certify-stages"),
    pytest.param(["num_trials=4"], lambda s: s.num_trials == 4, id="num-trials"),
    pytest.param(["mlflow.tracking_uri=http://127.0.0.1:5000"],
                 lambda s: s.tracking_uri() == "http://127.0.0.1:5000", id="tracking-uri"),
    pytest.param(["scheduler.grace_period=2"], lambda s: s.scheduler.grace_period == 2,
                 id="scheduler-key"),
    pytest.param(["scheduler=null"], lambda s: s.scheduler is None, id="scheduler-off"),
    pytest.param(["searcher.seed=7", "searcher.n_startup_trials=6"],
                 lambda s: (s.tpe.seed, s.tpe.n_startup_trials, s.base.seed) == (7, 6, 0),
                 id="searcher-keys"),
    pytest.param(["search.epsilon={loguniform: [0.1, 0.5]}"],
                 lambda s: s.search["epsilon"] == Distribution("loguniform", (0.1, 0.5)),
                 id="search-key"),
    pytest.param(["name=renamed"], lambda s: s.results_dir == "runs/sweeps/renamed"
                 and s.mlflow.experiment == "renamed", id="name"),
]


@pytest.mark.parametrize("overrides, holds", OVERRIDES)
def test_set_overrides(tmp_path, overrides, holds):
    assert holds(load_sweep(write_sweep(tmp_path, MINIMAL), overrides))


def test_override_turns_asha_on_in_a_file_without_it(tmp_path):
    path = write_sweep(tmp_path, {**MINIMAL, "scheduler": None})
    assert load_sweep(path, ["scheduler.grace_period=2"]).scheduler.grace_period == 2


@pytest.mark.parametrize("item, expected", [
    ("nonsense=1", "--set nonsense: unknown key"),
    ("num_trials=0", "num_trials must be"),
    ("base.lr=-1", "base: lr must be"),
    ("search.lambda={uniform: [-2, 1]}", "search.lambda: lambda must be"),
    ("resources.gpu=1", "unknown key 'resources.gpu'"),
])
def test_bad_override_names_the_key(tmp_path, item, expected):
    with pytest.raises(CadisError) as caught:
        load_sweep(write_sweep(tmp_path, MINIMAL), [item])
    assert str(caught.value).startswith(expected)


# ------------------------------------------------------------------- the project's files


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda path: path.name)
def test_every_sweep_file_loads_and_describes_its_search(path):
    if not has_search_section(path):
        pytest.skip(f"{path.name} has no search: section (a training file, not yet a sweep)")
    sweep = load_sweep(path)
    text = describe(sweep)
    assert all(key in text for key in sweep.search)
    assert sweep.name in text and str(sweep.total_trials) in text


def test_ablation_files_run_each_grid_point_once_on_two_cores():
    for name, size in (("ablations", 14), ("reference_recipe", 6)):
        sweep = load_sweep(REPO / "sweeps" / f"{name}.yaml")
        assert sweep.searcher == SEARCHER_BASIC and sweep.total_trials == size
        assert sweep.scheduler is None
        assert required_per_trial(sweep)["CPU"] * sweep.max_concurrent_trials <= 2


def test_cifar10_file_is_the_papers_setting():
    sweep = load_sweep(REPO / "sweeps" / "cifar10.yaml")
    base = sweep.base
    assert (base.finetune, base.num_noises, base.adv_weight, base.epsilon, base.attack_steps,
            base.epochs, base.lr) == ("full", 4, 4.0, 0.25, 4, 30, 5e-5)
    assert base.effective_batch_size * sweep.resources.workers_per_trial == 128
    assert [o.metric for o in sweep.objective] == ["certified_accuracy_r0.25",
                                                   "certified_accuracy_r1.0"]
    assert sweep.scheduler.metric == "proxy_acr"
    assert required_per_trial(sweep) == {"CPU": 32.25, "GPU": 4.0}
    assert (sweep.certify.n, sweep.certify.n0, sweep.certify.skip) == (100_000, 100, 20)


# ------------------------------------------------------------------------------ Tune


def test_tune_search_space_builds_the_domains(tmp_path):
    from ray.tune.search.sample import Categorical, Float, Integer, LogUniform, Uniform

    from cadis.sweeps.searcher import tune_search_space  # imports Ray

    data = search(**{"lambda": {"uniform": [0.5, 8]}, "epsilon": {"loguniform": [0.05, 0.5]},
                     "num_noises": {"int": [1, 4]}, "lora_rank": {"choice": [2, 4, 8]},
                     "confidence_threshold": {"grid": [0.0, 0.5, "argmax"]}})
    sweep = load_sweep(write_sweep(tmp_path, data))
    space = tune_search_space(sweep)
    assert isinstance(space["lambda"], Float) and isinstance(space["lambda"].get_sampler(), Uniform)
    assert (space["lambda"].lower, space["lambda"].upper) == (0.5, 8.0)
    assert isinstance(space["epsilon"].get_sampler(), LogUniform)
    assert all(0.05 <= x <= 0.5 for x in space["epsilon"].sample(size=200))
    # The file's int range includes its high bound; Tune's randint excludes its upper.
    assert isinstance(space["num_noises"], Integer)
    assert (space["num_noises"].lower, space["num_noises"].upper) == (1, 5)
    assert set(space["num_noises"].sample(size=400)) == {1, 2, 3, 4}
    assert isinstance(space["lora_rank"], Categorical)
    assert space["lora_rank"].categories == [2, 4, 8]
    assert space["confidence_threshold"] == {"grid_search": [0.0, 0.5, "argmax"]}


def test_grid_mixed_with_random_repeats_the_grid(tmp_path):
    from ray.tune.search.variant_generator import generate_variants

    from cadis.sweeps.searcher import tune_search_space  # imports Ray

    data = search(**{"lambda": {"uniform": [0.5, 8]},
                     "confidence_threshold": {"grid": [0.0, 0.5, "argmax"]},
                     "lora_rank": {"grid": [2, 4]}})
    sweep = load_sweep(write_sweep(tmp_path, {**data, "num_trials": 3}))
    assert sweep.searcher == SEARCHER_BASIC
    assert (sweep.grid_size, sweep.total_trials) == (6, 18)
    # One pass of Tune's variant generator is one repeat of the grid: num_trials of them run.
    assert len(list(generate_variants(tune_search_space(sweep)))) == sweep.grid_size


def test_variant_grid_applies_its_keys_together():
    from cadis.sweeps.searcher import tune_search_space  # imports Ray

    sweep = load_sweep(REPO / "sweeps" / "ablations.yaml")
    grid = tune_search_space(sweep)["variant"]["grid_search"]
    configs = {json.dumps(variant, sort_keys=True): trial_config(sweep, {"variant": variant})
               for variant in grid}
    frozen = configs['{"confidence_model": "frozen", "confidence_threshold": 0.7}']
    assert (frozen.confidence_model, frozen.confidence_threshold) == ("frozen", 0.7)
    rank = configs['{"lora_alpha": 2.0, "lora_rank": 1}']
    assert (rank.finetune, rank.lora_rank, rank.lora_alpha) == ("lora", 1, 2.0)
    more_steps = configs['{"lora_rank": 2, "max_steps_per_epoch": 97, "method": "denoised_ce"}']
    assert (more_steps.method, more_steps.lora_rank, more_steps.max_steps_per_epoch) == (
        "denoised_ce", 2, 97)
    # What a variant does not name is the recipe's, in every arm.
    assert all(c.epochs == sweep.base.epochs and c.epsilon == sweep.base.epsilon
               for c in configs.values())


def test_trial_config_refuses_a_bad_combination(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, search(batch_size={"choice": [16, 32]},
                                                    effective_batch_size={"choice": [32, 64]})))
    config = trial_config(sweep, {"batch_size": 32, "effective_batch_size": 64})
    assert config.accumulation_steps == 2
    with pytest.raises(CadisError, match="^trial with .*effective_batch_size"):
        trial_config(sweep, {"batch_size": 32, "effective_batch_size": 48})


def test_loading_a_sweep_does_not_import_ray():
    code = ("import sys, cadis.sweeps.parse as s; s.load_sweep('sweeps/cifar10.yaml'); "
            "sys.exit('ray' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_a_sequential_rank_stage_decides_the_objectives_radii():
    sweep = sweep_from_mapping(with_changes(
        objective={"metric": ["certified_accuracy_r0.3", "acr"], "mode": ["max", "max"]},
        certify={"rank": {"sequential": True}}))
    assert sweep.rank.sequential and sweep.rank.radii == (0.3,)


# ------------------------------------------------------------------------------ TPE as built


def test_the_built_searchers_sampler_carries_the_tpe_settings(tmp_path):
    import numpy as np

    from cadis.sweeps.searcher import build_searcher, tune_search_space  # imports Ray

    sweep = sweep_from_mapping(with_changes(num_trials=8, searcher={
        "n_startup_trials": 5, "multivariate": False, "constant_liar": False, "seed": 11}))
    searcher = build_searcher(sweep, tmp_path)
    searcher.set_search_properties(None, None, tune_search_space(sweep))
    sampler = searcher._ot_study.sampler
    assert (sampler._n_startup_trials, sampler._multivariate, sampler._constant_liar) == \
        (5, False, False)
    assert sampler._rng.rng.random_sample() == np.random.RandomState(11).random_sample()


@pytest.mark.parametrize("incumbent, at_once", [
    pytest.param(True, 1, id="incumbent-one-at-a-time"),
    pytest.param(False, 1, id="no-incumbent"),
    pytest.param(True, 2, id="incumbent-two-at-a-time"),
])
def test_tpe_models_from_the_trial_the_dry_run_names(tmp_path, monkeypatch, incumbent, at_once):
    """Optuna counts the incumbent (an enqueued trial) among its startup trials once it
    finishes, and proposes trial k once k - at_once trials have finished."""
    from collections import deque

    from cadis.sweeps.searcher import build_searcher, tune_search_space  # imports Ray

    sweep = sweep_from_mapping(with_changes(num_trials=9, max_concurrent_trials=at_once,
                                            incumbent=incumbent,
                                            searcher={"n_startup_trials": 3}))
    searcher = build_searcher(sweep, tmp_path)
    searcher.set_search_properties(None, None, tune_search_space(sweep))
    sampler = searcher._ot_study.sampler
    modelled: set[int] = set()
    sample = sampler._sample

    def recorded(study, trial, space):
        modelled.add(trial.number + 1)
        return sample(study, trial, space)

    monkeypatch.setattr(sampler, "_sample", recorded)
    live: deque[str] = deque()
    first = None
    for number in range(1, sweep.num_trials + 1):
        if len(live) == at_once:  # Tune proposes a trial when one of at_once ends
            done = live.popleft()
            searcher.on_trial_complete(done, {sweep.objective[0].searched: 0.1 * int(done)})
        config = searcher.suggest(str(number))
        first = config if first is None else first
        live.append(str(number))
    assert (INCUMBENT_PARAM in first) == incumbent
    expected = sweep.tpe.first_modelled_trial(at_once)
    assert expected == 3 + at_once
    assert sorted(modelled) == list(range(expected, sweep.num_trials + 1))
