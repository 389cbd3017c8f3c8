"""Denoised smoothing assembled from named models, certified on a test subset.

The one place that turns "these models (and perhaps a fine-tuned checkpoint), this sigma,
this data" into a ``Smooth`` over ``classifier(denoiser(x + delta))`` and an output folder of
records: `cadis certify` calls it, and so do `cadis train` and a sweep's final stage when
they certify what they made. It certifies through :mod:`cadis.certifier`, as the rank stage
and the per-epoch proxy do.
"""

from __future__ import annotations

import time
from pathlib import Path
from collections.abc import Iterable
from typing import Any, Sequence

import torch

from cadis.certifier import CertificationSettings, LiveDraws, StoredDraws, certify_into
from cadis.data import load_dataset, stack_images, subset_indices
from cadis.draws.certification_store import DrawStore, build_store
from cadis.draws.keys import TEST_ROLE, TEST_SPLIT, certification_key, store_folder
from cadis.errors import CadisError
from cadis.finetuning.checkpoint import load_trained
from cadis.finetuning.config import TrainConfig
from cadis.models.classifier import load_classifier
from cadis.models.denoiser import load_denoiser
from cadis.models.devices import pick_device
from cadis.models.identity import MODEL_HASHES, model_hashes
from cadis.models.sources import ModelSources
from cadis.smoothing.bounds import CertificationParameters
from cadis.smoothing.denoise import DenoisedClassifier, OneShotDenoiser
from cadis.smoothing.image_noise import image_noise
from cadis.smoothing.precision import (
    AGREEMENT_DRAWS,
    AGREEMENT_IMAGES,
    FP32,
    Precision,
    autocast,
    check_agreement,
    compile_base,
    resolve_precision,
)
from cadis.smoothing.records import NOISE_PER_IMAGE, radius_grid
from cadis.smoothing.sequential import (
    SequentialPlan,
    check_budget,
    forward_sizes,
    reachable_radii,
)
from cadis.smoothing.smooth import Smooth, check_draws, default_batch_size
from cadis.validation import check_sigma


def build_denoised_classifier(sources: ModelSources, sigma: float,
                              checkpoint: str | None = None,
                              device: torch.device = torch.device("cpu"),
                              channels: int | None = None,
                              image_size: int | None = None) -> DenoisedClassifier:
    """``classifier ∘ one-shot denoiser`` at ``sigma``, in eval mode on ``device``.

    ``checkpoint`` is a fine-tuned classifier folder (`cadis train` output) applied on top of
    the off-the-shelf classifier. ``channels``/``image_size`` of the data are checked against
    both models, so a mismatch is a one-line error rather than a shape error mid-run.
    """
    classifier = load_classifier(sources.classifier)
    if checkpoint is not None:
        classifier, _ = load_trained(classifier, Path(checkpoint))
    unet, scheduler = load_denoiser(sources.denoiser)
    denoiser = OneShotDenoiser(unet, scheduler, sigma)
    if channels is not None and image_size is not None:
        denoiser.check_input(channels, image_size, image_size)
        classifier.check_input(channels)
    return DenoisedClassifier(denoiser, classifier).eval().to(device)


def certify_models(sources: ModelSources, sigma: float, out_dir: Path, *, n: int = 10_000,
                   n0: int = 100, alpha: float = 0.001, skip: int = 1,
                   max_images: int | None = None, batch_size: int | None = None,
                   checkpoint: str | None = None, radii: Sequence[float] | None = None,
                   seed: int = 0, device: str = "auto", sequential: bool = False,
                   precision: str = "auto", compile: bool = False,
                   shard: tuple[int, int] | None = None,
                   draws_dir: str | Path | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Certify every ``skip``-th test image (at most ``max_images``) into ``out_dir``.

    ``batch_size`` (noise draws per forward) defaults to what is fast on the device. With
    ``sequential``, each image is certified at ``radii`` (default: the grid radii ``n`` draws
    can reach sequentially) by the sequential test of :mod:`cadis.smoothing.sequential`, ``n``
    being the most estimation draws an image may spend.
    Each image's noise has its own generator (seeded by ``seed`` and its index), so
    ``shard=(k, K)``, which certifies the k-th of K contiguous parts of the images, makes the
    records a whole run makes of them
    (:func:`~cadis.smoothing.record_folder.merge_records` joins the parts).

    ``precision`` (:data:`~cadis.smoothing.precision.PRECISION_CHOICES`) and ``compile``
    (``torch.compile``) choose how the base's forwards run; unless that is fp32 eager, the fast
    base must first agree with fp32 eager on the check draws
    (:func:`~cadis.smoothing.precision.check_agreement`), or :class:`CadisError` before any
    record. The settings say which precision made the records; the summary holds the share.
    They name the off-the-shelf pair by the sha256 of its files
    (:func:`~cadis.models.identity.model_hashes`), so records of other models do not pair.

    With ``draws_dir``, every draw of these images (``n0 + n`` each) is denoised once into a
    store under it (:mod:`cadis.draws.certification_store`), or found there, and only the
    classifier runs: the records are exactly those of certifying live with the same seed (for CERTIFY;
    the sequential test reads the same draws in the same order), so every classifier
    certified from one store is paired with the others on the same draws, for the cost of its
    classifier. Building costs every draw even where a sequential test would stop early;
    it pays from about the third classifier. ``compile`` is refused with it.

    Returns the summary (also in ``out_dir/summary.json``). Resumes an interrupted run with
    the same settings; refuses, untouched, an ``out_dir`` made with other settings.
    ``sigma`` and the draw counts are checked here, where they enter, before any work.
    """
    sigma = check_sigma(sigma)
    if draws_dir is not None and compile:
        raise CadisError("draws_dir: from stored draws only the classifier runs, so compile "
                         "must be false")
    chosen_device = pick_device(device)
    chosen_precision = resolve_precision(precision, chosen_device)
    parameters = CertificationParameters(n0, n, alpha,
                                         batch_size or default_batch_size(chosen_device))
    if sequential:
        check_budget(n0, n)
    test_set, indices = _test_subset(sources, skip, max_images)
    info = test_set.info
    grid = radius_grid(sigma, n, alpha, info.image_size, radii)
    plan = None
    if sequential:
        # With no radius reachable, the plan of the grid's first refuses, naming the n it needs.
        plan = SequentialPlan(radii or reachable_radii(grid, sigma, alpha, n) or grid[:1],
                              sigma, alpha, n)
    base = build_denoised_classifier(sources, sigma, checkpoint, chosen_device,
                                     channels=info.channels, image_size=info.image_size)
    fast, notes = _fast_base(base, test_set, indices, sigma, seed, chosen_precision, compile,
                             parameters.batch_size, chosen_device,
                             forward_sizes(plan, n0, parameters.batch_size) if plan else ())
    smooth = Smooth(fast, info.num_classes, sigma, precision=chosen_precision)
    settings = {"classifier": sources.classifier, "denoiser": sources.denoiser,
                "checkpoint": checkpoint, "dataset": sources.dataset, "seed": seed,
                "denoiser_timestep": base.denoiser.timestep,
                "precision": chosen_precision.name, "compiled": compile,
                MODEL_HASHES: model_hashes(sources)}
    draws: LiveDraws | StoredDraws = LiveDraws(smooth, test_set, seed, TEST_SPLIT)
    if draws_dir is not None:
        store = _test_store(base, sources, test_set, indices, sigma, seed, chosen_precision,
                            chosen_device, parameters, Path(draws_dir), progress)
        draws = StoredDraws(store, base.classifier, chosen_device)
        settings.update(noise=NOISE_PER_IMAGE, stored_draws=str(store.folder))
    return certify_into(draws, shard_of(indices, shard),
                        CertificationSettings(sigma, parameters, tuple(grid), plan), out_dir,
                        settings, progress, notes)


def _test_subset(sources: ModelSources, skip: int, max_images: int | None
                 ) -> tuple[Any, list[int]]:
    """The test split and the images of it certified: every ``skip``-th, at most
    ``max_images``."""
    test_set = load_dataset(sources.dataset, "test", sources.data_root,
                            image_size=sources.image_size)
    return test_set, subset_indices(len(test_set), skip, max_images)


def build_test_store(config: TrainConfig, draws_dir: str | Path,
                     progress: bool = True) -> DrawStore:
    """Build (or find) under ``draws_dir`` the store of test draws that :func:`certify_trained`
    of ``config`` with ``certify.draws_dir = draws_dir`` reads, on ``config.device``: made
    once, before the classifiers certified from it (a sweep's finalists) start, whichever
    checkpoint each carries (the key names none)."""
    certify = config.certify
    sources = config.model_sources()
    device = pick_device(config.device)
    test_set, indices = _test_subset(sources, certify.skip, certify.max_images)
    info = test_set.info
    base = build_denoised_classifier(sources, config.sigma, None, device,
                                     channels=info.channels, image_size=info.image_size)
    parameters = CertificationParameters(certify.n0, certify.n, certify.alpha,
                                         certify.batch_size or default_batch_size(device))
    return _test_store(base, sources, test_set, indices, config.sigma, config.seed,
                       resolve_precision(certify.precision, device), device, parameters,
                       Path(draws_dir), progress)


def _test_store(base: DenoisedClassifier, sources: ModelSources, test_set: Any,
                indices: list[int], sigma: float, seed: int, precision: Precision,
                device: torch.device,
                parameters: CertificationParameters, draws_dir: Path,
                progress: bool) -> DrawStore:
    """The store of all ``indices``' draws under ``draws_dir``, built first (by ``base``'s
    denoiser) when missing: the whole subset, whichever shard asks."""
    key = certification_key(dataset=sources.dataset, split=TEST_SPLIT, indices=indices,
                            denoiser=sources.denoiser, sigma=sigma, n0=parameters.n0,
                            n=parameters.n, seed=seed, precision=precision.name)
    folder = store_folder(draws_dir.absolute(), TEST_ROLE, key)
    if folder.exists():
        return DrawStore.open(folder, key)
    images, labels = stack_images(test_set, indices)
    if progress:
        print(f"certify: denoising {len(indices)} images x {parameters.n0 + parameters.n} "
              f"draws once into {folder}", flush=True)
    return build_store(folder, key, base.denoiser, images.to(device), labels.tolist(),
                       test_set.info.num_classes, parameters.batch_size,
                       classifier=base.classifier, progress=progress)


def certify_trained(config: TrainConfig, out_dir: Path, checkpoint: str | None = None,
                    shard: tuple[int, int] | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """:func:`certify_models` with a training config's models, sigma, seed, device and
    ``certify`` settings: how `cadis train` and a sweep's final stage certify what they made
    (``checkpoint``; None: the off-the-shelf pair)."""
    certify = config.certify
    return certify_models(
        config.model_sources(), config.sigma, out_dir, n=certify.n, n0=certify.n0,
        alpha=certify.alpha, skip=certify.skip, max_images=certify.max_images,
        batch_size=certify.batch_size, checkpoint=checkpoint, seed=config.seed,
        device=config.device, sequential=certify.sequential, precision=certify.precision,
        compile=certify.compile, shard=shard, draws_dir=certify.draws_dir, progress=progress)


def shard_of(indices: list[int], shard: tuple[int, int] | None) -> list[int]:
    """The k-th of K contiguous, near-equal parts of ``indices`` (``shard=(k, K)``; None: all).
    Contiguous, so each part keeps whole groups of images that share forwards."""
    if shard is None:
        return indices
    part, parts = shard
    if not 0 <= part < parts:
        raise CadisError(f"shard {part} of {parts} does not exist")
    bounds = [len(indices) * k // parts for k in range(parts + 1)]
    return indices[bounds[part]:bounds[part + 1]]


def _fast_base(base: DenoisedClassifier, dataset: Any, indices: list[int], sigma: float,
               seed: int, precision: Precision, compile: bool, batch_size: int,
               device: torch.device, sizes: Iterable[int] = ()
               ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The base the forwards run (``base`` compiled when asked) and what to note of it: for
    anything but fp32 eager, its agreement with ``base`` in fp32 on noisy draws of the first
    :data:`AGREEMENT_IMAGES` images (which raises below the bar) and the compile time, which
    covers the forward ``sizes`` the run will also meet (a sequential plan's partial looks)."""
    fast = compile_base(base) if compile else base
    if precision is FP32 and not compile:
        return fast, {}
    check = indices[:AGREEMENT_IMAGES]
    images = torch.stack([dataset[index][0] for index in check]).to(device)
    draws = check_draws(images, sigma, image_noise(seed, TEST_SPLIT, check, device),
                        -(-AGREEMENT_DRAWS // len(check)), batch_size)
    if compile:
        # The first forward of each shape compiles: paid here, once per process, and said.
        started = time.perf_counter()
        shapes = {len(batch): batch for batch in draws}
        with torch.inference_mode(), autocast(precision, device):
            for batch in shapes.values():
                fast(batch)
            for size in sorted(set(sizes) - set(shapes)):
                fast(draws[0][:size])
        compile_seconds = time.perf_counter() - started
        print(f"certify: torch.compile took {compile_seconds:.0f} s", flush=True)
    share = check_agreement(base, fast, draws, precision, compile, device)
    notes = {"agreement_with_fp32": share,
             "agreement_draws": sum(len(batch) for batch in draws)}
    if compile:
        notes["compile_seconds"] = round(compile_seconds, 1)
    return fast, notes
