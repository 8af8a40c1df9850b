"""The accordion (built under whichever gradio this stack has: 3.41.2 for A1111, 4.x for Forge), pasting image
parameters back, settings, XYZ axes, and the HTTP API (model listing, token counter, request validation)."""

from __future__ import annotations

from html.parser import HTMLParser

import gradio as gr
import pytest
from fastapi.security import HTTPBasicCredentials  # module level: FastAPI resolves the dependency's annotation here

from ella_ext import options
from ella_ext.webui import infotext

from .conftest import CONNECTOR, ENCODER


def build(script, is_img2img=False):
    with gr.Blocks():
        return script.ui(is_img2img)


def test_ui_builds_twice_with_the_documented_controls(host):
    # the host builds it for the page, and again inside a fresh gr.Blocks for the API's default args
    for is_img2img in (False, True, False):
        controls = build(host.script, is_img2img)
        assert len(controls) == len(options.FIELD_NAMES)
        values = [c.value for c in controls]
        assert values == [getattr(options.DEFAULTS, name) for name in options.FIELD_NAMES]
        assert CONNECTOR in controls[1].choices or (CONNECTOR, CONNECTOR) in controls[1].choices
    assert host.reported() == []


def blocks_by_elem_id(demo) -> dict:
    return {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}


def events(demo, target, trigger):
    """(fn, inputs, outputs, js, queue) of each event ``target``'s ``trigger`` starts: gradio 3 keeps them in two lists
    (``dependencies`` dicts and ``fns``), gradio 4 in one dict of ``BlockFunction``s."""
    if isinstance(demo.fns, dict):  # gradio 4
        return [(f.fn, f.inputs, f.outputs, f.js, f.queue) for f in demo.fns.values()
                if (target._id, trigger) in [tuple(t) for t in f.targets]]
    return [(f.fn, f.inputs, f.outputs, d["js"], d["queue"]) for d, f in zip(demo.dependencies, demo.fns)
            if d["trigger"] == trigger and target._id in d["targets"]]


def follow_ups(demo, event_fn):
    """The JavaScript of the events that run after the event whose Python function is ``event_fn`` (``.then``)."""
    if isinstance(demo.fns, dict):
        index = next(i for i, f in demo.fns.items() if f.fn is event_fn)
        return [f.js for f in demo.fns.values() if f.trigger_after == index]
    index = next(i for i, f in enumerate(demo.fns) if f.fn is event_fn)
    return [d["js"] for d in demo.dependencies if d["trigger_after"] == index]


@pytest.mark.parametrize("tab", ["txt2img", "img2img"])
def test_token_counter_is_a_ui_event_of_the_accordion(host, tab):
    """javascript/ella.js clicks #ella_<tab>_token_button and reads #ella_<tab>_token_counter; the event runs outside
    the queue (as the host's counter), its JavaScript puts the prompt into the first input, and none of these
    components is one of the script's args or a ui-config.json entry."""
    with gr.Blocks() as demo:
        controls = host.script.ui(tab == "img2img")
    ids = blocks_by_elem_id(demo)
    button, counter, text = (ids[f"ella_{tab}_{name}"] for name in ("token_button", "token_counter", "token_text"))
    assert not {id(button), id(counter), id(text)} & {id(c) for c in controls} and len(controls) == 9
    assert all(c.do_not_save_to_config for c in (button, counter, text))
    assert button.visible and "ella-hidden" in button.elem_classes  # in the DOM for ella.js to click, hidden by CSS
    assert counter.visible
    [(fn, inputs, outputs, js, queue)] = events(demo, button, "click")
    assert queue is False and f"ellaTokenCounterArgs('{tab}', args)" in js
    enabled, _, encoder, token_length, max_length, _, _, llm_prompt, _ = controls
    assert [id(c) for c in inputs] == [id(c) for c in (text, enabled, encoder, token_length, max_length, llm_prompt)]
    assert [id(c) for c in outputs] == [id(counter)]
    assert fn is ui_module().token_counter_html
    if isinstance(demo.fns, dict):  # gradio 4 drops a click while the event runs unless told to run the last one
        assert next(f for f in demo.fns.values() if f.fn is fn).trigger_mode == "always_last"
    assert [f"ellaTokenCounterAnswered('{tab}')" in (j or "") for j in follow_ups(demo, fn)] == [True]


def ui_module():
    from ella_ext.webui import ui

    return ui


class _Span(HTMLParser):
    def __init__(self, text):
        super().__init__()
        self.spans, self.text = [], ""
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.spans.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text += data


def counter(html_text):
    """(text, classes, title) of the counter's HTML."""
    parsed = _Span(html_text)
    [(tag, attrs)] = parsed.spans
    assert tag == "span"
    return parsed.text, attrs["class"].split(), attrs["title"]


@pytest.fixture
def llm_tokens(models_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models_dir / "ELLA" / "text_encoders" / ENCODER)
    return lambda text: len(tokenizer(text)["input_ids"])


def test_token_counter_event_counts_in_python(host, llm_tokens):
    count = ui_module().token_counter_html
    prompt, other = "a red cube on a blue sphere", "a cat"
    assert llm_tokens(prompt) != llm_tokens(other)

    text, classes, title = counter(count(prompt, True, ENCODER, "Flexible", 128, ""))
    assert (text, classes) == (f"ELLA {llm_tokens(prompt)}", ["ella-count"]) and "from the prompt" in title
    text, classes, _ = counter(count(prompt, True, ENCODER, "Fixed", 128.0, ""))  # a gradio 3 slider gives floats
    assert (text, classes) == (f"ELLA {llm_tokens(prompt)}/128", ["ella-count"])
    text, _, title = counter(count(prompt, True, ENCODER, "Flexible", 128, other))  # the LLM reads the ELLA prompt
    assert text == f"ELLA {llm_tokens(other)}" and "from the ELLA prompt" in title
    assert count(prompt, False, ENCODER, "Fixed", 128, "") == ""  # ELLA off: nothing shown

    text, classes, _ = counter(count(prompt, True, ENCODER, "Fixed", llm_tokens(prompt), ""))  # at the max: not over
    assert (text, classes) == (f"ELLA {llm_tokens(prompt)}/{llm_tokens(prompt)}", ["ella-count"])
    limit = llm_tokens(prompt) - 1  # over the fixed max
    text, classes, title = counter(count(prompt, True, ENCODER, "Fixed", limit, ""))
    assert (text, classes) == (f"ELLA {llm_tokens(prompt)}/{limit}", ["ella-count", "ella-over"])
    assert f"reads only the first {limit}" in title
    long = ", ".join(["a red cube"] * 200)  # over flexible mode's 512
    assert llm_tokens(long) > 512
    text, classes, title = counter(count(long, True, ENCODER, "Flexible", 128, ""))
    assert (text, classes) == (f"ELLA {llm_tokens(long)}", ["ella-count", "ella-over"])
    assert "reads only the first 512" in title
    text, classes, _ = counter(count(long, True, ENCODER, "Fixed", 512, ""))
    assert (text, classes) == (f"ELLA {llm_tokens(long)}/512", ["ella-count", "ella-over"])


def test_token_counter_flexible_limit_is_the_chosen_encoders(host, models_dir, tiny_llama_dir):
    """Flexible mode reads up to the encoder's own limit (the tiny Llama's is 64, T5's 512), not T5's for every LLM."""
    import shutil

    folder = models_dir / "ELLA" / "text_encoders" / "tiny-llama"
    shutil.copytree(tiny_llama_dir, folder)
    try:
        long = ", ".join(["a red cube"] * 30)
        text, classes, title = counter(ui_module().token_counter_html(long, True, "tiny-llama", "Flexible", 128, ""))
        assert "ella-over" in classes and "reads only the first 64" in title, title
        assert client_count(long, "tiny-llama")["limit"] == 64 and client_count(long, ENCODER)["limit"] == 512
    finally:
        shutil.rmtree(folder)


def client_count(text, encoder):
    from ella_ext.webui import api

    return api.count_tokens(text, encoder)


@pytest.mark.parametrize(("encoder", "needle"), [
    ("nope", "'nope' is not one of the listed models"),
    ("/etc", "is not one of the listed models"),
    ("", "flan-T5-XL"),  # the official one by default: listed, not downloaded
])
def test_token_counter_event_says_why_it_cannot_count(host, encoder, needle):
    text, classes, title = counter(ui_module().token_counter_html("a cat", True, encoder, "Fixed", 128, ""))
    assert (text, classes) == ("ELLA ?", ["ella-count"]) and needle in title


def test_ui_lists_models_of_the_folder_and_the_official_ones(host):
    controls = build(host.script)
    names = [c[0] if isinstance(c, tuple) else c for c in controls[1].choices]
    assert names[0] == options.OFFICIAL_CONNECTOR_NAME and CONNECTOR in names and "tiny-sdxl" in names
    encoders = [c[0] if isinstance(c, tuple) else c for c in controls[2].choices]
    assert options.OFFICIAL_TEXT_ENCODER_NAME in encoders and ENCODER in encoders


def paste(host, controls, params):
    """modules/infotext_utils.py: on_infotext_pasted callbacks, then each field takes params[key] (or stays)."""
    from modules import script_callbacks

    params = dict(params)
    script_callbacks.infotext_pasted_callback("", params)
    by_control = {id(c): key for c, key in host.script.infotext_fields}
    return [params.get(by_control[id(c)]) for c in controls]


def test_paste_restores_every_control(host):
    controls = build(host.script)
    params = {"ELLA": CONNECTOR, "ELLA LLM": ENCODER, "ELLA tokens": "fixed 96", "ELLA mode": "ELLA + CLIP",
              "ELLA negative": "Empty", "ELLA prompt": "a red cube", "ELLA hires": "off"}
    assert paste(host, controls, params) == [True, CONNECTOR, ENCODER, "Fixed", 96, "ELLA + CLIP", "Empty",
                                             "a red cube", False]
    assert paste(host, controls, {"Steps": "20"})[0] is False  # an image made without ELLA turns it off


def test_send_to_copies_every_control(host):
    # modules/infotext_utils.py connect_paste_params_buttons: "Send to" copies the source tab's fields whose key is
    # in paste_field_names to the target tab's fields with the same key
    source = build(host.script, False)
    source_fields = list(host.script.infotext_fields)
    target = build(host.script, True)
    names = host.script.paste_field_names
    copied_from = [c for c, key in source_fields if key in names]
    copied_to = [c for c, key in host.script.infotext_fields if key in names]
    assert copied_from == source and copied_to == target


def test_infotext_round_trip_through_options():
    chosen = options.ELLAOptions(True, "c", "e", options.FIXED, 77, options.ELLA_AND_CLIP, options.NEGATIVE_EMPTY,
                                 "x", False)
    assert options.from_mapping(infotext.from_infotext(infotext.values(chosen))) == chosen


def pasted_overrides(host, controls, params):
    """modules/infotext_utils.py connect_paste: the on_infotext_pasted callbacks, then the settings overrides of the
    keys no paste field handles (the "Override settings" dropdown)."""
    from modules import infotext_utils, script_callbacks

    params = dict(params)
    script_callbacks.infotext_pasted_callback("", params)
    handled = {key: 1 for _, key in host.script.infotext_fields}
    return infotext_utils.get_override_settings(params, skip_fields=handled)


def test_paste_restores_the_emphasis_setting(host):
    from modules import script_callbacks, shared

    script_callbacks.ui_settings_callback()
    controls = build(host.script)
    shared.opts.set("ella_emphasis", "off")
    p, processed = host.run("(red:1.5) cube", steps=1)
    made_off = {"Prompt": "(red:1.5) cube", **{k: v for k, v in p.extra_generation_params.items() if v is not None}}
    assert made_off["ELLA emphasis"] == "off"
    shared.opts.set("ella_emphasis", "attention")
    assert pasted_overrides(host, controls, made_off) == [("ELLA emphasis", "ella_emphasis", "off")]
    # an image made with the default records nothing; pasted while the setting is off, the default comes back
    p, _ = host.run("(red:1.5) cube", steps=1)
    made_default = {"Prompt": "(red:1.5) cube", **{k: v for k, v in p.extra_generation_params.items() if v is not None}}
    assert "ELLA emphasis" not in made_default
    shared.opts.set("ella_emphasis", "off")
    assert pasted_overrides(host, controls, made_default) == [("ELLA emphasis", "ella_emphasis", "attention")]
    # ... only when its prompt has emphasis (as the host's own "Emphasis"), and only for an image ELLA conditioned
    assert pasted_overrides(host, controls, {**made_default, "Prompt": "red cube"}) == []
    assert pasted_overrides(host, controls, {"Prompt": "(red:1.5) cube", "Steps": "20"}) == []
    # and the override pastes back into the generation as the host reads it
    from modules import infotext_utils

    assert infotext_utils.create_override_settings_dict(["ELLA emphasis: off"]) == {"ella_emphasis": "off"}


def test_settings_section(host):
    from modules import shared

    from ella_ext.webui import settings

    settings.on_ui_settings()
    assert set(settings.DEFAULTS) <= set(shared.opts.data_labels)
    assert all(shared.opts.data_labels[k].section == ("ella", "ELLA") for k in settings.DEFAULTS)
    assert shared.opts.ella_llm_dtype == "auto"
    assert shared.opts.ella_emphasis == "attention"
    emphasis = shared.opts.data_labels["ella_emphasis"]
    assert emphasis.label == "Emphasis in the LLM prompt" and emphasis.infotext == "ELLA emphasis"
    assert emphasis.component_args == {"choices": ["attention", "off"]}


def test_xyz_axes_added_once(host):
    import types

    from modules import scripts

    from ella_ext.webui import xyz

    class AxisOption:
        def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None):
            self.label, self.apply, self.choices = label, apply, choices

    grid = types.SimpleNamespace(AxisOption=AxisOption, axis_options=[])
    scripts.scripts_data.append(scripts.ScriptClassData(type("XYZ", (), {"__module__": "xyz_grid.py"}), "", "", grid))
    try:
        xyz.add_axes()
        xyz.add_axes()  # a UI reload
    finally:
        scripts.scripts_data.clear()
    labels = [o.label for o in grid.axis_options]
    assert labels == ["[ELLA] Enabled", "[ELLA] Connector", "[ELLA] Token length", "[ELLA] CLIP mode",
                      "[ELLA] Emphasis"]
    assert grid.axis_options[4].choices() == ["attention", "off"]
    assert CONNECTOR in grid.axis_options[1].choices()


# -- API ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def client(host):
    from fastapi import Body, Depends, FastAPI, HTTPException
    from fastapi.security import HTTPBasic
    from fastapi.testclient import TestClient
    from modules import script_callbacks, shared

    app = FastAPI()

    def host_auth(credentials: HTTPBasicCredentials = Depends(HTTPBasic(auto_error=False))):  # noqa: B008
        """modules/api/api.py Api.auth, applied to /sdapi/v1/* only when --api-auth is given."""
        if not shared.cmd_opts.api_auth:
            return True
        users = dict(pair.split(":") for pair in shared.cmd_opts.api_auth.split(","))
        if credentials is not None and users.get(credentials.username) == credentials.password:
            return True
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})

    @app.post("/sdapi/v1/txt2img", dependencies=[Depends(host_auth)])
    def txt2img(payload: dict = Body(...)):  # noqa: B008 - the host's generation route, echoing what reached it
        return {"received": payload, "images": ["x" * 200_000]}

    @app.middleware("http")  # as modules/api/api.py api_middleware: a BaseHTTPMiddleware, which watches receive()
    async def log_and_time(request, call_next):
        return await call_next(request)

    with TestClient(app) as test_client:  # the app has started, as in the host when app_started callbacks run
        script_callbacks.app_started_callback(None, app)
        assert script_callbacks.reported == []
        yield test_client


def test_models_endpoint(client):
    listing = client.get("/ella/v1/models").json()
    names = [c["name"] for c in listing["connectors"]]
    assert CONNECTOR in names and options.OFFICIAL_CONNECTOR_NAME in names
    official = next(c for c in listing["connectors"] if c["official"])
    assert official["available"] is False
    assert ENCODER in [e["name"] for e in listing["text_encoders"]]
    assert listing["args"] == list(options.FIELD_NAMES)


def test_models_endpoint_names_no_paths(client, models_dir):
    import json

    listing = client.get("/ella/v1/models")
    assert str(models_dir) not in listing.text and "path" not in json.dumps(listing.json()["connectors"])


def test_token_counter_endpoint(client):
    short = client.post("/ella/v1/tokens", json={"text": "a cat", "text_encoder": ENCODER}).json()
    long = client.post("/ella/v1/tokens", json={"text": "a cat " * 40, "text_encoder": ENCODER}).json()
    assert 2 <= short["tokens"] < long["tokens"] and short["limit"] == 512 and short["text_encoder"] == ENCODER


@pytest.mark.parametrize(("payload", "status", "kind", "needle"), [
    ({"text": 5, "text_encoder": ENCODER}, 422, "ELLAArgumentError", "'text' must be a string"),
    ({"text": "a", "text_encoder": "nope"}, 422, "ELLAArgumentError",
     f"not one of the listed models (models--google--flan-t5-xl--text_encoder, {ENCODER})"),
    ({"text": "a", "text_encoder": "/etc"}, 422, "ELLAArgumentError", "not one of the listed models"),
    ({"text": "a"}, 404, "ELLAModelNotAvailable", "flan-T5-XL"),  # the official one: listed, not downloaded
])
def test_token_counter_errors_have_the_documented_shape(client, payload, status, kind, needle):
    response = client.post("/ella/v1/tokens", json=payload)
    assert response.status_code == status
    assert response.json()["error"] == kind and needle in response.json()["detail"]


def test_token_counter_error_for_an_unreadable_encoder_is_not_a_missing_model(client, models_dir, tiny_t5_dir):
    """A listed encoder whose tokenizer cannot be read is on disk: not 404 ("not available"), but a server-side 500."""
    import shutil

    folder = models_dir / "ELLA" / "text_encoders" / "no-tokenizer"
    shutil.copytree(tiny_t5_dir, folder)
    (folder / "spiece.model").write_bytes(b"not a sentencepiece model")
    try:
        response = client.post("/ella/v1/tokens", json={"text": "a", "text_encoder": "no-tokenizer"})
        assert response.status_code == 500, response.text
        detail = response.json()["detail"]
        assert response.json()["error"] == "ELLAModelUnusable" and "text_encoders/no-tokenizer" in detail
        assert str(models_dir) not in detail, "no server folders in an API answer"
    finally:
        shutil.rmtree(folder)


def test_token_counter_serves_concurrent_requests_one_tokenizer_call_at_a_time(client, monkeypatch):
    """Fast tokenizers fail ("Already borrowed") when two threads use one at once; the API runs requests in a thread
    pool. The tokenizer's lock is replaced by one that knows its holder, and every tokenizer call checks that its own
    thread holds it: no timing involved, a call made without the lock fails whatever the threads' order."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from ella_ext.webui import api

    client.post("/ella/v1/tokens", json={"text": "warm", "text_encoder": ENCODER})  # the tokenizer is cached now
    tokenizer, limit, _ = api._tokenizers[ENCODER]

    class HolderLock:
        def __init__(self):
            self._lock, self.holder = threading.Lock(), None

        def __enter__(self):
            self._lock.acquire()
            self.holder = threading.get_ident()

        def __exit__(self, *exc):
            self.holder = None
            self._lock.release()

    lock, calls, unheld = HolderLock(), [], []

    def watched(*args, **kwargs):
        calls.append(threading.get_ident())
        if lock.holder != threading.get_ident():
            unheld.append(args)
        return tokenizer(*args, **kwargs)

    monkeypatch.setitem(api._tokenizers, ENCODER, (watched, limit, lock))
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda i: client.post("/ella/v1/tokens", json={"text": f"cat {i}",
                                                                                 "text_encoder": ENCODER}), range(4)))
    assert all(a.status_code == 200 for a in answers)
    assert len(calls) >= 4 and unheld == [], "a tokenizer call ran without its lock"


def test_api_auth_guards_the_ella_routes_like_the_hosts(client, monkeypatch):
    from modules import shared

    monkeypatch.setattr(shared.cmd_opts, "api_auth", "alice:s3cret,bob:pw")
    assert client.get("/ella/v1/models").status_code == 401
    assert client.get("/ella/v1/models", auth=("alice", "wrong")).status_code == 401
    assert client.get("/ella/v1/models", auth=("bob", "pw")).status_code == 200
    assert client.post("/ella/v1/tokens", json={"text": "a", "text_encoder": ENCODER}).status_code == 401
    ok = client.post("/ella/v1/tokens", json={"text": "a", "text_encoder": ENCODER}, auth=("alice", "s3cret"))
    assert ok.status_code == 200
    bad = {"prompt": "a", "alwayson_scripts": {"ELLA": {"args": [{"enabled": True, "connector": "/etc/passwd"}]}}}
    anonymous = client.post("/sdapi/v1/txt2img", json=bad)
    assert anonymous.status_code == 401 and "listed" not in anonymous.text  # no model names for strangers
    assert client.post("/sdapi/v1/txt2img", json=bad, auth=("alice", "s3cret")).status_code == 422


@pytest.mark.parametrize("args", [
    [True, CONNECTOR, ENCODER],
    [{"enabled": True, "connector": CONNECTOR, "clip_mode": "ella+clip"}],
])
def test_valid_generation_requests_pass_unchanged(client, args):
    body = {"prompt": "a cat", "alwayson_scripts": {"ella": {"args": args}}}
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200 and response.json()["received"] == body
    assert len(response.json()["images"][0]) == 200_000  # the whole response: the body replay did not end it


@pytest.mark.parametrize(("args", "message"), [
    ([{"enabled": True, "clip": "yes"}], "unknown field 'clip'; the fields are enabled, connector"),
    ([True, "/etc/passwd"],
     f"the connector '/etc/passwd' is not one of the listed models (ella-sd1.5-tsc-t5xl, {CONNECTOR}, tiny-sdxl)"),
    ([True, "../ELLA/tiny-sd15"], "the connector '../ELLA/tiny-sd15' is not one of the listed models"),
    ([True, CONNECTOR, "google/flan-t5-xxl"], "the text encoder 'google/flan-t5-xxl' is not one of the listed"),
    ([True, CONNECTOR, "~/secrets"], "the text encoder '~/secrets' is not one of the listed"),
    ([{"token_length": "long"}], "token_length must be one of 'Flexible', 'Fixed'"),
    ([True, CONNECTOR, ENCODER, "Fixed", 9999], "max_length must be a whole number from 1 to 512"),
    ({"enabled": True}, "'args' must be a list"),
])
def test_invalid_generation_requests_are_rejected(client, args, message):
    response = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "alwayson_scripts": {"ELLA": {"args": args}}})
    assert response.status_code == 422
    assert message in response.json()["detail"]


def test_other_requests_untouched(client):
    response = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat"})
    assert response.status_code == 200
