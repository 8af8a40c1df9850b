"""Imitates ``ldm_patched/modules/model_management.py`` of Forge classic: ``free_memory(memory_required, device,
keep_loaded=[])``, ``minimum_inference_memory()`` (1 GiB), ``vram_state``, ``get_torch_device()``,
``soft_empty_cache()`` (``forge_common.MemoryManager`` records the calls)."""

from forge_common import MemoryManager, VRAMState

_manager = MemoryManager()
free_memory = _manager.free_memory
minimum_inference_memory = _manager.minimum_inference_memory
get_torch_device = _manager.get_torch_device
soft_empty_cache = _manager.soft_empty_cache
vram_state = VRAMState.NORMAL_VRAM
freed = _manager.freed  # double-only: (memory_required, device) per free_memory call
prepared = []  # double-only: (UNet patcher, memory it keeps free) per sampling_prepare (forge_common)
