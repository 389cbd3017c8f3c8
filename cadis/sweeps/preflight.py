"""Checks of a sweep that load what its trials will load, run before any trial (and by a dry
run): what :func:`cadis.sweeps.parse.load_sweep` cannot know from the file alone."""

from __future__ import annotations

from cadis.errors import CadisError
from cadis.models.denoiser import load_denoiser
from cadis.smoothing.denoise import max_sigma
from cadis.sweeps.search_space import largest_value, trial_config
from cadis.sweeps.spec import VARIANT_KEY, SweepConfig

SIGMA_KEY = "sigma"


def check_searched_sigma(sweep: SweepConfig) -> None:
    """Raise :class:`CadisError` naming ``search.sigma`` when the largest searched sigma is
    beyond what a trial's denoiser can denoise (the schedule's last noise level): such a
    trial would fail only once it loads its denoiser. The base's sigma, and a variant's, are
    checked with the models of each variant by the trials' own preflight."""
    if SIGMA_KEY not in sweep.search:
        return
    sigma = largest_value(sweep.search, sweep.base, SIGMA_KEY)
    variants = sweep.search.get(VARIANT_KEY)
    configs = ([trial_config(sweep, {VARIANT_KEY: values}) for values in variants.values]
               if variants else [sweep.base])
    for denoiser in sorted({config.model_sources().denoiser for config in configs}):
        _, scheduler = load_denoiser(denoiser)
        reach = max_sigma(scheduler.alphas_cumprod)
        if sigma > reach:
            raise CadisError(f"search.{SIGMA_KEY}: {sigma:g} is beyond the denoiser's schedule "
                             f"({denoiser} denoises sigma up to {reach:.3f}); lower the "
                             "search's largest sigma")
