"""Where ELLA models live on disk, how they are listed, and how the official ones are fetched on first use.

On disk (``<models>`` is the WebUI's ``models/`` folder)::

    <models>/ELLA/*.safetensors                         connectors (TSC weights)
    <models>/ELLA/text_encoders/<name>/config.json      LLM text encoders, one transformers folder each
    <models>/ELLA/.cache/huggingface/                   the hub client's bookkeeping for downloads into this folder
    <models>/ELLA/text_encoders/.cache/huggingface/     (metadata, ``*.incomplete`` partial files, locks)

The official files come from the hub repository ``QQGYLab/ELLA``: the connector ``ella-sd1.5-tsc-t5xl.safetensors``
(downloaded with ``hf_hub_download(local_dir=<models>/ELLA)``) and the flan-T5-XL encoder folder
``models--google--flan-t5-xl--text_encoder`` (``snapshot_download(local_dir=<models>/ELLA/text_encoders)``, so it lands
in ``<models>/ELLA/text_encoders/models--google--flan-t5-xl--text_encoder/``, the layout ComfyUI-ELLA also uses).
Downloading into ``local_dir`` keeps one copy of each file where the user can see it, and keeps the hub client's own
progress bar, size checks and partial-download handling.  A text encoder may also be named by a hub repository id
(``owner/name``): it is then looked up in, or downloaded to, the hub cache (safetensors weights only).

The module is host-free: it imports the standard library; ``huggingface_hub`` is imported inside the functions that
need it. Loaded models are kept in ``registry.py``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelNotFoundError

logger = logging.getLogger("ella")

OFFICIAL_REPO = "QQGYLab/ELLA"
OFFICIAL_REVISION = "main"
OFFICIAL_CONNECTOR = "ella-sd1.5-tsc-t5xl.safetensors"
OFFICIAL_TEXT_ENCODER = "models--google--flan-t5-xl--text_encoder"
# Files of the official encoder folder as the hub lists them (config, fp16 weights, sentencepiece + fast tokenizer).
OFFICIAL_TEXT_ENCODER_FILES = (
    "config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "spiece.model",
    "tokenizer.json",
    "tokenizer_config.json",
)
CONNECTOR_DIR = "ELLA"
TEXT_ENCODER_DIR = "text_encoders"
CONNECTOR_SUFFIX = ".safetensors"
DEFAULT_ENDPOINT = "https://huggingface.co"

# What a text-encoder download fetches: configs, safetensors weights, tokenizer files.  Never pickles (*.bin, *.pt).
ENCODER_FILE_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken")
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer.model", "vocab.json", "tokenizer.tiktoken")

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_TRUE = {"1", "ON", "YES", "TRUE"}


# --------------------------------------------------------------------------------------------------------------------
# Folders and listing


@dataclass(frozen=True)
class ModelPaths:
    """The folders ELLA models are read from and downloaded to.

    ``hub_cache`` is the Hugging Face hub cache to look in for text encoders named by repo id (and for a copy of the
    official encoder fetched by other tools); ``None`` means the hub client's default (``HF_HUB_CACHE``).
    """

    connectors: Path
    text_encoders: Path
    hub_cache: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "connectors", Path(self.connectors).expanduser())
        object.__setattr__(self, "text_encoders", Path(self.text_encoders).expanduser())
        if self.hub_cache is not None:
            object.__setattr__(self, "hub_cache", Path(self.hub_cache).expanduser())

    @classmethod
    def from_models_root(cls, models_root: str | os.PathLike[str], hub_cache: str | os.PathLike[str] | None = None):
        """Folders under the WebUI's ``models/`` directory: ``<models>/ELLA`` and ``<models>/ELLA/text_encoders``."""
        connectors = Path(models_root).expanduser() / CONNECTOR_DIR
        return cls(connectors, connectors / TEXT_ENCODER_DIR, None if hub_cache is None else Path(hub_cache))


@dataclass(frozen=True)
class ModelEntry:
    """One choice for the UI: ``path`` is where the model is, or where it will be once downloaded (``available``).
    ``problem`` says why a model on disk cannot be used (empty when it can, or when it is simply not there yet)."""

    name: str
    path: Path
    official: bool
    available: bool
    problem: str = ""


def list_connectors(paths: ModelPaths) -> dict[str, ModelEntry]:
    """Connectors by name (file name without ``.safetensors``), sorted; the official one is always listed."""
    entries: dict[str, ModelEntry] = {}
    if paths.connectors.is_dir():
        for file in paths.connectors.iterdir():
            if file.suffix == CONNECTOR_SUFFIX and file.is_file() and not file.name.startswith("."):
                entries[file.stem] = ModelEntry(file.stem, file, file.name == OFFICIAL_CONNECTOR, True)
    official = Path(OFFICIAL_CONNECTOR).stem
    if official not in entries:
        entries[official] = ModelEntry(official, paths.connectors / OFFICIAL_CONNECTOR, True, False)
    return _sorted(entries)


def list_text_encoders(paths: ModelPaths) -> dict[str, ModelEntry]:
    """Text encoders by folder name, sorted: every ``text_encoders/<name>/`` holding a config.json, plus the official
    flan-T5-XL encoder (found locally, in the hub cache, or to be downloaded on first use)."""
    entries: dict[str, ModelEntry] = {}
    if paths.text_encoders.is_dir():
        for folder in paths.text_encoders.iterdir():
            if folder.is_dir() and not folder.name.startswith(".") and (folder / "config.json").is_file():
                problem = encoder_folder_problem(folder)
                entries[folder.name] = ModelEntry(folder.name, folder, folder.name == OFFICIAL_TEXT_ENCODER,
                                                  not problem, problem)
    local = paths.text_encoders / OFFICIAL_TEXT_ENCODER
    if _is_complete_encoder(local):
        entries[OFFICIAL_TEXT_ENCODER] = ModelEntry(OFFICIAL_TEXT_ENCODER, local, True, True)
    else:
        cached = _official_encoder_in_hub_cache(paths)
        path = cached if cached is not None else local
        entries[OFFICIAL_TEXT_ENCODER] = ModelEntry(OFFICIAL_TEXT_ENCODER, path, True, cached is not None)
    return _sorted(entries)


def _sorted(entries: dict[str, ModelEntry]) -> dict[str, ModelEntry]:
    return {name: entries[name] for name in sorted(entries, key=lambda name: (name.lower(), name))}


def encoder_folder_problem(folder: str | os.PathLike[str]) -> str:
    """Why a text-encoder folder cannot be loaded (a sentence), or "" when it has config.json, a tokenizer file and
    its safetensors weights as transformers loads them (``model.safetensors``, or an index and all its shards).

    Checked before any load: transformers (4.30 at least) quietly falls back to a folder's pickled
    ``pytorch_model.bin`` when it has no safetensors weights, and pickles are never loaded here."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return f"{folder} has no config.json."
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return f"{folder} has no tokenizer file ({', '.join(TOKENIZER_FILES)})."
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"{index} is not a readable weight index; download the folder again."
        missing = sorted(shard for shard in shards if not (folder / shard).is_file())
        return f"{folder} lacks the weight shards {', '.join(missing)}." if missing else ""
    if (folder / "model.safetensors").is_file():
        return ""
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    if pickles:
        return (f"{folder} has only pickled weights ({', '.join(pickles)}), which are never loaded (they can run "
                "code): get the model's safetensors release (model.safetensors), or convert it.")
    return f"{folder} has no model.safetensors (nor model.safetensors.index.json)."


def _is_complete_encoder(folder: Path) -> bool:
    return not encoder_folder_problem(folder)


# --------------------------------------------------------------------------------------------------------------------
# Resolving names to files, downloading on first use


def is_offline(offline: bool | None = None) -> bool:
    """``offline`` if given, else the hub's switch ``HF_HUB_OFFLINE=1`` (read now, and as the hub client read it)."""
    if offline is not None:
        return bool(offline)
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if value.strip().upper() in _TRUE:
        return True
    constants = sys.modules.get("huggingface_hub.constants")
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def official_connector_url(endpoint: str | None = None) -> str:
    """Direct download link of the official connector file."""
    return f"{_endpoint(endpoint)}/{OFFICIAL_REPO}/resolve/{OFFICIAL_REVISION}/{OFFICIAL_CONNECTOR}"


def official_text_encoder_url(endpoint: str | None = None) -> str:
    """Web page listing the files of the official text-encoder folder."""
    return f"{_endpoint(endpoint)}/{OFFICIAL_REPO}/tree/{OFFICIAL_REVISION}/{OFFICIAL_TEXT_ENCODER}"


def ensure_connector(
    paths: ModelPaths, name: str | None = None, *, offline: bool | None = None, endpoint: str | None = None
) -> Path:
    """Path of a connector file, downloading the official one on first use.

    ``name`` is a listed name (``ella-sd1.5-tsc-t5xl``), a file name in ``paths.connectors``, or a path to a
    ``.safetensors`` file; ``None`` means the official connector.  A file already on disk is returned without any
    network call.  Raises ModelNotFoundError when the file is missing and cannot be downloaded (offline, network
    failure, or not the official file).
    """
    filename = OFFICIAL_CONNECTOR if name is None else name.strip()
    explicit = Path(filename).expanduser()
    if explicit.is_absolute() or "/" in filename or "\\" in filename:
        if explicit.is_file():
            return explicit
        raise ModelNotFoundError(f"The ELLA connector file {explicit} does not exist; check the path.")
    if not filename.endswith(CONNECTOR_SUFFIX):
        filename += CONNECTOR_SUFFIX
    target = paths.connectors / filename
    if target.is_file():
        return target
    if filename != OFFICIAL_CONNECTOR:
        raise ModelNotFoundError(
            f"The ELLA connector '{filename}' is not in {paths.connectors}; put the .safetensors file there "
            f"(only the official {OFFICIAL_CONNECTOR} is downloaded automatically)."
        )
    url = official_connector_url(endpoint)
    if is_offline(offline):
        raise ModelNotFoundError(
            f"The ELLA connector {OFFICIAL_CONNECTOR} is missing and downloads are off (offline mode): download it "
            f"from {url} and put it at {target}."
        )
    hub = _import_hub(target, url)
    logger.info("Downloading the ELLA connector %s from %s to %s", OFFICIAL_CONNECTOR, url, paths.connectors)
    try:
        downloaded = hub.hf_hub_download(
            OFFICIAL_REPO,
            OFFICIAL_CONNECTOR,
            revision=OFFICIAL_REVISION,
            local_dir=str(paths.connectors),
            cache_dir=_str_or_none(paths.hub_cache),
            endpoint=endpoint,
        )
    except _hub_errors() as err:
        raise _download_failed(f"the ELLA connector {OFFICIAL_CONNECTOR}", url, f"put it at {target}", err) from err
    return Path(downloaded)


def ensure_text_encoder(
    paths: ModelPaths, name: str | None = None, *, offline: bool | None = None, endpoint: str | None = None
) -> Path:
    """Folder of a text encoder, downloading it on first use.

    ``name`` is a folder name in ``paths.text_encoders``, a path to a folder, a hub repo id (``owner/name``, looked up
    in and downloaded to the hub cache), or ``None`` / ``OFFICIAL_TEXT_ENCODER`` for the official flan-T5-XL encoder.
    A complete folder already on disk is returned without any network call.
    """
    name = OFFICIAL_TEXT_ENCODER if name is None else name.strip()
    explicit = Path(name).expanduser()
    if explicit.is_absolute() or name.startswith(("~", ".")) or "\\" in name:
        if (explicit / "config.json").is_file():
            return explicit
        raise ModelNotFoundError(f"The text encoder folder {explicit} has no config.json; check the path.")
    if name == OFFICIAL_TEXT_ENCODER:
        return _ensure_official_text_encoder(paths, offline, endpoint)
    local = paths.text_encoders / name
    if "/" not in name:
        if (local / "config.json").is_file():
            return local
        raise ModelNotFoundError(
            f"No text encoder named '{name}': expected a transformers folder with config.json at {local}. Put the "
            "model folder there, or give a Hugging Face repo id such as 'owner/name'."
        )
    if not _REPO_ID.match(name):
        raise ModelNotFoundError(f"'{name}' is neither a text-encoder folder in {paths.text_encoders} nor a repo id.")
    return _ensure_hub_text_encoder(paths, name, offline, endpoint)


def _ensure_official_text_encoder(paths: ModelPaths, offline: bool | None, endpoint: str | None) -> Path:
    local = paths.text_encoders / OFFICIAL_TEXT_ENCODER
    if _is_complete_encoder(local):
        return local
    cached = _official_encoder_in_hub_cache(paths)
    if cached is not None:
        return cached
    url = official_text_encoder_url(endpoint)
    where = f"download the files {', '.join(OFFICIAL_TEXT_ENCODER_FILES)} from {url} into {local}"
    if is_offline(offline):
        raise ModelNotFoundError(
            f"The ELLA text encoder (flan-T5-XL) is missing and downloads are off (offline mode): {where}."
        )
    hub = _import_hub(local, url)
    logger.info("Downloading the ELLA text encoder (flan-T5-XL, about 3 GB) from %s to %s", url, local)
    try:
        hub.snapshot_download(
            OFFICIAL_REPO,
            revision=OFFICIAL_REVISION,
            allow_patterns=[f"{OFFICIAL_TEXT_ENCODER}/{pattern}" for pattern in ENCODER_FILE_PATTERNS],
            local_dir=str(paths.text_encoders),
            cache_dir=_str_or_none(paths.hub_cache),
            endpoint=endpoint,
        )
    except _hub_errors() as err:
        raise _download_failed("the ELLA text encoder (flan-T5-XL)", url, where, err) from err
    if not _is_complete_encoder(local):  # the client returns an existing local_dir as is when the hub is unreachable
        raise ModelNotFoundError(
            f"Could not download the ELLA text encoder (flan-T5-XL) from {url}: {local} still lacks config.json, the "
            f"weights or the tokenizer (see the hub client's warning above). Check the connection and try again, or "
            f"{where}."
        )
    return local


def _ensure_hub_text_encoder(paths: ModelPaths, repo_id: str, offline: bool | None, endpoint: str | None) -> Path:
    cached = _encoder_in_hub_cache(paths, repo_id)
    if cached is not None:
        return cached
    url = f"{_endpoint(endpoint)}/{repo_id}"
    manual_folder = paths.text_encoders / repo_id.split("/")[1]
    where = f"download its config, tokenizer and safetensors files from {url} into {manual_folder}"
    if is_offline(offline):
        raise ModelNotFoundError(
            f"The text encoder {repo_id} is not in the Hugging Face cache and downloads are off (offline mode): "
            f"{where}."
        )
    hub = _import_hub(paths.text_encoders, url)
    logger.info("Downloading the text encoder %s from %s into the Hugging Face cache", repo_id, url)
    try:
        folder = Path(
            hub.snapshot_download(
                repo_id,
                allow_patterns=list(ENCODER_FILE_PATTERNS),
                ignore_patterns=["*/*"],  # top-level files only: no variants, no onnx/ or original/ folders
                cache_dir=_str_or_none(paths.hub_cache),
                endpoint=endpoint,
            )
        )
    except _hub_errors() as err:
        raise _download_failed(f"the text encoder {repo_id}", url, where, err) from err
    if not _is_complete_encoder(folder):
        raise ModelNotFoundError(
            f"After downloading, {folder} still lacks config.json, a tokenizer file or safetensors weights: either the "
            f"hub was unreachable (see the hub client's warning above; try again) or {repo_id} has no safetensors "
            "weights (pickled .bin weights are never loaded); choose another encoder, or "
            f"{where}."
        )
    return folder


def _official_encoder_in_hub_cache(paths: ModelPaths) -> Path | None:
    return _cached_folder(paths, OFFICIAL_REPO, f"{OFFICIAL_TEXT_ENCODER}/config.json")


def _encoder_in_hub_cache(paths: ModelPaths, repo_id: str) -> Path | None:
    return _cached_folder(paths, repo_id, "config.json")


def _cached_folder(paths: ModelPaths, repo_id: str, config_file: str) -> Path | None:
    """Folder holding ``config_file`` in the hub cache's snapshot of ``main`` if complete; no network call."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo_id, config_file, cache_dir=_str_or_none(paths.hub_cache))
    except (OSError, ValueError):
        return None
    if not isinstance(found, str):
        return None
    folder = Path(found).parent
    return folder if _is_complete_encoder(folder) else None


def _import_hub(target: Path, url: str) -> Any:
    try:
        import huggingface_hub
    except ImportError as err:
        raise ModelNotFoundError(
            f"The Python package huggingface_hub is not installed, so {url} cannot be downloaded: install it, or "
            f"download the file by hand to {target}."
        ) from err
    return huggingface_hub


def _hub_errors() -> tuple[type[BaseException], ...]:
    """Exceptions a hub download raises for network, server and cache problems (they differ between versions)."""
    classes: list[type[BaseException]] = [OSError]
    errors = sys.modules.get("huggingface_hub.errors")
    for name in ("HfHubHTTPError", "EntryNotFoundError", "LocalEntryNotFoundError", "OfflineModeIsEnabled"):
        if isinstance(getattr(errors, name, None), type):
            classes.append(getattr(errors, name))
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type):
            classes.append(cls)
    return tuple(classes)


def _download_failed(what: str, url: str, manual: str, err: BaseException) -> ModelNotFoundError:
    detail = (str(err).strip().splitlines() or [""])[0][:300]
    return ModelNotFoundError(
        f"Could not download {what} from {url} ({type(err).__name__}: {detail}). Check the internet connection, proxy "
        f"and HF_ENDPOINT settings and try again (a partial download continues), or {manual}; set HF_HUB_OFFLINE=1 to "
        "stop trying."
    )


def _endpoint(endpoint: str | None) -> str:
    return (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def _str_or_none(path: Path | None) -> str | None:
    return None if path is None else str(path)
