"""What a sweep is, once validated: the dataclasses :func:`cadis.sweeps.parse.load_sweep` returns.

A sweep names a training configuration (``base:``, see :mod:`cadis.finetuning.config`), the
base keys to search and how (:class:`Distribution`), the objective, the ASHA scheduler, the
trial budget, what one trial needs of a cluster, the two certification stages and where
MLflow tracks it. Reading and checking a sweep file is :mod:`cadis.sweeps.parse`'s job; the
search space's :mod:`cadis.sweeps.search_space`'s; saying it in a few lines
:mod:`cadis.sweeps.describe`'s.

Grids and trial counts: Optuna cannot take Tune's ``grid_search`` (Ray refuses to convert
it), so a sweep with any ``grid`` runs on Tune's BasicVariantGenerator instead: every grid
point (the product over grid keys) is run ``num_trials`` times, the other distributions drawn
at random for each. ``num_trials`` then counts repeats of the grid, not trials;
:attr:`SweepConfig.total_trials` is what runs. Without a grid, Optuna's TPE proposes
``num_trials`` trials (two objectives: a Pareto front).

TPE's settings (``searcher:``, :class:`TpeSettings`): how many finished trials it waits for
before it models, whether it models the searched keys jointly, whether running trials count
as bad guesses, and its seed. Grids have none.

The incumbent: an Optuna sweep runs its ``base`` as a trial of its own (``incumbent: true``,
the default), the first Tune starts and one of ``num_trials``, so that the sweep can say
whether its search beat the recipe it started from (docs/design.md §6.3). Grids have none:
their arms are explicit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from cadis.finetuning.config import CertifyConfig, TrainConfig
from cadis.sweeps.distribution_text import describe_distribution
from cadis.sweeps.objective import Objective
from cadis.tracking.server import default_tracking_uri

DistributionKind = Literal["uniform", "loguniform", "int", "choice", "grid"]
DISTRIBUTIONS: tuple[DistributionKind, ...] = ("uniform", "loguniform", "int", "choice", "grid")
# The reserved searched key whose grid values are mappings of base keys applied together.
VARIANT_KEY = "variant"

# A trial's Tune function only starts its Train run and waits (certification runs in a task
# with one worker's resources): a quarter CPU, not Tune's default of one, lets two trials of
# 0.5-CPU workers share two 1-CPU nodes (docs/design.md).
TRIAL_DRIVER_CPUS = 0.25

SEARCHER_OPTUNA = "optuna"
SEARCHER_BASIC = "basic-variant"

# The key the searcher adds to the incumbent's Tune config: the scheduler, the MLflow
# callback and the final stage know the incumbent by it (on resume too: Tune keeps a trial's
# config); :func:`cadis.sweeps.search_space.trial_config` drops it.
INCUMBENT_PARAM = "cadis_incumbent"

# Searchable base keys the stored draws depend on. The draws also depend on the images
# (dataset, data_root, image_size, val_images, val_seed, proxy_images, max_train_images), but
# those cannot be searched (cadis.sweeps.search_space.NOT_SEARCHABLE), so they never vary.
DRAW_KEYS = ("models", "classifier", "denoiser", "sigma", "seed", "proxy_n", "proxy_n0")


@dataclass(frozen=True)
class Distribution:
    """How one searched key is drawn. Guaranteed after loading: every value it can produce
    passed the base's validation (integer ranges wider than
    :data:`cadis.sweeps.search_space.MAX_ENUMERATED_INTS` values and continuous ranges by
    their bounds).

    ``values`` is ``(low, high)`` for the ranges (floats; ints for ``int``, both included),
    the options for ``choice`` and ``grid`` (mappings of base keys for ``variant``).
    """

    kind: DistributionKind
    values: tuple[Any, ...]

    def describe(self) -> str:
        """As the sweep's parent run logs it (:mod:`cadis.sweeps.distribution_text`)."""
        return describe_distribution(self.kind, self.values)

    def contains(self, value: Any) -> bool:
        """Whether this distribution can draw ``value``: a range's bounds are included (an
        ``int`` range draws integers only), a choice or grid draws its options."""
        if self.kind in ("choice", "grid"):
            return value in self.values
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "int" and not isinstance(value, int):
            return False
        low, high = self.values
        return math.isfinite(value) and low <= value <= high


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
class RaceSettings:
    """The racing stage (F-race, :mod:`cadis.sweeps.racing`), between rank and final: the
    ranked trials not separated from the leader on the rank stage's images are certified on
    further ``block``-image blocks of the validation hold-out, up to its first
    ``max_images`` (at most ``base.val_images``), with the rank stage's n, n0 and alpha; a
    contender significantly behind the leader (Holm within each look at ``family_alpha``)
    leaves. It stops when one is left, the images are used up, or ``budget_seconds`` of
    certification (None: no limit) are spent. ``enabled: false`` takes the top_k by rank."""

    block: int = 100
    max_images: int = 500
    family_alpha: float = 0.05
    budget_seconds: float | None = None
    enabled: bool = True


# TPE's startup phase. Before the model, Optuna proposes at random until n_startup_trials
# trials have finished (completed or pruned; an enqueued point such as the incumbent counts
# once it finishes, and so do a warm start's trials). By default a quarter of num_trials is
# proposed before the model (the incumbent among them): fewer leaves TPE's split into good
# and bad trials resting on one or two values, more spends the small budgets cadis runs on
# random search. Capped at Optuna's own default of 10, which larger sweeps need no more of,
# and never below 2 finished trials, so that the first model has a good and a bad one.
STARTUP_SHARE = 4
MAX_STARTUP_TRIALS = 10
MIN_STARTUP_TRIALS = 2
# numpy's RandomState, which Optuna's samplers seed, takes seeds in [0, 2**32 - 1].
MAX_SEARCHER_SEED = 2**32 - 1


def default_startup_trials(num_trials: int, max_concurrent_trials: int) -> int:
    """``searcher.n_startup_trials`` when the file leaves it out: a quarter of ``num_trials``
    (at most :data:`MAX_STARTUP_TRIALS`) proposed before the model, less the trials proposed
    while others still run (trial k is proposed once k - max_concurrent_trials have
    finished), at least :data:`MIN_STARTUP_TRIALS`. 16 trials: the model proposes trial 5,
    one at a time or two."""
    proposed_before_model = min(MAX_STARTUP_TRIALS, math.ceil(num_trials / STARTUP_SHARE))
    return max(MIN_STARTUP_TRIALS, proposed_before_model - (max_concurrent_trials - 1))


@dataclass(frozen=True)
class TpeSettings:
    """Optuna's TPE as the sweep file's ``searcher:`` section sets it (Optuna sweeps only).

    ``n_startup_trials``: finished trials (the incumbent among them) before TPE models; the
    default is :func:`default_startup_trials`. ``multivariate``: one joint density over the
    searched keys instead of one per key (Optuna's default for one objective, also used for
    two here). ``constant_liar``: a running trial counts as a bad result, so that trials
    proposed while others run are not proposed next to them (it changes nothing one trial at
    a time). ``seed``: the sampler's, default the base's ``seed``; replicate sweeps change it
    alone, keeping the stored draws the base's seed keys."""

    n_startup_trials: int
    multivariate: bool
    constant_liar: bool
    seed: int

    def first_modelled_trial(self, max_concurrent_trials: int) -> int:
        """The first trial (counted from 1) TPE proposes from its model: trial k is proposed
        once k - ``max_concurrent_trials`` trials have finished (Tune keeps that many live;
        fewer at a time, as on a cluster that holds fewer, models sooner). A warm start's
        trials count as finished before the first, so a warm-started sweep models sooner."""
        return self.n_startup_trials + max_concurrent_trials


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
    most epochs any trial runs; ``incumbent`` only on an Optuna sweep, and then the base's
    value of every searched key lies in that key's distribution; ``tpe`` set exactly on an
    Optuna sweep."""

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
    race: RaceSettings
    top_k: int
    # Whether the base runs as a trial of its own (Optuna sweeps only; see the module).
    incumbent: bool
    store_draws: bool
    mlflow: MlflowSettings
    results_dir: str
    # Where the shared stores live (default results_dir/draws). Each store is keyed by what its
    # draws depend on, not by method, so sweeps of other methods at the same sigma may share it.
    draws_dir: str
    # certify.final.seeds: the training seeds of each finalist and of the incumbent in the final
    # stage, the search's own and final_seeds - 1 more (cadis.sweeps.final_stage).
    final_seeds: int = 1
    # The searcher: section, resolved (None on a grid sweep, which Optuna does not search).
    tpe: TpeSettings | None = None

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
    def incumbent_point(self) -> dict[str, Any] | None:
        """The incumbent's searched values (the base's value of every searched key), the
        first point Optuna evaluates; None for a sweep without an incumbent."""
        if not self.incumbent:
            return None
        base = self.base.to_dict()
        return {key: base[key] for key in self.search}

    @property
    def draws_vary_with(self) -> list[str]:
        """The searched keys that the stored draws depend on (σ, the seed, the proxy's n and
        n0, the models): with any, every trial denoises its own draws."""
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


def is_incumbent(params: Mapping[str, Any]) -> bool:
    """Whether a trial's Tune config (``params``) is the incumbent's."""
    return bool(params.get(INCUMBENT_PARAM, False))


def required_per_trial(sweep: SweepConfig) -> dict[str, float]:
    """``{"CPU": ..., "GPU": ...}`` one running trial holds: its workers plus
    :data:`TRIAL_DRIVER_CPUS` for the trial's Tune function. ``max_concurrent_trials`` times this must fit the cluster."""
    resources = sweep.resources
    return {"CPU": TRIAL_DRIVER_CPUS + resources.workers_per_trial * resources.cpus_per_worker,
            "GPU": resources.workers_per_trial * resources.gpus_per_worker}
