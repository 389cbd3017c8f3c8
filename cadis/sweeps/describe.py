"""A resolved sweep in a few lines, for people (``cadis sweep --dry-run``, the sweep's log
and its MLflow parent run)."""

from __future__ import annotations

from cadis.sweeps.racing import TIE_BREAK, why_not_raced
from cadis.sweeps.spec import SEARCHER_BASIC, TRIAL_DRIVER_CPUS, SweepConfig, required_per_trial


def describe(sweep: SweepConfig) -> str:
    """The resolved sweep in a few lines: trials and searcher, search space, the incumbent,
    which trials TPE proposes from its model, objective, scheduler, resources, certification
    (rank, racing, final stages) and where it is tracked."""
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
    lines.append(_incumbent_line(sweep))
    if sweep.tpe is not None:
        lines.append(_tpe_line(sweep))
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
    lines.append(_race_line(sweep))
    finalists = (f"the race's finalists (at most {sweep.top_k})" if why_not_raced(sweep) is None
                 else f"the top {sweep.top_k} by rank")
    lines.append(f"final stage: {finalists} on the test set, n={certify.n} "
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


def _race_line(sweep: SweepConfig) -> str:
    """The racing stage's settings, or why the sweep has none."""
    why = why_not_raced(sweep)
    if why is not None:
        return f"racing stage: off ({why})"
    race = sweep.race
    budget = ("no budget" if race.budget_seconds is None
              else f"a budget of {race.budget_seconds:g} s of certification")
    return (f"racing stage: the ranked trials on blocks of {race.block} further validation "
            f"images up to the first {race.max_images}, with the rank stage's n, n0 and alpha; "
            f"a trial behind the leader leaves (Holm within each look, family_alpha "
            f"{race.family_alpha:g}); {budget}; finalists ordered by {TIE_BREAK}")


def _tpe_line(sweep: SweepConfig) -> str:
    """Which trials TPE proposes at random and which from its model, and how it models."""
    tpe = sweep.tpe
    assert tpe is not None
    at_once = sweep.max_concurrent_trials
    first = tpe.first_modelled_trial(at_once)
    before = min(first - 1, sweep.num_trials)
    randoms = before - (1 if sweep.incumbent else 0)
    startup = [f"{randoms} random"] if randoms else []
    if sweep.incumbent:
        startup.insert(0, "the incumbent")
    if first <= sweep.num_trials:
        plan = (f"{_trials(1, before)}: {' and '.join(startup)}, then "
                f"{_trials(first, sweep.num_trials)} from the model")
    else:
        plan = f"{' and '.join(startup)} of {sweep.num_trials} trials: it never models"
    plan += f" ({at_once} at a time)" if at_once > 1 else ""
    if not tpe.constant_liar:
        liar = "no constant liar"
    else:
        liar = "constant liar" if at_once > 1 else "constant liar (idle: one trial at a time)"
    waits = (f"{tpe.n_startup_trials} finished trial{'s' if tpe.n_startup_trials > 1 else ''}"
             f"{' (the incumbent among them)' if sweep.incumbent else ''}")
    return (f"searcher: TPE, random until {waits}: {plan}; "
            f"{'multivariate' if tpe.multivariate else 'one density per key'}, {liar}, "
            f"seed {tpe.seed}")


def _trials(first: int, last: int) -> str:
    """``trial 3`` or ``trials 3-5``."""
    return f"trial {first}" if first == last else f"trials {first}-{last}"


def _incumbent_line(sweep: SweepConfig) -> str:
    """Whether the base runs as a trial of its own, and with which searched values."""
    point = sweep.incumbent_point
    if point is None:
        why = ("a grid's arms are explicit" if sweep.searcher == SEARCHER_BASIC
               else "incumbent: false")
        return f"incumbent: none ({why})"
    values = ", ".join(f"{key}={value}" for key, value in point.items())
    spared = "" if sweep.scheduler is None else ", never stopped by ASHA"
    return (f"incumbent: the base ({values}) is trial 1 of {sweep.num_trials}{spared}, "
            f"certified on the test set in the final stage")
