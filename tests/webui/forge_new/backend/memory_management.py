"""Imitates ``backend/memory_management.py`` of Forge new: ``free_memory(memory_required, device, keep_loaded=[],
free_all=False)``, ``minimum_inference_memory()``, ``vram_state``, ``get_torch_device()``, ``soft_empty_cache()``
(``forge_common.MemoryManager`` records the calls)."""

from forge_common import MemoryManager, VRAMState

_manager = MemoryManager()
minimum_inference_memory = _manager.minimum_inference_memory
get_torch_device = _manager.get_torch_device
soft_empty_cache = _manager.soft_empty_cache
vram_state = VRAMState.NORMAL_VRAM
freed = _manager.freed  # double-only: (memory_required, device) per free_memory call
prepared = []  # double-only: (UNet patcher, memory it keeps free) per sampling_prepare (forge_common)


def free_memory(memory_required, device, keep_loaded=(), free_all=False):
    """New's takes ``free_all`` too (``backend/memory_management.py`` line 562); the double records the call."""
    _manager.free_memory(memory_required, device, keep_loaded)
