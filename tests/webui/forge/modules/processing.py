"""Imitates ``modules/processing.py`` of Forge (classic and new) as far as an always-on script sees it. Forge kept
A1111's flow (the A1111 double's classes and CLIP stand-in are reused) and adds:

- per batch, ``sd_model.forge_objects = forge_objects_original.shallow_copy()`` before the prompts are set; after
  the extra networks are activated, ``forge_objects = forge_objects_after_applying_lora.shallow_copy()`` (Forge's
  LoRA stores its patched UNet clone in ``forge_objects_after_applying_lora``);
- ``sample_hr_pass`` writes the info text of images saved before hires fix (``save_intermediate``) before its hooks,
  as A1111 does;
- before every ``process_before_every_sampling``, ``forge_objects`` is again a shallow copy of
  ``forge_objects_after_applying_lora``; new calls that hook twice in the hires pass: once before the reset (after
  ``before_hr``) and once after it;
- the sampler's ``sample`` / ``sample_img2img`` start with ``sampling_prepare(forge_objects.unet, x)`` (the double
  calls it just before them); samplers are created (``p.sampler``) and ``p.rng`` drawn as in A1111 (txt2img before
  the hook, img2img once in ``init()``);
- classic's ``create_infotext`` and ``Processed.js`` are A1111 1.8's: a callable value is neither called nor
  serialisable (the API answers HTTP 500);
- new: ``uc = None`` when ``cfg_scale == 1`` and ``hr_uc = None`` when ``hr_cfg == 1``; ``hr_cfg`` is the hires
  pass's CFG scale (``CFGDenoiser.forward``);
- ``process_images`` applies ``p.override_settings`` as A1111 does (classic: ``opts.set`` per key; new:
  ``set_config(p.override_settings, is_api=True, run_callbacks=False, save_config=False)``), restoring them after.
"""

import json

import torch
from hostlayers import a1111_module

from modules import sd_samplers, shared
from modules.sd_samplers_cfg_denoiser import NEW

base = a1111_module("processing")
fake_clip, conditioning_row, ImageRNG, LATENT = base.fake_clip, base.conditioning_row, base.ImageRNG, base.LATENT


# double-simplified: the image's index only; the host also takes the prompts, seeds and batch position
def create_infotext(p, index):
    """New: A1111 1.10's. Classic (A1111 1.8's code): values are written as they are, a callable included."""
    if NEW:
        return base.create_infotext(p, index)
    params = {"Steps": p.steps, "Sampler": p.sampler_name, **p.extra_generation_params}
    return ", ".join(f"{k}: {v}" for k, v in params.items() if v is not None)


class Processed(base.Processed):
    def js(self):
        """New: as A1111 1.10. Classic: ``json.dumps(obj)`` with no fallback, so a callable value raises."""
        if NEW:
            return super().js()
        return json.dumps({"extra_generation_params": self.extra_generation_params, "infotexts": self.infotexts})


class StableDiffusionProcessing(base.StableDiffusionProcessing):
    # double-simplified: the A1111 double's keywords plus hr_cfg (new's Txt2Img field, line 1202; classic has none)
    def __init__(self, prompt, negative_prompt="", *, hr_cfg=None, **kwargs):
        super().__init__(prompt, negative_prompt, **kwargs)
        self.hr_cfg = self.cfg_scale if hr_cfg is None else hr_cfg

    def setup_conds(self):
        super().setup_conds()
        if NEW and self.cfg_scale == 1:
            self.uc = None


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing, base.StableDiffusionProcessingTxt2Img):
    def calculate_hr_conds(self):  # Txt2Img's only, as in both hosts (classic line 1431, new line 1575)
        super().calculate_hr_conds()
        if NEW and self.hr_cfg == 1:
            self.hr_uc = None


class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    is_img2img = True  # double-only: which pass process_images runs (the host tells them apart by class)


def _activate_extra_networks(p):
    """Forge's LoRA: a prompt with a ``<lora:...>`` tag gets a patched UNet clone; without one, the original's."""
    sd_model = p.sd_model
    unet = sd_model.forge_objects_original.unet
    if any(base.re_extra_net.search(x) for x in p.all_prompts):
        unet = unet.clone()
        unet.lora_patches = {"lora": "patches"}
    sd_model.forge_objects_after_applying_lora = sd_model.forge_objects_original.shallow_copy()
    sd_model.forge_objects_after_applying_lora.unet = unet


def _reset_forge_objects(p):
    p.sd_model.forge_objects = p.sd_model.forge_objects_after_applying_lora.shallow_copy()


def _sample(p, x, noise, c, uc, **kwargs):
    from forge_common import sampling_prepare

    from modules import devices

    manager = getattr(devices, "memory_management", None) or devices.model_management  # new, classic
    sampling_prepare(manager, p.sd_model.forge_objects.unet)
    if kwargs or p.is_img2img:
        return p.sampler.sample_img2img(p, x, noise, c, uc, **kwargs)
    return p.sampler.sample(p, x, c, uc)


def process_images(p, runner):  # double-simplified: the scripts' runner is passed in (the host's is p.scripts)
    with base._overridden_settings(p):
        return _process_images_inner(p, runner)


def _process_images_inner(p, runner):
    runner.call("process", p)
    infotexts = []
    size = p.batch_size
    sd_model = p.sd_model
    if p.is_img2img:  # init(): one sampler for every batch
        p.sampler = sd_samplers.create_sampler(p.sampler_name, sd_model)
        p.init_latent = torch.zeros(size, *LATENT)
    for n in range(p.n_iter):
        p.iteration = n
        sd_model.forge_objects = sd_model.forge_objects_original.shallow_copy()
        p.prompts = p.all_prompts[n * size:(n + 1) * size]
        p.negative_prompts = p.all_negative_prompts[n * size:(n + 1) * size]
        p.rng = ImageRNG((size, *LATENT), p.seeds)
        runner.call("before_process_batch", p, batch_number=n, prompts=p.prompts, seeds=[], subseeds=[])
        p.parse_extra_network_prompts()
        _activate_extra_networks(p)
        _reset_forge_objects(p)
        runner.call("process_batch", p, batch_number=n, prompts=p.prompts, seeds=[], subseeds=[])
        p.setup_conds()
        if p.n_iter > 1:  # the host renames the running job per batch
            shared.state.job = f"Batch {n + 1} out of {p.n_iter}"
        if not p.is_img2img:
            p.sampler = sd_samplers.create_sampler(p.sampler_name, sd_model)
        x = p.rng.next()
        p.denoisers.append(p.sampler.model_wrap_cfg)
        _reset_forge_objects(p)
        if p.is_img2img:
            runner.call("process_before_every_sampling", p, x=p.init_latent, noise=x, c=p.c, uc=p.uc)
            samples = _sample(p, p.init_latent, x, p.c, p.uc)
        else:
            runner.call("process_before_every_sampling", p, x=x, noise=x, c=p.c, uc=p.uc)
            samples = _sample(p, x, x, p.c, p.uc)
        if p.enable_hr and not p.is_img2img:
            p.is_hr_pass = True
            p.before_hires_infotexts += [create_infotext(p, n * size + i) for i in range(size)]  # save_intermediate
            p.sampler = sd_samplers.create_sampler(p.hr_sampler_name or p.sampler_name, sd_model)
            p.denoisers.append(p.sampler.model_wrap_cfg)
            p.rng = ImageRNG((size, *LATENT), p.seeds)
            noise = p.rng.next()
            p.calculate_hr_conds()
            runner.call("before_hr", p)
            if NEW:
                runner.call("process_before_every_sampling", p, x=samples, noise=noise, c=p.hr_c, uc=p.hr_uc)
            _reset_forge_objects(p)
            runner.call("process_before_every_sampling", p, x=samples, noise=noise, c=p.hr_c, uc=p.hr_uc)
            _sample(p, samples, noise, p.hr_c, p.hr_uc, steps=p.hr_second_pass_steps or p.steps)
            p.sampler = None
            p.is_hr_pass = False
        runner.call("postprocess_batch", p, images=x, batch_number=n)
        infotexts += [create_infotext(p, n * size + i) for i in range(size)]
    processed = Processed(p, infotexts)
    runner.call("postprocess", p, processed)
    processed.js()
    return processed
