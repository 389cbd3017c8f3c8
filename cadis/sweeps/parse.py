"""Reading a sweep file, validated once at the edge: :func:`load_sweep`, :func:`sweep_from_mapping`.

:func:`load_sweep` reads a file, applies ``--set`` overrides and checks, before any cluster
starts, everything a trial could trip on: the base (:func:`cadis.finetuning.config.validate`),
the search space (:mod:`cadis.sweeps.search_space`), the objective and ASHA (a metric a radius
beyond what the draws can certify is refused), the resources, the two certification stages
and MLflow. What it returns is a :class:`cadis.sweeps.spec.SweepConfig` the rest trusts.

Nothing here imports Ray: validating and describing a sweep (``cadis sweep --dry-run``) must
not pay for it.
"""

from __future__ import annotations

import math
import re
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from cadis.errors import CadisError
from cadis.finetuning.config import CertifyConfig, TrainConfig, from_mapping, load_sweep_file
from cadis.overrides import parse_overrides
from cadis.smoothing.bounds import CertificationParameters, max_certifiable_radius
from cadis.smoothing.records import radius_key
from cadis.smoothing.sequential import check_budget, draws_to_reach
from cadis.sweeps.layout import DRAWS_DIR
from cadis.sweeps.objective import Objective
from cadis.sweeps.search_space import base_key_names, largest_value, parse_search
from cadis.sweeps.spec import (
    MAX_SEARCHER_SEED,
    SEARCHER_OPTUNA,
    AshaSettings,
    Distribution,
    MlflowSettings,
    RaceSettings,
    RankSettings,
    ResourceSettings,
    SweepConfig,
    TpeSettings,
    default_startup_trials,
)
from cadis.tracking.contract import (
    ACR,
    CERTIFIED_ACCURACY_PREFIX,
    PROXY_ACR,
    PROXY_PREFIX,
    radius_of_metric,
)
from cadis.validation import direction, flag, integer, integer_at_least, number, positive_int

# Final metrics, known once a trial's model is certified: ACR and accuracy per radius.
FINAL_ACR = ACR
FINAL_ACCURACY_PREFIX = CERTIFIED_ACCURACY_PREFIX
# Per-epoch metrics as the fine-tuning loop reports them, with the direction that is better. ASHA can
# only stop on these: it compares trials after every epoch.
EPOCH_METRIC_MODES = {PROXY_ACR: "max", "val_denoised_accuracy": "max",
                      "hallucination_rate": "min", "loss": "min"}
METRIC_FORMS = (f"{FINAL_ACCURACY_PREFIX}<radius>, {FINAL_ACR}, {PROXY_PREFIX}<radius>, "
                f"{', '.join(EPOCH_METRIC_MODES)}")

SWEEPS_DIR = "runs/sweeps"
# The name becomes a folder and an MLflow experiment: nothing that needs quoting, and no path
# (no '/', and no leading '.': '..' cannot climb out of runs/sweeps).
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

ASHA_KEYS = ("metric", "mode", "grace_period", "reduction_factor", "max_t")
RESOURCE_KEYS = ("workers_per_trial", "cpus_per_worker", "gpus_per_worker")
MLFLOW_KEYS = ("tracking_uri", "experiment")
OBJECTIVE_KEYS = ("metric", "mode")
SEARCHER_KEYS = tuple(field.name for field in fields(TpeSettings))
# The stages of certification: rank (validation hold-out, every trial that trains to the
# end; the searcher's objective), race (further blocks of the hold-out for the contenders the
# rank stage cannot separate) and final (the test set, the finalists).
STAGES = ("rank", "race", "final")
RANK_KEYS = ("n", "n0", "alpha", "images", "batch_size", "sequential")
RACE_KEYS = tuple(field.name for field in fields(RaceSettings))
# The final stage's own keys; the others are the base's certify settings.
FINAL_STAGE_KEYS = ("top_k", "seeds")
FINAL_KEYS = (*(field.name for field in fields(CertifyConfig)), *FINAL_STAGE_KEYS)
STAGE_KEYS = {"rank": RANK_KEYS, "race": RACE_KEYS, "final": FINAL_KEYS}
STAGE_SETS = {"rank": "the validation hold-out", "race": "more of the validation hold-out",
              "final": "the test set"}
# Top-level sections that are mappings, with their keys (search's are base keys, checked by
# parse_search): ``--set section.key=value`` writes into them.
SECTIONS = {"search": None, "objective": OBJECTIVE_KEYS, "scheduler": ASHA_KEYS,
            "searcher": SEARCHER_KEYS, "resources": RESOURCE_KEYS, "certify": STAGES,
            "mlflow": MLFLOW_KEYS}
DEFAULT_TOP_K = 2
TOP_LEVEL_KEYS = ("name", "base", "search", "objective", "scheduler", "searcher",
                  "num_trials", "max_concurrent_trials", "resources", "certify", "incumbent",
                  "store_draws", "draws_dir", "mlflow", "results_dir")


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> SweepConfig:
    """Read a sweep file, apply ``--set key=value`` items in order and validate it all.

    Override keys: ``base.KEY`` (also ``base.certify.n``) or a bare base key (``lr=1e-3``) go
    to the base; ``section.KEY`` writes into ``search``, ``objective``, ``scheduler`` (turning
    ASHA on if the file had ``scheduler: null``), ``searcher``, ``resources``, ``certify`` or
    ``mlflow``;
    other top-level keys are replaced whole. ``name`` defaults to the file's stem. Raises
    :class:`CadisError` with one line naming the key.
    """
    data = dict(load_sweep_file(path))
    data.setdefault("name", Path(path).stem)
    for key, value in parse_overrides(overrides, _overridden_setting):
        _apply_override(data, key, value)
    return sweep_from_mapping(data)


def _overridden_setting(key: str) -> str:
    """The setting a ``--set`` key writes, as :func:`_apply_override` routes it: a bare base
    key is ``base.KEY``."""
    head = key.partition(".")[0]
    if head == "base" or head in SECTIONS or key in TOP_LEVEL_KEYS or head not in base_key_names():
        return key
    return f"base.{key}"


def _apply_override(data: dict[str, Any], key: str, value: Any) -> None:
    head, _, rest = key.partition(".")
    if head == "base" and rest:
        data["base"] = {**_mapping_or_empty("base", data.get("base")), rest: value}
    elif head == "certify" and "." in rest:
        stage, _, sub_key = rest.partition(".")
        section = _mapping_or_empty(head, data.get(head))
        data[head] = {**section, stage: {**_mapping_or_empty(f"certify.{stage}",
                                                             section.get(stage)), sub_key: value}}
    elif head in SECTIONS and rest:
        data[head] = {**_mapping_or_empty(head, data.get(head)), rest: value}
    elif key in TOP_LEVEL_KEYS:
        data[key] = value
    elif head in base_key_names():
        data["base"] = {**_mapping_or_empty("base", data.get("base")), key: value}
    else:
        raise CadisError(f"--set {key}: unknown key; allowed: {', '.join(TOP_LEVEL_KEYS)}, "
                         f"SECTION.KEY, base.KEY or a base key")


def _mapping_or_empty(key: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CadisError(f"{key} must be a mapping, got {value!r}")
    return value


def sweep_from_mapping(data: Mapping[str, Any]) -> SweepConfig:
    """Validate a sweep file's mapping (as read, overrides applied); see :func:`load_sweep`."""
    unknown = [key for key in data if key not in TOP_LEVEL_KEYS]
    if unknown:
        raise CadisError(f"unknown key {unknown[0]!r}; allowed: {', '.join(TOP_LEVEL_KEYS)}")
    name = data.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise CadisError(f"name must be letters, digits, '.', '_' or '-' (it names a folder "
                         f"and an MLflow experiment), got {name!r}")
    raw_base = _mapping_or_empty("base", data.get("base"))
    try:
        base = from_mapping(raw_base)
    except CadisError as error:
        raise CadisError(f"base: {error}") from None
    resources = _parse_resources(_section(data, "resources"), raw_base, base)
    stages = _stages(data.get("certify"))
    final = {key: value for key, value in stages["final"].items()
             if key not in FINAL_STAGE_KEYS}
    # The base and resources passed above: all this can still refuse is a certify value.
    try:
        base = from_mapping({**base.to_dict(), "workers": resources.workers_per_trial,
                             "cpus_per_worker": resources.cpus_per_worker,
                             "certify": {**base.to_dict()["certify"], **final}})
    except CadisError as error:
        raise CadisError(str(error).replace("certify.", "certify.final.", 1)) from None
    rank = _parse_rank(stages["rank"], base)
    race = _parse_race(stages["race"], base, rank)
    search = parse_search(data.get("search"), base)
    num_trials = positive_int(data.get("num_trials"), "num_trials",
                                   "trials to run; with a grid, repeats of the grid")
    max_concurrent = positive_int(data.get("max_concurrent_trials", 1),
                                  "max_concurrent_trials",
                                       "trials that run at once")
    objectives = _parse_objectives(data.get("objective"), base, search, rank)
    # A sequential rank stage decides the objective's radii too, whether on its grid or not.
    rank = replace(rank, radii=tuple(sorted({radius for objective in objectives if (
        radius := radius_of_metric(objective.metric)) is not None})))
    scheduler = None if "scheduler" in data and data["scheduler"] is None else \
        _parse_scheduler(_section(data, "scheduler"), objectives, base, search)
    mlflow = _section(data, "mlflow")
    tracking_uri = mlflow.get("tracking_uri")
    if tracking_uri is not None and not (isinstance(tracking_uri, str) and tracking_uri):
        raise CadisError(f"mlflow.tracking_uri must be a URI such as http://127.0.0.1:5000, or "
                         f"null for $MLFLOW_TRACKING_URI or the local SQLite store; got {tracking_uri!r}")
    experiment = mlflow.get("experiment", name)
    if not isinstance(experiment, str) or not NAME_PATTERN.fullmatch(experiment):
        raise CadisError(f"mlflow.experiment must be letters, digits, '.', '_' or '-' starting "
                         f"with a letter or digit (no path), got {experiment!r}")
    results_dir = data.get("results_dir", f"{SWEEPS_DIR}/{name}")
    if not isinstance(results_dir, str) or not results_dir:
        raise CadisError(f"results_dir must be a folder path, got {results_dir!r}")
    draws_dir = data.get("draws_dir")
    if draws_dir is None:
        draws_dir = f"{results_dir}/{DRAWS_DIR}"
    elif not isinstance(draws_dir, str) or not draws_dir:
        raise CadisError(f"draws_dir must be a folder path, or null for results_dir/"
                         f"{DRAWS_DIR}; got {draws_dir!r}")
    sweep = SweepConfig(name=name, base=base, search=search, objective=objectives,
                        scheduler=scheduler, num_trials=num_trials,
                        max_concurrent_trials=max_concurrent, resources=resources,
                        certify=base.certify, rank=rank, race=race, top_k=DEFAULT_TOP_K,
                        incumbent=False,
                        store_draws=flag(data.get("store_draws", True), "store_draws"),
                        mlflow=MlflowSettings(tracking_uri, experiment), results_dir=results_dir,
                        draws_dir=draws_dir)
    if base.train_draws and not sweep.shares_draws:
        why = ("store_draws is false" if not sweep.store_draws else
               f"the draws depend on the searched {', '.join(sweep.draws_vary_with)}")
        raise CadisError(f"base.train_draws needs draws shared by every trial, but {why}; "
                         "set train_draws: 0")
    top_k = stages["final"].get("top_k", min(DEFAULT_TOP_K, sweep.total_trials))
    sweep.top_k = positive_int(top_k, "certify.final.top_k",
                                    "trials certified on the test set")
    if sweep.top_k > sweep.total_trials:
        raise CadisError(f"certify.final.top_k ({sweep.top_k}) is above the {sweep.total_trials} "
                         "trials of the sweep")
    sweep.final_seeds = positive_int(stages["final"].get("seeds", 1), "certify.final.seeds",
                                     "training seeds of each finalist and the incumbent")
    sweep.incumbent = _parse_incumbent(data.get("incumbent"), sweep)
    sweep.tpe = _parse_tpe(data.get("searcher"), sweep)
    return sweep


def _parse_tpe(value: Any, sweep: SweepConfig) -> TpeSettings | None:
    """``searcher:`` (absent or null: every default), TPE's settings; None on a grid sweep,
    where a section is refused (Tune's grid and random search takes none)."""
    if sweep.searcher != SEARCHER_OPTUNA:
        if value is not None:
            raise CadisError("searcher: TPE's settings, but this sweep has a grid, which Tune's "
                             "grid and random search runs instead of Optuna; drop searcher")
        return None
    section = _section({"searcher": value}, "searcher")
    startup = integer_at_least(
        section.get("n_startup_trials",
                    default_startup_trials(sweep.num_trials, sweep.max_concurrent_trials)),
        "searcher.n_startup_trials", 1, "finished trials, the incumbent among them, before "
        "TPE models")
    seed = section.get("seed", sweep.base.seed)
    if not (isinstance(seed, int) and not isinstance(seed, bool)
            and 0 <= seed <= MAX_SEARCHER_SEED):
        source = "" if "seed" in section else " (the base's seed, its default)"
        raise CadisError(f"searcher.seed{source} must be an integer in [0, {MAX_SEARCHER_SEED}]"
                         f", got {seed!r}")
    return TpeSettings(n_startup_trials=startup,
                       multivariate=flag(section.get("multivariate", True),
                                         "searcher.multivariate"),
                       constant_liar=flag(section.get("constant_liar", True),
                                          "searcher.constant_liar"),
                       seed=seed)


def _parse_incumbent(value: Any, sweep: SweepConfig) -> bool:
    """``incumbent:`` (absent: true for Optuna, false for a grid). The incumbent runs the
    base's own value of every searched key, so each must be one its distribution can draw
    (Optuna refuses to evaluate a point outside its space)."""
    if sweep.searcher != SEARCHER_OPTUNA:
        if value is not None and flag(value, "incumbent"):
            raise CadisError("incumbent: true needs Optuna's search, but this sweep has a grid, "
                             "whose arms are explicit: add the base's arm to the grid and drop "
                             "incumbent")
        return False
    if not flag(True if value is None else value, "incumbent"):
        return False
    base = sweep.base.to_dict()
    for key, distribution in sweep.search.items():
        if not distribution.contains(base[key]):
            raise CadisError(f"incumbent: the base's {key} ({base[key]!r}) is outside "
                             f"search.{key} ({distribution.describe()}), so the base cannot "
                             f"run as a trial; widen search.{key}, change base.{key}, or set "
                             f"incumbent: false")
    return True


def _stages(section: Any) -> dict[str, dict[str, Any]]:
    """``certify:``'s two stage mappings (absent: defaults), their keys checked."""
    section = _mapping_or_empty("certify", section)
    stages = {}
    for key in section:
        if key not in STAGES:
            where = [f"certify.{stage}.{key} ({STAGE_SETS[stage]})" for stage in STAGES
                     if key in STAGE_KEYS[stage]]
            hint = (f"; the certification has stages: write {' or '.join(where)}"
                    if where else "")
            raise CadisError(f"unknown key 'certify.{key}'; allowed: {', '.join(STAGES)}{hint}")
    for stage in STAGES:
        values = _mapping_or_empty(f"certify.{stage}", section.get(stage))
        for key in values:
            if key not in STAGE_KEYS[stage]:
                raise CadisError(f"unknown key 'certify.{stage}.{key}'; allowed: "
                                 f"{', '.join(STAGE_KEYS[stage])}")
        stages[stage] = values
    return stages


def _parse_rank(values: Mapping[str, Any], base: TrainConfig) -> RankSettings:
    parsers = {"alpha": number, "sequential": flag}
    rank = RankSettings(**{key: parsers[key](value, f"certify.rank.{key}")
                           if key in parsers else value for key, value in values.items()})
    try:
        CertificationParameters(rank.n0, rank.n, rank.alpha, rank.batch_size or 1)
        if rank.sequential:
            check_budget(rank.n0, rank.n)
    except CadisError as error:
        raise CadisError(f"certify.rank.{error}") from None
    for key in ("images",) + (("batch_size",) if rank.batch_size is not None else ()):
        positive_int(getattr(rank, key), f"certify.rank.{key}")
    if rank.images > base.val_images:
        raise CadisError(f"certify.rank.images ({rank.images}) is larger than the validation "
                         f"hold-out (base.val_images = {base.val_images})")
    return rank


def _parse_race(values: Mapping[str, Any], base: TrainConfig, rank: RankSettings
                ) -> RaceSettings:
    """``certify.race``: ``max_images`` defaults to the most of the hold-out the default
    allows (``base.val_images`` when smaller) and lies between the rank stage's images and
    the hold-out."""
    default = RaceSettings()
    budget = values.get("budget_seconds")
    race = RaceSettings(
        block=positive_int(values.get("block", default.block), "certify.race.block"),
        max_images=positive_int(values.get("max_images",
                                           min(default.max_images, base.val_images)),
                                "certify.race.max_images"),
        family_alpha=number(values.get("family_alpha", default.family_alpha),
                            "certify.race.family_alpha"),
        budget_seconds=None if budget is None else number(budget,
                                                          "certify.race.budget_seconds"),
        enabled=flag(values.get("enabled", default.enabled), "certify.race.enabled"))
    if not 0.0 < race.family_alpha < 1.0:
        raise CadisError(f"certify.race.family_alpha must lie in (0, 1), got "
                         f"{race.family_alpha}")
    if race.budget_seconds is not None and race.budget_seconds <= 0:
        raise CadisError(f"certify.race.budget_seconds must be a number > 0 (seconds of "
                         f"certification), or null for no limit; got {race.budget_seconds}")
    if not rank.images <= race.max_images <= base.val_images:
        raise CadisError(f"certify.race.max_images ({race.max_images}) must lie between "
                         f"certify.rank.images ({rank.images}), where the race starts, and "
                         f"the validation hold-out (base.val_images = {base.val_images})")
    return race


def _section(data: Mapping[str, Any], key: str) -> dict[str, Any]:
    """A top-level mapping section (absent or null: empty), its keys checked."""
    section = data.get(key)
    if section is None:
        return {}
    allowed = SECTIONS[key]
    if not isinstance(section, dict):
        raise CadisError(f"{key} must be a mapping of {', '.join(allowed)}, got {section!r}")
    for sub_key in section:
        if sub_key not in allowed:
            raise CadisError(f"unknown key '{key}.{sub_key}'; allowed: {', '.join(allowed)}")
    return section


def _parse_resources(section: dict[str, Any], raw_base: Mapping[str, Any],
                     base: TrainConfig) -> ResourceSettings:
    """Resources, defaulting to the base's workers and cpus_per_worker; the two must agree
    where both are written, since a trial runs with exactly one of them."""
    chosen: dict[str, Any] = {}
    for resource_key, base_key in (("workers_per_trial", "workers"),
                                   ("cpus_per_worker", "cpus_per_worker")):
        if resource_key not in section:
            chosen[resource_key] = getattr(base, base_key)
            continue
        chosen[resource_key] = section[resource_key]
        if base_key in raw_base and getattr(base, base_key) != section[resource_key]:
            raise CadisError(f"resources.{resource_key} ({section[resource_key]!r}) and "
                             f"base.{base_key} ({getattr(base, base_key)!r}) disagree: a "
                             f"sweep's trials run with resources; drop base.{base_key}")
    workers = positive_int(integer(chosen["workers_per_trial"], "resources.workers_per_trial"),
                           "resources.workers_per_trial")
    cpus = number(chosen["cpus_per_worker"], "resources.cpus_per_worker")
    gpus = number(section.get("gpus_per_worker", 0.0), "resources.gpus_per_worker")
    for key, amount in (("cpus_per_worker", cpus), ("gpus_per_worker", gpus)):
        if amount < 0:
            raise CadisError(f"resources.{key} must be a number >= 0, got {amount}")
    if gpus > 0 and base.device == "cpu":
        raise CadisError(f"resources.gpus_per_worker is {gpus} but base.device is cpu: set "
                         "device to auto or cuda, or gpus_per_worker to 0")
    if gpus == 0 and base.device == "cuda":
        raise CadisError("resources.gpus_per_worker is 0 but base.device is cuda: Ray would "
                         "give the workers no GPU; set gpus_per_worker")
    return ResourceSettings(workers, cpus, gpus)


def _canonical_metric(where: str, name: Any) -> str:
    """The metric's name as the sweep reports it (radii written as ``radius_key`` does)."""
    if isinstance(name, str):
        if name == FINAL_ACR or name in EPOCH_METRIC_MODES:
            return name
        # The proxy prefix ends with the final one: try it first.
        for prefix in (PROXY_PREFIX, FINAL_ACCURACY_PREFIX):
            if name.startswith(prefix):
                try:
                    radius = float(name[len(prefix):])
                except ValueError:
                    break
                if math.isfinite(radius) and radius >= 0:
                    return f"{prefix}{radius_key(radius)}"
                break
    raise CadisError(f"{where}: unknown metric {name!r}; allowed: {METRIC_FORMS}")


def _check_reachable(where: str, metric: str, sweep_search: Mapping[str, Distribution],
                     base: TrainConfig, rank: RankSettings | None = None) -> None:
    """A radius beyond what n draws can certify, even at the largest sigma searched, has
    accuracy 0 in every trial: refuse it, naming the n it needs. A final metric is measured
    by the rank stage (the objective), the final stage and, per epoch, the proxy: all three
    must reach its radius."""
    sigma = largest_value(sweep_search, base, "sigma")
    proxy = (int(largest_value(sweep_search, base, "proxy_n")), base.proxy_alpha, "proxy_n")
    if metric.startswith(PROXY_PREFIX):
        radius = float(metric[len(PROXY_PREFIX):])
        counts = [proxy]
    elif metric.startswith(FINAL_ACCURACY_PREFIX):
        radius = float(metric[len(FINAL_ACCURACY_PREFIX):])
        counts = [(base.certify.n, base.certify.alpha, "certify.final.n"), proxy]
        if rank is not None:
            counts.insert(0, (rank.n, rank.alpha, "certify.rank.n"))
    else:
        return
    sequential = {"certify.rank.n": rank is not None and rank.sequential,
                  "certify.final.n": base.certify.sequential}
    for n, alpha, source in counts:
        # One reach, fixed n or sequential: a sequential plan reaches a radius exactly when
        # n_max holds the draws fixed-n CERTIFY needs for it. Said as draws, which the user
        # can change.
        needed = draws_to_reach(radius, sigma, alpha)
        if needed > n:
            how = "sequentially " if sequential.get(source) else ""
            # Rounded down: a reach of 0.9999 is not "at most 1.000" of a radius 1.0 beyond it.
            reach = math.floor(max_certifiable_radius(sigma, n, alpha) * 1000) / 1000
            raise CadisError(f"{where}: {metric} is beyond what {source}={n} can certify "
                             f"{how}at sigma {sigma} (at most {reach:.3f}): {source} needs at "
                             f"least {needed}, or pick a smaller radius")


def _parse_objectives(spec: Any, base: TrainConfig, search: Mapping[str, Distribution],
                      rank: RankSettings) -> list[Objective]:
    if spec is None:
        raise CadisError("objective is required: {metric: NAME, mode: max|min}, or two of each "
                         f"as lists for a Pareto front; metrics: {METRIC_FORMS}")
    section = _section({"objective": spec}, "objective")
    metrics = section.get("metric")
    modes = section.get("mode")
    metrics = [metrics] if isinstance(metrics, str) else metrics
    modes = [modes] if isinstance(modes, str) else modes
    if not isinstance(metrics, list) or len(metrics) not in (1, 2):
        raise CadisError(f"objective.metric: one metric, or a list of two for a Pareto front; "
                         f"got {section.get('metric')!r}")
    if len(metrics) == 2 and (not isinstance(modes, list) or len(modes) != 2):
        raise CadisError(f"objective: two objectives need two modes, e.g. mode: [max, max]; "
                         f"got {section.get('mode')!r}")
    if not isinstance(modes, list) or len(modes) != len(metrics):
        raise CadisError(f"objective.mode: one mode per metric (max or min), got "
                         f"{section.get('mode')!r}")
    objectives = []
    for metric, mode in zip(metrics, modes):
        direction(mode, "objective.mode")
        name = _canonical_metric("objective.metric", metric)
        _check_reachable("objective.metric", name, search, base, rank)
        objectives.append(Objective(name, mode))
    if len(objectives) == 2 and objectives[0].metric == objectives[1].metric:
        raise CadisError(f"objective.metric: the two objectives are the same metric "
                         f"({objectives[0].metric})")
    return objectives


def _proxy_metric(objective: Objective) -> str:
    """What ASHA stops on for an objective: the objective itself when it is reported every
    epoch; else the proxy ACR, which is always reported (a per-radius proxy exists only at
    radii the proxy's few draws can certify) and rises with certified accuracy at any
    radius."""
    if objective.metric in EPOCH_METRIC_MODES or objective.metric.startswith(PROXY_PREFIX):
        return objective.metric
    return PROXY_ACR


def _parse_scheduler(section: dict[str, Any], objectives: Sequence[Objective],
                     base: TrainConfig, search: Mapping[str, Distribution]) -> AshaSettings:
    metric = _canonical_metric("scheduler.metric",
                               section.get("metric", _proxy_metric(objectives[0])))
    if metric not in EPOCH_METRIC_MODES and not metric.startswith(PROXY_PREFIX):
        raise CadisError(f"scheduler.metric: {metric} is known only after the final "
                         f"certification; ASHA needs a metric reported every epoch: "
                         f"{', '.join(EPOCH_METRIC_MODES)} or {PROXY_PREFIX}<radius>")
    _check_reachable("scheduler.metric", metric, search, base)
    mode = direction(section.get("mode", EPOCH_METRIC_MODES.get(metric, "max")),
                     "scheduler.mode")
    grace_period = positive_int(section.get("grace_period", 1), "scheduler.grace_period",
                                     "epochs every trial runs before it can be stopped")
    reduction_factor = number(section.get("reduction_factor", 2), "scheduler.reduction_factor")
    if not reduction_factor > 1:
        raise CadisError(f"scheduler.reduction_factor must be > 1 (ASHA keeps 1/factor of the "
                         f"trials at each rung), got {reduction_factor}")
    most_epochs = int(largest_value(search, base, "epochs"))
    max_t = positive_int(section.get("max_t", most_epochs), "scheduler.max_t",
                              "epochs after which ASHA stops any trial")
    if max_t < most_epochs:
        raise CadisError(f"scheduler.max_t ({max_t}) is below the {most_epochs} epochs a trial "
                         "can run: it would stop trials before their last epoch")
    if grace_period > max_t:
        raise CadisError(f"scheduler.grace_period ({grace_period}) must be <= max_t ({max_t})")
    return AshaSettings(metric, mode, grace_period, reduction_factor, max_t)
