"""One-shot diffusion denoising (Carlini et al. 2023), the front half of denoised smoothing.

Images are in [0, 1] for the user and for the certificate; the diffusion model works in
[-1, 1], where x~ = 2x - 1, so Gaussian noise of std sigma in [0, 1] units has std 2*sigma there.
The smoothing layer (:mod:`cadis.smoothing.smooth`) adds exactly N(0, sigma^2) noise in [0, 1] units; this module
only removes it, which keeps the certificate exact whatever the denoiser does.
"""

from __future__ import annotations

import torch
from torch import nn

from cadis.errors import CadisError
from cadis.models.classifier import Classifier
from cadis.validation import check_sigma

# [0, 1] -> [-1, 1] is x -> 2x - 1: noise std scales by this factor.
DIFFUSION_SCALE = 2.0


def to_diffusion_space(images: torch.Tensor) -> torch.Tensor:
    return images * DIFFUSION_SCALE - 1.0


def to_image_space(images: torch.Tensor) -> torch.Tensor:
    return (images + 1.0) / DIFFUSION_SCALE


def noise_level(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sqrt(1 - a_t) / sqrt(a_t): the std of the noise, relative to the signal, at each step."""
    alphas_cumprod = alphas_cumprod.double()
    return torch.sqrt(1.0 - alphas_cumprod) / torch.sqrt(alphas_cumprod)


def max_sigma(alphas_cumprod: torch.Tensor) -> float:
    """The largest sigma ([0, 1] units) the schedule can denoise: its last noise level, set by
    its last cumulative product, over the factor 2 of the [-1, 1] space."""
    return noise_level(alphas_cumprod)[-1].item() / DIFFUSION_SCALE


def timestep_for_sigma(alphas_cumprod: torch.Tensor, sigma: float) -> int:
    """The first timestep whose noise level reaches 2*sigma (noise std sigma in [0, 1] units).

    Timesteps are diffusers' 0-based indices into ``alphas_cumprod`` (index 0 is the paper's
    t = 1). Choosing the first level >= 2*sigma tells the model at least as much noise as the
    input holds. Raises :class:`CadisError` for a sigma that is not finite and > 0, or that the
    schedule never reaches.
    """
    sigma = check_sigma(sigma)
    levels = noise_level(alphas_cumprod)
    reached = torch.nonzero(levels >= DIFFUSION_SCALE * sigma)
    if len(reached) == 0:
        raise CadisError(f"sigma {sigma} is beyond the denoiser's schedule (its largest noise "
                         f"level is sigma = {max_sigma(alphas_cumprod):.3f})")
    return int(reached[0])


class OneShotDenoiser(nn.Module):
    """Removes N(0, sigma^2) noise from [0, 1] images in one DDPM network evaluation.

    ``denoise`` returns x^0 in the diffusion model's [-1, 1] space (where FT-CADIS's attack
    works); ``forward`` returns it in [0, 1], the classifier's input space. No gradient ever
    flows through the diffusion model.
    """

    def __init__(self, unet: nn.Module, scheduler, sigma: float) -> None:
        super().__init__()
        self.unet = unet.eval().requires_grad_(False)
        # timestep_for_sigma checks sigma (the one check of it here).
        self.timestep = timestep_for_sigma(scheduler.alphas_cumprod, sigma)
        self.sigma = float(sigma)
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise CadisError(f"unsupported denoiser prediction_type {self.prediction_type!r}; "
                             "allowed: epsilon, sample, v_prediction")
        self.alpha_bar = float(scheduler.alphas_cumprod[self.timestep])
        self.image_channels = int(unet.config.in_channels)
        size = unet.config.sample_size
        self.image_size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)

    def check_input(self, channels: int, height: int, width: int) -> None:
        """Raise :class:`CadisError` when the data cannot be fed to this denoiser."""
        if channels != self.image_channels or (height, width) != self.image_size:
            raise CadisError(
                f"the denoiser takes {self.image_channels}x{self.image_size[0]}x"
                f"{self.image_size[1]} images, the data is {channels}x{height}x{width}; "
                "use a denoiser trained at the data's resolution")

    @torch.no_grad()
    def denoise(self, noisy_images: torch.Tensor) -> torch.Tensor:
        """x + delta in [0, 1] units -> predicted clean image in [-1, 1], clipped."""
        sqrt_alpha_bar = self.alpha_bar ** 0.5
        sqrt_one_minus = (1.0 - self.alpha_bar) ** 0.5
        x_t = sqrt_alpha_bar * to_diffusion_space(noisy_images)
        timesteps = torch.full((x_t.shape[0],), self.timestep, device=x_t.device,
                               dtype=torch.long)
        output = self.unet(x_t.to(self.unet.dtype), timesteps).sample.to(x_t.dtype)
        # Models that learn their variance return it as extra channels after the prediction.
        output = output[:, : x_t.shape[1]]
        if self.prediction_type == "epsilon":
            x0 = (x_t - sqrt_one_minus * output) / sqrt_alpha_bar
        elif self.prediction_type == "v_prediction":
            x0 = sqrt_alpha_bar * x_t - sqrt_one_minus * output
        else:
            x0 = output
        return x0.clamp(-1.0, 1.0)

    def forward(self, noisy_images: torch.Tensor) -> torch.Tensor:
        return to_image_space(self.denoise(noisy_images))


class DenoisedClassifier(nn.Module):
    """The base classifier of denoised smoothing: ``classifier(denoiser(x + delta))``.

    Maps noisy images in [0, 1] units to logits; wrap it in ``Smooth`` with the same sigma.
    """

    def __init__(self, denoiser: OneShotDenoiser, classifier: Classifier) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.classifier = classifier

    @property
    def sigma(self) -> float:
        return self.denoiser.sigma

    def forward(self, noisy_images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.denoiser(noisy_images))
