"""Imitates ``modules/devices.py`` of Forge classic: it imports ``ldm_patched.modules.model_management`` at
start-up; ``device = model_management.get_torch_device()``, ``dtype_unet = model_management.unet_dtype()``,
``torch_gc()`` calls ``model_management.soft_empty_cache()``."""

import torch
from ldm_patched.modules import model_management

device = model_management.get_torch_device()
cpu = torch.device("cpu")
dtype_unet = torch.float16
gc_calls = 0


def torch_gc():
    global gc_calls
    gc_calls += 1
    model_management.soft_empty_cache()
