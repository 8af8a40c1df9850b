"""Connector files: reading, checking and writing TSC weights in the official safetensors layout.

The module itself is in ``connector.py``; this file is everything that touches the disk (as diffusers keeps its
models apart from their loading code). Only safetensors files are read: never a pickle.

A file's safetensors metadata may carry (all values are strings):

- ``ella.heads``: the attention head count (the only part of the shape the tensors cannot tell; 8 when absent);
- ``ella.config``: the whole ``ConnectorConfig`` as JSON (informative; the shapes decide);
- ``ella.pooled``: where SDXL's pooled text vector comes from: ``attention`` (the file carries an attention pool
  under ``pool.``, beside the TSC) or ``clip`` (CLIP-G's, as the host makes it); a file without the key is ``clip``
  and must hold no pool (the official files, and every file saved before pools existed, load as they always did);
- what made the connector, written by the trainer (``ella_ext.train``) under the ``META_*`` keys below, read with
  ``read_metadata``; ``read_training_facts`` gives the ones the extension acts on as a ``TrainingFacts``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .connector import Connector, ConnectorConfig
from .errors import ConnectorLoadError

HEADS_METADATA_KEY = "ella.heads"
CONFIG_METADATA_KEY = "ella.config"
POOLED_METADATA_KEY = "ella.pooled"
POOLED_KINDS = ("clip", "attention")  # clip: CLIP-G's pooled vector (no pool in the file); attention: the file's pool
# How a trained connector was made (strings; absent from the official file).
META_LLM = "ella.llm"  # the LLM's hub id or folder name
META_LLM_LAYER = "ella.llm_layer"  # decoder-only LLMs: the hidden state used (e.g. "-1")
META_TOKEN_LENGTH = "ella.token_length"  # "fixed" or "flexible"
META_MAX_LENGTH = "ella.max_length"  # e.g. "128"
META_FEATURE_DTYPE = "ella.feature_dtype"  # the LLM's dtype in training: "float16", "bfloat16", "float32"
META_BASE_FAMILY = "ella.base_family"  # "sd15" or "sdxl"
META_STEPS = "ella.steps"  # optimiser steps trained
META_TRAINING = "ella.training"  # how it was trained: JSON (lr, batch, steps, data, base, LLM, trainer version)

log = logging.getLogger("ella")


def _describe(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_layout(config: ConnectorConfig, shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse a file whose tensors differ from the layout ``config`` implies, naming the offending tensors."""
    expected = config.expected_shapes()
    missing = sorted(k for k in expected if k not in shapes)
    unexpected = sorted(k for k in shapes if k not in expected)
    wrong = sorted(
        f"{k} {list(shapes[k])} (expected {list(expected[k])})"
        for k in expected
        if k in shapes and tuple(shapes[k]) != expected[k]
    )
    problems = []
    if missing:
        problems.append(f"missing tensors: {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_describe(unexpected)}")
    if wrong:
        problems.append(f"tensors of the wrong shape: {_describe(wrong)}")
    if problems:
        raise ConnectorLoadError(
            "This file is not a complete ELLA connector (" + "; ".join(problems) + "). Download the connector "
            "again, or pick a TSC file saved in the official layout."
        )


def _read_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except Exception as exc:  # safetensors raises its own error types, which differ between versions
        raise ConnectorLoadError(
            f"{path} is not a readable safetensors file ({exc}). It may be corrupt or a partial download: delete "
            "it and download it again."
        ) from exc
    return shapes, metadata


def _resolve_path(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConnectorLoadError(
            f"No connector file at {path}. Put ella-sd1.5-tsc-t5xl.safetensors (from the QQGYLab/ELLA repository "
            "on the Hugging Face hub) in the models/ELLA folder, or give the right path."
        )
    if path.suffix != ".safetensors":
        raise ConnectorLoadError(
            f"{path.name} is not a .safetensors file. Connectors are loaded from safetensors only (pickled "
            ".bin/.pt/.ckpt files can run code when loaded); use the .safetensors release."
        )
    return path


def read_config(path: str | Path, heads: int | None = None) -> ConnectorConfig:
    """The configuration of a connector file, from its header only (no weights are read)."""
    shapes, metadata = _read_header(_resolve_path(path))
    return _config_from(shapes, metadata, heads)


def _config_from(shapes: dict, metadata: dict, heads: int | None) -> ConnectorConfig:
    if heads is None and HEADS_METADATA_KEY in metadata:
        try:
            heads = int(metadata[HEADS_METADATA_KEY])
        except ValueError as exc:
            raise ConnectorLoadError(
                f"The file's metadata {HEADS_METADATA_KEY}={metadata[HEADS_METADATA_KEY]!r} is not a whole number; "
                "fix the metadata or pass heads= explicitly."
            ) from exc
    pooled = str(metadata.get(POOLED_METADATA_KEY, "clip")).strip().lower()
    if pooled not in POOLED_KINDS:
        raise ConnectorLoadError(
            f"The file's metadata {POOLED_METADATA_KEY}={metadata[POOLED_METADATA_KEY]!r} is not one of "
            f"{', '.join(POOLED_KINDS)}; the file is damaged or from a newer version of the extension."
        )
    config = ConnectorConfig.from_shapes(shapes, heads, pooled=pooled == "attention")
    check_layout(config, shapes)
    return config


def pooled_kind(config: ConnectorConfig) -> str:
    """What ``ella.pooled`` says for a connector of this configuration: "attention" with a pool, else "clip"."""
    return "attention" if config.pooled_width is not None else "clip"


def load_connector(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    heads: int | None = None,
) -> Connector:
    """Load a TSC from a safetensors file, strictly; returns the module in eval mode without gradients."""
    from safetensors.torch import load_file

    path = _resolve_path(path)
    shapes, metadata = _read_header(path)
    config = _config_from(shapes, metadata, heads)
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise ConnectorLoadError(
            f"{path} could not be read ({exc}). It may be corrupt or a partial download: delete it and download it "
            "again."
        ) from exc
    with torch.device("meta"):
        model = Connector(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.to(device=device, dtype=dtype)
    model.requires_grad_(False)
    return model.eval()


def read_metadata(path: str | Path) -> dict[str, str]:
    """The file's safetensors metadata (strings), from its header only; ``{}`` when it has none."""
    return dict(_read_header(_resolve_path(path))[1])


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                       torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path,
                      metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file whose bytes depend only on its contents: the header's keys sorted, the tensors in
    name order. (safetensors' own writer orders the metadata differently in every process, so the same weights gave
    files with different digests.) Readers see an ordinary safetensors file."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    names, offset = sorted(tensors), 0
    for name in names:
        tensor = tensors[name]
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: dtype {tensor.dtype} is not written here")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name in names:  # one tensor's bytes at a time: no second copy of the whole file in memory
            tensor = tensors[name].detach().cpu().contiguous()
            if tensor.numel():
                f.write(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


def save_connector(model: Connector, path: str | Path, metadata: dict[str, str] | None = None,
                   dtype: torch.dtype | None = None) -> None:
    """Save in the official layout (in ``dtype``, default the model's), with the head count and the config in the
    metadata, plus ``metadata`` (strings: what made the connector, for the extension to show). The same weights and
    metadata give the same bytes."""
    state = {k: v.detach().to(dtype or v.dtype) for k, v in model.state_dict().items()}
    header = {str(k): str(v) for k, v in (metadata or {}).items()}
    header[HEADS_METADATA_KEY] = str(model.config.heads)
    described = asdict(model.config)
    if described["pooled_width"] is None:  # a connector without a pool is saved byte for byte as before pools
        del described["pooled_width"]
    header[CONFIG_METADATA_KEY] = json.dumps(described, sort_keys=True)
    if model.config.pooled_width is not None:  # a file without the key has no pool, as before pools existed
        header[POOLED_METADATA_KEY] = pooled_kind(model.config)
    write_safetensors(state, path, header)


# -- how a connector was trained ------------------------------------------------------------------------------------

TOKEN_LENGTHS = ("fixed", "flexible")
FEATURE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
BASE_FAMILIES = ("sd15", "sdxl")
# T5-family names: flan-t5-xl, t5-v1_1-xxl, umt5-xxl, mt5-xl, byt5-small (not t5gemma, an encoder-decoder of its own)
_T5_NAME = re.compile(r"(?<![a-z0-9])(?:by|um|m|u)?t5(?![a-z])")


@dataclass(frozen=True)
class TrainingFacts:
    """How a connector was trained, from its file's metadata: what the extension must repeat to run it as trained.

    Each field is None where the file does not say. The official connector's file says nothing at all (it was
    trained with flan-T5-XL's encoder, its last layer, fp16 features and fixed 128 tokens, for SD 1.5); a value of
    None means exactly that behaviour to the readers below (``layer`` -1, ``llm_dtype`` fp16 on CUDA), except the
    token length, which then stays the user's choice. A value the file gives but that cannot be read is left None and
    named in ``problems`` (and logged): a bad file never stops a generation for its metadata.
    """

    llm: str | None = None  # the LLM's hub id or folder name
    llm_layer: int | None = None  # decoder-only LLMs: the hidden state (-1: the last); T5-family encoders ignore it
    token_length: str | None = None  # "fixed" or "flexible"
    max_length: int | None = None  # tokens the LLM read (fixed: padded to it; flexible: truncated at it)
    feature_dtype: str | None = None  # the LLM's dtype in training: "float16", "bfloat16" or "float32"
    base_family: str | None = None  # "sd15" or "sdxl"
    problems: tuple[str, ...] = ()  # metadata values that could not be read (each one sentence)

    @property
    def layer(self) -> int:
        """The hidden state a decoder-only LLM must give this connector (-1, the last, when the file does not say)."""
        return -1 if self.llm_layer is None else self.llm_layer

    @property
    def fixed_length(self) -> int | None:
        """The fixed token count it was trained with; None if trained flexible or if the file does not say."""
        return self.max_length if self.token_length == "fixed" else None

    @property
    def llm_is_t5(self) -> bool | None:
        """Whether ``llm`` names a T5-family encoder (flan-T5, T5 v1.1, mT5, UMT5, ByT5), by its name; None when the
        file names no LLM."""
        return None if not self.llm else bool(_T5_NAME.search(llm_key(self.llm)))

    def llm_dtype(self, device: torch.device | str) -> torch.dtype:
        """The LLM's precision when the user leaves it to the extension ("auto"): on CUDA the dtype the connector's
        features had in training (fp16 when the file does not say, as for the official connector), because fp16 and
        bf16 features give visibly different images; fp32 on the CPU and elsewhere (no fast half precision there). A
        connector trained on fp32 features (a CPU run) gets fp16 on CUDA: fp32 would double the LLM's memory for a
        difference far smaller than fp16's and bf16's."""
        if torch.device(device).type != "cuda":
            return torch.float32
        trained = FEATURE_DTYPES.get(self.feature_dtype or "", torch.float16)
        return torch.float16 if trained == torch.float32 else trained

    def describe_tokens(self) -> str:
        """How it read tokens, for messages: ``fixed 128``, ``flexible`` (or ``flexible, up to 256``); "" unknown."""
        if self.token_length == "fixed" and self.max_length is not None:
            return f"fixed {self.max_length}"
        if self.token_length == "flexible":
            return "flexible" if self.max_length is None else f"flexible, up to {self.max_length}"
        return ""

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], source: str = "the connector") -> TrainingFacts:
        """The facts in a file's metadata strings; unreadable values are left None, named in ``problems`` and
        logged as warnings (``source`` names the file in them)."""
        problems: list[str] = []

        def text(key: str, allowed) -> str | None:
            value = metadata.get(key)
            if value is None:
                return None
            cleaned = str(value).strip().lower()
            if cleaned in allowed:
                return cleaned
            problems.append(f"{key}={value!r} is not one of {', '.join(allowed)}")
            return None

        def number(key: str, minimum: int | None) -> int | None:
            value = metadata.get(key)
            if value is None:
                return None
            try:
                found = int(str(value).strip())
            except ValueError:
                found = None
            if found is None or (minimum is not None and found < minimum):
                problems.append(f"{key}={value!r} is not a whole number" + (f" from {minimum}" if minimum else ""))
                return None
            return found

        llm = str(metadata.get(META_LLM) or "").strip() or None
        facts = cls(
            llm=llm,
            llm_layer=number(META_LLM_LAYER, None),
            token_length=text(META_TOKEN_LENGTH, TOKEN_LENGTHS),
            max_length=number(META_MAX_LENGTH, 1),
            feature_dtype=text(META_FEATURE_DTYPE, tuple(FEATURE_DTYPES)),
            base_family=text(META_BASE_FAMILY, BASE_FAMILIES),
            problems=tuple(problems),
        )
        for problem in problems:
            log.warning("ELLA: %s: the metadata %s; it is ignored (the extension's default applies).", source,
                        problem)
        return facts


def read_training_facts(path: str | Path) -> TrainingFacts:
    """The ``TrainingFacts`` of a connector file, from its header only (ConnectorLoadError if it cannot be read)."""
    path = _resolve_path(path)
    return TrainingFacts.from_metadata(_read_header(path)[1], source=path.name)


def llm_key(name: str) -> str:
    """One spelling for an LLM named by folder, path, hub id or the hub cache's folder name, to compare two names:
    the last part, lower case (``models--google--flan-t5-xl--text_encoder``, ``google/flan-t5-xl`` and
    ``/models/flan-t5-xl`` are all ``flan-t5-xl``)."""
    text = name.strip().replace("\\", "/").lower()
    if text.startswith("models--"):  # a hub-cache style folder: models--owner--name[--subfolder]
        text = text.removeprefix("models--").removesuffix("--text_encoder").replace("--", "/")
    return text.rstrip("/").rsplit("/", 1)[-1]
