"""Errors the user can act on.

Every message is a full sentence that says what went wrong and what to do about it (which file, which
setting).  The WebUI layer shows these in the console and the generation's info text; the CLI prints them.
"""

from __future__ import annotations


class ELLAError(Exception):
    """Base class of the errors this project raises on purpose."""


class ConnectorLoadError(ELLAError):
    """A connector file is missing, corrupt, not safetensors, or not in a TSC layout."""


class TextEncoderError(ELLAError):
    """An LLM text encoder cannot be loaded or does not fit the connector."""


class ModelNotFoundError(ELLAError):
    """A model is neither on disk nor downloadable (offline mode, no network)."""


class InputError(ELLAError):
    """Arguments of the wrong shape, type or value were handed to the core."""
