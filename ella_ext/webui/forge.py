"""Forge specifics of the per-call swap (both generations): the timestep each row gets at a denoiser call, and the
memory ELLA needs while sampling, asked of Forge's own memory management.

Everything else is shared with AUTOMATIC1111 (``generation.py``): Forge fires the same ``on_cfg_denoiser`` callback
with the same ``text_cond`` / ``text_uncond`` containers, before anything reads them.

Host facts (lllyasviel/stable-diffusion-webui-forge; classic at bfee03d8, new at dfdcbab6):
- ``modules/sd_samplers_cfg_denoiser.py`` ``CFGDenoiser.forward``: the callback runs after the prompt schedules are
  resolved and before ``forge_sample`` (classic, ``modules_forge/forge_sampler.py``) / ``sampling_function`` (new,
  ``backend/sampling/sampling_function.py``) turn the edited ``text_cond`` / ``text_uncond`` into the model's
  conditions; Forge's ControlNet reads ``c_crossattn`` from those conditions (``calc_cond_uncond_batch``), so it sees
  ELLA's context. ``params.x`` and ``params.sigma`` have one row per image (cond and uncond are batched later), and
  in new ``text_uncond`` is None at CFG 1 (``processing.py``: ``uc = None`` when ``cfg_scale == 1``, ``hr_uc`` when
  ``hr_cfg == 1``).
- Both read the UNet as ``denoiser.inner_model.inner_model.forge_objects.unet``, and the UNet is fed
  ``model.model_sampling.timestep(sigma)`` (classic, ``ldm_patched/modules/model_base.py`` ``apply_model``) or
  ``model.predictor.timestep(sigma)`` (new, ``backend/modules/k_model.py``): the nearest of the 1000 training steps.
  The timestep samplers (DDIM, PLMS, UniPC: ``classic_ddim_eps_estimation``) turn their timestep into a real sigma
  before the callback, so one mapping serves every sampler. (Classic's k-diffusion ``CompVisDenoiser.sigma_to_t``
  would give a fractional t the UNet never sees.) ``CFGDenoiser.forward`` does that conversion before the callback:
  ``fake_sigmas = ((1 - acd) / acd) ** 0.5`` of ``inner_model.inner_model.alphas_cumprod``, then
  ``fake_sigmas[sigma.round().long().clip(0, int(fake_sigmas.shape[0]))]`` (the same in both generations).
- ``processing.py`` sets ``sd_model.forge_objects`` to a shallow copy of ``forge_objects_after_applying_lora`` before
  every ``process_before_every_sampling``; new calls that hook twice in the hires pass (before and after the reset).
  ``UnetPatcher.clone()`` + ``add_extra_preserved_memory_during_sampling(bytes)`` (``modules_forge/unet_patcher.py``,
  ``backend/patcher/unet.py``) is the documented way to keep memory free while sampling: ``sampling_prepare`` loads
  the UNet around it. A new patcher object is a new ``LoadedModel`` (``__eq__`` is identity): classic's
  ``LoadedModel.model_load`` runs ``ModelPatcher.patch_model`` (weight patches, LoRA included) after unloading the
  old clone; new's ``forge_patch_model`` sets object patches only (its LoRA is applied by ``refresh_loras``).
"""

from __future__ import annotations

import torch

from . import host

RESERVED = "ella_reserved_bytes"  # our mark in the UNet patcher's model_options (copied by clone())
# Forge classic re-applies the UNet's LoRA weights whenever it loads a different patcher object (its ComfyUI-style
# ``patch_model`` on load), so a clone costs a LoRA re-patch per pass there; below this size the reservation is left
# to the 1 GiB Forge keeps free for inference anyway. Forge new only swaps object patches on load: it always reserves.
CLASSIC_MIN_RESERVE = 64 * 1024**2


def timesteps(params) -> torch.Tensor:
    """The training timestep the UNet is fed for each row of ``params.sigma`` (one sigma per image in Forge)."""
    return timestep_source(params).timestep(params.sigma).float()


def timestep_source(params):
    """The UNet's discrete schedule, which maps this call's sigmas to the timesteps the UNet is fed."""
    model = params.denoiser.inner_model.inner_model.forge_objects.unet.model
    sampling = getattr(model, "predictor", None)  # new
    return model.model_sampling if sampling is None else sampling  # classic


def callback_sigma(denoiser, sigma: torch.Tensor) -> torch.Tensor:
    """What ``params.sigma`` holds for a call at which the sampler hands the denoiser ``sigma``: the same, except
    that the timestep samplers' timesteps become the sigmas of those steps (as ``CFGDenoiser.forward`` does)."""
    if not getattr(denoiser, "classic_ddim_eps_estimation", False):
        return sigma
    acd = denoiser.inner_model.inner_model.alphas_cumprod
    fake_sigmas = ((1 - acd) / acd) ** 0.5
    return fake_sigmas[sigma.round().long().clip(0, int(fake_sigmas.shape[0]))]


def before_sampling(p, nbytes: int) -> None:
    """``process_before_every_sampling``: ask Forge to keep ``nbytes`` free on the GPU while this pass samples (the
    connector's per-call work). The UNet patcher is cloned, as Forge's own extensions do, so nothing outlives this
    pass; calling it again for the same pass changes nothing."""
    objects = getattr(getattr(p, "sd_model", None), "forge_objects", None)
    unet = getattr(objects, "unet", None)
    if unet is None or nbytes <= 0 or unet.model_options.get(RESERVED):
        return
    if host.kind() == host.FORGE_CLASSIC and nbytes < CLASSIC_MIN_RESERVE:
        return
    unet = unet.clone()
    unet.add_extra_preserved_memory_during_sampling(nbytes)
    unet.model_options[RESERVED] = nbytes
    objects.unet = unet
