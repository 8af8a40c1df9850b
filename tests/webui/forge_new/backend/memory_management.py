"""Imitates ``backend/memory_management.py`` of Forge new: ``free_memory(memory_required, device, keep_loaded=[],
free_all=False)``, ``minimum_inference_memory()``, ``vram_state``, ``get_torch_device()``, ``soft_empty_cache()``
(``forge_common.MemoryManager`` records the calls)."""

from forge_common import memory_manager_module

memory_manager_module(globals())
