"""Imitates ``modules/sd_samplers_lcm.py`` (A1111 v1.10.1; Forge alike as far as the model calls go):

- ``LCMCompVisDenoiser``: k-diffusion's ``DiscreteEpsDDPMDenoiser`` over the 50 steps LCM was distilled on (every
  20th of the model's 1000, from step 999 down); ``sigma_to_t`` is the nearest of them as a timestep
  (``argmin * 20 + 19``), ``t_to_sigma`` interpolates between them, ``get_sigmas(n)`` spaces ``n`` timesteps
  linearly from ``sigma_to_t(sigma_max)`` to ``sigma_to_t(sigma_min)`` (then a final 0);
- ``sample_lcm``: one model call per sigma, the next sigma's noise from ``default_noise_sampler`` (k-diffusion's:
  ``k_diffusion.sampling.torch.randn_like``);
- ``CFGDenoiserLCM.inner_model`` = ``LCMCompVisDenoiser(shared.sd_model)``; ``LCMSampler`` is a
  ``KDiffusionSampler`` with it.
"""

import k_diffusion.external
import k_diffusion.sampling
import torch

from modules import sd_samplers_kdiffusion, shared
from modules.sd_samplers_cfg_denoiser import CFGDenoiser


class LCMCompVisDenoiser(k_diffusion.external.DiscreteEpsDDPMDenoiser):
    def __init__(self, model):
        timesteps, original_timesteps = 1000, 50
        self.skip_steps = timesteps // original_timesteps
        valid = torch.zeros(original_timesteps, dtype=torch.float32)
        for x in range(original_timesteps):
            valid[original_timesteps - 1 - x] = model.alphas_cumprod[timesteps - 1 - x * self.skip_steps]
        super().__init__(model, valid, quantize=None)

    def get_sigmas(self, n=None):
        if n is None:
            return k_diffusion.sampling.append_zero(self.sigmas.flip(0))
        start, end = self.sigma_to_t(self.sigma_max), self.sigma_to_t(self.sigma_min)
        return k_diffusion.sampling.append_zero(self.t_to_sigma(torch.linspace(start, end, n)))

    def sigma_to_t(self, sigma, quantize=None):
        dists = sigma.log() - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape) * self.skip_steps + (self.skip_steps - 1)

    def t_to_sigma(self, timestep):
        t = torch.clamp(((timestep - (self.skip_steps - 1)) / self.skip_steps).float(), min=0,
                        max=(len(self.sigmas) - 1))
        return super().t_to_sigma(t)


def sample_lcm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = k_diffusion.sampling.default_noise_sampler(x) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * noise_sampler(sigmas[i], sigmas[i + 1])
    return x


class CFGDenoiserLCM(CFGDenoiser):
    @property
    def inner_model(self):
        if self.model_wrap is None:
            self.model_wrap = LCMCompVisDenoiser(shared.sd_model)
        return self.model_wrap


class LCMSampler(sd_samplers_kdiffusion.KDiffusionSampler):
    denoiser_class = CFGDenoiserLCM  # double-only: the host's LCMSampler.__init__ builds CFGDenoiserLCM instead


samplers_lcm = [("LCM", sample_lcm, ["k_lcm"], {})]
