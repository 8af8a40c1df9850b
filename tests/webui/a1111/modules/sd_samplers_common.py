"""Imitates ``modules/sd_samplers_common.py`` (A1111 v1.10.1; Forge classic and new alike) as the samplers use it:

- ``SamplerData(name, constructor, aliases, options)`` and ``total_steps`` (doubled for ``second_order`` samplers);
- ``setup_img2img_steps``: an explicit ``steps`` (the hires pass) or ``img2img_fix_steps`` stretches the schedule so
  that exactly ``steps - 1`` + 1 of it are sampled; otherwise ``denoising * steps``;
- ``TorchHijack(p)``: what ``k_diffusion.sampling.torch`` becomes for a pass, every attribute torch's except
  ``randn_like``, which returns ``p.rng.next()`` (the image's seeded noise);
- ``Sampler``: ``initialize(p)`` (``denoiser.p``, ``denoiser.step = 0``, eta for samplers that take it,
  ``k_diffusion.sampling.torch = TorchHijack(p)``), ``launch_sampling(steps, func)`` (``denoiser.steps``,
  ``denoiser.total_steps``, the progress state, then ``func()``), ``callback_state`` (``state.sampling_step = i``),
  ``create_noise_sampler`` for the Brownian-noise samplers (the host's is k-diffusion's ``BrownianTreeNoiseSampler``
  seeded per image, which needs torchsde; the double's stand-in draws from a seeded generator: the noise levels a
  sampler calls its model at do not depend on it);
- ``apply_refiner(cfg_denoiser, sigma)``: at the first call whose completed ratio reaches ``p.refiner_switch_at``
  (by steps, or by the timestep nearest the call's sigma), once per pass: the ``Refiner`` info keys, the refiner
  loaded as ``shared.sd_model``, ``p.setup_conds()`` with its CLIP and ``update_inner_model`` (the sampler's
  conds replaced, the sigma wrapper dropped).
"""

import inspect
from collections import namedtuple

import k_diffusion.sampling
import torch

from modules import sd_models, shared
from modules.sd_samplers_cfg_denoiser import state

SamplerDataTuple = namedtuple("SamplerData", ["name", "constructor", "aliases", "options"])


class SamplerData(SamplerDataTuple):
    def total_steps(self, steps):
        if self.options.get("second_order", False):
            steps = steps * 2
        return steps


def setup_img2img_steps(p, steps=None):
    if shared.opts.img2img_fix_steps or steps is not None:
        requested = steps or p.steps
        steps = int(requested / min(p.denoising_strength, 0.999)) if p.denoising_strength > 0 else 0
        return steps, requested - 1
    return p.steps, int(min(p.denoising_strength, 0.999) * p.steps)


def apply_refiner(cfg_denoiser, sigma=None):
    # double-simplified: the hires-fix option "Hires refiner" (which pass the refiner may run in) is not imitated
    if shared.opts.refiner_switch_by_sample_steps or sigma is None:
        completed_ratio = cfg_denoiser.step / cfg_denoiser.total_steps
        cfg_denoiser.p.extra_generation_params["Refiner switch by sampling steps"] = True
    else:
        try:
            timestep = torch.argmin(torch.abs(cfg_denoiser.inner_model.sigmas.to(sigma.device) - torch.max(sigma)))
        except AttributeError:  # samplers without sigmas (DDIM) pass the timestep
            timestep = torch.max(sigma).to(dtype=int)
        completed_ratio = (999 - timestep) / 1000
    refiner_switch_at = cfg_denoiser.p.refiner_switch_at
    refiner_checkpoint_info = cfg_denoiser.p.refiner_checkpoint_info
    if refiner_switch_at is not None and completed_ratio < refiner_switch_at:
        return False
    if refiner_checkpoint_info is None or shared.sd_model.sd_checkpoint_info == refiner_checkpoint_info:
        return False
    cfg_denoiser.p.extra_generation_params["Refiner"] = refiner_checkpoint_info.short_title
    cfg_denoiser.p.extra_generation_params["Refiner switch at"] = refiner_switch_at
    sd_models.reload_model_weights(info=refiner_checkpoint_info)
    cfg_denoiser.p.setup_conds()
    cfg_denoiser.update_inner_model()
    return True


class InterruptedException(BaseException):
    pass


class TorchHijack:
    def __init__(self, p):
        self.rng = p.rng

    def __getattr__(self, item):
        if item == "randn_like":
            return self.randn_like
        if hasattr(torch, item):
            return getattr(torch, item)
        raise AttributeError(item)

    def randn_like(self, x):
        return self.rng.next()


class Sampler:
    def __init__(self, funcname):
        self.funcname = funcname
        self.func = funcname
        self.extra_params = []
        self.config = None  # set by create_sampler
        self.eta = None
        self.eta_option_field = "eta_ancestral"
        self.eta_default = 1.0
        self.s_min_uncond = None
        self.p = None
        self.model_wrap_cfg = None
        self.sampler_extra_args = None
        self.last_latent = None
        self.options = {}

    def callback_state(self, d):
        state.sampling_step = d["i"]

    def launch_sampling(self, steps, func):
        self.model_wrap_cfg.steps = steps
        self.model_wrap_cfg.total_steps = self.config.total_steps(steps)
        state.sampling_steps = steps
        state.sampling_step = 0
        try:
            return func()
        except InterruptedException:
            return self.last_latent

    def initialize(self, p):
        self.p = p
        self.model_wrap_cfg.p = p
        self.model_wrap_cfg.step = 0
        self.eta = p.eta if p.eta is not None else getattr(shared.opts, self.eta_option_field, 0.0)
        self.s_min_uncond = getattr(p, "s_min_uncond", 0.0)
        k_diffusion.sampling.torch = TorchHijack(p)
        extra_params_kwargs = {}
        if "eta" in inspect.signature(self.func).parameters:
            extra_params_kwargs["eta"] = self.eta
        return extra_params_kwargs

    def create_noise_sampler(self, x, sigmas, p):
        generator = torch.Generator().manual_seed(int(p.seeds[0]) if p.seeds else 0)
        return lambda sigma, sigma_next: torch.randn(x.shape, generator=generator).to(x)
