"""Imitates ``modules/sd_samplers_timesteps.py`` + ``sd_samplers_timesteps_impl.py`` (A1111 v1.10.1): DDIM, PLMS and
UniPC pass DDPM timesteps where k-diffusion passes sigmas. ``get_timesteps``: ``clip(range(0, 1000, 1000 // steps)
+ 1, 0, 999)``; the sampler calls the denoiser at ``timesteps[index]`` for index from the last down to 1 (txt2img)
and over ``timesteps[:t_enc]`` the same way (img2img)."""

import torch

from modules.sd_samplers_cfg_denoiser import CFGDenoiser, state
from modules.sd_samplers_kdiffusion import setup_img2img_steps


class CFGDenoiserTimesteps(CFGDenoiser):
    @property
    def inner_model(self):
        return None


class CompVisSampler:
    # double-only: the host builds this class in __init__; a Forge double puts its own here
    denoiser_class = CFGDenoiserTimesteps

    # double-simplified: takes the SamplerData, where the host takes its funcname
    def __init__(self, config, sd_model):
        self.config = config
        self.model_wrap_cfg = self.denoiser_class(self)

    @staticmethod
    def get_timesteps(p, steps):
        return torch.clip(torch.asarray(list(range(0, 1000, 1000 // steps))) + 1, 0, 999)

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        return self._run(p, x, self.get_timesteps(p, steps), steps, conditioning, unconditional_conditioning)

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None,
                       image_conditioning=None):
        steps, t_enc = setup_img2img_steps(p, steps)
        return self._run(p, x, self.get_timesteps(p, steps)[:t_enc], steps, conditioning, unconditional_conditioning)

    def _run(self, p, x, timesteps, steps, cond, uncond):
        denoiser = self.model_wrap_cfg
        denoiser.p = p
        denoiser.steps = steps
        denoiser.total_steps = self.config.total_steps(steps)
        state.sampling_step = 0
        image_cond = torch.zeros(x.shape[0], 5, 1, 1)
        for i, index in enumerate(range(len(timesteps) - 1, 0, -1)):
            t = timesteps[index].float().repeat(x.shape[0])
            denoiser(x, t, uncond, cond, p.cfg_scale, 0.0, image_cond)
            state.sampling_step = i
        return x
