"""The schema of a whole sweep file, validated once at the edge.

A sweep file names a training configuration (``base:``, see :mod:`cadis.finetuning.config`), the
base keys to search and how, the objective, the ASHA scheduler, the trial budget, what one
trial needs of a cluster, the final certification and where MLflow tracks the sweep.
:func:`load_sweep` reads one, applies ``--set`` overrides and checks, before any cluster
starts, everything a trial could trip on: every value a distribution can produce passes the
base's own validation, so a bad range fails here with the base's message and not as a failed
trial an hour later.

Search space, as users write it under ``search:`` (exactly one distribution per key)::

    lambda: {uniform: [0.5, 8]}             # a float in [low, high]
    epsilon: {loguniform: [0.05, 0.5]}      # a float, uniform in log space; low > 0
    num_noises: {int: [1, 4]}               # an integer in [low, high], BOTH bounds included
    lora_rank: {choice: [2, 4, 8]}          # one of the values, picked by the searcher
    confidence_threshold: {grid: [0.0, 0.5, argmax]}   # every value, each in its own trial
    variant: {grid: [{finetune: lora, lora_rank: 4}, {finetune: full}]}

``variant`` is reserved (no base key has that name): its grid values are mappings of base
keys applied together, for ablations whose arms are not a product of single keys (LoRA at
several ranks *and* full fine-tuning).

Grids and trial counts: Optuna cannot take Tune's ``grid_search`` (Ray refuses to convert
it), so a sweep with any ``grid`` runs on Tune's BasicVariantGenerator instead: every grid
point (the product over grid keys) is run ``num_trials`` times, the other distributions drawn
at random for each. ``num_trials`` then counts repeats of the grid, not trials;
:attr:`SweepConfig.total_trials` is what runs. Without a grid, Optuna's TPE proposes
``num_trials`` trials (two objectives: a Pareto front).

Nothing here imports Ray: validating and describing a sweep (``cadis sweep --dry-run``) must
not pay for it. :mod:`cadis.sweeps.searcher` turns the search space into Tune's domains.
"""

from __future__ import annotations

import math
import re
import typing
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from cadis.errors import CadisError
from cadis.finetuning.config import (
    RENAMED,
    CertifyConfig,
    TrainConfig,
    from_mapping,
    load_sweep_file,
)
from cadis.overrides import parse_overrides
from cadis.smoothing.bounds import CertificationParameters, draws_needed, max_certifiable_radius
from cadis.smoothing.records import radius_key
from cadis.smoothing.sequential import check_budget, draws_to_reach
from cadis.sweeps.layout import DRAWS_DIR
from cadis.sweeps.objective import Objective
from cadis.tracking.contract import (
    ACR,
    CERTIFIED_ACCURACY_PREFIX,
    PROXY_ACR,
    PROXY_PREFIX,
    default_tracking_uri,
    radius_of_metric,
)
from cadis.validation import is_real, positive_int

DistributionKind = Literal["uniform", "loguniform", "int", "choice", "grid"]
DISTRIBUTIONS: tuple[DistributionKind, ...] = ("uniform", "loguniform", "int", "choice", "grid")
RANGE_KINDS = ("uniform", "loguniform", "int")
# The reserved searched key whose grid values are mappings of base keys applied together.
VARIANT_KEY = "variant"
# Base keys a sweep sets from its own sections: searching them would contradict those.
NOT_SEARCHABLE = {
    "certify": "the sweep's certify: section sets it",
    "workers": "resources.workers_per_trial sets it",
    "cpus_per_worker": "resources.cpus_per_worker sets it",
    "train_draws": "the training draws are denoised once for every trial; set it in base",
    "train_store": "the sweep makes its training draws; set train_draws in base",
    "proxy_store": "the sweep makes the proxy's draws",
}
# Base keys a method ignores, and why: searching one while every trial runs that method
# searches nothing (denoised_ce forces tau = 0 and lambda = 0: no selection, no attack).
IGNORED_BY_METHOD = {
    "denoised_ce": {
        "confidence_threshold": "it trains on every draw (tau = 0)",
        "lambda": "it has no adversarial loss",
        "epsilon": "it runs no attack",
        "attack_steps": "it runs no attack",
        "attack_restandardize": "it runs no attack",
    },
}
# Integer ranges up to this many values are validated value by value (base checks such as
# effective_batch_size % batch_size are not intervals); wider ones by their bounds.
MAX_ENUMERATED_INTS = 1024

MODES = ("max", "min")
# Final metrics, known once a trial's model is certified: ACR and accuracy per radius.
FINAL_ACR = ACR
FINAL_ACCURACY_PREFIX = CERTIFIED_ACCURACY_PREFIX
# Per-epoch metrics as the fine-tuning loop reports them, with the direction that is better. ASHA can
# only stop on these: it compares trials after every epoch.
EPOCH_METRIC_MODES = {PROXY_ACR: "max", "val_denoised_accuracy": "max",
                      "hallucination_rate": "min", "loss": "min"}
METRIC_FORMS = (f"{FINAL_ACCURACY_PREFIX}<radius>, {FINAL_ACR}, {PROXY_PREFIX}<radius>, "
                f"{', '.join(EPOCH_METRIC_MODES)}")

# A trial's Tune function only starts its Train run and waits (certification runs in a task
# with one worker's resources): a quarter CPU, not Tune's default of one, lets two trials of
# 0.5-CPU workers share two 1-CPU nodes (docs/design.md).
TRIAL_DRIVER_CPUS = 0.25
SWEEPS_DIR = "runs/sweeps"
# The name becomes a folder and an MLflow experiment: nothing that needs quoting, and no path
# (no '/', and no leading '.': '..' cannot climb out of runs/sweeps).
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

SEARCHER_OPTUNA = "optuna"
SEARCHER_BASIC = "basic-variant"

ASHA_KEYS = ("metric", "mode", "grace_period", "reduction_factor", "max_t")
RESOURCE_KEYS = ("workers_per_trial", "cpus_per_worker", "gpus_per_worker")
MLFLOW_KEYS = ("tracking_uri", "experiment")
OBJECTIVE_KEYS = ("metric", "mode")
# The two stages of certification: rank (validation hold-out, every trial that trains to the
# end; the searcher's objective) and final (the test set, the top_k trials by rank).
STAGES = ("rank", "final")
RANK_KEYS = ("n", "n0", "alpha", "images", "batch_size", "sequential")
FINAL_KEYS = (*(field.name for field in fields(CertifyConfig)), "top_k")
STAGE_KEYS = {"rank": RANK_KEYS, "final": FINAL_KEYS}
STAGE_SETS = {"rank": "the validation hold-out", "final": "the test set"}
# Top-level sections that are mappings, with their keys (search's are base keys, checked by
# _parse_search): ``--set section.key=value`` writes into them.
SECTIONS = {"search": None, "objective": OBJECTIVE_KEYS, "scheduler": ASHA_KEYS,
            "resources": RESOURCE_KEYS, "certify": STAGES, "mlflow": MLFLOW_KEYS}
DEFAULT_TOP_K = 2
# Base keys the stored draws depend on.
DRAW_KEYS = ("models", "classifier", "denoiser", "dataset", "data_root", "image_size", "sigma",
             "seed", "val_images", "val_seed", "proxy_images", "proxy_n", "proxy_n0",
             "max_train_images")
TOP_LEVEL_KEYS = ("name", "base", "search", "objective", "scheduler", "num_trials",
                  "max_concurrent_trials", "resources", "certify", "store_draws", "draws_dir",
                  "mlflow", "results_dir")


@dataclass(frozen=True)
class Distribution:
    """How one searched key is drawn. Guaranteed after loading: every value it can produce
    passed the base's validation (integer ranges wider than :data:`MAX_ENUMERATED_INTS`
    values and continuous ranges by their bounds).

    ``values`` is ``(low, high)`` for the ranges (floats; ints for ``int``, both included),
    the options for ``choice`` and ``grid`` (mappings of base keys for ``variant``).
    """

    kind: DistributionKind
    values: tuple[Any, ...]

    def describe(self) -> str:
        if self.kind in RANGE_KINDS:
            low, high = self.values
            included = " (both included)" if self.kind == "int" else ""
            return f"{self.kind} [{low}, {high}]{included}"
        return f"{self.kind} [{', '.join(_format_value(value) for value in self.values)}]"


@dataclass(frozen=True)
class AshaSettings:
    """Early stopping on a per-epoch metric; one time unit is one epoch (one report).

    A file without ``scheduler:`` gets ASHA with the defaults: ``metric`` the first
    objective's per-epoch proxy (``proxy_acr`` for certified accuracy or ACR), ``mode`` the
    metric's better direction, ``grace_period`` 1, ``reduction_factor`` 2, ``max_t`` the most
    epochs any trial runs. ``scheduler: null`` turns it off.
    """

    metric: str
    mode: Literal["max", "min"]
    grace_period: int
    reduction_factor: float
    max_t: int


@dataclass(frozen=True)
class ResourceSettings:
    """What each trial's Ray Train workers take; the trial's Tune function adds
    :data:`TRIAL_DRIVER_CPUS`."""

    workers_per_trial: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0


@dataclass(frozen=True)
class RankSettings:
    """The rank stage: every trial that trains to the end is certified on the first
    ``images`` of the validation hold-out (n, n0, alpha); its figures are the objective.
    ``sequential``: each image stops once the grid radii it can reach and the objective's
    radii (``radii``, filled in from the objective) are decided, n being the most it spends
    (:mod:`cadis.smoothing.sequential`)."""

    n: int = 500
    n0: int = 100
    alpha: float = 0.001
    images: int = 100
    batch_size: int | None = None  # noise draws per forward; None: what is fast on the device
    sequential: bool = False
    radii: tuple[float, ...] = ()


@dataclass(frozen=True)
class MlflowSettings:
    """``tracking_uri`` None means ``$MLFLOW_TRACKING_URI``, else the local SQLite store."""

    tracking_uri: str | None
    experiment: str


@dataclass
class SweepConfig:
    """A validated sweep. Guaranteed: ``base`` passed :func:`cadis.finetuning.config.validate`,
    with ``base.certify is certify``, ``base.workers == resources.workers_per_trial`` and
    ``base.cpus_per_worker == resources.cpus_per_worker``; ``search`` is not empty and every
    value it can produce is valid on ``base``; one or two objectives; ``scheduler`` (None:
    every trial runs all its epochs) stops on a per-epoch metric with ``max_t`` at least the
    most epochs any trial runs."""

    name: str
    base: TrainConfig
    search: dict[str, Distribution]
    objective: list[Objective]
    scheduler: AshaSettings | None
    num_trials: int
    max_concurrent_trials: int
    resources: ResourceSettings
    certify: CertifyConfig
    rank: RankSettings
    top_k: int
    store_draws: bool
    mlflow: MlflowSettings
    results_dir: str
    # Where the shared stores live (default results_dir/draws). Each store is keyed by what its
    # draws depend on, not by method, so sweeps of other methods at the same sigma may share it.
    draws_dir: str

    @property
    def grid_size(self) -> int:
        """Grid points: the product of the grid lengths (1 without a grid)."""
        return math.prod(len(d.values) for d in self.search.values() if d.kind == "grid")

    @property
    def searcher(self) -> str:
        """:data:`SEARCHER_OPTUNA`, or :data:`SEARCHER_BASIC` when a grid is searched."""
        has_grid = any(d.kind == "grid" for d in self.search.values())
        return SEARCHER_BASIC if has_grid else SEARCHER_OPTUNA

    @property
    def draws_vary_with(self) -> list[str]:
        """The searched keys that the stored draws depend on (σ, the seed, the hold-out, the
        proxy, the models): with any, every trial denoises its own draws."""
        searched = set(self.search)
        variants = self.search.get(VARIANT_KEY)
        if variants is not None:
            searched |= {key for variant in variants.values for key in variant}
        return sorted(searched & set(DRAW_KEYS))

    @property
    def shares_draws(self) -> bool:
        """Whether the rank stage's and the proxy's draws are denoised once for all trials."""
        return self.store_draws and not self.draws_vary_with

    @property
    def total_trials(self) -> int:
        """Trials that run: ``num_trials`` repeats of the grid (``num_trials`` without one)."""
        return self.num_trials * self.grid_size

    def tracking_uri(self) -> str:
        """The MLflow tracking URI: the file's (or ``--set``'s), else
        ``$MLFLOW_TRACKING_URI``, else the local SQLite store ``runs/sweeps/mlflow.db`` made
        absolute on the machine that calls this (the sweep's driver)."""
        return self.mlflow.tracking_uri or default_tracking_uri()


# ------------------------------------------------------------------------------- loading


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> SweepConfig:
    """Read a sweep file, apply ``--set key=value`` items in order and validate it all.

    Override keys: ``base.KEY`` (also ``base.certify.n``) or a bare base key (``lr=1e-3``) go
    to the base; ``section.KEY`` writes into ``search``, ``objective``, ``scheduler`` (turning
    ASHA on if the file had ``scheduler: null``), ``resources``, ``certify`` or ``mlflow``;
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
    if head == "base" or head in SECTIONS or key in TOP_LEVEL_KEYS or head not in _base_keys():
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
    elif head in _base_keys():
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
    final = {key: value for key, value in stages["final"].items() if key != "top_k"}
    # The base and resources passed above: all this can still refuse is a certify value.
    try:
        base = from_mapping({**base.to_dict(), "workers": resources.workers_per_trial,
                             "cpus_per_worker": resources.cpus_per_worker,
                             "certify": {**base.to_dict()["certify"], **final}})
    except CadisError as error:
        raise CadisError(str(error).replace("certify.", "certify.final.", 1)) from None
    rank = _parse_rank(stages["rank"], base)
    search = _parse_search(data.get("search"), base)
    num_trials = _positive_integer("num_trials", data.get("num_trials"),
                                   "trials to run; with a grid, repeats of the grid")
    max_concurrent = _positive_integer("max_concurrent_trials",
                                       data.get("max_concurrent_trials", 1),
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
                        certify=base.certify, rank=rank, top_k=DEFAULT_TOP_K,
                        store_draws=_flag("store_draws", data.get("store_draws", True)),
                        mlflow=MlflowSettings(tracking_uri, experiment), results_dir=results_dir,
                        draws_dir=draws_dir)
    if base.train_draws and not sweep.shares_draws:
        why = ("store_draws is false" if not sweep.store_draws else
               f"the draws depend on the searched {', '.join(sweep.draws_vary_with)}")
        raise CadisError(f"base.train_draws needs draws shared by every trial, but {why}; "
                         "set train_draws: 0")
    top_k = stages["final"].get("top_k", min(DEFAULT_TOP_K, sweep.total_trials))
    sweep.top_k = _positive_integer("certify.final.top_k", top_k,
                                    "trials certified on the test set")
    if sweep.top_k > sweep.total_trials:
        raise CadisError(f"certify.final.top_k ({sweep.top_k}) is above the {sweep.total_trials} "
                         "trials of the sweep")
    return sweep


def _stages(section: Any) -> dict[str, dict[str, Any]]:
    """``certify:``'s two stage mappings (absent: defaults), their keys checked."""
    section = _mapping_or_empty("certify", section)
    stages = {}
    for key in section:
        if key not in STAGES:
            where = [f"certify.{stage}.{key} ({STAGE_SETS[stage]})" for stage in STAGES
                     if key in STAGE_KEYS[stage]]
            hint = (f"; the certification has two stages: write {' or '.join(where)}"
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
    parsers = {"alpha": _number, "sequential": _flag}
    rank = RankSettings(**{key: parsers[key](f"certify.rank.{key}", value)
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


def _number(key: str, value: Any) -> float:
    """A finite real; strings too, since YAML reads ``1e-3`` (no dot) as a string."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if is_real(value) and math.isfinite(float(value)):
        return float(value)
    raise CadisError(f"{key} must be a number, got {value!r}")


def _flag(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise CadisError(f"{key} must be true or false, got {value!r}")


def _integer(key: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise CadisError(f"{key} must be an integer, got {value!r}")


def _positive_integer(key: str, value: Any, meaning: str) -> int:
    if value is None:
        raise CadisError(f"{key} is required: an integer >= 1 ({meaning})")
    if _integer(key, value) < 1:
        raise CadisError(f"{key} must be an integer >= 1 ({meaning}), got {value!r}")
    return value


# ----------------------------------------------------------------------------- resources


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
    workers = _integer("resources.workers_per_trial", chosen["workers_per_trial"])
    if workers < 1:
        raise CadisError(f"resources.workers_per_trial must be an integer >= 1, got {workers}")
    cpus = _number("resources.cpus_per_worker", chosen["cpus_per_worker"])
    gpus = _number("resources.gpus_per_worker", section.get("gpus_per_worker", 0.0))
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


def required_per_trial(sweep: SweepConfig) -> dict[str, float]:
    """``{"CPU": ..., "GPU": ...}`` one running trial holds: its workers plus
    :data:`TRIAL_DRIVER_CPUS` for the trial's Tune function. ``max_concurrent_trials`` times this must fit the cluster."""
    resources = sweep.resources
    return {"CPU": TRIAL_DRIVER_CPUS + resources.workers_per_trial * resources.cpus_per_worker,
            "GPU": resources.workers_per_trial * resources.gpus_per_worker}


# -------------------------------------------------------------------------------- search


def _base_keys() -> list[str]:
    return list(TrainConfig().to_dict())


def _integer_keys() -> set[str]:
    """Base keys (as users write them) that take only integers, ``None`` aside."""
    user_keys = {attribute: user for user, attribute in RENAMED.items()}
    hints = typing.get_type_hints(TrainConfig)
    return {user_keys.get(name, name) for name, hint in hints.items()
            if hint is int or set(typing.get_args(hint)) == {int, type(None)}}


def _with(base_values: Mapping[str, Any], params: Mapping[str, Any]) -> TrainConfig:
    """The base with searched values applied (a variant's mapping applied key by key)."""
    values = dict(base_values)
    for key, value in params.items():
        if key == VARIANT_KEY:
            values.update(value)
        else:
            values[key] = value
    return from_mapping(values)


def _parse_search(spec: Any, base: TrainConfig) -> dict[str, Distribution]:
    if not spec:
        raise CadisError("search is empty: name at least one base key to search, e.g. "
                         "search: {lambda: {uniform: [0.5, 8]}}")
    if not isinstance(spec, dict):
        raise CadisError(f"search must be a mapping of base keys to distributions, got {spec!r}")
    base_keys = _base_keys()
    search = {}
    for key, key_spec in spec.items():
        if key in NOT_SEARCHABLE:
            raise CadisError(f"search.{key}: not searchable: {NOT_SEARCHABLE[key]}")
        if key not in base_keys and key != VARIANT_KEY:
            raise CadisError(f"search.{key}: unknown key; allowed: {VARIANT_KEY} or a base key "
                             f"({', '.join(k for k in base_keys if k not in NOT_SEARCHABLE)})")
        search[key] = _parse_distribution(key, key_spec)
    base_values = base.to_dict()
    for key, distribution in search.items():
        if key == VARIANT_KEY:
            _check_variants(distribution, search, base_values)
        else:
            _check_values(key, distribution, base_values)
    _check_searched_keys_matter(search, base)
    if not any(d.kind == "grid" for d in search.values()):
        # Optuna's categorical distribution holds only scalars; Tune's grid holds anything.
        for key, distribution in search.items():
            if distribution.kind == "choice" and not all(
                    value is None or isinstance(value, (bool, int, float, str))
                    for value in distribution.values):
                raise CadisError(f"search.{key}: choice takes numbers, strings, booleans or null "
                                 "(Optuna's categories); use grid for lists and mappings")
    return search


def _check_searched_keys_matter(search: Mapping[str, Distribution], base: TrainConfig) -> None:
    """Refuse a searched key that every trial's method ignores (:data:`IGNORED_BY_METHOD`):
    its trials would differ in a name only."""
    method = search.get("method")
    variants = search.get(VARIANT_KEY)
    if method is not None:
        methods = set(method.values)
    elif variants is not None:
        methods = {variant.get("method", base.method) for variant in variants.values}
    else:
        methods = {base.method}
    for key in search:
        reasons = [IGNORED_BY_METHOD.get(name, {}).get(key) for name in sorted(methods)]
        if all(reasons):
            raise CadisError(f"search.{key}: searches nothing: every trial runs method "
                             f"{', '.join(sorted(methods))}, which ignores {key} ({reasons[0]}); "
                             f"search it with method ft_cadis or leave it out of search")


def _parse_distribution(key: str, spec: Any) -> Distribution:
    where = f"search.{key}"
    if not isinstance(spec, dict) or not spec:
        raise CadisError(f"{where}: write one of {', '.join(DISTRIBUTIONS)}, e.g. "
                         f"{{uniform: [0.5, 8]}}; got {spec!r}")
    unknown = [name for name in spec if name not in DISTRIBUTIONS]
    if unknown:
        raise CadisError(f"{where}: unknown distribution {unknown[0]!r}; allowed: "
                         f"{', '.join(DISTRIBUTIONS)}")
    if len(spec) > 1:
        raise CadisError(f"{where}: one distribution per key, got {' and '.join(spec)}")
    (kind, values), = spec.items()
    if kind in ("choice", "grid"):
        if not isinstance(values, list) or not values:
            raise CadisError(f"{where}: {kind} takes a non-empty list of values, got {values!r}")
        if key == VARIANT_KEY and kind != "grid":
            raise CadisError(f"{where}: only grid is allowed: a variant is a set of base keys "
                             f"applied together, each in its own trials; got {kind}")
        return Distribution(kind, tuple(values))
    if key == VARIANT_KEY:
        raise CadisError(f"{where}: only grid is allowed: a variant is a set of base keys "
                         f"applied together; got {kind}")
    if not isinstance(values, list) or len(values) != 2:
        raise CadisError(f"{where}: {kind} takes [low, high], got {values!r}")
    if kind == "int":
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise CadisError(f"{where}: int takes integer bounds [low, high], got {values!r}")
        low, high = values
    else:
        low, high = (_number(f"{where} bound", value) for value in values)
    if not low < high:
        raise CadisError(f"{where}: {kind} needs low < high, got [{low}, {high}]"
                         + ("; for one value, leave the key out of search and set it in base"
                            if low == high else ""))
    if kind == "loguniform" and not low > 0:
        raise CadisError(f"{where}: loguniform needs low > 0, got [{low}, {high}]")
    return Distribution(kind, (low, high))


def _check_values(key: str, distribution: Distribution, base_values: Mapping[str, Any]) -> None:
    """Every value the distribution can produce must pass the base's validation."""
    if distribution.kind in ("uniform", "loguniform") and key in _integer_keys():
        raise CadisError(f"search.{key}: {key} takes integers but {distribution.kind} draws "
                         "fractions; use int")
    candidates: Sequence[Any] = distribution.values
    if distribution.kind == "int":
        low, high = distribution.values
        if high - low < MAX_ENUMERATED_INTS:
            candidates = range(low, high + 1)
    for value in candidates:
        try:
            _with(base_values, {key: value})
        except CadisError as error:
            raise CadisError(f"search.{key}: {error}") from None


def _check_variants(distribution: Distribution, search: Mapping[str, Distribution],
                    base_values: Mapping[str, Any]) -> None:
    base_keys = _base_keys()
    for index, variant in enumerate(distribution.values):
        where = f"search.{VARIANT_KEY}[{index}]"
        if not isinstance(variant, dict) or not variant:
            raise CadisError(f"{where}: a variant is a non-empty mapping of base keys, e.g. "
                             f"{{finetune: lora, lora_rank: 4}}; got {variant!r}")
        for key in variant:
            if key in NOT_SEARCHABLE:
                raise CadisError(f"{where}.{key}: not searchable: {NOT_SEARCHABLE[key]}")
            if key not in base_keys:
                raise CadisError(f"{where}.{key}: unknown key; allowed: a base key "
                                 f"({', '.join(k for k in base_keys if k not in NOT_SEARCHABLE)})")
            if key in search:
                raise CadisError(f"{where}.{key}: {key} is also searched on its own; search it "
                                 "in one place")
        try:
            _with(base_values, {VARIANT_KEY: variant})
        except CadisError as error:
            raise CadisError(f"{where}: {error}") from None


def largest_value(search: Mapping[str, Distribution], base: TrainConfig, key: str) -> float:
    """The largest value of a numeric base key over every trial of the search."""
    base_value = base.to_dict()[key]
    distribution = search.get(key)
    if distribution is not None:
        if distribution.kind in RANGE_KINDS:
            return distribution.values[1]
        return max(float(value) for value in distribution.values)
    variants = search.get(VARIANT_KEY)
    if variants is not None:
        return max(float(variant.get(key, base_value)) for variant in variants.values)
    return base_value


# --------------------------------------------------------------------- objective and ASHA


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
    for n, alpha, source in [count for count in counts if sequential.get(count[2])]:
        # The sequential test splits alpha over its looks: it needs a few more draws.
        needed = draws_to_reach(radius, sigma, alpha)
        if needed > n:
            raise CadisError(f"{where}: {metric} is beyond what {source}={n} can certify "
                             f"sequentially at sigma {sigma}: {source} needs at least "
                             f"{needed}, or pick a smaller radius")
    for n, alpha, source in [count for count in counts if not sequential.get(count[2])]:
        reach = max_certifiable_radius(sigma, n, alpha)
        if radius > reach:
            raise CadisError(f"{where}: {metric} is beyond what {source}={n} can certify at "
                             f"sigma {sigma} (at most {reach:.3f}): {source} needs at least "
                             f"{draws_needed(radius, sigma, alpha)}, or pick a smaller radius")


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
        if mode not in MODES:
            raise CadisError(f"objective.mode must be max or min, got {mode!r}")
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
    mode = section.get("mode", EPOCH_METRIC_MODES.get(metric, "max"))
    if mode not in MODES:
        raise CadisError(f"scheduler.mode must be max or min, got {mode!r}")
    grace_period = _positive_integer("scheduler.grace_period", section.get("grace_period", 1),
                                     "epochs every trial runs before it can be stopped")
    reduction_factor = _number("scheduler.reduction_factor",
                               section.get("reduction_factor", 2))
    if not reduction_factor > 1:
        raise CadisError(f"scheduler.reduction_factor must be > 1 (ASHA keeps 1/factor of the "
                         f"trials at each rung), got {reduction_factor}")
    most_epochs = int(largest_value(search, base, "epochs"))
    max_t = _positive_integer("scheduler.max_t", section.get("max_t", most_epochs),
                              "epochs after which ASHA stops any trial")
    if max_t < most_epochs:
        raise CadisError(f"scheduler.max_t ({max_t}) is below the {most_epochs} epochs a trial "
                         "can run: it would stop trials before their last epoch")
    if grace_period > max_t:
        raise CadisError(f"scheduler.grace_period ({grace_period}) must be <= max_t ({max_t})")
    return AshaSettings(metric, mode, grace_period, reduction_factor, max_t)


# ---------------------------------------------------------------------- Tune and people


def trial_config(sweep: SweepConfig, params: Mapping[str, Any]) -> TrainConfig:
    """One trial's training configuration: the base with the values Tune chose (``params``,
    keyed like :attr:`SweepConfig.search`). Validated; a combination of separately searched
    keys that the base refuses (checked one key at a time at load) raises here."""
    try:
        return _with(sweep.base.to_dict(), params)
    except CadisError as error:
        raise CadisError(f"trial with {dict(params)}: {error}") from None


def _format_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {item}" for key, item in value.items()) + "}"
    return str(value)


def describe(sweep: SweepConfig) -> str:
    """The resolved sweep in a few lines: trials and searcher, search space, objective,
    scheduler, resources, certification and where it is tracked."""
    if sweep.searcher == SEARCHER_BASIC:
        trials = (f"{sweep.total_trials} trials ({sweep.grid_size} grid points x num_trials "
                  f"{sweep.num_trials}); Tune's grid and random search (Optuna cannot take a grid)")
    else:
        front = " (a Pareto front)" if len(sweep.objective) == 2 else ""
        trials = f"{sweep.num_trials} trials; Optuna TPE{front}"
    resources = sweep.resources
    need = required_per_trial(sweep)
    certify = sweep.certify
    lines = [f"sweep {sweep.name}: {trials}; at most {sweep.max_concurrent_trials} at a time",
             "search:"]
    lines += [f"  {key}: {distribution.describe()}" for key, distribution in sweep.search.items()]
    lines.append("objective: " + ", ".join(f"{o.metric} ({o.mode})" for o in sweep.objective))
    if sweep.scheduler is None:
        lines.append("scheduler: none, every trial runs all its epochs")
    else:
        asha = sweep.scheduler
        lines.append(f"scheduler: ASHA on {asha.metric} ({asha.mode}) per epoch, grace_period "
                     f"{asha.grace_period}, reduction_factor {asha.reduction_factor:g}, "
                     f"max_t {asha.max_t}")
    lines.append(f"resources per trial: {resources.workers_per_trial} worker(s) x "
                 f"({resources.cpus_per_worker:g} CPU, {resources.gpus_per_worker:g} GPU) + "
                 f"{TRIAL_DRIVER_CPUS:g} CPU for the trial's driver = {need['CPU']:g} CPU, "
                 f"{need['GPU']:g} GPU")
    rank = sweep.rank
    lines.append(f"rank stage (the objective): the first {rank.images} of "
                 f"{sweep.base.val_images} validation images (seed {sweep.base.val_seed}), "
                 f"n={rank.n} n0={rank.n0} alpha={rank.alpha:g}"
                 + (" (sequential: n at most)" if rank.sequential else "")
                 + ", every trial that trains to the end")
    lines.append(f"final stage: the top {sweep.top_k} by rank on the test set, n={certify.n} "
                 f"n0={certify.n0} alpha={certify.alpha:g} skip={certify.skip} "
                 f"max_images={certify.max_images}"
                 + (" (sequential: n at most)" if certify.sequential else "")
                 + (f"; its draws denoised once, for every finalist, in {certify.draws_dir}"
                    if certify.draws_dir else ""))
    lines.append(f"proxy per epoch: {sweep.base.proxy_images} validation images, "
                 f"n={sweep.base.proxy_n} n0={sweep.base.proxy_n0}")
    if sweep.shares_draws:
        roles = ("the rank stage's, the proxy's and the training draws "
                 f"({sweep.base.train_draws} per image)" if sweep.base.train_draws
                 else "the rank stage's and the proxy's")
        lines.append(f"draws: {roles} denoised once for every trial "
                     f"(in {sweep.draws_dir})")
    else:
        why = ("store_draws is false" if not sweep.store_draws else
               f"they depend on the searched {', '.join(sweep.draws_vary_with)}")
        lines.append(f"draws: every trial denoises its own ({why})")
    lines.append(f"mlflow: {sweep.tracking_uri()} (experiment {sweep.mlflow.experiment})")
    lines.append(f"results: {sweep.results_dir}")
    return "\n".join(lines)
