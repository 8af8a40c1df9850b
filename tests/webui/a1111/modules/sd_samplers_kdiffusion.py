"""Imitates ``modules/sd_samplers_kdiffusion.py`` (A1111 v1.10.1) with the real k-diffusion package: the tests
register its ``external`` and ``sampling`` modules (see ``tests/kdiffusion.py``).

- ``samplers_k_diffusion``: (label, function, aliases, options) as the host lists them (a subset: LMS needs scipy,
  DPM fast/adaptive are left out); the functions are k-diffusion's own, Restart is ``sd_samplers_extra``'s;
- ``CFGDenoiserKDiffusion.inner_model`` = ``k_diffusion.external.CompVisDenoiser(shared.sd_model,
  quantize=opts.enable_quantization)``;
- ``KDiffusionSampler.get_sigmas``: one more step and the next-to-last sigma dropped for
  ``discard_next_to_last_sigma``; the scheduler (``p.hr_scheduler`` in the hires pass, else ``p.scheduler``;
  "Automatic" = the sampler's own option) from ``sd_schedulers`` (Karras, Exponential: k-diffusion's functions, on
  the CPU, between the model's smallest and largest sigma) or, with none, ``model_wrap.get_sigmas(steps)``; the
  result on the CPU;
- ``sample``: ``get_sigmas(p, steps or p.steps)``, ``x * sigmas[0]``; ``sample_img2img``: ``setup_img2img_steps``,
  ``sigmas[steps - t_enc - 1:]``, ``x + noise * sigma_sched[0]``; both pass ``sigmas`` (and ``n``,
  ``sigma_min/max``, ``noise_sampler`` where the function takes them) and call
  ``self.launch_sampling(steps, lambda: self.func(self.model_wrap_cfg, x, extra_args=self.sampler_extra_args,
  disable=False, callback=self.callback_state, **extra_params_kwargs))``.
"""

import inspect

import k_diffusion.external
import k_diffusion.sampling
import torch

from modules import sd_samplers_common, sd_samplers_extra, shared
from modules.sd_samplers_cfg_denoiser import CFGDenoiser

samplers_k_diffusion = [
    ("DPM++ 2M", "sample_dpmpp_2m", ["k_dpmpp_2m"], {"scheduler": "karras"}),
    ("DPM++ SDE", "sample_dpmpp_sde", ["k_dpmpp_sde"], {"scheduler": "karras", "second_order": True,
                                                        "brownian_noise": True}),
    ("DPM++ 2M SDE", "sample_dpmpp_2m_sde", ["k_dpmpp_2m_sde"], {"scheduler": "exponential", "brownian_noise": True}),
    ("DPM++ 2S a", "sample_dpmpp_2s_ancestral", ["k_dpmpp_2s_a"], {"scheduler": "karras", "uses_ensd": True,
                                                                   "second_order": True}),
    ("Euler a", "sample_euler_ancestral", ["k_euler_a", "k_euler_ancestral"], {"uses_ensd": True}),
    ("Euler", "sample_euler", ["k_euler"], {}),
    ("Heun", "sample_heun", ["k_heun"], {"second_order": True}),
    ("DPM2", "sample_dpm_2", ["k_dpm_2"], {"scheduler": "karras", "discard_next_to_last_sigma": True,
                                           "second_order": True}),
    ("DPM2 a", "sample_dpm_2_ancestral", ["k_dpm_2_a"], {"scheduler": "karras", "discard_next_to_last_sigma": True,
                                                         "uses_ensd": True, "second_order": True}),
    ("Restart", sd_samplers_extra.restart_sampler, ["restart"], {"scheduler": "karras", "second_order": True}),
]
# double-only: the schedules the samplers' options and p.scheduler name, as k-diffusion functions by name; stands in
# for sd_schedulers.schedulers_map (A1111 1.10, Forge new; Forge classic: k_diffusion_scheduler)
schedulers = {"karras": k_diffusion.sampling.get_sigmas_karras,
              "exponential": k_diffusion.sampling.get_sigmas_exponential}


class CFGDenoiserKDiffusion(CFGDenoiser):
    @property
    def inner_model(self):
        if self.model_wrap is None:
            self.model_wrap = k_diffusion.external.CompVisDenoiser(shared.sd_model,
                                                                   quantize=shared.opts.enable_quantization)
        return self.model_wrap


class KDiffusionSampler(sd_samplers_common.Sampler):
    # double-only: the host builds this class in __init__; a Forge double puts its own here
    denoiser_class = CFGDenoiserKDiffusion

    def __init__(self, funcname, sd_model, options=None):
        super().__init__(funcname)
        self.options = options or {}
        self.func = funcname if callable(funcname) else getattr(k_diffusion.sampling, funcname)
        self.model_wrap_cfg = self.denoiser_class(self)
        self.model_wrap = self.model_wrap_cfg.inner_model

    def get_sigmas(self, p, steps):
        discard = self.config is not None and self.config.options.get("discard_next_to_last_sigma", False)
        steps += 1 if discard else 0
        scheduler = (p.hr_scheduler if p.is_hr_pass else p.scheduler) or "Automatic"
        if scheduler == "Automatic":
            scheduler = self.config.options.get("scheduler", None)
        function = schedulers.get(scheduler)
        if function is None:
            sigmas = self.model_wrap.get_sigmas(steps)
        else:
            sigma_min, sigma_max = self.model_wrap.sigmas[0].item(), self.model_wrap.sigmas[-1].item()
            sigmas = function(n=steps, sigma_min=sigma_min, sigma_max=sigma_max, device=torch.device("cpu"))
        if discard:
            sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
        return sigmas.cpu()

    def _options(self, p, x, sigmas, sigma_sched):
        extra_params_kwargs = self.initialize(p)
        parameters = inspect.signature(self.func).parameters
        if "n" in parameters:
            extra_params_kwargs["n"] = len(sigma_sched) - 1
        if "sigmas" in parameters:
            extra_params_kwargs["sigmas"] = sigma_sched
        if self.config.options.get("brownian_noise", False):
            extra_params_kwargs["noise_sampler"] = self.create_noise_sampler(x, sigmas, p)
        return extra_params_kwargs

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        sigmas = self.get_sigmas(p, steps)
        x = x * sigmas[0]
        extra_params_kwargs = self._options(p, x, sigmas, sigmas)
        self._extra_args(p, conditioning, unconditional_conditioning, image_conditioning, x)
        return self.launch_sampling(steps, lambda: self.func(
            self.model_wrap_cfg, x, extra_args=self.sampler_extra_args, disable=False, callback=self.callback_state,
            **extra_params_kwargs))

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None,
                       image_conditioning=None):
        steps, t_enc = sd_samplers_common.setup_img2img_steps(p, steps)
        sigmas = self.get_sigmas(p, steps)
        sigma_sched = sigmas[steps - t_enc - 1:]
        xi = x + noise * sigma_sched[0]
        extra_params_kwargs = self._options(p, x, sigmas, sigma_sched)
        self._extra_args(p, conditioning, unconditional_conditioning, image_conditioning, x)
        return self.launch_sampling(t_enc + 1, lambda: self.func(
            self.model_wrap_cfg, xi, extra_args=self.sampler_extra_args, disable=False, callback=self.callback_state,
            **extra_params_kwargs))

    def _extra_args(self, p, conditioning, unconditional_conditioning, image_conditioning, x):
        self.last_latent = x
        if image_conditioning is None:  # the double's stand-in for the host's image conditioning
            image_conditioning = torch.zeros(x.shape[0], 5, 1, 1)
        self.sampler_extra_args = {"cond": conditioning, "image_cond": image_conditioning,
                                   "uncond": unconditional_conditioning, "cond_scale": p.cfg_scale,
                                   "s_min_uncond": self.s_min_uncond}
