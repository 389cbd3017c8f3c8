"""FT-CADIS fine-tuning: one per-worker loop, run in this process or in Ray Train workers.

Each optimizer step takes ``effective_batch_size`` images (micro-batches of ``batch_size``,
gradients accumulated), draws ``num_noises`` Gaussian noises per image, denoises them in one
shot (no gradient), scores which draws are credible, attacks the credible ones in the
denoised domain, and minimises the selective cross-entropy plus the masked adversarial KL
(cadis.losses). After each epoch the worker of rank 0 measures denoised accuracy and a cheap
certified-accuracy proxy on images held out of the training split, and saves a checkpoint
holding only the trained weights, the optimizer state and the config.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from cadis.attack import pgd_l2_denoised
from cadis.certify import Smooth
from cadis.data import load_dataset, stack_images
from cadis.denoise import DenoisedClassifier, OneShotDenoiser, to_image_space
from cadis.errors import CadisError
from cadis.evaluate import ModelSources, default_batch_size, pick_device, radius_grid
from cadis.finetune import (
    FINETUNE_CONFIG,
    TRAINED_WEIGHTS,
    apply_finetuning,
    save_trained,
    trainable_fraction,
)
from cadis.losses import ft_cadis_loss, soft_target
from cadis.models import Classifier, load_classifier, load_denoiser
from cadis.pretrain import warmup_cosine
from cadis.records import (
    Record,
    average_certified_radius,
    certified_accuracy,
    radius_key,
)
from cadis.train_config import TrainConfig, from_mapping

OPTIMIZER_STATE = "optimizer.safetensors"
RNG_STATE_KEY = "rng::cpu"
RAY_RUN_NAME = "train"
# Worker failures (a lost node, say) restart the run from the last checkpoint this often.
RAY_MAX_FAILURES = 2
PROXY_PREFIX = "proxy_certified_accuracy_r"
# The proxy's average certified radius: one number that rewards robustness at every radius,
# for early stopping and ranking trials without a large n.
PROXY_ACR = "proxy_acr"


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
    epoch: int = 0
    global_step: int = 0


def train_loop(config: TrainConfig, session: Session, progress: bool = True) -> None:
    """Fine-tune per ``config``; reports metrics and a checkpoint after every epoch."""
    torch.manual_seed(config.seed + session.rank)
    sources = ModelSources.resolve(config.models, config.classifier, config.denoiser,
                                   config.dataset, config.data_root, config.image_size)
    train_set = load_dataset(sources.dataset, "train", sources.data_root, augment=config.augment,
                             image_size=config.image_size)
    plain_set = load_dataset(sources.dataset, "train", sources.data_root,
                             image_size=config.image_size)
    info = train_set.info
    # The last val_images training images are held out: validation never touches the test set.
    train_indices = list(range(len(train_set) - config.val_images))[:config.max_train_images]
    val_indices = list(range(len(train_set) - config.val_images, len(train_set)))

    classifier = load_classifier(sources.classifier)
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
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)

    state = TrainState()
    checkpoint = session.latest_checkpoint()
    if checkpoint is not None:
        state = _restore(checkpoint, classifier, optimizer)

    shuffle = torch.Generator()
    loader = session.prepare_loader(DataLoader(
        Subset(train_set, train_indices), batch_size=config.batch_size, shuffle=True,
        drop_last=True, generator=shuffle))
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
        shuffle.manual_seed(config.seed + epoch)
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        sums: dict[str, float] = {}
        started = time.perf_counter()
        micro_batches = iter(loader)
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}",
                   unit="step", disable=not progress or session.rank != 0)
        for _ in range(steps_per_epoch):
            lr = config.lr * warmup_cosine(state.global_step, total_steps, config.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for micro in range(config.accumulation_steps):
                images, labels = next(micro_batches)
                images, labels = images.to(session.device), labels.to(session.device)
                last = micro == config.accumulation_steps - 1
                sync = nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
                with sync:
                    logged = _micro_step(images, labels, model, attacked_model, scorer, denoiser,
                                         config, loss_config, amp)
                for key, value in logged.items():
                    sums[key] = sums.get(key, 0.0) + value
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.global_step += 1
            bar.update()
            bar.set_postfix(loss=f"{logged['loss']:.3f}",
                            masked=f"{logged['hallucination_rate']:.2f}")
        bar.close()
        micro_count = steps_per_epoch * config.accumulation_steps
        seconds = time.perf_counter() - started
        metrics = {key: value / micro_count for key, value in sums.items()}
        metrics.update(epoch=epoch + 1, global_step=state.global_step, lr=lr,
                       epoch_seconds=seconds,
                       images_per_second=micro_count * config.batch_size * session.world_size
                       / seconds,
                       trainable_fraction=trainable_fraction(classifier))
        state.epoch = epoch + 1
        if session.rank == 0:
            metrics.update(_evaluate(classifier, denoiser, plain_set, val_indices, config,
                                     info.num_classes, info.image_size))
            with tempfile.TemporaryDirectory() as directory:
                _save(Path(directory), classifier, optimizer, config, state, metrics)
                session.report(metrics, Path(directory))
        else:
            session.report(metrics, None)


def _micro_step(images, labels, model, attacked_model, scorer, denoiser, config, loss_config,
                amp) -> dict[str, float]:
    """Forward and backward of one micro-batch (gradients accumulate); returns logged values."""
    draws = config.num_noises
    noisy = images.repeat_interleave(draws, 0)
    noisy = noisy + config.sigma * torch.randn_like(noisy)
    denoised = denoiser.denoise(noisy)  # [-1, 1], no gradient: the denoiser stays frozen
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext()
    with torch.no_grad(), autocast:
        score_logits = None if scorer is None else scorer(to_image_space(denoised)).float()
    perturbation = None
    if loss_config.uses_adversarial_term:
        with autocast, torch.no_grad():
            clean_logits = model(to_image_space(denoised)).float()
        target = soft_target(clean_logits.view(-1, draws, clean_logits.shape[-1]))
        perturbation = pgd_l2_denoised(attacked_model, denoised, target.repeat_interleave(draws, 0),
                                       config.epsilon, config.attack_steps)
    # One forward for the clean and the attacked draws: a single DDP forward per backward.
    inputs = denoised if perturbation is None else torch.cat([denoised, denoised + perturbation])
    with autocast:
        logits = model(to_image_space(inputs)).float()
    num_classes = logits.shape[-1]
    clean = logits[:len(denoised)].view(-1, draws, num_classes)
    adversarial = None if perturbation is None else \
        logits[len(denoised):].view(-1, draws, num_classes)
    score = None if score_logits is None else score_logits.view(-1, draws, num_classes)
    loss, terms = ft_cadis_loss(clean, adversarial, score, labels, loss_config)
    (loss / config.accumulation_steps).backward()
    accuracy = (clean.argmax(-1) == labels[:, None]).float().mean()
    return {"loss": float(loss.detach()), "train_denoised_accuracy": float(accuracy),
            **{key: float(value) for key, value in terms.items()}}


@torch.inference_mode()
def _evaluate(classifier: Classifier, denoiser: OneShotDenoiser, dataset, indices: list[int],
              config: TrainConfig, num_classes: int, image_size: int) -> dict[str, float]:
    """Denoised accuracy (one draw per held-out image) and the certified-accuracy proxy."""
    was_training = classifier.training
    classifier.eval()
    device = next(denoiser.parameters()).device
    images, labels = stack_images(dataset, indices)
    images, labels = images.to(device), labels.to(device)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    batch_size = config.certify.batch_size or default_batch_size(device)
    correct = 0
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        noisy = batch + config.sigma * torch.randn(batch.shape, generator=generator, device=device)
        predictions = classifier(denoiser(noisy)).argmax(1)
        correct += int((predictions == labels[start:start + len(batch)]).sum())
    proxy_count = min(config.proxy_images, len(images))
    smooth = Smooth(DenoisedClassifier(denoiser, classifier), num_classes, config.sigma,
                    generator=torch.Generator(device=device).manual_seed(config.seed))
    results = smooth.certify_batch(images[:proxy_count], config.proxy_n0, config.proxy_n,
                                   config.proxy_alpha, batch_size)
    records = [Record.from_prediction(i, int(labels[i]), prediction, radius, 0.0)
               for i, (prediction, radius) in enumerate(results)]
    radii = radius_grid(config.sigma, config.proxy_n, config.proxy_alpha, image_size)
    classifier.train(was_training)
    metrics = {"val_denoised_accuracy": correct / len(images), PROXY_ACR:
               average_certified_radius(records)}
    for radius, accuracy in certified_accuracy(records, radii).items():
        metrics[f"{PROXY_PREFIX}{radius_key(radius)}"] = accuracy
    return metrics


def _save(directory: Path, classifier: Classifier, optimizer: torch.optim.Optimizer,
          config: TrainConfig, state: TrainState, metrics: dict[str, float]) -> None:
    """Trained weights, optimizer and random state (safetensors), config and step (json)."""
    names = {id(p): name for name, p in classifier.named_parameters() if p.requires_grad}
    tensors = {}
    for parameter, values in optimizer.state.items():
        for key, value in values.items():
            tensors[f"{names[id(parameter)]}::{key}"] = torch.as_tensor(value).detach().cpu()
    tensors[RNG_STATE_KEY] = torch.get_rng_state()
    save_file(tensors, str(directory / OPTIMIZER_STATE))
    save_trained(classifier, directory, config.finetune_config(),
                 {"epoch": state.epoch, "global_step": state.global_step,
                  "config": config.to_dict(), "metrics": metrics})


def _restore(directory: Path, classifier: Classifier, optimizer: torch.optim.Optimizer
             ) -> TrainState:
    """Load weights and optimizer state saved by :func:`_save` into the prepared model."""
    metadata = json.loads((directory / FINETUNE_CONFIG).read_text())["metadata"]
    # Not strict: the checkpoint holds only what training changes (the frozen base is absent).
    classifier.load_state_dict(load_file(str(directory / TRAINED_WEIGHTS)), strict=False)
    parameters = dict(classifier.named_parameters())
    saved = load_file(str(directory / OPTIMIZER_STATE))
    # The noise and augmentation continue where they stopped: in one process, a resumed run
    # trains exactly as an uninterrupted one (other ranks of a Ray run restart rank 0's stream).
    torch.set_rng_state(saved.pop(RNG_STATE_KEY))
    for key, value in saved.items():
        name, _, field_name = key.rpartition("::")
        optimizer.state[parameters[name]][field_name] = value.to(parameters[name].device)
    return TrainState(epoch=metadata["epoch"], global_step=metadata["global_step"])


def preflight(config: TrainConfig) -> ModelSources:
    """Everything that can be wrong with the input, checked before any work starts: the
    models load, LoRA finds its targets, sigma fits the denoiser's schedule, data and models
    agree in channels and size."""
    sources = ModelSources.resolve(config.models, config.classifier, config.denoiser,
                                   config.dataset, config.data_root, config.image_size)
    info = load_dataset(sources.dataset, "test", sources.data_root,
                        image_size=config.image_size).info
    classifier = load_classifier(sources.classifier)
    classifier.check_input(info.channels)
    if config.method != "none":
        apply_finetuning(classifier, config.finetune_config())
    unet, scheduler = load_denoiser(sources.denoiser)
    OneShotDenoiser(unet, scheduler, config.sigma).check_input(info.channels, info.image_size,
                                                               info.image_size)
    if config.val_images >= len(load_dataset(sources.dataset, "train", sources.data_root,
                                             image_size=config.image_size)):
        raise CadisError(f"val_images ({config.val_images}) must be smaller than the training "
                         "split")
    return sources


class LocalSession:
    """Runs the loop in this process; checkpoints go to ``out_dir/checkpoints/epoch_NNN``."""

    rank = 0
    world_size = 1

    def __init__(self, out_dir: Path, device: torch.device, resume: bool) -> None:
        self.checkpoints = out_dir / "checkpoints"
        self.device = device
        self.resume = resume

    def prepare_model(self, model):
        return model

    def prepare_loader(self, loader):
        return loader

    def report(self, metrics, checkpoint_dir):
        target = self.checkpoints / f"epoch_{int(metrics['epoch']):03d}"
        staging = self.checkpoints / f".{target.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(checkpoint_dir, staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        shown = {k: round(v, 4) for k, v in metrics.items()
                 if k in ("epoch", "loss", "hallucination_rate", "val_denoised_accuracy",
                          PROXY_ACR)}
        print(f"epoch {int(metrics['epoch'])}: {json.dumps(shown)}", flush=True)

    def latest_checkpoint(self) -> Path | None:
        found = sorted(self.checkpoints.glob("epoch_[0-9][0-9][0-9]"))
        return found[-1] if self.resume and found else None


class RaySession:
    """Inside a Ray Train worker: DDP, distributed sampling and reporting through Ray."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare_model(self, model):
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=False)

    def prepare_loader(self, loader):
        import ray.train.torch

        return ray.train.torch.prepare_data_loader(loader, move_to_device=False)

    def report(self, metrics, checkpoint_dir):
        import ray.train

        checkpoint = None if checkpoint_dir is None else \
            ray.train.Checkpoint.from_directory(str(checkpoint_dir))
        ray.train.report(metrics, checkpoint=checkpoint)

    def latest_checkpoint(self) -> Path | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        # Local storage: the checkpoint's path is a directory on this machine.
        return None if checkpoint is None else Path(checkpoint.path)


def ray_train_worker(config_dict: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the TorchTrainer: the same loop inside a Ray worker."""
    train_loop(from_mapping(config_dict), RaySession(), progress=False)


def uses_ray(config: TrainConfig) -> bool:
    """Ray Train for several workers or when a cluster is named; this process otherwise."""
    return config.workers > 1 or bool(os.environ.get("RAY_ADDRESS"))


def fit(config: TrainConfig, out_dir: Path, resume: bool = False,
        progress: bool = True) -> tuple[Path, list[dict[str, float]]]:
    """Train per ``config``; returns the last checkpoint and the per-epoch metrics."""
    if uses_ray(config):
        return _fit_with_ray(config, out_dir, resume)
    session = LocalSession(out_dir, pick_device(config.device), resume)
    train_loop(config, session, progress)
    checkpoints = sorted(session.checkpoints.glob("epoch_[0-9][0-9][0-9]"))
    history = [json.loads((c / FINETUNE_CONFIG).read_text())["metadata"]["metrics"]
               for c in checkpoints]
    return checkpoints[-1], history


def _fit_with_ray(config: TrainConfig, out_dir: Path, resume: bool
                  ) -> tuple[Path, list[dict[str, float]]]:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=True)
    use_gpu = config.device == "cuda" or (
        config.device == "auto" and ray.cluster_resources().get("GPU", 0) >= config.workers)
    storage = (out_dir / "ray").absolute()
    if not resume:
        # The same run name under the same storage resumes: a fresh run must start clean.
        shutil.rmtree(storage / RAY_RUN_NAME, ignore_errors=True)
    trainer = TorchTrainer(
        ray_train_worker, train_loop_config=portable_config(config).to_dict(),
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": config.cpus_per_worker}),
        run_config=RunConfig(name=RAY_RUN_NAME, storage_path=str(storage),
                             checkpoint_config=CheckpointConfig(num_to_keep=None),
                             failure_config=FailureConfig(max_failures=RAY_MAX_FAILURES)))
    result = trainer.fit()
    history = sorted((metrics for _, metrics in result.best_checkpoints),
                     key=lambda metrics: metrics["epoch"])
    return Path(result.checkpoint.path), history


def portable_config(config: TrainConfig) -> TrainConfig:
    """Local paths made absolute: Ray workers need not share the driver's directory."""
    portable = copy.deepcopy(config)
    for key in ("models", "classifier", "denoiser", "data_root"):
        value = getattr(portable, key)
        if value and Path(value).expanduser().exists():
            setattr(portable, key, str(Path(value).expanduser().resolve()))
    return portable
