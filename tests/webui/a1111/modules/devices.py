"""Imitates ``modules/devices.py`` (A1111 v1.10.1): ``device``, ``dtype_unet`` (fp16 by default), ``torch_gc()``,
``fp8`` and ``autocast()`` (processing.py samples inside it: with FP8 weight storage on a CPU it is bfloat16 autocast;
on this CPU double every other branch of the host's is a null context)."""

import contextlib

import torch

device = torch.device("cpu")
cpu = torch.device("cpu")
dtype_unet = torch.float16
fp8 = False  # Settings > Optimizations > FP8 weight, once a model is loaded with it
gc_calls = 0  # double-only: counts torch_gc() calls for the tests


def autocast(disable=False):
    if not disable and fp8 and device == cpu:
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=True)
    return contextlib.nullcontext()


def torch_gc():
    global gc_calls
    gc_calls += 1
