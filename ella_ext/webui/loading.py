"""Which models the WebUI uses, where they live, and when they sit on the GPU.

- The connector (67 M parameters) loads in the UNet's dtype, moves to the host's device and stays there.
- On Forge, its memory manager is asked to free room before the LLM or the connector moves onto the GPU, and to keep
  the connector's per-call memory free while sampling (``forge.before_sampling``).
- The LLM is loaded once and moved to its run device only to encode a batch's prompts, then back to the CPU (unless
  the user keeps it on the GPU; never under --lowvram / --medvram).
- Picking another connector or LLM unloads the previous one; everything is unloaded after the set minutes without an
  ELLA generation, or on the UI's button.
All loaded models live in the core's registry (``ella_ext.registry``), the project's only long-lived state.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import model_files
from ..connector import Connector
from ..connector_file import load_connector
from ..errors import InputError
from ..model_files import ModelPaths
from ..options import ELLAOptions
from ..registry import ModelKey, registry
from . import host, settings

log = logging.getLogger("ella")

CPU = torch.device("cpu")


def model_paths() -> ModelPaths:
    folder = str(settings.get("ella_models_dir") or "").strip()
    if folder:
        root = Path(folder).expanduser()
        return ModelPaths(root, root / model_files.TEXT_ENCODER_DIR)
    return ModelPaths.from_models_root(host.models_root())


def connector_choices() -> list[str]:
    return list(model_files.list_connectors(model_paths()))


def text_encoder_choices() -> list[str]:
    return list(model_files.list_text_encoders(model_paths()))


def check_names(chosen: ELLAOptions) -> None:
    """Refuse a connector or text encoder the lists do not show (see ``check_name``)."""
    check_name("connector", chosen.connector)
    check_name("text encoder", chosen.text_encoder)


def check_name(kind: str, name: str) -> None:
    """Refuse a ``kind`` ("connector" or "text encoder") the lists do not show (files under the models folder, the
    official ones), unless the setting accepts paths and hub ids. The message is the same whether or not such a
    path exists (nothing to probe the disk with), and lists what is allowed."""
    if settings.get("ella_allow_paths"):
        return
    names = connector_choices() if kind == "connector" else text_encoder_choices()
    if name not in names:
        raise InputError(
            f"ELLA: the {kind} {name!r} is not one of the listed models ({', '.join(names)}). Put it in the ELLA "
            "models folder and pick it by name, or turn on 'Accept model paths and Hugging Face ids' in Settings > "
            "ELLA."
        )


def describe_missing() -> str:
    """A line for the UI when the official models are not on disk yet (empty when they are)."""
    paths = model_paths()
    entries = [*model_files.list_connectors(paths).values(), *model_files.list_text_encoders(paths).values()]
    missing = [e for e in entries if e.official and not e.available]
    if not missing:
        return ""
    names = " and ".join(e.name for e in missing)
    if settings.get("ella_allow_download") and not model_files.is_offline():
        return f"{names} will be downloaded to {paths.connectors} at the first generation (about 5 GB in all)."
    encoder_folder = paths.text_encoders / model_files.OFFICIAL_TEXT_ENCODER
    return (f"{names} missing: downloads are off. Get {model_files.official_connector_url()} into {paths.connectors} "
            f"and google/flan-t5-xl's text_encoder folder into {encoder_folder}.")


@dataclass
class LoadedModels:
    connector: Connector
    encoder: object
    connector_key: ModelKey
    encoder_key: ModelKey
    llm_device: torch.device
    offload: bool

    @contextlib.contextmanager
    def encoding(self) -> Iterator[object]:
        """The LLM on its run device for the duration of the block; back on the CPU afterwards if offloading."""
        _make_room(self.encoder_key, self.llm_device)
        encoder = registry.to(self.encoder_key, self.llm_device)
        try:
            yield encoder
        finally:
            if self.offload and self.llm_device != CPU:
                registry.to(self.encoder_key, CPU)
                host.torch_gc()


def _make_room(key: ModelKey, device: torch.device) -> None:
    """Before a model moves onto the GPU: on Forge, its memory manager frees that much first (``host.make_room``)."""
    if registry.device(key) == device:
        return
    model = registry.peek(key)
    module = getattr(model, "model", model)  # the text encoder wraps its transformers module
    tensors = [*module.parameters(), *module.buffers()] if isinstance(module, torch.nn.Module) else []
    host.make_room(sum(t.numel() * t.element_size() for t in tensors), device)


class ModelManager:
    """Loads what a generation asks for and unloads it after a while without ELLA."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def load(self, options: ELLAOptions) -> LoadedModels:
        paths = model_paths()
        offline = None if settings.get("ella_allow_download") else True
        connector_path = model_files.ensure_connector(paths, options.connector, offline=offline)
        encoder_path = model_files.ensure_text_encoder(paths, options.text_encoder, offline=offline)

        device, dtype = host.device(), host.unet_dtype()
        llm_device = device if settings.get("ella_llm_device") == "GPU" else CPU
        llm_dtype = settings.llm_dtype(llm_device)
        offload = host.low_vram() or not settings.get("ella_keep_llm_on_gpu")
        connector_key = ModelKey.of("connector", connector_path, dtype)
        encoder_key = ModelKey.of("text_encoder", encoder_path, llm_dtype)
        for key in list(registry):  # the user picked others: free the previous models before loading these
            if key not in (connector_key, encoder_key):
                registry.unload(key)

        connector = registry.get(connector_key, lambda: load_connector(connector_path, CPU, dtype))
        _make_room(connector_key, device)
        connector = registry.to(connector_key, device)

        def load_encoder():
            from ..text_encoders import EncodingCache, load_text_encoder

            cache = EncodingCache(int(settings.get("ella_encoding_cache")))
            return load_text_encoder(encoder_path, CPU, llm_dtype, cache=cache)  # encoding() moves it

        encoder = registry.get(encoder_key, load_encoder)
        return LoadedModels(connector, encoder, connector_key, encoder_key, llm_device, offload)

    # -- idle unloading ------------------------------------------------------------------------------------------------

    def generation_started(self) -> None:
        """Stop the idle clock (the host runs one generation at a time)."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def generation_finished(self) -> None:
        """Start the idle clock: unload everything if no ELLA generation starts within the set minutes. A generation
        that died before ``postprocess`` leaves no count behind: the next one just stops and restarts the clock."""
        minutes = float(settings.get("ella_unload_minutes") or 0)
        with self._lock:
            if minutes <= 0 or not len(registry):
                return
            self._timer = threading.Timer(minutes * 60, self._unload_if_idle)
            self._timer.daemon = True
            self._timer.start()

    def _unload_if_idle(self) -> None:
        with self._lock:
            if self._timer is None:  # cancelled by a generation that started meanwhile
                return
            self._timer = None
        count = registry.unload_all()
        if count:
            log.info("ELLA: unloaded %d model(s) after %s minutes unused", count, settings.get("ella_unload_minutes"))

    def unload(self) -> int:
        """Unload everything now (the UI's button); returns how many models were dropped."""
        count = registry.unload_all()
        host.torch_gc()
        return count


manager = ModelManager()
