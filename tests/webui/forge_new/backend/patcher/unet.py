"""Imitates ``backend/patcher/unet.py`` of Forge new (``UnetPatcher``: see ``forge_common``)."""

from forge_common import UnetPatcher

__all__ = ["UnetPatcher"]
