"""Does the per-epoch proxy rank trials the way the objective does, and does it see its own
differences? Measured on trials that all train to the end (no scheduler).

Trains ``--trials`` configurations of the sweep file's search space (default: the default
sweep's), every one to its last epoch and none stopped: the first is the sweep file's base
(the incumbent), the others drawn at random from the search space (``--seed``). Every trial
trains on the sweep's stored training draws, exactly as a sweep trial's loop does (the same
``train_loop``, here in this process, one trial after another), keeping the checkpoint of each
epoch. Then, per trial:

- the objective: the sweep's rank stage on the last checkpoint (the same function, the same
  stored draws: the first ``certify.rank.images`` validation images, sequential, n at most
  ``certify.rank.n``), the sweep objective's value;
- every epoch's classifier on one store of the proxy's draws of the whole validation
  hold-out (``proxy_n0 + proxy_n`` draws of each of ``val_images`` images, the first
  ``proxy_images`` of them the very draws the sweep's proxy reads): each draw's predicted
  class, kept in ``predictions/epoch_NNN.npy``.

Each candidate proxy is computed from those predictions: a statistic per image, averaged over
the first ``images`` images, reading the first ``n0`` selection and ``n`` estimation draws of
each (:func:`candidates`). Per epoch and candidate it prints:

- Spearman's rank correlation with the objective over the trials, with a percentile bootstrap
  95% interval (trials resampled);
- the proxy's paired noise (the standard error of the mean per-image difference between two
  trials on the same draws, median over the pairs of trials) against its spread (the standard
  deviation of the trials' values): a proxy whose spread is not well above its noise cuts
  trials on noise;
- its cost: the classifier forwards it reads, in seconds at the speed measured here.

    .venv/bin/python benchmarks/proxy_fidelity.py --scratch /tmp/fidelity [--draws DIR] \\
        --records docs/results/proxy-fidelity
    .venv/bin/python benchmarks/proxy_fidelity.py --report-only docs/results/proxy-fidelity

The records (``--records``, default SCRATCH/records) are what the report reads and nothing
else: every epoch's draw predictions of every trial and a small ``inputs.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import norm, spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cadis.draws.certification_store import DrawStore  # noqa: E402
from cadis.draws.folder import STORE_META  # noqa: E402
from cadis.draws.keys import PROXY_ROLE, RANK_ROLE, TRAIN_ROLE  # noqa: E402
from cadis.finetuning.checkpoint import load_trained, read_metadata  # noqa: E402
from cadis.finetuning.fit import CHECKPOINT_PATTERN, CHECKPOINTS_DIR, LocalSession  # noqa: E402
from cadis.finetuning.loop import train_loop  # noqa: E402
from cadis.models.classifier import load_classifier  # noqa: E402
from cadis.models.devices import pick_device  # noqa: E402
from cadis.smoothing.bounds import certify_from_counts, lower_confidence_bound  # noqa: E402
from cadis.smoothing.paired import certified_at  # noqa: E402
from cadis.smoothing.records import RECORDS_FILENAME, read_records  # noqa: E402
from cadis.smoothing.smooth import evaluating  # noqa: E402
from cadis.sweeps.parse import load_sweep  # noqa: E402
from cadis.sweeps.search_space import trial_config  # noqa: E402
from cadis.sweeps.stores import build_sweep_stores  # noqa: E402
from cadis.sweeps.trial import certify_rank, figures_of  # noqa: E402
from cadis.tracking.contract import PROXY_ACR, PROXY_SECONDS, radius_of_metric  # noqa: E402

#: The report's records: every epoch's draw predictions, and everything else it reads.
PREDICTIONS = "predictions.npz"
INPUTS = "inputs.json"
#: Bootstrap resamples of the trials for each correlation's interval.
BOOTSTRAP = 2000
#: A count estimate of 0 or N draws is moved half a draw inward, so that Phi^-1 is finite.
HALF_DRAW = 0.5


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A proxy: ``statistic`` per image, averaged over the first ``images`` validation
    images, each read through its first ``n0`` selection and ``n`` estimation draws."""

    statistic: str
    images: int
    n0: int
    n: int

    @property
    def name(self) -> str:
        return f"{self.statistic} {self.images}x({self.n0}+{self.n})"

    @property
    def draws(self) -> int:
        return self.images * (self.n0 + self.n)


def certified_radius_or_zero(selection: np.ndarray, estimation: np.ndarray, label: int,
                             sigma: float, alpha: float) -> float:
    """CERTIFY's radius when it certifies the true class, else 0: what ACR averages."""
    candidate = int(np.argmax(selection))
    prediction, radius = certify_from_counts(candidate, int(estimation[candidate]),
                                             int(estimation.sum()), alpha, sigma)
    return radius if prediction == label else 0.0


def smoothed_margin(selection: np.ndarray, estimation: np.ndarray, label: int, sigma: float,
                    alpha: float) -> float:
    """sigma * Phi^-1 of the share of all the image's draws that give the true class (moved
    half a draw off 0 and 1): a continuous, signed radius, negative where the smoothed
    classifier is wrong."""
    draws = int(selection.sum() + estimation.sum())
    share = (selection[label] + estimation[label]) / draws
    share = min(max(share, HALF_DRAW / draws), 1 - HALF_DRAW / draws)
    return sigma * float(norm.ppf(share))


def lower_bound_radius(selection: np.ndarray, estimation: np.ndarray, label: int,
                       sigma: float, alpha: float) -> float:
    """sigma * Phi^-1 of the one-sided Clopper-Pearson lower bound of the true class's
    probability from the estimation draws, signed (below 0 under one half), floored half a
    draw above 0: the radius CERTIFY would give the true class, without its cut at 0."""
    n = int(estimation.sum())
    low = lower_confidence_bound(int(estimation[label]), n, alpha)
    return sigma * float(norm.ppf(max(low, HALF_DRAW / n)))


STATISTICS = {"acr": certified_radius_or_zero, "margin": smoothed_margin,
              "lower_bound_radius": lower_bound_radius}
#: How each candidate reads the draws, against today's proxy (P images, n0 + n draws each):
#: (image factor, draw factor). The same draws over 2.5x and 5x the images, a fifth of them,
#: five times as many.
BUDGETS = ((1, 1), (2.5, 0.4), (5, 0.2), (1, 0.2), (5, 1))


def candidates(images: int, n0: int, n: int, available: int) -> list[Candidate]:
    """Today's proxy (``acr`` over ``images`` images at ``n0 + n``) first, then every
    statistic at every budget of :data:`BUDGETS` that the ``available`` images allow."""
    def scaled(value: int, factor: float) -> int:
        return max(1, round(value * factor))
    found = [Candidate("acr", images, n0, n)]
    for statistic in STATISTICS:
        for image_factor, draw_factor in BUDGETS:
            candidate = Candidate(statistic, scaled(images, image_factor),
                                  scaled(n0, draw_factor), scaled(n, draw_factor))
            if candidate not in found and candidate.images <= available:
                found.append(candidate)
    return found


def sample_params(search, count: int, seed: int) -> list[dict]:
    """``count`` draws of the search space, uniformly (log-uniformly for loguniform)."""
    rng = np.random.default_rng(seed)
    drawn = []
    for _ in range(count):
        params = {}
        for key, distribution in search.items():
            values = distribution.values
            if distribution.kind == "uniform":
                params[key] = float(rng.uniform(*values))
            elif distribution.kind == "loguniform":
                params[key] = float(math.exp(rng.uniform(*np.log(values))))
            elif distribution.kind == "int":
                params[key] = int(rng.integers(values[0], values[1] + 1))
            else:
                params[key] = values[int(rng.integers(len(values)))]
        drawn.append(params)
    return drawn


def draw_predictions(classifier: torch.nn.Module, store: DrawStore,
                     device: torch.device) -> np.ndarray:
    """The class ``classifier`` predicts for each stored draw: images x (n0 + n)."""
    draws = store.draws
    flat = draws.reshape(-1, *store.info.image_shape)
    out = np.empty(len(flat), dtype=np.uint8)
    size = store.info.batch_size
    with evaluating(classifier, device, store.precision):
        for start in range(0, len(flat), size):
            batch = torch.from_numpy(np.array(flat[start:start + size])).to(device)
            out[start:start + size] = classifier(batch).argmax(1).cpu().numpy()
    return out.reshape(draws.shape[0], draws.shape[1])


def proxy_values(predictions: np.ndarray, labels: np.ndarray, candidate: Candidate,
                 store_n0: int, num_classes: int, sigma: float, alpha: float) -> np.ndarray:
    """The candidate's statistic of each of its images."""
    function = STATISTICS[candidate.statistic]
    values = np.empty(candidate.images)
    for image in range(candidate.images):
        row = predictions[image]
        selection = np.bincount(row[:candidate.n0], minlength=num_classes)
        estimation = np.bincount(row[store_n0:store_n0 + candidate.n], minlength=num_classes)
        values[image] = function(selection, estimation, int(labels[image]), sigma, alpha)
    return values


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho; NaN where either side is constant (no ranking to compare)."""
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(spearmanr(x, y).statistic)


def bootstrap_spearman(x: np.ndarray, y: np.ndarray, picks: np.ndarray) -> np.ndarray:
    """Spearman's rho over each resample of trials in ``picks`` (one row of trial numbers a
    resample); every candidate is resampled with the same rows, so two candidates' samples
    pair and their difference has an interval too."""
    return np.array([spearman(x[pick], y[pick]) for pick in picks])


def percentile_interval(samples: np.ndarray) -> tuple[float, float]:
    """The percentile 95% interval of the bootstrap samples that are defined."""
    if np.all(np.isnan(samples)):
        return math.nan, math.nan
    low, high = np.nanpercentile(samples, [2.5, 97.5])
    return float(low), float(high)


def train_trials(sweep, trials: list[dict], stores: dict, scratch: Path, threads: int) -> None:
    """Train every trial to its last epoch (resuming one begun), then its rank stage."""
    torch.set_num_threads(threads)
    for number, params in enumerate(trials):
        out = scratch / "trials" / f"{number:02d}"
        config = trial_config(sweep, params)
        config.proxy_store = stores[PROXY_ROLE]["folder"]
        config.train_store = stores[TRAIN_ROLE]["folder"]
        checkpoints = out / CHECKPOINTS_DIR
        if len(list(checkpoints.glob(CHECKPOINT_PATTERN))) < config.epochs:
            print(f"trial {number}: training {json.dumps(params)}", flush=True)
            train_loop(config, LocalSession(out, pick_device(config.device), resume=True),
                       progress=False)
        last = sorted(checkpoints.glob(CHECKPOINT_PATTERN))[-1]
        summary = certify_rank(config.to_dict(), sweep.rank, str(last),
                               stores[RANK_ROLE]["folder"], str(out / "rank"))
        (out / "objective.json").write_text(json.dumps(figures_of(summary)) + "\n")


def predict_trials(sweep, trials: list[dict], store: DrawStore, scratch: Path) -> float:
    """Each epoch's draw predictions of every trial (kept; found again on a rerun); the
    classifier's seconds per draw, as measured here."""
    device = pick_device(sweep.base.device)
    seconds, draws = 0.0, 0
    for number in range(len(trials)):
        out = scratch / "trials" / f"{number:02d}"
        for checkpoint in sorted((out / CHECKPOINTS_DIR).glob(CHECKPOINT_PATTERN)):
            path = out / "predictions" / f"{checkpoint.name}.npy"
            if path.is_file():
                continue
            config = trial_config(sweep, trials[number])
            classifier = load_trained(load_classifier(config.model_sources().classifier),
                                      checkpoint)[0].to(device)
            started = time.perf_counter()
            predictions = draw_predictions(classifier, store, device)
            seconds += time.perf_counter() - started
            draws += predictions.size
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, predictions)
    timing = scratch / "classifier_seconds_per_draw.json"
    if draws:
        timing.write_text(json.dumps({"seconds_per_draw": seconds / draws}) + "\n")
    return json.loads(timing.read_text())["seconds_per_draw"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default="sweeps/default.yaml")
    parser.add_argument("--set", action="append", default=[], dest="sets")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0, help="draws the random trials")
    parser.add_argument("--scratch", help="where the trials, their checkpoints and stores go")
    parser.add_argument("--draws", help="the draws folder (default: SCRATCH/draws)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--records", help="write the records the report reads here "
                        "(default: SCRATCH/records)")
    parser.add_argument("--report-only", metavar="RECORDS",
                        help="print the report from a records folder, run nothing")
    args = parser.parse_args()
    if args.report_only:
        report(Path(args.report_only))
        return
    if not args.scratch:
        parser.error("--scratch is required unless --report-only")
    scratch = Path(args.scratch).resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    sweep = load_sweep(ROOT / args.sweep, args.sets)
    if sweep.rank is None:
        sys.exit("proxy_fidelity: the sweep has no rank stage, so no objective to rank by")
    plan = scratch / "trials.json"
    if not plan.is_file():
        plan.write_text(json.dumps([{}] + sample_params(sweep.search, args.trials - 1,
                                                          args.seed), indent=1) + "\n")
    trials = json.loads(plan.read_text())
    draws_dir = str(Path(args.draws).resolve() if args.draws else scratch / "draws")
    base = sweep.base.to_dict()
    stores = build_sweep_stores(base, sweep.rank, draws_dir, threads=args.threads)
    # One store of the proxy's draws over the whole hold-out: its first proxy_images images
    # hold the same draws as the sweep's proxy store (each image's noise is its own).
    wide = build_sweep_stores({**base, "proxy_images": sweep.base.val_images}, sweep.rank,
                              draws_dir, threads=args.threads)[PROXY_ROLE]["folder"]
    train_trials(sweep, trials, stores, scratch, args.threads)
    store = DrawStore.open(wide, json.loads((Path(wide) / STORE_META).read_text())["key"])
    seconds_per_draw = predict_trials(sweep, trials, store, scratch)
    records = Path(args.records).resolve() if args.records else scratch / "records"
    write_records(sweep, trials, store, scratch, seconds_per_draw, records)
    report(records)


def trial_history(scratch: Path, number: int) -> list[dict]:
    """The per-epoch metrics the trial's own loop logged (its last checkpoint's history)."""
    checkpoints = sorted((scratch / "trials" / f"{number:02d}" / CHECKPOINTS_DIR)
                         .glob(CHECKPOINT_PATTERN))
    return read_metadata(checkpoints[-1])["history"]


def write_records(sweep, trials: list[dict], store: DrawStore, scratch: Path,
                  seconds_per_draw: float, records: Path) -> None:
    """What the report reads, small enough to commit: every epoch's draw predictions of every
    trial (``predictions.npz``, keys ``tNN_eE``), and ``inputs.json``: the trials, the store's
    labels and shape, what each trial's loop logged per epoch (its proxy and the proxy's
    seconds), the objective per trial and which images it certified at its radius."""
    objective = sweep.objective[0].metric
    radius = radius_of_metric(objective)
    epochs = sweep.base.epochs
    records.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(records / PREDICTIONS, **{
        f"t{n:02d}_e{epoch}": np.load(scratch / "trials" / f"{n:02d}" / "predictions"
                                      / f"epoch_{epoch:03d}.npy")
        for n in range(len(trials)) for epoch in range(1, epochs + 1)})
    histories = [trial_history(scratch, n) for n in range(len(trials))]
    rank_records = [read_records(scratch / "trials" / f"{n:02d}" / "rank" / RECORDS_FILENAME)
                    for n in range(len(trials))]
    (records / INPUTS).write_text(json.dumps({
        "sweep": sweep.name, "sigma": sweep.base.sigma, "alpha": sweep.base.proxy_alpha,
        "proxy": [sweep.base.proxy_images, sweep.base.proxy_n0, sweep.base.proxy_n],
        "epochs": epochs, "trials": trials, "labels": store.info.labels,
        "store_n0": store.key["n0"], "store_n": store.key["n"],
        "num_classes": store.info.num_classes, "seconds_per_draw": seconds_per_draw,
        "objective": objective,
        "rank": {"images": sweep.rank.images, "n": sweep.rank.n, "n0": sweep.rank.n0,
                 "alpha": sweep.rank.alpha, "sequential": sweep.rank.sequential},
        "objective_values": [json.loads((scratch / "trials" / f"{n:02d}" / "objective.json")
                                        .read_text())[objective] for n in range(len(trials))],
        "objective_certified": [[int(certified_at(record, radius)) for record in trial]
                                for trial in rank_records],
        "logged_proxy": [[entry[PROXY_ACR] for entry in history] for history in histories],
        "proxy_seconds": [[entry[PROXY_SECONDS] for entry in history]
                          for history in histories]}) + "\n")


def paired_noise(per_image: np.ndarray) -> float:
    """The median over pairs of trials of the standard error of their mean per-image
    difference (trials x images)."""
    images = per_image.shape[1]
    return float(np.median([np.std(per_image[a] - per_image[b], ddof=1) / math.sqrt(images)
                            for a, b in itertools.combinations(range(len(per_image)), 2)]))


def report(records: Path) -> None:
    """Print the fidelity of every candidate per epoch from ``records`` (write_records') and
    write ``fidelity.json`` beside them."""
    inputs = json.loads((records / INPUTS).read_text())
    predictions = np.load(records / PREDICTIONS)
    trials, epochs = inputs["trials"], inputs["epochs"]
    values = np.array(inputs["objective_values"])
    labels = np.array(inputs["labels"])
    seconds_per_draw = inputs["seconds_per_draw"]
    sigma, alpha, n0 = inputs["sigma"], inputs["alpha"], inputs["store_n0"]
    rank = inputs["rank"]
    picks = np.random.default_rng(0).integers(len(trials), size=(BOOTSTRAP, len(trials)))
    rows = []
    compared = candidates(*inputs["proxy"], len(labels))
    certified = np.array(inputs["objective_certified"], dtype=float)
    objective_noise = paired_noise(certified)
    print(f"{len(trials)} trials of sweep {inputs['sweep']} trained to epoch {epochs} (the "
          f"incumbent and {len(trials) - 1} random), none stopped. Objective: the rank stage's "
          f"{inputs['objective']} at epoch {epochs} (first {rank['images']} validation images, "
          f"n <= {rank['n']}, n0 = {rank['n0']}, alpha = {rank['alpha']}"
          f"{', sequential' if rank['sequential'] else ''}): {values.min():.3f}-"
          f"{values.max():.3f}, spread/noise {np.std(values, ddof=1) / objective_noise:.2f} "
          f"({np.std(values, ddof=1):.4f}/{objective_noise:.4f})")
    print(f"proxy seconds an epoch as the loop logged them (median; its classifier forwards "
          f"and the denoised accuracy of the hold-out): "
          f"{np.median(inputs['proxy_seconds']):.1f} s; classifier {seconds_per_draw * 1e3:.3f} "
          f"ms a draw in the benchmark")
    print(f"rho: Spearman with the objective [bootstrap 95%, trials resampled {BOOTSTRAP}x]; "
          f"vs today: rho minus today's on the same resamples [95%]; noise: the median paired "
          f"SE between two trials; seconds: the candidate's classifier forwards")
    for epoch in range(1, epochs + 1):
        per_trial = [predictions[f"t{n:02d}_e{epoch}"] for n in range(len(trials))]
        today_samples = None
        for candidate in compared:
            per_image = np.stack([proxy_values(p, labels, candidate, n0,
                                               inputs["num_classes"], sigma, alpha)
                                  for p in per_trial])
            proxy = per_image.mean(axis=1)
            if today_samples is None:
                drift = max(abs(value - logged[epoch - 1])
                            for value, logged in zip(proxy, inputs["logged_proxy"]))
                print(f"epoch {epoch}: today's proxy recomputed from the predictions differs "
                      f"from what each trial's loop logged by at most {drift:.2e}")
            rho = spearman(proxy, values)
            samples = bootstrap_spearman(proxy, values, picks)
            today_samples = samples if today_samples is None else today_samples
            low, high = percentile_interval(samples)
            gain_low, gain_high = percentile_interval(samples - today_samples)
            noise = paired_noise(per_image)
            spread = float(np.std(proxy, ddof=1))
            rows.append({"epoch": epoch, "candidate": candidate.name,
                         "statistic": candidate.statistic, "images": candidate.images,
                         "n0": candidate.n0, "n": candidate.n, "spearman": rho,
                         "low": low, "high": high, "vs_today_low": gain_low,
                         "vs_today_high": gain_high, "paired_noise": noise, "spread": spread,
                         "seconds": candidate.draws * seconds_per_draw,
                         "values": proxy.tolist()})
            print(f"epoch {epoch}  {candidate.name:<32} rho {rho:+.2f} [{low:+.2f}, "
                  f"{high:+.2f}]  vs today [{gain_low:+.2f}, {gain_high:+.2f}]  spread/noise "
                  f"{spread / noise if noise else math.nan:5.2f} ({spread:.4f}/{noise:.4f})  "
                  f"{candidate.draws * seconds_per_draw:5.1f} s", flush=True)
    (records / "fidelity.json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
