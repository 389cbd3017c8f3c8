"""`cadis pretrain`: make the off-the-shelf pair that the embedded default starts from.

Trains, on clean images only, a timm classifier and a diffusers DDPM (epsilon prediction, the
ordinary DDPM loss), writes both in the Hugging Face layout that the hub loaders read, and
measures on the test set what the pair achieves: clean accuracy, and accuracy after one-shot
denoising of one noise draw at each evaluation sigma. Each part is written to a temporary
folder and moved into place only when complete; a rerun reuses finished parts whose settings
match.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from cadis.data import IN_MEMORY_DATASETS, DatasetInfo, in_memory, load_dataset
from cadis.errors import CadisError
from cadis.files import atomic_directory, atomic_write_text
from cadis.finetuning.schedule import warmup_cosine
from cadis.models.classifier import Classifier, count_parameters, load_classifier, save_classifier
from cadis.models.denoiser import load_denoiser, save_denoiser
from cadis.models.identity import models_folder_hashes
from cadis.models.sources import CLASSIFIER_DIR, DENOISER_DIR, MANIFEST
from cadis.overrides import coerce_like, parse_overrides
from cadis.progress import progress_bar
from cadis.smoothing.denoise import OneShotDenoiser, timestep_for_sigma, to_diffusion_space
from cadis.validation import check_sigmas

SETTINGS_FILE = "cadis_pretrain.json"
# Our own classifiers see [0, 1] images normalised to [-1, 1], like the diffusion model.
NORMALISATION = (0.5, 0.5)
EVAL_BATCH_SIZE = 256


@dataclass
class ClassifierRecipe:
    architecture: str = "vit_tiny_patch16_224"
    # Overrides of the architecture's defaults: timm's ViT takes a smaller size, patch, depth.
    # 7x7 patches of 28x28 images: 16 tokens, which keeps training and certification cheap
    # on a CPU. Measured here: 0.889 test accuracy after 8 epochs with flips.
    model_args: dict[str, Any] = field(default_factory=lambda: {
        "patch_size": 7, "embed_dim": 128, "depth": 4, "num_heads": 4, "mlp_ratio": 2.0})
    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    # Random crops slowed a short schedule down (0.836 vs 0.889 at 8 epochs): flips only.
    augment: str = "flip"


@dataclass
class DenoiserRecipe:
    # 16 channels at full resolution: 3x the training throughput of 32 on a CPU.
    block_out_channels: tuple[int, ...] = (16, 32, 64)
    layers_per_block: int = 1
    # Self-attention at the coarsest resolution only: it costs little there.
    attention: bool = True
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    steps: int = 2500
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 100
    ema_decay: float = 0.999
    # Share of training timesteps drawn from the range one-shot denoising uses at these sigmas;
    # the rest are uniform over the whole schedule, so it stays an ordinary DDPM.
    focus_fraction: float = 0.8
    focus_sigma_range: tuple[float, float] = (0.12, 1.0)


@dataclass
class PretrainConfig:
    dataset: str = "fashion-mnist"
    data_root: str | None = None
    # The size imagefolder images are resized to (the other datasets have their own).
    image_size: int | None = None
    seed: int = 0
    classifier: ClassifierRecipe = field(default_factory=ClassifierRecipe)
    denoiser: DenoiserRecipe = field(default_factory=DenoiserRecipe)
    eval_sigmas: tuple[float, ...] = (0.25, 0.5, 1.0)
    eval_max_images: int | None = None


def apply_overrides(config: PretrainConfig, overrides: list[str]) -> PretrainConfig:
    """Apply ``key=value`` overrides (dotted keys, values parsed as YAML) to a copy of ``config``."""
    data = dataclasses.asdict(config)
    for key, value in parse_overrides(overrides):
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise CadisError(f"unknown pretrain key {key!r}; allowed: {_allowed_keys(data)}")
            node = node[part]
        if leaf not in node and not (parents and parents[-1] == "model_args"):
            raise CadisError(f"unknown pretrain key {key!r}; allowed: {_allowed_keys(data)}")
        node[leaf] = coerce_like(key, value, node.get(leaf))
    return config_from_dict(data)


def _allowed_keys(data: dict, prefix: str = "") -> str:
    keys = []
    for key, value in data.items():
        if isinstance(value, dict) and key != "model_args":
            keys.append(_allowed_keys(value, f"{prefix}{key}."))
        else:
            keys.append(f"{prefix}{key}")
    return ", ".join(keys)


def config_from_dict(data: dict) -> PretrainConfig:
    try:
        denoiser = dict(data["denoiser"])
        denoiser["block_out_channels"] = tuple(denoiser["block_out_channels"])
        denoiser["focus_sigma_range"] = tuple(denoiser["focus_sigma_range"])
        return PretrainConfig(**{**data, "classifier": ClassifierRecipe(**data["classifier"]),
                                 "denoiser": DenoiserRecipe(**denoiser),
                                 "eval_sigmas": tuple(data["eval_sigmas"])})
    except (TypeError, ValueError) as error:
        raise CadisError(f"invalid pretrain config: {error}") from None


def pretrain(config: PretrainConfig, out_dir: Path, force: bool = False,
             progress: bool = True) -> dict[str, Any]:
    """Train (or reuse) the classifier and the denoiser, evaluate the pair, write the manifest.

    The manifest lists the sha256 of every model file (``files``,
    :func:`~cadis.models.identity.models_folder_hashes`); a rerun reuses it only while its
    config and those hashes still match.

    Both splits are held in memory as uint8 (an imagefolder tree is read once, at
    ``image_size``). The manifest's config names the data with an absolute root, so the
    commands that read the models folder find the same images from anywhere.
    """
    torch.manual_seed(config.seed)
    out_dir = Path(out_dir)
    if config.data_root is not None:
        config = dataclasses.replace(config,
                                     data_root=str(Path(config.data_root).expanduser().resolve()))
    train_set, test_set = (load_dataset(config.dataset, split, config.data_root,
                                        image_size=config.image_size)
                           for split in ("train", "test"))
    info = train_set.info
    check_sigmas(config.eval_sigmas, "eval_sigmas")
    data = _data_settings(config)
    classifier_settings = {**data, **dataclasses.asdict(config.classifier)}
    denoiser_settings = {**data, **dataclasses.asdict(config.denoiser)}
    # Build both models first: a bad architecture fails before any image is read or trained on.
    classifier = _new_classifier(config.classifier, info)
    _new_unet(config.denoiser, info)
    train_set = in_memory(train_set, augment=config.classifier.augment)
    test_set = in_memory(test_set)
    out_dir.mkdir(parents=True, exist_ok=True)

    seconds: dict[str, float] = {}
    classifier_dir = out_dir / CLASSIFIER_DIR
    if force or not _settings_match(classifier_dir, classifier_settings):
        started = time.perf_counter()
        _train_classifier(classifier, config.classifier, train_set, progress)
        seconds["classifier"] = time.perf_counter() - started
        _write_component(classifier_dir, classifier_settings, seconds["classifier"],
                         lambda d: save_classifier(classifier, d, _model_args(config.classifier,
                                                                              info),
                                                   *_normalisation(info)))
    denoiser_dir = out_dir / DENOISER_DIR
    if force or not _settings_match(denoiser_dir, denoiser_settings):
        started = time.perf_counter()
        unet, scheduler = _train_denoiser(config.denoiser, train_set, info, progress)
        seconds["denoiser"] = time.perf_counter() - started
        _write_component(denoiser_dir, denoiser_settings, seconds["denoiser"],
                         lambda d: save_denoiser(unet, scheduler, d))

    manifest_path = out_dir / MANIFEST
    files = models_folder_hashes(out_dir)
    if not seconds and manifest_path.is_file() and not force:
        manifest = json.loads(manifest_path.read_text())
        # Its figures describe the files it hashes: other files are measured again.
        if manifest.get("config") == _jsonable(config) and manifest.get("files") == files:
            return manifest
    # Evaluate what was saved, through the same loaders every other command uses.
    classifier = load_classifier(str(classifier_dir)).eval()
    unet, scheduler = load_denoiser(str(denoiser_dir))
    manifest = {
        "dataset": config.dataset,
        "classifier": str(classifier_dir),
        "denoiser": str(denoiser_dir),
        **_evaluate(classifier, unet, scheduler, test_set, config, progress),
        "train_seconds": {name: _read_settings(out_dir / d)["train_seconds"]
                          for name, d in (("classifier", CLASSIFIER_DIR),
                                          ("denoiser", DENOISER_DIR))},
        "parameters": {"classifier": count_parameters(classifier),
                       "denoiser": count_parameters(unet)},
        "denoiser_timesteps": _timestep_note(config.denoiser, scheduler),
        "config": _jsonable(config),
        "files": files,
    }
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
    return manifest


def _data_settings(config: PretrainConfig) -> dict[str, Any]:
    """What a model's data is, for deciding whether a saved model can be reused: a named
    dataset and the seed; for a folder of the user's images also which folder and size
    (the named datasets leave them out, so models made before they existed stay reusable)."""
    settings: dict[str, Any] = {"dataset": config.dataset, "seed": config.seed}
    if config.dataset not in IN_MEMORY_DATASETS:
        settings.update(data_root=config.data_root, image_size=config.image_size)
    return settings


def _model_args(recipe: ClassifierRecipe, info: DatasetInfo) -> dict[str, Any]:
    """The architecture's arguments for this data: its channels and, for fixed-size models
    (ViTs), its image size; other models keep their defaults and the adapter resizes."""
    from timm.models import get_pretrained_cfg

    args = {"in_chans": info.channels, **recipe.model_args}
    default_cfg = get_pretrained_cfg(recipe.architecture)
    if default_cfg is not None and default_cfg.fixed_input_size:
        args.setdefault("img_size", info.image_size)
    return args


def _normalisation(info: DatasetInfo) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean, std = NORMALISATION
    return (mean,) * info.channels, (std,) * info.channels


def _new_classifier(recipe: ClassifierRecipe, info: DatasetInfo) -> Classifier:
    classifier = load_classifier(recipe.architecture, num_classes=info.num_classes,
                                 **_model_args(recipe, info))
    # A fresh timm model carries its architecture's ImageNet statistics; ours are NORMALISATION.
    classifier.input_size = (info.image_size, info.image_size)
    mean, std = _normalisation(info)
    classifier.mean.copy_(torch.tensor(mean).view(1, -1, 1, 1))
    classifier.std.copy_(torch.tensor(std).view(1, -1, 1, 1))
    return classifier


def _settings_match(directory: Path, settings: dict[str, Any]) -> bool:
    saved = _read_settings(directory)
    return saved is not None and saved.get("settings") == _jsonable(settings)


def _read_settings(directory: Path) -> dict[str, Any] | None:
    path = directory / SETTINGS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _write_component(directory: Path, settings: dict[str, Any], seconds: float, save) -> None:
    """Save into a staging folder swapped in when complete: never a half-written model."""
    with atomic_directory(directory) as staging:
        save(staging)
        atomic_write_text(staging / SETTINGS_FILE, json.dumps(
            {"settings": _jsonable(settings), "train_seconds": round(seconds, 1)}, indent=2))


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    return json.loads(json.dumps(value))


def _train_classifier(classifier: Classifier, recipe: ClassifierRecipe, train_set,
                      progress: bool) -> None:
    loader = DataLoader(train_set, batch_size=recipe.batch_size, shuffle=True, drop_last=True)
    total = recipe.epochs * len(loader)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=recipe.lr,
                                  weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, total, int(recipe.warmup_epochs * len(loader))))
    classifier.train()
    bar = progress_bar(total, "classifier", "step", enabled=progress)
    for epoch in range(recipe.epochs):
        correct = seen = 0
        for images, labels in loader:
            logits = classifier(images)
            loss = F.cross_entropy(logits, labels, label_smoothing=recipe.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            correct += int((logits.argmax(1) == labels).sum())
            seen += len(labels)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}",
                            train_acc=f"{correct / seen:.3f}")
            bar.update()
    bar.close()
    classifier.eval()


def _new_unet(recipe: DenoiserRecipe, info: DatasetInfo):
    from diffusers import UNet2DModel

    levels = len(recipe.block_out_channels)
    if info.image_size % (2 ** (levels - 1)):
        raise CadisError(f"denoiser.block_out_channels has {levels} levels, which needs an image "
                         f"size divisible by {2 ** (levels - 1)}; the data is {info.image_size} px")
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if recipe.attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(sample_size=info.image_size, in_channels=info.channels,
                       out_channels=info.channels, block_out_channels=recipe.block_out_channels,
                       layers_per_block=recipe.layers_per_block, down_block_types=tuple(down),
                       up_block_types=tuple(up),
                       norm_num_groups=min(32, math.gcd(*recipe.block_out_channels)))


def _train_denoiser(recipe: DenoiserRecipe, train_set, info: DatasetInfo, progress: bool):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=recipe.num_train_timesteps,
                              beta_schedule=recipe.beta_schedule, prediction_type="epsilon")
    unet = _new_unet(recipe, info)
    ema = torch.optim.swa_utils.AveragedModel(
        unet, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(recipe.ema_decay))
    alphas_cumprod = scheduler.alphas_cumprod
    focus_low, focus_high = (timestep_for_sigma(alphas_cumprod, s)
                             for s in recipe.focus_sigma_range)
    sqrt_ac = alphas_cumprod.sqrt()
    sqrt_one_minus_ac = (1.0 - alphas_cumprod).sqrt()
    # The denoiser learns clean images: no augmentation beyond what the data is.
    images_all = train_set.images
    optimizer = torch.optim.AdamW(unet.parameters(), lr=recipe.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, recipe.steps, recipe.warmup_steps))
    unet.train()
    bar = progress_bar(recipe.steps, "denoiser", "step", enabled=progress)
    for _ in range(recipe.steps):
        index = torch.randint(0, len(images_all), (recipe.batch_size,))
        clean = to_diffusion_space(images_all[index].float() / 255.0)
        focused = torch.rand(recipe.batch_size) < recipe.focus_fraction
        timesteps = torch.where(
            focused, torch.randint(focus_low, focus_high + 1, (recipe.batch_size,)),
            torch.randint(0, recipe.num_train_timesteps, (recipe.batch_size,)))
        noise = torch.randn_like(clean)
        noisy = (sqrt_ac[timesteps].view(-1, 1, 1, 1) * clean
                 + sqrt_one_minus_ac[timesteps].view(-1, 1, 1, 1) * noise)
        loss = F.mse_loss(unet(noisy, timesteps).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        ema.update_parameters(unet)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        bar.update()
    bar.close()
    return ema.module.eval(), scheduler


def _timestep_note(recipe: DenoiserRecipe, scheduler) -> dict[str, Any]:
    low, high = (timestep_for_sigma(scheduler.alphas_cumprod, s)
                 for s in recipe.focus_sigma_range)
    return {"sampling": f"{recipe.focus_fraction:.0%} uniform over the one-shot range, "
                        "the rest uniform over the whole schedule",
            "focus_sigma_range": list(recipe.focus_sigma_range),
            "focus_timesteps": [low, high], "num_train_timesteps": recipe.num_train_timesteps,
            "beta_schedule": recipe.beta_schedule}


@torch.inference_mode()
def _evaluate(classifier: Classifier, unet: nn.Module, scheduler, test_set,
              config: PretrainConfig, progress: bool) -> dict[str, Any]:
    count = len(test_set) if config.eval_max_images is None else min(len(test_set),
                                                                     config.eval_max_images)
    images = test_set.images[:count].float() / 255.0
    labels = test_set.labels[:count]
    generator = torch.Generator().manual_seed(config.seed)
    denoisers = {sigma: OneShotDenoiser(unet, scheduler, sigma) for sigma in config.eval_sigmas}
    correct = {"clean": 0, **{sigma: 0 for sigma in config.eval_sigmas}}
    bar = progress_bar(count, "evaluate", "img", enabled=progress)
    for start in range(0, count, EVAL_BATCH_SIZE):
        batch, batch_labels = images[start:start + EVAL_BATCH_SIZE], labels[
            start:start + EVAL_BATCH_SIZE]
        correct["clean"] += int((classifier(batch).argmax(1) == batch_labels).sum())
        for sigma, denoiser in denoisers.items():
            noisy = batch + sigma * torch.randn(batch.shape, generator=generator)
            predictions = classifier(denoiser(noisy)).argmax(1)
            correct[sigma] += int((predictions == batch_labels).sum())
        bar.update(len(batch))
    bar.close()
    return {"num_test_images": count,
            "clean_accuracy": correct["clean"] / count,
            "denoised_accuracy": {str(sigma): correct[sigma] / count
                                  for sigma in config.eval_sigmas}}
