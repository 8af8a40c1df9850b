"""Imitates ``modules/devices.py`` of Forge new: it imports ``backend.memory_management`` at start-up; ``device =
memory_management.get_torch_device()``, ``dtype_unet = memory_management.unet_dtype()``, ``torch_gc()`` calls
``memory_management.soft_empty_cache()``."""

import torch
from backend import memory_management

device = memory_management.get_torch_device()
cpu = torch.device("cpu")
dtype_unet = torch.float16
gc_calls = 0


def torch_gc():
    global gc_calls
    gc_calls += 1
    memory_management.soft_empty_cache()
