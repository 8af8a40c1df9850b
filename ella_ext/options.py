"""The user's ELLA choices for one generation: parsed from the UI's positional values or from a dict of named fields
(the API), validated with messages that say what is allowed. (The image's info text: ``webui/infotext.py``.)

Host-free: standard library only.  The positional order below is the order of the UI controls and of the API's
``alwayson_scripts: {"ELLA": {"args": [...]}}`` list; it is part of the public API and only ever grows at the end.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import InputError

OFFICIAL_CONNECTOR_NAME = "ella-sd1.5-tsc-t5xl"
OFFICIAL_TEXT_ENCODER_NAME = "models--google--flan-t5-xl--text_encoder"

FLEXIBLE, FIXED = "Flexible", "Fixed"
ELLA_ONLY, ELLA_AND_CLIP = "ELLA only", "ELLA + CLIP"
NEGATIVE_LLM, NEGATIVE_EMPTY = "LLM", "Empty"

# The WebUI setting "Emphasis in the LLM prompt" (not a per-generation control: a setting, as the host's own emphasis
# mode, so that the info text, pasting and the XYZ plot treat it as the host treats its settings).
EMPHASIS_ATTENTION, EMPHASIS_OFF = "attention", "off"
EMPHASIS_MODES = (EMPHASIS_ATTENTION, EMPHASIS_OFF)

TOKEN_LENGTHS = (FLEXIBLE, FIXED)
CLIP_MODES = (ELLA_ONLY, ELLA_AND_CLIP)
NEGATIVE_MODES = (NEGATIVE_LLM, NEGATIVE_EMPTY)
MAX_LENGTH_RANGE = (1, 512)

@dataclasses.dataclass(frozen=True)
class ELLAOptions:
    """One generation's ELLA settings. Field order = positional order of the UI and the API."""

    enabled: bool = False
    connector: str = OFFICIAL_CONNECTOR_NAME
    text_encoder: str = OFFICIAL_TEXT_ENCODER_NAME
    token_length: str = FLEXIBLE
    max_length: int = 128
    clip_mode: str = ELLA_ONLY
    negative: str = NEGATIVE_LLM
    llm_prompt: str = ""
    hires: bool = True

    @property
    def fixed_length(self) -> int | None:
        """The TSC's fixed token count, or None for flexible length."""
        return self.max_length if self.token_length == FIXED else None

    @property
    def with_clip(self) -> bool:
        return self.clip_mode == ELLA_AND_CLIP

    def replace(self, **changes: Any) -> ELLAOptions:
        """A copy with ``changes`` applied, validated like API input."""
        return from_mapping({**dataclasses.asdict(self), **changes})


FIELD_NAMES = tuple(field.name for field in dataclasses.fields(ELLAOptions))
DEFAULTS = ELLAOptions()

_ALLOWED_TEXT = {
    "token_length": TOKEN_LENGTHS,
    "clip_mode": CLIP_MODES,
    "negative": NEGATIVE_MODES,
}
_ALIASES = {
    "token_length": {"flexible": FLEXIBLE, "fixed": FIXED},
    "clip_mode": {"ellaonly": ELLA_ONLY, "ella": ELLA_ONLY, "ellaclip": ELLA_AND_CLIP, "ella+clip": ELLA_AND_CLIP},
    "negative": {"llm": NEGATIVE_LLM, "empty": NEGATIVE_EMPTY, "": NEGATIVE_EMPTY},
}


def _squash(text: str) -> str:
    return re.sub(r"[\s_\-]+", "", text.lower())


def choice(name: str, value: Any) -> str:
    """The canonical value of the choice field ``name`` for ``value`` (aliases and case allowed), or InputError."""
    allowed = _ALLOWED_TEXT[name]
    if isinstance(value, str):
        found = _ALIASES[name].get(_squash(value))
        if found is not None:
            return found
    raise InputError(f"ELLA: {name} must be one of {', '.join(repr(a) for a in allowed)}, not {value!r}.")


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise InputError(f"ELLA: {name} must be true or false, not {value!r}.")


def _int(name: str, value: Any) -> int:
    low, high = MAX_LENGTH_RANGE
    number = value
    if isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value.strip())
    if isinstance(number, bool) or not isinstance(number, int) or not low <= number <= high:
        raise InputError(f"ELLA: {name} must be a whole number from {low} to {high}, not {value!r}.")
    return number


def _text(name: str, value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InputError(f"ELLA: {name} must be a string, not {value!r}.")
    return value


_PARSERS = {
    "enabled": _bool,
    "connector": _text,
    "text_encoder": _text,
    "token_length": choice,
    "max_length": _int,
    "clip_mode": choice,
    "negative": choice,
    "llm_prompt": _text,
    "hires": _bool,
}


def emphasis_mode(value: Any) -> str:
    """The emphasis setting's value (``attention`` or ``off``, any case), or InputError."""
    if isinstance(value, str) and value.strip().lower() in EMPHASIS_MODES:
        return value.strip().lower()
    raise InputError(
        f"ELLA: the setting 'Emphasis in the LLM prompt' must be {' or '.join(repr(m) for m in EMPHASIS_MODES)}, "
        f"not {value!r}."
    )


def from_mapping(values: Mapping[str, Any]) -> ELLAOptions:
    """Options from named fields; missing fields take their defaults. Unknown names and bad values raise InputError."""
    if not isinstance(values, Mapping):
        raise InputError(f"ELLA: expected a dict of named fields, not {type(values).__name__}.")
    unknown = [name for name in values if name not in _PARSERS]
    if unknown:
        raise InputError(
            f"ELLA: unknown field {', '.join(repr(str(n)) for n in unknown)}; the fields are {', '.join(FIELD_NAMES)}."
        )
    parsed = {name: _PARSERS[name](name, value) for name, value in values.items()}
    for name in ("connector", "text_encoder"):
        if name in parsed and not parsed[name].strip():
            parsed[name] = getattr(DEFAULTS, name)
    return ELLAOptions(**parsed)


def named_fields(args: Sequence[Any]) -> frozenset[str] | None:
    """The fields the script's arguments name: a dict's keys (the API's named form: a field left out is the
    extension's to fill, e.g. with how the connector was trained), or None for positional values (the UI's, the
    API's list, which the host completes with the UI's defaults): every field there counts as chosen."""
    if len(args) >= 1 and isinstance(args[0], Mapping):
        return frozenset(str(name) for name in args[0])
    return None


def from_script_args(args: Sequence[Any]) -> ELLAOptions:
    """Options from the script's arguments: the UI's positional values (a prefix is enough: the rest take their
    defaults), or a single dict of named fields in the first position (the API)."""
    if len(args) >= 1 and isinstance(args[0], Mapping):
        return from_mapping(args[0])  # the host fills the other slots with the UI's defaults: the dict decides
    if len(args) > len(FIELD_NAMES):
        raise InputError(
            f"ELLA: takes at most {len(FIELD_NAMES)} arguments ({', '.join(FIELD_NAMES)}), got {len(args)}."
        )
    return from_mapping(dict(zip(FIELD_NAMES, args)))
