"""The "ELLA" section of the WebUI's settings, and reads of it that fall back to the defaults.

Host facts (A1111 v1.10.1 ``modules/options.py``, ``modules/shared.py``): ``shared.opts.add_option(key,
shared.OptionInfo(default, label, component, component_args, section=(key, label)))`` inside an ``on_ui_settings``
callback; ``getattr(shared.opts, key)`` returns the default until the user changes it.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import options
from ..connector_file import TrainingFacts
from .infotext import KEY_EMPHASIS

SECTION = ("ella", "ELLA")
EMPHASIS = "ella_emphasis"  # "Emphasis in the LLM prompt": options.EMPHASIS_MODES

LLM_DTYPES = ("auto", "fp16", "bf16", "fp32")
LLM_DEVICES = ("GPU", "CPU")

DEFAULTS: dict[str, Any] = {
    "ella_models_dir": "",
    "ella_llm_dtype": "auto",
    "ella_llm_device": "GPU",
    "ella_keep_llm_on_gpu": False,
    "ella_encoding_cache": 256,
    "ella_tsc_cache": 1024,
    "ella_precompute_mb": 256,
    "ella_foresee": True,
    "ella_unload_minutes": 15,
    "ella_allow_download": True,
    "ella_allow_paths": False,
    EMPHASIS: options.EMPHASIS_ATTENTION,
}


def get(key: str) -> Any:
    """A setting's value, or its default when the host has no such option (yet)."""
    from modules import shared

    opts = getattr(shared, "opts", None)
    value = getattr(opts, key, None) if opts is not None else None
    return DEFAULTS[key] if value is None else value


def llm_dtype(run_device: torch.device, facts: TrainingFacts | None = None) -> torch.dtype:
    """The LLM's dtype for a connector: the setting when the user chose one (fp16, bf16, fp32); "auto" is the
    connector's (``TrainingFacts.llm_dtype``): on CUDA the dtype its features had in training (fp16 when its file does
    not say, as the official one's), fp32 on the CPU and elsewhere."""
    choice = get("ella_llm_dtype")
    if choice == "fp16":
        return torch.float16
    if choice == "bf16":
        return torch.bfloat16
    if choice == "fp32":
        return torch.float32
    return (facts or TrainingFacts()).llm_dtype(run_device)


def on_ui_settings() -> None:
    import gradio as gr
    from modules import shared

    def add(key: str, label: str, component=None, component_args=None, info: str | None = None, **extra) -> None:
        option = shared.OptionInfo(DEFAULTS[key], label, component, component_args, section=SECTION, **extra)
        if info and hasattr(option, "info"):
            option = option.info(info)
        shared.opts.add_option(key, option)

    add("ella_models_dir", "ELLA models folder", info="empty: <models>/ELLA; text encoders in its text_encoders/")
    add("ella_llm_dtype", "LLM precision", gr.Radio, {"choices": list(LLM_DTYPES)},
        info="auto: on a GPU, the precision the connector's LLM features were trained with (fp16 for the "
             "official one; its file says), fp32 on a CPU")
    add("ella_llm_device", "Run the LLM on", gr.Radio, {"choices": list(LLM_DEVICES)},
        info="CPU saves about 2.4 GB of GPU memory; encoding is slower but happens once per prompt")
    add("ella_keep_llm_on_gpu", "Keep the LLM on the GPU between generations",
        info="faster repeated prompts, costs GPU memory; ignored under --lowvram / --medvram")
    add("ella_encoding_cache", "LLM encodings kept across generations", gr.Slider,
        {"minimum": 0, "maximum": 4096, "step": 1})
    add("ella_tsc_cache", "Connector outputs kept per generation", gr.Slider,
        {"minimum": 64, "maximum": 16384, "step": 64})
    add("ella_precompute_mb", "GPU memory for connector outputs computed before sampling (MiB)", gr.Slider,
        {"minimum": 0, "maximum": 4096, "step": 16},
        info="a sampling pass's outputs are computed in a few large batches before its first step, so that each "
             "step only looks them up; a pass needing more memory computes them batch by batch as its steps reach "
             "them")
    add("ella_foresee", "Foresee each sampling pass's steps (a dry run of the sampler before it starts)",
        info="off: each step computes its connector outputs when it comes (no dry run); an escape hatch for "
             "a sampler or extension the dry run does not suit")
    add("ella_unload_minutes", "Unload ELLA's models after this many minutes unused (0: never)", gr.Slider,
        {"minimum": 0, "maximum": 240, "step": 1})
    add("ella_allow_download", "Download the official models on first use",
        info="off: only use files already in the models folder")
    add("ella_allow_paths", "Accept model paths and Hugging Face ids (not only the listed models)",
        info="from the API, pasted parameters and the X/Y/Z plot; a listed hub id is downloaded only if downloads "
             "are on. Off by default: on a shared server (--listen, --api) a client could make the WebUI load or "
             "download any model")
    # infotext=: the host writes nothing itself, but pasting "ELLA emphasis: off" becomes a settings override
    add(EMPHASIS, "Emphasis in the LLM prompt", gr.Radio, {"choices": list(options.EMPHASIS_MODES)},
        info="attention: (word:1.3) multiplies the connector's attention to the word's tokens; off: the LLM reads "
             "the plain text (the paper's behaviour)", infotext=KEY_EMPHASIS)
