"""Imitates ``backend/sampling/sampling_function.py`` ``sampling_function(self, denoiser_params, cond_scale,
cond_composition)`` of Forge new: the UNet patcher is ``self.inner_model.inner_model.forge_objects.unet``;
``uncond = compile_conditions(text_uncond)`` (None stays None), ``cond = compile_weighted_conditions(text_cond,
cond_composition)``, then ControlNet, the conditioning modifiers and ``sampling_function_inner`` /
``calc_cond_uncond_batch`` (``forge_common``)."""

import forge_common


def sampling_function(self, denoiser_params, cond_scale, cond_composition):
    unet = self.inner_model.inner_model.forge_objects.unet
    uncond = forge_common.compile_conditions(denoiser_params.text_uncond)
    cond = forge_common.compile_weighted_conditions(denoiser_params.text_cond, cond_composition)
    x = denoiser_params.x
    forge_common.sampling_function(unet, x, denoiser_params.sigma, uncond, cond, cond_scale, self.inner_calls)
    return x, x, x
