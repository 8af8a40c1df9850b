"""Imitates ``backend/memory_management.py`` of Forge new: ``free_memory(memory_required, device, keep_loaded=[],
free_all=False)``, ``minimum_inference_memory()``, ``vram_state``, ``get_torch_device()``, ``soft_empty_cache()``
(``forge_common.MemoryManager`` records the calls)."""

from forge_common import MemoryManager, VRAMState

_manager = MemoryManager()
freed = _manager.freed
prepared = []
vram_state = VRAMState.NORMAL_VRAM
free_memory = _manager.free_memory
minimum_inference_memory = _manager.minimum_inference_memory
get_torch_device = _manager.get_torch_device
soft_empty_cache = _manager.soft_empty_cache
