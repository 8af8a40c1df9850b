"""Imitates ``modules/sd_samplers_kdiffusion.py`` (A1111 v1.10.1) with the real k-diffusion denoiser:

- ``CFGDenoiserKDiffusion.inner_model`` = ``k_diffusion.external.CompVisDenoiser(shared.sd_model,
  quantize=opts.enable_quantization)`` (the real class: tests set ``k_external`` to the real ``external`` module);
- ``get_sigmas``: the denoiser's ``get_sigmas(steps)`` (k-diffusion: ``t_to_sigma(linspace(t_max, 0, n))`` plus a
  final 0; written out here because the real one needs ``k_diffusion.sampling``), one more step and the
  next-to-last sigma dropped for samplers with ``discard_next_to_last_sigma``;
- ``sample_img2img``: ``sigmas[steps - t_enc - 1:]`` with ``steps, t_enc`` from
  ``sd_samplers_common.setup_img2img_steps`` (imitated below);
- the samplers' calls of the denoiser, as ``k_diffusion/sampling.py`` makes them: Euler once per step at
  ``sigmas[i]``; Heun again at ``sigmas[i + 1]`` unless it is 0; DPM2 again at the log-midpoint of ``sigmas[i]`` and
  ``sigmas[i + 1]`` unless it is 0; ``state.sampling_step = i`` after each step (``Sampler.callback_state``).
"""

import torch

from modules import shared
from modules.sd_samplers_cfg_denoiser import CFGDenoiser, state

k_external = None  # double-only: the real k_diffusion.external module, set by the tests


class CFGDenoiserKDiffusion(CFGDenoiser):
    @property
    def inner_model(self):
        if self.model_wrap is None:
            self.model_wrap = k_external.CompVisDenoiser(shared.sd_model, quantize=shared.opts.enable_quantization)
        return self.model_wrap


def setup_img2img_steps(p, steps=None):  # host: modules/sd_samplers_common.py
    """``sd_samplers_common.setup_img2img_steps``: an explicit ``steps`` (the hires pass) or ``img2img_fix_steps``
    stretches the schedule so that exactly ``steps - 1`` + 1 of it are sampled; otherwise ``denoising * steps``."""
    if shared.opts.img2img_fix_steps or steps is not None:
        requested = steps or p.steps
        steps = int(requested / min(p.denoising_strength, 0.999)) if p.denoising_strength > 0 else 0
        return steps, requested - 1
    return p.steps, int(min(p.denoising_strength, 0.999) * p.steps)


class KDiffusionSampler:
    # double-only: the host builds this class in __init__; a Forge double puts its own here
    denoiser_class = CFGDenoiserKDiffusion

    # double-simplified: takes the SamplerData, where the host takes its funcname and options
    def __init__(self, config, sd_model):
        self.config = config
        self.model_wrap_cfg = self.denoiser_class(self)

    def get_sigmas(self, p, steps):
        discard = self.config.options.get("discard_next_to_last_sigma", False)
        steps += 1 if discard else 0
        inner = self.model_wrap_cfg.inner_model
        t = torch.linspace(len(inner.sigmas) - 1, 0, steps, device=inner.sigmas.device)
        sigmas = torch.cat([inner.t_to_sigma(t), inner.sigmas.new_zeros([1])])
        if discard:
            sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
        return sigmas

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        return self._run(p, x, self.get_sigmas(p, steps), steps, conditioning, unconditional_conditioning)

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None,
                       image_conditioning=None):
        steps, t_enc = setup_img2img_steps(p, steps)
        sigmas = self.get_sigmas(p, steps)
        return self._run(p, x, sigmas[steps - t_enc - 1:], steps, conditioning, unconditional_conditioning)

    def _run(self, p, x, sigmas, steps, cond, uncond):
        denoiser = self.model_wrap_cfg
        denoiser.p = p
        denoiser.steps = steps
        denoiser.total_steps = self.config.total_steps(steps)
        state.sampling_step = 0
        state.sampling_steps = len(sigmas) - 1
        image_cond = torch.zeros(x.shape[0], 5, 1, 1)
        s_in = x.new_ones([x.shape[0]])

        def model(sigma):
            return denoiser(x, sigma * s_in, uncond, cond, p.cfg_scale, 0.0, image_cond)

        for i in range(len(sigmas) - 1):
            model(sigmas[i])
            if sigmas[i + 1] != 0 and self.config.name == "Heun":
                model(sigmas[i + 1])
            elif sigmas[i + 1] != 0 and self.config.name == "DPM2":
                model(sigmas[i].log().lerp(sigmas[i + 1].log(), 0.5).exp())
            state.sampling_step = i
        return x
