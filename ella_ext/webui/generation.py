"""One WebUI generation with ELLA on: the script hooks' work, and the per-call swap of the host's text context.

The state of a generation lives on the host's processing object ``p`` (attribute ``ella_generation``): the global
denoiser callback finds it through ``params.denoiser.p`` and does nothing for a generation without it. It is created
in ``process()`` and dropped in ``postprocess()``. It belongs to that ``p`` (``Generation.owner``): extensions that
copy ``p`` shallowly and call the hooks again on the copy (ADetailer calls ``postprocess(copy(p))`` and
``process(copy(p))`` between its passes) share the attribute and ``extra_generation_params``, and those hooks leave
the generation alone (a sampler run on such a copy is not conditioned either).

Host facts (AUTOMATIC1111 v1.10.1, commit 82a973c0):
- ``modules/processing.py``: per batch, ``p.prompts`` / ``p.negative_prompts`` are set, ``process_batch`` runs after
  the extra-network tags are parsed out (``p.hr_prompts`` / ``p.hr_negative_prompts`` too, for hires fix); schedules get
  ``total_steps`` (x2 for second-order samplers), the hires pass ``(first-pass total, hires total)``; the hires pass
  sets ``p.is_hr_pass`` and samples with a new sampler (a new denoiser whose ``step`` starts at 0).
- ``modules/sd_samplers_cfg_denoiser.py``: ``text_cond`` holds one row per AND sub-prompt, image by image, and
  ``text_uncond`` one per image; ``params.sigma`` one value per row of ``params.x`` (cond rows, then uncond rows);
  the schedule entry is chosen with ``denoiser.step`` (the call counter).
- ``modules/prompt_parser.py``: SDXL conditioning is a ``DictWithShape`` with ``crossattn`` and ``vector``;
  ``vector`` is ``[rows, 2816]``: CLIP-G's pooled text vector (1280 columns) first, then the six size / crop numbers'
  embeddings (6 x 256), as sgm's ``GeneralConditioner`` concatenates its embedders' vectors in order
  (``sd_models_xl.get_learned_conditioning``); Forge new's ``backend/diffusion_engine/sdxl.py`` builds the same
  ``torch.cat([clip_pooled, flat], dim=1)``, and both Forge generations hand ``vector`` to the UNet as ``y``.
- ``modules/processing.py``: each pass's sampler exists before ``process_before_every_sampling`` (``p.sampler``:
  txt2img's ``sample()`` and ``sample_hr_pass()`` create it just before the hook, img2img's ``init()`` once for all
  batches); ``sd_samplers_kdiffusion.py`` / ``sd_samplers_timesteps.py``: its ``sample`` / ``sample_img2img`` compute
  the pass's schedule (sigmas or timesteps, img2img's and the hires pass's partial one included), set up the denoiser
  (``initialize``: ``denoiser.p``, ``denoiser.step = 0``, ``k_diffusion.sampling.torch`` = the image's noise) and
  call ``sampler.func(denoiser, x, extra_args=..., disable=..., callback=..., sigmas=... | timesteps=..., ...)``
  (the same in both Forge generations); ``inspect.signature(sampler.func)`` decides which arguments it gets.
- ``modules/processing.py``: ``create_infotext`` runs for the images saved before hires fix (``save_intermediate``,
  after the first pass) and, after ``postprocess_batch``, for each image of the batch; a ``None`` value leaves the
  key out (also in Forge classic, whose ``create_infotext`` is A1111 1.8's: it does not call callable values, and
  ``Processed.js`` cannot serialise them). ``scripts/xyz_grid.py`` shallow-copies ``p`` per cell, sharing its
  ``extra_generation_params`` with the first cell.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch

from .. import options as opts_mod
from .. import sampler_probe
from ..conditioning import Conditioner
from ..errors import ELLAError, InputError
from ..options import ELLAOptions
from ..pass_plan import Foreseen, PassPlan, column_key, plan_pass
from ..pass_rows import PassTexts, assemble, has_controlnet_mark, row_timesteps
from ..prompts import MAX_EMPHASIS, WeightedText, plain_text
from . import host, infotext, neighbours, settings
from .host_context import check_pool, crossattn, family, rebuild
from .loading import LoadedModels, as_trained, check_names, llm_mismatch, manager, token_mismatch

log = logging.getLogger("ella")

ATTRIBUTE = "ella_generation"
XYZ_ATTRIBUTE = "ella_xyz"  # overrides set by the XYZ plot's axes
WATCHED = "_ella_watched"  # set on a sampler function ELLA wrapped


@dataclass
class Generation:
    options: ELLAOptions
    params: dict  # the host's p.extra_generation_params, where the info-text values go
    loaded: LoadedModels | None = None  # set once the models are loaded (before the generation is on ``p``)
    conditioner: Conditioner | None = None
    passes: dict[bool, PassTexts] = field(default_factory=dict)  # key: is the hires pass
    marked: dict[tuple[bool, str], bool] = field(default_factory=dict)
    batch: int = 0
    failed: dict[int, str] = field(default_factory=dict)  # batch number -> why ELLA stopped in it
    warnings: list[str] = field(default_factory=list)  # for every batch of the generation
    batch_warnings: dict[int, list[str]] = field(default_factory=dict)  # batch number -> for that batch only
    emphasis: str = opts_mod.EMPHASIS_ATTENTION  # the setting "Emphasis in the LLM prompt" for this generation
    calls: dict[int, int] = field(default_factory=dict)  # batch number -> calls ELLA conditioned
    foreseen: Foreseen | None = None  # the calls of the pass about to start, from a dry run of its sampler
    plan: PassPlan | None = None  # the current pass's foreseen calls, its rows arranged in the conditioner
    pass_calls: dict[str, int] = field(default_factory=lambda: {"looked up": 0, "computed at the call": 0})
    pooled: bool = False  # SDXL with a connector that has an attention pool: its vectors replace CLIP-G's
    travel: Any = None  # AnimateDiff's prompt travel (its scheduler, closed loop) for this batch, if on
    owner: Any = field(default=None, repr=False, compare=False)  # the host's p it was started on

    def release(self) -> None:
        """Drop what this generation holds (its features and rows on the GPU); ELLA does nothing more for it."""
        if self.conditioner is not None:
            self.conditioner.release()
        self.passes.clear()

    # -- info text ---------------------------------------------------------------------------------------------------

    def write_infotext(self, batch_done: bool = False) -> None:
        """The info-text values of the current batch, as plain strings in the host's ``extra_generation_params``: the
        ELLA keys once ELLA conditioned a call of it, ``ELLA error`` once it stopped. Written whenever that changes
        (batch start, first call, failure) and at ``postprocess_batch``, so any info text the host writes meanwhile
        (images saved before hires fix, the batch's images) is right. Plain strings, because Forge classic (A1111
        1.8's code) neither calls callable values nor can put them in the API's JSON."""
        conditioned = bool(self.calls.get(self.batch))
        error = self.failed.get(self.batch)
        if error is None and batch_done and not conditioned and self.passes.get(False) is not None \
                and not _interrupted():
            error = "ELLA was not called by this sampler; this batch uses CLIP"
        warnings = [*self.warnings, *self.batch_warnings.get(self.batch, [])]
        infotext.write(self.params, self.options, conditioned=conditioned, error=error, warnings=warnings,
                       emphasis=self.emphasis, pooled=self.pooled)


def _interrupted() -> bool:
    state = getattr(_shared(), "state", None)
    return bool(getattr(state, "interrupted", False) or getattr(state, "skipped", False))


def parse_options(p, args: Sequence[Any]) -> ELLAOptions:
    """The options for this generation: the script's arguments, then the XYZ plot's overrides."""
    options = opts_mod.from_script_args(args)
    overrides = getattr(p, XYZ_ATTRIBUTE, None)
    return options.replace(**overrides) if overrides else options


def chosen_fields(p, args: Sequence[Any]) -> frozenset[str] | None:
    """The fields the user chose (``options.named_fields``, plus the XYZ plot's); None: all of them."""
    named = opts_mod.named_fields(args)
    overrides = getattr(p, XYZ_ATTRIBUTE, None) or {}
    return None if named is None else named | frozenset(overrides)


def _own(p) -> Generation | None:
    """The generation ``p`` owns; None without one, and for a shallow copy of its owner (the hooks of a copy do
    nothing)."""
    generation: Generation | None = getattr(p, ATTRIBUTE, None)
    return generation if generation is not None and generation.owner is p else None


def _copy_of_running(p) -> bool:
    """Whether ``p`` is a shallow copy of the ``p`` of a generation still in progress (ADetailer re-arms the scripts
    with ``process(copy(p))`` between batches): its ``process()`` must neither clear the shared info text nor start
    another generation."""
    generation: Generation | None = getattr(p, ATTRIBUTE, None)
    return generation is not None and generation.owner is not p and manager.in_progress(generation)


def start(p, args: Sequence[Any]) -> Generation | None:
    """``process()``: read the options; if ELLA is on, load the models and attach the generation to ``p``."""
    if _copy_of_running(p):
        log.debug("ELLA: process() on a copy of a generation's p (another extension's); nothing to do")
        return None
    manager.release_stale()
    infotext.clear(p.extra_generation_params)
    try:
        options = parse_options(p, args)
    except InputError as err:
        _report(p, str(err))
        return None
    if not options.enabled:
        return None
    generation = Generation(options, p.extra_generation_params, owner=p)
    manager.generation_started(generation)  # from here on nothing is unloaded under it
    try:
        check_names(options)
        generation.emphasis = opts_mod.emphasis_mode(settings.get(settings.EMPHASIS))  # host overrides applied by now
        width = host.context_width(p.sd_model)
        if width == 0:
            raise InputError(
                "ELLA: this checkpoint is not Stable Diffusion 1.x, 2.x or XL, and ELLA's connectors only condition "
                "those UNets. Load an SD 1.5 checkpoint to use ELLA, or turn ELLA off."
            )
        loaded = generation.loaded = manager.load(options)
        # run the connector as trained: its token length and max where the request left them open (an API dict)
        options = generation.options = as_trained(options, chosen_fields(p, args), loaded.facts)
        if loaded.connector.config.out_width != width:
            made_for = family(loaded.connector.config.out_width)
            raise InputError(
                f"ELLA: the connector {options.connector} is made for {made_for} "
                f"({loaded.connector.config.out_width}-wide rows), but this checkpoint is {family(width)} "
                f"({width}-wide). Load an {made_for} checkpoint for this connector, or pick a connector made for "
                f"{family(width)}."
            )
        generation.pooled = check_pool(options.connector, loaded.connector, width)
        generation.conditioner = Conditioner(
            loaded.connector, loaded.encoder, max_length=options.fixed_length,
            cache_entries=int(settings.get("ella_tsc_cache")),
        )
        for warning in (llm_mismatch(options.connector, loaded.facts.llm, options.text_encoder),
                        token_mismatch(options.connector, options, loaded.facts)):
            if warning:
                log.warning("ELLA: %s", warning)
                generation.warnings.append(warning)
    except ELLAError as err:
        manager.generation_finished(generation)
        _report(p, str(err))
        return None
    except Exception as err:  # a bug or an unexpected host: never stop the generation for it
        manager.generation_finished(generation)
        log.exception("ELLA: could not start")
        _report(p, f"ELLA could not start ({type(err).__name__}: {err}); the image uses CLIP.")
        return None
    setattr(p, ATTRIBUTE, generation)
    return generation


def _report(p, message: str) -> None:
    log.warning("%s", message)
    p.extra_generation_params[infotext.KEY_ERROR] = infotext.without_paths(message)


def prepare_batch(p, batch_number: int) -> None:
    """``process_batch()``: the texts of this batch's passes, all encoded now (the LLM never runs per call)."""
    generation = _own(p)
    if generation is None:
        return
    generation.batch = batch_number
    generation.passes.clear()
    generation.marked.clear()
    generation.write_infotext()
    try:
        use_old = bool(getattr(getattr(_shared(), "opts", None), "use_old_scheduling", False))
        emphasis = generation.emphasis == opts_mod.EMPHASIS_ATTENTION
        first_total = host.total_steps(p.sampler_name, p.steps)
        generation.passes[False] = _pass_texts(generation.options, p.prompts, p.negative_prompts, first_total, None,
                                               use_old, emphasis)
        if getattr(p, "enable_hr", False) and generation.options.hires and getattr(p, "hr_prompts", None) is not None:
            hr_sampler = getattr(p, "hr_sampler_name", None) or p.sampler_name
            hr_total = host.total_steps(hr_sampler, getattr(p, "hr_second_pass_steps", 0) or p.steps)
            generation.passes[True] = _pass_texts(generation.options, p.hr_prompts, p.hr_negative_prompts,
                                                  first_total, hr_total, use_old, emphasis)
        texts = [t for texts in generation.passes.values() for t in texts.every_text()]
        needs_llm = generation.conditioner.needs_llm(texts)  # else no LLM move (on Forge: no memory freed for it)
        with generation.loaded.encoding() if needs_llm else contextlib.nullcontext():
            generation.conditioner.prepare(texts)
        clamped = _out_of_range([w for texts in generation.passes.values() for w in texts.out_of_range])
        generation.batch_warnings[batch_number] = [*clamped, *_truncated(generation, texts)]
        neighbours.check(generation, p)
        neighbours.find_travel(generation, p)
    except Exception as err:
        fail(generation, err)


def _shared():
    from modules import shared

    return shared


def _truncated(generation: Generation, texts: list[str | WeightedText]) -> list[str]:
    """A warning when the LLM reads only the start of a text of this batch (past the fixed length, or past the
    model's limit in flexible mode); also in the console."""
    encoder = generation.loaded.encoder
    limit = generation.options.fixed_length or encoder.token_limit
    longest = max((encoder.count_tokens(plain_text(text)) for text in texts), default=0)
    if longest <= limit:
        return []
    llm = infotext.model_name(generation.options.text_encoder)
    mode = "the fixed token length" if generation.options.fixed_length else f"the limit of {llm}"
    message = f"a prompt has {longest} LLM tokens, more than {mode} ({limit}): the LLM read only its first {limit}"
    log.warning("ELLA: %s", message)
    return [message]


def _pass_texts(options: ELLAOptions, prompts, negatives, steps: int, hires_steps: int | None, use_old: bool,
                emphasis: bool):
    return PassTexts(
        prompts, negatives, steps, hires_steps,
        llm_prompt=options.llm_prompt,
        empty_negative=options.negative == opts_mod.NEGATIVE_EMPTY,
        use_old_scheduling=use_old,
        emphasis=emphasis,
    )


def _out_of_range(weights: list[float]) -> list[str]:
    """A warning when emphasis multipliers outside [0, MAX_EMPHASIS] were clamped; also in the console."""
    if not weights:
        return []
    shown = sorted(set(weights))
    clamped = [f"{_number(w)} to {_number(min(max(w, 0.0), MAX_EMPHASIS))}" for w in shown[:4]]
    message = (f"emphasis outside 0 to {_number(MAX_EMPHASIS)} clamped ({', '.join(clamped)}"
               f"{', ...' if len(shown) > 4 else ''})")
    log.warning("ELLA: %s", message)
    return [message]


def _number(value: float) -> str:
    return f"{value:g}"


def finish_batch(p) -> None:
    """``postprocess_batch`` (before the host writes the batch's info texts): the batch's final info-text values."""
    generation = _own(p)
    if generation is not None:
        neighbours.check(generation, p)  # NegPiP writes its key in its process_batch, after ELLA's
        generation.write_infotext(batch_done=True)


def sampling_memory(p) -> int:
    """``process_before_every_sampling``: the bytes ELLA's work may take on the GPU during this pass (0 if ELLA is
    off for it): its TSC passes and the rows it keeps, those computed ahead included."""
    generation = _own(p)
    texts = None if generation is None else generation.passes.get(bool(getattr(p, "is_hr_pass", False)))
    if texts is None:
        return 0
    return generation.conditioner.working_bytes(texts.cond_rows + texts.uncond_rows, texts.max_calls,
                                                ahead_bytes=_ahead_bytes())


def _ahead_bytes() -> int:
    return max(0, int(settings.get("ella_precompute_mb"))) * 1024**2


# -- foreseeing a pass's calls -------------------------------------------------------------------------------------


def watch_sampler(p) -> None:
    """``process_before_every_sampling``: wrap this pass's sampler function so that, when the pass starts, a dry run
    of it tells which noise level each call will have (``sampler_probe``). The sampler lives for one pass (img2img:
    for the whole job); wrapping it again changes nothing."""
    generation = _own(p)
    sampler = getattr(p, "sampler", None)
    func = getattr(sampler, "func", None)
    if generation is None or not callable(func) or getattr(func, WATCHED, False) or not settings.get("ella_foresee"):
        return
    sampler.func = _watched(func)


def _watched(func):
    @functools.wraps(func)  # the host reads the sampler's parameters with inspect.signature: they stay func's
    def watched(model, x, *args, **kwargs):
        _foresee(func, model, x, args, kwargs)
        try:
            return func(model, x, *args, **kwargs)
        finally:
            _pass_done(model)

    setattr(watched, WATCHED, True)
    return watched


def _foresee(func, model, x, args, kwargs) -> None:
    """The sampler of a pass starts: record the calls it will make, for the pass's first call to plan from."""
    try:
        p = getattr(model, "p", None)
        generation = _own(p)
        if generation is None:
            return
        hires = bool(getattr(p, "is_hr_pass", False))
        texts = generation.passes.get(hires)
        generation.foreseen = None
        if texts is None or not isinstance(x, torch.Tensor):
            return
        sigmas = sampler_probe.record(func, model, x, args, kwargs, limit=4 * texts.max_calls + 16)
        if sigmas:
            generation.foreseen = Foreseen(model, sigmas, hires, generation.batch)
    except Exception:  # never stop the sampler: the pass is computed per call
        log.exception("ELLA: could not foresee this pass's calls")


def _pass_done(model) -> None:
    """The sampler of a pass returned: drop the pass's arranged rows."""
    generation = _own(getattr(model, "p", None))
    if generation is None:
        return
    log.debug("ELLA: a sampling pass ended: its calls %s", ", ".join(f"{n} {how}" for how, n in
                                                                     generation.pass_calls.items()))
    generation.pass_calls = dict.fromkeys(generation.pass_calls, 0)
    if generation.plan is not None and generation.plan.denoiser is model:
        _drop_plan(generation)


def _drop_plan(generation: Generation) -> None:
    generation.plan = None
    generation.conditioner.forget_arrangement()


def _plan(generation: Generation, texts: PassTexts, params, hires: bool, uncond_rows: int, adapter) -> PassPlan | None:
    """The pass's first call: turn what the dry run foresaw into the timestep keys of each foreseen call, and arrange
    (and, if they fit in the setting's memory, compute) every row the pass will ask for."""
    foreseen, generation.foreseen = generation.foreseen, None
    _drop_plan(generation)
    if foreseen.denoiser is not params.denoiser or foreseen.hires != hires or foreseen.batch != generation.batch:
        return None
    denoiser = params.denoiser
    try:
        plan = plan_pass(
            foreseen, texts, params.sigma, uncond_rows,
            callback_sigma=lambda sigma: adapter.callback_sigma(denoiser, sigma),
            timesteps_of=lambda column: adapter.timesteps(SimpleNamespace(denoiser=denoiser, sigma=column)),
            source=adapter.timestep_source(params),
        )
        if plan is None:
            log.info("ELLA: this pass's first call was not the one foreseen; its rows are computed per call")
            return None
        generation.conditioner.arrange(plan.calls, max_bytes=_ahead_bytes())
    except Exception as err:  # e.g. out of memory for the large passes: the calls compute their own rows
        log.warning("ELLA: could not compute this pass's rows ahead (%s: %s); computing them per call",
                    type(err).__name__, err)
        generation.conditioner.forget_arrangement()
        return None
    generation.plan = plan
    return plan


def _foreseen_keys(generation: Generation, texts: PassTexts, params, hires: bool, uncond_rows: int,
                   adapter) -> list[float] | None:
    """The timestep keys of this call's rows if the pass foresaw the call, else None (computed per call)."""
    plan = generation.plan
    if generation.foreseen is not None:
        plan = _plan(generation, texts, params, hires, uncond_rows, adapter)
    if plan is None:
        return None
    if not plan.fits(params.denoiser, hires, generation.batch, uncond_rows, adapter.timestep_source(params)):
        _drop_plan(generation)
        return None
    key = column_key(params.sigma)
    return None if key is None else plan.timesteps.get(key)


def fail(generation: Generation, err: BaseException) -> None:
    """Stop ELLA for the rest of this batch: the host's CLIP context is used, and the info text says why."""
    batch = generation.batch
    if isinstance(err, ELLAError):
        message = str(err)
        log.warning("%s", message)
    else:
        message = f"ELLA failed ({type(err).__name__}: {err})"
        log.exception("ELLA failed")
    message = message.rstrip().rstrip(".")  # the sentence goes on
    if generation.calls.get(batch):
        message += f"; CLIP conditioned this batch from sampler call {generation.calls[batch] + 1} on"
    else:
        message += "; this batch uses CLIP"
    generation.failed[batch] = message
    generation.passes.clear()
    generation.foreseen = None
    _drop_plan(generation)
    generation.write_infotext()


def on_denoiser(params, adapter) -> None:
    """The per-call swap. ``adapter`` is the host's module (``a1111`` or ``forge``): ``timesteps(params)`` maps the
    call's sigma column to DDPM timesteps, ``callback_sigma`` and ``timestep_source`` serve the foreseen calls."""
    denoiser = getattr(params, "denoiser", None)
    p = getattr(denoiser, "p", None)
    generation = _own(p)
    if generation is None:
        return
    hires = bool(getattr(p, "is_hr_pass", False))
    texts = generation.passes.get(hires)
    if texts is None:  # ELLA off for this pass, or failed in this batch
        return
    try:
        swapped = swap(generation, texts, params, hires, int(getattr(denoiser, "step", 0)), adapter)
    except Exception as err:
        fail(generation, err)
        return
    if swapped:
        neighbours.interpolate_frames(generation, p, params)


def swap(generation: Generation, texts: PassTexts, params, hires: bool, step: int, adapter) -> bool:
    """Replace the call's rows by ELLA's; False when ELLA left them to the host (a refiner switch)."""
    cond, uncond = params.text_cond, params.text_uncond
    cond_tensor = crossattn(cond)
    uncond_tensor = None if uncond is None else crossattn(uncond)
    width = generation.loaded.connector.config.out_width
    if cond_tensor.shape[-1] != width:  # the checkpoint fit at the start: the host switched it (a refiner)
        _stop_at_switch(generation, hires, cond_tensor.shape[-1], width)
        return False
    uncond_rows = 0 if uncond is None else texts.uncond_rows
    if cond_tensor.shape[0] != texts.cond_rows or (uncond_tensor is not None and uncond_tensor.shape[0] != uncond_rows):
        raise InputError(
            f"ELLA: the sampler has {cond_tensor.shape[0]} prompt rows and "
            f"{0 if uncond_tensor is None else uncond_tensor.shape[0]} negative rows, expected {texts.cond_rows} and "
            f"{uncond_rows} (another extension may have changed the batch)"
        )
    cond_texts, uncond_texts = texts.at(step)
    row_texts = [*cond_texts, *uncond_texts[:uncond_rows]]
    keys = _foreseen_keys(generation, texts, params, hires, uncond_rows, adapter)
    if keys is not None:  # a foreseen call: its rows were arranged (and usually computed) at the pass's first call
        rows = generation.conditioner.lookup(row_texts, keys)
        generation.pass_calls["looked up"] += 1
    else:
        cond_t, uncond_t = row_timesteps(adapter.timesteps(params), texts.counts, uncond_rows)
        rows = generation.conditioner(row_texts, torch.cat([cond_t, uncond_t]))
        generation.pass_calls["computed at the call"] += 1
    with_clip = generation.options.with_clip
    pooled = generation.conditioner.pooled(row_texts) if generation.pooled else None
    params.text_cond = rebuild(cond, assemble(rows[: texts.cond_rows], cond_tensor, with_clip=with_clip,
                                               marked=_marked(generation, (hires, "cond"), cond_tensor)),
                                None if pooled is None else pooled[: texts.cond_rows])
    if uncond_tensor is not None:
        params.text_uncond = rebuild(uncond, assemble(rows[texts.cond_rows :], uncond_tensor, with_clip=with_clip,
                                                       marked=_marked(generation, (hires, "uncond"), uncond_tensor)),
                                      None if pooled is None else pooled[texts.cond_rows :])
    calls = generation.calls[generation.batch] = generation.calls.get(generation.batch, 0) + 1
    if calls == 1:
        generation.write_infotext()
    return True


def _stop_at_switch(generation: Generation, hires: bool, host_width: int, width: int) -> None:
    """A1111's refiner switch (``refiner_checkpoint`` / ``refiner_switch_at``) loaded a checkpoint whose text context
    the connector does not fit (an SDXL refiner takes 1280 wide, SD 1.5 768): the rest of this pass is left to that
    checkpoint's own conditioning, and the info text says where ELLA stopped. A refiner of the same width (another
    checkpoint of the same family) keeps ELLA's rows: the connector fits it as it fits any fine-tune."""
    info = getattr(generation.owner, "refiner_checkpoint_info", None)
    name = getattr(info, "short_title", None) or getattr(info, "title", None)
    what = f"the refiner {name}" if name else "the checkpoint the WebUI switched to"
    conditioned = generation.calls.get(generation.batch, 0)
    calls = f"{conditioned} sampler call{'' if conditioned == 1 else 's'}"
    message = (f"ELLA stopped at the refiner switch{' of the hires pass' if hires else ''}: {what} takes "
               f"{host_width}-wide text conditioning, the connector makes {width}; ELLA conditioned {calls} before "
               "it, the refiner's own CLIP the rest")
    log.warning("%s", message)  # as the info text's ELLA warning (or error), in the console too
    generation.passes.pop(hires, None)
    _drop_plan(generation)
    if not conditioned:  # the switch came first: nothing of this batch is ELLA's
        generation.failed[generation.batch] = message
    else:  # once per pass: the pass's texts are dropped above
        generation.batch_warnings.setdefault(generation.batch, []).append(message)
    generation.write_infotext()


def _marked(generation: Generation, key: tuple[bool, str], context: torch.Tensor) -> bool:
    """Whether the rows carry ControlNet's marker token, checked once per pass for cond and uncond (one GPU read)."""
    found = generation.marked.get(key)
    if found is None:
        found = generation.marked[key] = has_controlnet_mark(context)
    return found


def finish(p) -> None:
    """``postprocess()``: drop the generation's state; the models may be unloaded from now on. Not on a copy of
    ``p`` (ADetailer calls ``postprocess(copy(p))`` before its passes): the generation goes on."""
    generation = _own(p)
    if generation is None:
        return
    generation.release()
    with contextlib.suppress(AttributeError):
        delattr(p, ATTRIBUTE)
    manager.generation_finished(generation)
