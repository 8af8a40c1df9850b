"""The ELLA accordion (gradio 3.41 in A1111 1.10, gradio 4 in Forge) and what pasting image parameters restores.

``build(script, is_img2img)`` is called by the host for the UI and again, inside a fresh ``gr.Blocks``, to read the
default values for the API (A1111 v1.10.1 ``modules/api/api.py`` ``init_default_script_args``): it registers nothing
global and can run any number of times.

Host facts (A1111 v1.10.1): ``modules/ui_components.py`` ``InputAccordion`` (a hidden checkbox that opens and closes an
accordion; its value is the checkbox's), ``modules/ui_common.py`` ``create_refresh_button(component, refresh_method,
refreshed_args, elem_id)``, ``modules/scripts.py`` ``Script.infotext_fields`` / ``paste_field_names``,
``modules/infotext_utils.py``: pasted text goes through ``on_infotext_pasted`` callbacks, then each field takes
``params[key]`` cast to its control's type; "Send to" copies the controls whose key is in ``paste_field_names``;
``modules/ui_loadsave.py`` saves the values of labelled controls and buttons to ui-config.json unless the component has
``do_not_save_to_config``. Pasting and "Send to" set the controls' values from Python, which starts their ``change``
events but not their ``input`` events (those follow the user's own edits), in gradio 3.41 and 4.

The LLM token counter works like the host's own (``modules/ui_toprow.py``, ``modules/ui.py`` ``update_token_counter``,
``javascript/token-counters.js``): ``javascript/ella.js`` clicks a hidden button, the count is made in Python and
comes back as the counter's HTML. It is a UI event (``queue=False``), so the UI's own authentication covers it and it
needs no HTTP API; ``/ella/v1/tokens`` stays for API clients.
"""

from __future__ import annotations

import html
from typing import Any

import gradio as gr

from .. import options
from ..errors import ELLAError
from . import api, infotext, loading

CONTROL_NAMES = options.FIELD_NAMES  # the UI returns its controls in this order: the script's args
GRADIO_4 = int(gr.__version__.split(".")[0]) >= 4


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
        # the main prompt's text for the token counter: ella.js puts it in when it asks (the value itself is never
        # shown, so this needs no DOM node and may be invisible; it shares llm_prompt's form, adding no empty box)
        count_text = gr.Textbox(value="", visible=False, elem_id=elem("token_text"))
        with gr.Row():
            hires = gr.Checkbox(label="Apply in the hires pass", value=defaults.hires, elem_id=elem("hires"))
            unload = gr.Button("Unload ELLA models", elem_id=elem("unload"))
            # clicked by ella.js: it must be in the DOM, so it is visible and hidden by style.css (gradio 3 and 4
            # both render visible=False components hidden, but nothing promises they stay in the DOM)
            count = gr.Button("Count ELLA tokens", elem_id=elem("token_button"), elem_classes=["ella-hidden"])
        status = gr.HTML(_status_html(connector.value, text_encoder.value), elem_id=elem("status"))
        # moved beside the host's token counter by ella.js
        counter = gr.HTML("", elem_id=elem("token_counter"), elem_classes=["ella-token-counter"])
        for extra in (count_text, count, counter):
            extra.do_not_save_to_config = True  # not a setting: nothing for ui-config.json
        unload.click(fn=_unload, inputs=[], outputs=[status])
        for choice in (connector, text_encoder):
            choice.change(fn=_status_html, inputs=[connector, text_encoder], outputs=[status], show_progress="hidden")
        # a connector the user picks brings the token length it was trained with; ``input``, not ``change``: pasted
        # parameters and "Send to" set the dropdown too, and their own token length must stay
        connector.input(fn=trained_tokens, inputs=[connector], outputs=[token_length, max_length],
                        show_progress="hidden")
        counted = count.click(fn=token_counter_html,
                              inputs=[count_text, enabled, text_encoder, token_length, max_length, llm_prompt],
                              outputs=[counter], show_progress="hidden", queue=False,
                              **_js(f"(...args) => ellaTokenCounterArgs('{tab}', args)"),
                              **({"trigger_mode": "always_last"} if GRADIO_4 else {}))
        # after each answer: ask again if the inputs changed meanwhile (gradio 3 drops a click while one is pending)
        counted.then(fn=None, inputs=None, outputs=None, queue=False, **_js(f"() => ellaTokenCounterAnswered('{tab}')"))

    controls = [enabled, connector, text_encoder, token_length, max_length, clip_mode, negative, llm_prompt, hires]
    script.infotext_fields = [(control, infotext.PASTE_KEYS[name]) for name, control in zip(CONTROL_NAMES, controls)]
    script.paste_field_names = list(infotext.PASTE_KEYS.values())
    return controls


def token_counter_html(text: str, enabled: bool, text_encoder: str, token_length: str, max_length: float,
                       llm_prompt: str) -> str:
    """The token counter's HTML: ``ELLA n`` (flexible) or ``ELLA n/max`` (fixed), marked past the limit; nothing
    while ELLA is off. ``text`` is the main prompt; the LLM reads the ELLA prompt instead when there is one."""
    if not enabled:
        return ""
    own = bool((llm_prompt or "").strip())
    fixed = token_length == options.FIXED
    try:
        counted = api.count_tokens(llm_prompt if own else (text or ""), text_encoder or None)
    except ELLAError as err:  # an unlisted name, a text encoder not downloaded yet
        return _counter_span("ELLA ?", str(err), over=False)
    except Exception as err:  # an unreadable tokenizer must not break the UI
        return _counter_span("ELLA ?", f"ELLA cannot count tokens: {err}", over=False)
    tokens = counted["tokens"]
    limit = int(max_length) if fixed else counted["limit"]
    source = "the ELLA prompt" if own else "the prompt"
    if tokens > limit:
        title = f"{tokens} tokens in {source}, over {limit}: the text encoder reads only the first {limit}"
    else:
        title = f"Tokens the ELLA text encoder reads from {source} (the longest AND part or schedule variant)"
    return _counter_span(f"ELLA {tokens}/{limit}" if fixed else f"ELLA {tokens}", title, over=tokens > limit)


def trained_tokens(connector: str) -> tuple[Any, Any]:
    """Updates of the Token length radio and the Max tokens slider for a connector the user picked: the values its
    file says it was trained with; each left as it is where the file does not say (the official connector)."""
    try:
        trained = loading.trained_options(loading.connector_facts(connector or ""))
    except Exception:  # an unreadable models folder must not break the UI
        trained = {}
    return tuple(gr.update(value=trained[name]) if name in trained else gr.update()
                 for name in ("token_length", "max_length"))


def _counter_span(text: str, title: str, over: bool) -> str:
    classes = "ella-count ella-over" if over else "ella-count"
    return f"<span class='{classes}' title='{html.escape(title, quote=True)}'>{html.escape(text)}</span>"


def _js(code: str) -> dict[str, str]:
    """The keyword that runs JavaScript before an event: ``_js`` in gradio 3, ``js`` in gradio 4 (Forge new renames
    ``_js`` itself, but a plain gradio 4 does not)."""
    return {"js": code} if GRADIO_4 else {"_js": code}


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
    return f"<p class='ella-status'>{html.escape(line, quote=False)}</p>" if line else ""


def _unload():
    count = loading.manager.unload()
    if count is None:
        return "<p class='ella-status'>ELLA's models will be unloaded when the current generation ends.</p>"
    return f"<p class='ella-status'>Unloaded {count} ELLA model(s).</p>"

