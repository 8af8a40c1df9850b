"""ELLA's HTTP API: model listing, a token counter, and validation of the ELLA arguments of txt2img / img2img requests
before the host runs them.

Errors have one shape, the one the validation answers generation requests with: ``{"error": <kind>, "detail":
<what to do>}``, HTTP 422 for arguments the client must change (``ELLAArgumentError``), 404 for a listed text encoder
that is not on disk yet (``ELLAModelNotAvailable``). With ``--api-auth`` the ``/ella/v1/*`` routes ask for the same
HTTP Basic credentials as ``/sdapi/v1/*`` (``modules/api/api.py`` ``Api.auth``), and the validation answers only
requests that carry them (the others reach the host, which answers 401).

Host facts (AUTOMATIC1111 v1.10.1, commit 82a973c0): ``modules/script_callbacks.py`` ``on_app_started(callback)``
with ``callback(demo, app)`` (a FastAPI app); ``modules/api/api.py`` ``init_script_args`` copies
``alwayson_scripts[<title>]["args"]`` into the script's slots by position (a JSON object is one value: it lands in the
first slot) and matches the title case-insensitively; ``webui.py`` adds its own middleware after the app has started
(``modules/initialize_util.py`` ``setup_middleware``), and ELLA's is installed the same way.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
from collections import OrderedDict
from hmac import compare_digest
from typing import Any

from fastapi import Request  # a module-level name: FastAPI resolves the dependency's annotation from here

from .. import model_files, options
from ..errors import ELLAError, InputError, ModelNotFoundError
from ..pass_rows import PassTexts
from . import infotext, loading

log = logging.getLogger("ella")

TITLE = "ELLA"
GENERATION_PATHS = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img")

_tokenizers: OrderedDict[str, tuple[Any, int, threading.Lock]] = OrderedDict()  # name -> tokenizer, limit, lock
_tokenizers_lock = threading.Lock()


def models_listing() -> dict[str, Any]:
    paths = loading.model_paths()

    def row(e):  # names, never paths: a remote client has no business knowing the server's folders
        return {"name": e.name, "official": e.official, "available": e.available, "problem": e.problem}

    return {
        # "llm": what a connector says it was trained with ("" when the file does not say, as the official one)
        "connectors": [{**row(e), "llm": loading.connector_llm(e.path) if e.available else ""}
                       for e in model_files.list_connectors(paths).values()],
        "text_encoders": [row(e) for e in model_files.list_text_encoders(paths).values()],
        "args": list(options.FIELD_NAMES),
        "defaults": {name: getattr(options.DEFAULTS, name) for name in options.FIELD_NAMES},
        "choices": {"token_length": list(options.TOKEN_LENGTHS), "clip_mode": list(options.CLIP_MODES),
                    "negative": list(options.NEGATIVE_MODES)},
    }


def count_tokens(text: str, text_encoder: str | None = None) -> dict[str, Any]:
    """LLM tokens of the longest text the prompt gives (each AND part and schedule variant counted alone), and
    ``limit``: the most tokens the text encoder reads in flexible mode.

    Runs in the API's thread pool and in the UI's events: a tokenizer is used by one thread at a time (the fast
    tokenizers fail with "Already borrowed" otherwise)."""
    if not isinstance(text, str):
        raise InputError("ELLA: 'text' must be a string.")
    name = text_encoder or options.OFFICIAL_TEXT_ENCODER_NAME
    if not isinstance(name, str):
        raise InputError("ELLA: 'text_encoder' must be the name of a listed text encoder.")
    loading.check_name("text encoder", name)
    tokenizer, limit, lock = _tokenizer(name)
    texts = PassTexts([text], [""], steps=1000).every_text()
    with lock:
        tokens = max(len(tokenizer(t, add_special_tokens=True)["input_ids"]) for t in texts)
    return {"tokens": tokens, "limit": limit, "text_encoder": name}


def _tokenizer(name: str) -> tuple[Any, int, threading.Lock]:
    from ..llm_files import load_tokenizer_and_limit

    with _tokenizers_lock:
        if name in _tokenizers:
            _tokenizers.move_to_end(name)
            return _tokenizers[name]
    path = model_files.ensure_text_encoder(loading.model_paths(), name, offline=True)
    loaded = (*load_tokenizer_and_limit(path), threading.Lock())
    with _tokenizers_lock:
        found = _tokenizers.setdefault(name, loaded)  # another thread may have loaded it meanwhile: one is kept
        _tokenizers.move_to_end(name)
        while len(_tokenizers) > 4:
            _tokenizers.popitem(last=False)
    return found


def error_body(err: ELLAError) -> tuple[int, dict[str, str]]:
    """The status and the JSON body of an ELLA error answer (the one shape of every ELLA error); no server paths."""
    detail = infotext.without_paths(str(err))
    if isinstance(err, InputError):
        return 422, {"error": "ELLAArgumentError", "detail": detail}
    if isinstance(err, ModelNotFoundError):
        return 404, {"error": "ELLAModelNotAvailable", "detail": detail}
    return 500, {"error": "ELLAModelUnusable", "detail": detail}  # on disk, but it cannot be read


def _credentials() -> dict[str, str] | None:
    """``--api-auth`` as the host reads it (``user:password`` pairs, comma-separated); None when it is not set."""
    from modules import shared

    value = getattr(getattr(shared, "cmd_opts", None), "api_auth", None)
    if not value:
        return None
    return dict(pair.split(":", 1) for pair in value.split(","))


def authorized(authorization: str | None) -> bool:
    """Whether an ``Authorization`` header passes the host's API authentication (always, without ``--api-auth``)."""
    credentials = _credentials()
    if credentials is None:
        return True
    scheme, _, encoded = (authorization or "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, _, password = base64.b64decode(encoded, validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    return user in credentials and compare_digest(password, credentials[user])


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
        chosen = options.from_script_args(args)
        if chosen.enabled:
            loading.check_names(chosen)
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
        if error is not None and authorized(_header(scope, b"authorization")):  # else the host answers 401
            body = json.dumps({"error": "ELLAArgumentError", "detail": error}).encode()
            await send({"type": "http.response.start", "status": 422,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, _replay(chunks, receive), send)


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


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
    from fastapi import Body, Depends, HTTPException
    from fastapi.responses import JSONResponse

    def auth(request: Request) -> None:
        if not authorized(request.headers.get("authorization")):
            raise HTTPException(status_code=401, detail="Incorrect username or password",
                                headers={"WWW-Authenticate": "Basic"})

    guarded = [Depends(auth)]

    @app.get("/ella/v1/models", dependencies=guarded)
    def ella_models():
        return models_listing()

    @app.post("/ella/v1/tokens", dependencies=guarded)
    def ella_tokens(payload: dict = Body(...)):  # noqa: B008 - FastAPI's way to take a JSON body
        try:
            return count_tokens(payload.get("text", ""), payload.get("text_encoder") or None)
        except ELLAError as err:
            status, body = error_body(err)
            return JSONResponse(body, status_code=status)

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
