"""The hallucination rules: which denoised draws FT-CADIS trusts (docs/design.md §4, step 3).

A rule maps the logits a scorer gives the ``[B, M]`` denoised draws, ``[B, M, C]``, and the
labels ``[B]`` to the mask ``m_ij`` of draws judged credible (not hallucinated). The rules are
data: :data:`NAMED_RULES` holds each named one, and a number τ in [0, 1] is the threshold rule
``softmax(z_ij)[y_i] >= τ``. The config validates ``confidence_threshold`` against this table,
so a new rule is one function and one entry here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Final, Union

import torch
from torch import Tensor

from cadis.errors import CadisError
from cadis.validation import read_number

#: ``(score_logits [B, M, C], labels [B]) -> credible [B, M]`` (bool).
MaskRule = Callable[[Tensor, Tensor], Tensor]

#: The reference code's hallucination rule (docs/design.md): a draw is credible when its argmax
#: is the label.
ARGMAX_RULE: Final = "argmax"
#: Every draw credible: plain denoised fine-tuning, the same as τ = 0.
NO_SELECTION: Final = "none"

#: A threshold τ in [0, 1] on the confidence ``softmax(z)[y]``, or the name of a rule.
ConfidenceThreshold = Union[float, str]


def _argmax_is_label(score_logits: Tensor, labels: Tensor) -> Tensor:
    return score_logits.argmax(dim=-1) == labels[:, None]


def _every_draw(score_logits: Tensor, labels: Tensor) -> Tensor:
    return torch.ones(score_logits.shape[:2], dtype=torch.bool, device=score_logits.device)


#: The named rules, in the order error messages list them.
NAMED_RULES: Final[Mapping[str, MaskRule]] = {
    ARGMAX_RULE: _argmax_is_label,
    NO_SELECTION: _every_draw,
}


def _confidence_at_least(threshold: float) -> MaskRule:
    def rule(score_logits: Tensor, labels: Tensor) -> Tensor:
        # float32 at least: a half-precision softmax would round confidences near τ.
        probs = score_logits.float().softmax(dim=-1)
        index = labels.reshape(-1, 1, 1).expand(-1, score_logits.shape[1], 1)
        return probs.gather(-1, index).squeeze(-1) >= threshold

    return rule


def validate_confidence_threshold(value: object,
                                  key: str = "confidence_threshold") -> ConfidenceThreshold:
    """Return ``value`` as a float τ in [0, 1] or the name of one of :data:`NAMED_RULES`.

    A number written as text counts as the number (:func:`cadis.validation.read_number`).
    Raises :class:`CadisError` naming ``key`` for anything else (other strings, booleans,
    NaN, numbers outside [0, 1]).
    """
    if isinstance(value, str) and value in NAMED_RULES:
        return value
    number = read_number(value)
    if number is not None and 0.0 <= number <= 1.0:
        return number
    rules = " or ".join(repr(name) for name in NAMED_RULES)
    raise CadisError(f"{key} must be a number in [0, 1] or {rules}, got {value!r}")


def rule_of(threshold: ConfidenceThreshold) -> MaskRule:
    """The rule a threshold that passed :func:`validate_confidence_threshold` names; not
    checked again (the loss resolves it once, not at every step)."""
    if isinstance(threshold, str):
        return NAMED_RULES[threshold]
    return _confidence_at_least(threshold)
