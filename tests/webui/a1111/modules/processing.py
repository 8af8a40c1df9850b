"""Imitates ``modules/processing.py`` (A1111 v1.10.1) as far as an always-on script sees it:

``process_images_inner``: ``scripts.process`` once; per batch ``n``: ``p.iteration = n``, ``p.prompts`` /
``p.negative_prompts`` sliced from ``all_prompts``, ``before_process_batch`` (tags still in the prompts),
``parse_extra_network_prompts`` (tags removed; for hires fix also from ``hr_prompts``), ``process_batch``,
``setup_conds``, ``state.job = "Batch n+1 out of n_iter"`` when ``n_iter > 1`` (the running job's name
changes mid-job), then ``p.sample``: txt2img creates its sampler (``p.sampler = create_sampler(...)``) and draws
``x = p.rng.next()`` before ``process_before_every_sampling``, img2img created its sampler once in ``init()`` (before
the batches) and samples from ``init_latent`` with ``p.rng.next()`` as noise; then for txt2img with hires fix
``sample_hr_pass``: ``is_hr_pass = True``, ``save_intermediate`` per image (``create_infotext`` for an image saved
before hires fix, when that setting is on; the double always makes it), a new sampler in ``p.sampler``
(``hr_sampler_name`` or the first pass's), the hires conds, ``before_hr``, ``process_before_every_sampling`` again,
``sample_img2img(steps=hr_second_pass_steps or steps)``, ``p.sampler = None``, ``is_hr_pass = False``; then
``postprocess_batch`` and ``create_infotext`` per image; at the end ``scripts.postprocess``, and the API or the UI
answers with ``Processed.js()`` (JSON; a value it cannot hold becomes null). ``p.rng`` (``rng.ImageRNG``, one per
batch) is a seeded stand-in here.
``create_infotext``: a list value is indexed by the image, a callable gets the function's locals (``p``, ``index``).
``process_images`` applies ``p.override_settings`` (the API's ``override_settings``, the UI's "Override settings", the
XYZ plot's setting axes) with ``opts.set`` before anything else runs, and restores the previous values afterwards
(``override_settings_restore_afterwards``, True by default).

The double's "CLIP" gives each text a fixed pseudo-random ``[77 * k, C]`` tensor (``k`` = 75-token chunks, one per 75
words); SDXL rows are ``{"crossattn", "vector"}``. With ``controlnet=True`` every row gets sd-webui-controlnet's
marker token first (``scripts/hook.py`` ``mark_prompt_context``: +1024 for cond rows, -1024 for uncond rows).
"""

import contextlib
import json
import re
import zlib

import torch

from modules import devices, sd_models, sd_samplers, shared

re_extra_net = re.compile(r"<(\w+):([^>]+)>")  # host: modules/extra_networks.py
re_AND = re.compile(r"\bAND\b")  # host: modules/prompt_parser.py


def fake_clip(text, width, sign=0.0):  # double-only: the stand-in for CLIP (see the docstring)
    chunks = 1 + len(text.split()) // 75
    generator = torch.Generator().manual_seed(zlib.crc32(text.encode()))
    rows = torch.randn(77 * chunks, width, generator=generator)
    if sign:
        rows = torch.cat([torch.full((1, width), 1024.0 * sign), rows])
    return rows


def conditioning_row(sd_model, text, sign=0.0):  # double-only: one prompt's conditioning from the stand-in CLIP
    width = sd_model.context_width
    crossattn = fake_clip(text, width, sign).to(devices.dtype_unet)  # the model's dtype: fp16, or fp32 (--no-half)
    if getattr(sd_model, "is_sdxl", False):
        generator = torch.Generator().manual_seed(zlib.crc32(text.encode()) + 1)
        vector = torch.randn(getattr(sd_model, "vector_width", 2816), generator=generator)  # a refiner's: 2560
        return {"crossattn": crossattn, "vector": vector.to(devices.dtype_unet)}
    return crossattn


class ImageRNG:  # host: modules/rng.py
    """Stands in for ``modules/rng.py`` ``ImageRNG``: ``next()`` gives the next noise for the batch's images."""

    # double-simplified: one generator seeded with the batch's first seed; no subseeds, variation strength or
    # seed resizing (the host draws each image's noise from its own seed and subseed)
    def __init__(self, shape, seeds):
        self.shape = shape
        self.generator = torch.Generator().manual_seed(int(seeds[0]) if seeds else 0)

    def next(self):
        return torch.randn(self.shape, generator=self.generator)


LATENT = (4, 8, 8)  # double-only: the double's latent shape per image (the host's comes from width, height, model)


class Processed:
    # double-simplified: built from p and the info texts only (no images, seeds or comments to carry)
    def __init__(self, p, infotexts):
        self.infotexts = infotexts
        self.info = infotexts[0] if infotexts else ""
        self.extra_generation_params = p.extra_generation_params

    def js(self):
        """``Processed.js``: the API's ``info``; a value JSON cannot hold becomes null."""
        return json.dumps({"extra_generation_params": self.extra_generation_params, "infotexts": self.infotexts},
                          default=lambda o: None)


class StableDiffusionProcessing:
    is_img2img = False  # double-only: which pass process_images runs (the host tells them apart by class)

    # double-simplified: the host's is a dataclass of ~45 fields; this takes what the tests set, keyword-only, plus
    # script_args (set by the host's UI/API code), controlnet (the double's sd-webui-controlnet marker switch) and
    # the hires fix's fields (enable_hr, hr_*: the host's are StableDiffusionProcessingTxt2Img's)
    def __init__(self, prompt, negative_prompt="", *, batch_size=1, n_iter=1, steps=4, sampler_name="Euler",
                 cfg_scale=7.0, script_args=(), enable_hr=False, hr_second_pass_steps=0, hr_prompt="",
                 hr_negative_prompt="", hr_sampler_name=None, denoising_strength=0.5, controlnet=False, seed=1,
                 scheduler="Automatic", hr_scheduler=None, override_settings=None, refiner_checkpoint=None,
                 refiner_switch_at=None):
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        self.batch_size = batch_size
        self.n_iter = n_iter
        self.steps = steps
        self.sampler_name = sampler_name
        self.cfg_scale = cfg_scale
        self.script_args = tuple(script_args)
        self.enable_hr = enable_hr
        self.hr_second_pass_steps = hr_second_pass_steps
        self.hr_prompt = hr_prompt
        self.hr_negative_prompt = hr_negative_prompt
        self.hr_sampler_name = hr_sampler_name
        self.denoising_strength = denoising_strength
        self.controlnet = controlnet
        self.scheduler = scheduler
        self.hr_scheduler = hr_scheduler
        self.eta = None
        self.sampler = None
        self.rng = None
        self.seeds = [seed + i for i in range(batch_size)]
        self.override_settings = dict(override_settings or {})
        self.refiner_checkpoint = refiner_checkpoint
        self.refiner_switch_at = refiner_switch_at
        self.refiner_checkpoint_info = None
        self.extra_generation_params = {}
        self.is_hr_pass = False
        self.iteration = 0
        self.denoisers = []  # every sampler's CFG denoiser, in order (first pass, hires pass, next batch...)
        self.before_hires_infotexts = []  # what save_intermediate writes for the images saved before hires fix
        total = batch_size * n_iter
        self.all_prompts = prompt if isinstance(prompt, list) else [prompt] * total
        self.all_negative_prompts = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt] * total
        self.all_hr_prompts = [hr_prompt or p for p in self.all_prompts]
        self.all_hr_negative_prompts = [hr_negative_prompt or n for n in self.all_negative_prompts]
        self.hr_prompts = self.hr_negative_prompts = None

    @property
    def sd_model(self):  # the loaded checkpoint, whichever it is now (a refiner switch changes it)
        return shared.sd_model

    @sd_model.setter
    def sd_model(self, value):
        pass

    def parse_extra_network_prompts(self):
        self.prompts = [re_extra_net.sub("", x) for x in self.prompts]
        if self.enable_hr and not self.is_img2img:
            n, size = self.iteration, self.batch_size
            self.hr_prompts = [re_extra_net.sub("", x) for x in self.all_hr_prompts[n * size:(n + 1) * size]]
            self.hr_negative_prompts = self.all_hr_negative_prompts[n * size:(n + 1) * size]

    def _conds(self, prompts, negatives):
        mark = 1.0 if self.controlnet else 0.0
        c = [[conditioning_row(self.sd_model, part, mark) for part in re_AND.split(text)] for text in prompts]
        uc = [conditioning_row(self.sd_model, text, -mark) for text in negatives]
        return c, uc

    def setup_conds(self):
        self.c, self.uc = self._conds(self.prompts, self.negative_prompts)

    def get_conds(self):
        return self.c, self.uc


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    def calculate_hr_conds(self):  # Txt2Img's only, as in the host (modules/processing.py line 1499)
        self.hr_c, self.hr_uc = self._conds(self.hr_prompts, self.hr_negative_prompts)

    def setup_conds(self):
        if self.is_hr_pass:  # a refiner switch in the hires pass: only the hires conds are made again
            self.calculate_hr_conds()
            return
        super().setup_conds()

    def get_conds(self):
        if self.is_hr_pass:
            return self.hr_c, self.hr_uc
        return super().get_conds()


class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    is_img2img = True  # double-only: see StableDiffusionProcessing


# double-simplified: the image's index only; the host also takes the prompts, seeds and batch position
def create_infotext(p, index):
    params = {"Steps": p.steps, "Sampler": p.sampler_name, **p.extra_generation_params}
    iteration = p.iteration  # noqa: F841 - part of the locals a callable value receives, as in the host
    for key, value in list(params.items()):
        if isinstance(value, list):
            params[key] = value[index]
        elif callable(value):
            params[key] = value(**locals())
    return ", ".join(f"{k}: {v}" for k, v in params.items() if v is not None)


@contextlib.contextmanager
def _overridden_settings(p):
    opts = shared.opts
    stored = {key: opts.data[key] for key in p.override_settings if key in opts.data}
    for key, value in p.override_settings.items():
        opts.set(key, value, is_api=True, run_callbacks=False)
    try:
        yield
    finally:
        for key, value in stored.items():
            setattr(opts, key, value)


def process_images(p, runner):  # double-simplified: the scripts' runner is passed in (the host's is p.scripts)
    with _overridden_settings(p):
        return _process_images_inner(p, runner)


def _process_images_inner(p, runner):
    if p.refiner_checkpoint not in (None, "", "None", "none"):
        p.refiner_checkpoint_info = sd_models.get_closet_checkpoint_match(p.refiner_checkpoint)
        if p.refiner_checkpoint_info is None:
            raise Exception(f"Could not find checkpoint with name {p.refiner_checkpoint}")
    runner.call("process", p)
    infotexts = []
    size = p.batch_size
    if p.is_img2img:  # StableDiffusionProcessingImg2Img.init: one sampler for every batch
        p.sampler = sd_samplers.create_sampler(p.sampler_name, p.sd_model)
        p.init_latent = torch.zeros(size, *LATENT)
    for n in range(p.n_iter):
        p.iteration = n
        sd_models.reload_model_weights()  # the host: "model can be changed for example by refiner"
        p.prompts = p.all_prompts[n * size:(n + 1) * size]
        p.negative_prompts = p.all_negative_prompts[n * size:(n + 1) * size]
        p.rng = ImageRNG((size, *LATENT), p.seeds)
        runner.call("before_process_batch", p, batch_number=n, prompts=p.prompts, seeds=[], subseeds=[])
        p.parse_extra_network_prompts()
        runner.call("process_batch", p, batch_number=n, prompts=p.prompts, seeds=[], subseeds=[])
        p.setup_conds()
        if p.n_iter > 1:  # the host renames the running job per batch
            shared.state.job = f"Batch {n + 1} out of {p.n_iter}"
        with devices.autocast():  # the host: p.sample (the hires pass included) inside devices.autocast()
            samples, x = _sample(p, runner, n, size)
        runner.call("postprocess_batch", p, images=x, batch_number=n)
        infotexts += [create_infotext(p, n * size + i) for i in range(size)]
    processed = Processed(p, infotexts)
    runner.call("postprocess", p, processed)
    processed.js()  # the API and the UI both answer with it
    return processed


def _sample(p, runner, n, size):
    if p.is_img2img:
        x = p.rng.next()
        runner.call("process_before_every_sampling", p, x=p.init_latent, noise=x, c=p.c, uc=p.uc)
        p.denoisers.append(p.sampler.model_wrap_cfg)
        samples = p.sampler.sample_img2img(p, p.init_latent, x, p.c, p.uc)
    else:
        p.sampler = sd_samplers.create_sampler(p.sampler_name, p.sd_model)
        x = p.rng.next()
        runner.call("process_before_every_sampling", p, x=x, noise=x, c=p.c, uc=p.uc)
        p.denoisers.append(p.sampler.model_wrap_cfg)
        samples = p.sampler.sample(p, x, p.c, p.uc)
    if p.enable_hr and not p.is_img2img:
        p.is_hr_pass = True
        p.before_hires_infotexts += [create_infotext(p, n * size + i) for i in range(size)]  # save_intermediate
        p.rng = ImageRNG((size, *LATENT), p.seeds)
        noise = p.rng.next()
        p.sampler = sd_samplers.create_sampler(p.hr_sampler_name or p.sampler_name, p.sd_model)
        p.denoisers.append(p.sampler.model_wrap_cfg)
        p.calculate_hr_conds()
        runner.call("before_hr", p)
        runner.call("process_before_every_sampling", p, x=samples, noise=noise, c=p.hr_c, uc=p.hr_uc)
        p.sampler.sample_img2img(p, samples, noise, p.hr_c, p.hr_uc, steps=p.hr_second_pass_steps or p.steps)
        p.sampler = None
        p.is_hr_pass = False
    return samples, x
