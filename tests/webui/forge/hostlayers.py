"""How the Forge doubles are layered on the A1111 double: the ``modules`` package of a Forge double searches the
generation's folder, then ``forge/`` (what both Forge generations share), then ``a1111/`` (what Forge kept from
A1111). ``a1111_module(name)`` loads the A1111 double's file under the Forge layers, so its own ``from modules import
x`` gets the Forge version of ``x``: a Forge file that only changes one class subclasses the A1111 double's.
``forge_module(name)`` does the same with ``forge/``'s file, for a generation that differs from what both share."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

WEBUI = Path(__file__).resolve().parents[1]
LAYERS = {
    "a1111": [WEBUI / "a1111"],
    "forge-classic": [WEBUI / "forge_classic", WEBUI / "forge", WEBUI / "a1111"],
    "forge-new": [WEBUI / "forge_new", WEBUI / "forge", WEBUI / "a1111"],
}


def a1111_module(name: str):
    """The A1111 double's ``modules/<name>.py``, loaded as ``modules.a1111_<name>``."""
    return _layer_module("a1111", name)


def forge_module(name: str):
    """The shared Forge double's ``modules/<name>.py``, loaded as ``modules.forge_<name>``."""
    return _layer_module("forge", name)


def _layer_module(layer: str, name: str):
    qualified = f"modules.{layer}_{name}"
    if qualified not in sys.modules:
        spec = importlib.util.spec_from_file_location(qualified, WEBUI / layer / "modules" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[qualified] = module
        spec.loader.exec_module(module)
    return sys.modules[qualified]
