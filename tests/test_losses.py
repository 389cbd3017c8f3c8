"""The FT-CADIS losses against hand-made logits and hand computations (docs/design.md §4)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cadis.errors import CadisError
from cadis.finetuning.hallucination import (
    ARGMAX_RULE,
    NAMED_RULES,
    NO_SELECTION,
    validate_confidence_threshold,
)
from cadis.finetuning.losses import (
    FTCadisLossConfig,
    ft_cadis_loss,
    masked_adversarial_kl,
    non_hallucinated_mask,
    selective_cross_entropy,
    soft_target,
    validate_adv_weight,
    validate_attack_steps,
    validate_epsilon,
    validate_num_noises,
)

Y, N = True, False  # compact booleans for the hand-written masks


def logits_of(probs: list[list[list[float]]]) -> torch.Tensor:
    """Logits whose softmax is exactly ``probs`` (up to float rounding)."""
    return torch.tensor(probs).log()


def mask_example() -> tuple[torch.Tensor, torch.Tensor]:
    """B=2, M=3, C=3 with known confidences softmax(z)[y].

    image 0, label 0: confidences 0.5 (argmax), 0.2 (not argmax), 0.95 (argmax)
    image 1, label 2: confidences 0.4 (argmax), 0.35 (not argmax), 1.0 exactly (argmax)
    """
    logits = logits_of(
        [
            [[0.5, 0.3, 0.2], [0.2, 0.7, 0.1], [0.95, 0.03, 0.02]],
            [[0.3, 0.3, 0.4], [0.6, 0.05, 0.35], [0.5, 0.25, 0.25]],
        ]
    )
    # exp(-200) underflows in float32, so this draw's confidence is exactly 1.0.
    logits[1, 2] = torch.tensor([0.0, 0.0, 200.0])
    return logits, torch.tensor([0, 2])


# Each named rule's mask on mask_example(). A rule added to NAMED_RULES is run by every test
# parametrised over the table and fails test_every_named_rule_has_its_expected_mask until its
# mask is written here.
NAMED_RULE_MASKS = {
    ARGMAX_RULE: [[Y, N, Y], [Y, N, Y]],
    NO_SELECTION: [[Y, Y, Y], [Y, Y, Y]],
}


@pytest.mark.parametrize(
    ("threshold", "expected"),
    [
        (0.0, [[Y, Y, Y], [Y, Y, Y]]),
        (0.3, [[Y, N, Y], [Y, Y, Y]]),
        (0.9, [[N, N, Y], [N, N, Y]]),
        (1.0, [[N, N, N], [N, N, Y]]),
        *((name, NAMED_RULE_MASKS.get(name)) for name in NAMED_RULES),
    ],
)
def test_mask_at_thresholds(threshold, expected) -> None:
    logits, labels = mask_example()
    mask = non_hallucinated_mask(logits, labels, threshold)
    assert mask.dtype == torch.bool
    assert mask.tolist() == expected


@pytest.mark.parametrize("name", list(NAMED_RULES))
def test_every_named_rule_has_its_expected_mask(name: str) -> None:
    assert name in NAMED_RULE_MASKS, f"write rule {name!r}'s mask on mask_example()"


@pytest.mark.parametrize("name", list(NAMED_RULES))
def test_a_named_rule_is_its_table_entry_applied(name: str) -> None:
    logits, labels = mask_example()
    mask = non_hallucinated_mask(logits, labels, name)
    assert mask.shape == logits.shape[:2] and mask.dtype == torch.bool
    assert torch.equal(mask, NAMED_RULES[name](logits, labels))


def test_no_selection_trusts_every_draw_as_tau_zero_does() -> None:
    logits, labels = mask_example()
    assert torch.equal(non_hallucinated_mask(logits, labels, NO_SELECTION),
                       non_hallucinated_mask(logits, labels, 0.0))


@pytest.mark.parametrize("threshold", [0.3, *NAMED_RULES])
def test_mask_carries_no_gradient(threshold) -> None:
    logits, labels = mask_example()
    logits.requires_grad_(True)
    assert not non_hallucinated_mask(logits, labels, threshold).requires_grad


def per_draw_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    b, m, c = logits.shape
    return F.cross_entropy(
        logits.reshape(b * m, c), labels.repeat_interleave(m), reduction="none"
    ).reshape(b, m)


def warm_start_example() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image 0: no draw selected, lowest CE at draw 2. Image 1: draw 1 selected."""
    logits = logits_of(
        [
            [[0.3, 0.7], [0.1, 0.9], [0.45, 0.55]],  # label 0: CEs -ln .3, -ln .1, -ln .45
            [[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]],  # label 0: draw 0 has the lowest CE
        ]
    )
    mask = torch.tensor([[N, N, N], [N, Y, N]])
    return logits, torch.tensor([0, 0]), mask


def test_warm_start_keeps_exactly_the_lowest_ce_draw() -> None:
    logits, labels, mask = warm_start_example()
    result = selective_cross_entropy(logits, labels, mask, warm_start=True)
    # Image 1 keeps only its selected draw, although its draw 0 has a lower CE.
    assert result.effective_mask.tolist() == [[N, N, Y], [N, Y, N]]
    expected = torch.tensor([-math.log(0.45) / 3, -math.log(0.6) / 3])
    torch.testing.assert_close(result.per_image, expected)


def test_without_warm_start_an_unselected_image_contributes_zero() -> None:
    logits, labels, mask = warm_start_example()
    result = selective_cross_entropy(logits, labels, mask, warm_start=False)
    assert result.effective_mask.tolist() == mask.tolist()
    torch.testing.assert_close(result.per_image, torch.tensor([0.0, -math.log(0.6) / 3]))


def test_selective_ce_gives_unselected_draws_no_gradient() -> None:
    logits, labels, mask = warm_start_example()
    logits.requires_grad_(True)
    selective_cross_entropy(logits, labels, mask, warm_start=True).per_image.sum().backward()
    has_gradient = logits.grad.abs().sum(dim=-1) > 0
    assert has_gradient.tolist() == [[N, N, Y], [N, Y, N]]


def test_selective_ce_divides_by_m_not_by_selected_count() -> None:
    logits, labels, _ = warm_start_example()
    mask = torch.tensor([[Y, N, Y], [Y, Y, Y]])
    ce = per_draw_ce(logits, labels)
    result = selective_cross_entropy(logits, labels, mask)
    expected = torch.stack([(ce[0, 0] + ce[0, 2]) / 3, ce[1].mean()])
    torch.testing.assert_close(result.per_image, expected)


def kl_example() -> tuple[torch.Tensor, torch.Tensor]:
    """One image, M=2, C=2: p̄ = mean([.8,.2], [.4,.6]) = [.6,.4]; adversarial [.5,.5], [.9,.1]."""
    clean = logits_of([[[0.8, 0.2], [0.4, 0.6]]])
    adversarial = logits_of([[[0.5, 0.5], [0.9, 0.1]]])
    return clean, adversarial


def test_kl_term_matches_hand_computation() -> None:
    clean, adversarial = kl_example()
    torch.testing.assert_close(soft_target(clean), torch.tensor([[0.6, 0.4]]))
    # KL(p̄‖q) per draw: .6 ln(.6/.5) + .4 ln(.4/.5) = 0.02014 and .6 ln(.6/.9) + .4 ln(.4/.1)
    # = 0.31124; the max is the second, times λ = 2. (The reverse KL of draw 1 would be 0.22629.)
    hand = 2.0 * (0.6 * math.log(0.6 / 0.9) + 0.4 * math.log(0.4 / 0.1))
    assert hand == pytest.approx(0.622478, abs=1e-6)
    result = masked_adversarial_kl(clean, adversarial, torch.tensor([[Y, Y]]), adv_weight=2.0)
    assert result.attacked.tolist() == [Y]
    assert result.per_image.item() == pytest.approx(hand, rel=1e-5)


def three_image_kl_example() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three images, M=3, C=2; in image 1 the unselected draw 1 has by far the largest KL."""
    clean = logits_of([[[0.7, 0.3], [0.6, 0.4], [0.8, 0.2]]] * 3)
    adversarial = logits_of(
        [
            [[0.5, 0.5], [0.6, 0.4], [0.7, 0.3]],
            [[0.5, 0.5], [0.01, 0.99], [0.7, 0.3]],
            [[0.5, 0.5], [0.6, 0.4], [0.7, 0.3]],
        ]
    )
    mask = torch.tensor([[Y, Y, Y], [Y, N, Y], [N, N, N]])
    return clean, adversarial, mask


def reference_kl(clean: torch.Tensor, adversarial: torch.Tensor) -> torch.Tensor:
    """KL(p̄_i ‖ q_ij) as ``[B, M]`` straight from the definition, in float64."""
    target = clean.double().softmax(-1).mean(1, keepdim=True)
    q = adversarial.double().softmax(-1)
    return (target * (target.log() - q.log())).sum(-1)


def test_all_m_rule_drops_an_image_with_one_masked_draw() -> None:
    clean, adversarial, mask = three_image_kl_example()
    result = masked_adversarial_kl(clean, adversarial, mask, adv_weight=1.5)
    assert result.attacked.tolist() == [Y, N, N]
    kl = reference_kl(clean, adversarial)
    expected = torch.tensor([1.5 * kl[0].max().item(), 0.0, 0.0])
    torch.testing.assert_close(result.per_image, expected)


def test_any_selected_rule_takes_the_max_over_selected_draws_only() -> None:
    clean, adversarial, mask = three_image_kl_example()
    result = masked_adversarial_kl(
        clean, adversarial, mask, adv_weight=1.5, require_all_selected=False
    )
    assert result.attacked.tolist() == [Y, Y, N]
    kl = reference_kl(clean, adversarial)
    assert kl[1, 1] > kl[1, 0] and kl[1, 1] > kl[1, 2]  # the excluded draw would win the max
    expected = torch.tensor(
        [1.5 * kl[0].max().item(), 1.5 * max(kl[1, 0], kl[1, 2]).item(), 0.0]
    )
    torch.testing.assert_close(result.per_image, expected)


@pytest.mark.parametrize("detach_target", [True, False])
def test_detach_target_controls_gradient_into_clean_logits(detach_target: bool) -> None:
    clean, adversarial = kl_example()
    clean.requires_grad_(True)
    adversarial.requires_grad_(True)
    masked_adversarial_kl(
        clean, adversarial, torch.tensor([[Y, Y]]), 1.0, detach_target=detach_target
    ).per_image.sum().backward()
    clean_gradient = 0.0 if clean.grad is None else clean.grad.abs().sum().item()
    assert (clean_gradient == 0.0) == detach_target
    assert adversarial.grad.abs().sum().item() > 0


def test_kl_term_stays_finite_when_the_soft_target_underflows() -> None:
    clean = torch.tensor([[[300.0, -300.0], [250.0, -250.0]]], requires_grad=True)
    adversarial = torch.tensor([[[-5.0, 5.0], [0.0, 0.0]]], requires_grad=True)
    result = masked_adversarial_kl(clean, adversarial, torch.tensor([[Y, Y]]), 1.0)
    result.per_image.sum().backward()
    # p̄ = [1, 0]: the KL is -log q_0 of the worst draw, log(1 + e^10).
    assert result.per_image.item() == pytest.approx(math.log1p(math.exp(10.0)), rel=1e-5)
    assert torch.isfinite(clean.grad).all() and torch.isfinite(adversarial.grad).all()


@pytest.mark.parametrize("threshold", [0.0, 0.3, *NAMED_RULES])
def test_zero_lambda_reduces_to_selective_ce_without_adv_logits(threshold) -> None:
    logits, labels = mask_example()
    config = FTCadisLossConfig(adv_weight=0.0, confidence_threshold=threshold)
    loss, logged = ft_cadis_loss(logits, None, None, labels, config)
    mask = non_hallucinated_mask(logits, labels, threshold)
    expected = selective_cross_entropy(logits, labels, mask).per_image.mean()
    torch.testing.assert_close(loss, expected)
    assert logged["madv"].item() == 0.0
    assert not config.uses_adversarial_term


def test_denoised_ce_equals_plain_cross_entropy_over_all_draws() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 5, generator=generator)
    labels = torch.tensor([0, 4, 2, 2])
    config = FTCadisLossConfig(adv_weight=0.0, confidence_threshold=0.0)
    loss, logged = ft_cadis_loss(logits, None, None, labels, config)
    plain = F.cross_entropy(logits.reshape(12, 5), labels.repeat_interleave(3))
    torch.testing.assert_close(loss, plain)
    assert logged["hallucination_rate"].item() == 0.0


def test_total_loss_adds_both_terms_and_logs_rates() -> None:
    logits, labels = mask_example()
    generator = torch.Generator().manual_seed(1)
    adversarial = logits + torch.randn(logits.shape, generator=generator)
    config = FTCadisLossConfig(adv_weight=3.0, confidence_threshold=0.3)
    loss, logged = ft_cadis_loss(logits, adversarial, None, labels, config)
    mask = non_hallucinated_mask(logits, labels, 0.3)  # [[Y, N, Y], [Y, Y, Y]]
    sce = selective_cross_entropy(logits, labels, mask).per_image
    madv = masked_adversarial_kl(logits, adversarial, mask, 3.0).per_image
    assert madv[0].item() == 0.0 and madv[1].item() > 0.0
    torch.testing.assert_close(loss, (sce + madv).mean())
    torch.testing.assert_close(logged["sce"], sce.mean())
    torch.testing.assert_close(logged["madv"], madv.mean())
    assert logged["hallucination_rate"].item() == pytest.approx(1 / 6)
    assert logged["adv_fraction"].item() == pytest.approx(1 / 2)


def test_mask_is_scored_by_score_logits_when_given() -> None:
    labels = torch.tensor([0, 1])
    confident_right = torch.tensor([[[5.0, 0.0]] * 2, [[0.0, 5.0]] * 2])
    confident_wrong = confident_right.flip(-1)
    config = FTCadisLossConfig(adv_weight=0.0, warm_start=False)
    _, own = ft_cadis_loss(confident_right, None, None, labels, config)
    loss, frozen = ft_cadis_loss(confident_right, None, confident_wrong, labels, config)
    assert own["hallucination_rate"].item() == 0.0
    assert frozen["hallucination_rate"].item() == 1.0
    assert loss.item() == 0.0


def test_nonzero_lambda_requires_adv_logits() -> None:
    logits, labels = mask_example()
    with pytest.raises(ValueError, match="adv_logits"):
        ft_cadis_loss(logits, None, None, labels, FTCadisLossConfig(adv_weight=1.0))


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, 0.0), (1, 1.0), (0.25, 0.25), *((name, name) for name in NAMED_RULES)],
)
def test_valid_confidence_thresholds_are_normalised(value, expected) -> None:
    normalised = validate_confidence_threshold(value)
    assert normalised == expected and type(normalised) is type(expected)


@pytest.mark.parametrize(
    ("validate", "value", "key"),
    [
        (validate_confidence_threshold, -0.1, "confidence_threshold"),
        (validate_confidence_threshold, 1.5, "confidence_threshold"),
        (validate_confidence_threshold, "max", "confidence_threshold"),
        (validate_confidence_threshold, True, "confidence_threshold"),
        (validate_confidence_threshold, float("nan"), "confidence_threshold"),
        (validate_adv_weight, -1.0, "lambda"),
        (validate_adv_weight, float("inf"), "lambda"),
        (validate_epsilon, -0.25, "epsilon"),
        (validate_epsilon, "0.25", "epsilon"),
        (validate_num_noises, 0, "num_noises"),
        (validate_num_noises, 2.5, "num_noises"),
        (validate_num_noises, True, "num_noises"),
        (validate_attack_steps, 0, "attack_steps"),
        (validate_attack_steps, -3, "attack_steps"),
    ],
)
def test_invalid_values_raise_naming_the_key(validate, value, key: str) -> None:
    with pytest.raises(CadisError) as raised:
        validate(value)
    message = str(raised.value)
    assert key in message and "\n" not in message


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"adv_weight": -2.0}, "lambda"),
        ({"confidence_threshold": 2.0}, "confidence_threshold"),
        ({"confidence_threshold": "Argmax"}, "confidence_threshold"),
        ({"warm_start": "yes"}, "warm_start"),
    ],
)
def test_invalid_config_raises_naming_the_key(settings: dict, key: str) -> None:
    with pytest.raises(CadisError, match=key):
        FTCadisLossConfig(**settings)
