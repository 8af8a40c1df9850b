"""Which models the WebUI uses, where they live, and when they sit on the GPU.

- The connector (67 M parameters) loads in the UNet's dtype, moves to the host's device and stays there.
- On Forge, its memory manager is asked to free room before the LLM or the connector moves onto the GPU, and to keep
  the connector's per-call memory free while sampling (``forge.before_sampling``).
- The LLM is loaded once and moved to its run device only to encode a batch's prompts, then back to the CPU (unless
  the user keeps it on the GPU; never under --lowvram / --medvram).
- A connector runs as it was trained (``TrainingFacts``, from its file): a decoder-only LLM gives it the hidden state
  its file names, and in the "auto" precision the LLM runs on CUDA in the dtype its features had in training. The
  registry keeps one copy of an LLM's weights per (folder, dtype), whatever the layer: the layer is a property of the
  light view ``TextEncoder.with_layer`` makes for each connector (it shares the weights, the tokenizer and the
  encoding cache, whose keys include the layer), so switching between connectors trained at different layers of one
  LLM reloads nothing and never hands one connector the other's features.
- Picking another connector or LLM unloads the previous one; everything is unloaded after the set minutes without an
  ELLA generation, or on the UI's button.
All loaded models live in the core's registry (``ella_ext.registry``), the project's only long-lived state.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from .. import model_files
from ..connector import Connector
from ..connector_file import META_LLM, TrainingFacts, llm_key, load_connector, read_metadata, read_training_facts
from ..errors import ELLAError, InputError
from ..model_files import ModelPaths
from ..options import FIXED, FLEXIBLE, MAX_LENGTH_RANGE, ELLAOptions
from ..registry import ModelKey, registry
from . import host, settings
from .infotext import model_name as infotext_name

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


def connector_llm(path: Path) -> str:
    """The LLM a connector file says it was trained with (its metadata, written by the trainer); "" if it does not
    say (the official connector: flan-T5-XL's encoder) or cannot be read."""
    try:
        return read_metadata(path).get(META_LLM, "")
    except ELLAError:
        return ""


_llm_key = llm_key  # one spelling for an LLM's name (the core's, shared with the CLI)


def connector_facts(connector: str) -> TrainingFacts:
    """How the connector named in the UI (a listed name; a path where the setting allows them) was trained; empty
    facts when its file is not on disk or cannot be read (the generation then says why)."""
    entry = model_files.list_connectors(model_paths()).get(connector)
    path = entry.path if entry is not None and entry.available else None
    if path is None and settings.get("ella_allow_paths") and connector.strip():
        path = Path(connector.strip()).expanduser()
    if path is None or not Path(path).is_file():
        return TrainingFacts()
    try:
        return read_training_facts(path)
    except ELLAError:
        return TrainingFacts()


def llm_mismatch(connector: str, trained: str | None, text_encoder: str) -> str:
    """A warning when the connector names the LLM it was trained with (``trained``, from its file) and another one
    was chosen; "" otherwise."""
    if not trained or _llm_key(trained) == _llm_key(text_encoder):
        return ""
    return (f"the connector {infotext_name(connector)} was trained with the LLM {trained}, not "
            f"{infotext_name(text_encoder)}: pick that LLM for the images it was trained to make")


def trained_options(facts: TrainingFacts) -> dict[str, object]:
    """The token fields a connector was trained with, as option values (only those its file gives and the options
    can hold)."""
    trained: dict[str, object] = {}
    if facts.token_length is not None:
        trained["token_length"] = FIXED if facts.token_length == "fixed" else FLEXIBLE
    low, high = MAX_LENGTH_RANGE
    if facts.max_length is not None and low <= facts.max_length <= high:
        trained["max_length"] = facts.max_length
    return trained


def as_trained(chosen: ELLAOptions, named: frozenset[str] | None, facts: TrainingFacts) -> ELLAOptions:
    """The options with the token length and max tokens of the connector's training where the request left them to
    the extension (``named``: the fields an API dict gave; None: positional values, every field chosen)."""
    if named is None:
        return chosen
    changes = {name: value for name, value in trained_options(facts).items() if name not in named}
    return chosen.replace(**changes) if changes else chosen


def token_mismatch(connector: str, chosen: ELLAOptions, facts: TrainingFacts) -> str:
    """A warning when the chosen token length (or fixed max) is not the one the connector was trained with; ""
    otherwise, and when its file does not say."""
    trained = facts.describe_tokens()
    if not trained:
        return ""
    fixed = facts.fixed_length
    if (fixed is None) == (chosen.fixed_length is None) and (fixed is None or fixed == chosen.fixed_length):
        return ""
    used = "flexible" if chosen.fixed_length is None else f"fixed {chosen.fixed_length}"
    advice = f"Fixed with {fixed} max tokens" if fixed is not None else "Flexible"
    return (f"the connector {infotext_name(connector)} was trained with {trained} tokens, and ran with {used}: set "
            f"the token length to {advice} to run it as trained")


def describe_choice(connector: str, text_encoder: str) -> str:
    """A line for the accordion about the chosen models: what they still need (a download, a file to put somewhere,
    a fix) and which LLM the connector was trained with when another one is chosen; "" when they are ready."""
    paths = model_paths()
    downloads = bool(settings.get("ella_allow_download")) and not model_files.is_offline()
    lines = []
    entry = model_files.list_connectors(paths).get(connector)
    if entry is None:
        lines.append(f"The connector {connector!r} is not in {paths.connectors}.")
    elif not entry.available and downloads:
        lines.append(f"The connector {entry.name} (134 MB) will be downloaded to {paths.connectors} at the first "
                     "generation.")
    elif not entry.available:
        lines.append(f"The connector {entry.name} is missing and downloads are off: download "
                     f"{model_files.official_connector_url()} into {paths.connectors}.")
    elif (mismatch := llm_mismatch(connector, connector_llm(entry.path), text_encoder)):
        lines.append(mismatch[0].upper() + mismatch[1:] + ".")
    encoder = model_files.list_text_encoders(paths).get(text_encoder)
    if encoder is None:
        lines.append(f"The LLM {text_encoder!r} is not in {paths.text_encoders}.")
    elif encoder.problem:
        lines.append(f"The LLM {encoder.name} cannot be used: {encoder.problem}")
    elif not encoder.available and downloads:
        lines.append(f"The LLM {encoder.name} (flan-T5-XL's encoder, about 3 GB) will be downloaded to "
                     f"{paths.text_encoders} at the first generation.")
    elif not encoder.available:
        lines.append(f"The LLM {encoder.name} is missing and downloads are off: download the files of "
                     f"{model_files.official_text_encoder_url()} (config.json, model.safetensors and the tokenizer "
                     f"files) into {paths.text_encoders / encoder.name}.")
    return " ".join(lines)


@dataclass
class LoadedModels:
    connector: Connector
    encoder: object  # the registry's LLM as this connector reads it (``with_layer``: the hidden state it trained on)
    connector_key: ModelKey
    encoder_key: ModelKey
    llm_device: torch.device
    offload: bool
    connector_path: Path
    facts: TrainingFacts = field(default_factory=TrainingFacts)  # how the connector was trained (its file's metadata)

    @contextlib.contextmanager
    def encoding(self) -> Iterator[object]:
        """The LLM on its run device for the duration of the block; back on the CPU afterwards if offloading."""
        _make_room(self.encoder_key, self.llm_device)
        registry.to(self.encoder_key, self.llm_device)  # moves the weights this connector's view shares
        try:
            yield self.encoder
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


class Releasable(Protocol):
    def release(self) -> None: ...


class ModelManager:
    """Loads what a generation asks for and unloads it after a while without ELLA, never during a generation."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._active: list[tuple[Releasable, object]] = []  # ELLA generations in progress, with their host job
        self._unload_requested = False

    def load(self, options: ELLAOptions) -> LoadedModels:
        paths = model_paths()
        offline = None if settings.get("ella_allow_download") else True
        connector_path = model_files.ensure_connector(paths, options.connector, offline=offline)
        encoder_path = model_files.ensure_text_encoder(paths, options.text_encoder, offline=offline)

        facts = read_training_facts(connector_path)  # the header only; a file that cannot be read fails here
        device, dtype = host.device(), host.unet_dtype()
        llm_device = device if settings.get("ella_llm_device") == "GPU" else CPU
        llm_dtype = settings.llm_dtype(llm_device, facts)
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

        # The key has no layer: one copy of the weights serves every connector of this LLM; each gets its own view.
        encoder = registry.get(encoder_key, load_encoder).with_layer(facts.layer)
        return LoadedModels(connector, encoder, connector_key, encoder_key, llm_device, offload, connector_path,
                            facts)

    # -- the generations in progress, and unloading -------------------------------------------------------------------
    # The host runs one job at a time (its queue lock); a job can hold several generations, one after another (the
    # X/Y/Z plot) or nested (ADetailer runs one inside another's postprocess_image). Nothing is unloaded while a
    # generation of the running job is in progress: the button's request waits for the job's ELLA generations to
    # end, and the idle clock looks again later. A generation left over from a job that has ended died before
    # ``postprocess`` (out of memory in the UNet, another extension's error): the next generation, or the idle
    # clock, whichever comes first, releases what it holds.

    def release_stale(self) -> None:
        """At the start of any generation: release generations of jobs that have ended."""
        job = host.job()
        with self._lock:
            stale = [g for g, owner in self._active if owner != job or job is None]
            self._active = [(g, owner) for g, owner in self._active if owner == job and job is not None]
            if stale and self._unload_requested and not self._active:  # asked during a job that died
                self._unload_all("as asked during an earlier generation")
            elif stale:
                self._arm()
        for generation in stale:
            log.info("ELLA: a generation of an earlier job ended without finishing; releasing what it held")
            generation.release()

    def generation_started(self, generation: Releasable) -> None:
        """An ELLA generation begins: nothing is unloaded until it ends. The idle clock keeps running, so the models
        are unloaded even if this generation dies without ending."""
        with self._lock:
            self._active.append((generation, host.job()))
            self._arm()

    def in_progress(self, generation: Releasable) -> bool:
        """Whether this generation started in the job the host is running now and has not finished."""
        job = host.job()
        with self._lock:
            return any(g is generation and owner == job for g, owner in self._active)

    def generation_finished(self, generation: Releasable) -> None:
        """It ended (``postprocess``): do a deferred unload once no generation is left, else restart the clock."""
        with self._lock:
            self._active = [(g, owner) for g, owner in self._active if g is not generation]
            if self._unload_requested and not self._active:
                self._unload_all("as asked during the generation")
            else:
                self._arm()

    def unload(self) -> int | None:
        """The UI's button: unload everything now, or, while a generation runs, when it ends (then None)."""
        with self._lock:
            if self._running():
                self._unload_requested = True
                return None
            stale, self._active = self._active, []
            count = self._unload_all("on request")
        for generation, _ in stale:
            generation.release()
        return count

    def _running(self) -> bool:
        """Whether a generation of the job the host is running now is in progress; the caller holds the lock."""
        job = host.job()
        return job is not None and any(owner == job for _, owner in self._active)

    def _arm(self) -> None:
        """(Re)start the idle clock; the caller holds the lock."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        minutes = float(settings.get("ella_unload_minutes") or 0)
        if minutes <= 0:
            return
        timer = threading.Timer(minutes * 60, self._unload_if_idle)
        timer.daemon = True
        timer.args = (timer,)
        self._timer = timer
        timer.start()

    def _unload_if_idle(self, timer: threading.Timer) -> None:
        with self._lock:
            if self._timer is not timer:  # restarted or stopped meanwhile
                return
            self._timer = None
            if self._running():  # a long job, still at work: look again later
                self._arm()
                return
            stale, self._active = self._active, []
            self._unload_all(f"after {settings.get('ella_unload_minutes')} minutes unused")
        for generation, _ in stale:
            generation.release()

    def _unload_all(self, why: str) -> int:
        """Unload every model (a pending request from the button is done by it); the caller holds the lock and has
        checked that no generation is active."""
        self._unload_requested = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        count = registry.unload_all()  # it frees the memory it unloaded
        if count:
            log.info("ELLA: unloaded %d model(s) %s", count, why)
        return count


manager = ModelManager()
