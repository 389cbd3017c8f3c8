"""ℓ2 PGD in the denoised domain (docs/design.md §4, step 5), in pure torch.

The perturbation η is added to the denoiser's output ``x̂`` in the diffusion model's
``[-1,1]`` space, so ε is in those units; the model attacked is the classifier behind its
input adapter, and the denoiser is never differentiated (its output arrives detached).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

# Floor on per-sample norms: a zero gradient (or a zero η) must give a zero step, not NaN.
_NORM_FLOOR = 1e-12


@contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode with no parameter requiring grad, for the block's duration.

    On exit, even on an exception, every submodule's own ``training`` flag and every
    parameter's ``requires_grad`` are restored exactly as they were (including mixed
    states such as a frozen backbone under a trainable head).
    """
    training_flags = [(submodule, submodule.training) for submodule in module.modules()]
    grad_flags = [(parameter, parameter.requires_grad) for parameter in module.parameters()]
    module.eval()
    for parameter, _ in grad_flags:
        parameter.requires_grad_(False)
    try:
        yield module
    finally:
        for submodule, was_training in training_flags:
            submodule.training = was_training
        for parameter, required_grad in grad_flags:
            parameter.requires_grad_(required_grad)


def _per_sample_norm(batch: Tensor) -> Tensor:
    """ℓ2 norm of each sample over all non-batch dimensions, shaped to broadcast back."""
    norms = batch.flatten(start_dim=1).norm(dim=1)
    return norms.view(-1, *([1] * (batch.dim() - 1)))


def project_l2_ball(perturbation: Tensor, epsilon: float) -> Tensor:
    """Scale each sample whose ℓ2 norm exceeds ``epsilon`` onto the ε-sphere; others unchanged."""
    scale = (epsilon / _per_sample_norm(perturbation).clamp_min(_NORM_FLOOR)).clamp(max=1.0)
    return perturbation * scale


def soft_kl(target_probs: Tensor, logits: Tensor) -> Tensor:
    """Per-sample ``KL(target ‖ softmax(logits))``, shape ``[N]``; 0·log 0 counts as 0."""
    log_q = logits.log_softmax(dim=-1)
    return (torch.xlogy(target_probs, target_probs) - target_probs * log_q).sum(dim=-1)


def pgd_l2_denoised(
    model: nn.Module,
    denoised: Tensor,
    target_probs: Tensor,
    epsilon: float,
    steps: int,
    clean: Tensor | None = None,
) -> Tensor:
    """Return the perturbation η (not the perturbed input) found by ℓ2 PGD.

    Maximises ``KL(target_probs_n ‖ softmax(model(denoised_n + η_n)))`` for each sample
    ``n``, starting from η = 0: each of the ``steps`` steps moves η by ``2·epsilon/steps``
    along that sample's ℓ2-normalised gradient, then projects η onto the ε-ball.

    Guarantees: the result has the shape of ``denoised``, no gradient history, and
    per-sample ℓ2 norm ≤ ``epsilon`` (up to float rounding); it is all zeros, without
    calling ``model``, when ``epsilon`` or ``steps`` is 0, and ``model`` is called exactly
    ``steps`` times otherwise. ``denoised`` and ``target_probs`` are not modified. ``model``
    runs frozen (see :func:`frozen`), so its parameters get no ``.grad`` and its training
    and ``requires_grad`` flags are as before on return. The model must treat samples
    independently in eval mode (as classifiers do), so that the gradient of the summed
    objective is each sample's own. Works inside ``torch.no_grad()``.

    ``clean`` (the clean images in the same [-1, 1] space, one row per row of ``denoised``):
    the reference code's re-standardisation (from CAT-RS, docs/design.md §4 step 5), off when
    None. After every step, each sample's residual ``denoised + η - clean`` is re-standardised
    (:func:`restandardize`) by the mean and root mean square of its unperturbed residual
    ``denoised - clean``; η is what that leaves. The ε bound then holds before the
    re-standardisation, not after it.
    """
    if epsilon < 0 or steps < 0:
        raise ValueError(f"epsilon and steps must be >= 0, got {epsilon} and {steps}")
    if target_probs.dim() != 2 or target_probs.shape[0] != denoised.shape[0]:
        raise ValueError(
            f"target_probs must be [N, C] for denoised [N, ...], got {tuple(target_probs.shape)} "
            f"and {tuple(denoised.shape)}"
        )
    perturbation = torch.zeros_like(denoised)
    if epsilon == 0 or steps == 0:
        return perturbation
    start = denoised.detach()
    target = target_probs.detach()
    residual = None if clean is None else start - clean.detach()
    step_size = 2.0 * epsilon / steps
    # enable_grad: the caller may well run the whole attack under no_grad.
    with frozen(model), torch.enable_grad():
        for _ in range(steps):
            perturbation.requires_grad_(True)
            objective = soft_kl(target, model(start + perturbation)).sum()
            (gradient,) = torch.autograd.grad(objective, perturbation)
            direction = gradient / _per_sample_norm(gradient).clamp_min(_NORM_FLOOR)
            perturbation = project_l2_ball(perturbation.detach() + step_size * direction, epsilon)
            if residual is not None:
                perturbation = restandardize(residual + perturbation, residual) - residual
    return perturbation


def _per_sample_moments(batch: Tensor) -> tuple[Tensor, Tensor]:
    """Each sample's mean and root mean square over its non-batch dimensions, shaped to
    broadcast back."""
    flat = batch.flatten(start_dim=1)
    shape = (-1, *([1] * (batch.dim() - 1)))
    return flat.mean(dim=1).view(shape), flat.square().mean(dim=1).sqrt().view(shape)


def restandardize(residual: Tensor, reference: Tensor) -> Tensor:
    """``residual`` shifted and scaled per sample, ``(r - mean r) / rms r * rms ref + mean
    ref`` (rms: root mean square), as the reference code does. Guarantees: each sample's mean
    is ``reference``'s; the result is an affine map of ``residual`` per sample; a zero
    ``residual`` gives a finite result."""
    mean, rms = _per_sample_moments(residual)
    reference_mean, reference_rms = _per_sample_moments(reference)
    return (residual - mean) / rms.clamp_min(_NORM_FLOOR) * reference_rms + reference_mean
