"""Small, tolerant reads of host state shared by every adapter (A1111 1.10 and both Forge generations), and which
host this is.

Host facts (AUTOMATIC1111 v1.10.1, commit 82a973c0): ``modules/paths_internal.py`` (``models_path``),
``modules/devices.py`` (``device``, ``dtype_unet``, ``torch_gc``), ``modules/lowvram.py`` (``is_needed``: --lowvram,
--medvram, --medvram-sdxl on SDXL), ``modules/shared.py`` (``opts``, ``cmd_opts``, ``sd_model``),
``modules/sd_samplers.py`` (``find_sampler_config(name).total_steps(steps)``, x2 for second-order samplers).

Forge (lllyasviel/stable-diffusion-webui-forge; classic at bfee03d8, new at dfdcbab6): ``modules/devices.py`` imports
the memory manager at start-up, ``ldm_patched.modules.model_management`` in classic and ``backend.memory_management``
in new; both have ``free_memory(memory_required, device, keep_loaded=[])``, ``minimum_inference_memory()`` and
``vram_state`` (a ``VRAMState``). ``--lowvram`` / ``--medvram`` are accepted but do nothing there; ``dtype_unet``
can be a float8 storage dtype when the user picks one for the UNet.
"""

from __future__ import annotations

import logging
import sys
from types import ModuleType

import torch

log = logging.getLogger("ella")

A1111, FORGE_CLASSIC, FORGE_NEW = "a1111", "forge-classic", "forge-new"
_MEMORY_MANAGERS = {FORGE_NEW: "backend.memory_management", FORGE_CLASSIC: "ldm_patched.modules.model_management"}
_COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def kind() -> str:
    """Which host runs us: ``"forge-new"``, ``"forge-classic"`` or ``"a1111"``. Read from the memory manager Forge
    has imported by the time scripts load (nothing is imported to find out)."""
    for name, module in _MEMORY_MANAGERS.items():
        if module in sys.modules:
            return name
    return A1111


def memory_manager() -> ModuleType | None:
    """Forge's memory manager module; None on A1111, which has none."""
    module = _MEMORY_MANAGERS.get(kind())
    return None if module is None else sys.modules.get(module)


def make_room(nbytes: int, target: torch.device) -> None:
    """Before moving ``nbytes`` of ELLA weights onto ``target``: on Forge, ask its memory manager to unload what it
    must (the UNet, the VAE...) so the move fits; it reloads them for sampling. A no-op on A1111 and on the CPU."""
    manager = memory_manager()
    if manager is None or target.type == "cpu" or nbytes <= 0:
        return
    reserve = getattr(manager, "minimum_inference_memory", lambda: 0)()
    manager.free_memory(nbytes + reserve, target)


def job() -> tuple | None:
    """The job the host is running, or None when it runs none (``modules/shared_state.py``: ``state.begin(job)`` sets
    ``job`` and ``time_start``, ``state.end()`` and the UI's call wrapper set ``job`` to ""; the UI's queue wrapper and
    the API call both around every generation). A job is known by its ``time_start`` alone: its name changes while it
    runs (``processing.py`` renames it "Batch 2 out of 3" per batch, the X/Y/Z plot per cell, and ``begin`` may be
    given None). A host without that state counts as always busy."""
    from modules import shared

    state = getattr(shared, "state", None)
    if state is None or not hasattr(state, "job"):
        return ("unknown",)
    return None if state.job == "" else ("job", getattr(state, "time_start", None))

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
    if dev.type == "cpu":
        return torch.float32
    dtype = devices.dtype_unet
    return dtype if dtype in _COMPUTE_DTYPES else torch.float16  # a float8 UNet still computes in 16 bits


def torch_gc() -> None:
    from modules import devices

    devices.torch_gc()


def low_vram() -> bool:
    """True under --lowvram / --medvram (or --medvram-sdxl with an SDXL model); on Forge, when its memory manager
    runs in low- or no-VRAM mode."""
    manager = memory_manager()
    if manager is not None:
        state = getattr(manager, "vram_state", None)
        return getattr(state, "name", "") in ("LOW_VRAM", "NO_VRAM")
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
    """The cross-attention width the checkpoint's UNet expects: SD3 4096, SDXL 2048, SD 2.x 1024, SD 1.x 768; 0 for a
    model of another family (Forge new also runs Flux and others: all four ``is_sd*`` flags are False there)."""
    if getattr(sd_model, "is_sd3", False):
        return 4096
    if getattr(sd_model, "is_sdxl", False) or hasattr(sd_model, "conditioner"):
        return 2048
    if getattr(sd_model, "is_sd2", False):
        return 1024
    if getattr(sd_model, "is_sd1", True) is False:
        return 0
    return 768
