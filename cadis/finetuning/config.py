"""The training configuration: the ``base:`` section of a sweep file, validated once.

One flat mapping of the names users write (``lambda``, ``epsilon``, ``num_noises``,
``lora_rank``, ``confidence_threshold`` ...), read from YAML, overridden with ``--set
key=value`` and checked here, so that every later stage can trust it. Every error names the
key and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from cadis.errors import CadisError
from cadis.files import check_creatable_folder
from cadis.finetuning.hallucination import validate_confidence_threshold
from cadis.finetuning.lora import FINETUNE_MODES, FinetuneConfig
from cadis.finetuning.losses import (
    FTCadisLossConfig,
    validate_adv_weight,
    validate_attack_steps,
    validate_epsilon,
    validate_num_noises,
)
from cadis.models.devices import DEVICES
from cadis.models.sources import ModelSources, local_absolute
from cadis.overrides import coerce_like, parse_overrides
from cadis.smoothing.bounds import CertificationParameters
from cadis.smoothing.precision import PRECISION_CHOICES, Precision, resolve_precision
from cadis.smoothing.sequential import SequentialPlan, check_budget
from cadis.smoothing.smooth import CPU_BATCH_SIZE
from cadis.validation import (
    check_sigma,
    choice,
    integer,
    non_negative_float,
    number_in,
    positive_float_or_none,
    positive_int,
)

METHODS = ("ft_cadis", "denoised_ce", "none")
# Keys a method ignores, and why: the one table of it. The loss gives an ignored lambda and
# confidence_threshold their off value (OFF_VALUES: no adversarial loss, tau = 0, every draw
# trained on) and a sweep refuses to search a key every trial's method ignores (its trials
# would differ in a name only).
IGNORED_BY_METHOD = {
    "denoised_ce": {
        "confidence_threshold": "it trains on every draw (tau = 0)",
        "lambda": "it has no adversarial loss",
        "epsilon": "it runs no attack",
        "attack_steps": "it runs no attack",
        "attack_restandardize": "it runs no attack",
    },
}
# The value a loss setting takes where its method ignores it.
OFF_VALUES = {"lambda": 0.0, "confidence_threshold": 0.0}
CONFIDENCE_MODELS = ("live", "frozen")
# How grad_clip bounds the gradient: each parameter tensor's norm (the reference code's rule,
# from DINO; docs/design.md, "The reference code") or the norm of all of them together
# (torch.nn.utils.clip_grad_norm_).
GRAD_CLIP_SCOPES = ("parameter", "total")
# lora_alpha's one word: alpha = lora_rank, so the update's scale alpha / rank is 1 at every
# rank (the reference code's scale).
LORA_ALPHA_RANK = "rank"
# Keys that take more than one type (a number or a rule's name; "auto" or a list of names).
UNION_KEYS = ("confidence_threshold", "lora_target_modules")
# Numbers whose default is None (off): given, they are read as floats (coerce_like).
OPTIONAL_FLOATS = ("grad_clip", "weight_decay_end")
# Keys whose Python attribute differs from what users write (``lambda`` is a keyword).
RENAMED = {"lambda": "adv_weight"}


@dataclass
class CertifyConfig:
    """How the result of training is certified (docs/design.md §3)."""

    n: int = 1000
    n0: int = 100
    alpha: float = 0.001
    skip: int = 20
    max_images: int | None = 500
    batch_size: int | None = None  # noise draws per forward; None: what is fast on the device
    # How the forwards run (cadis.smoothing.precision): auto is fp32 on the CPU, bf16 or fp16
    # on CUDA; bf16 pays on CPUs with native bf16. compile: torch.compile, paid once a run.
    precision: str = "auto"
    compile: bool = False
    # Stop each image once the grid radii n draws can reach are decided (the sequential test,
    # sound at alpha over its looks; n is then the most draws an image may spend).
    sequential: bool = False
    # A folder of stores of test-set draws (cadis certify --draws-dir): the draws are denoised
    # once there and every later classifier certified on these images runs alone.
    draws_dir: str | None = None

    def parameters(self, default_batch_size: int) -> CertificationParameters:
        """The certification's parameters (``batch_size`` None: ``default_batch_size``);
        :class:`CadisError` naming ``certify.KEY`` for an invalid one."""
        return _parameters("certify.", self.n0, self.n, self.alpha,
                           self.batch_size or default_batch_size)


@dataclass
class TrainConfig:
    # The off-the-shelf pair: a `cadis pretrain` folder, or explicit names that override it.
    models: str | None = "models/fashion-mnist"
    classifier: str | None = None
    denoiser: str | None = None
    dataset: str | None = None
    data_root: str | None = None
    image_size: int | None = None
    # The method: ft_cadis, denoised_ce (all draws, no attack), none (certify as is).
    method: str = "ft_cadis"
    sigma: float = 0.5
    num_noises: int = 2
    adv_weight: float = 2.0
    epsilon: float = 0.25
    attack_steps: int = 1
    # The reference code's re-standardisation of each attacked residual (cadis.finetuning.attack);
    # needs the clean images, so fresh draws (train_draws: 0).
    attack_restandardize: bool = False
    confidence_threshold: float | str = "argmax"
    confidence_model: str = "live"
    warm_start: bool = True
    detach_target: bool = False
    require_all_selected: bool = True
    # How the classifier is fine-tuned.
    finetune: str = "lora"
    lora_rank: int = 4
    lora_alpha: float | str = 8.0  # or "rank": alpha = lora_rank, scale 1 (the reference code's)
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | str = "auto"
    # Optimisation: batch_size images per micro-batch (each with num_noises draws),
    # effective_batch_size images per optimizer step (gradient accumulation).
    epochs: int = 2
    max_steps_per_epoch: int | None = None
    batch_size: int = 32
    effective_batch_size: int = 64
    lr: float = 2e-4
    weight_decay: float = 0.01
    warmup_steps: int = 20
    # The reference recipe's optimisation (docs/fine-tuning.md); every default is
    # off, what cadis did before these settings. layer_decay: each layer's lr is lr times
    # layer_decay ** (layers above it) (cadis.finetuning.optimizer; 1 = off). grad_clip: the
    # gradient norm bound before each optimizer step (None = off), per parameter tensor or in
    # total (grad_clip_scope). weight_decay_end: weight decay follows a cosine from
    # weight_decay to it over the steps (None = constant). weight_decay_skip_1d: biases and
    # 1-D parameters (norms) get none. drop_path: timm's stochastic-depth rate.
    layer_decay: float = 1.0
    grad_clip: float | None = None
    grad_clip_scope: str = "parameter"
    weight_decay_end: float | None = None
    weight_decay_skip_1d: bool = False
    drop_path: float = 0.0
    augment: str = "none"
    max_train_images: int | None = None
    # The validation hold-out: val_images of the training split, class-stratified and seeded
    # by val_seed (the same in every trial); the per-epoch proxy certifies its first
    # proxy_images, a sweep's rank stage its first certify.rank.images.
    val_images: int = 500
    val_seed: int = 0
    proxy_images: int = 100
    proxy_n: int = 100
    proxy_n0: int = 10
    proxy_alpha: float = 0.001
    # A store of the proxy's denoised draws (cadis.draws.certification_store), made once for a
    # sweep's trials; None: every evaluation draws and denoises its own (the same counts).
    proxy_store: str | None = None
    # Training draws denoised once (cadis.draws.training_store): train_draws (K) per image of
    # the training images, each micro-step sampling num_noises of them; 0: fresh draws at
    # every step, denoised there. train_store: where they are (a sweep and `cadis train` set
    # it when train_draws > 0).
    train_draws: int = 0
    train_store: str | None = None
    # seed: the noise of every certification (the proxy's, the rank stage's, the test's) and
    # the keys of the stored draws. train_seed: training's own randomness alone (the LoRA and
    # head initialisation, the data order, the training noise or which stored training draws
    # a step samples); None: seed. Two train seeds of one config certify on the same draws.
    seed: int = 0
    train_seed: int | None = None
    # Where it runs: Ray Train workers (1 = in this process unless a Ray address is set).
    workers: int = 1
    cpus_per_worker: float = 1.0
    device: str = "auto"
    amp: bool = True
    certify: CertifyConfig = field(default_factory=CertifyConfig)

    def loss_config(self) -> FTCadisLossConfig:
        """The loss's settings, a key the method ignores (:data:`IGNORED_BY_METHOD`) at its
        :data:`OFF_VALUES`."""
        ignored = IGNORED_BY_METHOD.get(self.method, {})
        return FTCadisLossConfig(
            adv_weight=OFF_VALUES["lambda"] if "lambda" in ignored else self.adv_weight,
            confidence_threshold=(OFF_VALUES["confidence_threshold"]
                                  if "confidence_threshold" in ignored
                                  else self.confidence_threshold),
            warm_start=self.warm_start, detach_target=self.detach_target,
            require_all_selected=self.require_all_selected)

    def finetune_config(self) -> FinetuneConfig:
        """What shapes the trained weights; ``lora_alpha: rank`` resolved to the rank, so a
        checkpoint states the number that made it."""
        alpha = self.lora_rank if self.lora_alpha == LORA_ALPHA_RANK else self.lora_alpha
        return FinetuneConfig(mode=self.finetune, lora_rank=self.lora_rank,
                              lora_alpha=alpha, lora_dropout=self.lora_dropout,
                              lora_target_modules=self.lora_target_modules)

    def denoiser_precision(self, device: torch.device) -> Precision:
        """The one precision the denoiser runs in on ``device``, in training (live draws and
        stored training draws) as in the final certification: ``certify.precision``
        resolved for the device (auto: fp32 on the CPU, bf16 or fp16 on CUDA). Training on
        draws of another precision than the certified base sees would fine-tune the
        classifier for a denoiser it is not certified with."""
        return resolve_precision(self.certify.precision, device)

    def proxy_parameters(self, batch_size: int) -> CertificationParameters:
        """The per-epoch proxy's certification parameters (the certify batch size, else
        ``batch_size``); :class:`CadisError` naming ``proxy_KEY`` for an invalid one."""
        return _parameters("proxy_", self.proxy_n0, self.proxy_n, self.proxy_alpha,
                           self.certify.batch_size or batch_size)

    def model_sources(self) -> ModelSources:
        """The models and data this config names (a `cadis pretrain` folder, or explicit
        names that override it), resolved once for whoever loads them."""
        return ModelSources.resolve(self.models, self.classifier, self.denoiser, self.dataset,
                                    self.data_root, self.image_size)

    @property
    def training_seed(self) -> int:
        """The seed of training's randomness: ``train_seed``, or ``seed`` when it is None."""
        return self.seed if self.train_seed is None else self.train_seed

    @property
    def accumulation_steps(self) -> int:
        return self.effective_batch_size // self.batch_size

    def to_dict(self) -> dict[str, Any]:
        """The config as users write it (``lambda``, not ``adv_weight``): logged whole."""
        data = dataclasses.asdict(self)
        for user_key, attribute in RENAMED.items():
            data[user_key] = data.pop(attribute)
        return data


def _parameters(prefix: str, n0: Any, n: Any, alpha: Any,
                batch_size: Any) -> CertificationParameters:
    # The one validator of certification parameters; its messages start with the key, which
    # the prefix turns into the config's (certify.n, proxy_alpha).
    try:
        return CertificationParameters(n0, n, alpha, batch_size)
    except CadisError as error:
        raise CadisError(f"{prefix}{error}") from None


def validate(config: TrainConfig) -> TrainConfig:
    """Check every value (raising :class:`CadisError` naming the key); returns ``config``."""
    choice(config.method, "method", METHODS)
    choice(config.confidence_model, "confidence_model", CONFIDENCE_MODELS)
    choice(config.finetune, "finetune", FINETUNE_MODES)
    choice(config.device, "device", DEVICES)
    check_sigma(config.sigma)
    validate_num_noises(config.num_noises)
    validate_adv_weight(config.adv_weight)
    validate_epsilon(config.epsilon)
    validate_attack_steps(config.attack_steps)
    config.confidence_threshold = validate_confidence_threshold(config.confidence_threshold)
    config.lora_alpha = _lora_alpha(config.lora_alpha)
    config.finetune_config().validate()
    _validate_recipe(config)
    for key in ("epochs", "batch_size", "effective_batch_size", "val_images", "proxy_images",
                "workers"):
        positive_int(getattr(config, key), key)
    if config.train_seed is not None:
        integer(config.train_seed, "train_seed")
    for key in ("max_steps_per_epoch", "max_train_images", "image_size"):
        if getattr(config, key) is not None:
            positive_int(getattr(config, key), key)
    if config.train_draws:
        positive_int(config.train_draws, "train_draws")
        if config.num_noises > config.train_draws:
            raise CadisError(f"num_noises ({config.num_noises}) must be at most train_draws "
                             f"({config.train_draws}): each step samples its draws from them")
        if config.attack_restandardize:
            raise CadisError("attack_restandardize needs train_draws: 0: it re-standardises "
                             "each draw's residual from its clean image, which stored draws "
                             "do not carry")
        if config.augment != "none":
            raise CadisError(f"train_draws needs augment: none (got {config.augment!r}): stored "
                             "draws are of the images as they are")
    if config.effective_batch_size % config.batch_size:
        raise CadisError(f"effective_batch_size ({config.effective_batch_size}) must be a "
                         f"multiple of batch_size ({config.batch_size})")
    for key in ("lr", "weight_decay", "warmup_steps", "cpus_per_worker"):
        non_negative_float(getattr(config, key), key)
    # certify first: its batch_size is the proxy's too, and named as certify's.
    config.certify.parameters(CPU_BATCH_SIZE)
    config.proxy_parameters(CPU_BATCH_SIZE)
    positive_int(config.certify.skip, "certify.skip")
    if config.certify.sequential:
        try:
            check_budget(config.certify.n0, config.certify.n)
            # Radius 0 is the grid's first: n draws that cannot reach it certify nothing.
            SequentialPlan([0.0], config.sigma, config.certify.alpha, config.certify.n)
        except CadisError as error:
            raise CadisError(f"certify.{error}") from None
    choice(config.certify.precision, "certify.precision", PRECISION_CHOICES)
    if config.device == "cpu":
        # Known now only for an explicit CPU: with auto, the workers' devices decide.
        try:
            resolve_precision(config.certify.precision, torch.device("cpu"))
        except CadisError as error:
            raise CadisError(f"certify.precision: {error}") from None
    if config.certify.max_images is not None:
        positive_int(config.certify.max_images, "certify.max_images")
    if config.certify.draws_dir is not None:
        if not isinstance(config.certify.draws_dir, str) or not config.certify.draws_dir:
            raise CadisError(f"certify.draws_dir must be a folder path or null, got "
                             f"{config.certify.draws_dir!r}")
        if config.certify.compile:
            raise CadisError("certify.draws_dir: from stored draws only the classifier runs, "
                             "so compile must be false")
        check_creatable_folder(config.certify.draws_dir, "certify.draws_dir")
    if not (config.models or (config.classifier and config.denoiser and config.dataset)):
        raise CadisError("models is empty: name a `cadis pretrain` folder, or classifier, "
                         "denoiser and dataset")
    return config


def _lora_alpha(value: Any) -> float | str:
    """``lora_alpha`` as a float, or the word :data:`LORA_ALPHA_RANK`; :class:`CadisError`
    naming both forms otherwise (its range, > 0, is :class:`FinetuneConfig`'s to check)."""
    if value == LORA_ALPHA_RANK:
        return value
    try:
        return coerce_like("lora_alpha", value, 0.0)
    except CadisError:
        raise CadisError(f"lora_alpha must be a number > 0 or {LORA_ALPHA_RANK!r} (alpha = "
                         f"lora_rank: scale 1); got {value!r}") from None


def _validate_recipe(config: TrainConfig) -> None:
    """The reference recipe's settings (layer_decay, grad_clip, the weight-decay schedule,
    drop_path), each refused with its key and allowed range."""
    number_in(config.layer_decay, "layer_decay", 0.0, 1.0, "(]", "1 = off")
    positive_float_or_none(config.grad_clip, "grad_clip")
    choice(config.grad_clip_scope, "grad_clip_scope", GRAD_CLIP_SCOPES)
    if config.weight_decay_end is not None:
        non_negative_float(config.weight_decay_end, "weight_decay_end")
    number_in(config.drop_path, "drop_path", 0.0, 1.0, "[)", "0 = off")


def from_mapping(base: dict[str, Any], overrides: list[str] = ()) -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from a ``base:`` mapping and ``--set`` items."""
    defaults = TrainConfig().to_dict()
    values = dict(defaults)
    certify = dict(defaults["certify"])
    items = [(key, value) for key, value in (base or {}).items()]
    items += parse_overrides(overrides)
    for key, value in items:
        if key.startswith("certify.") or key == "certify":
            updates = value if key == "certify" else {key.split(".", 1)[1]: value}
            if not isinstance(updates, dict):
                raise CadisError(f"certify must be a mapping of {', '.join(certify)}")
            for sub_key, sub_value in updates.items():
                if sub_key not in certify:
                    raise CadisError(f"unknown key certify.{sub_key}; allowed: "
                                     f"{', '.join(certify)}")
                certify[sub_key] = coerce_like(f"certify.{sub_key}", sub_value,
                                               defaults["certify"][sub_key])
            continue
        if key not in values:
            raise CadisError(f"unknown key {key!r}; allowed: {', '.join(sorted(values))}")
        if key in UNION_KEYS:
            values[key] = value  # more than one type allowed: validated below
        elif key in OPTIONAL_FLOATS:
            values[key] = coerce_like(key, value, 0.0)
        elif key == "lora_alpha":
            values[key] = _lora_alpha(value)
        else:
            values[key] = coerce_like(key, value, defaults[key])
    values["certify"] = CertifyConfig(**certify)
    for user_key, attribute in RENAMED.items():
        values[attribute] = values.pop(user_key)
    return validate(TrainConfig(**values))


def load_sweep_file(path: str | Path) -> dict[str, Any]:
    """Read a sweep file; a missing file or bad YAML is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise CadisError(f"sweep file {path} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise CadisError(f"sweep file {path} is not valid YAML: "
                         f"{str(error).splitlines()[0]}") from None
    if not isinstance(data, dict) or not isinstance(data.get("base", {}), dict):
        raise CadisError(f"sweep file {path} must be a mapping with a base: section")
    return data


def portable_config(config: TrainConfig) -> TrainConfig:
    """A copy whose local paths are absolute: Ray workers and trials run in other working
    directories (perhaps on other machines, where the paths must be shared storage)."""
    portable = copy.deepcopy(config)
    for key in ("models", "classifier", "denoiser", "data_root", "proxy_store", "train_store"):
        setattr(portable, key, local_absolute(getattr(portable, key)))
    if portable.certify.draws_dir:  # a local folder, perhaps not made yet
        portable.certify.draws_dir = str(Path(portable.certify.draws_dir).expanduser().absolute())
    return portable
