"""The ELLA accordion (gradio 3.41 in A1111 1.10, gradio 4 in Forge) and what pasting image parameters restores.

``build(script, is_img2img)`` is called by the host for the UI and again, inside a fresh ``gr.Blocks``, to read the
default values for the API (A1111 v1.10.1 ``modules/api/api.py`` ``init_default_script_args``): it registers nothing
global and can run any number of times.

Host facts (A1111 v1.10.1): ``modules/ui_components.py`` ``InputAccordion`` (a hidden checkbox that opens and closes an
accordion; its value is the checkbox's), ``modules/ui_common.py`` ``create_refresh_button(component, refresh_method,
refreshed_args, elem_id)``, ``modules/scripts.py`` ``Script.infotext_fields`` / ``paste_field_names``,
``modules/infotext_utils.py``: pasted text goes through ``on_infotext_pasted`` callbacks, then each field takes
``params[key]`` cast to its control's type; "Send to" copies the controls whose key is in ``paste_field_names``.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from .. import options
from . import infotext, loading

CONTROL_NAMES = options.FIELD_NAMES  # the UI returns its controls in this order: the script's args


def build(script, is_img2img: bool) -> list[Any]:
    tab = "img2img" if is_img2img else "txt2img"

    def elem(name: str) -> str:
        return f"ella_{tab}_{name}"

    defaults = options.DEFAULTS
    connectors = _choices(loading.connector_choices, defaults.connector)
    encoders = _choices(loading.text_encoder_choices, defaults.text_encoder)
    with _accordion(defaults.enabled, elem("accordion")) as enabled:
        with gr.Row():
            connector = gr.Dropdown(label="Connector", choices=connectors, value=_pick(connectors, defaults.connector),
                                    elem_id=elem("connector"), info="The TSC weights, from models/ELLA")
            _refresh(connector, loading.connector_choices, elem("connector_refresh"))
            text_encoder = gr.Dropdown(label="LLM text encoder", choices=encoders,
                                       value=_pick(encoders, defaults.text_encoder), elem_id=elem("text_encoder"),
                                       info="The LLM the connector was trained with (flan-T5-XL for the official one)")
            _refresh(text_encoder, loading.text_encoder_choices, elem("text_encoder_refresh"))
        with gr.Row():
            token_length = gr.Radio(label="Token length", choices=list(options.TOKEN_LENGTHS),
                                    value=defaults.token_length, elem_id=elem("token_length"),
                                    info="Flexible: the prompt's own length. Fixed: padded to the max, as trained")
            max_length = gr.Slider(label="Max tokens (fixed)", minimum=options.MAX_LENGTH_RANGE[0],
                                   maximum=options.MAX_LENGTH_RANGE[1], step=1, value=defaults.max_length,
                                   elem_id=elem("max_length"))
        with gr.Row():
            clip_mode = gr.Radio(label="CLIP", choices=list(options.CLIP_MODES), value=defaults.clip_mode,
                                 elem_id=elem("clip_mode"),
                                 info="ELLA + CLIP keeps trigger words, embeddings and community checkpoints' style")
            negative = gr.Radio(label="Negative prompt", choices=list(options.NEGATIVE_MODES),
                                value=defaults.negative, elem_id=elem("negative"),
                                info="LLM: encode it like the prompt. Empty: the reference's setting")
        llm_prompt = gr.Textbox(label="ELLA prompt (optional)", lines=2, value=defaults.llm_prompt,
                                elem_id=elem("llm_prompt"),
                                placeholder="Empty: the LLM reads the main prompt. With ELLA + CLIP, CLIP still reads "
                                            "the main prompt.")
        with gr.Row():
            hires = gr.Checkbox(label="Apply in the hires pass", value=defaults.hires, elem_id=elem("hires"))
            unload = gr.Button("Unload ELLA models", elem_id=elem("unload"))
        status = gr.HTML(_status_html(connector.value, text_encoder.value), elem_id=elem("status"))
        unload.click(fn=_unload, inputs=[], outputs=[status])
        for choice in (connector, text_encoder):
            choice.change(fn=_status_html, inputs=[connector, text_encoder], outputs=[status], show_progress="hidden")

    controls = [enabled, connector, text_encoder, token_length, max_length, clip_mode, negative, llm_prompt, hires]
    script.infotext_fields = [(control, infotext.PASTE_KEYS[name]) for name, control in zip(CONTROL_NAMES, controls)]
    script.paste_field_names = list(infotext.PASTE_KEYS.values())
    return controls


def on_infotext_pasted(_infotext: str, params: dict[str, Any]) -> None:
    """``on_infotext_pasted``: derive one key per control from the image's ELLA parameters (ELLA off when absent)."""
    params.update(infotext.paste_params(params))


def _choices(list_names, default: str) -> list[str]:
    try:
        names = list_names()
    except Exception:  # an unreadable models folder must not break the UI
        names = []
    return names if default in names else [default, *names]


def _pick(choices: list[str], default: str) -> str:
    return default if default in choices else choices[0]


def _refresh(component, list_names, elem_id: str):
    try:
        from modules.ui_common import create_refresh_button
    except ImportError:
        return None
    return create_refresh_button(component, lambda: None, lambda: {"choices": list_names()}, elem_id)


def _accordion(value: bool, elem_id: str):
    """The host's InputAccordion (the checkbox is the ``enabled`` control); a checkbox in an accordion otherwise."""
    try:
        from modules.ui_components import InputAccordion
    except ImportError:
        return _PlainAccordion(value, elem_id)
    return InputAccordion(value, label="ELLA", elem_id=elem_id)


class _PlainAccordion:
    def __init__(self, value: bool, elem_id: str):
        self.accordion = gr.Accordion("ELLA", open=False, elem_id=elem_id)
        self.value = value

    def __enter__(self):
        self.accordion.__enter__()
        return gr.Checkbox(label="Enable ELLA", value=self.value)

    def __exit__(self, *exc):
        return self.accordion.__exit__(*exc)


def _status_html(connector: str, text_encoder: str) -> str:
    """What the chosen models still need, or nothing when they are ready."""
    try:
        line = loading.describe_choice(connector or "", text_encoder or "")
    except Exception as err:  # an unreadable models folder must not break the UI
        line = f"Cannot read the ELLA models folder: {err}"
    return f"<p class='ella-status'>{_escape(line)}</p>" if line else ""


def _unload():
    count = loading.manager.unload()
    if count is None:
        return "<p class='ella-status'>ELLA's models will be unloaded when the current generation ends.</p>"
    return f"<p class='ella-status'>Unloaded {count} ELLA model(s).</p>"


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
