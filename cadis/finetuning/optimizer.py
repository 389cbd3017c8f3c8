"""The optimizer of fine-tuning and what happens to it at each step: AdamW over parameter
groups (layer-wise learning-rate decay; no weight decay for biases and 1-D parameters when
asked), the schedules of :mod:`cadis.finetuning.schedule` applied group by group, and
gradient clipping before the step.

Every setting has an off value that gives what cadis did before it (one AdamW group, the
same lr and weight decay for every trained parameter, no clipping): ``layer_decay`` 1,
``weight_decay_skip_1d`` false, ``grad_clip`` None. The reference recipe's values are in the
CIFAR-10 and ImageNet sweep files and in docs/fine-tuning.md ("The reference recipe"); the
reference code is defined in docs/design.md, "The reference code".
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

import torch
from torch import nn

from cadis.errors import CadisError

# What each group keeps beside torch's own keys: its factor on the scheduled learning rate
# (layer decay) and on the scheduled weight decay (0 for the no-decay group).
LR_SCALE: Final = "lr_scale"
WEIGHT_DECAY_SCALE: Final = "weight_decay_scale"
# The parameters of a ViT below its first block: layer 0 (the reference code's rule, from BEiT and
# MAE). Everything after the blocks (final norm, head) is the top layer.
VIT_STEM: Final = ("cls_token", "pos_embed", "patch_embed")
LAYER_DECAY_OFF: Final = 1.0


def is_vit_like(model: nn.Module) -> bool:
    """A model with a patch embedding and a sequence of ``blocks``: timm's ViTs, DeiT, CLIP
    ViTs (EfficientNet's ``blocks`` are stages of convolutions, not a ViT's layers)."""
    blocks = getattr(model, "blocks", None)
    return hasattr(model, "patch_embed") and isinstance(blocks, (nn.Sequential, nn.ModuleList))


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """Each parameter name's layer id, 0 at the input, and the top id (the head's).

    ViT-like models (:func:`is_vit_like`), the reference code's rule: ``cls_token``,
    ``pos_embed`` and ``patch_embed.*`` are layer 0, ``blocks.i.*`` layer ``i + 1``, the rest
    (final norm, head) layer ``len(blocks) + 1``, the top. Other timm models that declare
    their layers (``group_matcher``): timm's own grouping (``timm.models.group_parameters``,
    the one :func:`timm.optim.param_groups_layer_decay` uses: stem first, then each block,
    unmatched parameters such as the head last, on top). Names are the model's own, so
    LoRA's adapters (``blocks.3.attn.qkv.lora_A.default.weight``) get their layer's id.

    :class:`CadisError` for a model with neither: it has no layers to decay over.
    """
    names = [name for name, _ in model.named_parameters()]
    if is_vit_like(model):
        top = len(model.blocks) + 1
        ids = {}
        for name in names:
            parts = name.split(".")
            if parts[0] in VIT_STEM:
                ids[name] = 0
            elif parts[0] == "blocks":
                ids[name] = int(parts[1]) + 1
            else:
                ids[name] = top
        return ids, top
    if hasattr(model, "group_matcher"):
        from timm.models import group_parameters

        ids = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
        return dict(ids), max(ids.values())
    raise CadisError(f"layer_decay needs a model with layers: {type(model).__name__} is neither "
                     "a ViT (patch_embed and blocks) nor a timm model with a group_matcher; "
                     "set layer_decay: 1 (off)")


def parameter_groups(model: nn.Module, layer_decay: float,
                     skip_1d: bool) -> list[dict[str, Any]]:
    """The trainable parameters of ``model`` (those that require grad) in AdamW groups.

    A parameter of layer ``i`` (:func:`layer_ids`) with top layer ``L`` gets the learning
    rate times ``layer_decay ** (L - i)``: the head the full rate, each layer below it
    ``layer_decay`` times the one above. ``layer_decay`` 1 makes no layers (any model works).
    With ``skip_1d``, biases and 1-D parameters (norm scales and shifts) get no weight decay.
    Guarantees: every trainable parameter is in exactly one group, frozen ones in none; each
    group holds :data:`LR_SCALE` and :data:`WEIGHT_DECAY_SCALE` (1 or 0) for
    :func:`set_hyperparameters`; the groups' order depends on the model alone.
    """
    ids, top = layer_ids(model) if layer_decay != LAYER_DECAY_OFF else ({}, 0)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        layer = ids.get(name, top)
        decayed = not (skip_1d and (parameter.ndim <= 1 or name.endswith(".bias")))
        group = groups.setdefault((layer, decayed), {
            "params": [], LR_SCALE: layer_decay ** (top - layer),
            WEIGHT_DECAY_SCALE: 1.0 if decayed else 0.0})
        group["params"].append(parameter)
    return list(groups.values())


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, layer_decay: float,
                   skip_1d: bool) -> torch.optim.AdamW:
    """AdamW over :func:`parameter_groups` of ``model``, at ``lr`` and ``weight_decay``
    before any schedule (:func:`set_hyperparameters` sets them at every step)."""
    optimizer = torch.optim.AdamW(parameter_groups(model, layer_decay, skip_1d), lr=lr,
                                  weight_decay=weight_decay)
    set_hyperparameters(optimizer, lr, weight_decay)
    return optimizer


def set_hyperparameters(optimizer: torch.optim.Optimizer, lr: float,
                        weight_decay: float) -> None:
    """The scheduled ``lr`` and ``weight_decay`` of this step, scaled by each group's own
    factors."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group[LR_SCALE]
        group["weight_decay"] = weight_decay * group[WEIGHT_DECAY_SCALE]


def clip_gradients(parameters: Iterable[torch.Tensor], max_norm: float | None,
                   scope: str) -> None:
    """Scale the accumulated gradients down to ℓ2 norm ``max_norm`` (None: untouched).

    ``scope`` ``"parameter"``: each parameter tensor's gradient on its own, the reference
    code's rule (DINO's ``clip_gradients``); ``"total"``: all of them together, as one vector
    (``torch.nn.utils.clip_grad_norm_``). Gradients under the bound are left as they are.
    Call it after the last micro-batch's backward (the gradients are then the effective
    batch's, and under DDP already averaged across workers) and before the optimizer steps.
    No GradScaler is used here (reduced precision is bf16 autocast), so the gradients are
    already unscaled.
    """
    if max_norm is None:
        return
    with_grad = [parameter for parameter in parameters if parameter.grad is not None]
    if scope == "total":
        torch.nn.utils.clip_grad_norm_(with_grad, max_norm)
        return
    for parameter in with_grad:
        torch.nn.utils.clip_grad_norm_([parameter], max_norm)
