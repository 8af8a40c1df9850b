"""ELLA's entries in the image's parameters (the info text), and what pasting them back restores.

The values are plain strings in the host's ``p.extra_generation_params`` (a ``None`` value leaves the key out):
Forge classic runs A1111 1.8's ``create_infotext``, which neither calls callable values nor can put them in the
API's JSON. Each UI control has one key of its own, so that the host's "Send to" buttons (which copy the controls
whose key is in ``paste_field_names``) and pasted text (``paste_params`` derives the per-control keys) both restore
every control.

Host facts (AUTOMATIC1111 v1.10.1, commit 82a973c0): ``modules/processing.py`` ``create_infotext`` writes
``extra_generation_params``; ``modules/infotext_utils.py`` runs the ``on_infotext_pasted`` callbacks, then sets each
control from ``params[key]``; ``scripts/xyz_grid.py`` shallow-copies ``p`` per cell, so the cells share one dict.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping, MutableMapping
from pathlib import PurePath
from typing import Any

from .. import options, prompts
from ..errors import InputError

# "ELLA" holds the connector and is present only when ELLA conditioned the image.
KEY_CONNECTOR = "ELLA"
KEY_TEXT_ENCODER = "ELLA LLM"
KEY_TOKENS = "ELLA tokens"
KEY_MODE = "ELLA mode"
KEY_NEGATIVE = "ELLA negative"
KEY_PROMPT = "ELLA prompt"
KEY_HIRES = "ELLA hires"
KEY_ERROR = "ELLA error"
KEY_WARNING = "ELLA warning"  # ELLA ran, but something the user should know (a truncated prompt, another LLM,
# emphasis weights that had to be clamped)
# The emphasis setting when not the default (the setting's ``infotext=``: pasting it is a settings override).
KEY_EMPHASIS = "ELLA emphasis"
# "connector" when SDXL's pooled text vector came from the connector's attention pool (not CLIP-G); the connector
# file decides it, so pasting restores it with the connector.
KEY_POOLED = "ELLA pooled"
POOLED_BY_CONNECTOR = "connector"
KEYS = (KEY_CONNECTOR, KEY_TEXT_ENCODER, KEY_TOKENS, KEY_MODE, KEY_NEGATIVE, KEY_PROMPT, KEY_HIRES, KEY_ERROR,
        KEY_WARNING, KEY_EMPHASIS, KEY_POOLED)

# One key per control (the script's argument order); the derived ones exist only after ``paste_params``.
PASTE_KEYS = {
    "enabled": "ELLA enabled",
    "connector": KEY_CONNECTOR,
    "text_encoder": KEY_TEXT_ENCODER,
    "token_length": "ELLA token length",
    "max_length": "ELLA max tokens",
    "clip_mode": KEY_MODE,
    "negative": KEY_NEGATIVE,
    "llm_prompt": KEY_PROMPT,
    "hires": "ELLA hires pass",
}


def model_name(choice: str) -> str:
    """What the image records for a chosen model: its listed name; for a path (allowed by a setting), the file or
    folder name alone, so no image carries a path of the machine that made it."""
    text = choice.strip()
    if "/" not in text and "\\" not in text:
        return text
    path = PurePath(text.replace("\\", "/"))
    if text.startswith(("/", "~", ".")) or "\\" in text or len(path.parts) != 2:
        return path.stem if path.suffix == ".safetensors" else path.name
    return text  # a hub id (owner/name) is a name, not a path


# An absolute path (POSIX, Windows or ~) of two components or more, not inside a URL or a relative path.
_PART = r"""[^\s'"/\\]+"""  # one component of a path
_ABSOLUTE_PATH = re.compile(rf"(?<![\w.:/\\~])(?:[A-Za-z]:|~)?[/\\](?:{_PART}[/\\])*({_PART}[/\\]{_PART})")


def without_paths(message: str) -> str:
    """A message for the image's parameters or an API answer: every absolute path cut to its last two parts
    ("/home/me/webui/models/ELLA/broken.safetensors" -> "ELLA/broken.safetensors"), so that neither carries the
    folders of the machine that made it. The console keeps the whole message."""
    return _ABSOLUTE_PATH.sub(r"\1", message)


def values(chosen: options.ELLAOptions, emphasis: str = options.EMPHASIS_ATTENTION,
           pooled: bool = False) -> dict[str, str]:
    """The entries of an image that ELLA conditioned with these options and this emphasis setting (``pooled``: its
    SDXL pooled vector came from the connector)."""
    fields = {
        KEY_CONNECTOR: model_name(chosen.connector),
        KEY_TEXT_ENCODER: model_name(chosen.text_encoder),
        KEY_TOKENS: "flexible" if chosen.fixed_length is None else f"fixed {chosen.max_length}",
        KEY_MODE: chosen.clip_mode,
        KEY_NEGATIVE: chosen.negative,
    }
    if chosen.llm_prompt.strip():
        fields[KEY_PROMPT] = chosen.llm_prompt
    if not chosen.hires:
        fields[KEY_HIRES] = "off"
    if emphasis != options.EMPHASIS_ATTENTION:
        fields[KEY_EMPHASIS] = emphasis
    if pooled:
        fields[KEY_POOLED] = POOLED_BY_CONNECTOR
    return fields


def write(params: MutableMapping[str, Any], chosen: options.ELLAOptions, *, conditioned: bool,
          error: str | None, warnings: list[str] | None = None,
          emphasis: str = options.EMPHASIS_ATTENTION, pooled: bool = False) -> None:
    """Set every ELLA key: the option entries (with the emphasis setting when not the default, and where SDXL's
    pooled vector came from when the connector made it) and warnings if ELLA conditioned the batch (else none), and
    the error if any."""
    for key, value in values(chosen, emphasis, pooled).items():
        params[key] = value if conditioned else None
    params[KEY_WARNING] = without_paths("; ".join(warnings)) if conditioned and warnings else None
    params[KEY_ERROR] = None if error is None else without_paths(error)


def clear(params: MutableMapping[str, Any]) -> None:
    """Drop every ELLA key: an XYZ cell with ELLA off would otherwise show (and paste back) the previous cell's."""
    for key in KEYS:
        params.pop(key, None)


def paste_params(params: Mapping[str, str]) -> dict[str, Any]:
    """The per-control keys derived from pasted image parameters (added to them before the host applies them). An
    image ELLA conditioned with emphasis in its prompt but no emphasis entry used the default, so it gets one: the
    host then restores the setting too (as ``infotext_utils.parse_generation_parameters`` adds "Emphasis: Original"
    for its own emphasis mode)."""
    derived: dict[str, Any] = {PASTE_KEYS[name]: value for name, value in from_infotext(params).items()}
    if KEY_CONNECTOR in params and KEY_EMPHASIS not in params and _uses_emphasis(params):
        derived[KEY_EMPHASIS] = options.EMPHASIS_ATTENTION
    return derived


def _uses_emphasis(params: Mapping[str, str]) -> bool:
    texts = [str(params.get(key, "")) for key in ("Prompt", "Negative prompt", KEY_PROMPT)]
    try:
        return any(weight != 1.0 and segment != "BREAK"
                   for text in texts for segment, weight in prompts.attention_segments(text))
    except InputError:
        return False


def from_infotext(params: Mapping[str, str]) -> dict[str, Any]:
    """UI values restored from pasted image parameters: every field, ``enabled`` False when ELLA did not run."""
    if KEY_CONNECTOR not in params:
        return {"enabled": False}
    tokens = str(params.get(KEY_TOKENS, "flexible")).strip().lower()
    restored: dict[str, Any] = {"enabled": True, "connector": str(params[KEY_CONNECTOR])}
    if KEY_TEXT_ENCODER in params:
        restored["text_encoder"] = str(params[KEY_TEXT_ENCODER])
    if tokens.startswith("fixed"):
        restored["token_length"] = options.FIXED
        number = tokens.removeprefix("fixed").strip()
        if number.isdigit():
            restored["max_length"] = int(number)
    else:
        restored["token_length"] = options.FLEXIBLE
    for key, name in ((KEY_MODE, "clip_mode"), (KEY_NEGATIVE, "negative")):
        if key in params:
            with contextlib.suppress(InputError):  # an unknown value from a newer version: keep the UI's
                restored[name] = options.choice(name, str(params[key]))
    restored["llm_prompt"] = str(params.get(KEY_PROMPT, ""))
    restored["hires"] = str(params.get(KEY_HIRES, "on")).strip().lower() != "off"
    return restored
