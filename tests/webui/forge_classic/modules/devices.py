"""Imitates ``modules/devices.py`` of Forge classic: it imports ``ldm_patched.modules.model_management`` at
start-up; ``device = model_management.get_torch_device()``, ``dtype_unet = model_management.unet_dtype()``,
``torch_gc()`` calls ``model_management.soft_empty_cache()``."""

from hostlayers import a1111_module
from ldm_patched.modules import model_management

base = a1111_module("devices")
device = model_management.get_torch_device()
cpu, dtype_unet = base.cpu, base.dtype_unet


def torch_gc():
    base.torch_gc()
    model_management.soft_empty_cache()
