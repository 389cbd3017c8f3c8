"""ℓ2 PGD in the denoised domain on tiny seeded classifiers of 1×4×4 images (docs/design.md §4)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cadis.finetuning.attack import frozen, pgd_l2_denoised, soft_kl

NUM_SAMPLES, NUM_CLASSES = 6, 3


def tiny_classifier(seed: int = 0) -> nn.Module:
    """A seeded MLP whose BatchNorm and Dropout behave differently in train and eval mode."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(16, 8),
        nn.BatchNorm1d(8),
        nn.Tanh(),
        nn.Dropout(0.5),
        nn.Linear(8, NUM_CLASSES),
    )


def attack_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Denoised images in [-1, 1] and soft targets that differ from the model's predictions."""
    generator = torch.Generator().manual_seed(seed)
    denoised = torch.rand(NUM_SAMPLES, 1, 4, 4, generator=generator) * 2 - 1
    target = torch.randn(NUM_SAMPLES, NUM_CLASSES, generator=generator).softmax(-1)
    return denoised, target


def per_sample_norm(batch: torch.Tensor) -> torch.Tensor:
    return batch.flatten(1).norm(dim=1)


@pytest.mark.parametrize("epsilon", [0.05, 0.25, 1.0])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_perturbation_stays_in_the_ball_and_raises_the_kl(epsilon: float, steps: int) -> None:
    model = tiny_classifier()
    denoised, target = attack_inputs()
    perturbation = pgd_l2_denoised(model, denoised, target, epsilon, steps)
    assert perturbation.shape == denoised.shape
    assert not perturbation.requires_grad
    assert (per_sample_norm(perturbation) <= epsilon + 1e-6).all()
    assert (per_sample_norm(perturbation) > 0).all()
    model.eval()
    with torch.no_grad():
        before = soft_kl(target, model(denoised))
        after = soft_kl(target, model(denoised + perturbation))
    assert (after >= before).all(), (before, after)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_linear_model_kl_rises_for_every_sample(seed: int) -> None:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, NUM_CLASSES))
    denoised, target = attack_inputs(seed)
    perturbation = pgd_l2_denoised(model, denoised, target, epsilon=0.5, steps=3)
    with torch.no_grad():
        before = soft_kl(target, model(denoised))
        after = soft_kl(target, model(denoised + perturbation))
    assert (after > before).all()


def test_soft_kl_matches_definition() -> None:
    target = torch.tensor([[0.6, 0.4, 0.0]])
    logits = torch.tensor([[0.0, 1.0, -1.0]])
    q = logits.softmax(-1)
    expected = 0.6 * (0.6 / q[0, 0]).log() + 0.4 * (0.4 / q[0, 1]).log()
    torch.testing.assert_close(soft_kl(target, logits), expected.reshape(1))


def test_attack_restores_flags_and_leaves_no_parameter_grad() -> None:
    model = tiny_classifier()
    model.train()
    model[2].eval()  # a mixed state (frozen BatchNorm under a training model) must survive
    model[1].bias.requires_grad_(False)
    training_before = [module.training for module in model.modules()]
    requires_grad_before = [p.requires_grad for p in model.parameters()]
    running_mean_before = model[2].running_mean.clone()
    denoised, target = attack_inputs()
    with torch.no_grad():  # the attack must still get its input gradients
        perturbation = pgd_l2_denoised(model, denoised, target, epsilon=0.25, steps=2)
    assert per_sample_norm(perturbation).max() > 0
    assert [module.training for module in model.modules()] == training_before
    assert [p.requires_grad for p in model.parameters()] == requires_grad_before
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(model[2].running_mean, running_mean_before, rtol=0, atol=0)


def test_frozen_restores_flags_after_an_exception() -> None:
    model = tiny_classifier()
    model.train()
    with pytest.raises(RuntimeError, match="boom"), frozen(model):
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        raise RuntimeError("boom")
    assert all(module.training for module in model.modules())
    assert all(p.requires_grad for p in model.parameters())


class CountingModel(nn.Module):
    """Wraps a model and counts forward calls."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(inputs)


@pytest.mark.parametrize(("epsilon", "steps"), [(0.0, 4), (0.25, 0), (0.0, 0)])
def test_no_budget_gives_zero_perturbation_without_calling_the_model(
    epsilon: float, steps: int
) -> None:
    model = CountingModel(tiny_classifier())
    denoised, target = attack_inputs()
    perturbation = pgd_l2_denoised(model, denoised, target, epsilon, steps)
    assert torch.equal(perturbation, torch.zeros_like(denoised))
    assert model.calls == 0


@pytest.mark.parametrize("steps", [1, 3])
def test_model_is_called_once_per_step(steps: int) -> None:
    model = CountingModel(tiny_classifier())
    denoised, target = attack_inputs()
    pgd_l2_denoised(model, denoised, target, 0.25, steps)
    assert model.calls == steps


def test_inputs_are_not_modified() -> None:
    model = tiny_classifier()
    denoised, target = attack_inputs()
    denoised_before, target_before = denoised.clone(), target.clone()
    pgd_l2_denoised(model, denoised, target, epsilon=0.5, steps=3)
    assert torch.equal(denoised, denoised_before) and torch.equal(target, target_before)
    assert not denoised.requires_grad and denoised.grad is None


@pytest.mark.parametrize(("epsilon", "steps"), [(-0.1, 2), (0.25, -1)])
def test_negative_budget_is_rejected(epsilon: float, steps: int) -> None:
    denoised, target = attack_inputs()
    with pytest.raises(ValueError):
        pgd_l2_denoised(tiny_classifier(), denoised, target, epsilon, steps)


def test_restandardisation_keeps_each_residuals_mean_and_is_off_without_clean_images():
    from cadis.finetuning.attack import restandardize

    model = tiny_classifier()
    denoised, target = attack_inputs()
    clean = (torch.rand(denoised.shape, generator=torch.Generator().manual_seed(5)) * 2 - 1)
    residual = denoised - clean
    plain = pgd_l2_denoised(model, denoised, target, 0.5, 3)
    kept = pgd_l2_denoised(model, denoised, target, 0.5, 3, clean=clean)
    attacked_residual = denoised + kept - clean
    assert torch.allclose(attacked_residual.flatten(1).mean(1), residual.flatten(1).mean(1),
                          atol=1e-5)
    assert not torch.allclose(kept, plain)
    # The rule itself: an affine map per sample onto the reference's mean, scaled by the RMS.
    rows = torch.tensor([[1.0, 3.0], [0.0, 0.0]])
    reference = torch.tensor([[2.0, 2.0], [1.0, -1.0]])
    assert torch.allclose(restandardize(rows, reference),
                          torch.tensor([[2.0 - 2 / 5 ** 0.5, 2.0 + 2 / 5 ** 0.5], [0.0, 0.0]]))
