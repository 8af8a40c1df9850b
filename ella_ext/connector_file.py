"""Connector files: reading, checking and writing TSC weights in the official safetensors layout.

The module itself is in ``connector.py``; this file is everything that touches the disk (as diffusers keeps its
models apart from their loading code). Only safetensors files are read: never a pickle.

A file's safetensors metadata may carry (all values are strings):

- ``ella.heads``: the attention head count (the only part of the shape the tensors cannot tell; 8 when absent);
- ``ella.config``: the whole ``ConnectorConfig`` as JSON (informative; the shapes decide);
- what made the connector, written by the trainer (``ella_ext.train``) under the ``META_*`` keys below, read with
  ``read_metadata`` and shown by the extension.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from .connector import Connector, ConnectorConfig
from .errors import ConnectorLoadError

HEADS_METADATA_KEY = "ella.heads"
CONFIG_METADATA_KEY = "ella.config"
# How a trained connector was made (strings; absent from the official file).
META_LLM = "ella.llm"  # the LLM's hub id or folder name
META_LLM_LAYER = "ella.llm_layer"  # decoder-only LLMs: the hidden state used (e.g. "-1")
META_TOKEN_LENGTH = "ella.token_length"  # "fixed" or "flexible"
META_MAX_LENGTH = "ella.max_length"  # e.g. "128"
META_FEATURE_DTYPE = "ella.feature_dtype"  # the LLM's dtype in training: "float16", "bfloat16", "float32"
META_BASE_FAMILY = "ella.base_family"  # "sd15" or "sdxl"
META_STEPS = "ella.steps"  # optimiser steps trained


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
    config = ConnectorConfig.from_shapes(shapes, heads)
    check_layout(config, shapes)
    return config


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


def save_connector(model: Connector, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Save in the official layout, with the head count and the config in the metadata, plus ``metadata`` (strings:
    what made the connector, for the extension to show)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    header = {str(k): str(v) for k, v in (metadata or {}).items()}
    header[HEADS_METADATA_KEY] = str(model.config.heads)
    header[CONFIG_METADATA_KEY] = json.dumps(asdict(model.config))
    save_file(state, str(path), metadata=header)
