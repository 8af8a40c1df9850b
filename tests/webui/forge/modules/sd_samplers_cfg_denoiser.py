"""Imitates ``modules/sd_samplers_cfg_denoiser.py`` ``CFGDenoiser.forward`` of Forge (classic and new alike, except
where noted):

- with ``classic_ddim_eps_estimation`` (the timestep samplers) the timestep becomes a real sigma first:
  ``fake_sigmas[sigma.round().long()]`` from ``self.inner_model.inner_model.alphas_cumprod``;
- ``reconstruct_multicond_batch(cond, self.step)`` / ``reconstruct_cond_batch(uncond, self.step)`` (new: only if
  ``uncond`` is not None);
- ``CFGDenoiserParams(x, image_cond, sigma, state.sampling_step, state.sampling_steps, cond, uncond, self)`` through
  ``cfg_denoiser_callback``: ``x`` and ``sigma`` have one row per image (no cond/uncond stacking);
- new: in the hires pass ``cond_scale = self.p.hr_cfg``;
- ``forge_sample`` (classic) / ``sampling_function`` (new) with the edited params and ``cond_composition``;
- ``self.step += 1``.
The double's ``sample`` records the UNet chunks in ``self.inner_calls`` (``forge_common.ModelCall``).
"""

import importlib.util

from hostlayers import a1111_module

from modules.script_callbacks import CFGDenoiserParams, cfg_denoiser_callback

base = a1111_module("sd_samplers_cfg_denoiser")
state = base.state
# double-only: which generation this is (the new generation's double provides ``backend``)
NEW = importlib.util.find_spec("backend") is not None


def _composition(cond):
    conds_list, rows = [], []
    for image_rows in cond:
        conds_list.append([(len(rows) + j, 1.0) for j in range(len(image_rows))])
        rows.extend(image_rows)
    return conds_list, base._stack_rows(rows)


class CFGDenoiser(base.CFGDenoiser):
    def __init__(self, sampler):
        super().__init__(sampler)
        self.classic_ddim_eps_estimation = False

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        if self.classic_ddim_eps_estimation:
            acd = self.inner_model.inner_model.alphas_cumprod
            fake_sigmas = ((1 - acd) / acd) ** 0.5
            sigma = fake_sigmas[sigma.round().long().clip(0, int(fake_sigmas.shape[0]))]
        cond_composition, cond = _composition(cond)
        if not NEW or uncond is not None:
            uncond = base._stack_rows(uncond)
        params = CFGDenoiserParams(x, image_cond, sigma, state.sampling_step, state.sampling_steps, cond, uncond, self)
        cfg_denoiser_callback(params)
        if NEW and self.p.is_hr_pass:
            cond_scale = self.p.hr_cfg
        if NEW:
            from backend.sampling.sampling_function import sampling_function

            sampling_function(self, denoiser_params=params, cond_scale=cond_scale, cond_composition=cond_composition)
        else:
            from modules_forge.forge_sampler import forge_sample

            forge_sample(self, denoiser_params=params, cond_scale=cond_scale, cond_composition=cond_composition)
        self.step += 1
        return x
