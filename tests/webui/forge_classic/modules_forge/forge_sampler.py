"""Imitates ``modules_forge/forge_sampler.py`` ``forge_sample`` of Forge classic: the UNet patcher is
``self.inner_model.inner_model.forge_objects.unet``; ``uncond = cond_from_a1111_to_patched_ldm(text_uncond)``
(classic never hands a None uncond);
``cond = cond_from_a1111_to_patched_ldm_weighted(text_cond, cond_composition)``, then
ControlNet, the conditioning modifiers and ``sampling_function`` (``forge_common``)."""

import forge_common


def forge_sample(self, denoiser_params, cond_scale, cond_composition):
    unet = self.inner_model.inner_model.forge_objects.unet
    if denoiser_params.text_uncond is None:  # cond_from_a1111_to_patched_ldm(None) reads None['crossattn']
        raise TypeError("'NoneType' object is not subscriptable")
    uncond = forge_common.compile_conditions(denoiser_params.text_uncond)
    cond = forge_common.compile_weighted_conditions(denoiser_params.text_cond, cond_composition)
    return forge_common.sampling_function(unet, denoiser_params.x, denoiser_params.sigma, uncond, cond, cond_scale,
                                          self.inner_calls)
