"""Other extensions whose combination with ELLA needs a word: each is detected from what it writes on ``p`` when it
is active, and ELLA adds an ``ELLA warning`` (once per generation, also in the console) saying what happens.

The checks come from reading those extensions' code (the commits named below), and each message was then seen in a
real A1111 1.10.1 with the extension installed at that commit, with what reached the UNet measured (README: "With other
extensions").

Script order: A1111 runs the scripts of its extensions in the order of their folder names (ELLA's is typically
``sd-webui-ella``), so ``adetailer``, ``multidiffusion-upscaler-for-automatic1111`` and ``sd-webui-cutoff`` run their
``process()`` before ELLA's, ``sd-webui-regional-prompter`` after it (but before every ``process_batch``), and
``sd-webui-negpip`` writes its key in its own ``process_batch``, after ELLA's. So :func:`check` runs at ELLA's
``process_batch`` (every ``process()`` has run) and again at its ``postprocess_batch`` (every ``process_batch`` has
run), before the host writes the batch's info texts; a folder named otherwise changes the order, not the result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .host_context import crossattn

log = logging.getLogger("ella")

# ADetailer (Bing-su/adetailer 36189cbe): its setting "Script names to apply to ADetailer" (``ad_script_names``) and
# its default (``adetailer/args.py``): with "Apply only selected scripts" (``ad_only_selected_scripts``, default on),
# its inpaint passes run only the always-on scripts whose file stem is listed (ELLA's: ``ella``).
AD_SCRIPT_NAMES_DEFAULT = "dynamic_prompting,dynamic_thresholding,lora_block_weight,negpip,wildcard_recursive,wildcards"
ADETAILER_WARNING = ("ADetailer's inpaint passes use CLIP (not ELLA): to have ELLA condition them, add ella to "
                     "Settings > ADetailer > Script names to apply to ADetailer")
# Regional Prompter (hako-mikan/sd-webui-regional-prompter be623452): ``process()`` writes "RP Active",
# "RP Calc Mode" (Attention / Latent) and "RP Divide mode" (Matrix / Mask / Prompt).
RP_ADVICE = "use Regional Prompter's Latent mode (Matrix or Mask), or turn ELLA off for regional prompts"
RP_ATTENTION_WARNING = ("Regional Prompter's Attention mode splits the context into CLIP's 75-token chunks, one range "
                        "per region, which ELLA's rows do not have, so every region sees the whole prompt: "
                        f"{RP_ADVICE}")
RP_PROMPT_WARNING = ("Regional Prompter's Prompt mode finds its regions at the target words' CLIP token positions, "
                     "which ELLA's rows do not have, so its regions do not follow those words: "
                     f"{RP_ADVICE}")
# Cutoff (hnmr293/sd-webui-cutoff 33f102c0): ``process()`` hooks CLIP's output and writes "Cutoff enabled".
CUTOFF_WARNING = ("Cutoff edits CLIP's output, which ELLA replaces: it has no effect on ELLA's rows (with ELLA + CLIP, "
                  "only on CLIP's part)")
# NegPiP (hako-mikan/sd-webui-negpip dc75fd2c): its ``process_batch`` removes the negative-weight terms from the
# prompts, encodes them with CLIP, adds them to the cross-attention context and writes "NegPiP Active".
NEGPIP_WARNING = ("NegPiP's negative weights apply to CLIP tokens only (it appends those terms' CLIP tokens to ELLA's "
                  "context itself): ELLA reads the prompt with negative weights as 0")
# Tiled Diffusion (pkuliyi2015/multidiffusion-upscaler-for-automatic1111 22798f68): ``process()`` writes the dict
# "Tiled Diffusion", with "Region control" in it when region control is on.
TILED_DIFFUSION_WARNING = ("Tiled Diffusion's region control conditions its regions with CLIP (it encodes their "
                           "prompts itself), while the rest of the image gets ELLA's rows: turn region control off, or "
                           "ELLA, to condition the whole image one way")


# AnimateDiff (continue-revolution/sd-webui-animatediff a88e8891): with prompt travel (lines "N: text") every frame
# gets the prompt of the keyframe before it, and AnimateDiff's cfg_denoiser callback hands the UNet each frame's row
# interpolated (slerp) between the rows of the keyframes around it, computed once from CLIP's first-step rows and held
# for every step. ELLA's rows change with the timestep, so ELLA applies the same interpolation to its own rows at every
# call, with AnimateDiff's own scheduler (its script's arguments on ``p``).
ANIMATEDIFF_AND_WARNING = ("AnimateDiff's prompt travel interpolates one row per frame, and this prompt has AND "
                           "parts: ELLA's rows were not interpolated between keyframes")


def animatediff_travel(p):
    """``(scheduler, closed_loop)`` of AnimateDiff's prompt travel for ``p`` when it is on, else None."""
    runner = getattr(p, "scripts", None)
    for script in getattr(runner, "alwayson_scripts", None) or []:
        title = getattr(script, "title", None)
        if not callable(title) or str(title()).lower() != "animatediff":
            continue
        args = getattr(p, "script_args", None) or ()
        index = getattr(script, "args_from", None)
        params = args[index] if isinstance(index, int) and 0 <= index < len(args) else None
        scheduler = getattr(params, "prompt_scheduler", None)
        if not getattr(params, "enable", False) or getattr(scheduler, "prompt_map", None) is None:
            return None
        # AnimateDiff closes the loop of its prompt schedule in its context-window modes "R+P" and "A" only
        closed = params.video_length > params.batch_size and params.closed_loop in ("R+P", "A")
        return scheduler, closed
    return None


def find_travel(generation, p) -> None:
    """At the start of each batch (AnimateDiff set its scheduler up in its ``before_process``): remember its prompt
    travel on the generation, for :func:`interpolate_frames` at every call. Never raises."""
    try:
        generation.travel = animatediff_travel(p)
    except Exception:
        log.exception("ELLA: could not read AnimateDiff's prompt travel")
        generation.travel = None


def interpolate_frames(generation, p, params) -> None:
    """After ELLA's swap: AnimateDiff's prompt-travel interpolation applied to ELLA's prompt rows (one per frame).
    Never raises: a failure is logged and the rows are left as ELLA made them, with a warning."""
    if generation.travel is None:
        return
    scheduler, closed = generation.travel
    try:
        cond = params.text_cond
        rows = crossattn(cond).shape[0]
        if rows != getattr(p, "batch_size", rows):
            _warn_once(generation, ANIMATEDIFF_AND_WARNING)
            return
        params.text_cond = scheduler.multi_cond(cond, closed)
    except Exception as err:
        log.exception("ELLA: AnimateDiff's prompt-travel interpolation failed")
        _warn_once(generation, f"AnimateDiff's prompt-travel interpolation of ELLA's rows failed "
                               f"({type(err).__name__}: {err}): each frame got its keyframe's rows")


def _warn_once(generation, warning: str) -> None:
    if warning not in generation.warnings:
        log.warning("ELLA: %s", warning)
        generation.warnings.append(warning)
        generation.write_infotext()


def check(generation, p) -> None:
    """Every check, for this generation's ``p``: each warning is added once per generation (``generation.warnings``,
    shown in every batch's info text) and logged. Never raises: a check that fails is logged and skipped."""
    params = getattr(p, "extra_generation_params", None) or {}
    for name, found in CHECKS:
        try:
            warning = found(p, params)
        except Exception:
            log.exception("ELLA: the check for %s failed", name)
            continue
        if warning and warning not in generation.warnings:
            log.warning("ELLA: %s", warning)
            generation.warnings.append(warning)


def _on(value) -> bool:
    return value is True or str(value).strip().lower() == "true"


def _adetailer(p, params: dict) -> str | None:
    """ADetailer will inpaint this generation's images without ELLA. Its ``process()`` writes its keys (or sets
    ``_ad_disabled``)."""
    if "ADetailer version" not in params or getattr(p, "_ad_disabled", False):
        return None
    data = getattr(getattr(_shared(), "opts", None), "data", None) or {}
    names = {name.strip() for name in str(data.get("ad_script_names", AD_SCRIPT_NAMES_DEFAULT)).split(",")}
    if not data.get("ad_only_selected_scripts", True) or "ella" in names:
        return None
    return ADETAILER_WARNING


def _regional_prompter(p, params: dict) -> str | None:
    """Regional Prompter in Attention mode, or in Prompt mode (masks from CLIP's attention maps of target words)."""
    if not _on(params.get("RP Active", False)):
        return None
    if str(params.get("RP Divide mode", "")).strip() == "Prompt":
        return RP_PROMPT_WARNING
    if str(params.get("RP Calc Mode", "")).strip() == "Attention":
        return RP_ATTENTION_WARNING
    return None


def _cutoff(p, params: dict) -> str | None:
    return CUTOFF_WARNING if _on(params.get("Cutoff enabled", False)) else None


def _negpip(p, params: dict) -> str | None:
    return NEGPIP_WARNING if _on(params.get("NegPiP Active", False)) else None


def _tiled_diffusion(p, params: dict) -> str | None:
    info = params.get("Tiled Diffusion")
    return TILED_DIFFUSION_WARNING if isinstance(info, dict) and "Region control" in info else None


CHECKS: list[tuple[str, Callable]] = [
    ("ADetailer", _adetailer),
    ("Regional Prompter", _regional_prompter),
    ("Cutoff", _cutoff),
    ("NegPiP", _negpip),
    ("Tiled Diffusion", _tiled_diffusion),
]


def _shared():
    from modules import shared

    return shared
