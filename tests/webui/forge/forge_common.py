"""What Forge classic (bfee03d8) and Forge new (dfdcbab6) do alike below the WebUI layer, written once for both
generation doubles; each generation's package puts these at its own import paths and cites its files.

- The UNet patcher (classic ``modules_forge/unet_patcher.py``, new ``backend/patcher/unet.py``): ``model``,
  ``model_options`` (deep-copied by ``clone()``), ``controlnet_linked_list``, ``extra_preserved_memory_during_sampling``
  (an int, copied by ``clone()``) and ``add_extra_preserved_memory_during_sampling(bytes)`` that adds to it;
  ``lora_patches`` (new) holds what Forge's LoRA applied.
- ``ForgeObjects`` (``unet, clip, vae, clipvision``) with ``shallow_copy()``.
- The discrete schedule's ``timestep(sigma)`` (classic ``ldm_patched/modules/model_sampling.py``
  ``ModelSamplingDiscrete``, new ``backend/modules/k_prediction.py`` ``Prediction``): argmin over ``|log sigma -
  log_sigmas|``, buffers in float32; ``sigma(t)`` interpolates log sigma.
- The conditions (classic ``modules_forge/forge_sampler.py`` ``cond_from_a1111_to_patched_ldm(_weighted)``, new
  ``backend/sampling/condition.py`` ``compile_conditions`` / ``compile_weighted_conditions``): one entry per AND part
  (``zip(*cond_composition)``), rows picked with ``advanced_indexing`` when the container has it; ``c_crossattn`` is
  what the UNet and ControlNet read. New returns None for a None uncond; classic reads ``None['crossattn']`` and
  fails (its ``forge_sample`` double raises that).
- ``sampling_function`` (classic ``ldm_patched/modules/samplers.py``, new ``backend/sampling/sampling_function.py``):
  the uncond is dropped at CFG 1; ``calc_cond_uncond_batch`` runs chunks of one image batch each, and before the
  model ``c['control'] = control.get_control(input_x, timestep_, c.copy(), n)`` reads ``c_crossattn``; the model
  gets ``timestep_`` = the sigmas repeated per chunk and feeds the UNet ``sampling.timestep(sigma)``
  (classic ``model_base.py``, new ``k_model.py`` ``apply_model``). The double joins chunks only when their token
  counts are equal (Forge also joins some unequal ones by repeating tokens: that changes no row the tests read).
- ``sampling_prepare(unet, x)`` (classic ``modules_forge/forge_sampler.py``, new ``sampling_function.py``) loads the
  UNet keeping ``unet.extra_preserved_memory_during_sampling`` free: the double records what it was asked to keep.
- The memory manager: ``free_memory(memory_required, device, keep_loaded=[])`` (new adds ``free_all=False``),
  ``minimum_inference_memory()``, ``vram_state``; the double records the calls.

Each definition names the host files it imitates in a ``# host:`` comment (``tools/check_doubles.py`` compares them).
"""

from __future__ import annotations

import copy
import enum
import math
from dataclasses import dataclass

import torch


# host: forge-classic=ldm_patched/modules/model_management.py, forge-new=backend/memory_management.py
class VRAMState(enum.Enum):
    DISABLED = 0
    NO_VRAM = 1
    LOW_VRAM = 2
    NORMAL_VRAM = 3
    HIGH_VRAM = 4
    SHARED = 5


class MemoryManager:  # double-only: the recorder; each generation's memory module exposes its methods
    """The functions of Forge's memory manager the extension calls, recording their calls. Each generation's module
    exposes one instance's methods at module level, with ``vram_state`` and ``prepared`` (the memory each
    ``sampling_prepare`` was asked to keep free)."""

    def __init__(self):
        self.freed = []  # (memory_required, device) per free_memory call

    def free_memory(self, memory_required, device, keep_loaded=()):
        self.freed.append((memory_required, device))

    @staticmethod
    def minimum_inference_memory():
        return 1024 * 1024 * 1024

    @staticmethod
    def get_torch_device():
        return torch.device("cpu")

    @staticmethod
    def soft_empty_cache(force=False):
        pass


# host: forge-classic=ldm_patched/modules/model_sampling.py:ModelSamplingDiscrete
# host: forge-new=backend/modules/k_prediction.py:Prediction
class DiscreteSchedule(torch.nn.Module):
    # double-simplified: built from the checkpoint's alphas_cumprod (the host's from its config / beta schedule)
    def __init__(self, alphas_cumprod):
        super().__init__()
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.register_buffer("sigmas", sigmas.float())
        self.register_buffer("log_sigmas", sigmas.log().float())

    def timestep(self, sigma):
        dists = sigma.log().to(self.log_sigmas.device) - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)

    def sigma(self, timestep):
        t = torch.clamp(timestep.float().to(self.log_sigmas.device), min=0, max=len(self.sigmas) - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp().to(timestep.device)


# host: forge-classic=ldm_patched/modules/model_base.py:BaseModel, forge-new=backend/modules/k_model.py:KModel
class UnetModel:
    """Classic's ``BaseModel`` (``model_sampling``) or new's ``KModel`` (``predictor``). ``apply_model`` records
    the timestep the UNet is fed and the context it gets, instead of running a UNet."""

    # double-simplified: the schedule and the generation (which attribute holds it) instead of a model config
    def __init__(self, alphas_cumprod, new: bool):
        schedule = DiscreteSchedule(alphas_cumprod)
        setattr(self, "predictor" if new else "model_sampling", schedule)
        self.schedule = schedule

    # the host's parameters (classic model_base.py line 67, new k_model.py line 25)
    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        return self.schedule.timestep(t).float()


# host: forge-classic=modules_forge/unet_patcher.py, forge-new=backend/patcher/unet.py
class UnetPatcher:
    def __init__(self, model):  # double-simplified: no devices or size (the host's ModelPatcher.__init__ takes them)
        self.model = model
        self.model_options = {"transformer_options": {}}
        self.controlnet_linked_list = None
        self.extra_preserved_memory_during_sampling = 0
        self.extra_model_patchers_during_sampling = []
        self.lora_patches = {}

    def clone(self):
        n = UnetPatcher(self.model)
        n.model_options = copy.deepcopy(self.model_options)
        n.controlnet_linked_list = self.controlnet_linked_list
        n.extra_preserved_memory_during_sampling = self.extra_preserved_memory_during_sampling
        n.extra_model_patchers_during_sampling = self.extra_model_patchers_during_sampling.copy()
        n.lora_patches = self.lora_patches.copy()
        return n

    def add_extra_preserved_memory_during_sampling(self, memory_in_bytes):
        self.extra_preserved_memory_during_sampling += memory_in_bytes


# host: forge-classic=modules_forge/forge_loader.py:ForgeSD, forge-new=backend/diffusion_engine/base.py
# double-simplified: clip, vae and clipvision default to None (the tests build a UNet only)
@dataclass
class ForgeObjects:
    unet: object
    clip: object = None
    vae: object = None
    clipvision: object = None

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip, self.vae, self.clipvision)


# host: forge-classic=ldm_patched/modules/controlnet.py, forge-new=backend/patcher/controlnet.py
class ControlNet:
    """Forge's ControlNet as the sampling function drives it: ``get_control`` reads the chunk's ``c_crossattn``."""

    previous_controlnet = None

    def __init__(self):  # double-simplified: no control model (the double records what it is asked to control)
        self.seen = []  # the c_crossattn of each chunk it was asked to control

    # the host's parameter names (classic controlnet.py line 227, new controlnet.py line 292)
    def get_control(self, x_noisy, t, cond, batched_number):
        self.seen.append(cond["c_crossattn"])
        return {"output": []}


@dataclass
class ModelCall:  # double-only: what the tests read of each UNet call
    """One chunk the UNet ran: which rows (0 = cond, 1 = uncond), the sigmas it got and the timesteps it fed the
    UNet, its context, and what ControlNet read."""

    cond_or_uncond: list
    sigmas: torch.Tensor
    timesteps: torch.Tensor
    crossattn: torch.Tensor
    y: torch.Tensor | None
    control_saw: torch.Tensor | None


# host: forge-classic=modules_forge/forge_sampler.py:cond_from_a1111_to_patched_ldm
# host: forge-new=backend/sampling/condition.py
def compile_conditions(cond):
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return [{"cross_attn": cond, "model_conds": {"c_crossattn": cond}}]
    return [{"cross_attn": cond["crossattn"], "pooled_output": cond["vector"],
             "model_conds": {"c_crossattn": cond["crossattn"], "y": cond["vector"]}}]


# host: forge-classic=modules_forge/forge_sampler.py:cond_from_a1111_to_patched_ldm_weighted
# host: forge-new=backend/sampling/condition.py
def compile_weighted_conditions(cond, weights):
    results = []
    for cond_pre in map(list, zip(*weights)):
        indices = [i for i, _ in cond_pre]
        feed = cond.advanced_indexing(indices) if hasattr(cond, "advanced_indexing") else cond[indices]
        entry = compile_conditions(feed)
        entry[0]["strength"] = cond_pre[-1][1]
        results += entry
    return results


# host: forge-classic=ldm_patched/modules/samplers.py
# host: forge-new=backend/sampling/sampling_function.py:sampling_function_inner
# double-simplified: the UNet patcher (the host: its model and model_options) and a list to record the calls in
def sampling_function(unet, x, timestep, uncond, cond, cond_scale, calls):
    """``sampling_function`` + ``calc_cond_uncond_batch``; appends this denoiser call's chunks to ``calls``."""
    chunks = []
    calls.append(chunks)
    control = unet.controlnet_linked_list
    if control is not None:
        for entry in cond + (uncond or []):
            entry["control"] = control
    if math.isclose(cond_scale, 1.0):
        uncond = None
    to_run = [(e, 0) for e in cond] + [(e, 1) for e in (uncond or [])]
    while to_run:
        first = to_run[0][0]["model_conds"]["c_crossattn"].shape
        same = [item[0]["model_conds"]["c_crossattn"].shape == first for item in to_run]
        batch = [item for item, joined in zip(to_run, same) if joined]
        to_run = [item for item, joined in zip(to_run, same) if not joined]
        crossattn = torch.cat([e["model_conds"]["c_crossattn"] for e, _ in batch])
        y = [e["model_conds"]["y"] for e, _ in batch if "y" in e["model_conds"]]
        timestep_ = torch.cat([timestep] * len(batch))
        c = {"c_crossattn": crossattn}
        saw = None
        if control is not None:
            control.get_control(torch.cat([x] * len(batch)), timestep_, c.copy(), len(batch))
            saw = control.seen[-1]
        fed = unet.model.apply_model(torch.cat([x] * len(batch)), timestep_, **c)
        chunks.append(ModelCall([k for _, k in batch], timestep_, fed, crossattn, torch.cat(y) if y else None, saw))
    return x


# host: forge-classic=modules_forge/forge_sampler.py, forge-new=backend/sampling/sampling_function.py
# double-simplified: records in the memory module given (the host: sampling_prepare(unet, x) loads the models)
def sampling_prepare(manager, unet):
    manager.prepared.append((unet, unet.extra_preserved_memory_during_sampling))
