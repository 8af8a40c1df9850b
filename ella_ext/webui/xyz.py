"""Axes for the built-in X/Y/Z plot: ELLA on/off, connector, token length, CLIP mode and the emphasis setting.

Host facts (A1111 v1.10.1 ``scripts/xyz_grid.py``): ``AxisOption(label, type, apply, format_value, confirm, cost,
choices)``; ``apply(p, x, xs)`` runs on a shallow copy of ``p`` per cell, ``confirm(p, xs)`` once before the plot
runs; the module is found through ``modules.scripts.scripts_data`` (``script_class.__module__ == "xyz_grid.py"``), as
the built-in hypertile extension does from an ``on_before_ui`` callback. A setting's axis sets
``p.override_settings[key]`` (the host's ``apply_override``); ``modules/processing.py`` ``process_images`` applies the
overrides to ``shared.opts`` for the cell and restores them after it.
"""

from __future__ import annotations

import logging

from .. import options
from .generation import XYZ_ATTRIBUTE
from .loading import connector_choices
from .settings import EMPHASIS

log = logging.getLogger("ella")

PREFIX = "[ELLA] "


def _set(p, **changes) -> None:
    # a new dict per cell: the plot copies p shallowly, a shared dict would leak between cells
    setattr(p, XYZ_ATTRIBUTE, {**(getattr(p, XYZ_ATTRIBUTE, None) or {}), **changes})


def apply_enabled(p, x, _xs) -> None:
    _set(p, enabled=str(x).strip().lower() == "true")


def apply_connector(p, x, _xs) -> None:
    _set(p, connector=str(x).strip())


def apply_token_length(p, x, _xs) -> None:
    """``Flexible``, ``Fixed`` or ``Fixed N`` (N tokens)."""
    words = str(x).split()
    changes = {"token_length": words[0] if words else str(x)}
    if len(words) == 2:
        changes["max_length"] = words[1]
    _set(p, **changes)


def apply_clip_mode(p, x, _xs) -> None:
    _set(p, clip_mode=str(x).strip())


def apply_emphasis(p, x, _xs) -> None:
    """The setting "Emphasis in the LLM prompt" for this cell, as the host's own setting axes do."""
    p.override_settings[EMPHASIS] = options.emphasis_mode(x)


def confirm_emphasis(_p, xs) -> None:
    for x in xs:
        options.emphasis_mode(x)  # a clear error before the plot starts


def axis_options(xyz_grid) -> list:
    option = xyz_grid.AxisOption
    return [
        option(PREFIX + "Enabled", str, apply_enabled, choices=lambda: ["True", "False"]),
        option(PREFIX + "Connector", str, apply_connector, choices=connector_choices, cost=0.5),
        option(PREFIX + "Token length", str, apply_token_length,
               choices=lambda: [options.FLEXIBLE, options.FIXED, f"{options.FIXED} 64", f"{options.FIXED} 256"]),
        option(PREFIX + "CLIP mode", str, apply_clip_mode, choices=lambda: list(options.CLIP_MODES)),
        option(PREFIX + "Emphasis", str, apply_emphasis, confirm=confirm_emphasis,
               choices=lambda: list(options.EMPHASIS_MODES)),
    ]


def add_axes() -> None:
    """``on_before_ui``: add the axes once (a UI reload runs this again)."""
    from modules import scripts

    found = [x for x in scripts.scripts_data if x.script_class.__module__ == "xyz_grid.py"]
    if not found:
        return
    xyz_grid = found[0].module
    if any(str(getattr(o, "label", "")).startswith(PREFIX) for o in xyz_grid.axis_options):
        return
    xyz_grid.axis_options.extend(axis_options(xyz_grid))
