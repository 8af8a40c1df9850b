"""ELLA for Stable Diffusion WebUIs: the host-free core.

Public API (scripts, benchmarks and checks outside the WebUI use exactly these names):

- ``load_connector(path, device="cpu", dtype=torch.float32, heads=None)`` -> a torch module ``m``;
  ``m(features, timesteps, mask=None)`` -> ``[B, latents, D_out]``.
- ``load_text_encoder(path_or_id, device="cpu", dtype=None)`` -> an object whose ``encode(texts, max_length)``
  returns ``(features [B, S, D], mask [B, S])``; ``max_length=None`` means flexible length.
"""

__version__ = "0.1.0"  # pyproject.toml's version (a test keeps them equal)

from .connector_file import load_connector, save_connector
from .errors import ConnectorLoadError, ELLAError, InputError, ModelNotFoundError, TextEncoderError

__all__ = [
    "ConnectorLoadError",
    "ELLAError",
    "InputError",
    "ModelNotFoundError",
    "TextEncoderError",
    "load_connector",
    "load_text_encoder",
    "save_connector",
]


def load_text_encoder(path_or_id, device="cpu", dtype=None, **kwargs):
    """See ``ella_ext.text_encoders.load_text_encoder`` (imported lazily: it pulls in transformers)."""
    from .text_encoders import load_text_encoder as _load

    return _load(path_or_id, device=device, dtype=dtype, **kwargs)
