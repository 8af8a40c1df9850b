"""The registry of loaded models: load once, move, unload, concurrent loads."""

from __future__ import annotations

import threading

import pytest
import torch

from ella_ext import registry as registry_module
from ella_ext.registry import ModelKey, ModelRegistry


class Movable:
    """Stands in for the connector module / text-encoder wrapper: anything with ``.to(device)``."""

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.moves: list[torch.device] = []

    def to(self, device):
        self.device = torch.device(device)
        self.moves.append(self.device)
        return self


def test_model_key_normalises_path_and_dtype(tmp_path):
    key = ModelKey.of("connector", tmp_path / "a" / ".." / "c.safetensors", torch.float16)
    assert key == ModelKey("connector", str((tmp_path / "c.safetensors").resolve()), "float16")
    assert ModelKey.of("connector", str(tmp_path / "c.safetensors"), "float16") == key
    assert ModelKey.of("connector", tmp_path / "c.safetensors", None).dtype == ""
    assert ModelKey.of("text_encoder", tmp_path / "c.safetensors", torch.float16) != key


def test_registry_loads_once_and_unloads(tmp_path, monkeypatch):
    freed = []
    monkeypatch.setattr(registry_module, "free_memory", lambda: freed.append(True))
    registry = ModelRegistry()
    key = ModelKey.of("connector", tmp_path / "c.safetensors", torch.float32)
    calls = []

    def loader():
        calls.append(1)
        return Movable()

    model = registry.get(key, loader)
    assert registry.get(key, loader) is model and calls == [1]
    assert key in registry and len(registry) == 1 and registry.keys() == [key]
    assert registry.peek(key) is model
    assert registry.device(key) == torch.device("cpu")

    other = ModelKey.of("connector", tmp_path / "c.safetensors", torch.float16)
    assert registry.get(other, loader) is not model and calls == [1, 1], "the dtype is part of the key"

    assert registry.to(key, "meta") is model and model.device == torch.device("meta")
    registry.to(key, "meta")
    assert model.moves == [torch.device("meta")], "no move when already there"
    registry.to(key, "cpu")
    assert model.device == torch.device("cpu") and registry.device(key) == torch.device("cpu")

    assert registry.unload(key) is True and key not in registry and freed == [True]
    assert registry.unload(key) is False
    assert registry.peek(key) is None
    with pytest.raises(KeyError):
        registry.to(key, "cpu")
    registry.get(key, loader)
    assert len(calls) == 3, "loads again after unloading"


def test_registry_unload_all_and_by_kind(tmp_path):
    registry = ModelRegistry()
    connector = registry.get(ModelKey.of("connector", tmp_path / "c", "float16"), Movable)
    encoder_key = ModelKey.of("text_encoder", tmp_path / "t", "float16")
    registry.get(encoder_key, Movable)
    assert connector.device == torch.device("cpu")
    assert registry.unload_all(kind="connector") == 1 and registry.keys() == [encoder_key]
    assert registry.unload_all() == 1 and len(registry) == 0
    assert registry.unload_all() == 0


def test_registry_failed_load_stores_nothing(tmp_path):
    registry = ModelRegistry()
    key = ModelKey.of("connector", tmp_path / "broken", None)

    def broken():
        raise RuntimeError("corrupt file")

    with pytest.raises(RuntimeError):
        registry.get(key, broken)
    assert key not in registry
    assert isinstance(registry.get(key, Movable), Movable)


def test_registry_concurrent_get_loads_once(tmp_path):
    registry = ModelRegistry()
    key = ModelKey.of("text_encoder", tmp_path / "t", "float16")
    started, release, calls, released = threading.Event(), threading.Event(), [], []

    def slow_loader():
        calls.append(1)
        started.set()
        # the limits only end a hang: a loaded machine may take seconds to schedule a thread. A load that holds the
        # table's lock would keep the other key's get below waiting until this wait timed out: released says False
        released.append(release.wait(60))
        return Movable()

    results = []
    threads = [threading.Thread(target=lambda: results.append(registry.get(key, slow_loader))) for _ in range(4)]
    for thread in threads:
        thread.start()
    assert started.wait(60)
    other = registry.get(ModelKey.of("connector", tmp_path / "c", None), Movable)  # other keys are not blocked
    assert isinstance(other, Movable)
    release.set()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    assert len(calls) == 1 and len(results) == 4 and all(result is results[0] for result in results)
    assert released == [True]  # released by this thread after the other key's get, not timed out


def test_free_memory_empties_the_cuda_cache_when_there_is_one(monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    registry_module.free_memory()
    assert emptied == [True]
    assert isinstance(registry_module.registry, ModelRegistry)
