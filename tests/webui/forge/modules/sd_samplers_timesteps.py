"""Imitates ``modules/sd_samplers_timesteps.py`` of Forge (classic and new): ``CFGDenoiserTimesteps`` sets
``classic_ddim_eps_estimation = True`` and its ``inner_model`` is ``CompVisTimestepsDenoiser(shared.sd_model)``
(whose ``inner_model`` is the model); the samplers call it with timesteps as A1111's do (the A1111 double's
``CompVisSampler``)."""

from hostlayers import a1111_module

from modules import shared

base = a1111_module("sd_samplers_timesteps")
samplers_timesteps = base.samplers_timesteps


class CompVisTimestepsDenoiser:
    def __init__(self, model, *args, **kwargs):  # as the host's (classic line 27, new line 28)
        self.inner_model = model


class CFGDenoiserTimesteps(base.CFGDenoiserTimesteps):
    def __init__(self, sampler):
        super().__init__(sampler)
        self.classic_ddim_eps_estimation = True

    @property
    def inner_model(self):
        if self.model_wrap is None:
            self.model_wrap = CompVisTimestepsDenoiser(shared.sd_model)
        return self.model_wrap


class CompVisSampler(base.CompVisSampler):
    denoiser_class = CFGDenoiserTimesteps  # double-only: see the A1111 double's CompVisSampler
