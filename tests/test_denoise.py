import numpy as np
import pytest
import torch
from torch import nn

from cadis.errors import CadisError
from cadis.models.classifier import load_classifier
from cadis.models.denoiser import load_denoiser
from cadis.smoothing.denoise import (DIFFUSION_SCALE, DenoisedClassifier, OneShotDenoiser,
                                     noise_level, timestep_for_sigma, to_diffusion_space,
                                     to_image_space)
from tests.conftest import make_scheduler


def _linear_alphas_cumprod() -> np.ndarray:
    """The DDPM paper's schedule, computed independently of diffusers, in float64."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    return np.cumprod(1.0 - betas)


# Pinned from the linear 1000-step schedule (numpy, float64): the first 0-based index whose
# sqrt(1 - a) / sqrt(a) reaches 2 sigma.
@pytest.mark.parametrize("sigma,expected", [(0.12, 70), (0.25, 145), (0.5, 259), (1.0, 396)])
def test_sigma_to_timestep_on_the_linear_schedule(sigma, expected):
    alphas_cumprod = torch.from_numpy(_linear_alphas_cumprod())
    assert timestep_for_sigma(alphas_cumprod, sigma) == expected
    assert timestep_for_sigma(make_scheduler().alphas_cumprod, sigma) == expected


@pytest.mark.parametrize("sigma", np.linspace(0.01, 2.0, 37).tolist())
def test_model_is_told_at_least_the_noise_it_gets(sigma):
    alphas_cumprod = torch.from_numpy(_linear_alphas_cumprod())
    t = timestep_for_sigma(alphas_cumprod, sigma)
    levels = np.sqrt(1 - _linear_alphas_cumprod()) / np.sqrt(_linear_alphas_cumprod())
    assert levels[t] >= 2 * sigma
    assert t == 0 or levels[t - 1] < 2 * sigma  # and it is the first such timestep


def test_told_sigma_of_the_denoiser_is_at_least_sigma(tiny_denoiser_dir):
    unet, scheduler = load_denoiser(str(tiny_denoiser_dir))
    for sigma in (0.12, 0.25, 0.5, 1.0):
        denoiser = OneShotDenoiser(unet, scheduler, sigma)
        # The noise std (in [0, 1] units) the model is told it sees at its timestep.
        told_sigma = float(noise_level(torch.tensor([denoiser.alpha_bar]))) / DIFFUSION_SCALE
        assert sigma <= told_sigma < sigma * 1.05


def test_factor_two_between_image_and_diffusion_space():
    assert to_diffusion_space(torch.tensor([0.0, 0.5, 1.0])).tolist() == [-1.0, 0.0, 1.0]
    assert DIFFUSION_SCALE == 2.0
    x = torch.rand(20000)
    torch.manual_seed(0)
    delta = 0.3 * torch.randn(20000)
    spread = (to_diffusion_space(x + delta) - to_diffusion_space(x)).std().item()
    assert spread == pytest.approx(0.6, rel=0.02)
    assert torch.allclose(to_image_space(to_diffusion_space(x)), x)


@pytest.mark.parametrize("bad_sigma,match", [(0.0, "must be > 0"), (-1.0, "must be > 0"),
                                             (float("nan"), "must be > 0"),
                                             (float("inf"), "must be > 0"),
                                             (200.0, "beyond the denoiser's schedule")])
def test_bad_sigma(bad_sigma, match):
    with pytest.raises(CadisError, match=match):
        timestep_for_sigma(make_scheduler().alphas_cumprod, bad_sigma)


class _Output:
    def __init__(self, sample):
        self.sample = sample


class OracleUNet(nn.Module):
    """Knows the clean image: returns the exact epsilon, x0 or v for the input it gets.
    Pins the one-shot formula: with a perfect model the denoiser returns the clean image."""

    def __init__(self, clean_diffusion, alphas_cumprod, prediction_type, channels=1, size=8):
        super().__init__()
        self.clean = clean_diffusion
        self.alphas_cumprod = alphas_cumprod
        self.prediction_type = prediction_type
        self.dtype = torch.float32
        self.weight = nn.Parameter(torch.zeros(()))
        self.config = type("Config", (), {"in_channels": channels, "sample_size": size})()

    def forward(self, x_t, timesteps):
        a = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1).float()
        eps = (x_t - a.sqrt() * self.clean) / (1 - a).sqrt()
        if self.prediction_type == "epsilon":
            return _Output(eps)
        if self.prediction_type == "sample":
            return _Output(self.clean)
        return _Output(a.sqrt() * eps - (1 - a).sqrt() * self.clean)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("sigma", [0.25, 0.5, 1.0])
def test_a_perfect_model_recovers_the_clean_image(prediction_type, sigma):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    torch.manual_seed(0)
    clean = torch.rand(3, 1, 8, 8)
    unet = OracleUNet(to_diffusion_space(clean), scheduler.alphas_cumprod, prediction_type)
    denoiser = OneShotDenoiser(unet, scheduler, sigma)
    noisy = clean + sigma * torch.randn_like(clean)
    assert torch.allclose(denoiser(noisy), clean, atol=1e-4)
    assert torch.allclose(denoiser.denoise(noisy), to_diffusion_space(clean), atol=1e-4)


def test_real_unet_output_is_clipped_and_carries_no_gradient(tiny_denoiser_dir):
    unet, scheduler = load_denoiser(str(tiny_denoiser_dir))
    denoiser = OneShotDenoiser(unet, scheduler, 0.5)
    noisy = (torch.rand(4, 1, 8, 8) + 0.5 * torch.randn(4, 1, 8, 8)).requires_grad_(True)
    x0 = denoiser.denoise(noisy)
    assert x0.shape == noisy.shape and x0.min() >= -1 and x0.max() <= 1
    assert not x0.requires_grad
    image = denoiser(noisy)
    assert image.min() >= 0 and image.max() <= 1


def test_denoised_classifier_composes(tiny_denoiser_dir, tiny_classifier_dir):
    unet, scheduler = load_denoiser(str(tiny_denoiser_dir))
    classifier = load_classifier(str(tiny_classifier_dir)).eval()
    base = DenoisedClassifier(OneShotDenoiser(unet, scheduler, 0.25), classifier)
    noisy = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(base(noisy), classifier(base.denoiser(noisy)))
    assert base.sigma == 0.25 and base(noisy).shape == (5, 10)


def test_denoiser_rejects_data_of_another_shape(tiny_denoiser_dir):
    unet, scheduler = load_denoiser(str(tiny_denoiser_dir))
    denoiser = OneShotDenoiser(unet, scheduler, 0.5)
    denoiser.check_input(1, 8, 8)
    with pytest.raises(CadisError, match="takes 1x8x8 images, the data is 3x32x32"):
        denoiser.check_input(3, 32, 32)
