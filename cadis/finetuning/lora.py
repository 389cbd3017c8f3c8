"""What of a classifier is trained: LoRA adapters plus the head, or every parameter.

:func:`apply_finetuning` prepares a :class:`~cadis.models.classifier.Classifier` in place; the
training loop then optimises exactly the parameters that require grad, and
:mod:`cadis.finetuning.checkpoint` saves and restores exactly those.

``peft`` is imported inside the functions that need it: importing it takes seconds, which
commands that never fine-tune should not pay.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from cadis.errors import CadisError, first_line
from cadis.models.classifier import Classifier

FINETUNE_MODES = ("lora", "full")
AUTO_TARGETS = "auto"
# timm's ViTs (and most of its attention models) name their fused q/k/v projection this.
VIT_ATTENTION_TARGET = "qkv"
# peft's prefix for the adapter parameters it adds.
LORA_PARAMETER_PREFIX = "lora_"
# How many module names an error about unknown target modules lists.
MODULE_NAMES_SHOWN = 8


@dataclass
class FinetuneConfig:
    """How a classifier is fine-tuned; invalid values raise :class:`CadisError` on creation.

    ``lora_alpha`` defaults to twice the default rank, so peft's update scale ``alpha / rank``
    is 2, the usual LoRA convention; like peft, the scale changes when only the rank is varied.
    The ``lora_*`` settings are ignored in ``"full"`` mode.
    """

    mode: str = "lora"
    lora_rank: int = 4
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | str = AUTO_TARGETS

    def __post_init__(self) -> None:
        if isinstance(self.lora_target_modules, tuple):
            self.lora_target_modules = list(self.lora_target_modules)  # JSON round trips lists
        self.validate()

    def validate(self) -> None:
        """Raise :class:`CadisError` naming the first invalid setting and its allowed values."""
        if self.mode not in FINETUNE_MODES:
            raise CadisError(f"finetune_mode must be one of {', '.join(FINETUNE_MODES)}; "
                             f"got {self.mode!r}")
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) \
                or self.lora_rank < 1:
            raise CadisError(f"lora_rank must be an integer >= 1; got {self.lora_rank!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) \
                or not self.lora_alpha > 0:
            raise CadisError(f"lora_alpha must be a number > 0; got {self.lora_alpha!r}")
        if isinstance(self.lora_dropout, bool) \
                or not isinstance(self.lora_dropout, (int, float)) \
                or not 0 <= self.lora_dropout < 1:
            raise CadisError(f"lora_dropout must be in [0, 1); got {self.lora_dropout!r}")
        targets = self.lora_target_modules
        if targets != AUTO_TARGETS and not (
                isinstance(targets, list) and targets
                and all(isinstance(name, str) and name for name in targets)):
            raise CadisError(f"lora_target_modules must be {AUTO_TARGETS!r} or a non-empty list "
                             f"of module names; got {targets!r}")


def apply_finetuning(classifier: Classifier, config: FinetuneConfig) -> Classifier:
    """Make exactly the parameters that ``config`` trains require grad, in place.

    ``"full"``: every parameter is trainable. ``"lora"``: peft injects LoRA adapters into
    ``classifier.model``, which stays the same timm module with the same forward (its targeted
    layers are wrapped); every other parameter is frozen except the classification head named
    by ``model.pretrained_cfg["classifier"]``. The adapters start as a zero update (peft's B
    matrices are zero), so the logits are unchanged until training moves them.

    Targets (``lora_target_modules``): a list of names matches each module whose full name
    is the name or ends with ``"." + name`` (peft's convention). ``"auto"`` means ``["qkv"]``
    for models that have such modules (timm ViTs), adapting the whole fused q/k/v projection,
    whereas the reference code (docs/design.md, "The reference code") adapts only its q and
    v thirds; for other models (CNNs) it means every ``nn.Conv2d`` and ``nn.Linear`` outside
    the head, except grouped (depthwise) convolutions, which peft cannot adapt unless the
    rank divides the groups.

    Returns the same ``classifier``. Raises :class:`CadisError` for an invalid config, targets
    that match no module or that peft cannot adapt, a model whose head cannot be found, and a
    classifier that already carries adapters.
    """
    config.validate()
    if config.mode == "full":
        classifier.requires_grad_(True)
        return classifier
    model = classifier.model
    if any(_is_adapter(name) for name, _ in model.named_parameters()):
        raise CadisError("the classifier already has LoRA adapters: fine-tuning applies to a "
                         "freshly loaded off-the-shelf classifier")
    heads = _head_names(model)
    targets = _resolve_targets(model, config.lora_target_modules, heads)
    _inject_lora(model, config, targets)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(_is_adapter(name) or _is_within(name, heads))
    return classifier


def _is_adapter(parameter_name: str) -> bool:
    return any(part.startswith(LORA_PARAMETER_PREFIX) for part in parameter_name.split("."))


def _head_names(model: nn.Module) -> tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    declared = cfg.get("classifier")
    heads = (declared,) if isinstance(declared, str) else tuple(declared or ())
    modules = dict(model.named_modules())
    if not heads or any(head not in modules for head in heads):
        raise CadisError(f"cannot find the classification head of {type(model).__name__}: its "
                         f"pretrained_cfg names {declared!r}; LoRA needs a timm model whose "
                         "pretrained_cfg['classifier'] names its head")
    return heads


def _is_within(name: str, prefixes: tuple[str, ...]) -> bool:
    """Whether the dotted ``name`` is one of ``prefixes`` or lies under one of them."""
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def _resolve_targets(model: nn.Module, requested: list[str] | str,
                     heads: tuple[str, ...]) -> list[str]:
    """The full names of the modules that get an adapter."""
    modules = dict(model.named_modules())

    def matching(target: str) -> list[str]:
        return [name for name in modules if name == target or name.endswith("." + target)]

    if requested == AUTO_TARGETS:
        attention = matching(VIT_ATTENTION_TARGET)
        if attention:
            return attention
        return [name for name, module in modules.items()
                if not _is_within(name, heads) and (
                    isinstance(module, nn.Linear)
                    or (isinstance(module, nn.Conv2d) and module.groups == 1))]
    missing = [target for target in requested if not matching(target)]
    if missing:
        available = [name for name in modules if name][:MODULE_NAMES_SHOWN]
        raise CadisError(f"lora_target_modules {missing} match no module of "
                         f"{type(model).__name__}; available names include "
                         f"{', '.join(available)}")
    return [name for target in requested for name in matching(target)]


def _inject_lora(model: nn.Module, config: FinetuneConfig, targets: list[str]) -> None:
    import peft

    # One regular expression of the exact names: peft full-matches a string, whereas a list
    # would also match every deeper module whose name ends the same way.
    exact_names = "|".join(re.escape(name) for name in dict.fromkeys(targets))
    lora_config = peft.LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                                  lora_dropout=config.lora_dropout, target_modules=exact_names)
    try:
        peft.inject_adapter_in_model(lora_config, model)
    except ValueError as error:  # e.g. a targeted layer of a type peft cannot adapt
        raise CadisError(f"lora_target_modules {config.lora_target_modules!r} cannot be "
                         f"adapted: {first_line(error)}") from None


def count_trainable(module: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` numbers of parameter elements of ``module``."""
    trainable = total = 0
    for parameter in module.parameters():
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
    return trainable, total


def trainable_fraction(module: nn.Module) -> float:
    """The fraction of ``module``'s parameter elements that require grad (0.0 without any)."""
    trainable, total = count_trainable(module)
    return trainable / total if total else 0.0
