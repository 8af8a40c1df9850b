"""AUTOMATIC1111 specifics of the per-call swap: the DDPM timestep of each row at a denoiser call.

Host facts (AUTOMATIC1111 v1.10.1, commit 82a973c0):
- ``modules/sd_samplers_kdiffusion.py``: k-diffusion samplers' ``CFGDenoiserKDiffusion.inner_model`` is
  ``k_diffusion.external.CompVisDenoiser(sd_model, quantize=opts.enable_quantization)`` (``CompVisVDenoiser`` for
  v-prediction, ``sd_model.create_denoiser()`` for SD3); it feeds the UNet ``sigma_to_t(sigma)``.
- ``modules/sd_samplers_lcm.py``: LCM's inner model has its own ``sigma_to_t``.
- ``modules/sd_samplers_timesteps.py``: DDIM, PLMS and UniPC (``CFGDenoiserTimesteps``) pass DDPM timesteps where
  k-diffusion passes sigmas; ``params.sigma`` already is the timestep.
- ``modules/sd_samplers_cfg_denoiser.py`` ``CFGDenoiser.forward``: ``params.sigma`` repeats the value the sampler
  handed the denoiser for each image (once per AND part, then once more for its uncond row), unconverted;
  ``update_inner_model`` (a refiner switch, ``sd_samplers_common.apply_refiner``) drops ``model_wrap``, so the next
  ``inner_model`` is a new object.
"""

from __future__ import annotations

import logging

import torch

from ..timesteps import TimestepSchedule

log = logging.getLogger("ella")

_schedules: dict[int, TimestepSchedule] = {}


def timesteps(params) -> torch.Tensor:
    """The DDPM timestep of each row of ``params.sigma`` at this call, as the UNet receives it."""
    denoiser = params.denoiser
    sigma = params.sigma
    if _passes_timesteps(denoiser):
        return sigma.float()
    to_t = getattr(denoiser.inner_model, "sigma_to_t", None)
    if to_t is not None:
        return to_t(sigma).float()
    return _fallback_schedule().timestep(sigma)


def callback_sigma(denoiser, sigma: torch.Tensor) -> torch.Tensor:
    """What ``params.sigma`` holds for a call at which the sampler hands the denoiser ``sigma``: the same values."""
    return sigma


def timestep_source(params):
    """What maps this call's sigmas to timesteps (``timesteps`` reads its ``sigma_to_t``)."""
    return params.denoiser.inner_model


def before_sampling(p, nbytes: int) -> None:
    """A1111 has no memory manager to tell: the connector simply stays on the GPU, beside the UNet."""


def _passes_timesteps(denoiser) -> bool:
    try:
        from modules.sd_samplers_timesteps import CFGDenoiserTimesteps
    except ImportError:
        return False
    return isinstance(denoiser, CFGDenoiserTimesteps)


def _fallback_schedule() -> TimestepSchedule:
    """For a denoiser that maps sigma privately: the checkpoint's own schedule (k-diffusion's interpolation)."""
    from modules import shared

    alphas = shared.sd_model.alphas_cumprod
    found = _schedules.get(id(alphas))
    if found is None:
        log.info("ELLA: this sampler's denoiser has no sigma_to_t; using the checkpoint's alphas_cumprod schedule")
        _schedules.clear()
        found = _schedules[id(alphas)] = TimestepSchedule.from_alphas_cumprod(alphas)
    return found
