"""The registry of loaded models: what is loaded, on which device, and unloading it.

The WebUI layer and the CLI share one process-wide ``registry``; it is the project's only long-lived state. Models
are any objects with ``.to(device)`` (the connector module, the text-encoder wrapper).
"""

from __future__ import annotations

import gc
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import torch

logger = logging.getLogger("ella")

T = TypeVar("T")


class ModelKey(NamedTuple):
    """What identifies a loaded model: its kind (``"connector"``, ``"text_encoder"``), source path and dtype."""

    kind: str
    path: str
    dtype: str

    @classmethod
    def of(cls, kind: str, path: str | os.PathLike[str], dtype: torch.dtype | str | None = None) -> ModelKey:
        """Normalised key: absolute path, dtype as ``"float16"`` (``""`` when the loader picks it)."""
        text = str(Path(path).expanduser().resolve()) if str(path) else ""
        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).removeprefix("torch.")
        return cls(kind, text, "" if dtype is None else str(dtype))


def free_memory() -> None:
    """Collect garbage and give cached accelerator memory back (CUDA, MPS)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        mps.empty_cache()


class ModelRegistry:
    """Loaded models kept across generations: load once, move between devices, unload.

    Models are any objects with ``.to(device)`` (the connector module, the text-encoder wrapper).  Thread-safe: a lock
    guards the table, and a per-key lock makes concurrent ``get`` calls for the same key load it once while other keys
    load in parallel.  This is the only long-lived state of the project.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._models: dict[ModelKey, Any] = {}
        self._devices: dict[ModelKey, torch.device | None] = {}
        self._loading: dict[ModelKey, threading.Lock] = {}

    def get(self, key: ModelKey, loader: Callable[[], T]) -> T:
        """The model under ``key``, calling ``loader()`` only if it is not loaded yet (a failed load stores nothing)."""
        with self._lock:
            if key in self._models:
                return self._models[key]
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._models:
                    return self._models[key]
            try:
                model = loader()
            finally:
                with self._lock:
                    if self._loading.get(key) is key_lock:
                        del self._loading[key]
            with self._lock:
                self._models[key] = model
                self._devices[key] = _device_of(model)
            logger.debug("Loaded %s %s (%s)", key.kind, key.path, key.dtype or "default dtype")
            return model

    def peek(self, key: ModelKey) -> Any | None:
        """The model under ``key`` if loaded, else None; never loads."""
        with self._lock:
            return self._models.get(key)

    def to(self, key: ModelKey, device: torch.device | str) -> Any:
        """Move the model under ``key`` to ``device`` (no-op if it is there already) and return it."""
        device = torch.device(device)
        with self._lock:
            if key not in self._models:
                raise KeyError(f"No model is loaded under {key}.")
            if self._devices.get(key) != device:
                moved = self._models[key].to(device)
                self._models[key] = self._models[key] if moved is None else moved
                self._devices[key] = device
            return self._models[key]

    def device(self, key: ModelKey) -> torch.device | None:
        """Device the model under ``key`` was last moved to (or found on when loaded); None if unknown."""
        with self._lock:
            return self._devices.get(key)

    def unload(self, key: ModelKey) -> bool:
        """Forget the model under ``key`` and free its memory; False if nothing was loaded there."""
        with self._lock:
            model = self._models.pop(key, None)
            self._devices.pop(key, None)
        if model is None:
            return False
        del model
        free_memory()
        logger.debug("Unloaded %s %s", key.kind, key.path)
        return True

    def unload_all(self, kind: str | None = None) -> int:
        """Forget every model (or every model of one kind) and free memory; returns how many were dropped."""
        with self._lock:
            keys = [key for key in self._models if kind is None or key.kind == kind]
            for key in keys:
                del self._models[key]
                self._devices.pop(key, None)
        if keys:
            free_memory()
        return len(keys)

    def keys(self) -> list[ModelKey]:
        with self._lock:
            return list(self._models)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._models

    def __len__(self) -> int:
        with self._lock:
            return len(self._models)

    def __iter__(self) -> Iterator[ModelKey]:
        return iter(self.keys())


def _device_of(model: Any) -> torch.device | None:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    parameters = getattr(model, "parameters", None)
    if callable(parameters):
        try:
            return next(iter(parameters())).device
        except (StopIteration, TypeError):
            return None
    return None


registry = ModelRegistry()
"""The process-wide registry the WebUI layer and the CLI share."""
