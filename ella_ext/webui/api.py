"""ELLA's HTTP API: model listing, a token counter (for the UI's live counter), and validation of the ELLA arguments
of txt2img / img2img requests before the host runs them.

Host facts (AUTOMATIC1111 v1.10.1, commit 82a973c0): ``modules/script_callbacks.py`` ``on_app_started(callback)``
with ``callback(demo, app)`` (a FastAPI app); ``modules/api/api.py`` ``init_script_args`` copies
``alwayson_scripts[<title>]["args"]`` into the script's slots by position (a JSON object is one value: it lands in the
first slot) and matches the title case-insensitively; ``webui.py`` adds its own middleware after the app has started
(``modules/initialize_util.py`` ``setup_middleware``), and ELLA's is installed the same way.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from typing import Any

from .. import model_files, options
from ..errors import ELLAError
from ..pass_rows import PassTexts
from . import loading

log = logging.getLogger("ella")

TITLE = "ELLA"
GENERATION_PATHS = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img")

_tokenizers: OrderedDict[str, Any] = OrderedDict()
_tokenizer_lock = threading.Lock()


def models_listing() -> dict[str, Any]:
    paths = loading.model_paths()

    def rows(entries):
        return [{"name": e.name, "path": str(e.path), "official": e.official, "available": e.available}
                for e in entries.values()]

    return {
        "connectors": rows(model_files.list_connectors(paths)),
        "text_encoders": rows(model_files.list_text_encoders(paths)),
        "args": list(options.FIELD_NAMES),
        "defaults": {name: getattr(options.DEFAULTS, name) for name in options.FIELD_NAMES},
        "choices": {"token_length": list(options.TOKEN_LENGTHS), "clip_mode": list(options.CLIP_MODES),
                    "negative": list(options.NEGATIVE_MODES)},
    }


def count_tokens(text: str, text_encoder: str | None = None) -> dict[str, Any]:
    """LLM tokens of the longest text the prompt gives (each AND part and schedule variant counted alone)."""
    name = text_encoder or options.OFFICIAL_TEXT_ENCODER_NAME
    tokenizer = _tokenizer(name)
    texts = PassTexts([text], [""], steps=1000).every_text()
    tokens = max(len(tokenizer(t, add_special_tokens=True)["input_ids"]) for t in texts)
    return {"tokens": tokens, "text_encoder": name}


def _tokenizer(name: str):
    from ..text_encoders import load_tokenizer

    with _tokenizer_lock:
        if name in _tokenizers:
            _tokenizers.move_to_end(name)
            return _tokenizers[name]
    path = model_files.ensure_text_encoder(loading.model_paths(), name, offline=True)
    tokenizer = load_tokenizer(path)
    with _tokenizer_lock:
        _tokenizers[name] = tokenizer
        while len(_tokenizers) > 4:
            _tokenizers.popitem(last=False)
    return tokenizer


def request_error(body: bytes) -> str | None:
    """Why a txt2img/img2img request body's ELLA arguments are invalid, or None (also when there are none)."""
    try:
        payload = json.loads(body or b"{}")
    except ValueError:
        return None  # not ours to judge: the host answers malformed JSON itself
    scripts = payload.get("alwayson_scripts") if isinstance(payload, dict) else None
    if not isinstance(scripts, dict):
        return None
    entry = next((value for key, value in scripts.items() if str(key).lower() == TITLE.lower()), None)
    if not isinstance(entry, dict) or "args" not in entry:
        return None
    args = entry["args"]
    if not isinstance(args, list):
        return f"ELLA: 'args' must be a list (positional: {', '.join(options.FIELD_NAMES)}) or [{{named fields}}]."
    try:
        options.from_script_args(args)
    except ELLAError as err:
        return str(err)
    return None


class ValidationMiddleware:
    """Pure ASGI middleware: answers 422 with the reason when a generation request's ELLA arguments are invalid.
    The body is read once and replayed to the app unchanged."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http" or scope.get("method") != "POST" or scope.get("path") not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([message], receive), send)
                return
            chunks.append(message)
            more = message.get("more_body", False)
        error = request_error(b"".join(m.get("body", b"") for m in chunks))
        if error is not None:
            body = json.dumps({"error": "ELLAArgumentError", "detail": error}).encode()
            await send({"type": "http.response.start", "status": 422,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, _replay(chunks, receive), send)


def _replay(messages, receive):
    """The messages already read, then the real channel: after the body, a receive() waits for the client's actual
    disconnect (the host's BaseHTTPMiddleware listens for it; a made-up disconnect would cut the response)."""
    queue = list(messages)

    async def replay():
        if queue:
            return queue.pop(0)
        return await receive()

    return replay


def on_app_started(_demo, app) -> None:
    from fastapi import Body

    @app.get("/ella/v1/models")
    def ella_models():
        return models_listing()

    @app.post("/ella/v1/tokens")
    def ella_tokens(payload: dict = Body(...)):  # noqa: B008 - FastAPI's way to take a JSON body
        text = payload.get("text", "")
        if not isinstance(text, str):
            return {"error": "text must be a string"}
        try:
            return count_tokens(text, payload.get("text_encoder") or None)
        except ELLAError as err:
            return {"tokens": None, "error": str(err)}

    install_middleware(app)


def install_middleware(app) -> None:
    """Add the validation middleware to a running app the way the host adds its own (``initialize_util.py``
    ``setup_middleware``): reset the stack, add, rebuild. If this Starlette refuses, ``process()`` still validates."""
    try:
        app.middleware_stack = None
        app.add_middleware(ValidationMiddleware)
        app.middleware_stack = app.build_middleware_stack()
    except Exception as err:
        log.warning("ELLA: API arguments are checked at generation time only (%s)", err)
