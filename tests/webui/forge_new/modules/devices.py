"""Imitates ``modules/devices.py`` of Forge new: it imports ``backend.memory_management`` at start-up; ``device =
memory_management.get_torch_device()``, ``dtype_unet = memory_management.unet_dtype()``, ``torch_gc()`` calls
``memory_management.soft_empty_cache()``."""

from backend import memory_management
from hostlayers import a1111_module

base = a1111_module("devices")
device = memory_management.get_torch_device()
cpu, dtype_unet = base.cpu, base.dtype_unet


def torch_gc():
    base.torch_gc()
    memory_management.soft_empty_cache()
