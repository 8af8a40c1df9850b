"""Imitates ``modules_forge/unet_patcher.py`` of Forge classic (``UnetPatcher``: see ``forge_common``)."""

from forge_common import UnetPatcher

__all__ = ["UnetPatcher"]
