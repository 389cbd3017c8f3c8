"""FT-CADIS fine-tuning: one per-worker loop, whatever runs it (:mod:`cadis.finetuning.fit`
in this process, :mod:`cadis.finetuning.ray_train` in Ray Train workers).

Each optimizer step takes ``effective_batch_size`` images (micro-batches of ``batch_size``,
gradients accumulated), draws ``num_noises`` Gaussian noises per image, denoises them in one
shot (no gradient), scores which draws are credible, attacks the credible ones in the
denoised domain, and minimises the selective cross-entropy plus the masked adversarial KL
(:mod:`cadis.finetuning.losses`); the learning rate follows
:func:`cadis.finetuning.schedule.warmup_cosine` by optimizer step, the weight decay
:func:`cadis.finetuning.schedule.cosine_between`, each parameter group scaling both
(:mod:`cadis.finetuning.optimizer`), and the gradients are clipped before each step when
``grad_clip`` is set. The denoiser runs in the precision the certification runs it in
(:meth:`~cadis.finetuning.config.TrainConfig.denoiser_precision`). After each epoch the worker
of rank 0 measures denoised accuracy and a cheap certified-accuracy proxy on images held out of
the training split, and reports a checkpoint (:mod:`cadis.finetuning.checkpoint`) holding the
trained weights, the optimizer state, the config and every epoch's metrics so far.
With ``train_draws`` set, the draws come from a store denoised once
(:mod:`cadis.draws.training_store`) and the denoiser does not run in the step.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Subset

from cadis.certifier import CertificationSettings, LiveDraws, StoredDraws, certified_records
from cadis.data import load_dataset, stack_images, stratified_holdout
from cadis.draws.certification_store import DrawStore
from cadis.draws.keys import HELD_OUT_SPLIT, TRAIN_ROLE, store_folder
from cadis.draws.training_store import TrainDrawStore, build_train_store, sample_draws
from cadis.errors import CadisError
from cadis.finetuning.attack import pgd_l2_denoised
from cadis.finetuning.checkpoint import restore_training_state, save_trained
from cadis.finetuning.config import TrainConfig
from cadis.finetuning.lora import apply_finetuning, trainable_fraction
from cadis.finetuning.losses import FTCadisLossConfig, ft_cadis_loss, soft_target
from cadis.finetuning.optimizer import clip_gradients, make_optimizer, set_hyperparameters
from cadis.finetuning.schedule import cosine_between, warmup_cosine
from cadis.finetuning.store_keys import proxy_store_key, training_store_key
from cadis.models.classifier import Classifier, load_classifier
from cadis.models.denoiser import load_denoiser
from cadis.models.sources import ModelSources
from cadis.progress import progress_bar
from cadis.smoothing.denoise import (
    DenoisedClassifier,
    OneShotDenoiser,
    to_diffusion_space,
    to_image_space,
)
from cadis.smoothing.paired import certified_radii
from cadis.smoothing.precision import Precision
from cadis.smoothing.precision import autocast as precision_autocast
from cadis.smoothing.records import (
    average_certified_radius,
    certified_accuracy,
    radius_grid,
    radius_key,
)
from cadis.smoothing.smooth import Smooth, default_batch_size
from cadis.tracking.contract import (
    EPOCH_SECONDS,
    FIRST_STEP,
    LOOP_STARTED,
    PROXY_ACR,
    PROXY_ACR_SE,
    PROXY_PREFIX,
    PROXY_SECONDS,
    REPORTED,
)


# The loss terms a micro-step logs, by the names an error about them uses.
LOSS_TERMS = {"sce": "selective cross-entropy (SCE)", "madv": "adversarial (MAdv)"}


class NonFiniteLoss(CadisError):
    """Training stopped: a loss went NaN or infinite. Stepping on it would write non-finite
    weights into every later checkpoint (the reference code, docs/design.md, stops too)."""


def check_finite_loss(logged: dict[str, float], epoch: int, step: int) -> None:
    """Raise :class:`NonFiniteLoss` naming the epoch, the optimizer step and the terms that
    are not finite, when the micro-step's loss is not; called before the optimizer steps."""
    if math.isfinite(logged["loss"]) and all(math.isfinite(logged[key]) for key in LOSS_TERMS):
        return
    bad = [f"{name} = {logged[key]}" for key, name in LOSS_TERMS.items()
           if not math.isfinite(logged[key])]
    raise NonFiniteLoss(f"epoch {epoch}, step {step}: the loss is {logged['loss']} ("
                        f"{', '.join(bad) or 'its terms are finite'}); training stopped before "
                        "the optimizer step: lower lr, or check the data and models")


class Session(Protocol):
    """What the loop needs from where it runs: its rank, device, and how to report."""

    rank: int
    world_size: int
    device: torch.device

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module: ...

    def prepare_loader(self, loader: DataLoader) -> DataLoader: ...

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None: ...

    def latest_checkpoint(self) -> Path | None: ...


class DiffusionSpaceClassifier(torch.nn.Module):
    """The classifier seen from the denoiser's [-1, 1] output space, where PGD perturbs."""

    def __init__(self, classifier: Classifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, denoised: torch.Tensor) -> torch.Tensor:
        return self.classifier(to_image_space(denoised))


@dataclass
class TrainState:
    """Where training stands: epochs done, optimizer steps taken, each epoch's metrics."""

    epoch: int = 0
    global_step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class TrainedModels:
    """What a finished loop holds: the fine-tuned classifier (the last checkpoint's weights),
    the frozen denoiser, on the session's device, and every epoch's metrics (rank 0's)."""

    classifier: Classifier
    denoiser: OneShotDenoiser
    history: list[dict[str, float]]


def train_loop(config: TrainConfig, session: Session, progress: bool = True) -> TrainedModels:
    """Fine-tune per ``config``; reports metrics and a checkpoint after every epoch, each
    result with the wall clocks of the loop's start and first step (a run resumed after its
    last epoch takes none); returns the models as trained."""
    loop_started = time.time()
    first_step: float | None = None
    torch.manual_seed(config.training_seed + session.rank)
    sources = config.model_sources()
    train_set = load_dataset(sources.dataset, "train", sources.data_root, augment=config.augment,
                             image_size=sources.image_size)
    plain_set = load_dataset(sources.dataset, "train", sources.data_root,
                             image_size=sources.image_size)
    info = train_set.info
    train_indices, val_indices = split_training(config, train_set)

    classifier = load_classifier(sources.classifier, drop_path=config.drop_path)
    classifier.check_input(info.channels)
    scorer = None
    if config.confidence_model == "frozen":
        scorer = copy.deepcopy(classifier).eval().requires_grad_(False).to(session.device)
    apply_finetuning(classifier, config.finetune_config())
    unet, scheduler = load_denoiser(sources.denoiser)
    denoiser = OneShotDenoiser(unet, scheduler, config.sigma).to(session.device)
    denoiser.check_input(info.channels, info.image_size, info.image_size)
    classifier.to(session.device)
    model = session.prepare_model(classifier)
    attacked_model = DiffusionSpaceClassifier(classifier)
    trainable = [p for p in classifier.parameters() if p.requires_grad]
    optimizer = make_optimizer(classifier.model, config.lr, config.weight_decay,
                               config.layer_decay, config.weight_decay_skip_1d)
    precision = config.denoiser_precision(session.device)

    state = TrainState()
    checkpoint = session.latest_checkpoint()
    if checkpoint is not None:
        metadata = restore_training_state(checkpoint, classifier, optimizer)
        state = TrainState(metadata["epoch"], metadata["global_step"], metadata["history"])

    # Items are images, or with stored draws each image's K denoised draws.
    items = Subset(train_set, train_indices) if not config.train_store else TrainDrawStore(
        config.train_store, training_store_key(config, sources, train_indices, session.device))
    shuffle = torch.Generator()
    loader = session.prepare_loader(DataLoader(
        items, batch_size=config.batch_size, shuffle=True, drop_last=True, generator=shuffle))
    steps_per_epoch = len(loader) // config.accumulation_steps
    if config.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise CadisError(f"the training split ({len(train_indices)} images) is smaller than one "
                         f"effective batch ({config.effective_batch_size} images)")
    total_steps = config.epochs * steps_per_epoch
    loss_config = config.loss_config()
    amp = config.amp and session.device.type == "cuda"

    for epoch in range(state.epoch, config.epochs):
        # The order of an epoch depends on the epoch alone, so a resumed run sees the data
        # an uninterrupted one would (Ray's distributed sampler does the same by set_epoch).
        shuffle.manual_seed(config.training_seed + epoch)
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        sums: dict[str, float] = {}
        started = time.perf_counter()
        micro_batches = iter(loader)
        first_step = first_step or time.time()
        bar = progress_bar(steps_per_epoch, f"epoch {epoch + 1}/{config.epochs}", "step",
                           enabled=progress and session.rank == 0)
        for _ in range(steps_per_epoch):
            lr = config.lr * warmup_cosine(state.global_step, total_steps, config.warmup_steps)
            weight_decay = cosine_between(state.global_step, total_steps, config.weight_decay,
                                          config.weight_decay_end)
            set_hyperparameters(optimizer, lr, weight_decay)
            for micro in range(config.accumulation_steps):
                batch, labels = next(micro_batches)
                batch, labels = batch.to(session.device), labels.to(session.device)
                denoised = sample_draws(batch, config.num_noises) if config.train_store \
                    else denoise_draws(batch, denoiser, config.sigma, config.num_noises,
                                       precision)
                # The clean images beside their draws, in the denoiser's space (stored draws
                # carry none; the config refuses attack_restandardize with them).
                clean = None if config.train_store else \
                    to_diffusion_space(batch).repeat_interleave(config.num_noises, 0)
                last = micro == config.accumulation_steps - 1
                sync = nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
                with sync:
                    logged = _micro_step(denoised, labels, model, attacked_model, scorer, config,
                                         loss_config, amp, clean)
                check_finite_loss(logged, epoch + 1, state.global_step + 1)
                for key, value in logged.items():
                    sums[key] = sums.get(key, 0.0) + value
            clip_gradients(trainable, config.grad_clip, config.grad_clip_scope)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.global_step += 1
            bar.set_postfix(loss=f"{logged['loss']:.3f}",
                            masked=f"{logged['hallucination_rate']:.2f}")
            bar.update()
        bar.close()
        micro_count = steps_per_epoch * config.accumulation_steps
        seconds = time.perf_counter() - started
        metrics = {key: value / micro_count for key, value in sums.items()}
        metrics.update(epoch=epoch + 1, global_step=state.global_step, lr=lr,
                       weight_decay=weight_decay,
                       **{EPOCH_SECONDS: seconds},
                       images_per_second=micro_count * config.batch_size * session.world_size
                       / seconds,
                       trainable_fraction=trainable_fraction(classifier))
        state.epoch = epoch + 1
        clocks = {LOOP_STARTED: loop_started, FIRST_STEP: first_step}
        if session.rank == 0:
            proxy_started = time.perf_counter()
            metrics.update(proxy_metrics(classifier, denoiser, plain_set, val_indices, config,
                                     sources, info.num_classes, info.image_size))
            metrics[PROXY_SECONDS] = time.perf_counter() - proxy_started
            state.history.append(metrics)
            with tempfile.TemporaryDirectory() as directory:
                save_trained(classifier, Path(directory), config.finetune_config(),
                             {"epoch": state.epoch, "global_step": state.global_step,
                              "config": config.to_dict(), "metrics": metrics,
                              "history": state.history}, optimizer=optimizer)
                session.report({**metrics, **clocks, REPORTED: time.time()}, Path(directory))
        else:
            session.report(metrics, None)
    return TrainedModels(classifier, denoiser, state.history)


def denoise_draws(images: torch.Tensor, denoiser: OneShotDenoiser, sigma: float,
                  num_noises: int, precision: Precision) -> torch.Tensor:
    """``num_noises`` fresh draws ``D(x + delta)`` per image, image-major (draw j of image i
    is row ``i * M + j``), in the denoiser's [-1, 1] space and without gradient: the denoiser
    stays frozen. The denoiser runs in ``precision`` (the noise is added in fp32 before it);
    the draws come back in float32."""
    noisy = images.repeat_interleave(num_noises, 0)
    noisy = noisy + sigma * torch.randn_like(noisy)
    with precision_autocast(precision, images.device):
        return denoiser.denoise(noisy).float()


def shares_batch_statistics(model: torch.nn.Module) -> bool:
    """Whether a forward of ``model`` mixes its samples: a batch norm that normalises by the
    batch's own statistics (in train mode, or in eval mode without running statistics).
    Then the clean and the attacked draws must not share a forward: each would be
    normalised (and the running statistics updated) by the other's, which the reference code's
    two forwards never do."""
    return any(isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
               and (module.training or module.running_mean is None)
               for module in model.modules())


def _micro_step(denoised: torch.Tensor, labels: torch.Tensor, model: torch.nn.Module,
                attacked_model: torch.nn.Module, scorer: torch.nn.Module | None,
                config: TrainConfig, loss_config: FTCadisLossConfig,
                amp: bool, clean_images: torch.Tensor | None = None) -> dict[str, float]:
    """Forward and backward of one micro-batch of denoised draws (gradients accumulate);
    returns logged values.

    The ``num_noises`` draws of an image are adjacent (image-major: draw j of image i is row
    ``i * M + j``), which is the ``[B, M, C]`` layout the losses read; the loss is divided by
    the accumulation steps, so the accumulated gradient is that of the mean over the
    effective batch. A model that mixes its samples (:func:`shares_batch_statistics`) gets
    the reference code's two forwards, clean then attacked (the attack's target from the clean
    one); any other one forward of both, after a gradient-free forward for the target.
    ``clean_images`` (one per draw, [-1, 1]) are what ``attack_restandardize`` needs.
    """
    draws = config.num_noises
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext()
    with torch.no_grad(), autocast:
        score_logits = None if scorer is None else scorer(to_image_space(denoised)).float()
    if config.attack_restandardize and clean_images is None:
        raise CadisError("attack_restandardize needs the clean images of the draws")
    restandardize_from = clean_images if config.attack_restandardize else None

    def attack(clean_logits: torch.Tensor) -> torch.Tensor:
        target = soft_target(clean_logits.detach().view(-1, draws, clean_logits.shape[-1]))
        return pgd_l2_denoised(attacked_model, denoised, target.repeat_interleave(draws, 0),
                               config.epsilon, config.attack_steps, restandardize_from)

    adversarial_logits = None
    if not loss_config.uses_adversarial_term:
        with autocast:
            clean_logits = model(to_image_space(denoised)).float()
    elif shares_batch_statistics(model):
        with autocast:
            clean_logits = model(to_image_space(denoised)).float()
        perturbation = attack(clean_logits)
        with autocast:
            adversarial_logits = model(to_image_space(denoised + perturbation)).float()
    else:
        with autocast, torch.no_grad():
            perturbation = attack(model(to_image_space(denoised)).float())
        # One forward for the clean and the attacked draws: a single DDP forward per backward.
        with autocast:
            logits = model(to_image_space(torch.cat([denoised, denoised + perturbation]))).float()
        clean_logits, adversarial_logits = logits[:len(denoised)], logits[len(denoised):]
    num_classes = clean_logits.shape[-1]
    clean = clean_logits.view(-1, draws, num_classes)
    adversarial = None if adversarial_logits is None else \
        adversarial_logits.view(-1, draws, num_classes)
    score = None if score_logits is None else score_logits.view(-1, draws, num_classes)
    loss, terms = ft_cadis_loss(clean, adversarial, score, labels, loss_config)
    (loss / config.accumulation_steps).backward()
    accuracy = (clean.argmax(-1) == labels[:, None]).float().mean()
    return {"loss": float(loss.detach()), "train_denoised_accuracy": float(accuracy),
            **{key: float(value) for key, value in terms.items()}}


def split_training(config: TrainConfig, train_set: Any) -> tuple[list[int], list[int]]:
    """The images trained on (the first ``max_train_images``) and the validation hold-out:
    seeded and class-stratified, the same in every trial, so the proxy (and a sweep's rank
    stage) never touch the test set or the images trained on."""
    train_indices, val_indices = stratified_holdout(train_set.labels, config.val_images,
                                                    config.val_seed)
    return train_indices[:config.max_train_images], val_indices


def build_training_draws(config: TrainConfig, root: str | Path, device: torch.device,
                         progress: bool = True) -> TrainDrawStore:
    """Build (or find) the store of ``config.train_draws`` denoised draws per training image
    under ``root`` (``root/train-DIGEST``), on ``device``."""
    sources = config.model_sources()
    train_set = load_dataset(sources.dataset, "train", sources.data_root,
                             image_size=sources.image_size)
    train_indices, _ = split_training(config, train_set)
    unet, scheduler = load_denoiser(sources.denoiser)
    denoiser = OneShotDenoiser(unet, scheduler, config.sigma).to(device)
    key = training_store_key(config, sources, train_indices, device)
    return build_train_store(store_folder(root, TRAIN_ROLE, key), key, denoiser, train_set,
                             progress=progress)


@torch.inference_mode()
def proxy_metrics(classifier: Classifier, denoiser: OneShotDenoiser, dataset,
                  indices: list[int], config: TrainConfig, sources: ModelSources,
                  num_classes: int, image_size: int) -> dict[str, float]:
    """Denoised accuracy (one draw per held-out image) and the certified-accuracy proxy on
    the first ``proxy_images`` of them (:mod:`cadis.certifier`): from the stored draws of
    ``config.proxy_store`` when given (the classifier alone runs), else drawn and denoised
    here; the same counts."""
    was_training = classifier.training
    classifier.eval()
    device = next(denoiser.parameters()).device
    images, labels = stack_images(dataset, indices)
    images, labels = images.to(device), labels.to(device)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    parameters = config.proxy_parameters(default_batch_size(device))
    batch_size = parameters.batch_size
    correct = 0
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        noisy = batch + config.sigma * torch.randn(batch.shape, generator=generator, device=device)
        predictions = classifier(denoiser(noisy)).argmax(1)
        correct += int((predictions == labels[start:start + len(batch)]).sum())
    proxy_indices = indices[:config.proxy_images]
    if config.proxy_store:
        draws: LiveDraws | StoredDraws = StoredDraws(
            DrawStore.open(config.proxy_store,
                           proxy_store_key(config, sources, proxy_indices, device)),
            classifier, device)
    else:
        draws = LiveDraws(Smooth(DenoisedClassifier(denoiser, classifier), num_classes,
                                 config.sigma), dataset, config.seed, HELD_OUT_SPLIT)
    radii = radius_grid(config.sigma, config.proxy_n, config.proxy_alpha, image_size)
    records = list(certified_records(draws, proxy_indices, CertificationSettings(
        config.sigma, parameters, tuple(radii))))
    classifier.train(was_training)
    metrics = {"val_denoised_accuracy": correct / len(images), PROXY_ACR:
               average_certified_radius(records)}
    # The proxy's noise, from the same records (no more certification): the standard error
    # of the mean radius; one image has no sample spread, so no SE.
    per_image = certified_radii(records)
    if len(per_image) > 1:
        metrics[PROXY_ACR_SE] = float(per_image.std(ddof=1)) / math.sqrt(len(per_image))
    for radius, accuracy in certified_accuracy(records, radii).items():
        metrics[f"{PROXY_PREFIX}{radius_key(radius)}"] = accuracy
    return metrics
