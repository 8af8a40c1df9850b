"""Imitates ``modules/devices.py`` (A1111 v1.10.1): ``device``, ``dtype_unet`` (fp16 by default), ``torch_gc()``."""

import torch

device = torch.device("cpu")
cpu = torch.device("cpu")
dtype_unet = torch.float16
gc_calls = 0  # double-only: counts torch_gc() calls for the tests


def torch_gc():
    global gc_calls
    gc_calls += 1
