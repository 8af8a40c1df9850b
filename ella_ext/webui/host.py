"""Small, tolerant reads of host state shared by every adapter (A1111 1.10 and both Forge generations).

Host facts (AUTOMATIC1111 v1.10.1, commit 82a973c0): ``modules/paths_internal.py`` (``models_path``),
``modules/devices.py`` (``device``, ``dtype_unet``, ``torch_gc``), ``modules/lowvram.py`` (``is_needed``: --lowvram,
--medvram, --medvram-sdxl on SDXL), ``modules/shared.py`` (``opts``, ``cmd_opts``, ``sd_model``),
``modules/sd_samplers.py`` (``find_sampler_config(name).total_steps(steps)``, x2 for second-order samplers).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("ella")


def models_root() -> str:
    from modules import paths

    return paths.models_path


def device() -> torch.device:
    from modules import devices

    return torch.device(devices.device)


def unet_dtype() -> torch.dtype:
    """The dtype the host runs the UNet in; float32 on a CPU."""
    from modules import devices

    dev = device()
    return torch.float32 if dev.type == "cpu" else devices.dtype_unet


def torch_gc() -> None:
    from modules import devices

    devices.torch_gc()


def low_vram() -> bool:
    """True under --lowvram / --medvram (or --medvram-sdxl with an SDXL model)."""
    from modules import shared

    flags = getattr(shared, "cmd_opts", None)
    if flags is None:
        return False
    sdxl = hasattr(getattr(shared, "sd_model", None), "conditioner")
    return bool(
        getattr(flags, "lowvram", False)
        or getattr(flags, "medvram", False)
        or (getattr(flags, "medvram_sdxl", False) and sdxl)
    )


def total_steps(sampler_name: str | None, steps: int) -> int:
    """The steps the host hands its prompt schedules for ``steps`` of this sampler (doubled for second-order)."""
    from modules import sd_samplers

    config = sd_samplers.find_sampler_config(sampler_name) if sampler_name else None
    return config.total_steps(steps) if config is not None else steps


def context_width(sd_model) -> int:
    """The cross-attention width the checkpoint's UNet expects: SD3 4096, SDXL 2048, SD 2.x 1024, SD 1.x 768."""
    if getattr(sd_model, "is_sd3", False):
        return 4096
    if getattr(sd_model, "is_sdxl", False) or hasattr(sd_model, "conditioner"):
        return 2048
    if getattr(sd_model, "is_sd2", False):
        return 1024
    return 768
