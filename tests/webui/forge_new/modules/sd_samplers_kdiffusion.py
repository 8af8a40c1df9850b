"""Imitates ``modules/sd_samplers_kdiffusion.py`` of Forge new: ``CFGDenoiserKDiffusion.inner_model`` is
``k_diffusion.external.ForgeScheduleLinker(shared.sd_model.forge_objects.unet.model.predictor)`` with
``inner_model = shared.sd_model`` set on it; its ``sigmas`` are the predictor's, ``sigma_to_t`` is
``predictor.timestep``, ``t_to_sigma`` is ``predictor.sigma`` and ``get_sigmas(n)`` is ``t_to_sigma`` of
``linspace(len(sigmas) - 1, 0, n)`` then a final 0 (``k_diffusion/external.py``, vendored). Schedules and the
samplers' calls are A1111's (the A1111 double's ``KDiffusionSampler``; Forge new's vendored ``k_diffusion/sampling.py``
keeps k-diffusion's samplers for SD models)."""

import k_diffusion.sampling
import torch
from hostlayers import a1111_module

from modules import shared

base = a1111_module("sd_samplers_kdiffusion")
samplers_k_diffusion = base.samplers_k_diffusion


class ForgeScheduleLinker:  # host: k_diffusion/external.py
    def __init__(self, predictor):
        self.predictor = predictor

    @property
    def sigmas(self):
        return self.predictor.sigmas

    def sigma_to_t(self, sigma, quantize=None):
        return self.predictor.timestep(sigma)

    def t_to_sigma(self, t):
        return self.predictor.sigma(t)

    def get_sigmas(self, n=None):
        if n is None:
            return k_diffusion.sampling.append_zero(self.sigmas.flip(0))
        t = torch.linspace(len(self.sigmas) - 1, 0, n, device=self.sigmas.device)
        return k_diffusion.sampling.append_zero(self.t_to_sigma(t))


class CFGDenoiserKDiffusion(base.CFGDenoiserKDiffusion):
    @property
    def inner_model(self):
        if self.model_wrap is None:
            self.model_wrap = ForgeScheduleLinker(shared.sd_model.forge_objects.unet.model.predictor)
            self.model_wrap.inner_model = shared.sd_model
        return self.model_wrap


class KDiffusionSampler(base.KDiffusionSampler):
    denoiser_class = CFGDenoiserKDiffusion  # double-only: see the A1111 double's KDiffusionSampler
