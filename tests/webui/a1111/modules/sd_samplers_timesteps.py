"""Imitates ``modules/sd_samplers_timesteps.py`` (A1111 v1.10.1): DDIM, PLMS and UniPC pass DDPM timesteps where
k-diffusion passes sigmas. ``CompVisSampler.get_timesteps``: ``clip(range(0, 1000, 1000 // steps) + 1, 0, 999)``;
``sample`` passes them all, ``sample_img2img`` ``timesteps[:t_enc]`` (and ``is_img2img``), through
``launch_sampling(steps, lambda: self.func(self.model_wrap_cfg, x, extra_args=..., disable=False,
callback=self.callback_state, timesteps=...))``; the functions are ``sd_samplers_timesteps_impl``'s."""

import inspect

import torch

from modules import sd_samplers_common, sd_samplers_timesteps_impl
from modules.sd_samplers_cfg_denoiser import CFGDenoiser

samplers_timesteps = [
    ("DDIM", sd_samplers_timesteps_impl.ddim, ["ddim"], {}),
    ("PLMS", sd_samplers_timesteps_impl.plms, ["plms"], {}),
    ("UniPC", sd_samplers_timesteps_impl.unipc, ["unipc"], {}),
]


class CFGDenoiserTimesteps(CFGDenoiser):
    @property
    def inner_model(self):
        return None


class CompVisSampler(sd_samplers_common.Sampler):
    # double-only: the host builds this class in __init__; a Forge double puts its own here
    denoiser_class = CFGDenoiserTimesteps

    def __init__(self, funcname, sd_model):
        super().__init__(funcname)
        self.eta_option_field = "eta_ddim"
        self.eta_default = 0.0
        self.model_wrap_cfg = self.denoiser_class(self)
        self.model_wrap = self.model_wrap_cfg.inner_model

    @staticmethod
    def get_timesteps(p, steps):
        return torch.clip(torch.asarray(list(range(0, 1000, 1000 // steps))) + 1, 0, 999)

    def _run(self, p, x, steps, timesteps, conditioning, unconditional_conditioning, **extra):
        extra_params_kwargs = self.initialize(p)
        parameters = inspect.signature(self.func).parameters
        extra_params_kwargs["timesteps"] = timesteps
        if "is_img2img" in parameters and extra:
            extra_params_kwargs["is_img2img"] = True
        self.last_latent = x
        self.sampler_extra_args = {"cond": conditioning, "image_cond": torch.zeros(x.shape[0], 5, 1, 1),
                                   "uncond": unconditional_conditioning, "cond_scale": p.cfg_scale,
                                   "s_min_uncond": self.s_min_uncond}
        return self.launch_sampling(steps, lambda: self.func(
            self.model_wrap_cfg, x, extra_args=self.sampler_extra_args, disable=False, callback=self.callback_state,
            **extra_params_kwargs))

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        return self._run(p, x, steps, self.get_timesteps(p, steps), conditioning, unconditional_conditioning)

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None,
                       image_conditioning=None):
        steps, t_enc = sd_samplers_common.setup_img2img_steps(p, steps)
        timesteps = self.get_timesteps(p, steps)
        return self._run(p, x + noise, t_enc + 1, timesteps[:t_enc], conditioning, unconditional_conditioning,
                         img2img=True)

