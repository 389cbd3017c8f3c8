"""The FT-CADIS fine-tuning losses (docs/design.md §4), in pure torch.

Shapes: ``B`` images, ``M`` noise draws per image, ``C`` classes. Logits of the denoised
draws are ``[B, M, C]``, labels ``[B]``, masks ``[B, M]`` booleans. Per-image losses are
returned as ``[B]`` tensors so that the caller decides how to reduce them (the training
step takes the mean over images, gradient accumulation scales it).

The three deliberate choices of the reference code (docs/design.md, "The reference code")
are settings whose default is its value: the warm start of the selective cross-entropy
(on), the soft target of the adversarial term not detached, and the adversarial term
needing all ``M`` draws of an image selected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from cadis.finetuning.hallucination import (
    ARGMAX_RULE,
    ConfidenceThreshold,
    MaskRule,
    rule_of,
    validate_confidence_threshold,
)
from cadis.validation import flag, non_negative_float, positive_int


# --------------------------------------------------------------------------- validation


def validate_adv_weight(value: object, key: str = "lambda") -> float:
    """Return the adversarial weight λ as a float; :class:`CadisError` unless finite and >= 0."""
    return non_negative_float(value, key)


def validate_epsilon(value: object, key: str = "epsilon") -> float:
    """Return the attack radius ε (in ``[-1,1]`` units) as a float.

    Raises :class:`CadisError` unless finite and >= 0.
    """
    return non_negative_float(value, key)


def validate_num_noises(value: object, key: str = "num_noises") -> int:
    """Return the number of noise draws M per image; :class:`CadisError` unless an integer >= 1."""
    return positive_int(value, key)


def validate_attack_steps(value: object, key: str = "attack_steps") -> int:
    """Return the number of PGD steps K; :class:`CadisError` unless an integer >= 1."""
    return positive_int(value, key)


# ------------------------------------------------------------------------------- losses


def _check_draw_shapes(logits: Tensor, labels: Tensor, name: str = "logits") -> None:
    if logits.dim() != 3 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"{name} must be [B, M, C] with labels [B], got {tuple(logits.shape)} "
            f"and {tuple(labels.shape)}"
        )


def _per_draw_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """CE(z_ij, y_i) as a ``[B, M]`` tensor."""
    batch, draws, classes = logits.shape
    return F.cross_entropy(
        logits.reshape(batch * draws, classes),
        labels.repeat_interleave(draws),
        reduction="none",
    ).reshape(batch, draws)


def non_hallucinated_mask(
    score_logits: Tensor, labels: Tensor, confidence_threshold: ConfidenceThreshold
) -> Tensor:
    """The mask ``m_ij`` of draws judged credible, a ``[B, M]`` bool tensor, by the rule
    ``confidence_threshold`` names (:mod:`cadis.finetuning.hallucination`).

    With a float τ: ``softmax(score_logits_ij)[y_i] >= τ`` (so τ = 0 selects every draw);
    with ``"argmax"``: ``argmax score_logits_ij == y_i``; with ``"none"``: every draw.
    Whichever model produced ``score_logits`` (the one being fine-tuned or the frozen
    original), the mask carries no gradient.
    """
    return _credible(score_logits, labels,
                     rule_of(validate_confidence_threshold(confidence_threshold)))


def _credible(score_logits: Tensor, labels: Tensor, rule: MaskRule) -> Tensor:
    """The mask ``rule`` gives, without gradient (:func:`non_hallucinated_mask`)."""
    _check_draw_shapes(score_logits, labels, "score_logits")
    with torch.no_grad():
        return rule(score_logits.detach(), labels)


class SelectiveCrossEntropy(NamedTuple):
    """Result of :func:`selective_cross_entropy`."""

    per_image: Tensor
    """``L_SCE,i``, shape ``[B]``."""
    effective_mask: Tensor
    """The ``[B, M]`` mask actually summed over: the input mask plus the warm-start draws."""


def selective_cross_entropy(
    logits: Tensor, labels: Tensor, mask: Tensor, warm_start: bool = True
) -> SelectiveCrossEntropy:
    """Confidence-aware selective cross-entropy ``L_SCE,i = (1/M) Σ_j m_ij · CE(z_ij, y_i)``.

    With ``warm_start``, an image none of whose draws is selected keeps exactly one draw,
    the one with the lowest cross-entropy (ties: the first), so every image contributes;
    images with at least one selected draw are unchanged. Without it such an image's loss
    is 0. The divisor is always ``M``, never the number of selected draws. Unselected draws
    get no gradient.
    """
    _check_draw_shapes(logits, labels)
    if mask.shape != logits.shape[:2] or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool [B, M] tensor, got {mask.dtype} {tuple(mask.shape)}")
    cross_entropy = _per_draw_cross_entropy(logits, labels)
    effective_mask = mask
    if warm_start:
        nothing_selected = ~mask.any(dim=1, keepdim=True)
        best_draw = F.one_hot(cross_entropy.detach().argmin(dim=1), mask.shape[1]).bool()
        effective_mask = mask | (nothing_selected & best_draw)
    # where, not a product: unselected draws must contribute neither value nor gradient.
    selected_loss = torch.where(effective_mask, cross_entropy, torch.zeros_like(cross_entropy))
    return SelectiveCrossEntropy(selected_loss.sum(dim=1) / mask.shape[1], effective_mask)


def soft_target_log_probs(clean_logits: Tensor) -> Tensor:
    """``log p̄_i`` with ``p̄_i = mean_j softmax(z_ij)``, shape ``[B, C]``.

    Computed as a log-sum-exp of log-softmaxes so that it stays finite (and its gradient
    free of NaN) even where ``p̄_i`` underflows to 0.
    """
    if clean_logits.dim() != 3:
        raise ValueError(f"clean_logits must be [B, M, C], got {tuple(clean_logits.shape)}")
    draws = clean_logits.shape[1]
    return torch.logsumexp(clean_logits.log_softmax(dim=-1), dim=1) - math.log(draws)


def soft_target(clean_logits: Tensor) -> Tensor:
    """``p̄_i = mean_j softmax(z_ij)``, shape ``[B, C]``: the target the attack ascends from."""
    return soft_target_log_probs(clean_logits).exp()


def kl_from_log_target(log_target: Tensor, logits: Tensor) -> Tensor:
    """``KL(p ‖ softmax(logits)) = Σ_c p_c (log p_c − log q_c)`` over the last dimension.

    ``log_target`` holds ``log p`` and must broadcast against ``logits``. Finite ``log p``
    makes the terms with ``p_c = 0`` exactly 0 (``0 · finite``), so no NaN arises.
    """
    return (log_target.exp() * (log_target - logits.log_softmax(dim=-1))).sum(dim=-1)


class MaskedAdversarialKL(NamedTuple):
    """Result of :func:`masked_adversarial_kl`."""

    per_image: Tensor
    """``L_MAdv,i``, shape ``[B]``."""
    attacked: Tensor
    """``a_i``, a ``[B]`` bool tensor: which images the adversarial term applies to."""


def adversarial_selection(mask: Tensor, require_all_selected: bool = True) -> Tensor:
    """``a_i`` as a ``[B]`` bool tensor: all draws selected (reference) or at least one."""
    return mask.all(dim=1) if require_all_selected else mask.any(dim=1)


def masked_adversarial_kl(
    clean_logits: Tensor,
    adv_logits: Tensor,
    mask: Tensor,
    adv_weight: float,
    require_all_selected: bool = True,
    detach_target: bool = False,
) -> MaskedAdversarialKL:
    """Confidence-aware masked adversarial loss ``λ · a_i · max_j KL(p̄_i ‖ softmax(z^adv_ij))``.

    ``p̄_i = mean_j softmax(clean_logits_ij)``; with ``detach_target`` it carries no
    gradient back into ``clean_logits`` (the reference code does not detach). ``mask`` is the
    non-hallucinated mask as scored, before any warm start. With ``require_all_selected``
    (reference) ``a_i = 1`` only when all ``M`` draws of image ``i`` are selected and the
    max runs over all draws; otherwise ``a_i = 1`` when at least one is selected and the max
    runs over the selected draws only. Images with ``a_i = 0`` contribute exactly 0 and no
    gradient.
    """
    if clean_logits.dim() != 3 or adv_logits.shape != clean_logits.shape:
        raise ValueError(
            f"clean_logits and adv_logits must both be [B, M, C], got "
            f"{tuple(clean_logits.shape)} and {tuple(adv_logits.shape)}"
        )
    if mask.shape != clean_logits.shape[:2] or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool [B, M] tensor, got {mask.dtype} {tuple(mask.shape)}")
    weight = validate_adv_weight(adv_weight)
    log_target = soft_target_log_probs(clean_logits)
    if detach_target:
        log_target = log_target.detach()
    kl = kl_from_log_target(log_target.unsqueeze(1), adv_logits)  # [B, M]
    attacked = adversarial_selection(mask, require_all_selected)
    # Under the all-M rule every draw of an attacked image is selected, so masking the
    # unselected draws out of the max is right for both rules.
    worst_kl = kl.masked_fill(~mask, float("-inf")).amax(dim=1)
    per_image = weight * torch.where(attacked, worst_kl, torch.zeros_like(worst_kl))
    return MaskedAdversarialKL(per_image, attacked)


# ------------------------------------------------------------------------ the full loss


@dataclass(frozen=True)
class FTCadisLossConfig:
    """Settings of the FT-CADIS loss; defaults are the reference code's (CIFAR-10) values.

    Construction validates and normalises every field (raising :class:`CadisError` naming
    the user-facing key), so a config that exists is a valid one. ``confidence_threshold=0``
    with ``adv_weight=0`` is plain denoised fine-tuning (``denoised_ce``).
    """

    adv_weight: float = 4.0
    """λ, the weight of the masked adversarial term (``lambda`` in sweep files)."""
    confidence_threshold: ConfidenceThreshold = ARGMAX_RULE
    """τ in [0, 1], or the reference :data:`ARGMAX_RULE`."""
    warm_start: bool = True
    """Keep the lowest-CE draw of images with no selected draw."""
    detach_target: bool = False
    """Stop the gradient through the soft target ``p̄`` of the adversarial term."""
    require_all_selected: bool = True
    """Apply the adversarial term only to images with all M draws selected."""
    mask_rule: MaskRule = field(init=False, repr=False, compare=False)
    """The hallucination rule ``confidence_threshold`` names (set on construction)."""

    def __post_init__(self) -> None:
        # frozen: normalised values (e.g. int 0 -> 0.0) are written past the freeze once.
        object.__setattr__(self, "adv_weight", validate_adv_weight(self.adv_weight))
        object.__setattr__(
            self,
            "confidence_threshold",
            validate_confidence_threshold(self.confidence_threshold),
        )
        for key in ("warm_start", "detach_target", "require_all_selected"):
            flag(getattr(self, key), key)
        # The rule, resolved once here: the loss applies it at every micro-step unchecked.
        object.__setattr__(self, "mask_rule", rule_of(self.confidence_threshold))

    @property
    def uses_adversarial_term(self) -> bool:
        """Whether the training step must run the attack and pass ``adv_logits``."""
        return self.adv_weight > 0.0


def ft_cadis_loss(
    logits: Tensor,
    adv_logits: Tensor | None,
    score_logits: Tensor | None,
    labels: Tensor,
    config: FTCadisLossConfig,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The FT-CADIS loss ``mean_i (L_SCE,i + L_MAdv,i)`` and the terms worth logging.

    ``logits`` are the fine-tuned model's logits of the denoised draws ``[B, M, C]``;
    ``adv_logits`` its logits of the perturbed draws (``None`` allowed, and ignored,
    when ``config.adv_weight == 0``, so that the attack can be skipped); ``score_logits``
    the logits the confidence is scored with (``None``: ``logits`` themselves, the
    reference code's behaviour).

    The returned dict holds detached scalar tensors: ``sce`` and ``madv`` (the batch means
    of the two per-image terms), ``hallucination_rate`` (``1 − mean(m)`` of the mask as
    scored, before warm start) and ``adv_fraction`` (``mean(a_i)``, the share of images
    the adversarial rule selects, reported even when λ = 0).
    """
    _check_draw_shapes(logits, labels)
    mask = _credible(logits if score_logits is None else score_logits, labels, config.mask_rule)
    selective = selective_cross_entropy(logits, labels, mask, config.warm_start)
    if config.uses_adversarial_term:
        if adv_logits is None:
            raise ValueError("adv_logits are required when adv_weight > 0")
        adversarial = masked_adversarial_kl(
            logits,
            adv_logits,
            mask,
            config.adv_weight,
            require_all_selected=config.require_all_selected,
            detach_target=config.detach_target,
        )
        madv_per_image = adversarial.per_image
        attacked = adversarial.attacked
    else:
        madv_per_image = torch.zeros_like(selective.per_image)
        attacked = adversarial_selection(mask, config.require_all_selected)
    loss = (selective.per_image + madv_per_image).mean()
    logged = {
        "sce": selective.per_image.detach().mean(),
        "madv": madv_per_image.detach().mean(),
        "hallucination_rate": 1.0 - mask.float().mean(),
        "adv_fraction": attacked.float().mean(),
    }
    return loss, logged
