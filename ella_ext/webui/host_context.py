"""The host's text conditioning as ELLA meets it: the context widths of the model families, SDXL's ``DictWithShape``
(``crossattn`` plus the ``vector`` of the pooled text embedding and the size / crop embeddings), and putting ELLA's
rows (and a connector pool's vectors) into the host's container."""

from __future__ import annotations

import torch

from ..errors import InputError

SDXL_CONTEXT_WIDTH = 2048
SDXL_POOLED_WIDTH = 1280  # CLIP-G's pooled vector: the first columns of SDXL's vector conditioning
SDXL_VECTOR_WIDTH = 2816  # the pooled vector and six size / crop embeddings of 256


def family(width: int) -> str:
    """The checkpoints a context width belongs to, as a user names them."""
    return {768: "SD 1.5", 1024: "SD 2", SDXL_CONTEXT_WIDTH: "SDXL"}.get(width, f"{width}-wide context")


def check_pool(name: str, connector, width: int) -> bool:
    """Whether the connector's attention pool gives this generation's pooled vector: on SDXL, when it has one (of
    SDXL's width). Other checkpoints take no pooled vector, so a pool does nothing there."""
    if not getattr(connector, "has_pool", False) or width != SDXL_CONTEXT_WIDTH:
        return False
    pooled_width = connector.config.pooled_width
    if pooled_width != SDXL_POOLED_WIDTH:
        raise InputError(
            f"ELLA: the connector {name} makes {pooled_width}-wide pooled vectors, but SDXL takes "
            f"{SDXL_POOLED_WIDTH}: it was trained on a base of another shape. Pick a connector trained on an SDXL "
            "base."
        )
    return True


def crossattn(context) -> torch.Tensor:
    return context["crossattn"] if isinstance(context, dict) else context


def rebuild(original, tensor: torch.Tensor, pooled: torch.Tensor | None = None):
    """The new context in the host's container: SDXL's ``DictWithShape`` keeps ``vector`` and its other keys; with
    ``pooled`` (the connector's pool, one row per row) the vector's pooled columns are replaced by it, its size /
    crop embeddings left as the host made them."""
    if not isinstance(original, dict):
        return tensor
    changed = {"crossattn": tensor}
    if pooled is not None:
        changed["vector"] = with_pooled(original["vector"], pooled)
    return type(original)({**original, **changed})


def with_pooled(vector: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    if vector.ndim != 2 or vector.shape[1] != SDXL_VECTOR_WIDTH or vector.shape[0] != pooled.shape[0]:
        raise InputError(
            f"ELLA: the checkpoint's vector conditioning is {list(vector.shape)}, not SDXL's [{pooled.shape[0]}, "
            f"{SDXL_VECTOR_WIDTH}] (an SDXL refiner?), so the connector's pooled vector cannot replace CLIP-G's there"
        )
    vector = vector.clone()
    vector[:, : pooled.shape[1]] = pooled.to(device=vector.device, dtype=vector.dtype)
    return vector
