"""The models that make eval's images: the base, the LLM (for connectors) and the base's own CLIP (for the
baseline), loaded once; the LLM's features and CLIP's rows cached per text on the CPU."""

from __future__ import annotations

import gc
from pathlib import Path

import torch


class ImageModels:
    def __init__(self, config, device, need_llm: bool):
        from ..train.model import load_base
        from ..train.runtime import load_encoder, weight_dtype

        self.config, self.device = config, device
        self.base = load_base(config, device, weight_dtype(config))
        self.encoder = load_encoder(config, device) if need_llm else None
        self.base_text = None
        self._features: dict[tuple, tuple] = {}
        self._pooled: dict[str, torch.Tensor | None] = {}
        self._clip: dict[str, tuple] = {}

    def connector(self, path: Path):
        """The connector file, checked against the base and the LLM."""
        from .. import load_connector
        from ..train.cli import check_connector_fits_base

        connector = load_connector(path, self.device, torch.float32)
        check_connector_fits_base(path, connector, self.base)
        self.encoder.check_fits(connector.config.in_width, path.name)
        return connector

    def features(self, trained, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The LLM's features of ``text`` as the connector was trained (``trained``: its config as trained)."""
        model = trained.model
        key = (model["llm_layer"], model["token_length"], model["max_length"], text)
        if key not in self._features:
            self._features[key] = encode_text(self.encoder, trained, text)
        return self._features[key]

    def pooled(self, text: str) -> torch.Tensor | None:
        """SDXL: CLIP-G's pooled embedding of ``text`` (None for SD 1.5)."""
        if text not in self._pooled:
            pooled = self.base.pooled([text])
            self._pooled[text] = None if pooled is None else pooled.cpu()
        return self._pooled[text]

    def baseline(self, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The base's own CLIP rows (and SDXL's pooled embedding) of ``text``."""
        if self.base_text is None:
            from ..train.runtime import weight_dtype
            from .baseline import load_base_text

            self.base_text = load_base_text(self.config, self.base, self.device, weight_dtype(self.config))
        if text not in self._clip:
            rows, pooled = self.base_text.encode(text)
            self._clip[text] = (rows.cpu(), None if pooled is None else pooled.cpu())
        return self._clip[text]

    def close(self) -> None:
        self.base = self.encoder = self.base_text = None
        self._features.clear()
        free(self.device)


def encode_text(encoder, config, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(features, mask)`` of one text on the CPU as training feeds a connector: the mask only for flexible length
    (fixed length pads to max_length and attends to the padding, as the reference does)."""
    from ..train.runtime import token_max_length

    encoder = encoder.with_layer(config.model["llm_layer"])  # itself for T5 encoders and the same layer
    max_length = token_max_length(config)
    features, mask = encoder.encode([text], max_length)
    return features.cpu(), (mask.cpu() if max_length is None else None)


def free(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
