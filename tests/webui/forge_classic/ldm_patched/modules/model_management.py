"""Imitates ``ldm_patched/modules/model_management.py`` of Forge classic: ``free_memory(memory_required, device,
keep_loaded=[])``, ``minimum_inference_memory()`` (1 GiB), ``vram_state``, ``get_torch_device()``,
``soft_empty_cache()`` (``forge_common.MemoryManager`` records the calls)."""

from forge_common import memory_manager_module

memory_manager_module(globals())
